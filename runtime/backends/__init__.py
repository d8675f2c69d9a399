"""Inference backends behind one interface: ``run(batch NCHW float32) -> (image_embeds, patch_embeds)``.

One module per backend: ``onnxruntime`` (execution providers TensorRT -> CUDA -> CPU, picked from
what the installed onnxruntime offers or named by the caller), ``tensorrt`` (``tensorrt-native``:
the folder's prebuilt TensorRT engine, run with TensorRT and cuda-python) and ``openvino`` (CPUs);
the last two are imported only when used.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from ..errors import BackendError
from .onnxruntime import PROVIDER_ALIASES, PROVIDER_PREFERENCE, OnnxRuntimeBackend, named_providers, resolve_providers

# What --backend accepts: onnxruntime with its best providers (auto) or one named provider chain, or the
# folder's prebuilt TensorRT engine run natively (tensorrt-native).
BACKEND_CHOICES = ("auto", "cpu", "cuda", "tensorrt", "tensorrt-native", "openvino")

__all__ = ["BACKEND_CHOICES", "Backend", "OnnxRuntimeBackend", "PROVIDER_ALIASES", "PROVIDER_PREFERENCE", "create_backend",
           "named_providers", "resolve_providers"]


class Backend(Protocol):
    name: str
    batch_size: int | None  # fixed batch of the model, None when dynamic

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> str: ...


def create_backend(model_path: str | os.PathLike, backend: str = "auto", **options) -> Backend:
    """Backend by name: ``auto``/``onnxruntime`` (best provider), ``cpu``, ``cuda``, ``tensorrt``
    (onnxruntime providers), ``tensorrt-native`` (the folder's engine of ``model_path``, see
    ``anoclip build-engine``; options ``precision``, ``device``, ``verify``) or ``openvino``
    (OpenVINO on the CPU: faster than onnxruntime on int8 Q/DQ models where the CPU has VNNI)."""
    if backend == "tensorrt-native":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(model_path, **options)
    if backend == "openvino":
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(model_path, **options)
    known = ("auto", "onnxruntime", "ort", *PROVIDER_ALIASES)
    if backend not in known:
        raise BackendError(f"unknown backend '{backend}'; choose one of {', '.join(BACKEND_CHOICES)}")
    return OnnxRuntimeBackend(model_path, providers=backend, **options)
