"""A Triton Inference Server in front of a Detector, through PyTriton.

Three models are bound (names in ``anoclip.runtime.serving``), each with Triton's dynamic batcher:

* ``anoclip``: input ``image`` BYTES [1], the encoded file (PNG, JPEG, BMP, TIFF, WebP), decoded on
  the server with the same size guard as ``anoclip predict`` (``--max-pixels``);
* ``anoclip_frame``: input ``frame`` UINT8 [H, W, 3], a decoded RGB frame (cameras, video);
* ``anoclip_info``: input ``query`` BYTES [1] (any value), output ``info`` BYTES [1]: a JSON object
  with the classes, their calibrated thresholds, the model input size, patch grid, tiling, map
  smoothing and TTA settings the server runs (what a client needs to rebuild full-size maps).

Both image models also take ``class`` BYTES [1] and optionally ``stream`` BYTES [1] (with TTA
(AnoCLIP+), the name of the adapter state the image adapts: one per camera; default one per class),
``reset`` INT8 [1] (non-zero: that adapter state starts afresh first, as after a camera reconnects),
``image_threshold`` / ``pixel_threshold`` FP64 [1] (the user's thresholds in place of the
calibrated ones; NaN: the calibrated one). They answer, per image: ``score`` FP32 [1], ``map`` FP32
[H, W] (``Result.anomaly_map``, model resolution), ``patch_probabilities`` FP32 [tiles, M],
``tiles`` INT32 [1], ``image_size`` INT32 [2] (height, width), and the decision ``Detector.predict``
took: ``threshold`` FP64 [2] (image, pixel in force; NaN where there is none), ``anomalous`` INT8 [1]
(1, 0, or -1 without an image threshold), ``threshold_origin`` BYTES [1] (calibrated, override,
calibrated+override; empty without thresholds), ``regions`` BYTES [1] (JSON list of ``{"box":
[x, y, width, height], "area": pixels}`` in image pixels); and ``error`` BYTES [1]. A request the server
cannot score (unknown class, bytes that are no image) is answered with ``error`` set to
``"<ErrorClass>: <message>"`` and NaN in place of numbers, so that the other requests of its batch
are scored as usual (PyTriton fails a whole batch on an exception); ``error`` is empty otherwise.
The request handling itself is ``anoclip.runtime.serving.model``.

When every model is loaded and ready (Triton's ``/v2/health/ready`` can answer before), the server
says so in one line (``on_ready``). What servers killed before left in ``/dev/shm`` and PyTriton's
workspaces is swept at start, this server's own at stop (``anoclip.runtime.serving.sweep``). A raw
frame above ``--max-pixels`` is refused by its shape, as an error of its request; a large raw frame
gives its pages in PyTriton's shared memory back once answered (``model.release_pages``), while
Triton's python-backend region keeps the largest request's size (this Triton has no request-size limit).

SIGINT or SIGTERM stops gracefully: new batches are refused with a server error (a client with
several servers sends them to another one), the batches running are answered, the models are
unloaded while Triton still runs, then Triton stops.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from anoclip.runtime.errors import AnoclipError

from . import FRAME_MODEL, INFO_MODEL, MODEL
from .checks import check_numpy, check_ports_free, use_own_libpython
from .model import AnoclipModel, Drain
from .sweep import new_workspace, sweep

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DRAIN_TIMEOUT_S = 60  # longest wait for the batches running when a stop is asked for
# Triton's own wait at exit, for clients' idle keep-alive connections (the work is drained by then)
EXIT_TIMEOUT_S = 3
UNLOAD_TIMEOUT_S = 30
READY_TIMEOUT_S = 300  # longest wait for the models to load after Triton started


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # images per model run, gathered from concurrent requests
    max_queue_delay_us: int = 2000  # how long a request may wait for others to batch with
    instances: int = 1  # model instances (each its own Detector), run side by side

    def urls(self) -> dict[str, str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {"http": f"http://{host}:{self.http_port}", "grpc": f"grpc://{host}:{self.grpc_port}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}


def _tensors():
    from pytriton.model_config import Tensor

    common = [Tensor(name="class", dtype=bytes, shape=(1,)), Tensor(name="stream", dtype=bytes, shape=(1,), optional=True),
              Tensor(name="image_threshold", dtype=np.float64, shape=(1,), optional=True),
              Tensor(name="pixel_threshold", dtype=np.float64, shape=(1,), optional=True),
              Tensor(name="reset", dtype=np.int8, shape=(1,), optional=True)]
    inputs = {MODEL: [Tensor(name="image", dtype=bytes, shape=(1,))] + common,
              FRAME_MODEL: [Tensor(name="frame", dtype=np.uint8, shape=(-1, -1, 3))] + common}
    outputs = [Tensor(name="score", dtype=np.float32, shape=(1,)), Tensor(name="map", dtype=np.float32, shape=(-1, -1)),
               Tensor(name="patch_probabilities", dtype=np.float32, shape=(-1, -1)),
               Tensor(name="tiles", dtype=np.int32, shape=(1,)), Tensor(name="image_size", dtype=np.int32, shape=(2,)),
               Tensor(name="threshold", dtype=np.float64, shape=(2,)), Tensor(name="anomalous", dtype=np.int8, shape=(1,)),
               Tensor(name="threshold_origin", dtype=bytes, shape=(1,)), Tensor(name="regions", dtype=bytes, shape=(1,)),
               Tensor(name="error", dtype=bytes, shape=(1,))]
    return inputs, outputs


def _client(options: ServeOptions):
    import tritonclient.http

    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    address = f"[{host}]:{options.http_port}" if ":" in host else f"{host}:{options.http_port}"
    return tritonclient.http.InferenceServerClient(address, network_timeout=30.0)


def _wait_models_ready(options: ServeOptions, token: str | None, triton) -> None:
    """Return once every model answers ready (Triton's server-wide readiness can come first)."""
    from pytriton.triton import TRITON_ACCESS_HEADER

    headers = {TRITON_ACCESS_HEADER: token} if token else None
    deadline = time.monotonic() + READY_TIMEOUT_S
    with contextlib.closing(_client(options)) as client:
        while True:
            try:
                if all(client.is_model_ready(model, headers=headers) for model in (MODEL, FRAME_MODEL, INFO_MODEL)):
                    return
            except Exception as exc:  # not answering yet
                log.debug("models not ready yet: %s", exc)
            if not triton.is_alive():
                raise AnoclipError("the Triton server stopped while loading the models; its log is above")
            if time.monotonic() > deadline:
                raise AnoclipError(f"the models were not ready {READY_TIMEOUT_S} s after Triton started; its log is above")
            time.sleep(0.1)


def _unload_models(options: ServeOptions, token: str | None) -> None:
    """Unload the models while Triton still runs, so that their stubs end cleanly (Triton's own
    exit first waits for clients' idle connections, which can use up its whole exit timeout)."""
    from pytriton.triton import TRITON_ACCESS_HEADER

    headers = {TRITON_ACCESS_HEADER: token} if token else None
    try:
        with contextlib.closing(_client(options)) as client:
            for model in (MODEL, FRAME_MODEL, INFO_MODEL):
                client.unload_model(model, headers=headers)
            deadline = time.monotonic() + UNLOAD_TIMEOUT_S  # the stubs end in the background
            while time.monotonic() < deadline and any(
                    entry.get("state") in ("READY", "UNLOADING") for entry in client.get_model_repository_index(headers)
                    if entry.get("name") in (MODEL, FRAME_MODEL, INFO_MODEL)):
                time.sleep(0.1)
    except Exception as exc:  # Triton's exit unloads them anyway, less gently
        log.debug("could not unload the models before stopping: %s", exc)


def serve(detectors: list, options: ServeOptions, classes: list[str] | None = None, on_ready=None,
          stop: threading.Event | None = None) -> None:
    """Serve ``detectors`` (one per model instance) until SIGINT/SIGTERM, ``stop`` or Triton's death.

    ``classes``: the classes answered (default: every class of the prompt weights).
    ``on_ready(urls)`` is called once every model is loaded and answers ready.
    """
    use_own_libpython()
    check_numpy()
    check_ports_free(options.host, [options.http_port, options.grpc_port, options.metrics_port])
    if options.host not in LOOPBACK:
        log.warning("serving on %s: every host that reaches it can send images, without authentication", options.host)
    lock = threading.Lock() if detectors[0].tta is not None else None
    drain = Drain()
    models = [AnoclipModel(detector, lock, classes, drain) for detector in detectors]
    stop = stop or threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    sweep()  # what killed servers left
    workspace = new_workspace()
    try:
        triton = _start(models, options, workspace)
        try:
            _wait_models_ready(options, triton.get_access_token(), triton)
            log.info("models loaded: %s, %s, %s", MODEL, FRAME_MODEL, INFO_MODEL)
            if on_ready is not None:
                on_ready(options.urls())
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise AnoclipError("the Triton server stopped unexpectedly; its log is above")
            log.info("stopping: answering the batches in flight, refusing new ones")
            # PyTriton logs each refused batch with a traceback: expected now, so not shown
            logging.getLogger("pytriton.proxy.inference").setLevel(logging.ERROR)
            drain.close()
            if not drain.wait(DRAIN_TIMEOUT_S):
                log.warning("batches still running after %d s are cut off", DRAIN_TIMEOUT_S)
            _unload_models(options, triton.get_access_token())
        finally:
            triton.stop()
    finally:
        sweep(own=workspace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(models: list[AnoclipModel], options: ServeOptions, workspace, attempts: int = 3):
    """Start Triton with the three models bound; a running ``pytriton.triton.Triton``.

    With several instances, PyTriton's later instances connect to a socket of the first one as soon
    as its file exists; under load that can precede the listening socket and the model fails to load
    (ConnectionRefusedError). Such a start is tried again.
    """
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    config = TritonConfig(http_address=options.host, http_port=options.http_port, grpc_address=options.host,
                          grpc_port=options.grpc_port, metrics_address=options.host, metrics_port=options.metrics_port,
                          allow_gpu_metrics=False, exit_timeout_secs=EXIT_TIMEOUT_S, log_verbose=0)
    batching = ModelConfig(max_batch_size=options.max_batch,
                           batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us))
    inputs, outputs = _tensors()
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            sweep(own=workspace)  # PyTriton creates the workspace afresh
        triton = Triton(config=config, workspace=workspace)
        try:
            triton.bind(model_name=MODEL, infer_func=[m.infer_encoded for m in models], inputs=inputs[MODEL],
                        outputs=outputs, config=batching)
            triton.bind(model_name=FRAME_MODEL, infer_func=[m.infer_frames for m in models], inputs=inputs[FRAME_MODEL],
                        outputs=outputs, config=batching)
            triton.bind(model_name=INFO_MODEL, infer_func=models[0].infer_info,
                        inputs=[Tensor(name="query", dtype=bytes, shape=(1,))],
                        outputs=[Tensor(name="info", dtype=bytes, shape=(1,))], config=ModelConfig(batching=False))
            triton.run()
            return triton
        except Exception as exc:
            triton.stop()
            if attempt == attempts or "ConnectionRefusedError" not in str(exc):
                raise
            log.warning("a model instance could not reach the first one at start-up; starting Triton again")
