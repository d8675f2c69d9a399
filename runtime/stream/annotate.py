"""The annotated frame: heat map, thresholded regions, score, decision and frame rate."""

from __future__ import annotations

import numpy as np

from ..overlay import draw_regions, overlay
from .events import FrameEvent

ANOMALY_BGR = (0, 0, 255)
NORMAL_BGR = (0, 200, 0)
UNDECIDED_BGR = (255, 255, 255)


def annotate(event: FrameEvent, fps: float | None = None, alpha: float = 0.4) -> np.ndarray:
    """A BGR copy of the event's frame with everything a person at the line needs to see."""
    import cv2

    rgb = overlay(np.ascontiguousarray(event.frame[:, :, ::-1]), event.anomaly_map, alpha)
    if event.pixel_threshold is not None:
        rgb = draw_regions(rgb, event.anomaly_map, event.pixel_threshold, regions=event.regions,
                           regions_size=event.anomaly_map.shape[:2])
    image = np.ascontiguousarray(rgb[:, :, ::-1])
    if event.anomalous is None:
        verdict, colour = "no threshold", UNDECIDED_BGR
    else:
        verdict, colour = ("ANOMALY", ANOMALY_BGR) if event.anomalous else ("ok", NORMAL_BGR)
    lines = [(f"{verdict}  score {event.score:.6f}" + (f" / {event.threshold:.6f}" if event.threshold is not None else ""),
              colour),
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
