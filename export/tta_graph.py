"""Build the AnoCLIP+ test-time adaptation loop as one ONNX graph (``tta.onnx``).

The graph is not a second implementation: it is ``anoclip.runtime.tta.adapter.adapt`` (the
adapter forward, the analytic gradients of the SPEC section 5 loss, AdamW) evaluated on symbolic
tensors. :class:`Sym` turns the Python operators into ONNX nodes and :class:`GraphOps` provides the
rest of the op vocabulary, so the K steps come out unrolled with lr / betas / eps / weight decay
baked as constants. After the steps the graph computes the adapted tokens Phi(P) (no noise) and
their abnormal probabilities. Inputs and outputs are named in
``anoclip.runtime.tta.TTA_GRAPH_INPUTS`` / ``TTA_GRAPH_OUTPUTS``;
:class:`anoclip.runtime.tta.OnnxTTARunner` runs the file.

Only operators that TensorRT's ONNX parser takes are used (Gemm, MatMul, elementwise arithmetic,
Tanh, Sigmoid, Exp, Log, Sqrt, Abs, Neg, Max, Relu, ReduceSum, ReduceMean, Concat, Split, Gather,
Transpose, Reshape, Greater, Cast, Pow, Shape, Identity); no loops, conditionals or sequences. Opset 17.
All inputs and outputs are float32 (the step count too), so no INT64 tensor crosses the graph's
boundary.

Build TensorRT engines of this graph in FP32 (no --fp16 / --bf16 for it): the gradients are of
the order of 1e-7 and Adam's eps is 1e-8, both below what half precision represents.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from anoclip.runtime.plumbing import atomic_write_bytes
from anoclip.runtime.tta import (
    TTA_GRAPH_FORMAT_VERSION,
    TTA_GRAPH_INPUTS,
    TTA_GRAPH_OUTPUTS,
    TTA_METADATA_PREFIX,
    TTAConfig,
)
from anoclip.runtime.tta.adapter import adapt, logit_gap, prepare
from anoclip.runtime.tta.optim import adamw_update

__all__ = ["OPSET", "build_tta_graph", "write_tta_graph"]

logger = logging.getLogger(__name__)

OPSET = 17
_F = TensorProto.FLOAT


class _Graph:
    """Collects nodes and constant initialisers under unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            self._consts[key] = self._name("c")
            self.initializers.append(numpy_helper.from_array(arr, self._consts[key]))
        return self._consts[key]

    def _input(self, x: Any) -> str:
        if isinstance(x, Sym):
            return x.materialised
        return x if isinstance(x, str) else self.const(float(x))

    def op(self, op_type: str, *inputs: Any, out: str | None = None, n_out: int = 1, **attrs: Any) -> Any:
        """Add a node; returns its output as a Sym (a tuple of them when ``n_out`` > 1)."""
        outs = [out] if out else [self._name(op_type.lower()) for _ in range(n_out)]
        names = [self._input(x) for x in inputs]
        self.nodes.append(helper.make_node(op_type, names, outs, name=f"n_{outs[0]}", **attrs))
        syms = tuple(Sym(self, o) for o in outs)
        return syms if n_out > 1 else syms[0]


def _binary(op_type: str, reflected: bool = False) -> Any:
    def method(self: Sym, other: Any) -> Sym:
        return self.g.op(op_type, other, self) if reflected else self.g.op(op_type, self, other)

    return method


class Sym:
    """A float32 tensor of the graph under construction; Python operators add its nodes.

    ``.T`` is lazy: ``a @ b.T`` and ``a.T @ b`` become one Gemm with transB / transA.
    """

    def __init__(self, g: _Graph, name: str | None, transposed: Sym | None = None) -> None:
        self.g, self.name, self.transposed = g, name, transposed

    @property
    def materialised(self) -> str:
        if self.name is None:
            assert self.transposed is not None
            self.name = self.g.op("Transpose", self.transposed, perm=[1, 0]).name
        return self.name

    @property
    def T(self) -> Sym:
        return self.transposed if self.transposed is not None else Sym(self.g, None, self)

    def __matmul__(self, other: Sym) -> Sym:
        if self.transposed is None and other.transposed is None:
            return self.g.op("MatMul", self, other)
        a, b = (x.transposed if x.transposed is not None else x for x in (self, other))
        return self.g.op("Gemm", a, b, transA=int(self.transposed is not None),
                         transB=int(other.transposed is not None))

    def __pow__(self, exponent: float) -> Sym:
        return self.g.op("Sqrt", self) if exponent == 0.5 else self.g.op("Pow", self, exponent)

    def __neg__(self) -> Sym:
        return self.g.op("Neg", self)

    __add__, __radd__ = _binary("Add"), _binary("Add", True)
    __sub__, __rsub__ = _binary("Sub"), _binary("Sub", True)
    __mul__, __rmul__ = _binary("Mul"), _binary("Mul", True)
    __truediv__, __rtruediv__ = _binary("Div"), _binary("Div", True)
    __rpow__ = _binary("Pow", True)


