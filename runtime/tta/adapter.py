"""The AnoCLIP+ adapter step (SPEC section 5): forward, loss, hand-derived gradients.

Adapters (``TTAConfig.adapter``)::

    text   (default, SPEC eq. 9):  Phi(P) = 0.5 P + 0.5 tanh(Pn @ w.T + b) @ T    # w [2N,C], b [2N]
    linear (the authors' VisA script): Phi(P) = 0.5 P + 0.5 (Pn @ W.T + b)        # W [C,C], b [C]

with ``Pn = normalise_rows(P)``. One step, with a fresh perturbation ``delta`` of the
unnormalised tokens (std 0.055)::

    X = normalise_rows(Phi([P, P + delta]))
    d = X @ (t- - t+)                       # logit difference, so p_abnormal = p = sigmoid(d)
    L = mean_i H(p_clean_i) + 0.5 * mean_i [-log p_clean_i(normal) - log p_noisy_i(abnormal)]

Gradients (``m`` = number of patch tokens, ``q = 1 - p``, ``u = t- - t+``, ``r = |Phi|``,
``D = max(r, eps)``, ``A = tanh(Z)``, ``Z = Pn @ w.T + b``)::

    dL/dd_clean = (-d p q + 0.5 p) / m       # entropy (both factors) + pseudo-label NLL
    dL/dd_noisy = -0.5 q / m                 # noisy tokens pushed towards "abnormal"
    dL/dPhi     = (dL/dd / D) * (u - [r > eps] * d / D * Phi)
    dL/dZ       = dL/dPhi @ (0.5 T).T * (1 - A^2)      (linear: 0.5 dL/dPhi)
    dL/dw       = dL/dZ.T @ Pn_batch ;  dL/db = sum_rows(dL/dZ)

The clean and noisy halves pull in nearly opposite directions and the entropy and pseudo-label
terms cancel to first order, so the true gradient is ~1e-4 of the terms it is summed from; summed
naively in float32 (as torch autograd does) it is only good to ~1e-4. The reductions therefore
pair each clean row with its noisy twin first (S = clean + noisy, no large terms cancel in a sum)::

    dL/dw = S_Z.T @ Pn_clean + dZ_noisy.T @ (Pn_noisy - Pn_clean),   dL/db = sum_rows(S_Z)
    S_Z   = (S_Phi @ (0.5 T).T) * (1 - A_c^2) + dA_noisy * (A_c - A_n) * (A_c + A_n)

which costs the same matrix products and keeps float32 within ~2e-6 of float64.

One definition for both back ends. The step is written once, against a tiny op vocabulary: the
Python operators ``+ - * / @``, unary ``-``, ``.T`` and ``**`` with a scalar exponent, plus the
methods of :class:`ArrayOps` (tanh, sigmoid, softplus, normalise, row_norms, above_eps, concat,
halves, mean, sum_rows, row, take, inv_rows). ``ArrayOps`` evaluates them on numpy or cupy arrays
(the numpy/cupy loop); ``anoclip.export.tta_graph`` evaluates the same functions on symbolic
tensors whose operators emit ONNX nodes (``tta.onnx``). The loop and the graph are therefore the
same code and cannot drift. This was chosen over two implementations checked term by term
against each other: one copy is shorter than two copies plus the test pairing them, and reads as
the formulas above. The price is that the array loop allocates its temporaries instead of
writing into reused buffers (only AdamW, ``ArrayOps.adamw``, updates in place), which makes it
slower on a CPU: 1.13-1.14x the buffer-reusing loop it replaced at ViT-B-16-plus-240 shapes on a
2-core AMD EPYC (``anoclip.benchmarks.latency.tta_latency`` measures it); the graph is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..scoring import array_namespace, float_dtype, l2_normalise, sigmoid, vector_norm
from .config import AdapterKind, TTAConfig
from .optim import adamw_update_in_place

Array = Any  # numpy/cupy array, or a symbolic tensor of the graph builder


class ArrayOps:
    """The op vocabulary on numpy or cupy arrays of namespace ``xp``; ``eps`` floors row norms."""

    def __init__(self, xp: ModuleType, eps: float) -> None:
        self.xp, self.eps = xp, float(eps)

    def tanh(self, x: Array) -> Array:
        return self.xp.tanh(x)

    def sigmoid(self, x: Array) -> Array:
        return sigmoid(x, xp=self.xp)

    def softplus(self, x: Array) -> Array:
        """log(1 + exp(x)) = relu(x) + log1p(exp(-|x|)), stable for any x."""
        return self.xp.maximum(x, 0) + self.xp.log1p(self.xp.exp(-self.xp.abs(x)))

    def normalise(self, x: Array) -> Array:
        """Rows divided by max(|row|, eps)."""
        return l2_normalise(x, eps=self.eps, xp=self.xp)

    def row_norms(self, x: Array) -> tuple[Array, Array]:
        """(|row|, max(|row|, eps)), both [R, 1]."""
        r = vector_norm(x, xp=self.xp)
        return r, self.xp.maximum(r, self.eps)

    def above_eps(self, x: Array) -> Array:
        """1.0 where x > eps, else 0.0."""
        return (x > self.eps).astype(x.dtype)

    def concat(self, a: Array, b: Array) -> Array:
        """Rows of ``a`` then rows of ``b``."""
        return self.xp.concatenate([a, b])

    def halves(self, x: Array) -> tuple[Array, Array]:
        """First and second half of the rows."""
        m = x.shape[0] // 2
        return x[:m], x[m:]

    def mean(self, x: Array) -> Array:
        return self.xp.mean(x)

    def sum_rows(self, x: Array) -> Array:
        """[R, K] -> [K]."""
        return self.xp.sum(x, axis=0)

    def row(self, x: Array, i: int) -> Array:
        """Row ``i`` as [1, C]."""
        return x[i : i + 1]

    def take(self, x: Array, k: int) -> Array:
        """``x[k]``."""
        return x[k]

    def inv_rows(self, x: Array) -> float:
        """1 / number of rows."""
        return 1.0 / x.shape[0]

    def adamw(self, param: Array, grad: Array, m: Array, v: Array, step: int,
              config: TTAConfig) -> tuple[Array, Array, Array]:
        """``optim.adamw_update``, written into ``param``, ``m`` and ``v`` (owned by the loop)."""
        return adamw_update_in_place(param, grad, m, v, step, config, self.xp)


@dataclass(frozen=True)
class Inputs:
    """What stays fixed over the steps of one image."""

    P: Array  # [M, C] unnormalised patch tokens
    P_half: Array  # 0.5 P
    Pn: Array  # normalise_rows(P)
    inv_m: Array  # 1 / M
    u: Array  # [1, C] t- - t+
    T_half: Array | None  # 0.5 T (0.5 * (A @ T) == A @ (0.5 T) exactly); None: linear adapter


def prepare(ops: Any, P: Array, T: Array | None, text_features: Array) -> Inputs:
    u = ops.row(text_features, 1) - ops.row(text_features, 0)
    return Inputs(P, P * 0.5, ops.normalise(P), ops.inv_rows(P), u, None if T is None else T * 0.5)


def forward(ops: Any, Pn: Array, P_half: Array, weight: Array, bias: Array,
            T_half: Array | None) -> tuple[Array, Array]:
    """(Phi, activation) of the rows ``Pn`` (normalised) / ``P_half`` (0.5 * unnormalised)."""
    Z = Pn @ weight.T + bias
    if T_half is None:
        return Z * 0.5 + P_half, Z
    A = ops.tanh(Z)
    return A @ T_half + P_half, A


def logit_gap(ops: Any, phi: Array, u: Array) -> tuple[Array, Array, Array]:
    """(d, r, D): d = cos(Phi, t-) - cos(Phi, t+) per row [R, 1], r = |Phi|, D = max(r, eps)."""
    r, D = ops.row_norms(phi)
    return (phi @ u.T) / D, r, D


def step_loss_and_grads(ops: Any, x: Inputs, delta: Array, weight: Array,
                        bias: Array) -> tuple[Array, Array, Array]:
    """Loss of one step on [P, P + delta] and its gradients (dL/dw, dL/db)."""
    noisy = x.P + delta
    Pn_noisy = ops.normalise(noisy)
    phi, act = forward(ops, ops.concat(x.Pn, Pn_noisy), ops.concat(x.P_half, noisy * 0.5), weight, bias,
                       x.T_half)
    d, r, D = logit_gap(ops, phi, x.u)
    d_c, d_n = ops.halves(d)
    p_c, q_c, q_n = ops.sigmoid(d_c), ops.sigmoid(-d_c), ops.sigmoid(-d_n)
    nll_c, nll_n = ops.softplus(d_c), ops.softplus(-d_n)  # -log q_clean, -log p_noisy
    entropy = p_c * ops.softplus(-d_c) + q_c * nll_c
    loss = ops.mean(entropy) + (ops.mean(nll_c) + ops.mean(nll_n)) * 0.5
    g_d = ops.concat((p_c * 0.5 - d_c * p_c * q_c) * x.inv_m, q_n * (-0.5 * x.inv_m))
    g_phi = (g_d / D) * (x.u - (d / D) * ops.above_eps(r) * phi)
    g_phi_c, g_phi_n = ops.halves(g_phi)
    S_phi = g_phi_c + g_phi_n  # clean + noisy twin, before any reduction
    if x.T_half is None:
        S_Z, g_Z_n = S_phi * 0.5, g_phi_n * 0.5
    else:
        A_c, A_n = ops.halves(act)
        S_A, g_A_n = S_phi @ x.T_half.T, g_phi_n @ x.T_half.T
        S_Z = S_A * (1.0 - A_c * A_c) + g_A_n * ((A_c - A_n) * (A_c + A_n))
        g_Z_n = g_A_n * (1.0 - A_n * A_n)
    return loss, S_Z.T @ x.Pn + g_Z_n.T @ (Pn_noisy - x.Pn), ops.sum_rows(S_Z)


def adapt(ops: Any, x: Inputs, noise: Array, weight: Array, bias: Array, moments: tuple, step: Any,
          config: TTAConfig) -> tuple[Array, Array, Array, tuple, list]:
    """``config.steps`` AdamW steps from (weight, bias); ``noise[k]`` perturbs step k, ``step`` is
    the optimiser's step count before. Returns (Phi(P) without noise, weight, bias, moments, losses)."""
    m_w, v_w, m_b, v_b = moments
    losses = []
    for k in range(config.steps):
        loss, g_w, g_b = step_loss_and_grads(ops, x, ops.take(noise, k), weight, bias)
        losses.append(loss)
        step = step + 1
        weight, m_w, v_w = ops.adamw(weight, g_w, m_w, v_w, step, config)
        bias, m_b, v_b = ops.adamw(bias, g_b, m_b, v_b, step, config)
    phi, _ = forward(ops, x.Pn, x.P_half, weight, bias, x.T_half)
    return phi, weight, bias, (m_w, v_w, m_b, v_b), losses


