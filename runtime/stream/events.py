"""What the inspection pipeline hands to its sinks: one ``FrameEvent`` per processed frame (the
stream's frames, and predict's)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..result import Result
from ..records import make_error_record, make_record


@dataclass
class FrameEvent:
    """One processed frame of one source.

    source: the source's name (``--source NAME=...`` or the spec as given).
    frame_index: index of the frame in its source, counting every frame read (dropped ones too).
    captured: wall-clock time (``time.time()``) when the frame was read.
    result: the Detector's Result for the frame: score, maps at the frame's resolution and the
        decision (``anomalous``, ``threshold``, ``regions`` in frame pixels).
    latency_ms: per stage: wait (capture -> inference start), preprocess, model, scoring, tta, total
        (capture -> decision), added (total less the model's share); None: each class's Result's own
        timings (predict).
    frame: the frame as read (BGR uint8, region of interest applied).
    source_index: the source's position in the pipeline (for sinks that keep one output per
        source; not part of the record).
    run: the id of the stream run.
    annotated: the frame with heat map, region contours, score, decision and FPS drawn (BGR uint8);
        set by the pipeline before any sink sees the event.
    path: the file the frame came from (images, predict's inputs): the record's ``source``.
    key: the frame's output name, for sinks that write files named after their input (predict).
    files: per class, what a sink wrote for the frame (``overlay``, ``map``, ``map_shape``), added to
        that class's record; a sink that writes files comes before those that send records.
    extra: fields added to every record of the frame (with ``--enrol``: ``phase`` and ``calibration``).
    error: why the frame could not be scored (``result`` is then None and ``classes`` names what it
        was to be scored for); such events go only to sinks that take them (``takes_errors``: those
        that send records), as records with ``error`` set.
    """

    source: str
    frame_index: int
    captured: float
    result: Result | None
    latency_ms: dict[str, float] | None
    frame: np.ndarray
    source_index: int = 0
    run: str | None = None
    annotated: np.ndarray | None = None
    path: str | None = None
    key: str | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)  # fields every record of the frame gains (enrolment: phase)
    _records: list[dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cls(self) -> str:
        return self.result.cls

    @property
    def score(self) -> float:
        return self.result.score

    @property
    def anomalous(self) -> bool | None:
        return self.result.anomalous

    @property
    def regions(self) -> list[dict[str, Any]]:
        return self.result.regions

    @property
    def anomaly_map(self) -> np.ndarray:
        """float32 [H, W] p_abnormal at the frame's resolution."""
        return self.result.anomaly_map_full

    @property
    def threshold(self) -> float | None:
        """The image-score threshold the decision used."""
        return None if self.result.threshold is None else self.result.threshold.image

    @property
    def pixel_threshold(self) -> float | None:
        """The map threshold the regions used."""
        return None if self.result.threshold is None else self.result.threshold.pixel

    def record(self) -> dict[str, Any]:
        """The event's record (``anoclip.runtime.records``: what the events file, MQTT and the web
        view carry), of its first class; made once per event, whatever the number of sinks (treat
        it as read-only)."""
        return self.records()[0]

    def records(self) -> list[dict[str, Any]]:
        """One record per class the frame was scored for (one, in a stream), in the Result's order."""
        if self._records is None and self.error is not None:
            self._records = [make_error_record(name, self.path or self.source, self.error, frame=self.frame_index,
                                               captured=self.captured, run=self.run, image_size=self.frame.shape[:2])
                             for name in self.classes]
        if self._records is None:
            self._records = [make_record(one, self.path or self.source, frame=self.frame_index, captured=self.captured,
                                         run=self.run, timings_ms=self.latency_ms, files=self.files.get(name))
                             for name, one in self.result.by_class.items()]
            for record in self._records:
                record.update(self.extra)
        return self._records


class Sink:
    """Receives every processed frame, in order, on the sink thread; ``close`` finalises its output
    (called once, also on SIGINT/SIGTERM). ``write`` should not block for long: the pipeline's sink
    queue is bounded.

    Accounting: every frame a sink is handed is either ``written`` (stored or delivered: for a
    recording, only once the finished file was checked) or ``lost`` (a write that failed, a frame
    handed to a sink switched off after a failure, a recording that could not be finished); frames
    that are none of its business (a normal frame for ``--save-dir``) are neither. ``counts()`` is
    what the summary and the stats line report; a sink with lost frames ends the run with exit 3."""

    name = "sink"
    draws = True  # whether it uses the annotated frame (the pipeline draws it only when a sink does)
    takes_errors = False  # whether it is handed the events of frames that could not be scored
    written = 0
    lost = 0

    def write(self, event: FrameEvent) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def counts(self) -> dict[str, int]:
        """Frames written (stored, delivered) and lost so far."""
        return {"written": self.written, "lost": self.lost}
