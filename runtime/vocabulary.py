"""The names every stage shares for models, precisions and the kinds of file an artifact folder
holds (one home: import them from here).

A *model* is a graph the manifest lists by name (``visual``, ``visual_fp16``, ...); a *precision*
(fp32, fp16, int8) is what a model or an engine computes in. The onnxruntime and OpenVINO backends
run the model file of a precision (:func:`precision_model`); the native TensorRT backend runs the
engine of a precision, whatever model it was built from (the engine's sidecar says which).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import ArtifactError

VISUAL = "visual"  # fp32 V-V visual model: image -> image_embeds, patch_embeds
VISUAL_QKV = "visual_qkv"  # plain-CLIP baseline (patch_embeds are the QKV tokens)
TTA_GRAPH = "tta"  # the AnoCLIP+ adapter loop as one graph
VISUAL_FP16 = "visual_fp16"  # `anoclip calibrate fp16`
VISUAL_INT8 = "visual_int8"  # `anoclip calibrate int8` (Q/DQ)
FUSED = "fused"  # image -> scores and maps of K classes in one graph (`anoclip fuse`)

PRECISIONS = ("fp32", "fp16", "int8")
PRECISION_MODELS = {"fp32": VISUAL, "fp16": VISUAL_FP16, "int8": VISUAL_INT8}  # the model file of each precision


def precision_model(precision: str, model: str = VISUAL) -> str:
    """The manifest model that runs ``model`` at ``precision`` (fp32: ``model`` itself)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model
    if model != VISUAL:
        raise ArtifactError(f"--precision {precision} exists for the visual model only, not {model}; "
                            "use --model visual")
    return PRECISION_MODELS[precision]


def model_precision(model: str) -> str:
    """The precision of a manifest model by its name: visual_fp16 -> fp16, visual_int8 -> int8, else fp32."""
    return next((p for p, name in PRECISION_MODELS.items() if name == model), "fp32")


# ----------------------------------------------------------------------------------------------
# The kinds of file an artifact folder owns (the folder's transaction, runtime/folder.py, keeps
# them consistent)


@dataclass(frozen=True)
class FileKind:
    """One kind of file an artifact folder holds.

    name: the manifest model it is (``visual``, ``visual_int8``, ...) or its role (``prompts``,
        ``thresholds``, ``engine``, ``engine_sidecar``).
    pattern: the file names of this kind.
    made_from: "" (written by the export itself), ``visual`` (made from the fp32 visual model: kept
        while that file is unchanged), ``model`` (an engine: kept while the model file it was built
        from is in the folder), ``engine`` (a sidecar: goes with its engine), ``classes`` (per-class
        records, stale when a class's model or embeddings change).
    remake: the command that makes it anew (``{folder}``, ``{precision}`` filled in).
    """

    name: str
    pattern: re.Pattern[str]
    made_from: str
    remake: str


def _kind(name: str, stem: str, suffix: str, made_from: str, remake: str) -> FileKind:
    """A kind whose files are ``<stem>.<sha12><suffix>`` (or ``<stem><suffix>`` in format-1 folders)."""
    return FileKind(name, re.compile(rf"^{stem}(\.[0-9a-f]{{12}})?{re.escape(suffix)}$"), made_from, remake)


FILE_KINDS: tuple[FileKind, ...] = (
    _kind(VISUAL, "visual", ".onnx", "", "anoclip-export --out {folder}"),
    _kind(VISUAL_QKV, "visual_qkv", ".onnx", "", "anoclip-export --qkv-tokens model --out {folder}"),
    _kind(TTA_GRAPH, "tta", ".onnx", "", "anoclip-export --tta --out {folder}"),
    _kind("prompts", "prompts", ".safetensors", "", "anoclip-export --classes ... --out {folder}"),
    _kind(VISUAL_INT8, "visual_int8", ".onnx", VISUAL,
          "anoclip calibrate int8 --artifacts {folder} --images <frames of the scene>"),
    _kind(VISUAL_FP16, "visual_fp16", ".onnx", VISUAL, "anoclip calibrate fp16 --artifacts {folder}"),
    _kind(FUSED, "anoclip", ".onnx", VISUAL, "anoclip fuse --artifacts {folder}"),
    _kind("thresholds", "thresholds", ".json", "classes",
          "anoclip calibrate threshold --artifacts {folder} --class {cls} --normal <normal frames>"),
    FileKind("engine", re.compile(r"^visual_(fp32|fp16|int8)\.[0-9a-f]{12}\.engine$"), "model",
             "anoclip build-engine --artifacts {folder} --precision {precision}"),
    FileKind("engine_sidecar", re.compile(r"^visual_(fp32|fp16|int8)\.[0-9a-f]{12}\.engine\.json$"), "engine",
             "anoclip build-engine --artifacts {folder} --precision {precision}"),
)
KINDS = {kind.name: kind for kind in FILE_KINDS}
DERIVED_MODELS = tuple(kind.name for kind in FILE_KINDS if kind.made_from == VISUAL)


def file_kind(name: str) -> FileKind | None:
    """The kind of a file name (None: not a file a manifest owns)."""
    return next((kind for kind in FILE_KINDS if kind.pattern.match(name)), None)


def remake_command(kind: str, folder: str | os.PathLike, **fields: str) -> str:
    """The command that makes a file of ``kind`` anew for ``folder``."""
    return KINDS[kind].remake.format(folder=folder, **{"cls": "...", "precision": "...", **fields})
