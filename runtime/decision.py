"""The decision: which thresholds are in force for a class, and what they make of a score and a map.

``Detector.predict`` takes it for every image and class it scores (``Result.threshold``,
``Result.anomalous``, ``Result.regions``); every consumer (predict lines, stream events, the
server's answer) reads those fields instead of deciding again. The thresholds themselves come from
the thresholds file (``thresholds.py``) or from the user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassThreshold:
    """The thresholds in use for one class.

    image: a frame is anomalous when its score > image (None: no decision).
    pixel: map pixels > pixel form the anomalous regions (None: no regions).
    origin: "calibrated" (from the thresholds file), "override" (given by the user) or
        "calibrated+override" (one of each).
    """

    image: float | None
    pixel: float | None
    origin: str

    @classmethod
    def in_force(cls, calibrated: tuple[float | None, float | None] | None, image: float | None = None,
                 pixel: float | None = None) -> "ClassThreshold | None":
        """The calibrated (image, pixel) thresholds, each replaced by ``image`` / ``pixel`` when
        given; None when there are neither."""
        values, origins = [image, pixel], {"override" for v in (image, pixel) if v is not None}
        for i in range(2):
            if values[i] is None and calibrated is not None and calibrated[i] is not None:
                values[i] = calibrated[i]
                origins.add("calibrated")
        return cls(values[0], values[1], "+".join(sorted(origins))) if origins else None


def find_regions(anomaly_map: np.ndarray, pixel: float, min_area: int = 1) -> list[dict]:
    """Connected regions (8-connectivity) of the pixels with ``anomaly_map > pixel``, each
    ``{"box": [x, y, width, height], "area": pixels}`` in map pixels, largest first; regions
    smaller than ``min_area`` pixels are left out."""
    import cv2

    mask = (np.asarray(anomaly_map) > pixel).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for x, y, w, h, area in stats[1:count].tolist():  # label 0 is the background
        if area >= min_area:
            regions.append({"box": [int(x), int(y), int(w), int(h)], "area": int(area)})
    regions.sort(key=lambda r: (-r["area"], r["box"][1], r["box"][0]))
    return regions


def decide(score: float, anomaly_map: np.ndarray,
           threshold: ClassThreshold | None) -> tuple[bool | None, list[dict]]:
    """(anomalous, regions): anomalous is ``score > threshold.image`` (None without an image
    threshold), regions those of :func:`find_regions` ([] without a pixel threshold)."""
    if threshold is None:
        return None, []
    anomalous = None if threshold.image is None else bool(score > threshold.image)
    regions = [] if threshold.pixel is None else find_regions(anomaly_map, threshold.pixel)
    return anomalous, regions
