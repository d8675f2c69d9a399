"""Reading the fused model (``anoclip.onnx``, model ``fused``): image -> scores and maps of the K
classes baked into it, in the order its manifest entry and its ONNX metadata give.

The file is made by ``anoclip fuse`` (``anoclip.export.fused``) from the visual model and the text
features of its classes; it holds for as long as both are the folder's own. The visual model is
checked like any model made from it (``source_sha256``); the text features here, per class. A
fused model made before classes were added to the folder (or of chosen classes) is partial: asking
it for every class, or for one it lacks, is refused with the ``anoclip fuse`` command that makes it
(:func:`check_fused_holds`).

A fused model may bake classes' memories of normal frames (provenance ``memory``: per class the
sha256 and row count of the memory, ``memory_weight``, ``memory_mode`` ``combined`` or ``only``):
its scores and maps then hold the memory branch, and hold only for that memory, weight and mode
(:func:`baked_memory`).
"""

from __future__ import annotations

import math
from typing import Sequence

from .artifacts import FUSED, MAKE_MODEL, Artifacts
from .errors import ArtifactError
from .memory import ClassMemory
from .thresholds import text_features_sha256

METHOD_VERSION = "1"  # of the scoring in the graph; fused files of another version are made anew
OUTPUTS = ("scores", "maps", "patch_scores")  # [B,K], [B,K,H,W], [B,K,M]; patch_embeds [B,M,D] optional
# optional, `anoclip fuse --thresholds`: bool [B,K] score > image threshold, [B,K,H,W] map > pixel threshold
# (the thresholds baked in: the entry's provenance "thresholds" and the graph's metadata)
DECISION_OUTPUTS = ("anomalous", "mask")
# with a memory of normal frames baked in (`anoclip fuse`, provenance "memory"): each branch's image
# score [B,K] (memory_scores: 0 for a class without a memory; zero_shot_scores: the global token's
# p_abnormal), and with `--branch-maps` each branch's map [B,K,H,W] (memory_maps: 0 without a memory)
MEMORY_OUTPUTS = ("zero_shot_scores", "memory_scores")
BRANCH_MAP_OUTPUTS = ("memory_maps", "zero_shot_maps")


def fused_classes(artifacts: Artifacts) -> list[str]:
    """The classes of the folder's fused model, in graph order; an error when it no longer matches
    the folder's prompt weights or scoring."""
    entry = artifacts.manifest.models[FUSED]
    make = MAKE_MODEL[FUSED].format(folder=artifacts.folder)
    classes = entry.provenance.get("classes")
    hashes = entry.provenance.get("text_sha256")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
            and isinstance(hashes, dict)):
        raise ArtifactError(f"the fused model of {artifacts.folder} does not list its classes; make it anew with "
                            f"`{make}`")
    if entry.provenance.get("method_version") != METHOD_VERSION:
        raise ArtifactError(f"the fused model of {artifacts.folder} has scoring version "
                            f"{entry.provenance.get('method_version')}, this runtime {METHOD_VERSION}; make it anew "
                            f"with `{make}`")
    for cls in classes:
        current = (text_features_sha256(artifacts.prompts.get(cls).text_features)
                   if cls in artifacts.prompts.classes else None)
        if current != hashes.get(cls):
            change = "was dropped from" if current is None else "has other text features in"
            raise ArtifactError(f"class {cls} of the fused model {change} the prompt weights of {artifacts.folder} "
                                f"since it was made; make it anew with `{make}`")
    return list(classes)


def check_fused_holds(artifacts: Artifacts, fused: Sequence[str], asked: Sequence[str] | None) -> None:
    """One ArtifactError when the fused model, of classes ``fused``, lacks a class ``asked`` for
    (None: every class of the folder's prompt weights, ``--class all``), naming the ``anoclip
    fuse`` command that makes it; a class the folder does not have at all is the prompt weights' error."""
    folder, make = artifacts.folder, MAKE_MODEL[FUSED].format(folder=artifacts.folder)
    if asked is None:
        lacking = sorted(set(artifacts.prompts.classes) - set(fused))
        if lacking:
            raise ArtifactError(f"the fused model of {folder} holds {', '.join(fused)} but not {', '.join(lacking)} "
                                f"of the folder's classes (they were added since it was made, or it was made of "
                                f"chosen classes); make it with every class with `{make}`, or ask for the classes it "
                                "holds by name")
        return
    for cls in asked:
        if cls not in fused:
            artifacts.prompts.get(cls)  # a class the folder lacks too: the prompt weights' error
            raise ArtifactError(f"class {cls!r} is not in the fused model of {folder} (has: {', '.join(fused)}); "
                                f"make it with `{make} --classes {','.join([*fused, cls])}`")


def baked_memory(artifacts: Artifacts, cls: str, mode: str, weight: float, memory: ClassMemory | None) -> bool:
    """Whether the fused model's outputs for ``cls`` hold the memory branch as the runtime's memory
    setting ``mode`` (auto, on, off, only) with ``weight`` and the folder's memory of the class
    (``memory``, None when the branch is off for it) ask: True when the graph baked that memory,
    False when it baked none for the class; one ArtifactError naming `anoclip fuse` when the graph
    baked a memory these settings or the folder's current memory do not match."""
    folder = artifacts.folder
    entry = artifacts.manifest.models[FUSED]
    baked = (entry.provenance.get("memory") or {}).get(cls)
    if baked is None:
        return False
    make = MAKE_MODEL[FUSED].format(folder=folder)
    only = entry.provenance.get("memory_mode") == "only"
    if mode == "off":
        raise ArtifactError(f"the fused model of {folder} has the memory of normal frames of class {cls} baked in and "
                            f"cannot leave it out (--memory off); make it without with `{make} --memory off`, or use "
                            "--model visual")
    if memory is None:
        raise ArtifactError(f"the memory of normal frames of class {cls} was removed from {folder} since its fused "
                            f"model baked it; make it anew with `{make}`")
    if memory.sha256 != baked.get("sha256"):
        raise ArtifactError(f"the memory of normal frames of class {cls} in {folder} changed since its fused model "
                            f"baked it; make it anew with `{make}`")
    if only != (mode == "only"):
        raise ArtifactError(f"the fused model of {folder} bakes --memory {'only' if only else 'auto'} and this runs "
                            f"--memory {mode}; make it with `{make} --memory {mode}`, or predict with "
                            f"--memory {'only' if only else 'auto'}")
    made = entry.provenance.get("memory_weight")
    if not only and not (isinstance(made, (int, float)) and math.isclose(made, weight, rel_tol=0.0, abs_tol=1e-9)):
        raise ArtifactError(f"the fused model of {folder} bakes memory weight {made} and this runs {weight:g}; make "
                            f"it with `{make} --memory-weight {weight:g}`, or predict with --memory-weight {made}")
    return True
