"""Normal-frame memory: per class, the V-V patch tokens of normal frames, and the memory branch of
the scores (docs/method.md, "Memory of normal frames").

The memory of a class is a set of unit rows m_j (the L2-normalised ``patch_embeds`` of normal
frames, the tokens the zero-shot branch scores). A patch token p_i of a new frame gets the memory
score

    s_i = 1/2 (1 - max_j <p_i / |p_i|, m_j>)        (0: a normal patch seen before; 1: its opposite)

The memory map is s on the patch grid, through the same 3x3 mean filter and align-corners
upsampling as the zero-shot map; the image's memory score is max_i s_i. Combined with weight w
(WinCLIP+'s way of adding few-shot to zero-shot): map = w * memory map + (1 - w) * zero-shot map,
score = w * max_i s_i + (1 - w) * zero-shot score. Filter and upsampling are linear, so combining
the per-patch values first and making one map gives the same map.

File: ``memory.<sha12>.safetensors`` (content-addressed, committed by the folder's transaction):
tensors ``memory/<class>`` [N, D] float32 with unit rows; metadata ``format``, ``format_version``,
``visual_sha256`` (the visual model whose tokens these are: the memory goes when that model is
replaced) and ``classes`` (JSON: per class its provenance). The coreset (greedy k-center, as
PatchCore) keeps the memory within ``max_patches`` rows.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ArtifactError, UnknownClassError
from .scoring import l2_normalise

MEMORY = "memory.safetensors"  # content-addressed on disk: memory.<first 12 hex of sha256>.safetensors
MEMORY_FORMAT = "anoclip-memory"
MEMORY_FORMAT_VERSION = 1
MEMORY_MODES = ("auto", "on", "off", "only")  # auto: on for the classes that have a memory
DEFAULT_WEIGHT = 0.5
DEFAULT_MAX_PATCHES = 4096
UNIT_TOLERANCE = 1e-3  # rows are stored unit norm in float32


@dataclass
class ClassMemory:
    """One class's memory: unit rows [N, D] and how they were made."""

    name: str
    patches: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the rows as float32 (shape included): what a calibration with this memory depends on."""
        import hashlib

        array = np.ascontiguousarray(self.patches, dtype="<f4")
        digest = hashlib.sha256(repr(array.shape).encode())
        digest.update(array.tobytes())
        return digest.hexdigest()


@dataclass
class MemoryBank:
    """Every class memory of a folder, and the visual model their tokens come from."""

    classes: dict[str, ClassMemory]
    visual_sha256: str
    embed_dim: int

    def get(self, name: str, folder: str | os.PathLike = "<artifacts>") -> ClassMemory:
        try:
            return self.classes[name]
        except KeyError:
            known = ", ".join(sorted(self.classes)) or "none"
            raise UnknownClassError(f"class '{name}' has no memory of normal frames (classes with one: {known}); "
                                    f"make it with `anoclip calibrate memory --artifacts {folder} --class {name} "
                                    "--normal <normal frames>`") from None

    def with_class(self, memory: ClassMemory) -> "MemoryBank":
        return MemoryBank(dict(sorted({**self.classes, memory.name: memory}.items())), self.visual_sha256,
                          self.embed_dim)


def memory_bytes(bank: MemoryBank) -> bytes:
    """The file content of ``bank`` (stored as ``memory.<sha>.safetensors``)."""
    from safetensors.numpy import save

    tensors = {}
    for name, memory in bank.classes.items():
        _check_rows(memory.patches, bank.embed_dim, f"memory of {name}")
        tensors[f"memory/{name}"] = np.ascontiguousarray(memory.patches, dtype=np.float32)
    metadata = {"format": MEMORY_FORMAT, "format_version": str(MEMORY_FORMAT_VERSION),
                "visual_sha256": bank.visual_sha256, "embed_dim": str(bank.embed_dim),
                "classes": json.dumps({name: m.provenance for name, m in bank.classes.items()}, sort_keys=True)}
    return save(tensors, metadata=metadata)


def memory_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a memory file (its header only: cheap for any size)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def read_memory(path: str | os.PathLike) -> MemoryBank:
    """Read and check a memory file; an ArtifactError naming the fix when it is malformed."""
    from safetensors.numpy import load_file

    path = Path(path)
    fix = f"make it anew with `anoclip calibrate memory --artifacts {path.parent} --class ... --normal ...`"
    try:
        metadata = memory_metadata(path)
        if metadata.get("format") != MEMORY_FORMAT or metadata.get("format_version") != str(MEMORY_FORMAT_VERSION):
            raise ValueError(f"format {metadata.get('format')!r} version {metadata.get('format_version')!r}, not "
                             f"{MEMORY_FORMAT} {MEMORY_FORMAT_VERSION}")
        embed_dim = int(metadata["embed_dim"])
        provenance = json.loads(metadata["classes"])
        tensors = load_file(str(path))
        if set(tensors) != {f"memory/{name}" for name in provenance}:
            raise ValueError("its tensors and its classes differ")
        classes = {}
        for name, record in provenance.items():
            rows = tensors[f"memory/{name}"]
            _check_rows(rows, embed_dim, f"memory/{name}")
            classes[name] = ClassMemory(name, rows, record)
        return MemoryBank(dict(sorted(classes.items())), metadata["visual_sha256"], embed_dim)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a valid memory file ({exc}); {fix}") from None


def _check_rows(rows: np.ndarray, embed_dim: int, what: str) -> None:
    if rows.ndim != 2 or rows.shape[1] != embed_dim or rows.shape[0] < 1 or rows.dtype != np.float32:
        raise ValueError(f"{what} is {rows.dtype} {list(rows.shape)}, not float32 [N>=1, {embed_dim}]")
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{what} holds NaN or infinity")
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    if np.max(np.abs(norms - 1.0)) > UNIT_TOLERANCE:
        raise ValueError(f"{what} has rows that are not unit norm")


# ----------------------------------------------------------------------------------------------
# Scoring


def memory_scores(patches: np.ndarray, memory: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Patch tokens [..., M, D] (any norm) against a memory [N, D] of unit rows -> s [..., M] in [0, 1]:
    ``1/2 (1 - max_j <p_i/|p_i|, m_j>)``; the memory is walked ``chunk`` rows at a time."""
    p = l2_normalise(np.asarray(patches, dtype=np.float32))
    flat = p.reshape(-1, p.shape[-1])
    best = np.full(flat.shape[0], -np.inf, dtype=np.float32)
    for start in range(0, memory.shape[0], chunk):
        np.maximum(best, (flat @ memory[start:start + chunk].T).max(axis=1), out=best)
    return (0.5 * (1.0 - np.clip(best, -1.0, 1.0))).reshape(p.shape[:-1])


