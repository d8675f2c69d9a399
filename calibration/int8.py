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

onnxruntime on the CPU runs a Q/DQ MatMul as an integer product (MatMulIntegerToFloat) only when
its graph optimiser does not first fuse the MatMul with the bias Add into a float Gemm: an InferenceSession
for this model needs ``optimization.disable_specified_optimizers = MatMulAddFusion`` (2.65x
faster than fp32 on ViT-B-16-plus-240 with it, slower than fp32 without it).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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


def calibrate_int8(folder: str | Path, images: Sequence[str], *, frames: int = 64, parity_frames: int = 16,
                   scheme: Int8Scheme = Int8Scheme(), stride: int = 1, max_pixels: int | None = None,
                   gate=None, command: str = "", threads: int | None = None, report=print):
    """Make, check and store the folder's int8 model (``visual_int8``) from frames of ``images``.

    Returns (file name, manifest entry, parity figures); AnoclipError, with nothing written, for bad
    inputs or when the figures fall below ``gate`` (default: ``parity.DEFAULT_GATES["int8"]``).
    """
    import onnxruntime

    from anoclip.runtime.artifacts import read_manifest
    from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS

    from .derived import make_model, read_frames
    from .parity import DEFAULT_GATES

    onnx, _ = onnx_modules()
    if scheme.method not in METHODS:
        raise AnoclipError(f"unknown calibration method '{scheme.method}'; choose one of {', '.join(METHODS)}")
    manifest = read_manifest(folder)  # not an artifact folder: fail before reading any frame
    split = read_frames(images, manifest, frames, parity_frames, stride,
                        DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)

    def build(source: Path, target: Path) -> dict:
        quantize_int8(source, target, split.calibration, scheme)
        return qdq_structure(onnx.load(str(target)))

    provenance = {
        "images": [str(i) for i in images], "stride": stride, "method": scheme.method,
        "frames": {"read": split.read, "calibration": len(split.calibration), "parity": len(split.parity),
                   "parity_inputs": split.note()},
        "quantizer": QUANTIZER, "quantizer_version": onnxruntime.__version__, "scheme": scheme.describe(),
    }
    return make_model(folder, "int8", build, split, gate or DEFAULT_GATES["int8"], provenance, command, threads, report)
