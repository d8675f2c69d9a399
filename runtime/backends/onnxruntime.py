"""The onnxruntime backend: an exported graph in an ``InferenceSession`` with the best execution
providers this onnxruntime offers (TensorRT -> CUDA -> CPU) or the ones the caller names.

Provider options (:func:`session_providers`, shared with the TTA graph's session): the TensorRT
provider builds in fp16 for the fp16 model file (``visual_fp16``) and in the ONNX types otherwise; a
Q/DQ model (``visual_int8``) needs no ``trt_int8_enable``: its QuantizeLinear/DequantizeLinear nodes
are explicit quantization, which TensorRT honours as it stands (an int8 calibration table is only
for models without Q/DQ nodes). Its engines and timing cache live in
``<cache>/ort-trt/ort<onnxruntime>-trt<TensorRT>-<gpu>/`` (``<cache>``: $ANOCLIP_CACHE_DIR or
~/.cache/anoclip), so that another onnxruntime, TensorRT or GPU never picks up a stale engine.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..engine import GPU
from ..errors import BackendError
from ..gpu import installed_tensorrt_version, probe_gpu
from ..vocabulary import model_precision
from .batching import run_in_chunks

log = logging.getLogger(__name__)

EMBEDDINGS = ("image_embeds", "patch_embeds")  # the outputs of a visual model, which ``run`` returns
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def named_providers(requested: Sequence[str] | str | None, available: Sequence[str]) -> list[str]:
    """The execution providers that ``requested`` names (aliases such as ``cpu``/``cuda``/``tensorrt``,
    full names, a comma-separated string, or ``auto``: every available one in preference order);
    an error for one that this onnxruntime lacks."""
    if requested in (None, "auto", "onnxruntime", "ort"):
        chosen = [p for p in PROVIDER_PREFERENCE if p in available]
        return chosen or list(available)
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    chosen = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if not full.endswith("ExecutionProvider"):
            raise BackendError(f"unknown backend '{name.strip()}'; use cpu, cuda, tensorrt or auto")
        if full not in available:
            raise BackendError(
                f"execution provider {full} is not available in this onnxruntime (has: {', '.join(available)}); "
                "install onnxruntime-gpu for CUDA/TensorRT, or use --backend cpu"
            )
        chosen.append(full)
    return chosen


def resolve_providers(requested: Sequence[str] | str | None, available: Sequence[str]) -> list[str]:
    """The provider chain of a session: the named providers, with the CPU behind them as fallback."""
    chosen = named_providers(requested, available)
    if "CPUExecutionProvider" not in chosen and "CPUExecutionProvider" in available:
        chosen.append("CPUExecutionProvider")
    return chosen


def file_precision(model_path: str | os.PathLike) -> str:
    """fp16 / int8 / fp32 from a model file's name (``visual_fp16.<sha>.onnx`` -> fp16)."""
    return model_precision(Path(model_path).name.split(".")[0])


def gpu_slug(gpu: GPU | None) -> str:
    if gpu is None:
        return "no-gpu"
    name = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-") or "gpu"
    return f"{name}-sm{gpu.compute_capability.replace('.', '')}"


def tensorrt_cache_dir(ort_version: str, trt_version: str, gpu: GPU | None, root: str | os.PathLike | None = None) -> Path:
    """Where the TensorRT provider keeps its engines and timing cache: one folder per onnxruntime,
    TensorRT release and GPU (engines are valid for exactly that combination)."""
    from ..integrity import _cache_folder

    base = Path(root) if root is not None else _cache_folder() / "ort-trt"
    return base / f"ort{ort_version}-trt{trt_version or 'unknown'}-{gpu_slug(gpu)}"


def provider_options(name: str, precision: str, cache_dir: str | os.PathLike | None = None, device: int = 0) -> dict:
    """The options of one execution provider for a model of ``precision`` (fp32, fp16 or int8);
    the TensorRT provider caches engines and timings only in a ``cache_dir``."""
    if name == "CUDAExecutionProvider":
        return {"device_id": device}
    if name != "TensorrtExecutionProvider":
        return {}
    options = {"device_id": device, "trt_fp16_enable": precision == "fp16",
               # Q/DQ nodes are explicit quantization: no int8 flag or calibration table wanted
               "trt_int8_enable": False}
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
    return options


