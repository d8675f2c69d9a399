"""Build the AnoCLIP+ test-time adaptation loop as one ONNX graph (``tta.onnx``).

The K optimisation steps are unrolled: each step is the adapter forward on [P, P + noise[k]],
the analytic gradients of the SPEC section 5 loss (the same formulas as ``anoclip.runtime.tta``)
and the AdamW update of weight and bias, with lr / betas / eps / weight decay baked as constants.
After the steps the graph computes the adapted tokens Phi(P) (no noise) and their abnormal
probabilities. Inputs and outputs are named in ``anoclip.runtime.tta.TTA_GRAPH_INPUTS`` /
``TTA_GRAPH_OUTPUTS``; :class:`anoclip.runtime.tta.OnnxTTARunner` runs the file.

Only operators that TensorRT's ONNX parser takes are used (Gemm, MatMul, elementwise arithmetic,
Tanh, Sigmoid, Exp, Log, Sqrt, Abs, Neg, Max, Relu, ReduceSum, ReduceMean, Concat, Split, Gather,
Transpose, Reshape, Greater, Cast, Pow, Shape); no loops, conditionals or sequences. Opset 17.
All inputs and outputs are float32 (the step count too), so no INT64 tensor crosses the graph's
boundary.

Build TensorRT engines of this graph in FP32 (no --fp16 / --bf16 for it): the gradients are of
the order of 1e-7 and Adam's eps is 1e-8, both below what half precision represents.
"""

from __future__ import annotations

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

__all__ = ["OPSET", "build_tta_graph", "write_tta_graph"]

logger = logging.getLogger(__name__)

OPSET = 17
_F = TensorProto.FLOAT


