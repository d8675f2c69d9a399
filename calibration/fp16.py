"""fp16 model of the V-V visual graph: ``anoclip calibrate fp16``.

Every float operation runs in fp16 except LayerNormalization and Softmax, which stay in fp32 (a
LayerNorm decomposed or run in fp16 overflows on CLIP's residual stream, whose outlier channels
reach |x| ~1000: their squares exceed fp16's 65504); the graph's input and outputs stay fp32, so
the runtime feeds and reads it like the fp32 model. The converter is onnxruntime's own
(``onnxruntime.transformers.float16``); afterwards the parameters of the fp32 ops are restored as
fp32 initializers (the converter rounds them to fp16 and casts them back) and a cast to fp16 that is
cast straight back to fp32 is bypassed, so the only Cast nodes left sit at the graph's input and
outputs and around each LayerNormalization and Softmax.
"""

from __future__ import annotations

import logging
from pathlib import Path

from anoclip.runtime.errors import AnoclipError

from .int8 import onnx_modules

log = logging.getLogger(__name__)

FP32_OPS = ("LayerNormalization", "Softmax")
CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16"
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types


def convert_fp16(source: str | Path, target: str | Path) -> dict:
    """Write the fp16 model of ``source`` (fp32 ONNX) to ``target``; returns :func:`cast_structure`."""
    onnx, _ = onnx_modules()
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # the transformers tools ship with onnxruntime; a trimmed build may lack them
        raise AnoclipError(f"the fp16 conversion needs onnxruntime's transformers tools ({exc}); install the full "
                           "onnxruntime wheel") from None
    original = onnx.load(str(source))
    fp32_parameters = {init.name: init for init in original.graph.initializer if init.data_type == FLOAT}
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=list(FP32_OPS))
    _restore_fp32_parameters(model, fp32_parameters)
    _bypass_round_trips(model)
    _sort_topologically(model)  # the converter appends its casts at the end; ONNX wants producers first
    # the converter's value_info keeps fp16 types of tensors that are fp32 now: infer them anew (strictly,
    # so that a type that does not add up fails here and not in a runtime)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    structure = cast_structure(model)
    if structure["misplaced_casts"]:
        misplaced = ", ".join(structure["misplaced_casts"])
        raise AnoclipError(f"the fp16 conversion left casts where none belong ({misplaced}); "
                           "nothing was written; report the backbone and the onnxruntime version")
    return structure


def _producers(model) -> dict:
    return {out: node for node in model.graph.node for out in node.output}


def _cast_to(node) -> int | None:
    if node is None or node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _restore_fp32_parameters(model, fp32_parameters: dict) -> None:
    """Feed the fp32 ops their parameters as the original fp32 initializers, not as fp16 copies cast
    back (the cast would round them first)."""
    from onnx import TensorProto

    producers = _producers(model)
    present = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in FP32_OPS:
            continue
        for index, name in enumerate(node.input):
            cast = producers.get(name)
            if cast is None or _cast_to(cast) != FLOAT or cast.input[0] not in fp32_parameters:
                continue
            source = cast.input[0]
            if present[source].data_type == FLOAT:  # still fp32 (used by fp32 ops only)
                node.input[index] = source
                continue
            restored = f"{source}_fp32"
            if restored not in present:
                copy = TensorProto()
                copy.CopyFrom(fp32_parameters[source])
                copy.name = restored
                model.graph.initializer.append(copy)
                present[restored] = copy
            node.input[index] = restored
    _drop_unused(model)


def _bypass_round_trips(model) -> None:
    """A Cast to fp32 of a Cast to fp16 of an fp32 tensor reads the fp32 tensor directly."""
    producers = _producers(model)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            outer = producers.get(name)
            if _cast_to(outer) != FLOAT:
                continue
            inner = producers.get(outer.input[0])
            if _cast_to(inner) == FLOAT16 and _is_fp32(model, inner.input[0], producers):
                node.input[index] = inner.input[0]
    _drop_unused(model)


