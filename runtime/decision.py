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
    centre, pixel_centre: the normal centres of the scores and of the map values, from the class's
        calibration (None without one): where :func:`severity` is 0.
    """

    image: float | None
    pixel: float | None
    origin: str
    centre: float | None = None
    pixel_centre: float | None = None

    @property
    def severity_scale(self) -> tuple[float, float] | None:
        """(normal centre, image threshold) of the score's severity; None when either is missing."""
        return _scale(self.centre, self.image)

    @property
    def pixel_scale(self) -> tuple[float, float] | None:
        """(normal centre, pixel threshold) of the map values' severity and of the fixed colour
        scale of the overlays; None when either is missing."""
        return _scale(self.pixel_centre, self.pixel)

    def severity(self, score: float) -> float | None:
        """The score's severity (:func:`severity`) against the image threshold in force."""
        return severity(score, self.severity_scale)

    def pixel_severity(self, value: float) -> float | None:
        """A map value's severity (:func:`severity`) against the pixel threshold in force."""
        return severity(value, self.pixel_scale)

    @classmethod
    def in_force(cls, calibrated: tuple[float | None, float | None] | None, image: float | None = None,
                 pixel: float | None = None,
                 centres: tuple[float | None, float | None] | None = None) -> "ClassThreshold | None":
        """The calibrated (image, pixel) thresholds, each replaced by ``image`` / ``pixel`` when
        given; None when there are neither. ``centres``: the calibration's normal centres (score,
        map value), each kept only where its threshold is the calibrated one (an override has no
        severity scale)."""
        values, origins = [image, pixel], {"override" for v in (image, pixel) if v is not None}
        for i in range(2):
            if values[i] is None and calibrated is not None and calibrated[i] is not None:
                values[i] = calibrated[i]
                origins.add("calibrated")
        if not origins:
            return None
        kept = [None, None]
        for i, given in enumerate((image, pixel)):
            if given is None and calibrated is not None and centres is not None and calibrated[i] is not None:
                kept[i] = centres[i]
        return cls(values[0], values[1], "+".join(sorted(origins)), kept[0], kept[1])


def _scale(centre: float | None, threshold: float | None) -> tuple[float, float] | None:
    if centre is None or threshold is None or not threshold > centre:
        return None
    return (float(centre), float(threshold))


def severity(value: float, scale: tuple[float, float] | None) -> float | None:
    """(value − m) / (T − m) for ``scale`` = (m, T), the normal centre and the threshold: 0 at the
    centre of the normal frames, 1 at the threshold, above 1 beyond it (negative below the centre);
    None without a scale (no calibration, or a threshold at or below the centre)."""
    if scale is None:
        return None
    centre, threshold = scale
    return (float(value) - centre) / (threshold - centre)


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
