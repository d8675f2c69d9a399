"""Calibration: turns exported artifacts into deployable ones, with the runtime only (it never
imports the export stage or PyTorch; see DESIGN.md).

* ``threshold``: image-score and pixel thresholds of a class from normal frames
  (``anoclip calibrate threshold``), stored in the artifact folder through ``runtime.thresholds``.
* Frames are read through the runtime's one reader (``anoclip.runtime.inputs``): images, folders,
  patterns and videos, as predict and stream read them.
* ``int8``, ``fp16``: reduced-precision models of the visual model (``anoclip calibrate int8|fp16``);
  ``parity`` checks them against fp32 (figures and gate), ``derived`` reads their frames and stores
  them in the artifact folder. They need onnx (the ``quantize`` extra), imported only when used.
"""
