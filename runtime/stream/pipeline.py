"""The inspection pipeline: capture threads -> one inference worker -> one sink thread. ``stream``
runs it on live and finite sources, ``predict`` on one finite source (its inputs, read in order,
no frame dropped).

The inference worker takes the newest frame of every source that has one, groups them by class
and scores each group as one batch through the Detector (one engine for all sources). Decisions
become ``FrameEvent``s on a bounded queue; the sink thread draws the annotated frame and hands the
event to every sink, so drawing, encoding and writing overlap with the next inference. A slow sink
holds the queue full and so slows inference, never memory; the capture threads then drop frames of
live sources (counted), so latency stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..detector import Detector
from ..errors import AnoclipError
from ..outputs import run_id
from ..preprocess import DEFAULT_MAX_PIXELS
from .annotate import annotate
from .capture import CaptureThread, Frame, FrameBoard
from .events import FrameEvent, Sink
from .sources import SourceSpec, unique_names
from .stats import StreamStats

log = logging.getLogger(__name__)

VIEW_STATS_INTERVAL_S = 1.0


@dataclass
class StreamOptions:
    """How frames are taken and decided (see ``anoclip stream --help``)."""

    stride: int = 1
    max_fps: float | None = None
    loop: bool = False
    realtime: bool = False
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # largest frame of a finite source (images, video files)
    threshold: float | None = None  # overrides the calibrated image threshold
    pixel_threshold: float | None = None  # overrides the calibrated pixel threshold
    alpha: float = 0.4
    max_batch: int = 8
    stats_interval: float = 10.0  # seconds between stats lines in the log (0: none)
    sink_queue: int = 8
    stop_on_sink_error: bool = False  # a failing sink ends the run (predict) instead of being switched off


class StreamPipeline:
    """Build it, ``open()`` the sources (one clear error when one cannot be opened), then ``run()``
    until every file source has ended or ``stop`` is set (SIGINT/SIGTERM); ``run`` returns the summary."""

    def __init__(self, detector: Detector, sources: list[SourceSpec], sinks: list[Sink],
                 options: StreamOptions | None = None):
        self.detector = detector
        self.sources = sources = unique_names(sources)
        self.sinks = list(sinks)
        self.options = options or StreamOptions()
        detector.threshold_override = (self.options.threshold, self.options.pixel_threshold)  # decided in predict
        self.stop = threading.Event()
        self.board = FrameBoard(len(sources))
        o = self.options
        self.captures = [CaptureThread(i, spec, self.board, self.stop, stride=o.stride, max_fps=o.max_fps,
                                       loop=o.loop, realtime=o.realtime, roi=o.roi, max_pixels=o.max_pixels)
                         for i, spec in enumerate(sources)]
        self.stats = StreamStats(self.captures)
        self._queue: queue.Queue[FrameEvent | None] = queue.Queue(maxsize=o.sink_queue)
        self.run_id = run_id()
        self._generations = [0] * len(sources)
        self.sink_errors: dict[str, str] = {}

    def open(self) -> None:
        for capture in self.captures:
            capture.open()
        for capture in self.captures:
            if capture.spec.kind == "images":
                log.info("source %s: %d files, class %s", capture.spec.name, len(capture.spec.inputs), capture.spec.cls)
                continue
            height, width = _frame_size(capture)
            log.info("source %s: %s, %s fps, class %s", capture.spec.name, f"{width}x{height}" if height else "size unknown",
                     f"{capture.fps:.1f}" if capture.fps else "?", capture.spec.cls)

    def run(self) -> dict:
        sink_thread = threading.Thread(target=self._sink_loop, name="sinks", daemon=True)
        sink_thread.start()
        for capture in self.captures:
            capture.start()
        next_log = time.perf_counter() + (self.options.stats_interval or float("inf"))
        next_view = time.perf_counter()
        try:
            while not self.stop.is_set():
                frames = self.board.take(timeout=0.2)
                if frames:
                    self._infer(frames)
                elif self.board.all_finished():
                    break
                now = time.perf_counter()
                if now >= next_view:
                    next_view = now + VIEW_STATS_INTERVAL_S
                    self._share_stats()
                if now >= next_log:
                    next_log = now + self.options.stats_interval
                    log.info(self.stats.interval_line())
        finally:
            self.stop.set()
            for capture in self.captures:
                capture.join(timeout=2.0)  # a read blocked on a dead stream ends with its timeout; the thread is a daemon
            self._queue.put(None)
            sink_thread.join()
        return self.stats.summary()

    # ------------------------------------------------------------------------------------------

    def _infer(self, frames: list[Frame]) -> None:
        groups: dict[str, list[Frame]] = {}
        for frame in frames:
            groups.setdefault(self.sources[frame.source].cls, []).append(frame)
        for cls, group in groups.items():
            for start in range(0, len(group), self.options.max_batch):
                self._infer_batch(cls, group[start:start + self.options.max_batch])

    def _infer_batch(self, cls: str | tuple[str, ...], frames: list[Frame]) -> None:
        detector = self.detector
        names = [cls] if isinstance(cls, str) else list(cls)
        keys = [self._tta_key(frame) for frame in frames]
        if detector.tta is not None:
            for frame, key in zip(frames, keys):
                if frame.generation != self._generations[frame.source]:  # the source reconnected
                    self._generations[frame.source] = frame.generation
                    for name in names:
                        detector.reset_tta(name, key)
        started = time.perf_counter()
        try:
            results = detector.predict_batch([self._image(frame) for frame in frames],
                                             names[0] if len(names) == 1 else names, tta_keys=keys)
        except AnoclipError as exc:
            for frame in frames:
                self.stats.failed[frame.source] += 1
            log.error("%s could not be scored: %s", ", ".join(_shown(f, self.sources[f.source]) for f in frames), exc)
            return
        self.stats.batch_sizes.append(len(frames))
        for frame, result in zip(frames, results):
            decided = time.perf_counter()
            model_ms = result.timings["model"] * len(frames)  # the engine run this frame waited for
            total_ms = (decided - frame.captured_perf) * 1e3
            latency = {"wait": (started - frame.captured_perf) * 1e3, **result.timings, "model": model_ms,
                       "total": total_ms, "added": total_ms - model_ms}
            self.stats.record(frame.source, result.anomalous, latency)
            origin = frame.origin
            event = FrameEvent(source=self.sources[frame.source].name,
                               frame_index=frame.index if origin is None else origin.index, captured=frame.captured,
                               result=result, latency_ms=latency, frame=frame.image, source_index=frame.source,
                               run=self.run_id, path=None if origin is None else str(origin.source.path),
                               key=None if origin is None else _key(origin))
            self._queue.put(event)

    def _image(self, frame: Frame):
        """What the detector is given: an image file's bytes as stored when it sends encoded images
        (a remote detector), else the frame's pixels (RGB)."""
        if frame.origin is not None and frame.origin.data is not None and getattr(self.detector, "sends_encoded", False):
            return frame.origin.data
        return frame.image[:, :, ::-1]

    def _tta_key(self, frame: Frame) -> str:
        return self.sources[frame.source].name

    def _share_stats(self) -> None:
        summary = None
        for sink in self.sinks:
            update = getattr(sink, "update_stats", None)
            if update is not None and sink.name not in self.sink_errors:
                summary = summary or self.stats.summary()
                update(summary)

    # ------------------------------------------------------------------------------------------

    def _sink_loop(self) -> None:
        drawn = any(getattr(sink, "draws", True) for sink in self.sinks)  # the annotated frame is made only for sinks that show it
        while True:
            event = self._queue.get()
            if event is None:
                break
            try:
                if drawn:
                    event.annotated = annotate(event, self.stats.fps(event.source_index), self.options.alpha)
            except Exception:
                log.exception("drawing frame %d of %s failed", event.frame_index, event.source)
                continue
            for sink in self.sinks:
                if sink.name in self.sink_errors:
                    continue
                try:
                    sink.write(event)
                except Exception as exc:  # a broken sink is switched off, the others go on
                    self.sink_errors[sink.name] = str(exc)
                    if self.options.stop_on_sink_error:
                        self.stop.set()
                    else:
                        log.error("%s failed and is switched off: %s", sink.name, exc)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                self.sink_errors.setdefault(sink.name, str(exc))
                log.error("closing %s failed: %s", sink.name, exc)


def _key(origin) -> str:
    """The output name of a frame of a file: the file's key, with the frame's index for a video."""
    return f"{origin.source.key}_{origin.index:06d}" if origin.source.video else origin.source.key


def _shown(frame: Frame, spec: SourceSpec) -> str:
    """A frame as named in messages: its file (and index, in a video), or its source and index."""
    origin = frame.origin
    if origin is None:
        return f"frame {frame.index} of {spec.name}"
    return f"frame {origin.index} of {origin.source.path}" if origin.source.video else str(origin.source.path)


def _frame_size(capture: CaptureThread) -> tuple[int | None, int | None]:
    import cv2

    if capture.capture is None:
        return None, None
    height = int(capture.capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0) or None
    width = int(capture.capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0) or None
    return height, width
