"""One capture thread per source, keeping only the newest frame.

A live source (camera, network stream) is read as fast as it delivers; the frame slot holds one
frame, so a frame not taken before the next arrives is dropped (and counted): the pipeline's latency
never grows, whatever the model's speed. A live source that stops delivering is reopened with
exponential backoff; every reopen is counted and bumps the source's generation (the pipeline then
resets that source's test-time adaptation). Both the backoff and the reopen itself end as soon as the
pipeline's ``stop`` is set (Ctrl-C), even while an open waits out its timeout on a peer that never answers. A live read that fails at once and is followed by a good
one was a frame that did not decode (a corrupt JPEG in an MJPEG stream): it is skipped and counted as
corrupt, and the source is not reopened; ``MAX_FAILED_READS`` failures in a row, or one that blocked
(a read timeout), are a dead source. A video file is read frame by frame with back-pressure
(the thread waits until its frame is taken, so nothing is dropped) unless ``realtime`` paces it at
its own frame rate like a camera; at its end the source finishes (``loop``: it starts again). A video
file that ends before the frame count its header gives is said in a line with both counts, and the
frames it lacks are counted as missing.
Images (a folder, a file, a pattern; predict's inputs, videos among them) are read like a video
file through the one reader (``anoclip.runtime.inputs.ReaderCapture``: every image, every
``stride``-th frame of a video), each frame carrying where it came from. Finite sources keep to
``max_pixels``: larger images are skipped (counted as corrupt), a video of larger frames is refused
when it is opened (skipped, in the reader).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import AnoclipError
from ..inputs import FrameReader, InputFrame, ReaderCapture, video_shortfall
from ..preprocess import DEFAULT_MAX_PIXELS
from .sources import SourceSpec, check_backend, open_capture

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_FAILED_READS = 3  # quick failed reads in a row of a live source before it is reopened
CORRUPT_READ_S = 1.0  # a failed read that took longer waited for data: the source is reopened at once
STOP_POLL_S = 0.05  # how often a reopen that blocks (a peer that accepts and never answers) looks at ``stop``


@dataclass
class Frame:
    """A frame as read: BGR uint8, its index in the source and when it was read."""

    source: int  # index of the source in the pipeline
    index: int
    captured: float  # time.time()
    captured_perf: float  # time.perf_counter(), for latencies
    image: np.ndarray
    generation: int  # bumped at every reopen of the source
    origin: InputFrame | None = None  # images: the file it came from, its index there, the file's bytes


@dataclass
class CaptureCounters:
    read: int = 0  # frames read from the source
    offered: int = 0  # frames put in the slot (after stride and max-fps)
    dropped: int = 0  # offered frames replaced by a newer one before the pipeline took them
    corrupt: int = 0  # reads that returned no usable image
    reconnects: int = 0
    missing: int = 0  # video files: frames their header gives that the file did not deliver (truncated)


class FrameBoard:
    """The newest frame of every source, and one condition the inference worker waits on."""

    def __init__(self, sources: int):
        self.condition = threading.Condition()
        self.slots: list[Frame | None] = [None] * sources
        self.finished = [False] * sources

    def put(self, frame: Frame, wait: bool, stop: threading.Event) -> bool:
        """Place a frame; returns True when it replaced one that was never taken (a drop).

        ``wait``: block until the previous frame of this source is taken (video files)."""
        with self.condition:
            if wait:
                while self.slots[frame.source] is not None and not stop.is_set():
                    self.condition.wait(0.1)
            dropped = self.slots[frame.source] is not None
            self.slots[frame.source] = frame
            self.condition.notify_all()
            return dropped

    def finish(self, source: int) -> None:
        with self.condition:
            self.finished[source] = True
            self.condition.notify_all()

    def take(self, timeout: float) -> list[Frame]:
        """The frames waiting (at most one per source), waiting up to ``timeout`` for one."""
        with self.condition:
            if not any(self.slots):
                self.condition.wait(timeout)
            frames = [f for f in self.slots if f is not None]
            self.slots = [None] * len(self.slots)
            if frames:
                self.condition.notify_all()  # wake file readers waiting for their slot
            return frames

    def all_finished(self) -> bool:
        with self.condition:
            return all(self.finished) and not any(self.slots)


class CaptureThread(threading.Thread):
    """Reads one source into its slot of the board until stopped or (files) finished."""

    def __init__(self, index: int, spec: SourceSpec, board: FrameBoard, stop: threading.Event, *,
                 stride: int = 1, max_fps: float | None = None, loop: bool = False, realtime: bool = False,
                 roi: tuple[int, int, int, int] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        super().__init__(name=f"capture-{index}", daemon=True)
        self.index, self.spec, self.board, self.stop = index, spec, board, stop
        self.stride, self.max_fps, self.loop, self.realtime, self.roi = stride, max_fps, loop, realtime, roi
        self.max_pixels = max_pixels
        self.counters = CaptureCounters()
        self.generation = 0
        self.fps: float | None = None  # the source's own frame rate, when it reports one
        self.header_frames = 0  # video files: the frame count their header gives (0: unknown)
        self.size: tuple[int, int] | None = None  # (height, width) of the frames as read
        self.capture = None

    def open(self) -> None:
        """Open the source now; one clear error when it cannot be opened (before the pipeline starts)."""
        check_backend(self.spec)
        self.capture = self._open()
        if self.capture is None:
            raise AnoclipError(f"cannot open source {self.spec.uri!r}; check that it exists and is reachable "
                               "(a camera in use by another program, a wrong URL or a file OpenCV cannot decode)")
        self._read_properties()
        self._check_roi()
        self._check_size()

    def _open(self):
        if self.spec.kind == "images":
            return ReaderCapture(FrameReader(self.spec.inputs, self.stride, self.max_pixels))
        return open_capture(self.spec)

    def _count_skipped(self) -> None:
        """What the reader of an images source skipped counts as corrupt frames."""
        if isinstance(self.capture, ReaderCapture):
            self.counters.corrupt += len(self.capture.reader.skipped)
            self.capture.reader.skipped.clear()

    def _check_size(self) -> None:
        import cv2

        width = int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if not self.spec.live and self.max_pixels is not None and width * height > self.max_pixels:
            raise AnoclipError(f"source {self.spec.uri!r}: its frames are {width} x {height} pixels, above the limit "
                               f"of {self.max_pixels} pixels (raise the limit with --max-pixels if they are genuine)")

    def _check_roi(self) -> None:
        import cv2

        width = int(self.capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        height = int(self.capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
        if self.roi is not None and width and height and (self.roi[0] >= width or self.roi[1] >= height):
            raise AnoclipError(f"--roi {','.join(map(str, self.roi))} starts outside the {width}x{height} frames of "
                               f"source {self.spec.uri!r}")

    def _read_properties(self) -> None:
        import cv2

        fps = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self.header_frames = max(int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0) if self.spec.kind == "file" else 0

    def run(self) -> None:
        try:
            self._run()
        except Exception:  # a capture thread must never take the process down; the pipeline sees it finish
            log.exception("source %s: capture stopped", self.spec.name)
        finally:
            if self.capture is not None:
                self.capture.release()
                self._count_skipped()
            self.board.finish(self.index)

    def _run(self) -> None:
        index = -1
        last_offer = 0.0
        due = time.perf_counter()  # when the next file frame is due, paced like a camera (realtime)
        stride = 1 if self.spec.kind == "images" else self.stride  # the reader strides the videos among images
        failed = 0  # quick failed reads in a row of a live source: corrupt frames if a good read follows
        first = 0  # index of the first frame of this pass through a video file (--loop starts it again)
        while not self.stop.is_set():
            index += 1
            skip = index % stride != 0
            started = time.perf_counter()
            if skip and self.capture.grab():  # decode-free skip where the backend allows it
                self.counters.read += 1
                continue
            ok, image = (False, None) if skip else self.capture.read()
            if not ok:
                if (self.spec.live and failed + 1 < MAX_FAILED_READS
                        and time.perf_counter() - started < CORRUPT_READ_S):
                    failed += 1
                    continue
                failed = 0
                if not self.spec.live:
                    self._check_length(index - first)
                    first = index + 1
                if not self._recover():
                    return
                due = time.perf_counter()
                continue
            if failed:  # the stream goes on: what failed were frames that did not decode
                self.counters.read += failed
                self.counters.corrupt += failed
                log.debug("source %s: %d frame(s) did not decode; skipped", self.spec.name, failed)
                failed = 0
            self.counters.read += 1
            if not _usable(image):
                self.counters.corrupt += 1
                continue
            now = time.perf_counter()
            if self.realtime and not self.spec.live and self.fps:
                due = max(due + 1.0 / self.fps, now - 1.0)
                if due > now and self.stop.wait(due - now):
                    return
            if self.max_fps:
                if self.spec.live and now - last_offer < 1.0 / self.max_fps:
                    continue
                if not self.spec.live:
                    wait = last_offer + 1.0 / self.max_fps - now
                    if wait > 0 and self.stop.wait(wait):
                        return
            last_offer = time.perf_counter()
            if self.roi is not None:
                x, y, w, h = self.roi
                image = np.ascontiguousarray(image[y:y + h, x:x + w])
            self.size = image.shape[:2]
            origin = getattr(self.capture, "origin", None)
            frame = Frame(self.index, index, time.time(), time.perf_counter(), image, self.generation, origin)
            self.counters.offered += 1
            if self.board.put(frame, wait=not (self.spec.live or self.realtime), stop=self.stop):
                self.counters.dropped += 1

    def _check_length(self, frames: int) -> None:
        """At the end of a pass through a video file of ``frames`` frames: say when its header gave more."""
        short = video_shortfall(frames, self.header_frames)
        if short:
            self.counters.missing += self.header_frames - frames
            log.warning("source %s: %s", self.spec.name, short)

    def _recover(self) -> bool:
        """After a failed read: False when the source is finished, True once it is readable again."""
        if not self.spec.live:
            if self.loop and self.counters.read:
                self.capture.release()
                self._count_skipped()
                self.capture = self._open()
                return self.capture is not None
            return False
        self.capture.release()
        delay = BACKOFF_START_S
        while not self.stop.is_set():
            log.warning("source %s: no frame; reopening in %.1f s", self.spec.name, delay)
            if self.stop.wait(delay):
                return False
            self.capture = self._reopen()
            if self.stop.is_set():
                return False
            if self.capture is not None:
                self.counters.reconnects += 1
                self.generation += 1
                self._read_properties()
                log.warning("source %s: reopened (reconnect %d)", self.spec.name, self.counters.reconnects)
                return True
            delay = min(delay * 2, BACKOFF_MAX_S)
        return False

    def _reopen(self):
        """``open_capture`` of the live source in a thread of its own, waited for in short steps: None at
        once when ``stop`` is set meanwhile (what the open returns later is then released)."""
        opening = _Reopening(self.spec)
        opening.start()
        while not opening.done.wait(STOP_POLL_S):
            if self.stop.is_set():
                opening.abandon()
                return None
        if opening.error is not None:
            raise opening.error
        return opening.capture


class _Reopening(threading.Thread):
    def __init__(self, spec: SourceSpec):
        super().__init__(name=f"reopen-{spec.name}", daemon=True)
        self.spec, self.lock, self.done = spec, threading.Lock(), threading.Event()
        self.capture, self.error, self.abandoned = None, None, False

    def run(self) -> None:
        capture = None
        try:
            capture = open_capture(self.spec)
        except Exception as exc:  # handed to the capture thread
            self.error = exc
        with self.lock:
            if self.abandoned and capture is not None:
                capture.release()
            else:
                self.capture = capture
        self.done.set()

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            if self.capture is not None:
                self.capture.release()
                self.capture = None


def _usable(image) -> bool:
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0)
