"""``RemoteDetector``: the Detector API answered by one or more ``anoclip serve`` servers.

    detector = RemoteDetector(["http://10.0.0.5:8000", "grpc://10.0.0.6:8001"])
    result = detector.predict("bottle_001.png", "bottle")   # the Result a local Detector gives

Requests go round-robin over the servers. A server that fails (refused, timed out, unavailable, any
error of Triton itself) is skipped for ``backoff`` seconds and the request goes to the next one; the
call fails only when every server failed. An error the server reports about the request itself
(unknown class, bytes that are no image) is raised at once as the runtime's own error class,
since every server would say the same. Safe to call from several threads. Needs only tritonclient
and numpy (no PyTorch, no PyTriton).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from anoclip.runtime import errors
from anoclip.runtime.decision import ClassThreshold
from anoclip.runtime.result import Result, anomaly_maps
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.preprocess import as_rgb_uint8, read_file, tile_layout
from anoclip.runtime.thresholds import tta_settings

from . import FRAME_MODEL, INFO_MODEL, MODEL
from .transport import ServerPool, ServersUnavailable, quiet_failures

log = logging.getLogger(__name__)

OUTPUTS = ("score", "map", "patch_probabilities", "tiles", "image_size", "threshold", "anomalous", "threshold_origin",
           "regions", "error")


class RemoteDetector:
    """Score images on Triton servers running ``anoclip serve``.

    Image files and encoded bytes are sent as they are (the server decodes them); arrays go to the
    raw-frame model. The servers take the decision (thresholds in force, anomalous, regions); the
    client only makes the full-resolution map, with the Detector's own function.

    urls: ``http://host:port`` (Triton's HTTP port) or ``grpc://host:port`` (its gRPC port), one or more.
    timeout: seconds one request may take on one server before the next server is tried.
    backoff: seconds a failed server is skipped (tried again sooner only when every other one failed).
    workers: requests in flight at once for one ``predict_batch`` call (the servers batch them).
    start_wait: seconds the first call waits for servers that answer that their models are not
        loaded yet, asking again every second, before it gives up with "no server answered" (a server
        that refuses the connection is not waited for).
    """

    def __init__(self, urls: str | Sequence[str], model: str = MODEL, timeout: float = 30.0, backoff: float = 10.0,
                 workers: int = 8, frame_model: str = FRAME_MODEL, info_model: str = INFO_MODEL,
                 start_wait: float = 60.0):
        self.pool = ServerPool([urls] if isinstance(urls, str) else list(urls), timeout, backoff)
        self.servers = self.pool.servers
        self.model, self.frame_model, self.info_model = model, frame_model, info_model
        self._info: dict | None = None
        self._executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="anoclip-remote")
        # (image, pixel): the user's thresholds, sent with every request in place of the calibrated ones
        self.threshold_override: tuple[float | None, float | None] = (None, None)
        self._resets: set[tuple[str, str]] = set()  # (class, stream) whose adapter state starts afresh
        self.start_wait = start_wait

    sends_encoded = True  # give it an image file's bytes rather than decoded pixels

    # -- what the servers run -------------------------------------------------------------------

    @property
    def info(self) -> dict:
        """The servers' description (``anoclip_info``): classes, thresholds, input size, grid, TTA."""
        if self._info is None:
            from tritonclient.utils import np_to_triton_dtype

            query = np.array([b"info"], dtype=object)
            inputs = [("query", query, np_to_triton_dtype(query.dtype))]
            deadline = time.monotonic() + self.start_wait
            while True:
                try:
                    with quiet_failures():
                        out = self.pool.call(self.info_model, inputs, ("info",), backoff=False)
                    break
                except ServersUnavailable as exc:
                    if not exc.loading or time.monotonic() >= deadline:
                        raise
                    if not getattr(self, "_waiting", False):
                        self._waiting = True
                        log.info("waiting up to %.0f s for the servers to answer (loading their models?): %s",
                                 self.start_wait, exc)
                    time.sleep(1.0)
            self._info = json.loads(bytes(out["info"].reshape(-1)[0]).decode())
        return self._info

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def tta(self):
        """The TTA configuration the servers adapt with (None: AnoCLIP without TTA)."""
        from anoclip.runtime.tta import TTAConfig

        settings = self.info["tta"]
        return None if settings is None else TTAConfig(**settings)

    def check_class(self, cls: str) -> None:
        if cls not in self.classes:
            raise errors.UnknownClassError(f"class '{cls}' is not served by {self.servers[0].url} "
                                           f"(served: {', '.join(self.classes) or 'none'})")

    def resolve_classes(self, cls: str | Sequence[str]) -> list[str]:
        """Like ``Detector.resolve_classes``: one name, a list, or ``"all"``; each checked."""
        names = (self.classes if cls == "all" and "all" not in self.classes else [cls]) if isinstance(cls, str) \
            else list(dict.fromkeys(cls))
        for name in names:
            self.check_class(name)
        return names

    def threshold_for(self, cls: str, image: float | None = None, pixel: float | None = None) -> ClassThreshold | None:
        """The servers' calibrated thresholds of ``cls``, each replaced by ``image`` / ``pixel`` when
        given (by those of :attr:`threshold_override` when not), as ``Detector.threshold_for``; None
        when there are neither."""
        self.check_class(cls)
        image = self.threshold_override[0] if image is None else image
        pixel = self.threshold_override[1] if pixel is None else pixel
        calibrated = self.info["thresholds"].get(cls)
        return ClassThreshold.in_force(None if calibrated is None else calibrated[:2], image, pixel,
                                       _centres(calibrated))

    def reset_tta(self, cls: str, state: str) -> None:
        """Start the servers' adapter state of ``cls`` for the stream ``state`` afresh: the next
        request of that class and stream asks its server to (e.g. after the camera reconnected)."""
        self._resets.add((cls, state))

    # -- scoring --------------------------------------------------------------------------------

    def predict(self, image, cls: str | Sequence[str], tta=None) -> Result:
        """Score one image for ``cls``, or for several classes (a list, or ``"all"``): then
        ``Result.per_class`` holds each, as ``Detector.predict`` gives them."""
        return self.predict_batch([image], cls, tta=tta)[0]

    def predict_batch(self, images: Sequence, cls: str | Sequence[str], tta=None,
                      tta_keys: Sequence[str] | None = None, keep_tokens: bool = False) -> list[Result]:
        """Score images (arrays, paths or encoded bytes), one request per image and class, sent
        together so that the servers batch them (with TTA one after another, in order). ``tta_keys``:
        per image, its TTA state (stream). Timings (ms): ``request`` (the round trip), ``scoring``
        (the full-size map, made here), ``model`` (the call's time over its images, as a local batch).
        ``keep_tokens`` (raw patch tokens, as ``Detector.predict_batch``): the servers do not send
        them, so it is refused."""
        if keep_tokens:
            raise errors.AnoclipError("the servers do not send patch tokens (enrolment from frames needs a local "
                                      "model: --artifacts, not --server)")
        names = [cls] if isinstance(cls, str) and cls != "all" else self.resolve_classes(cls)
        if tta is not None:
            self._check_tta(tta)
        if tta_keys is not None and len(tta_keys) != len(images):
            raise ValueError(f"tta_keys has {len(tta_keys)} entries for {len(images)} images")
        keys = list(tta_keys) if tta_keys is not None else [None] * len(images)
        jobs = [(image, name, key) for image, key in zip(images, keys) for name in names]
        started = time.perf_counter()
        if len(jobs) <= 1 or self.info["tta"] is not None:  # TTA: each image adapts the state the one before left
            answers = [self._predict_one(*job) for job in jobs]
        else:
            answers = [future.result() for future in [self._executor.submit(self._predict_one, *job) for job in jobs]]
        results = []
        for i in range(len(images)):
            per_class = dict(zip(names, answers[i * len(names):(i + 1) * len(names)]))
            for result in per_class.values():  # as a local batch reports it: the call's time over its images
                result.timings["model"] = (time.perf_counter() - started) * 1e3 / len(images)
            first = per_class[names[0]]
            first.per_class = per_class if len(names) > 1 else None
            results.append(first)
        return results

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    def _check_tta(self, tta) -> None:
        from anoclip.runtime.tta import TTAConfig

        wanted = None if tta is False else TTAConfig() if tta is True else tta
        if tta_settings(wanted) != self.info["tta"]:
            raise AnoclipError(f"the servers run with TTA settings {self.info['tta']}, not {tta_settings(wanted)}; "
                               "start `anoclip serve` with the TTA options wanted")

    def _predict_one(self, image, cls: str, key: str | None) -> Result:
        inputs = self.request(image, cls, key)
        model = self.model if inputs[0][0] == "image" else self.frame_model
        started = time.perf_counter()
        out = self.pool.call(model, inputs, OUTPUTS)
        request_ms = (time.perf_counter() - started) * 1e3
        error = bytes(out["error"].reshape(-1)[0]).decode()
        if error:
            kind, _, message = error.partition(": ")
            cls_error = getattr(errors, kind, None)
            if not (isinstance(cls_error, type) and issubclass(cls_error, AnoclipError)):
                cls_error, message = AnoclipError, error
            raise cls_error(message)
        result = self._result(out, cls)
        result.timings = {"request": request_ms, "scoring": (time.perf_counter() - started) * 1e3 - request_ms}
        return result

    def request(self, image, cls: str, key: str | None) -> list[tuple[str, np.ndarray, str]]:
        """The inputs of one request ([(name, array, Triton dtype)]): an image file (path) or encoded
        bytes as they are, for the server to decode; an array as a raw frame."""
        if isinstance(image, (str, os.PathLike)):
            image = read_file(image)
        if isinstance(image, (bytes, bytearray, memoryview)):
            inputs = [("image", np.array([[bytes(image)]], dtype=object), "BYTES")]
        else:
            frame = as_rgb_uint8(image)
            limit = self.info.get("max_pixels")
            if limit and frame.shape[0] * frame.shape[1] > limit:  # the server would refuse it: not sent
                raise errors.ImageError(f"the frame is {frame.shape[1]}x{frame.shape[0]}, above the servers' "
                                        f"--max-pixels {limit}")
            frame = np.ascontiguousarray(frame)[None]
            inputs = [("frame", frame, "UINT8")]
        for name, text in (("class", cls), ("stream", key)):
            if text is not None:
                inputs.append((name, np.array([[text.encode()]], dtype=object), "BYTES"))
        for name, value in zip(("image_threshold", "pixel_threshold"), self.threshold_override):
            if value is not None:
                inputs.append((name, np.array([[value]], dtype=np.float64), "FP64"))
        if key is not None and (cls, key) in self._resets:
            self._resets.discard((cls, key))
            inputs.append(("reset", np.array([[1]], dtype=np.int8), "INT8"))
        return inputs

    def _result(self, out: dict, cls: str) -> Result:
        """The Result of a server's answer: its score, map and decision; the full-resolution map
        made from its patch probabilities as the Detector makes it (``result.anomaly_maps``)."""
        info = self.info
        probs = out["patch_probabilities"][0]
        height, width = (int(v) for v in out["image_size"][0])
        layout = tile_layout(height, width, tuple(info["input_size"]), info["tiling"])
        _, full = anomaly_maps(probs, tuple(info["grid"]), layout, (height, width), info["smoothing_sigma"])
        image, pixel = (None if np.isnan(v) else float(v) for v in out["threshold"][0])
        origin = bytes(out["threshold_origin"].reshape(-1)[0]).decode()
        threshold = None
        if origin:  # the decision the server took; the centres of the thresholds it took from the calibration
            in_force = self.threshold_for(cls)
            threshold = ClassThreshold(image, pixel, origin, *(
                getattr(in_force, name) if in_force is not None else None for name in ("centre", "pixel_centre")))
        anomalous = int(out["anomalous"][0, 0])
        return Result(score=float(out["score"][0, 0]), anomaly_map=out["map"][0], anomaly_map_full=full,
                      patch_probabilities=probs, cls=cls, image_size=(height, width), tiles=int(out["tiles"][0, 0]),
                      threshold=threshold,
                      anomalous=None if anomalous < 0 else bool(anomalous),
                      regions=json.loads(bytes(out["regions"].reshape(-1)[0]).decode()))


def _centres(calibrated: list | None) -> tuple[float | None, float | None] | None:
    """The normal centres a server's info gives beside a class's (image, pixel) thresholds (older
    servers give none)."""
    if calibrated is None or len(calibrated) < 4:
        return None
    return calibrated[2], calibrated[3]
