"""Test-time adaptation (AnoCLIP+, SPEC section 5) in plain array code.

The adapter loop is written once against a small array namespace so that numpy (CPU) and cupy
(GPU, where installed) both run it. There is no autograd: the forward pass, the gradients of the
loss with respect to the adapter parameters and the AdamW update are all explicit.

Adapters (``TTAConfig.adapter``):

* ``"text"`` (default, SPEC eq. 9)::

      Phi(P) = 0.5 * P + 0.5 * tanh(normalise_rows(P) @ w.T + b) @ T      # w [2N,C], b [2N]

* ``"linear"`` (the authors' VisA script, the paper's "linear probe")::

      Phi(P) = 0.5 * P + 0.5 * (normalise_rows(P) @ W.T + b)               # W [C,C], b [C]

Loss for one step, with a fresh perturbation ``delta`` (std 0.055) of the unnormalised tokens::

      X = normalise_rows(Phi([P, P + delta]))
      d = X @ (t- - t+)                       # logit difference, so p_abnormal = sigmoid(d)
      L = mean_i H(p_clean_i) + 0.5 * mean_i [-log p_clean_i(normal) - log p_noisy_i(abnormal)]

Gradients (derived by hand; ``m`` = number of patch tokens, ``p = sigmoid(d)``, ``q = 1 - p``)::

      dL/dd_clean = (-d * p * q + 0.5 * p) / m      # entropy (both factors) + pseudo-label NLL
      dL/dd_noisy = -0.5 * q / m                    # noisy tokens pushed towards "abnormal"
      dL/dPhi     = (dL/dd / D) * (u - [r > eps] * d * X)     # u = t- - t+, r = |Phi|, D = max(r, eps)
      dL/dA       = dL/dPhi @ (0.5 T).T ;  dL/dZ = dL/dA * (1 - A^2)     # A = tanh(Z)
      dL/dw       = dL/dZ.T @ normalise_rows(batch) ;  dL/db = sum_rows(dL/dZ)

The clean and noisy halves of the batch pull in nearly opposite directions and the entropy and
pseudo-label terms cancel to first order, so the true gradient is ~1e-4 of the terms it is summed
from. Evaluated naively in float32 (as torch autograd does) it is only good to ~1e-4. The
reductions here first pair each clean row with its noisy twin (S = clean + noisy, written so that
no large terms cancel inside a sum)::

      dL/dw = S_Z.T @ Pn_clean + dZ_noisy.T @ (Pn_noisy - Pn_clean),   dL/db = sum_rows(S_Z)
      S_Z   = (S_Phi @ (0.5 T).T) * (1 - A_c^2) + dA_noisy * (A_c - A_n) * (A_c + A_n)

which costs the same matrix products and keeps float32 within ~2e-6 of float64.

AdamW follows ``torch.optim.AdamW`` (single-tensor path) operation by operation: decoupled decay
``param *= 1 - lr * wd``, ``m += (1 - b1) (g - m)``, ``v = b2 v + (1 - b2) g^2``, bias corrections
computed in double precision from the step count, ``param -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)``.

Randomness only enters through an explicit ``numpy.random.Generator`` (or a cupy one) or explicit
arrays; the draw order is: initial weight, initial bias, then the noise of all steps at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from types import ModuleType
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "AdapterKind",
    "AdamWState",
    "OnnxTTARunner",
    "TTA_GRAPH_FORMAT_VERSION",
    "TTA_GRAPH_INPUTS",
    "TTA_GRAPH_OUTPUTS",
    "TTA_METADATA_PREFIX",
    "TTAAdapter",
    "TTAConfig",
    "TTAResult",
    "abnormal_probs",
    "adamw_step",
    "adamw_update",
    "adapter_forward",
    "array_namespace",
    "draw_initial_params",
    "draw_noise",
    "loss_and_grads",
    "normalise_rows",
]

logger = logging.getLogger(__name__)

AdapterKind = Literal["text", "linear"]
Array = Any  # numpy.ndarray or cupy.ndarray

#: Input names of the TTA ONNX graph (``export/tta_graph.py`` builds it, :class:`OnnxTTARunner` runs it).
TTA_GRAPH_INPUTS: tuple[str, ...] = (
    "patch_tokens",  # [M, C]   unnormalised patch tokens P
    "prompt_tokens",  # [2N, C] T (text adapter only)
    "text_features",  # [2, C]  rows t+, t-
    "weight",  # [2N, C] or [C, C]  initial adapter weight
    "bias",  # [2N] or [C]          initial adapter bias
    "noise",  # [K, M, C]           perturbation added to P in each step (already scaled)
    "m_weight",
    "v_weight",
    "m_bias",
    "v_bias",
    "step",  # [] float32: optimiser steps taken before this call
)
#: Output names of the TTA ONNX graph.
TTA_GRAPH_OUTPUTS: tuple[str, ...] = (
    "adapted_tokens",  # [M, C]  Phi(P) after the K steps, unnormalised, no noise
    "abnormal_probs",  # [M]     p_abnormal of the adapted tokens
    "weight_out",
    "bias_out",
    "m_weight_out",
    "v_weight_out",
    "m_bias_out",
    "v_bias_out",
    "step_out",  # []
    "losses",  # [K] loss of each step (before its update)
)
#: Prefix of the metadata keys the graph carries (steps, adapter, optimiser constants).
TTA_METADATA_PREFIX = "anoclip.tta."
TTA_GRAPH_FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------
# configuration and state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTAConfig:
    """Settings of the AnoCLIP+ adapter loop (defaults = the authors' code, SPEC section 5).

    ``init``: ``"random"`` draws weight and bias uniformly in +-1/sqrt(C) for every image, like
    ``torch.nn.Linear``'s default (authors' code); ``"prompts"`` starts the text adapter's weight
    from T with a zero bias (the paper's text).
    ``state_policy``: ``"persistent"`` keeps one AdamW state (moments and step count) across images
    while the parameters are re-drawn per image (authors' code); ``"fresh"`` starts every image
    from a new optimiser state.
    """

    steps: int = 5
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    noise_std: float = 0.055
    adapter: AdapterKind = "text"
    init: Literal["random", "prompts"] = "random"
    state_policy: Literal["persistent", "fresh"] = "persistent"
    seed: int | None = None
    norm_eps: float = 1e-12  # as torch.nn.functional.normalize

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"TTA steps must be a non-negative integer, got {self.steps!r}")
        if self.adapter not in ("text", "linear"):
            raise ValueError(f"unknown TTA adapter {self.adapter!r}; use 'text' or 'linear'")
        if self.init not in ("random", "prompts"):
            raise ValueError(f"unknown TTA init {self.init!r}; use 'random' or 'prompts'")
        if self.init == "prompts" and self.adapter != "text":
            raise ValueError("init='prompts' needs the 'text' adapter (the linear adapter has no T)")
        if self.state_policy not in ("persistent", "fresh"):
            raise ValueError(
                f"unknown TTA state policy {self.state_policy!r}; use 'persistent' or 'fresh'"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TTA betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr < 0 or self.eps < 0 or self.weight_decay < 0 or self.noise_std < 0:
            raise ValueError("TTA lr, eps, weight_decay and noise_std must be non-negative")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))


@dataclass
class AdamWState:
    """AdamW moments of the adapter weight and bias, and the number of steps taken."""

    m_weight: Array
    v_weight: Array
    m_bias: Array
    v_bias: Array
    step: int = 0

    @classmethod
    def zeros(
        cls,
        weight_shape: Sequence[int],
        bias_shape: Sequence[int],
        *,
        xp: ModuleType = np,
        dtype: Any = np.float32,
    ) -> AdamWState:
        return cls(
            m_weight=xp.zeros(tuple(weight_shape), dtype=dtype),
            v_weight=xp.zeros(tuple(weight_shape), dtype=dtype),
            m_bias=xp.zeros(tuple(bias_shape), dtype=dtype),
            v_bias=xp.zeros(tuple(bias_shape), dtype=dtype),
            step=0,
        )

    def copy(self) -> AdamWState:
        return AdamWState(
            self.m_weight.copy(),
            self.v_weight.copy(),
            self.m_bias.copy(),
            self.v_bias.copy(),
            int(self.step),
        )


@dataclass
class TTAResult:
    """Everything one adapted image produces."""

    tokens: Array  # [M, C] Phi(P), unnormalised, computed without noise
    probs: Array  # [M] p_abnormal of the adapted tokens
    weight: Array  # final adapter weight
    bias: Array  # final adapter bias
    losses: Array  # [steps] loss of each step, evaluated before its update
    state: AdamWState = field(repr=False)  # optimiser state after the image


# --------------------------------------------------------------------------------------------
# array namespace and small numerics
# --------------------------------------------------------------------------------------------


def array_namespace(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a cupy array, else ``numpy``."""
    for a in arrays:
        if a is not None and type(a).__module__.split(".", 1)[0] == "cupy":
            import cupy  # optional dependency

            return cupy
    return np


def _float_dtype(xp: ModuleType, a: Array) -> Any:
    dt = a.dtype
    if dt in (xp.float32, xp.float64):
        return dt
    return xp.float32


def _row_norms(x: Array, xp: ModuleType) -> Array:
    """Euclidean norm of each row, without overflow for huge entries."""
    ss = xp.einsum("ij,ij->i", x, x)
    r = xp.sqrt(ss)
    if xp is np:
        bad = ~np.isfinite(r)
        if bad.any():
            rows = x[bad]
            scale = np.max(np.abs(rows), axis=1)
            safe = np.where(scale > 0, scale, 1).astype(x.dtype)
            scaled = rows / safe[:, None]
            r[bad] = np.sqrt(np.einsum("ij,ij->i", scaled, scaled)) * safe
    else:  # avoid a device sync: compute the scaled norm where the plain one overflowed
        scale = xp.max(xp.abs(x), axis=1)
        safe = xp.where(scale > 0, scale, 1).astype(x.dtype)
        scaled = x / safe[:, None]
        r = xp.where(xp.isfinite(r), r, xp.sqrt(xp.einsum("ij,ij->i", scaled, scaled)) * safe)
    return r


def normalise_rows(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(|x_row|, eps)`` (torch.nn.functional.normalize semantics)."""
    xp = array_namespace(x)
    return x / xp.maximum(_row_norms(x, xp), eps)[:, None]


def _sigmoid_pair(d: Array, xp: ModuleType) -> tuple[Array, Array, Array]:
    """(sigmoid(d), sigmoid(-d), log1p(exp(-|d|))) computed without overflow or cancellation."""
    e = xp.exp(-xp.abs(d))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = d >= 0
    return xp.where(pos, big, small), xp.where(pos, small, big), xp.log1p(e)


def _probs_from_u(tokens: Array, u: Array, eps: float, xp: ModuleType) -> Array:
    d = (tokens @ u) / xp.maximum(_row_norms(tokens, xp), eps)
    return _sigmoid_pair(d, xp)[0]


def abnormal_probs(tokens: Array, text_features: Array, eps: float = 1e-12) -> Array:
    """``softmax([cos(x, t+), cos(x, t-)])[1]`` per row of ``tokens`` (temperature 1)."""
    xp = array_namespace(tokens, text_features)
    tf = xp.asarray(text_features, dtype=tokens.dtype)
    return _probs_from_u(tokens, tf[1] - tf[0], eps, xp)


def _loss_and_dd(d: Array, m: int, xp: ModuleType) -> tuple[Array, Array]:
    """Loss and dL/dd for the stacked logit differences ``d = [d_clean (m), d_noisy (m)]``."""
    dc, dn = d[:m], d[m:]
    pa_c, pn_c, lc = _sigmoid_pair(dc, xp)
    _, pn_n, ln = _sigmoid_pair(dn, xp)
    sp_c = xp.maximum(dc, 0) + lc  # -log p_clean(normal)   = softplus(d)
    spm_c = xp.maximum(-dc, 0) + lc  # -log p_clean(abnormal) = softplus(-d)
    spm_n = xp.maximum(-dn, 0) + ln  # -log p_noisy(abnormal)
    entropy = pa_c * spm_c + pn_c * sp_c
    loss = xp.mean(entropy) + 0.5 * (xp.mean(sp_c) + xp.mean(spm_n))
    g = xp.empty_like(d)
    inv_m = 1.0 / m
    g[:m] = (0.5 * pa_c - dc * pa_c * pn_c) * inv_m
    g[m:] = (-0.5 * inv_m) * pn_n
    return loss, g


# --------------------------------------------------------------------------------------------
# the engine: constants of one (T, text features) pair plus work buffers
# --------------------------------------------------------------------------------------------


class _Engine:
    """Forward/backward of the adapter for one set of prompts, with reusable buffers."""

    def __init__(
        self,
        T: Array | None,
        text_features: Array,
        adapter: AdapterKind,
        dtype: Any,
        xp: ModuleType,
        norm_eps: float,
    ) -> None:
        self.xp = xp
        self.dtype = dtype
        self.adapter = adapter
        self.norm_eps = float(norm_eps)
        tf = xp.asarray(text_features, dtype=dtype)
        if tf.ndim != 2 or tf.shape[0] != 2:
            raise ValueError(f"text_features must be [2, C] (rows t+, t-), got {tuple(tf.shape)}")
        self.C = int(tf.shape[1])
        self.u = xp.ascontiguousarray(tf[1] - tf[0])
        if adapter == "text":
            if T is None:
                raise ValueError("the 'text' adapter needs the prompt embeddings T [2N, C]")
            Tx = xp.asarray(T, dtype=dtype)
            if Tx.ndim != 2 or Tx.shape[1] != self.C:
                raise ValueError(f"T must be [2N, {self.C}], got {tuple(Tx.shape)}")
            # 0.5 * (A @ T) == A @ (0.5 * T) exactly (power-of-two scaling).
            self.T_half = xp.ascontiguousarray(Tx * 0.5)
            self.K = int(Tx.shape[0])
        elif adapter == "linear":
            self.T_half = None
            self.K = self.C
        else:
            raise ValueError(f"unknown TTA adapter {adapter!r}")
        self._M = -1

    # shapes of the parameters
    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.K, self.C)

    @property
    def bias_shape(self) -> tuple[int]:
        return (self.K,)

    def check_params(self, weight: Array, bias: Array) -> None:
        if tuple(weight.shape) != self.weight_shape or tuple(bias.shape) != self.bias_shape:
            raise ValueError(
                f"adapter parameters must be weight {self.weight_shape} and bias {self.bias_shape}, "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )

    def _alloc(self, M: int) -> None:
        if M == self._M:
            return
        xp, dt, C, K = self.xp, self.dtype, self.C, self.K
        self.half_batch = xp.empty((2 * M, C), dtype=dt)  # 0.5 * [P, P + delta]
        self.norm_batch = xp.empty((2 * M, C), dtype=dt)  # normalise_rows([P, P + delta])
        self.rhs = xp.empty((2 * M, C), dtype=dt)  # [Pn_clean, Pn_noisy - Pn_clean]
        self.noisy = xp.empty((M, C), dtype=dt)
        self.Z = xp.empty((2 * M, K), dtype=dt)  # pre-activation, then tanh in place
        self.phi = xp.empty((2 * M, C), dtype=dt)  # Phi, then dL/dPhi in place
        if self.adapter == "text":
            self.gA = xp.empty((2 * M, K), dtype=dt)
            self.aux1 = xp.empty((M, K), dtype=dt)
            self.aux2 = xp.empty((M, K), dtype=dt)
        self.gW = xp.empty((K, C), dtype=dt)
        self.gb = xp.empty((K,), dtype=dt)
        self._M = M

    @property
    def scratch(self) -> Array:
        """Work array of the weight's shape for the optimiser."""
        if getattr(self, "_scratch", None) is None:
            self._scratch = self.xp.empty((self.K, self.C), dtype=self.dtype)
        return self._scratch

    def load(self, P: Array) -> None:
        """Set the clean half of the batch (constant over the steps of one image)."""
        xp = self.xp
        M = int(P.shape[0])
        self._alloc(M)
        self.M = M
        self.P = P
        xp.multiply(P, 0.5, out=self.half_batch[:M])
        r = xp.maximum(_row_norms(P, xp), self.norm_eps)
        xp.divide(P, r[:, None], out=self.norm_batch[:M])
        self.rhs[:M] = self.norm_batch[:M]

    def set_noise(self, delta: Array) -> None:
        xp, M = self.xp, self.M
        xp.add(self.P, delta, out=self.noisy)
        r = xp.maximum(_row_norms(self.noisy, xp), self.norm_eps)
        xp.divide(self.noisy, r[:, None], out=self.norm_batch[M:])
        xp.multiply(self.noisy, 0.5, out=self.half_batch[M:])
        xp.subtract(self.norm_batch[M:], self.norm_batch[:M], out=self.rhs[M:])

    def _phi(self, weight: Array, bias: Array, rows: int) -> Array:
        """Phi of the first ``rows`` rows of the batch into ``self.phi[:rows]``."""
        xp = self.xp
        Z = self.Z[:rows]
        phi = self.phi[:rows]
        xp.matmul(self.norm_batch[:rows], weight.T, out=Z)
        Z += bias
        if self.adapter == "text":
            xp.tanh(Z, out=Z)
            xp.matmul(Z, self.T_half, out=phi)
        else:
            xp.multiply(Z, 0.5, out=phi)
        phi += self.half_batch[:rows]
        return phi

    def loss_grads(self, weight: Array, bias: Array) -> tuple[Array, Array, Array]:
        """Loss and gradients (views into work buffers) for the loaded clean+noisy batch.

        The clean and noisy halves pull in nearly opposite directions, so their gradient
        contributions are paired BEFORE the reductions: with S = g_clean + g_noisy row by row,
        dL/dw = S_Z^T Pn_clean + gZ_noisy^T (Pn_noisy - Pn_clean). Same FLOPs, but each
        reduction sums small terms, which keeps float32 gradients ~50x closer to the exact ones.
        """
        xp, M, dt = self.xp, self.M, self.dtype
        phi = self._phi(weight, bias, 2 * M)
        r = _row_norms(phi, xp)
        D = xp.maximum(r, self.norm_eps)
        d = (phi @ self.u) / D
        loss, g_d = _loss_and_dd(d, M, xp)
        alpha = g_d / D
        # dL/dPhi = alpha * (u - [r > eps] * d * Phi / D), built in place in the phi buffer
        proj = xp.where(r > self.norm_eps, d / D, 0).astype(dt)
        phi *= -proj[:, None]
        phi += self.u
        phi *= alpha[:, None]
        phi[:M] += phi[M:]  # S_phi = dL/dPhi_clean + dL/dPhi_noisy
        if self.adapter == "text":
            gA = self.gA
            xp.matmul(phi, self.T_half.T, out=gA)  # [S_A ; gA_noisy]
            Ac, An = self.Z[:M], self.Z[M:]
            SA, gAn = gA[:M], gA[M:]
            # S_Z = S_A (1 - Ac^2) + gA_noisy (Ac - An)(Ac + An);  gZ_noisy = gA_noisy (1 - An^2)
            a1, a2 = self.aux1, self.aux2
            xp.subtract(Ac, An, out=a1)
            xp.add(Ac, An, out=a2)
            a1 *= a2
            a1 *= gAn
            for Arow, g in ((Ac, SA), (An, gAn)):
                xp.multiply(Arow, Arow, out=a2)
                xp.subtract(1, a2, out=a2)
                g *= a2
            SA += a1
            gZ = gA
        else:
            gZ = phi
            gZ *= 0.5
        xp.matmul(gZ.T, self.rhs, out=self.gW)
        xp.sum(gZ[:M], axis=0, out=self.gb)
        return loss, self.gW, self.gb

    def clean_forward(self, weight: Array, bias: Array) -> Array:
        """Phi(P) of the loaded clean tokens (a new array)."""
        return self._phi(weight, bias, self.M).copy()


def _engine_for(
    P: Array, T: Array | None, text_features: Array, adapter: str, norm_eps: float
) -> tuple[_Engine, Array]:
    xp = array_namespace(P, T, text_features)
    P = xp.asarray(P)
    dtype = _float_dtype(xp, P)
    P = xp.ascontiguousarray(P, dtype=dtype)
    eng = _Engine(T, text_features, adapter, dtype, xp, norm_eps)  # type: ignore[arg-type]
    if P.ndim != 2 or P.shape[1] != eng.C:
        raise ValueError(f"patch tokens must be [M, {eng.C}], got {tuple(P.shape)}")
    eng.load(P)
    return eng, P


# --------------------------------------------------------------------------------------------
# pure functions
# --------------------------------------------------------------------------------------------


def adapter_forward(
    P: Array,
    weight: Array,
    bias: Array,
    T: Array | None = None,
    *,
    adapter: AdapterKind = "text",
    norm_eps: float = 1e-12,
) -> Array:
    """Phi(P) [M, C] (unnormalised) for one image's patch tokens ``P`` [M, C]."""
    xp = array_namespace(P, weight, bias, T)
    C = int(xp.asarray(P).shape[-1])
    dummy_tf = xp.zeros((2, C), dtype=_float_dtype(xp, xp.asarray(P)))
    eng, _ = _engine_for(P, T, dummy_tf, adapter, norm_eps)
    w = xp.asarray(weight, dtype=eng.dtype)
    b = xp.asarray(bias, dtype=eng.dtype)
    eng.check_params(w, b)
    return eng.clean_forward(w, b)


def loss_and_grads(
    P: Array,
    weight: Array,
    bias: Array,
    T: Array | None,
    text_features: Array,
    noise: Array,
    *,
    adapter: AdapterKind = "text",
    norm_eps: float = 1e-12,
) -> tuple[Array, Array, Array]:
    """Loss of one TTA step and its analytic gradients.

    ``noise`` is the perturbation ``delta`` [M, C] added to ``P`` for the noisy half (already
    scaled by the noise std). Returns ``(loss, grad_weight, grad_bias)``; ``loss`` is a 0-d array
    of the input's namespace (call ``float()`` on it), the gradients are new arrays.
    """
    eng, P = _engine_for(P, T, text_features, adapter, norm_eps)
    xp = eng.xp
    w = xp.asarray(weight, dtype=eng.dtype)
    b = xp.asarray(bias, dtype=eng.dtype)
    eng.check_params(w, b)
    delta = xp.asarray(noise, dtype=eng.dtype)
    if tuple(delta.shape) != tuple(P.shape):
        raise ValueError(f"noise must have the shape of P {tuple(P.shape)}, got {tuple(delta.shape)}")
    eng.set_noise(delta)
    loss, gw, gb = eng.loss_grads(w, b)
    return loss, gw.copy(), gb.copy()


def adamw_update(
    param: Array,
    grad: Array,
    m: Array,
    v: Array,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scratch: Array | None = None,
) -> None:
    """One AdamW update of one tensor IN PLACE (``param``, ``m``, ``v``), as torch applies it.

    ``step`` is the step count AFTER incrementing (1 for the first update). ``scratch`` is an
    optional work array of the parameter's shape and dtype (saves two allocations).
    """
    xp = array_namespace(param)
    beta1, beta2 = betas
    tmp = xp.empty_like(param) if scratch is None else scratch
    if weight_decay != 0:
        param *= 1.0 - lr * weight_decay
    xp.subtract(grad, m, out=tmp)
    tmp *= 1.0 - beta1
    m += tmp  # m.lerp_(g, 1 - beta1)
    v *= beta2
    xp.multiply(grad, 1.0 - beta2, out=tmp)
    tmp *= grad
    v += tmp  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bias_correction1
    xp.sqrt(v, out=tmp)
    tmp /= bias_correction2_sqrt
    tmp += eps  # denom
    xp.divide(m, tmp, out=tmp)
    tmp *= step_size
    param -= tmp  # param.addcdiv_(m, denom, value=-step_size)


def adamw_step(
    weight: Array,
    bias: Array,
    grad_weight: Array,
    grad_bias: Array,
    state: AdamWState,
    config: TTAConfig,
    *,
    inplace: bool = False,
    scratch: Array | None = None,
) -> tuple[Array, Array, AdamWState]:
    """AdamW step on (weight, bias). Returns ``(weight, bias, state)``; with ``inplace=False`` the
    inputs are left untouched and new arrays are returned. ``scratch``: optional work array of the
    weight's shape and dtype."""
    if not inplace:
        weight, bias, state = weight.copy(), bias.copy(), state.copy()
    state.step = int(state.step) + 1
    kw = {"lr": config.lr, "betas": config.betas, "eps": config.eps, "weight_decay": config.weight_decay}
    adamw_update(
        weight, grad_weight, state.m_weight, state.v_weight, state.step, scratch=scratch, **kw
    )
    adamw_update(bias, grad_bias, state.m_bias, state.v_bias, state.step, **kw)
    return weight, bias, state


def draw_initial_params(
    rng: Any,
    *,
    weight_shape: tuple[int, int],
    dtype: Any = np.float32,
    init: str = "random",
    T: Array | None = None,
    xp: ModuleType = np,
) -> tuple[Array, Array]:
    """Initial adapter (weight, bias).

    ``"random"``: uniform in +-1/sqrt(C) for both (torch.nn.Linear default; C = fan-in), drawn from
    ``rng`` (weight first, then bias). ``"prompts"``: weight = T, bias = 0 (``rng`` unused).
    """
    K, C = int(weight_shape[0]), int(weight_shape[1])
    if init == "prompts":
        if T is None:
            raise ValueError("init='prompts' needs T")
        return xp.array(T, dtype=dtype, copy=True), xp.zeros((K,), dtype=dtype)
    if init != "random":
        raise ValueError(f"unknown TTA init {init!r}")
    if rng is None:
        raise ValueError("a random initialisation needs a generator (rng) or explicit init arrays")
    bound = 1.0 / math.sqrt(C)
    w = rng.random((K, C), dtype=dtype)
    b = rng.random((K,), dtype=dtype)
    w = xp.asarray(w)
    b = xp.asarray(b)
    w *= 2 * bound
    w -= bound
    b *= 2 * bound
    b -= bound
    return w, b


def draw_noise(
    rng: Any, steps: int, M: int, C: int, std: float, *, dtype: Any = np.float32, xp: ModuleType = np
) -> Array:
    """Perturbations ``delta`` [steps, M, C], Gaussian with mean 0 and the given std."""
    if rng is None:
        raise ValueError("noise needs a generator (rng) or an explicit noise array")
    n = xp.asarray(rng.standard_normal((steps, M, C), dtype=dtype))
    n *= std
    return n


# --------------------------------------------------------------------------------------------
# the adapter with its persistent optimiser state
# --------------------------------------------------------------------------------------------


def _default_rng(xp: ModuleType, seed: int | None) -> Any:
    if xp is np:
        return np.random.default_rng(seed)
    return xp.random.default_rng(seed)


class _AdapterLoop:
    """What both adapter loops share: drawing or checking the inputs of one image, the
    optimiser-state policy, ``adapt`` and ``reset``. Subclasses set ``config``, ``rng``, ``xp``,
    ``dtype``, ``_T`` and ``weight_shape``, and implement ``run``."""

    config: TTAConfig
    xp: ModuleType
    dtype: Any
    _T: Array | None
    rng: Any
    state: AdamWState | None
    last: TTAResult | None

    @property
    def weight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the optimiser state (the next image starts from step 0)."""
        self.state = None
        self.last = None

    def initial_params(self, rng: Any = None) -> tuple[Array, Array]:
        """Draw initial (weight, bias) as :meth:`run` does when ``init`` is not given."""
        return draw_initial_params(rng if rng is not None else self.rng, weight_shape=self.weight_shape,
                                   dtype=self.dtype, init=self.config.init, T=self._T, xp=self.xp)

    def _prepare(self, P: Array, init: tuple[Array, Array] | None, noise: Array | None,
                 rng: Any) -> tuple[Array, Array, Array, Array, AdamWState]:
        """(P, weight, bias, noise, state) for one image: given arrays are checked and cast, the
        rest drawn from ``rng`` (default: the adapter's own generator, seeded by config.seed)."""
        xp, cfg = self.xp, self.config
        K, C = (int(n) for n in self.weight_shape)
        P = xp.ascontiguousarray(xp.asarray(P), dtype=self.dtype)
        if P.ndim != 2 or P.shape[1] != C:
            raise ValueError(f"patch tokens must be [M, {C}], got {tuple(P.shape)}")
        M = int(P.shape[0])
        gen = rng if rng is not None else self.rng
        if init is None:
            weight, bias = self.initial_params(gen)
        else:
            weight = xp.array(init[0], dtype=self.dtype, copy=True)
            bias = xp.array(init[1], dtype=self.dtype, copy=True)
        if tuple(weight.shape) != (K, C) or tuple(bias.shape) != (K,):
            raise ValueError(f"adapter parameters must be weight {(K, C)} and bias {(K,)}, "
                             f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
        if noise is None:
            noise = draw_noise(gen, cfg.steps, M, C, cfg.noise_std, dtype=self.dtype, xp=xp)
        noise = xp.ascontiguousarray(xp.asarray(noise), dtype=self.dtype)
        if tuple(noise.shape) != (cfg.steps, M, C):
            raise ValueError(f"noise must be [steps, M, C] = {(cfg.steps, M, C)}, got {tuple(noise.shape)}")
        if self.state is None or cfg.state_policy == "fresh":
            self.state = AdamWState.zeros((K, C), (K,), xp=xp, dtype=self.dtype)
        return P, weight, bias, noise, self.state

    def run(self, P: Array, *, init: tuple[Array, Array] | None = None, noise: Array | None = None,
            rng: Any = None) -> TTAResult:
        """Adapt to one image's patch tokens ``P`` [M, C] and return everything it produced.

        ``init``: explicit initial (weight, bias), else drawn (config.init). ``noise``: explicit
        perturbations [steps, M, C] (already scaled), else drawn with std config.noise_std.
        ``rng``: generator for what is drawn (default: the adapter's own, seeded by config.seed).
        """
        self.last = self._steps(*self._prepare(P, init, noise, rng))
        return self.last

    def _steps(self, P: Array, weight: Array, bias: Array, noise: Array, state: AdamWState) -> TTAResult:
        raise NotImplementedError

    def adapt(self, P: Array, *, init: tuple[Array, Array] | None = None, noise: Array | None = None,
              rng: Any = None) -> Array:
        """Adapted patch tokens Phi(P) [M, C] (unnormalised, without noise) after the steps."""
        return self.run(P, init=init, noise=noise, rng=rng).tokens


class TTAAdapter(_AdapterLoop):
    """AnoCLIP+ adapter for one class / stream, holding its AdamW state between images.

    ``T`` [2N, C] (ignored by the linear adapter) and ``text_features`` [2, C] (rows t+, t-) come
    from the weights file. Arrays may be numpy or cupy; the dtype follows ``text_features``
    (float32 in production, float64 works too) and patch tokens are cast to it.
    """

    def __init__(
        self, T: Array | None, text_features: Array, config: TTAConfig | None = None
    ) -> None:
        self.config = config if config is not None else TTAConfig()
        xp = array_namespace(T, text_features)
        tf = xp.asarray(text_features)
        self.xp = xp
        self.dtype = _float_dtype(xp, tf)
        self._T = None if T is None else xp.asarray(T, dtype=self.dtype)
        self._engine = _Engine(
            self._T, tf, self.config.adapter, self.dtype, xp, self.config.norm_eps
        )
        self.rng = _default_rng(xp, self.config.seed)
        self.state: AdamWState | None = None
        self.last: TTAResult | None = None

    # ---- access ---------------------------------------------------------------------------
    @property
    def weight(self) -> Array | None:
        """Final adapter weight of the last image (omega for the text adapter)."""
        return None if self.last is None else self.last.weight

    omega = weight

    @property
    def bias(self) -> Array | None:
        return None if self.last is None else self.last.bias

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self._engine.weight_shape

    # ---- the loop -------------------------------------------------------------------------
    def _steps(self, P: Array, weight: Array, bias: Array, noise: Array, state: AdamWState) -> TTAResult:
        xp, cfg, eng = self.xp, self.config, self._engine

        eng.load(P)
        losses = xp.empty((cfg.steps,), dtype=self.dtype)
        for k in range(cfg.steps):
            eng.set_noise(noise[k])
            loss, gw, gb = eng.loss_grads(weight, bias)
            losses[k] = loss
            adamw_step(weight, bias, gw, gb, state, cfg, inplace=True, scratch=eng.scratch)
        tokens = eng.clean_forward(weight, bias)
        probs = _probs_from_u(tokens, eng.u, cfg.norm_eps, xp)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("TTA losses %s, optimiser step %d", [float(x) for x in losses], state.step)
        return TTAResult(tokens, probs, weight, bias, losses, state)


# --------------------------------------------------------------------------------------------
# the same loop as one ONNX graph, through onnxruntime
# --------------------------------------------------------------------------------------------


class OnnxTTARunner(_AdapterLoop):
    """Runs ``tta.onnx`` (built by ``anoclip.export.tta_graph``) with onnxruntime.

    Same semantics as :class:`TTAAdapter`: parameters are drawn per image (or given), the AdamW
    state is kept between calls (``state_policy``). Steps, adapter kind and optimiser constants
    are baked into the graph and read from its metadata; ``config`` may only add the settings the
    graph does not hold (noise_std, init, state_policy, seed) and must agree with the rest.
    Float32 only.
    """

    def __init__(
        self,
        path: str,
        providers: Sequence[Any] | None = None,
        *,
        T: Array | None = None,
        text_features: Array | None = None,
        config: TTAConfig | None = None,
        ort_options: Any = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a runtime dependency
            raise RuntimeError(
                "onnxruntime is needed to run the TTA graph: pip install onnxruntime"
            ) from exc
        self.path = str(path)
        if providers is None:
            providers = ["CPUExecutionProvider"]
        self.ort = ort.InferenceSession(self.path, ort_options, providers=list(providers))
        meta = self.ort.get_modelmeta().custom_metadata_map
        self.config = self._config_from_metadata(meta, config)
        self._input_names = {i.name for i in self.ort.get_inputs()}
        missing = [n for n in TTA_GRAPH_INPUTS if n not in self._input_names and n != "prompt_tokens"]
        if missing:
            raise ValueError(f"{self.path} is not a TTA graph: inputs {missing} are missing")
        self.xp, self.dtype = np, np.float32
        self.rng = np.random.default_rng(self.config.seed)
        self.state: AdamWState | None = None
        self.last: TTAResult | None = None
        self._T: np.ndarray | None = None
        self._tf: np.ndarray | None = None
        if text_features is not None:
            self.set_prompts(T, text_features)

    def _config_from_metadata(self, meta: dict[str, str], config: TTAConfig | None) -> TTAConfig:
        p = TTA_METADATA_PREFIX
        if p + "steps" not in meta:
            raise ValueError(
                f"{self.path} carries no TTA metadata; rebuild it with anoclip.export.tta_graph"
            )
        baked = {
            "steps": int(meta[p + "steps"]),
            "adapter": meta[p + "adapter"],
            "lr": float(meta[p + "lr"]),
            "betas": (float(meta[p + "beta1"]), float(meta[p + "beta2"])),
            "eps": float(meta[p + "eps"]),
            "weight_decay": float(meta[p + "weight_decay"]),
            "norm_eps": float(meta[p + "norm_eps"]),
        }
        if config is None:
            return TTAConfig(**baked)  # type: ignore[arg-type]
        for key, value in baked.items():
            if getattr(config, key) != value:
                raise ValueError(
                    f"{self.path} was built with {key}={value!r} but the config asks for "
                    f"{getattr(config, key)!r}; rebuild the graph with anoclip.export.tta_graph"
                )
        return config

    def set_prompts(self, T: Array | None, text_features: Array) -> None:
        """Prompt embeddings T [2N, C] and class text features [2, C] of the class to adapt to."""
        self._tf = np.ascontiguousarray(np.asarray(text_features, dtype=np.float32))
        self._T = None if T is None else np.ascontiguousarray(np.asarray(T, dtype=np.float32))
        if self.config.adapter == "text" and self._T is None:
            raise ValueError("the 'text' adapter graph needs T [2N, C]")

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self._tf is None:
            raise ValueError("call set_prompts(T, text_features) first")
        C = int(self._tf.shape[1])
        if self.config.adapter == "text":
            assert self._T is not None
            return (int(self._T.shape[0]), C)
        return (C, C)

    def _prepare(self, P, init, noise, rng):
        if self._tf is None:
            raise ValueError("call set_prompts(T, text_features) first")
        return super()._prepare(P, init, noise, rng)

    def _steps(self, P: Array, weight: Array, bias: Array, noise: Array, s: AdamWState) -> TTAResult:
        cfg = self.config
        feeds = {
            "patch_tokens": P,
            "prompt_tokens": self._T,
            "text_features": self._tf,
            "weight": np.ascontiguousarray(weight),
            "bias": np.ascontiguousarray(bias),
            "noise": noise,
            "m_weight": s.m_weight,
            "v_weight": s.v_weight,
            "m_bias": s.m_bias,
            "v_bias": s.v_bias,
            "step": np.asarray(min(s.step, 2**24), dtype=np.float32),
        }
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        out = dict(zip(TTA_GRAPH_OUTPUTS, self.ort.run(list(TTA_GRAPH_OUTPUTS), feeds)))
        self.state = AdamWState(
            out["m_weight_out"],
            out["v_weight_out"],
            out["m_bias_out"],
            out["v_bias_out"],
            int(s.step) + cfg.steps,
        )
        return TTAResult(
            out["adapted_tokens"],
            out["abnormal_probs"],
            out["weight_out"],
            out["bias_out"],
            out["losses"],
            self.state,
        )
