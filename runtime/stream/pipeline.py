"""The inspection pipeline: capture threads -> one inference worker -> one sink thread. ``stream``
runs it on live and finite sources, ``predict`` on one finite source (its inputs, read in order,
no frame dropped).

The inference worker takes the newest frame of every source that has one, groups them by class
and scores each group as one batch through the Detector (one engine for all sources). Decisions
become ``FrameEvent``s on a queue bounded in events and in bytes; the sink thread draws the
annotated frame and hands the event to every sink, so drawing, encoding and writing overlap with the
next inference. A slow sink holds the queue full and so slows inference, never memory; the capture
threads then drop frames of live sources (counted), so latency stays bounded. Frames of live sources
above ``max_pixels`` are scaled down to it before scoring (counted as ``scaled``), so no event holds
more than that many pixels.

Every frame is accounted for: a frame that could not be scored becomes an event with an ``error``
(for the sinks that send records), and each sink counts what it wrote and what it lost
(``Sink.counts``), in the summary (``sinks``) and the stats line; a sink that lost frames is a sink
error. When every server of a remote detector is gone the run ends with that one error.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass

from ..detector import Detector
from ..errors import AnoclipError
from ..outputs import run_id
from ..preprocess import DEFAULT_MAX_PIXELS
from ..serving.transport import ServersUnavailable
from .annotate import annotate
from .capture import CaptureThread, Frame, FrameBoard
from .events import FrameEvent, Sink
from .sources import SourceSpec, unique_names
from .stats import StreamStats

log = logging.getLogger(__name__)

VIEW_STATS_INTERVAL_S = 1.0
CAPTURE_JOIN_S = 2.0  # after stop, how long the capture threads are waited for (all together)
DEFAULT_SINK_QUEUE_BYTES = 256 * 2**20


@dataclass
class StreamOptions:
    """How frames are taken and decided (see ``anoclip stream --help``)."""

    stride: int = 1
    max_fps: float | None = None
    loop: bool = False
    realtime: bool = False
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # largest frame: finite sources refuse larger, live ones are scaled down
    threshold: float | None = None  # overrides the calibrated image threshold
    pixel_threshold: float | None = None  # overrides the calibrated pixel threshold
    alpha: float = 0.4
    colour_scale: str = "fixed"  # heat-map colours: "fixed" (tied to the pixel threshold where calibrated) or "frame"
    max_batch: int = 8
    stats_interval: float = 10.0  # seconds between stats lines in the log (0: none)
    sink_queue: int = 8
    sink_queue_bytes: int = DEFAULT_SINK_QUEUE_BYTES  # the events waiting for the sinks hold at most this (one always fits)
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
        self._queue = EventQueue(o.sink_queue, o.sink_queue_bytes)
        self.run_id = run_id()
        self._generations = [0] * len(sources)
        self.sink_errors: dict[str, str] = {}
        self.fatal: AnoclipError | None = None  # what ended the run (every server gone)
        self.enrolment = None  # an ``enrol.Enrolment`` when the run enrols its classes from its own frames

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
        """Stream until the sources end or ``stop``; the summary (``sinks``: each sink's counts).
        Raises the error that ended the run when every server is gone; a KeyboardInterrupt (a second
        SIGINT) removes the sinks' unfinished files before it goes on."""
        try:
            summary = self._run()
        except KeyboardInterrupt:
            self.abandon()
            raise
        if self.fatal is not None:
            raise self.fatal
        return summary

    def abandon(self) -> None:
        """Remove what the sinks had not finished (hidden partial recordings)."""
        for sink in self.sinks:
            abandon = getattr(sink, "abandon", None)
            if abandon is not None:
                try:
                    abandon()
                except Exception as exc:
                    log.error("removing the unfinished output of %s failed: %s", sink.name, exc)

    def sink_counts(self) -> dict[str, dict[str, int]]:
        """Per sink: frames written and lost (and what else the sink counts, e.g. MQTT's pending)."""
        return {sink.name: sink.counts() for sink in self.sinks if hasattr(sink, "counts")}

    def _sinks_line(self) -> str:
        parts = [f"{name} {c.get('written', 0)} written {c.get('lost', 0)} lost" for name, c in self.sink_counts().items()]
        return f", sinks: {', '.join(parts)}" if parts else ""

    def _run(self) -> dict:
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
                    log.info(self.stats.interval_line() + self._sinks_line())
        finally:
            self.stop.set()
            deadline = time.perf_counter() + CAPTURE_JOIN_S  # one wait for all of them, however many sources
            for capture in self.captures:  # a read blocked on a dead stream ends with its timeout; the thread is a daemon
                capture.join(timeout=max(0.0, deadline - time.perf_counter()))
            self._queue.put(None)
            sink_thread.join()
        summary = self.stats.summary()
        if self.enrolment is not None:
            summary["enrolment"] = self.enrolment.close()
        summary["sinks"] = self.sink_counts()
        for name, counts in summary["sinks"].items():
            if counts.get("lost"):
                self.sink_errors.setdefault(name, f"{counts['lost']} frame(s) lost")
        return summary

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
        for frame in frames:
            self._bound(frame)
        started = time.perf_counter()
        enrolment = self.enrolment
        tokens = enrolment is not None and len(names) == 1 and enrolment.wants_tokens(names[0])
        try:
            results = detector.predict_batch([self._image(frame) for frame in frames],
                                             names[0] if len(names) == 1 else names, tta_keys=keys, keep_tokens=tokens)
        except AnoclipError as exc:
            for frame in frames:
                self.stats.failed[frame.source] += 1
                self._queue.put(self._event(frame, None, None, error=f"{type(exc).__name__}: {exc}", classes=names))
            if isinstance(exc, ServersUnavailable):  # every server gone: the run ends with this one line
                self.fatal = AnoclipError(f"every server is gone, so the run stops: {exc}")
                self.stop.set()
                return
            log.error("%s could not be scored: %s", ", ".join(_shown(f, self.sources[f.source]) for f in frames), exc)
            return
        self.stats.batch_sizes.append(len(frames))
        for frame, result in zip(frames, results):
            decided = time.perf_counter()
            model_ms = result.timings["model"] * len(frames)  # the engine run this frame waited for
            total_ms = (decided - frame.captured_perf) * 1e3
            latency = {"wait": (started - frame.captured_perf) * 1e3, **result.timings, "model": model_ms,
                       "total": total_ms, "added": total_ms - model_ms}
            extra = {}
            if enrolment is not None and len(names) == 1:  # the enrolment decides the phase (no decision while enrolling)
                extra = enrolment.observe(self.sources[frame.source].name, _index(frame), result)
                result.patch_tokens = None  # kept by the enrolment where it needs them, not by the sinks' queue
            self.stats.record(frame.source, result.anomalous, latency)
            event = self._event(frame, result, latency)
            event.extra = extra
            self._queue.put(event)

    def _event(self, frame: Frame, result, latency, error: str | None = None, classes=()) -> FrameEvent:
        origin = frame.origin
        return FrameEvent(source=self.sources[frame.source].name,
                          frame_index=_index(frame), captured=frame.captured,
                          result=result, latency_ms=latency, frame=frame.image, source_index=frame.source,
                          run=self.run_id, path=None if origin is None else str(origin.source.path),
                          key=None if origin is None else _key(origin), error=error, classes=tuple(classes))

    def _bound(self, frame: Frame) -> None:
        """A live frame above ``max_pixels`` is scaled down to it (counted), before anything holds it twice."""
        import cv2

        limit = self.options.max_pixels
        height, width = frame.image.shape[:2]
        if not limit or height * width <= limit:
            return
        scale = math.sqrt(limit / (height * width))
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        frame.image = cv2.resize(frame.image, size, interpolation=cv2.INTER_AREA)
        if self.stats.scaled[frame.source] == 0:
            log.warning("frames of %s are %dx%d, above --max-pixels %d: scaled down to %dx%d (counted as scaled)",
                        self.sources[frame.source].name, width, height, limit, *size)
        self.stats.scaled[frame.source] += 1

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
                if drawn and event.error is None:
                    event.annotated = annotate(event, self.stats.fps(event.source_index), self.options.alpha,
                                               self.options.colour_scale)
            except Exception:
                log.exception("drawing frame %d of %s failed; its sinks get it undrawn", event.frame_index, event.source)
                event.annotated = event.frame
            for sink in self.sinks:
                if event.error is not None and not getattr(sink, "takes_errors", False):
                    continue
                if sink.name in self.sink_errors:
                    _lose(sink)  # switched off: what it was to write is lost
                    continue
                try:
                    sink.write(event)
                except Exception as exc:  # a broken sink is switched off, the others go on
                    _lose(sink)
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


class EventQueue:
    """The events waiting for the sinks: at most ``count`` of them and ``max_bytes`` of their arrays
    (the frame, its full-size map, and the annotated frame to come); ``put`` waits for room, and an
    event alone always fits. ``None`` (the end) is never refused."""

    def __init__(self, count: int, max_bytes: int):
        self.count, self.max_bytes = max(1, count), max_bytes
        self._items: collections.deque[tuple[FrameEvent | None, int]] = collections.deque()
        self._bytes = 0
        self._changed = threading.Condition()

    @staticmethod
    def size(event: FrameEvent | None) -> int:
        if event is None:
            return 0
        size = 2 * event.frame.nbytes  # the frame and the annotated frame drawn from it
        if event.result is not None:
            size += event.result.anomaly_map_full.nbytes
        return size

    def put(self, event: FrameEvent | None) -> None:
        size = self.size(event)
        with self._changed:
            self._changed.wait_for(lambda: event is None or not self._items or (
                len(self._items) < self.count and self._bytes + size <= self.max_bytes))
            self._items.append((event, size))
            self._bytes += size
            self._changed.notify_all()

    def get(self) -> FrameEvent | None:
        with self._changed:
            self._changed.wait_for(lambda: bool(self._items))
            event, size = self._items.popleft()
            self._bytes -= size
            self._changed.notify_all()
            return event


def _lose(sink) -> None:
    sink.lost = getattr(sink, "lost", 0) + 1


def _index(frame: Frame) -> int:
    """A frame's index in its source (in its file, for a frame of predict's inputs)."""
    return frame.index if frame.origin is None else frame.origin.index


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
