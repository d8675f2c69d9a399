"""This machine: its CUDA GPU and TensorRT release, and which of a folder's engines runs on it.

Compatibility: a plan built without TensorRT's version-compatible flag deserialises only with the
TensorRT release that built it, so major.minor.patch must match (the build number may differ); a
version-compatible plan runs on the same or a later release of the same major version (and a 10.x
one on 11.x). Without hardware compatibility a plan is tied to the GPU architecture, so the compute
capability must match; a GPU of another name (even of the same architecture) is refused as well,
because TensorRT's tactic choices are specific to the device they were timed on. Any mismatch is
one line naming both sides and the command that rebuilds the engine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from pathlib import Path

from .engine import GPU, EngineSidecar
from .errors import ArtifactError
from .vocabulary import PRECISIONS


def probe_gpu(device: int = 0) -> GPU | None:
    """Name and compute capability of CUDA device ``device`` from the driver library (no CUDA
    toolkit or Python binding needed); None when there is no driver or no such device."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    lib = None
    for name in names + ([found] if found else []):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    buffer = ctypes.create_string_buffer(256)
    # cuDeviceGetAttribute: 75 = COMPUTE_CAPABILITY_MAJOR, 76 = COMPUTE_CAPABILITY_MINOR
    calls = (lambda: lib.cuInit(0), lambda: lib.cuDeviceGet(ctypes.byref(handle), device),
             lambda: lib.cuDeviceGetName(buffer, 256, handle),
             lambda: lib.cuDeviceGetAttribute(ctypes.byref(major), 75, handle),
             lambda: lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle))
    try:
        if any(call() != 0 for call in calls):
            return None
    except (AttributeError, OSError):
        return None
    return GPU(buffer.value.decode("utf-8", "replace").strip(), f"{major.value}.{minor.value}")


_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_cu13_libs",
                           "tensorrt_cu12_libs", "tensorrt-lean", "tensorrt-dispatch")


def installed_tensorrt_version() -> str:
    """The TensorRT release installed here without importing it ("" when none is found): from the
    Python package's metadata, else from libnvinfer's getInferLibVersion()."""
    from importlib.metadata import PackageNotFoundError, version

    module = sys.modules.get("tensorrt")
    if module is not None and getattr(module, "__version__", ""):
        return module.__version__
    for dist in _TENSORRT_DISTRIBUTIONS:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    libraries = ["nvinfer_11.dll", "nvinfer_10.dll"] if sys.platform == "win32" else ["libnvinfer.so.11",
                                                                                       "libnvinfer.so.10"]
    for name in libraries:
        try:
            number = int(ctypes.CDLL(name).getInferLibVersion())
        except (OSError, AttributeError):
            continue
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"  # (MAJOR * 100 + MINOR) * 100 + PATCH
    return ""


def release(version: str) -> tuple[int, ...]:
    """``10.3.0.30`` -> (10, 3, 0): the part of a TensorRT version that a plan is tied to."""
    parts = re.findall(r"\d+", version)[:3]
    return tuple(int(p) for p in parts) + (0,) * (3 - len(parts))


def versions_compatible(built: str, running: str, version_compatible: bool = False) -> bool:
    """Whether a plan built by TensorRT ``built`` deserialises with TensorRT ``running``."""
    b, r = release(built), release(running)
    if not version_compatible:
        return b == r
    return r >= b and (r[0] == b[0] or (b[0], r[0]) == (10, 11))


# ----------------------------------------------------------------------------------------------
# Which engine runs here


def rebuild_command(folder: str | os.PathLike, sidecar: EngineSidecar) -> str:
    return (f"anoclip build-engine --artifacts {folder} --precision {sidecar.precision} "
            f"--batch {sidecar.profile}")


def check_compatible(sidecar: EngineSidecar, tensorrt_version: str, gpu: GPU | None, shown: str,
                     folder: str | os.PathLike) -> None:
    """Raise one ArtifactError line unless the engine was built for this TensorRT release and GPU."""
    built_gpu = GPU(sidecar.gpu_name, sidecar.compute_capability)
    version_ok = versions_compatible(sidecar.tensorrt_version, tensorrt_version, sidecar.version_compatible)
    gpu_ok = gpu is not None and gpu == built_gpu
    if version_ok and gpu_ok:
        return
    here = f"TensorRT {tensorrt_version or '(none)'} and {gpu if gpu is not None else 'no CUDA GPU'}"
    raise ArtifactError(
        f"{shown} was built with TensorRT {sidecar.tensorrt_version} for {built_gpu}, but this machine has {here}; "
        f"rebuild it here with `{rebuild_command(folder, sidecar)}`")


def runs_here(sidecar: EngineSidecar, tensorrt_version: str, gpu: GPU | None) -> bool:
    """Whether the engine was built for this TensorRT release and this GPU."""
    return (versions_compatible(sidecar.tensorrt_version, tensorrt_version, sidecar.version_compatible)
            and gpu == GPU(sidecar.gpu_name, sidecar.compute_capability))


def choose_engine(sidecars: list[EngineSidecar], precision: str, sources: dict[str, str], tensorrt_version: str,
                  gpu: GPU | None, folder: str | os.PathLike) -> EngineSidecar:
    """The engine of ``precision`` among ``sidecars``, whatever model it was built from, as long as
    that model file is still the folder's (``sources``: model -> sha256 of its file now) and it was
    built for this TensorRT release and GPU; one ArtifactError line saying why there is none."""
    build = f"anoclip build-engine --artifacts {folder} --precision {precision}"
    current = [s for s in sidecars if sources.get(s.source_model) == s.source_sha256]
    same_precision = [s for s in sidecars if s.precision == precision]
    if not same_precision:
        here = sorted({s.precision for s in current if runs_here(s, tensorrt_version, gpu)}, key=PRECISIONS.index)
        hint = f" (it has {' and '.join(here)} ones that run here: pass --precision {here[0]})" if here else ""
        raise ArtifactError(f"{folder} has no {precision} TensorRT engine{hint}; build one on this machine with "
                            f"`{build}`")
    built_from = [s for s in same_precision if s in current]
    if not built_from:
        raise ArtifactError(f"the {precision} TensorRT engine of {folder} was built from a {same_precision[0].source_model} "
                            "model file the folder no longer holds (it was re-exported or re-calibrated); rebuild it "
                            f"with `{build}`")
    for sidecar in built_from:
        if runs_here(sidecar, tensorrt_version, gpu):
            return sidecar
    check_compatible(built_from[0], tensorrt_version, gpu, str(Path(folder) / built_from[0].engine), folder)
    raise AssertionError("unreachable")  # check_compatible raised
