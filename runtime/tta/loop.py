"""The adapter loop on numpy (CPU) or cupy (GPU) arrays, holding the AdamW state between images.

Randomness only enters through a generator (numpy's or cupy's ``default_rng``: the adapter's own,
seeded by ``TTAConfig.seed``, or one passed to ``run``) or explicit arrays; the draw order is:
initial weight, initial bias, then the noise of all steps at once.
"""

from __future__ import annotations

import logging
import math
from types import ModuleType
from typing import Any

import numpy as np

from ..scoring import abnormal_probability, array_namespace, float_dtype
from .adapter import ArrayOps, adapt, check_params, checked_prompts, prepare
from .config import AdamWState, Array, TTAConfig, TTAResult

logger = logging.getLogger(__name__)


def draw_initial_params(rng: Any, *, weight_shape: tuple[int, int], dtype: Any = np.float32,
                        init: str = "random", T: Array | None = None,
                        xp: ModuleType = np) -> tuple[Array, Array]:
    """Initial adapter (weight, bias).

    ``"random"``: uniform in +-1/sqrt(C) for both (torch.nn.Linear default; C = fan-in), drawn from
    ``rng`` (weight first, then bias). ``"prompts"``: weight = T, bias = 0 (``rng`` unused).
    """
    K, C = int(weight_shape[0]), int(weight_shape[1])
    if init == "prompts":
        if T is None:
            raise ValueError("init='prompts' needs T")
        return xp.array(T, dtype=dtype, copy=True), xp.zeros((K,), dtype=dtype)
    bound = 1.0 / math.sqrt(C)
    w = xp.asarray(rng.random((K, C), dtype=dtype))
    b = xp.asarray(rng.random((K,), dtype=dtype))
    return w * (2 * bound) - bound, b * (2 * bound) - bound


def draw_noise(rng: Any, steps: int, M: int, C: int, std: float, *, dtype: Any = np.float32,
               xp: ModuleType = np) -> Array:
    """Perturbations ``delta`` [steps, M, C], Gaussian with mean 0 and the given std."""
    return xp.asarray(rng.standard_normal((steps, M, C), dtype=dtype)) * std


