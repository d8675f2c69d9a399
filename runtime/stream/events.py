"""What the stream pipeline hands to its sinks: one ``FrameEvent`` per processed frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FrameEvent:
    """One processed frame of one source.

    source: the source's name (``--source NAME=...`` or the spec as given).
    frame_index: index of the frame in its source, counting every frame read (dropped ones too).
    captured: wall-clock time (``time.time()``) when the frame was read.
    cls: the class the frame was scored for.
    score: image-level p_abnormal.
    anomalous: the decision against the class's image threshold; None when the class has none.
    regions: connected regions of the map at or above the pixel threshold, as
        ``{"box": [x, y, width, height], "area": pixels}`` in frame pixels (empty without a threshold).
    latency_ms: per stage: wait (capture -> inference start), preprocess, model, scoring, tta, total
        (capture -> decision).
    frame: the frame as read (BGR uint8, region of interest applied).
    anomaly_map: float32 [H, W] p_abnormal at the frame's resolution.
    annotated: the frame with heat map, region contours, score, decision and FPS drawn (BGR uint8);
        set by the pipeline before any sink sees the event.
    """

    source: str
    frame_index: int
    captured: float
    cls: str
    score: float
    anomalous: bool | None
    regions: list[dict[str, Any]]
    latency_ms: dict[str, float]
    frame: np.ndarray
    anomaly_map: np.ndarray
    annotated: np.ndarray | None = None
    threshold: float | None = None  # the image-score threshold the decision used
    pixel_threshold: float | None = None  # the map threshold the regions used
    extra: dict[str, Any] = field(default_factory=dict)
    _record: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def record(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (what the events file, MQTT and the web view carry); made
        once per event, whatever the number of sinks (treat it as read-only)."""
        if self._record is None:
            self._record = self._make_record()
        return self._record

    def _make_record(self) -> dict[str, Any]:
        return {
            "source": self.source, "frame": self.frame_index, "captured": round(self.captured, 6),
            "class": self.cls, "score": self.score, "anomalous": self.anomalous, "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold, "regions": self.regions, "map_max": float(self.anomaly_map.max()),
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()}, **self.extra,
        }


class Sink:
    """Receives every processed frame, in order, on the sink thread; ``close`` finalises its output
    (called once, also on SIGINT/SIGTERM). ``write`` should not block for long: the pipeline's sink
    queue is bounded."""

    name = "sink"

    def write(self, event: FrameEvent) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
