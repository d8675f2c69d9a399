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
TEXT = "text"  # the text tower: token_ids -> text_embeds (`anoclip-export --text-tower`)
TEXT_VOCABULARY = "text_vocabulary"  # the tokenizer's vocabulary file of the text tower
TEXT_RECIPE = "text_recipe"  # the prompt recipe (templates, states, ensemble, tokenizer settings)

PRECISIONS = ("fp32", "fp16", "int8")
TTA_BACKENDS = ("numpy", "cupy", "onnx")  # what runs the TTA loop: array code on the CPU or on the GPU, or tta.onnx
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
        while that file is unchanged), ``tokens`` (holds patch tokens of the visual model: dropped
        when that model is replaced), ``model`` (an engine: kept while the model file it was built
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
    _kind(TEXT, "text", ".onnx", "", "anoclip-export --text-tower --out {folder}"),
    _kind(TEXT_VOCABULARY, "vocab", ".txt.gz", "", "anoclip-export --text-tower --out {folder}"),
    _kind(TEXT_RECIPE, "text_recipe", ".json", "", "anoclip-export --text-tower --out {folder}"),
    _kind(VISUAL_INT8, "visual_int8", ".onnx", VISUAL,
          "anoclip calibrate int8 --artifacts {folder} --images <frames of the scene>"),
    _kind(VISUAL_FP16, "visual_fp16", ".onnx", VISUAL, "anoclip calibrate fp16 --artifacts {folder}"),
    _kind(FUSED, "anoclip", ".onnx", VISUAL, "anoclip fuse --artifacts {folder}"),
    _kind("thresholds", "thresholds", ".json", "classes",
          "anoclip calibrate threshold --artifacts {folder} --class {cls} --normal <normal frames>"),
    _kind("memory", "memory", ".safetensors", "tokens",
          "anoclip calibrate memory --artifacts {folder} --class {cls} --normal <normal frames>"),
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


# ----------------------------------------------------------------------------------------------
# How a model runs: backend x precision -> the file it loads, the class that runs it, its bench row
# (`anoclip bench` times one row per entry; create_backend makes the runtime class of each)

ONNXRUNTIME_BACKENDS = ("cpu", "cuda", "tensorrt")  # --backend names of onnxruntime's execution providers
RUNTIME_CLASSES = {**{b: "OnnxRuntimeBackend" for b in ONNXRUNTIME_BACKENDS}, "openvino": "OpenVinoBackend",
                   "tensorrt-native": "TensorRTBackend"}  # runtime/backends, by --backend name
ENGINE = "engine"  # the artifact of tensorrt-native: the folder's TensorRT engine of a precision


@dataclass(frozen=True)
class Deployment:
    """One way to run a model of the folder.

    backend: the --backend name; precision: the --precision; model: the --model asked for.
    artifact: the kind of file it loads (a manifest model, or ``engine``: the engine of the precision).
    runtime: the backend class that runs it; row: its row name in `anoclip bench`.
    """

    backend: str
    precision: str
    model: str
    artifact: str
    runtime: str
    row: str


def bench_row(model: str, precision: str) -> str:
    """The `anoclip bench` row of the AnoCLIP visual model (or the fused graph) at ``precision``."""
    if model == FUSED:
        return "AnoCLIP (fused graph)"
    return "AnoCLIP" if precision == "fp32" else f"AnoCLIP ({precision})"


DEPLOYMENTS: tuple[Deployment, ...] = (
    *(Deployment(backend, precision, VISUAL, ENGINE if backend == "tensorrt-native" else PRECISION_MODELS[precision],
                 RUNTIME_CLASSES[backend], bench_row(VISUAL, precision))
      for backend in RUNTIME_CLASSES for precision in PRECISIONS),
    *(Deployment(backend, "fp32", FUSED, FUSED, RUNTIME_CLASSES[backend], bench_row(FUSED, "fp32"))
      for backend in RUNTIME_CLASSES if backend != "tensorrt-native"),  # engines are of the visual model
)


def deployments(backend: str) -> list[Deployment]:
    """The entries of :data:`DEPLOYMENTS` that ``backend`` runs."""
    return [d for d in DEPLOYMENTS if d.backend == backend]