def _is_fp32(model, name: str, producers: dict) -> bool:
    node = producers.get(name)
    if node is None:
        return any(i.name == name and i.type.tensor_type.elem_type == FLOAT for i in model.graph.input)
    return node.op_type in FP32_OPS or _cast_to(node) == FLOAT


def _drop_unused(model) -> None:
    """Remove Cast nodes and initializers that nothing reads any more."""
    while True:
        used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def _sort_topologically(model) -> None:
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise AnoclipError("the fp16 model has a cycle or a dangling input; nothing was written")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def cast_structure(model) -> dict:
    """Where the Cast nodes of an fp16 model sit, and the types at its edges: every Cast must turn the
    graph input to fp16, an fp32 op's input to fp32 or its output to fp16, or a graph output to fp32."""
    producers = _producers(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    placed, misplaced = {}, []
    for node in model.graph.node:
        to = _cast_to(node)
        if to is None:
            continue
        source = producers.get(node.input[0])
        readers = consumers.get(node.output[0], [])
        if to == FLOAT16 and node.input[0] in graph_inputs:
            kind = "graph input -> fp16"
        elif to == FLOAT and readers and all(r.op_type in FP32_OPS for r in readers):
            kind = "-> fp32 op"
        elif to == FLOAT16 and source is not None and source.op_type in FP32_OPS:
            kind = "fp32 op ->"
        elif to == FLOAT and node.output[0] in graph_outputs:
            kind = "-> graph output fp32"
        else:
            kind = ""
            misplaced.append(node.name or node.output[0])
        if kind:
            placed[kind] = placed.get(kind, 0) + 1
    initializer_types = {}
    for init in model.graph.initializer:
        key = {FLOAT: "fp32", FLOAT16: "fp16"}.get(init.data_type, "other")
        initializer_types[key] = initializer_types.get(key, 0) + 1
    fp32_op_parameters = [init.name for init in model.graph.initializer if init.data_type == FLOAT16
                          and any(r.op_type in FP32_OPS for r in consumers.get(init.name, []))]
    return {
        "casts": placed, "misplaced_casts": misplaced, "fp32_ops": list(FP32_OPS),
        "io": {v.name: _type_name(v.type.tensor_type.elem_type) for v in [*model.graph.input, *model.graph.output]},
        "initializers": initializer_types, "fp16_parameters_of_fp32_ops": fp32_op_parameters,
    }


def _type_name(elem_type: int) -> str:
    return {FLOAT: "fp32", FLOAT16: "fp16"}.get(elem_type, str(elem_type))


def calibrate_fp16(folder: str | Path, images=(), *, parity_frames: int = 16, stride: int = 1,
                   max_pixels: int | None = None, gate=None, command: str = "", threads: int | None = None,
                   report=print):
    """Make, check and store the folder's fp16 model (``visual_fp16``); parity on frames of
    ``images`` when given, else on synthetic textures. Returns (file name, entry, parity figures)."""
    import onnxruntime

    from anoclip.runtime.artifacts import read_manifest
    from anoclip.runtime.plumbing import ensure_writable_folder
    from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS

    from .derived import FrameSplit, make_model, read_frames, synthetic_frames
    from .parity import DEFAULT_GATES

    onnx_modules()
    manifest = read_manifest(folder)
    ensure_writable_folder(folder, "--artifacts")  # before any frame is read
    if images:
        split = read_frames(images, manifest, 0, parity_frames, stride,
                            DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    else:
        split = FrameSplit(parity=synthetic_frames(manifest, parity_frames), synthetic=parity_frames)
    provenance = {
        "images": [str(i) for i in images], "frames": {"read": split.read, "parity": len(split.parity),
                                                       "parity_inputs": split.note(), "skipped": split.skipped},
        "converter": CONVERTER, "converter_version": onnxruntime.__version__,
        "scheme": {"fp16": "every float op", "fp32": list(FP32_OPS), "io": "fp32",
                   "fp32_parameters": "LayerNormalization/Softmax parameters kept as fp32 initializers"},
    }
    return make_model(folder, "fp16", lambda source, target, _measure: convert_fp16(source, target), split,
                      gate or DEFAULT_GATES["fp16"], provenance, command, threads, report)