# ---- the same functions on plain arrays (public API) -------------------------------------------


def checked_prompts(T: Array | None, text_features: Array, adapter: AdapterKind, xp: ModuleType,
                    dtype: Any) -> tuple[Array | None, Array]:
    """(T or None for the linear adapter, text features), cast and shape-checked."""
    tf = xp.asarray(text_features, dtype=dtype)
    if tf.ndim != 2 or tf.shape[0] != 2:
        raise ValueError(f"text_features must be [2, C] (rows t+, t-), got {tuple(tf.shape)}")
    if adapter == "linear":
        return None, tf
    if T is None:
        raise ValueError("the 'text' adapter needs the prompt embeddings T [2N, C]")
    T = xp.asarray(T, dtype=dtype)
    if T.ndim != 2 or T.shape[1] != tf.shape[1]:
        raise ValueError(f"T must be [2N, {tf.shape[1]}], got {tuple(T.shape)}")
    return T, tf


def check_params(weight: Array, bias: Array, weight_shape: tuple[int, int]) -> None:
    if tuple(weight.shape) != tuple(weight_shape) or tuple(bias.shape) != tuple(weight_shape[:1]):
        raise ValueError(f"adapter parameters must be weight {tuple(weight_shape)} and bias "
                         f"{tuple(weight_shape[:1])}, got {tuple(weight.shape)} and {tuple(bias.shape)}")


