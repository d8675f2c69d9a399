"""TensorRT engines of an artifact folder: the plan file and its sidecar (the format; which engine
runs on this machine is ``gpu``).

An engine is two files, both named and hashed by the manifest like every other file::

    visual_<precision>.<sha12>.engine        the TensorRT plan exactly as the builder serialised it
                                             (no header: trtexec, Triton and DeepStream load it as is)
    visual_<precision>.<sha12>.engine.json   the sidecar: what it was built from, with what, for which
                                             GPU, with which optimisation profile, and how close its
                                             outputs came to onnxruntime's fp32 ones

``<sha12>`` is the start of the plan's own sha256. ``anoclip build-engine`` (calibration stage)
writes both; the ``tensorrt-native`` backend reads them (``Artifacts.engines``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .strict_json import build, choice, flag, header, integer, mapping, matching, need, parse, sha256, shape, text
from .vocabulary import KINDS, PRECISIONS

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "anoclip-engine"
SIDECAR_FORMAT_VERSION = 1
ENGINE_NAME = KINDS["engine"].pattern
SIDECAR_SUFFIX = ".json"


def engine_base_name(precision: str) -> str:
    """``visual_<precision>.engine``: the name that becomes ``visual_<precision>.<sha12>.engine``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return f"visual_{precision}.engine"


def sidecar_name(engine_name: str) -> str:
    return engine_name + SIDECAR_SUFFIX


# ----------------------------------------------------------------------------------------------
# The sidecar


@dataclass(frozen=True)
class GPU:
    """A CUDA device as a sidecar names it (``gpu.probe_gpu`` finds this machine's)."""

    name: str
    compute_capability: str  # "8.7"

    def __str__(self) -> str:
        return f"{self.name} (compute {self.compute_capability})"


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the image input's batch axis (min <= opt <= max)."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        values = (self.min, self.opt, self.max)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"batch profile must be integers, got {values}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass
class EngineSidecar:
    """What an engine file is and where it may run; see the module docstring."""

    engine: str  # the plan's file name in the folder
    engine_sha256: str
    precision: str  # fp32, fp16 or int8
    source_model: str  # the manifest model it was built from (visual, visual_fp16, visual_int8)
    source_file: str
    source_sha256: str
    tensorrt_version: str  # of the builder, e.g. 10.3.0.30
    gpu_name: str
    compute_capability: str  # e.g. 8.7
    strongly_typed: bool  # network types from the ONNX file (True) or builder precision flags (10.x fallback)
    input_name: str
    input_shape: list[int]  # -1 for the dynamic batch axis
    profile: BatchProfile
    workspace_bytes: int
    built: str  # UTC time
    command: str
    fp32_layers: int = 0  # layers pinned to fp32 in the weakly typed fp16 fallback
    version_compatible: bool = False
    timing_cache: str = ""  # the timing cache file used, if any
    versions: dict[str, str] = field(default_factory=dict)  # anoclip, cuda driver, ...
    parity: dict[str, Any] = field(default_factory=dict)  # see calibration.engine.parity_figures
    format: str = SIDECAR_FORMAT
    format_version: int = SIDECAR_FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["profile"] = asdict(self.profile)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "EngineSidecar":
        """Build a sidecar from parsed JSON, checking the type of every field (ValueError otherwise)."""
        header(data, SIDECAR_FORMAT, SIDECAR_FORMAT_VERSION)
        return build(cls, data, _SIDECAR_CHECKS)


def _profile(key: str, value: Any) -> BatchProfile:
    need(isinstance(value, dict) and set(value) == {"min", "opt", "max"}, f"{key} must have min, opt and max")
    return BatchProfile(value["min"], value["opt"], value["max"])


def _parity_value(key: str, value: Any) -> Any:
    need(isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                    and math.isfinite(value)), f"{key} must be a string or a finite number")
    return value


_SIDECAR_CHECKS = {
    "engine": text(nonempty=True), "engine_sha256": sha256, "precision": choice(PRECISIONS),
    "source_model": text(nonempty=True), "source_file": text(nonempty=True), "source_sha256": sha256,
    "tensorrt_version": matching(r"\d+\.\d+(\.\d+)*", "10.3.0"), "gpu_name": text(nonempty=True),
    "compute_capability": matching(r"\d+\.\d+", "8.7"), "strongly_typed": flag, "input_name": text(nonempty=True),
    "input_shape": shape, "profile": _profile, "workspace_bytes": integer(0), "built": text(), "command": text(),
    "fp32_layers": integer(0), "version_compatible": flag, "timing_cache": text(),
    "versions": mapping(text(), "strings"), "parity": mapping(_parity_value, "strings or finite numbers"),
    "format": text(), "format_version": integer(1),
}


def parse_sidecar(raw: bytes, shown: str, folder: str | os.PathLike) -> EngineSidecar:
    """The sidecar in ``raw``; an ArtifactError naming ``shown`` and the rebuild when it is malformed."""
    try:
        return EngineSidecar.from_dict(parse(raw))
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{shown} is not a valid engine sidecar ({exc}); rebuild the engine with "
                            f"`anoclip build-engine --artifacts {folder} --precision ...`") from None



def engine_candidates(manifest_files: dict[str, str]) -> list[str]:
    """Engine files the manifest names together with their sidecar, sorted."""
    return sorted(name for name in manifest_files if ENGINE_NAME.match(name) and sidecar_name(name) in manifest_files)



def load_engine_sidecars(folder: str | os.PathLike, manifest, record=None, verify: bool = True,
                         skip_damaged: bool = False) -> list[EngineSidecar]:
    """Every engine sidecar the manifest names, verified against its sha256 (engine files are
    verified when loaded). ``skip_damaged``: leave out, with a warning, those that fail (an engine
    for another device must not stop this one from loading)."""
    from .artifacts import verify_files
    from .integrity import resolve_inside

    folder = Path(folder)
    found = []
    for name in engine_candidates(manifest.files):
        side = sidecar_name(name)
        try:
            verify_files(folder, manifest, [side], record, hashes=verify)
            sidecar = parse_sidecar(resolve_inside(folder, side).read_bytes(), str(folder / side), folder)
            if sidecar.engine != name or sidecar.engine_sha256 != manifest.files[name]:
                raise ArtifactError(f"{folder / side} does not describe {name} as the manifest lists it; rebuild the "
                                    f"engine with `anoclip build-engine --artifacts {folder} --precision {sidecar.precision}`")
        except ArtifactError as exc:
            if not skip_damaged:
                raise
            log.warning("ignoring %s: %s", name, exc)
            continue
        found.append(sidecar)
    return found
