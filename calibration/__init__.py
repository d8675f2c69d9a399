"""Calibration: turns exported artifacts into deployable ones, with the runtime only (it never
imports the export stage or PyTorch; see DESIGN.md).

* ``threshold``: image-score and pixel thresholds of a class from normal frames
  (``anoclip calibrate threshold``), stored in the artifact folder through ``runtime.thresholds``.
* ``frames``: the normal inputs (images, folders, videos) as RGB frames.
"""