def _arrays(P: Array, weight: Array, bias: Array, T: Array | None, text_features: Array | None,
            adapter: AdapterKind) -> tuple[ModuleType, Array, Array, Array, Array | None, Array]:
    xp = array_namespace(P, weight, bias, T, text_features)
    P = xp.asarray(P)
    dtype = float_dtype(P)
    C = int(P.shape[-1])
    tf = xp.zeros((2, C), dtype=dtype) if text_features is None else text_features
    T, tf = checked_prompts(T, tf, adapter, xp, dtype)
    w, b = xp.asarray(weight, dtype=dtype), xp.asarray(bias, dtype=dtype)
    check_params(w, b, (C if T is None else int(T.shape[0]), C))
    if P.ndim != 2 or P.shape[1] != tf.shape[1]:
        raise ValueError(f"patch tokens must be [M, {tf.shape[1]}], got {tuple(P.shape)}")
    return xp, P.astype(dtype, copy=False), w, b, T, tf


def adapter_forward(P: Array, weight: Array, bias: Array, T: Array | None = None, *,
                    adapter: AdapterKind = "text", norm_eps: float = 1e-12) -> Array:
    """Phi(P) [M, C] (unnormalised) for one image's patch tokens ``P`` [M, C]."""
    xp, P, w, b, T, _ = _arrays(P, weight, bias, T, None, adapter)
    ops = ArrayOps(xp, norm_eps)
    return forward(ops, ops.normalise(P), P * 0.5, w, b, None if T is None else T * 0.5)[0]


def loss_and_grads(P: Array, weight: Array, bias: Array, T: Array | None, text_features: Array,
                   noise: Array, *, adapter: AdapterKind = "text",
                   norm_eps: float = 1e-12) -> tuple[Array, Array, Array]:
    """Loss of one TTA step and its analytic gradients.

    ``noise`` is the perturbation ``delta`` [M, C] added to ``P`` for the noisy half (already
    scaled by the noise std). Returns ``(loss, grad_weight, grad_bias)``; ``loss`` is a 0-d array
    of the input's namespace (call ``float()`` on it).
    """
    xp, P, w, b, T, tf = _arrays(P, weight, bias, T, text_features, adapter)
    delta = xp.asarray(noise, dtype=P.dtype)
    if tuple(delta.shape) != tuple(P.shape):
        raise ValueError(f"noise must have the shape of P {tuple(P.shape)}, got {tuple(delta.shape)}")
    ops = ArrayOps(xp, norm_eps)
    return step_loss_and_grads(ops, prepare(ops, P, T, tf), delta, w, b)
