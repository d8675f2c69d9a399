"""The onnxruntime backend: an exported graph in an ``InferenceSession`` with the best execution
providers this onnxruntime offers (TensorRT -> CUDA -> CPU) or the ones the caller names."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BackendError

log = logging.getLogger(__name__)

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


class OnnxRuntimeBackend:
    """Runs an exported visual graph with onnxruntime."""

    def __init__(self, model_path: str | os.PathLike, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, cache_dir: str | os.PathLike | None = None):
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
        provider_options = []
        for name in chosen:
            if name == "TensorrtExecutionProvider":
                cache = Path(cache_dir or self.path.parent / "trt_cache")
                provider_options.append({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                         "trt_fp16_enable": False})
            else:
                provider_options.append({})
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=chosen, provider_options=provider_options)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}") from exc
        self.providers = self.session.get_providers()
        self.name = "onnxruntime"
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        batch = inputs[0].shape[0]
        self.batch_size = batch if isinstance(batch, int) else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        for required in ("image_embeds", "patch_embeds"):
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
        """Run ``batch`` through the graph and return every output by name."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.batch_size is None or batch.shape[0] == self.batch_size:
            outs = self.session.run(None, {self.input_name: batch})
            return dict(zip(self.output_names, outs))
        # Fixed-batch graph: run in chunks of its batch size.
        step = self.batch_size
        parts = [self.run_all(self._pad(batch[i : i + step], step)) for i in range(0, batch.shape[0], step)]
        return {k: np.concatenate([p[k] for p in parts])[: batch.shape[0]] for k in self.output_names}

    @staticmethod
    def _pad(chunk: np.ndarray, size: int) -> np.ndarray:
        if chunk.shape[0] == size:
            return chunk
        pad = np.zeros((size - chunk.shape[0],) + chunk.shape[1:], dtype=chunk.dtype)
        return np.concatenate([chunk, pad])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outs = self.run_all(batch)
        return outs["image_embeds"], outs["patch_embeds"]
