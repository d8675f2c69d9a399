"""The PyTorch-free runtime: artifacts, preprocessing, backends, scoring, test-time adaptation.

    from anoclip.runtime import Detector
    detector = Detector.load("artifacts/vitb16p")
    result = detector.predict("image.png", "bottle")
"""

from .detector import Detector, Result
from .tta import TTAConfig

__all__ = ["Detector", "Result", "TTAConfig"]
