"""Reading the fused model (``anoclip.onnx``, model ``fused``): image -> scores and maps of the K
classes baked into it, in the order its manifest entry and its ONNX metadata give.

The file is made by ``anoclip fuse`` (``anoclip.export.fused``) from the visual model and the text
features of its classes; it holds for as long as both are the folder's own. The visual model is
checked like any model made from it (``source_sha256``); the text features here, per class. A
fused model made before classes were added to the folder (or of chosen classes) is partial: asking
it for every class, or for one it lacks, is refused with the ``anoclip fuse`` command that makes it
(:func:`check_fused_holds`).
"""

from __future__ import annotations

from typing import Sequence

from .artifacts import FUSED, MAKE_MODEL, Artifacts
from .errors import ArtifactError
from .thresholds import text_features_sha256

METHOD_VERSION = "1"  # of the scoring in the graph; fused files of another version are made anew
OUTPUTS = ("scores", "maps", "patch_scores")  # [B,K], [B,K,H,W], [B,K,M]; patch_embeds [B,M,D] optional
# optional, `anoclip fuse --thresholds`: bool [B,K] score > image threshold, [B,K,H,W] map > pixel threshold
# (the thresholds baked in: the entry's provenance "thresholds" and the graph's metadata)
DECISION_OUTPUTS = ("anomalous", "mask")


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