class _AdapterLoop:
    """What both adapter loops share: drawing or checking the inputs of one image, the
    optimiser-state policy, ``adapt`` and ``reset``. Subclasses set ``config``, ``rng``, ``xp``,
    ``dtype``, ``_T`` and ``weight_shape``, and implement ``_steps``."""

    config: TTAConfig
    xp: ModuleType
    dtype: Any
    _T: Array | None
    rng: Any
    state: AdamWState | None
    last: TTAResult | None
    weight_shape: tuple[int, int]

    def reset(self) -> None:
        """Forget the optimiser state (the next image starts from step 0)."""
        self.state = None
        self.last = None

    def _prepare(self, P: Array, init: tuple[Array, Array] | None, noise: Array | None,
                 rng: Any) -> tuple[Array, Array, Array, Array, AdamWState]:
        """(P, weight, bias, noise, state) for one image: given arrays are checked and cast, the
        rest drawn from ``rng`` (default: the adapter's own generator, seeded by config.seed)."""
        xp, cfg, dt = self.xp, self.config, self.dtype
        K, C = (int(n) for n in self.weight_shape)
        P = xp.asarray(P, dtype=dt)
        if P.ndim != 2 or P.shape[1] != C:
            raise ValueError(f"patch tokens must be [M, {C}], got {tuple(P.shape)}")
        M = int(P.shape[0])
        gen = rng if rng is not None else self.rng
        if init is None:
            weight, bias = draw_initial_params(gen, weight_shape=(K, C), dtype=dt, init=cfg.init, T=self._T, xp=xp)
        else:
            weight, bias = xp.array(init[0], dtype=dt, copy=True), xp.array(init[1], dtype=dt, copy=True)
        check_params(weight, bias, (K, C))
        if noise is None:
            noise = draw_noise(gen, cfg.steps, M, C, cfg.noise_std, dtype=dt, xp=xp)
        noise = xp.asarray(noise, dtype=dt)
        if tuple(noise.shape) != (cfg.steps, M, C):
            raise ValueError(f"noise must be [steps, M, C] = {(cfg.steps, M, C)}, got {tuple(noise.shape)}")
        if self.state is None or cfg.state_policy == "fresh":
            self.state = AdamWState.zeros((K, C), (K,), xp=xp, dtype=dt)
        return P, weight, bias, noise, self.state

    def run(self, P: Array, *, init: tuple[Array, Array] | None = None, noise: Array | None = None,
            rng: Any = None) -> TTAResult:
        """Adapt to one image's patch tokens ``P`` [M, C] and return everything it produced.

        ``init``: explicit initial (weight, bias), else drawn (config.init). ``noise``: explicit
        perturbations [steps, M, C] (already scaled), else drawn with std config.noise_std.
        ``rng``: generator for what is drawn (default: the adapter's own, seeded by config.seed).
        """
        self.last = self._steps(*self._prepare(P, init, noise, rng))
        self.state = self.last.state
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("TTA losses %s, optimiser step %d", [float(x) for x in self.last.losses],
                         self.state.step)
        return self.last

    def _steps(self, P: Array, weight: Array, bias: Array, noise: Array, state: AdamWState) -> TTAResult:
        raise NotImplementedError

    def adapt(self, P: Array, *, init: tuple[Array, Array] | None = None, noise: Array | None = None,
              rng: Any = None) -> Array:
        """Adapted patch tokens Phi(P) [M, C] (unnormalised, without noise) after the steps."""
        return self.run(P, init=init, noise=noise, rng=rng).tokens

    @property
    def weight(self) -> Array | None:
        """Final adapter weight of the last image (omega for the text adapter)."""
        return None if self.last is None else self.last.weight

    @property
    def bias(self) -> Array | None:
        return None if self.last is None else self.last.bias


class TTAAdapter(_AdapterLoop):
    """AnoCLIP+ adapter for one class / stream, holding its AdamW state between images.

    ``T`` [2N, C] (ignored by the linear adapter) and ``text_features`` [2, C] (rows t+, t-) come
    from the weights file. Arrays may be numpy or cupy; the dtype follows ``text_features``
    (float32 in production, float64 works too; anything else, such as the float16 of a half
    precision engine, becomes float32) and patch tokens are cast to it.
    """

    def __init__(self, T: Array | None, text_features: Array, config: TTAConfig | None = None) -> None:
        self.config = config if config is not None else TTAConfig()
        self.xp = array_namespace(T, text_features)
        self.dtype = float_dtype(self.xp.asarray(text_features))
        self._T, self._tf = checked_prompts(T, text_features, self.config.adapter, self.xp, self.dtype)
        C = int(self._tf.shape[1])
        self.weight_shape = (C if self._T is None else int(self._T.shape[0]), C)
        self._ops = ArrayOps(self.xp, self.config.norm_eps)
        self.rng = self.xp.random.default_rng(self.config.seed)
        self.state: AdamWState | None = None
        self.last: TTAResult | None = None

    def _steps(self, P: Array, weight: Array, bias: Array, noise: Array, state: AdamWState) -> TTAResult:
        cfg, ops, xp = self.config, self._ops, self.xp
        # The steps update parameters and moments in place: work on copies the loop owns.
        owned = [weight.copy(), bias.copy(), *(moment.copy() for moment in state.moments)]
        tokens, weight, bias, moments, losses = adapt(ops, prepare(ops, P, self._T, self._tf), noise, owned[0],
                                                      owned[1], tuple(owned[2:]), state.step, cfg)
        probs = abnormal_probability(tokens, self._tf, normalise_text=False, eps=cfg.norm_eps, xp=xp)
        losses = xp.stack(losses) if losses else xp.zeros((0,), dtype=self.dtype)
        return TTAResult(tokens, probs, weight, bias, losses, AdamWState(*moments, state.step + cfg.steps))
