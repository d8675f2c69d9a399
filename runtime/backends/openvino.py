"""The OpenVINO backend (``--backend openvino``): the exported ONNX graph read directly by OpenVINO
and compiled for a CPU (or another OpenVINO device).

OpenVINO folds the Q/DQ pairs of an int8 model (``visual.int8.onnx``) into int8 kernels; on a
2-core AVX-512 VNNI CPU these ran ViT-B-16-plus-240 1.2x (2 threads) to 1.5x (1 thread) faster
than onnxruntime runs the same model, while on the fp32 model the two were within 7%. ``python -m anoclip.benchmarks.latency.cpu_runtimes``
measures both on the machine at hand.

Precision: on CPUs with bf16 support (AVX512-BF16, AMX) OpenVINO runs fp32 graphs in bf16 unless
told otherwise, which moves patch embeddings by ~3e-2. This backend asks for f32 by default, so that
its outputs match the exported model and onnxruntime; pass ``precision="bf16"`` (or ``None`` for the
device's own choice) to trade that for speed. A Q/DQ model runs its quantised layers in int8 either way.

openvino is imported only when the backend is created.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import BackendError
from .batching import run_in_chunks
from .onnxruntime import EMBEDDINGS

log = logging.getLogger(__name__)

INSTALL = "pip install 'anoclip[openvino]'"
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISIONS = ("f32", "bf16", "f16")


def import_openvino():
    """The openvino module; one BackendError line naming what to install when it is missing."""
    try:
        import openvino
    except (ImportError, OSError) as exc:  # OSError: the package is there, its libraries are not
        raise BackendError(f"the openvino backend needs OpenVINO ({exc}); {INSTALL}") from None
    return openvino


class OpenVinoBackend:
    """Runs an exported visual graph with OpenVINO.

    ``threads``: inference threads (OpenVINO's default, all physical cores, when None).
    ``device``: an OpenVINO device name (``CPU``, ``GPU``, ``AUTO``...).
    ``hint``: OpenVINO's performance hint, ``LATENCY`` (one stream, for batch-by-batch calls) or
    ``THROUGHPUT``. ``precision``: the inference precision hint, ``f32`` (default), ``bf16``, ``f16``
    or ``None`` for the device's default. ``cache_dir``: a folder where OpenVINO keeps compiled models,
    so that later loads skip compilation (off when None).
    """

    @classmethod
    def for_model(cls, artifacts, model: str, backend: str = "openvino", precision: str | None = None,
                  **options) -> "OpenVinoBackend":
        """The backend of ``model``'s file in a loaded folder (``precision`` here is OpenVINO's hint,
        an option; the folder's precision is the file's own)."""
        del backend, precision
        return cls(artifacts.model_path(model), **options)

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None, device: str = "CPU",
                 hint: str = "LATENCY", precision: str | None = "f32", cache_dir: str | os.PathLike | None = None,
                 outputs: tuple[str, ...] = EMBEDDINGS):
        ov = import_openvino()
        self.path = Path(model_path)
        self.name = "openvino"
        self.device = str(device).upper()
        hint = str(hint).upper()
        if hint not in HINTS:
            raise BackendError(f"unknown OpenVINO performance hint '{hint}'; use one of {', '.join(HINTS)}")
        if precision is not None and precision not in PRECISIONS:
            raise BackendError(f"unknown OpenVINO precision '{precision}'; use one of {', '.join(PRECISIONS)} "
                               "or None for the device's default")
        if threads is not None and int(threads) < 1:
            raise BackendError(f"threads must be at least 1, not {threads}")
        if not self.path.is_file():
            raise BackendError(f"model file {self.path} does not exist; re-export it with `anoclip-export`")
        core = ov.Core()
        base = self.device.split(":", 1)[0].split(".", 1)[0]
        if base not in ("AUTO", "MULTI", "HETERO", "BATCH") and not any(
                d.split(".", 1)[0] == base for d in core.available_devices):
            raise BackendError(f"OpenVINO device '{self.device}' is not available here (has: "
                               f"{', '.join(core.available_devices) or 'none'}); use device CPU")
        config: dict[str, object] = {"PERFORMANCE_HINT": hint}
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = precision
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        try:
            model = core.read_model(str(self.path))
            found = [_port_name(o, outputs) for o in model.outputs]
            missing = [r for r in outputs if r not in found]
            if missing:
                raise BackendError(f"{self.path} has no output '{missing[0]}' (has {found}); re-export it")
            if len(model.inputs) != 1:
                raise BackendError(f"{self.path} has {len(model.inputs)} inputs, not one image input; re-export it")
            shape = model.inputs[0].get_partial_shape()
            batch = shape[0] if shape.rank.is_static and shape.rank.get_length() == 4 else None
            if batch is None:
                raise BackendError(f"{self.path} does not take an NCHW image batch ({shape}); re-export it")
            self.batch_size = batch.get_length() if batch.is_static else None
            self.compiled = core.compile_model(model, self.device, config)
        except BackendError:
            raise
        except Exception as exc:  # openvino raises RuntimeError with multi-line messages
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"OpenVINO cannot load {self.path} on {self.device}: {first}") from None
        self.input_name = model.inputs[0].get_any_name()
        self.outputs = {_port_name(o, outputs): o for o in self.compiled.outputs}
        self.output_names = list(self.outputs)
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: callers from several threads take turns
        self.hint, self.threads = hint, threads
        self.precision = self._property("INFERENCE_PRECISION_HINT")
        self.version = ov.get_version().split("-", 1)[0]  # 2026.4.1, without the build tag
        log.debug("OpenVINO %s compiled %s on %s (%s, %s)", self.version, self.path.name, self.device, hint,
                  self.precision)

    def _property(self, key: str) -> str:
        try:
            value = self.compiled.get_property(key)
        except Exception:  # noqa: BLE001 - a device may not report every property
            return "?"
        type_name = getattr(value, "get_type_name", None)  # an openvino Type such as f32, bf16
        return type_name() if callable(type_name) else str(value)

    def describe(self) -> str:
        threads = self._property("INFERENCE_NUM_THREADS")
        plural = "" if threads == "1" else "s"
        return f"openvino {self.version} [{self.device}, {self.hint}, {self.precision}, {threads} thread{plural}]"

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``batch`` through the graph and return every output by name (float32 arrays of their own;
        a fixed-batch graph runs it in chunks of its batch size)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"expected an NCHW batch, got shape {batch.shape}")
        return run_in_chunks(self._infer, batch, self.batch_size, self.batch_size or 1)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            result = self.request.infer({0: batch}, share_inputs=False, share_outputs=False)
        return {name: np.asarray(result[port], dtype=np.float32) for name, port in self.outputs.items()}

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self.run_all(batch)
        return outs["image_embeds"], outs["patch_embeds"]


def _port_name(port, expected: tuple[str, ...]) -> str:
    """The name of an output: the expected one when the tensor has it among its names."""
    names = port.get_names()
    return next((n for n in expected if n in names), None) or (sorted(names)[0] if names else "?")

