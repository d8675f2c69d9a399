"""INT8 (explicit quantization) of the V-V visual graph: ``anoclip calibrate int8``.

A static Q/DQ model, the form that onnxruntime runs on the CPU and that TensorRT 10.x / 11.x
builds (TensorRT 11 dropped implicit INT8 calibrators and the INT8 builder flag, so the scales must
be in the ONNX):

* quantized: the inputs of MatMul, Gemm and Conv, activations and weights alike (the patch
  embedding, the projections of every block, the attention products q·kᵀ, softmax·v and v·vᵀ
  unless ``attention=False``, and the final projection);
* activations int8 symmetric (zero point 0), one scale per tensor, from calibration on frames of
  the scene; weights int8 symmetric with one scale per output channel;
* left in float: LayerNormalization, Softmax, GELU, every Add (the residual stream of CLIP carries
  channels with |x| ~1000, which int8 cannot hold next to the rest) and the outputs of the
  quantized ops (a DequantizeLinear never feeds a LayerNormalization, Softmax or Add).

The quantizer is onnxruntime's ``quantize_static`` (QDQ format); ``calibrate_method`` minmax,
entropy or percentile. Activation ranges are collected a few frames at a time, so memory stays
bounded whatever the number of frames. The graph is not pre-processed (onnxruntime's fused
operators would be its own, which TensorRT cannot parse).

Accuracy-aware: when the full int8 model fails the parity gate (``parity.py``), the quantized ops are
measured in groups (the MatMuls, Gemms and Convs between two LayerNormalizations: the patch
embedding, each block's attention and MLP halves, the projection): each group kept in float alone,
on the held-out parity frames, ranks the groups by how much their quantization hurts; the worst are
then kept in float one after another until the gate passes (at most a third of the groups), then
weights-only (every attention product in float), then weights-only with the worst groups in float.
Keeping a node in float is a graph edit of the calibrated model (its inputs go back to the float
tensors, the Q/DQ pairs nobody reads any more are dropped): no re-calibration, so the search costs
one parity run per candidate. What was kept in float, and why, is recorded in the provenance.

onnxruntime on the CPU runs a Q/DQ MatMul as an integer product (MatMulIntegerToFloat) only when
its graph optimiser does not first fuse the MatMul with the bias Add into a float Gemm: an InferenceSession
for this model needs ``optimization.disable_specified_optimizers = MatMulAddFusion`` (2.65x
faster than fp32 on ViT-B-16-plus-240 with it, slower than fp32 without it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.plumbing import quiet_loggers

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
FLOAT_OPS = ("LayerNormalization", "Softmax", "Add")  # never fed by a DequantizeLinear
METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
QUANTIZER = "onnxruntime.quantization.quantize_static"
CHUNK = 8  # frames whose activations are held at once during calibration


@dataclass(frozen=True)
class Int8Scheme:
    """How the model is quantized (recorded in the manifest entry's provenance)."""

    method: str = DEFAULT_METHOD
    attention: bool = True  # quantize the activation x activation products of attention as well

    def describe(self) -> dict:
        return {"format": "QDQ", "activations": "int8 symmetric per tensor (zero point 0)",
                "weights": "int8 symmetric per output channel (zero point 0)",
                "quantized_ops": list(QUANTIZED_OPS), "attention_products": self.attention,
                "outputs": "float (no Q/DQ after the quantized ops)",
                "float_ops": ["LayerNormalization", "Softmax", "Add", "GELU (Erf)"], "calibration": self.method}


def onnx_modules():
    """onnx and onnxruntime.quantization, or the one-line error naming the extra that brings them."""
    try:
        import onnx
        from onnxruntime import quantization
    except ImportError as exc:
        raise AnoclipError(f"calibrating reduced precision needs {exc.name or 'onnx'}; install it with "
                           "`pip install 'anoclip[quantize]'`") from None
    return onnx, quantization


def attention_products(model) -> list[str]:
    """Names of the MatMul nodes whose two inputs are both activations (q kᵀ, softmax v, v vᵀ)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and not any(name in constants for name in node.input)]


class _Reader:
    """onnxruntime's calibration data reader over preprocessed frames, with a progress bar; it
    serves ranges of frames (``set_range``) so that activations are collected a chunk at a time."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray], bar):
        self.input_name, self.batches, self.bar = input_name, batches, bar
        self.start, self.end = 0, len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, end_index

    def get_next(self):
        if self.start >= self.end:
            return None
        batch = self.batches[self.start]
        self.start += 1
        self.bar.update(1)
        return {self.input_name: batch}


def _chunk(count: int) -> int:
    """The largest chunk size up to CHUNK that divides ``count`` (the quantizer requires it)."""
    return next(size for size in range(min(CHUNK, count), 0, -1) if count % size == 0)


def quantize_int8(source: str | Path, target: str | Path, batches: Sequence[np.ndarray],
                  scheme: Int8Scheme = Int8Scheme()) -> None:
    """Write the Q/DQ model of ``source`` (fp32 ONNX) to ``target``, calibrated on ``batches``
    (preprocessed model inputs, [1, 3, H, W] float32 each)."""
    from tqdm import tqdm

    onnx, quantization = onnx_modules()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    if scheme.method not in METHODS:
        raise AnoclipError(f"unknown calibration method '{scheme.method}'; choose one of {', '.join(METHODS)}")
    if not batches:
        raise AnoclipError("no calibration frames; give images or videos of the scene with --images")
    model = onnx.load(str(source), load_external_data=False)
    input_name = model.graph.input[0].name
    excluded = [] if scheme.attention else attention_products(model)
    del model
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[scheme.method]
    extra = {
        "ActivationSymmetric": True, "WeightSymmetric": True,
        # Q/DQ on the inputs only: the outputs (the bias Add, the residual stream) stay float
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
        "CalibStridedMinMax": _chunk(len(batches)),  # a chunk of frames at a time, for every method
    }
    if scheme.method == "percentile":
        extra["CalibPercentile"] = 99.999
    with tqdm(total=len(batches), desc=f"calibrate int8 ({scheme.method})", unit="frame", file=sys.stderr,
              disable=None) as bar, quiet_loggers(""), contextlib.redirect_stdout(sys.stderr):
        # quiet: its advice to pre-process (skipped on purpose, see above); stdout: its histogram
        # calibrators print progress there, where --json output goes
        quantization.quantize_static(
            str(source), str(target), _Reader(input_name, batches, bar), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=False,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            calibrate_method=method, extra_options=extra)



def qdq_structure(model) -> dict:
    """What a Q/DQ model quantizes: the op types fed by a DequantizeLinear (and how many of each),
    whether every zero point is 0, the integer types, how weights are scaled (per channel or per
    tensor) and the float ops (LayerNormalization, Softmax, Add) fed by a DequantizeLinear."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    constants = {out: node for node in model.graph.node if node.op_type == "Constant" for out in node.output}

    def array(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    dq_out = {}
    zero_points, types, weight_scales = [], set(), {"per_channel": 0, "per_tensor": 0}
    # a weight is an initializer (or constant) that a DequantizeLinear reads, stored as integers or
    # quantized in the graph from float (Q then DQ, which TensorRT folds)
    weights = set(initializers) | set(constants)
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in weights}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is not None:
            zero_points.append(zero)
            types.add(str(zero.dtype))
        if node.op_type == "DequantizeLinear":
            dq_out[node.output[0]] = node
            if node.input[0] in weights:
                scale = array(node.input[1])
                weight_scales["per_channel" if scale is not None and scale.size > 1 else "per_tensor"] += 1
    fed: dict[str, int] = {}
    float_fed: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(name in dq_out for name in node.input):
            fed[node.op_type] = fed.get(node.op_type, 0) + 1
            if node.op_type in FLOAT_OPS:
                float_fed.append(f"{node.op_type} {node.name}")
    return {
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_linear": len(dq_out),
        "quantized_ops": dict(sorted(fed.items())),
        "zero_points_all_zero": bool(zero_points) and all(not z.any() for z in zero_points),
        "integer_types": sorted(types),
        "weights": weight_scales,
        "float_ops_fed_by_dq": float_fed,
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "custom_domains": sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}),
    }


def float_groups(model) -> list[tuple[str, list[str]]]:
    """The quantizable nodes (MatMul, Gemm, Conv) of the fp32 graph in groups by the last
    LayerNormalization they depend on: "patch embedding" before any, then one group per
    LayerNormalization, named after it (in a ViT block the first is its attention, the second its
    MLP), in graph order."""
    last: dict[str, int] = {}  # tensor -> index of the latest LayerNormalization upstream (-1: none)
    norms: list[str] = []
    members: dict[int, list[str]] = {}
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        upstream = max((last.get(name, -1) for name in node.input), default=-1)
        if node.op_type == "LayerNormalization":
            norms.append(node.name)
            upstream = len(norms) - 1
        elif node.op_type in QUANTIZED_OPS:
            members.setdefault(upstream, []).append(node.name)
        for out in node.output:
            last[out] = upstream
    return [("patch embedding" if index < 0 else f"after {norms[index]}", members[index]) for index in sorted(members)]


def keep_in_float(quantized, original, names) -> object:
    """A copy of the Q/DQ model ``quantized`` whose nodes ``names`` read the float tensors they read in
    ``original`` (the fp32 model it was made from); Q/DQ pairs left without a quantized reader are
    bypassed for their other readers and dropped, and so are the initializers nobody reads."""
    names = set(names)
    model = copy.deepcopy(quantized)
    graph = model.graph
    source = {node.name: node for node in original.graph.node}
    source_inits = {init.name: init for init in original.graph.initializer}
    source_constants = {out: node for node in original.graph.node if node.op_type == "Constant" for out in node.output}
    present = {init.name for init in graph.initializer} | {i.name for i in graph.input}
    present |= {out for node in graph.node for out in node.output}
    constants = []
    for node in graph.node:
        if node.name not in names:
            continue
        inputs = list(source[node.name].input)
        del node.input[:]
        node.input.extend(inputs)
        for name in inputs:
            if name in present or not name:
                continue
            if name in source_inits:
                graph.initializer.append(source_inits[name])
            elif name in source_constants:
                constants.append(copy.deepcopy(source_constants[name]))
            present.add(name)
    if constants:
        nodes = constants + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    # an activation's Q/DQ that no quantized op reads any more: its other readers (a Transpose, a
    # Mul) read the float tensor again
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(node.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue  # a weight
        consumers = readers.get(node.output[0], [])
        if any(c.op_type in QUANTIZED_OPS and c.name not in names for c in consumers):
            continue
        for consumer in consumers:
            for index, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[index] = quantize.input[0]
    _prune(model)
    return model


def _prune(model) -> None:
    """Drop Q/DQ nodes whose outputs nobody reads, and initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(out in read for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | outputs
    unused = [init for init in graph.initializer if init.name not in read]
    for init in unused:
        graph.initializer.remove(init)


def _figures(parity, gate) -> dict:
    return {"gate_ratio": round(gate.ratio(parity), 4), "patch_cos_mean": round(parity.patch_cos_mean, 6),
            "patch_error": round(parity.patch_error, 4), "map_error": round(parity.map_error, 4),
            "map_r_mean": round(parity.map_r_mean, 6), "map_r_min": round(parity.map_r_min, 6),
            "decision_agreement": parity.decision_agreement, "passed": parity.passed}


def _failing(parity) -> str:
    return "; ".join(parity.failures) or "passed"


def accuracy_aware_int8(source: Path, target: Path, batches: Sequence[np.ndarray], scheme: Int8Scheme,
                        measure: Callable, gate, report: Callable[[str], None] = print) -> dict:
    """Quantize ``source`` to ``target`` (as :func:`quantize_int8`) and, when the model fails
    ``gate`` on the parity inputs (``measure(path)`` gives the figures), keep the groups of
    quantized nodes whose quantization hurts most in float until it passes (module docstring).
    Returns the search's record for the provenance; the model at ``target`` is the one that passed,
    or the last tried (weights-only with every group tried in float) when none did."""
    onnx, _ = onnx_modules()
    work = target.parent
    full = work / "visual_int8.full.onnx"  # named as int8 models are: the backend runs them as int8
    quantize_int8(source, full, batches, scheme)
    parity = measure(full)
    record: dict = {"full": _figures(parity, gate), "kept_in_float": [], "measured": 1}
    if parity.passed:
        shutil.copyfile(full, target)
        record["result"] = "full int8"
        return record
    report(f"int8: the fully quantized model fails the gate ({_failing(parity)}); measuring which quantized "
           "MatMuls hurt most on the parity inputs")
    quantized, original = onnx.load(str(full)), onnx.load(str(source), load_external_data=False)
    groups = float_groups(original)
    candidate = work / "visual_int8.candidate.onnx"

    def trial(names) -> object:
        onnx.save(keep_in_float(quantized, original, names), str(candidate))
        record["measured"] += 1
        return measure(candidate)

    ranked = []
    for label, nodes in groups:
        alone = trial(nodes)
        ranked.append((gate.ratio(alone), label, nodes, alone))
    ranked.sort(key=lambda item: item[0])
    record["sensitivity"] = [{"group": label, "nodes": nodes, "gate_ratio_kept_in_float": round(ratio, 4)}
                             for ratio, label, nodes, _ in ranked]
    full_ratio = gate.ratio(parity)
    if scheme.attention:
        stages = [("int8", set(), ranked[:max(1, math.ceil(len(ranked) / 3))]),
                  ("weights-only", set(attention_products(original)), ranked)]
    else:  # weights-only already
        stages = [("weights-only", set(), ranked)]
    for stage, base, order in stages:
        kept: list[str] = []
        chosen = []
        candidates = [(None, None, [], None)] if base else []
        candidates += [(ratio, label, nodes, alone) for ratio, label, nodes, alone in order]
        for ratio, label, nodes, alone in candidates:
            kept += nodes
            if label is not None:
                chosen.append({"group": label, "nodes": nodes,
                               "why": f"its quantization hurt most: kept in float alone, the gate ratio went from "
                                      f"{full_ratio:.3g} to {ratio:.3g} (map error {alone.map_error:.3g}, patch "
                                      f"score error {alone.patch_error:.3g}, patch cosine {alone.patch_cos_mean:.4f})"})
            parity = trial(sorted(set(kept) | base))
            what = stage + (f" + {len(chosen)} group(s) in float" if chosen else "")
            report(f"int8: {what}: gate ratio {gate.ratio(parity):.3g} ({_failing(parity)})")
            if parity.passed:
                shutil.copyfile(candidate, target)
                record.update(result=what, kept_in_float=chosen, final=_figures(parity, gate),
                              attention_products_in_float=sorted(base))
                for item in chosen:
                    report(f"int8: kept in float: {item['group']} ({', '.join(item['nodes'])}): {item['why']}")
                if base:
                    report(f"int8: kept in float: the {len(base)} attention products (weights-only)")
                return record
    shutil.copyfile(candidate, target)
    record.update(result="none passed", final=_figures(parity, gate))
    return record


def calibrate_int8(folder: str | Path, images: Sequence[str], *, frames: int = 64, parity_frames: int = 16,
                   scheme: Int8Scheme = Int8Scheme(), stride: int = 1, max_pixels: int | None = None,
                   gate=None, command: str = "", threads: int | None = None, report=print,
                   accuracy_aware: bool = True):
    """Make, check and store the folder's int8 model (``visual_int8``) from frames of ``images``.

    ``accuracy_aware``: keep the quantized ops that hurt most in float until the gate passes
    (:func:`accuracy_aware_int8`). Returns (file name, manifest entry, parity figures); AnoclipError,
    with nothing written, for bad inputs or when no model passes ``gate`` (default:
    ``parity.DEFAULT_GATES["int8"]``).
    """
    import onnxruntime

    from anoclip.runtime.artifacts import read_manifest
    from anoclip.runtime.plumbing import ensure_writable_folder
    from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS

    from .derived import make_model, read_frames
    from .parity import DEFAULT_GATES

    onnx, _ = onnx_modules()
    if scheme.method not in METHODS:
        raise AnoclipError(f"unknown calibration method '{scheme.method}'; choose one of {', '.join(METHODS)}")
    manifest = read_manifest(folder)  # not an artifact folder: fail before reading any frame
    ensure_writable_folder(folder, "--artifacts")  # nor a folder it cannot store the model in
    split = read_frames(images, manifest, frames, parity_frames, stride,
                        DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    gate = gate or DEFAULT_GATES["int8"]
    search: dict = {}

    def build(source: Path, target: Path, measure) -> dict:
        if accuracy_aware:
            search.update(accuracy_aware_int8(source, target, split.calibration, scheme, measure, gate, report))
        else:
            quantize_int8(source, target, split.calibration, scheme)
        return qdq_structure(onnx.load(str(target)))

    provenance = {
        "images": [str(i) for i in images], "stride": stride, "method": scheme.method,
        "frames": {"read": split.read, "calibration": len(split.calibration), "parity": len(split.parity),
                   "parity_inputs": split.note(), "skipped": split.skipped},
        "quantizer": QUANTIZER, "quantizer_version": onnxruntime.__version__, "scheme": scheme.describe(),
        "accuracy_aware": search,  # filled by the build: what was kept in float and why
    }
    return make_model(folder, "int8", build, split, gate, provenance, command, threads, report)
