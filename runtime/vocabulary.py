"""The names every stage shares for models and precisions (one home: import them from here).

A *model* is a graph the manifest lists by name (``visual``, ``visual_fp16``, ...); a *precision*
(fp32, fp16, int8) is what a model or an engine computes in. The onnxruntime and OpenVINO backends
run the model file of a precision (:func:`precision_model`); the native TensorRT backend runs the
engine of a precision, whatever model it was built from (the engine's sidecar says which).
"""

from __future__ import annotations

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