def session_providers(chosen: Sequence, model_path: str | os.PathLike, precision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, device: int = 0) -> list[tuple[str, dict]]:
    """(name, options) for each provider of a session of ``model_path``: names get the options
    :func:`provider_options` gives (precision from the file name unless given; the TensorRT cache in
    ``cache_dir`` as is, or in the folder :func:`tensorrt_cache_dir` keys); (name, options) pairs
    stay as given."""
    precision = precision or file_precision(model_path)
    result = []
    for entry in chosen:
        if not isinstance(entry, str):
            name, options = entry
            result.append((name, dict(options)))
            continue
        folder = None
        if entry == "TensorrtExecutionProvider":
            import onnxruntime as ort

            folder = Path(cache_dir) if cache_dir is not None else tensorrt_cache_dir(
                ort.__version__, installed_tensorrt_version(), probe_gpu(device))
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("TensorRT engines are not cached (cannot create %s: %s)", folder, exc.strerror or exc)
                folder = None
        result.append((entry, provider_options(entry, precision, folder, device)))
    return result


_SHORT = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "CPU"}


def _short(provider: str) -> str:
    return _SHORT.get(provider, provider.replace("ExecutionProvider", ""))


def report_providers(requested, available: Sequence[str], chosen: Sequence[str], got: Sequence[str], path: Path) -> None:
    """Say which providers a session got; with ``auto``, why a preferred one is missing (INFO). A
    provider named by the caller that the session did not start is an error."""
    if requested in (None, "auto", "onnxruntime", "ort"):
        notes = []
        for provider in PROVIDER_PREFERENCE[:-1]:
            if provider not in available:
                notes.append(f"{_short(provider)} not in this onnxruntime (the GPU build is onnxruntime-gpu)")
            elif provider not in got:
                notes.append(f"{_short(provider)} failed to start (onnxruntime's messages above say why)")
        log.info("onnxruntime runs %s on %s%s", path.name, ", ".join(map(_short, got)),
                 f"; {'; '.join(notes)}" if notes else "")
        return
    failed = [p for p in chosen if p not in got and p != "CPUExecutionProvider"]
    if failed:
        raise BackendError(f"onnxruntime could not start {', '.join(map(_short, failed))} for {path.name} (its messages "
                           "above say why: CUDA, cuDNN or TensorRT libraries missing or of another version); "
                           "install the matching ones or choose another --backend")
    log.info("onnxruntime runs %s on %s", path.name, ", ".join(map(_short, got)))


class OnnxRuntimeBackend:
    """Runs an exported visual graph with onnxruntime."""

    @classmethod
    def for_model(cls, artifacts, model: str, backend: str, precision: str | None = None,
                  **options) -> "OnnxRuntimeBackend":
        """The backend of ``model``'s file in a loaded folder; ``backend`` names the providers."""
        del precision  # the file is the precision's own (see backends.backend_model)
        return cls(artifacts.model_path(model), providers=backend, **options)

    def __init__(self, model_path: str | os.PathLike, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                 precision: str | None = None, device: int = 0, outputs: Sequence[str] = EMBEDDINGS):
        """``precision``: of the model file (fp32/fp16/int8; default: from its name), which sets the
        TensorRT provider's options; ``cache_dir``: the TensorRT provider's engine and timing cache
        folder (default: one keyed by onnxruntime, TensorRT and GPU, see :func:`tensorrt_cache_dir`);
        ``outputs``: the outputs the graph must have (those of a visual model by default)."""
        import onnxruntime as ort

        self.path = Path(model_path)
        available = ort.get_available_providers()
        chosen = resolve_providers(providers, available)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        # Worker threads that spin after a run steal the cores that preprocessing, the numpy TTA
        # loop and capture threads need next; on a few-core device that costs more than it saves.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.precision = precision or file_precision(self.path)
        if self.precision == "int8":
            # Fusing a quantized MatMul with its bias Add makes a float Gemm whose int8 weights are
            # dequantized at every run: on a 2-core Zen 4 the int8 ViT-B ran at 0.6x fp32 with it,
            # 2.65x without it.
            options.add_session_config_entry("optimization.disable_specified_optimizers", "MatMulAddFusion")
        self.provider_chain = session_providers(chosen, self.path, self.precision, cache_dir, device)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.provider_chain)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from exc
        self.providers = self.session.get_providers()
        report_providers(providers, available, chosen, self.providers, self.path)
        self.name = "onnxruntime"
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        batch = inputs[0].shape[0]
        self.batch_size = batch if isinstance(batch, int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        for required in outputs:
            if required not in self.output_names:
                raise BackendError(f"{self.path} has no output '{required}' (has {self.output_names}); re-export it")
        log.debug("onnxruntime session on %s with %s", self.path.name, self.providers)

    def describe(self) -> str:
        return f"onnxruntime {self._version()} [{', '.join(p.replace('ExecutionProvider', '') for p in self.providers)}]"

    @staticmethod
    def _version() -> str:
        import onnxruntime as ort

        return ort.__version__

    def run_all(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``batch`` through the graph and return every output by name (a fixed-batch graph runs
        it in chunks of its batch size)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return run_in_chunks(self._run, batch, self.batch_size, self.batch_size or 1)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: batch})))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self.run_all(batch)
        return outs["image_embeds"], outs["patch_embeds"]
