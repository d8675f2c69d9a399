"""anoclip.calibration."""
