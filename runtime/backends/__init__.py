"""Inference backends behind one interface: ``run(batch NCHW float32) -> (image_embeds, patch_embeds)``;
each is made for a model of a loaded folder (``create_backend(artifacts, model, ...)``), never from a
bare file path, and batches of any size go through ``batching.run_in_chunks``.

One module per backend: ``onnxruntime`` (execution providers TensorRT -> CUDA -> CPU, picked from
what the installed onnxruntime offers or named by the caller), ``tensorrt`` (``tensorrt-native``:
the folder's prebuilt TensorRT engine, run with TensorRT and cuda-python) and ``openvino`` (CPUs);
the last two are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from ..artifacts import Artifacts
from ..errors import BackendError
from ..vocabulary import PRECISIONS, RUNTIME_CLASSES, VISUAL, precision_model
from .onnxruntime import PROVIDER_ALIASES, PROVIDER_PREFERENCE, OnnxRuntimeBackend, named_providers, resolve_providers

# What --backend accepts: onnxruntime with its best providers (auto) or one named provider chain, or the
# folder's prebuilt TensorRT engine run natively (tensorrt-native).
BACKEND_CHOICES = ("auto", "cpu", "cuda", "tensorrt", "tensorrt-native", "openvino")
ONNXRUNTIME_NAMES = ("auto", "onnxruntime", "ort", *PROVIDER_ALIASES)  # also accepted: onnxruntime's provider chains
BACKEND_MODULES = {"OnnxRuntimeBackend": ".onnxruntime", "OpenVinoBackend": ".openvino",
                   "TensorRTBackend": ".tensorrt"}  # the module of each runtime class (vocabulary.RUNTIME_CLASSES)

__all__ = ["BACKEND_CHOICES", "Backend", "OnnxRuntimeBackend", "PROVIDER_ALIASES", "PROVIDER_PREFERENCE", "backend_model",
           "create_backend", "named_providers", "resolve_providers"]


class Backend(Protocol):
    """What every backend class offers; each is made for a model of a loaded folder by its
    ``for_model(artifacts, model, backend=..., precision=..., **options)`` classmethod, which
    :func:`create_backend` finds through ``vocabulary.RUNTIME_CLASSES`` and :data:`BACKEND_MODULES`."""

    name: str
    batch_size: int | None  # fixed batch of the model, None when dynamic

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> str: ...


def backend_model(backend: str, model: str = VISUAL, precision: str = "fp32") -> str:
    """The manifest model a backend loads for ``model`` at ``precision``: ``tensorrt-native`` runs the
    engine of that precision (whatever model it was built from), so the model stays as named; the
    others run the precision's model file (``visual_fp16`` for fp16...)."""
    if backend == "tensorrt-native":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        return model
    return precision_model(precision, model)


def create_backend(artifacts: Artifacts, model: str = VISUAL, backend: str = "auto", *, precision: str | None = None,
                   **options) -> Backend:
    """Backend by name for ``model`` of the loaded (and verified) folder ``artifacts``: ``auto``/
    ``onnxruntime`` (best provider), ``cpu``, ``cuda``, ``tensorrt`` (onnxruntime providers),
    ``tensorrt-native`` (the folder's engine of ``precision``, see ``anoclip build-engine``; options
    ``device``, ``outputs``) or ``openvino`` (OpenVINO on the CPU: faster than onnxruntime on int8
    Q/DQ models where the CPU has VNNI). ``precision`` matters to ``tensorrt-native`` only: the
    other backends run the model's file as it is (see :func:`backend_model`)."""
    runtime = RUNTIME_CLASSES.get(backend) or ("OnnxRuntimeBackend" if backend in ONNXRUNTIME_NAMES else None)
    if runtime is None:
        raise BackendError(f"unknown backend '{backend}'; choose one of {', '.join(BACKEND_CHOICES)}")
    module = importlib.import_module(BACKEND_MODULES[runtime], __package__)  # openvino, tensorrt: only when used
    return getattr(module, runtime).for_model(artifacts, model, backend=backend, precision=precision, **options)
