"""Serving the runtime through Triton Inference Server (PyTriton) and a client for it.

``anoclip serve`` (``server.py``, ``cli.py``) binds a :class:`~anoclip.runtime.detector.Detector` to
a Triton server; :class:`~anoclip.runtime.serving.client.RemoteDetector` (``client.py``) sends images to one
or more such servers and returns the same ``Result`` objects a local Detector does. The client
needs only ``tritonclient``; the server needs ``nvidia-pytriton`` (``pip install 'anoclip[serve]'``).
"""

# The models a server binds (the protocol both sides share).
MODEL = "anoclip"  # encoded image bytes (PNG, JPEG, ...): input "image" BYTES [1]
FRAME_MODEL = "anoclip_frame"  # raw RGB frames: input "frame" UINT8 [H, W, 3]
INFO_MODEL = "anoclip_info"  # JSON description of what the server runs: classes, thresholds, grid, TTA
