"""A class's memory of normal frames: their V-V patch tokens, reduced by a coreset, stored in the
folder (``runtime/memory.py`` holds the format and the scoring).

Frames run through the visual model as predict runs them (same preprocessing and tiling); every
tile's patch tokens, L2-normalised, join the memory. With ``extend`` the class's current memory is
kept and the new tokens are added to it. Above ``max_patches`` rows a greedy k-center coreset keeps
the rows that cover the rest best; its covering radius (the largest memory score a dropped row
gets against the kept ones) is recorded. Storing goes through the folder's transaction.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from anoclip.runtime.artifacts import VISUAL
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.memory import ClassMemory, augmented, unit_rows
from anoclip.runtime.normal_frames import build_class_memory, current_memory, store_normal_frames
from anoclip.runtime.preprocess import preprocess

log = logging.getLogger(__name__)

BATCH = 8  # frames per model run


@dataclass
class MemoryReport:
    """What a memory build did."""

    frames: int  # frames read by this run
    patches: int  # rows before the coreset (old rows included when extending)
    earlier: int  # rows of the memory it extended (0: a new memory)
    kept: int
    covering_radius: float
    file: str


def patch_tokens(detector: Detector, frames: Iterable[np.ndarray], augment: tuple[str, ...] = (),
                 total: int | None = None, desc: str = "memory") -> tuple[np.ndarray, int]:
    """(unit rows [N, D] of every tile's patch tokens, frames read) for ``frames`` run as predict runs
    them; each frame's augmented copies (``memory.augmented``) too."""
    from tqdm import tqdm

    rows, count = [], 0
    source = iter(frames)
    with tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, disable=None) as bar:
        while chunk := list(itertools.islice(source, BATCH)):
            batches = []
            for frame in chunk:
                shift = round(0.5 * frame.shape[1] / detector.grid[1])  # half a patch in frame pixels
                for copy in augmented(frame, augment, shift):
                    batches.append(preprocess(copy, detector.input_size, detector.mean, detector.std,
                                              detector.tiling)[0])
            _, patches = detector.backend.run(np.concatenate(batches))
            rows.append(unit_rows(patches))
            count += len(chunk)
            bar.update(len(chunk))
    if not rows:
        raise AnoclipError("no normal frames were read; give normal images, folders of them or videos with --normal")
    return np.concatenate(rows), count


def calibrate_memory(detector: Detector, cls: str, frames: Iterable[np.ndarray], *, max_patches: int,
                     augment: tuple[str, ...] = (), extend: bool = False, normal: Sequence[str] = (),
                     command: str = "", total: int | None = None) -> MemoryReport:
    """Build ``cls``'s memory from normal ``frames`` with ``detector`` (its visual model) and store it
    in the detector's folder, beside the other classes' memories."""
    detector.class_prompts(cls)  # an unknown class fails before any frame is read
    folder = detector.artifacts.folder
    visual_sha = detector.artifacts.model_sha256(VISUAL)
    old = current_memory(folder).classes.get(cls) if extend else None
    rows, count = patch_tokens(detector, frames, augment, total, desc=f"memory {cls}")
    memory_rows, before, radius = build_class_memory(rows, max_patches, old)
    previous_frames = int(old.provenance.get("frames", 0)) if old is not None else 0
    provenance = {
        "frames": previous_frames + count, "new_frames": count, "patches": before, "kept": len(memory_rows),
        "max_patches": max_patches, "coreset": "greedy k-center" if before > len(memory_rows) else "none",
        "covering_radius": radius, "augment": list(augment), "model": detector.model, "precision": detector.precision,
        "model_sha256": detector.artifacts.model_sha256(detector.model), "tiling": detector.tiling,
        "extended": old is not None, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command, "normal": [str(n) for n in normal],
    }
    name, _ = store_normal_frames(folder, cls, memory=ClassMemory(cls, memory_rows, provenance), visual_sha256=visual_sha,
                                  command=command or f"calibrate memory --class {cls}")
    return MemoryReport(count, before, len(old.patches) if old is not None else 0, len(memory_rows), radius, name)