class GraphOps:
    """The op vocabulary of ``anoclip.runtime.tta.adapter`` as ONNX nodes (see ``ArrayOps``)."""

    def __init__(self, g: _Graph, eps: float, num_patches: int | None) -> None:
        self.g, self.eps, self.num_patches = g, g.const(eps), num_patches

    def adamw(self, param: Sym, grad: Sym, m: Sym, v: Sym, step: Sym, config: TTAConfig) -> tuple[Sym, Sym, Sym]:
        return adamw_update(param, grad, m, v, step, config)

    def tanh(self, x: Sym) -> Sym:
        return self.g.op("Tanh", x)

    def sigmoid(self, x: Sym) -> Sym:
        return self.g.op("Sigmoid", x)

    def softplus(self, x: Sym) -> Sym:
        """relu(x) + log(1 + exp(-|x|)), stable for any x."""
        return self.g.op("Relu", x) + self.g.op("Log", self.g.op("Exp", -self.g.op("Abs", x)) + 1.0)

    def normalise(self, x: Sym) -> Sym:
        return x / self.row_norms(x)[1]

    def row_norms(self, x: Sym) -> tuple[Sym, Sym]:
        r = self.g.op("Sqrt", self.g.op("ReduceSum", x * x, self.g.const([1], np.int64), keepdims=1))
        return r, self.g.op("Max", r, self.eps)

    def above_eps(self, x: Sym) -> Sym:
        return self.g.op("Cast", self.g.op("Greater", x, self.eps), to=_F)

    def concat(self, a: Sym, b: Sym) -> Sym:
        return self.g.op("Concat", a, b, axis=0)

    def halves(self, x: Sym) -> tuple[Sym, Sym]:
        return self.g.op("Split", x, n_out=2, axis=0)

    def mean(self, x: Sym) -> Sym:
        return self.g.op("ReduceMean", x, axes=[0, 1], keepdims=1)

    def sum_rows(self, x: Sym) -> Sym:
        return self.g.op("ReduceSum", x, self.g.const([0], np.int64), keepdims=0)

    def row(self, x: Sym, i: int) -> Sym:
        return self.g.op("Gather", x, self.g.const([i], np.int64), axis=0)

    def take(self, x: Sym, k: int) -> Sym:
        return self.g.op("Gather", x, self.g.const(k, np.int64), axis=0)

    def inv_rows(self, x: Sym) -> Any:
        if self.num_patches is not None:
            return 1.0 / self.num_patches
        rows = self.g.op("Gather", self.g.op("Shape", x), self.g.const(0, np.int64), axis=0)
        return 1.0 / self.g.op("Cast", rows, to=_F)


