"""Calibration: INT8 quantisation from in-domain images and score thresholds from normal frames.

Depends on the runtime only (see DESIGN.md); nothing is implemented here yet.
"""
