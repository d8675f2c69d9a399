"""The inference functions the server binds: requests in, per-image answers out (no PyTriton here).

One :class:`AnoclipModel` per model instance, over one Detector. Requests of a batch are decoded one
by one, grouped by class, and each group goes through ``Detector.predict_batch`` at once; a request
that cannot be scored gets its own error text (see ``anoclip.runtime.serving.server`` for the protocol).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import mmap
import threading
from collections import defaultdict

import numpy as np

from anoclip.runtime.errors import AnoclipError, ImageError, UnknownClassError
from anoclip.runtime import preprocess
from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS, as_rgb_uint8
from anoclip.runtime.thresholds import tta_settings

NO_DECISION = -1  # "anomalous" of a class without an image threshold
# A raw frame of at least this many bytes has its shared-memory pages given back once it is answered
RELEASE_BYTES = 16 * 2**20
MADV_REMOVE = 9  # Linux: free the range of a shared mapping and its backing store (tmpfs pages)

log = logging.getLogger(__name__)
_libc = None


def decode_image(raw: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes of a request -> [H, W, 3] uint8 RGB (refused unread above ``max_pixels``)."""
    return preprocess.decode_image(raw, max_pixels, "the image bytes",
                                   "start the server with a larger --max-pixels")


def check_frame(frame: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """A raw frame of a request -> [H, W, 3] uint8 RGB; one above ``max_pixels`` is refused by its
    shape alone, before anything is copied or scaled (an error of that request, not of the batch)."""
    height, width = frame.shape[:2] if frame.ndim >= 2 else (0, 0)
    if max_pixels and height * width > max_pixels:
        raise ImageError(f"the frame is {width}x{height}, above the server's --max-pixels {max_pixels}; send it "
                         "scaled down, or start the server with a larger --max-pixels")
    return as_rgb_uint8(frame)


def release_pages(array: np.ndarray) -> int:
    """Give back the memory of a request's raw frame once it is answered; the bytes released.

    PyTriton hands a request's tensors to this process in shared memory (its tensor store, a
    /dev/shm/psm_* file) that keeps the pages of the largest request it ever carried: one
    16000x16000 frame left some 730 MB there until the server stopped. (Triton's python-backend
    region, /dev/shm/pytrtion*, keeps as much again; it is not mapped here and the Triton that
    PyTriton 0.7 bundles has no request-size limit, so that copy stays.) The whole pages inside the
    frame are removed from that file (madvise MADV_REMOVE): the frame is not read again, and the
    block it occupied is refilled, like any new page, when a later request needs it. Only a C-contiguous view on a shared file mapping
    qualifies; anything else (an array of this process) is left alone, and so is a system that
    refuses (0 is returned)."""
    global _libc
    if array.nbytes < mmap.PAGESIZE or not array.flags.c_contiguous or not _on_shared_file_mapping(array):
        return 0
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return 0
    address = array.__array_interface__["data"][0]
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the frame only
    end = (address + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start or _libc.madvise(start, end - start, MADV_REMOVE) != 0:
        return 0
    return end - start


def _on_shared_file_mapping(array: np.ndarray) -> bool:
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def _text(value) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional_number(request, name: str, i: int) -> float | None:
    """Row ``i`` of the optional FP64 input ``name`` (None when not sent or NaN)."""
    values = request.data.get(name)
    if values is None:
        return None
    value = float(np.asarray(values[i]).reshape(-1)[0])
    return None if np.isnan(value) else value


def _nan(*shape: int) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


class Drain:
    """Stopping without dropping work: once :meth:`close` is called, new batches are refused with an
    error of the server (a client retries them on another server) and :meth:`wait` returns when the
    batches already running are answered."""

    def __init__(self):
        self.closed = False
        self.active = 0
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def batch(self):
        with self.changed:
            if self.closed:
                raise RuntimeError("the server is stopping; send the request to another server")
            self.active += 1
        try:
            yield
        finally:
            with self.changed:
                self.active -= 1
                self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True

    def wait(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.active == 0, timeout)


class AnoclipModel:
    """The inference functions of one model instance over one Detector.

    With TTA the Detector's adapters keep state between images, so calls are serialised by a lock
    shared by every function that uses the Detector.
    """

    def __init__(self, detector, lock: threading.Lock | None = None, classes: list[str] | None = None,
                 drain: Drain | None = None):
        self.detector = detector
        self.lock = lock
        self.drain = drain or Drain()
        self.classes = sorted(classes) if classes else detector.classes

    def check_class(self, cls: str) -> None:
        self.detector.class_prompts(cls)  # not in the prompt weights: their error, naming the fix
        if cls not in self.classes:
            raise UnknownClassError(f"class '{cls}' is not served here (served: {', '.join(self.classes)}); "
                                    "ask the server's operator to add it to --classes")

    def info(self) -> dict:
        detector = self.detector
        thresholds = {}
        for cls in self.classes:
            found = detector.calibration(cls)  # calibrated, and valid for what this server runs
            # (image, pixel) thresholds and the normal centres their severities count from
            thresholds[cls] = None if found is None else [found.image, found.pixel, found.centre, found.pixel_centre]
        return {"classes": self.classes, "thresholds": thresholds, "input_size": list(detector.input_size),
                "grid": list(detector.grid), "tiling": detector.tiling, "smoothing_sigma": detector.smoothing_sigma,
                "tta": tta_settings(detector.tta), "model": detector.model, "max_pixels": detector.max_pixels}

    def infer_info(self, requests) -> list[dict]:
        text = json.dumps(self.info()).encode()
        return [{"info": np.array([text], dtype=object)} for _ in requests]

    def infer_encoded(self, requests) -> list[dict]:
        with self.drain.batch():
            return self._infer(requests, "image")

    def infer_frames(self, requests) -> list[dict]:
        with self.drain.batch():
            try:
                return self._infer(requests, "frame")
            finally:  # answered (or failed): large frames give their shared memory back
                released = 0
                for request in requests:
                    frames = request.data.get("frame")
                    if isinstance(frames, np.ndarray) and frames.nbytes >= RELEASE_BYTES:
                        released += release_pages(frames)
                if released:
                    log.debug("gave back %.0f MB of request memory", released / 2**20)

    def _infer(self, requests, key: str) -> list[dict]:
        # per image: [request index, image, class, stream, result or error text, (image, pixel) thresholds, reset]
        rows = []
        for index, request in enumerate(requests):
            images, classes, streams = request[key], request["class"], request.data.get("stream")
            resets = request.data.get("reset")
            for i in range(len(images)):
                cls = _text(classes[i])
                row = [index, None, cls, _text(streams[i]) if streams is not None else "", None,
                       (_optional_number(request, "image_threshold", i), _optional_number(request, "pixel_threshold", i)),
                       resets is not None and bool(np.asarray(resets[i]).reshape(-1)[0])]
                try:
                    self.check_class(cls)
                    row[1] = decode_image(bytes(images[i].item()), self.detector.max_pixels) if key == "image" \
                        else check_frame(images[i], self.detector.max_pixels)
                except AnoclipError as exc:
                    row[4] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
        groups = defaultdict(list)  # by class and the thresholds the request asks for
        for row in rows:
            if row[4] is None:
                groups[row[2], row[5]].append(row)
        for (cls, override), group in groups.items():
            keys = [row[3] for row in group] if self.detector.tta is not None else None
            try:
                with self.lock or contextlib.nullcontext():
                    for row in group:
                        if row[6] and self.detector.tta is not None:  # the client's stream starts afresh
                            self.detector.reset_tta(cls, row[3])
                    self.detector.threshold_override = override  # the decision is taken in predict
                    results = self.detector.predict_batch([row[1] for row in group], cls, tta_keys=keys)
            except AnoclipError as exc:  # about these requests (other errors fail the batch: the client retries)
                results = [f"{type(exc).__name__}: {exc}"] * len(group)
            for row, result in zip(group, results):
                row[1], row[4] = None, result
        by_request = defaultdict(list)
        for row in rows:
            by_request[row[0]].append(row[4])
        return [self._response(by_request[i]) for i in range(len(requests))]

    def _response(self, answers: list) -> dict:
        """Outputs of one request (a batch dimension of one row per image it carried)."""
        scored = [a for a in answers if not isinstance(a, str)]
        shapes = {(a.anomaly_map.shape, a.patch_probabilities.shape) for a in scored}
        if len(shapes) > 1:  # images of different sizes in one request: their maps cannot be stacked
            message = "ImageError: images of different sizes in one request; send them as separate requests"
            answers, scored, shapes = [message] * len(answers), [], set()
        map_shape, probs_shape = shapes.pop() if shapes else ((1, 1), (1, 1))
        out = {"score": _nan(len(answers), 1), "map": _nan(len(answers), *map_shape),
               "patch_probabilities": _nan(len(answers), *probs_shape),
               "tiles": np.zeros((len(answers), 1), np.int32), "image_size": np.zeros((len(answers), 2), np.int32),
               "threshold": np.full((len(answers), 2), np.nan), "anomalous": np.full((len(answers), 1), NO_DECISION, np.int8),
               "threshold_origin": np.array([[b""]] * len(answers), dtype=object),
               "regions": np.array([[b"[]"]] * len(answers), dtype=object),
               "error": np.array([[b""]] * len(answers), dtype=object)}
        for i, answer in enumerate(answers):
            if isinstance(answer, str):
                out["error"][i, 0] = answer.encode()
                continue
            out["score"][i, 0] = answer.score
            out["map"][i] = answer.anomaly_map
            out["patch_probabilities"][i] = answer.patch_probabilities
            out["tiles"][i, 0] = answer.tiles
            out["image_size"][i] = answer.image_size
            threshold = answer.threshold  # the decision Detector.predict took
            if threshold is not None:
                out["threshold"][i] = [np.nan if v is None else v for v in (threshold.image, threshold.pixel)]
                out["threshold_origin"][i, 0] = threshold.origin.encode()
            out["anomalous"][i, 0] = NO_DECISION if answer.anomalous is None else int(answer.anomalous)
            out["regions"][i, 0] = json.dumps(answer.regions).encode()
        return out