def combine(zero_shot: np.ndarray | None, memory: np.ndarray | None, weight: float) -> np.ndarray:
    """Per-patch (or per-image) values of the branches that ran, combined with the memory's weight."""
    if memory is None:
        return zero_shot
    if zero_shot is None:
        return memory
    return weight * memory + (1.0 - weight) * zero_shot


def check_weight(weight: float) -> float:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the memory weight must lie in [0, 1], got {weight!r}")
    return float(weight)


# ----------------------------------------------------------------------------------------------
# Building: coreset and augmentations


def greedy_coreset(rows: np.ndarray, size: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Indices of ``size`` rows of ``rows`` (unit rows [N, D]) chosen by greedy k-center: start from
    row 0, then always add the row farthest (in cosine distance) from every row chosen so far.
    Deterministic; all indices when ``size >= N``. ``progress(k)`` is called every 256 picks."""
    n = rows.shape[0]
    if size >= n:
        return np.arange(n)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = 0
    nearest = rows @ rows[0]  # similarity of every row to its most similar chosen row
    for k in range(1, size):
        pick = int(np.argmin(nearest))
        chosen[k] = pick
        np.maximum(nearest, rows @ rows[pick], out=nearest)
        if progress is not None and k % 256 == 0:
            progress(k)
    return chosen


def covering_radius(rows: np.ndarray, kept: np.ndarray) -> float:
    """The largest memory score (``1/2 (1 - cos)``) that a row of ``rows`` gets against the rows
    ``kept``: 0 for the full memory, how far the coreset is from it otherwise (in score units)."""
    return float(np.max(memory_scores(rows, rows[kept]))) if len(kept) < len(rows) else 0.0


AUGMENTATIONS = ("hflip", "vflip", "rot90", "shift")


def augmented(frame: np.ndarray, names: tuple[str, ...], shift: int) -> list[np.ndarray]:
    """The frame and its augmented copies: ``hflip``/``vflip`` (mirror), ``rot90`` (a quarter turn
    each way), ``shift`` (the frame moved ``shift`` pixels right and down, edges replicated: half a
    patch, so that tokens see the scene at the other patch alignment)."""
    out = [frame]
    for name in names:
        if name == "hflip":
            out.append(frame[:, ::-1])
        elif name == "vflip":
            out.append(frame[::-1])
        elif name == "rot90":
            out += [np.rot90(frame, 1), np.rot90(frame, -1)]
        elif name == "shift":
            half = max(1, shift)
            out.append(np.pad(frame, ((half, 0), (half, 0), (0, 0)), mode="edge")[:frame.shape[0], :frame.shape[1]])
        else:
            raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    return [np.ascontiguousarray(f) for f in out]


def unit_rows(tokens: np.ndarray) -> np.ndarray:
    """Tokens [..., D] -> unit rows [N, D] float32."""
    return np.ascontiguousarray(l2_normalise(np.asarray(tokens, dtype=np.float32)).reshape(-1, tokens.shape[-1]))
