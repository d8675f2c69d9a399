"""The annotated frame: heat map with its colour bar, thresholded regions, severity, decision and
frame rate."""

from __future__ import annotations

import numpy as np

from ..overlay import colour_scale_for, draw_regions, legend_note, overlay
from .events import FrameEvent

ANOMALY_BGR = (0, 0, 255)
NORMAL_BGR = (0, 200, 0)
UNDECIDED_BGR = (255, 255, 255)


def annotate(event: FrameEvent, fps: float | None = None, alpha: float = 0.4,
             colour_scale: str = "fixed") -> np.ndarray:
    """A BGR copy of the event's frame with everything a person at the line needs to see: the heat
    map (``colour_scale``: "fixed", tied to the class's pixel threshold where it has a calibrated
    one, or "frame", the map's own range) and its colour bar, the regions, the verdict and the
    severity against "1.00" (the threshold), or "no thresholds" where the class has no calibration."""
    import cv2

    scale = colour_scale_for(event.result.threshold, colour_scale)
    rgb = overlay(np.ascontiguousarray(event.frame[:, :, ::-1]), event.anomaly_map, alpha, scale=scale, legend=True,
                  legend_note=legend_note(event.result.threshold))
    if event.pixel_threshold is not None:
        rgb = draw_regions(rgb, event.anomaly_map, event.pixel_threshold, regions=event.regions,
                           regions_size=event.anomaly_map.shape[:2])
    image = np.ascontiguousarray(rgb[:, :, ::-1])
    if event.anomalous is None:
        verdict, colour = "no thresholds", UNDECIDED_BGR
    else:
        verdict, colour = ("ANOMALY", ANOMALY_BGR) if event.anomalous else ("ok", NORMAL_BGR)
    lines = [(headline(event, verdict), colour),
             (f"{event.source}  #{event.frame_index}" + (f"  {fps:.1f} fps" if fps else ""), UNDECIDED_BGR)]
    scale = max(0.35, min(image.shape[:2]) / 640)
    thickness = max(1, round(scale * 1.5))
    y = 0
    for text, colour in lines:
        (_, height), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        y += height + max(4, height // 2)
        for ink, width in (((0, 0, 0), thickness + 2), (colour, thickness)):  # outlined: legible on any frame
            cv2.putText(image, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, width, cv2.LINE_AA)
    if event.anomalous:
        cv2.rectangle(image, (0, 0), (image.shape[1] - 1, image.shape[0] - 1), ANOMALY_BGR, thickness + 1)
    return image


def headline(event: FrameEvent, verdict: str) -> str:
    """The verdict and the severity (2 decimals) against the threshold's "1.00"; "no thresholds" in
    place of the number for a class without a calibration (without thresholds the verdict says so)."""
    threshold = event.result.threshold
    severity = None if threshold is None else threshold.severity(event.score)
    if severity is not None:
        return f"{verdict}  severity {severity:.2f} / 1.00"
    return verdict if threshold is None else f"{verdict}  no thresholds"