class _GraphBuilder:
    """Collects nodes and constant initialisers under unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: Any, dtype: Any = np.float32, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        if key not in self._consts:
            name = self._name(hint)
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        name = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=f"n_{name}", **attrs))
        return name

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n_{outs[0]}", **attrs))
        return outs

    # -- helpers ------------------------------------------------------------------------------
    def row_norm(self, x: str, eps: str) -> tuple[str, str]:
        """(|x_row| [R,1], max(|x_row|, eps) [R,1])."""
        ss = self.op("ReduceSum", self.op("Mul", x, x), self.const([1], np.int64), keepdims=1)
        r = self.op("Sqrt", ss)
        return r, self.op("Max", r, eps)

    def normalise(self, x: str, eps: str) -> str:
        _, D = self.row_norm(x, eps)
        return self.op("Div", x, D)

    def softplus(self, x: str) -> str:
        """log(1 + exp(x)) = relu(x) + log(1 + exp(-|x|)), stable for any x."""
        e = self.op("Exp", self.op("Neg", self.op("Abs", x)))
        return self.op("Add", self.op("Relu", x), self.op("Log", self.op("Add", e, self.const(1.0))))


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
    if kind == "text":
        K: int | str = num_prompts if num_prompts is not None else "N2"
    else:
        K = C
    g = _GraphBuilder()
    eps = g.const(cfg.norm_eps, hint="norm_eps")
    one = g.const(1.0)
    half = g.const(0.5)

    # ---- inputs ------------------------------------------------------------------------------
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

    P = "patch_tokens"
    # u = t- - t+ as a row [1, C] and a column [C, 1]
    t_pos = g.op("Gather", "text_features", g.const([0], np.int64), axis=0)
    t_neg = g.op("Gather", "text_features", g.const([1], np.int64), axis=0)
    u_row = g.op("Sub", t_neg, t_pos)
    u_col = g.op("Transpose", u_row, perm=[1, 0])
    T_half = g.op("Mul", "prompt_tokens", half) if kind == "text" else ""

    if num_patches is not None:
        inv_m = g.const(1.0 / num_patches)
    else:
        m_int = g.op("Gather", g.op("Shape", P), g.const(0, np.int64), axis=0)
        inv_m = g.op("Div", one, g.op("Cast", m_int, to=_F))

    P_half = g.op("Mul", P, half)
    Pn_clean = g.normalise(P, eps)

    def adapter_phi(Pn: str, P_half_rows: str, w: str, b: str) -> tuple[str, str]:
        z = g.op("Gemm", Pn, w, b, transB=1)
        if kind == "text":
            a = g.op("Tanh", z)
            return g.op("Add", g.op("MatMul", a, T_half), P_half_rows), a
        return g.op("Add", g.op("Mul", z, half), P_half_rows), z

    w, b = "weight", "bias"
    mw, vw, mb, vb = "m_weight", "v_weight", "m_bias", "v_bias"
    step0 = "step"
    decay = g.const(1.0 - lr * wd)
    c_b1 = g.const(1.0 - beta1)
    c_b2 = g.const(1.0 - beta2)
    beta1_c = g.const(beta1)
    beta2_c = g.const(beta2)
    adam_eps_c = g.const(adam_eps)
    lr_c = g.const(lr)

    def adamw(param: str, grad: str, m: str, v: str, bc1: str, bc2_sqrt: str) -> tuple[str, str, str]:
        param = g.op("Mul", param, decay) if wd != 0 else param
        m_new = g.op("Add", m, g.op("Mul", g.op("Sub", grad, m), c_b1))
        v_new = g.op("Add", g.op("Mul", v, beta2_c), g.op("Mul", g.op("Mul", grad, grad), c_b2))
        denom = g.op("Add", g.op("Div", g.op("Sqrt", v_new), bc2_sqrt), adam_eps_c)
        step_size = g.op("Div", lr_c, bc1)
        upd = g.op("Div", g.op("Mul", m_new, step_size), denom)
        return g.op("Sub", param, upd), m_new, v_new

    losses: list[str] = []
    for k in range(steps):
        delta = g.op("Gather", "noise", g.const(k, np.int64), axis=0)  # [M, C]
        noisy = g.op("Add", P, delta)
        Pn_noisy = g.normalise(noisy, eps)
        Pn_diff = g.op("Sub", Pn_noisy, Pn_clean)
        Pn = g.op("Concat", Pn_clean, Pn_noisy, axis=0)  # [2M, C]
        Ph = g.op("Concat", P_half, g.op("Mul", noisy, half), axis=0)
        phi, act = adapter_phi(Pn, Ph, w, b)
        r, D = g.row_norm(phi, eps)
        d = g.op("Div", g.op("MatMul", phi, u_col), D)  # [2M, 1]
        d_c, d_n = g.ops("Split", [d], 2, axis=0)
        pa_c = g.op("Sigmoid", d_c)
        pn_c = g.op("Sigmoid", g.op("Neg", d_c))
        pn_n = g.op("Sigmoid", g.op("Neg", d_n))
        # loss (diagnostic output)
        sp_c = g.softplus(d_c)
        spm_c = g.softplus(g.op("Neg", d_c))
        spm_n = g.softplus(g.op("Neg", d_n))
        ent = g.op("Add", g.op("Mul", pa_c, spm_c), g.op("Mul", pn_c, sp_c))
        nll = g.op("Add", g.op("ReduceMean", sp_c, axes=[0, 1], keepdims=1),
                   g.op("ReduceMean", spm_n, axes=[0, 1], keepdims=1))
        losses.append(g.op("Add", g.op("ReduceMean", ent, axes=[0, 1], keepdims=1), g.op("Mul", nll, half)))
        # dL/dd
        gd_c = g.op("Sub", g.op("Mul", pa_c, half), g.op("Mul", g.op("Mul", d_c, pa_c), pn_c))
        gd_n = g.op("Neg", g.op("Mul", pn_n, half))
        gd = g.op("Mul", g.op("Concat", gd_c, gd_n, axis=0), inv_m)
        # dL/dPhi = alpha * u - alpha * [r > eps] * d / D * Phi
        alpha = g.op("Div", gd, D)
        mask = g.op("Cast", g.op("Greater", r, eps), to=_F)
        beta = g.op("Div", g.op("Mul", g.op("Mul", alpha, d), mask), D)
        g_phi = g.op("Sub", g.op("Mul", alpha, u_row), g.op("Mul", beta, phi))
        # pair the clean and noisy rows before any reduction (see anoclip.runtime.tta):
        # dL/dw = S_Z^T Pn_clean + gZ_noisy^T (Pn_noisy - Pn_clean), S = clean + noisy
        g_phi_c, g_phi_n = g.ops("Split", [g_phi], 2, axis=0)
        s_phi = g.op("Add", g_phi_c, g_phi_n)
        if kind == "text":
            a_c, a_n = g.ops("Split", [act], 2, axis=0)
            s_a = g.op("Gemm", s_phi, T_half, transB=1)  # [M, 2N]
            g_a_n = g.op("Gemm", g_phi_n, T_half, transB=1)
            d_sq = g.op("Mul", g.op("Sub", a_c, a_n), g.op("Add", a_c, a_n))  # Ac^2 - An^2
            s_z = g.op("Add", g.op("Mul", s_a, g.op("Sub", one, g.op("Mul", a_c, a_c))),
                       g.op("Mul", g_a_n, d_sq))
            g_z_n = g.op("Mul", g_a_n, g.op("Sub", one, g.op("Mul", a_n, a_n)))
        else:
            s_z = g.op("Mul", s_phi, half)
            g_z_n = g.op("Mul", g_phi_n, half)
        g_w = g.op("Gemm", g_z_n, Pn_diff, g.op("Gemm", s_z, Pn_clean, transA=1), transA=1)  # [K, C]
        g_b = g.op("ReduceSum", s_z, g.const([0], np.int64), keepdims=0)  # [K]
        # AdamW (bias corrections from the running step count)
        s = g.op("Add", step0, g.const(float(k + 1)))
        bc1 = g.op("Sub", one, g.op("Pow", beta1_c, s))
        bc2_sqrt = g.op("Sqrt", g.op("Sub", one, g.op("Pow", beta2_c, s)))
        w, mw, vw = adamw(w, g_w, mw, vw, bc1, bc2_sqrt)
        b, mb, vb = adamw(b, g_b, mb, vb, bc1, bc2_sqrt)

    # ---- final clean forward --------------------------------------------------------------
    phi, _ = adapter_phi(Pn_clean, P_half, w, b)
    g.op("Identity", phi, out="adapted_tokens")
    _, D = g.row_norm(phi, eps)
    d = g.op("Div", g.op("MatMul", phi, u_col), D)
    g.op("Reshape", g.op("Sigmoid", d), g.const([-1], np.int64), out="abnormal_probs")
    for src, dst in ((w, "weight_out"), (b, "bias_out"), (mw, "m_weight_out"), (vw, "v_weight_out"),
                     (mb, "m_bias_out"), (vb, "v_bias_out")):
        g.op("Identity", src, out=dst)
    g.op("Add", step0, g.const(float(steps)), out="step_out")
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