def build_tta_graph(
    steps: int,
    config: TTAConfig | None = None,
    adapter: str | None = None,
    *,
    num_patches: int | None = None,
    embed_dim: int | None = None,
    num_prompts: int | None = None,
) -> onnx.ModelProto:
    """The unrolled TTA loop of ``steps`` steps as an ONNX model (float32, opset 17).

    ``adapter`` ("text" or "linear") defaults to ``config.adapter``. ``num_patches`` (M),
    ``embed_dim`` (C) and ``num_prompts`` (2N) fix those dimensions; left as None they stay
    symbolic, so one graph serves every backbone.
    """
    cfg = config if config is not None else TTAConfig()
    kind = adapter if adapter is not None else cfg.adapter
    if kind not in ("text", "linear"):
        raise ValueError(f"unknown TTA adapter {kind!r}; use 'text' or 'linear'")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"the TTA graph needs at least one step, got {steps!r}")
    steps = int(steps)
    lr, (beta1, beta2), adam_eps, wd = cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay
    M: int | str = num_patches if num_patches is not None else "M"
    C: int | str = embed_dim if embed_dim is not None else "C"
    K: int | str = (num_prompts if num_prompts is not None else "N2") if kind == "text" else C
    shapes: dict[str, list[int | str]] = {
        "patch_tokens": [M, C],
        "prompt_tokens": [K, C],
        "text_features": [2, C],
        "weight": [K, C],
        "bias": [K],
        "noise": [steps, M, C],
        "m_weight": [K, C],
        "v_weight": [K, C],
        "m_bias": [K],
        "v_bias": [K],
        "step": [],
    }
    input_names = [n for n in TTA_GRAPH_INPUTS if kind == "text" or n != "prompt_tokens"]
    inputs = [helper.make_tensor_value_info(n, _F, shapes[n]) for n in input_names]

    g = _Graph()
    ops = GraphOps(g, cfg.norm_eps, num_patches)
    sym = {n: Sym(g, n) for n in input_names}
    x = prepare(ops, sym["patch_tokens"], sym.get("prompt_tokens"), sym["text_features"])
    moments = tuple(sym[n] for n in ("m_weight", "v_weight", "m_bias", "v_bias"))
    phi, w, b, moments, losses = adapt(ops, x, sym["noise"], sym["weight"], sym["bias"], moments, sym["step"],
                                       dataclasses.replace(cfg, steps=steps))
    g.op("Identity", phi, out="adapted_tokens")
    g.op("Reshape", ops.sigmoid(logit_gap(ops, phi, x.u)[0]), g.const([-1], np.int64), out="abnormal_probs")
    for src, dst in zip((w, b, *moments), ("weight_out", "bias_out", "m_weight_out", "v_weight_out",
                                          "m_bias_out", "v_bias_out")):
        g.op("Identity", src, out=dst)
    g.op("Add", sym["step"], float(steps), out="step_out")
    g.op("Reshape", g.op("Concat", *losses, axis=0), g.const([-1], np.int64), out="losses")

    out_shapes: dict[str, list[int | str]] = {
        "adapted_tokens": [M, C],
        "abnormal_probs": [M],
        "weight_out": [K, C],
        "bias_out": [K],
        "m_weight_out": [K, C],
        "v_weight_out": [K, C],
        "m_bias_out": [K],
        "v_bias_out": [K],
        "step_out": [],
        "losses": [steps],
    }
    outputs = [helper.make_tensor_value_info(n, _F, out_shapes[n]) for n in TTA_GRAPH_OUTPUTS]
    graph = helper.make_graph(g.nodes, f"anoclip_tta_{kind}_{steps}", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="anoclip.export.tta_graph"
    )
    model.ir_version = min(model.ir_version, 8)  # opset 17 needs IR 8; keeps older runtimes happy
    p = TTA_METADATA_PREFIX
    meta = {
        p + "format_version": TTA_GRAPH_FORMAT_VERSION,
        p + "steps": str(steps),
        p + "adapter": kind,
        p + "lr": repr(float(lr)),
        p + "beta1": repr(float(beta1)),
        p + "beta2": repr(float(beta2)),
        p + "eps": repr(float(adam_eps)),
        p + "weight_decay": repr(float(wd)),
        p + "norm_eps": repr(float(cfg.norm_eps)),
    }
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    logger.debug("TTA graph: %d steps, %s adapter, %d nodes", steps, kind, len(g.nodes))
    return model


def write_tta_graph(
    path: str | os.PathLike[str],
    steps: int | None = None,
    config: TTAConfig | None = None,
    adapter: str | None = None,
    **dims: int | None,
) -> Path:
    """Build the graph and write it atomically (temp file in the same folder + os.replace).

    ``steps`` defaults to ``config.steps``; ``dims`` are ``build_tta_graph``'s fixed dimensions.
    """
    cfg = config if config is not None else TTAConfig()
    model = build_tta_graph(steps if steps is not None else cfg.steps, cfg, adapter, **dims)
    dest = Path(path)
    atomic_write_bytes(dest, model.SerializeToString())
    logger.info("wrote %s (%s)", dest, model.graph.name)
    return dest
