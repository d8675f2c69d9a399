"""Settings, optimiser state and results of the AnoCLIP+ adapter loop, and the names of the
``tta.onnx`` graph's inputs, outputs and metadata."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np

from ..errors import BackendError

AdapterKind = Literal["text", "linear"]
Array = Any  # numpy.ndarray or cupy.ndarray

#: Seed of the adapter's own generator when ``TTAConfig.seed`` is None (the CLI's ``--seed`` default).
DEFAULT_SEED = 0

#: Input names of the TTA ONNX graph (``export/tta_graph.py`` builds it, ``OnnxTTARunner`` runs it).
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


@dataclass(frozen=True)
class TTAConfig:
    """Settings of the AnoCLIP+ adapter loop (defaults = the authors' code, SPEC section 5).

    ``init``: ``"random"`` draws weight and bias uniformly in +-1/sqrt(C) for every image, like
    ``torch.nn.Linear``'s default (authors' code); ``"prompts"`` starts the text adapter's weight
    from T with a zero bias (the paper's text).
    ``state_policy``: ``"persistent"`` keeps one AdamW state (moments and step count) across images
    while the parameters are re-drawn per image (authors' code); ``"fresh"`` starts every image
    from a new optimiser state.
    ``seed``: seed of the adapter's own generator (parameters and noise). None means
    ``DEFAULT_SEED`` (0, as the CLI's ``--seed``), so runs repeat unless a seed or generator is
    given; ``config.seed`` always holds the seed in use.
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
        object.__setattr__(self, "seed", DEFAULT_SEED if self.seed is None else int(self.seed))


@dataclass
class AdamWState:
    """AdamW moments of the adapter weight and bias, and the number of steps taken."""

    m_weight: Array
    v_weight: Array
    m_bias: Array
    v_bias: Array
    step: int = 0

    @classmethod
    def zeros(cls, weight_shape: Sequence[int], bias_shape: Sequence[int], *, xp: ModuleType = np,
              dtype: Any = np.float32) -> AdamWState:
        w, b = tuple(weight_shape), tuple(bias_shape)
        return cls(xp.zeros(w, dtype=dtype), xp.zeros(w, dtype=dtype), xp.zeros(b, dtype=dtype),
                   xp.zeros(b, dtype=dtype), 0)

    @property
    def moments(self) -> tuple[Array, Array, Array, Array]:
        """(m_weight, v_weight, m_bias, v_bias)."""
        return self.m_weight, self.v_weight, self.m_bias, self.v_bias

    def copy(self) -> AdamWState:
        return AdamWState(*(a.copy() for a in self.moments), int(self.step))


@dataclass
class TTAResult:
    """Everything one adapted image produces."""

    tokens: Array  # [M, C] Phi(P), unnormalised, computed without noise
    probs: Array  # [M] p_abnormal of the adapted tokens
    weight: Array  # final adapter weight
    bias: Array  # final adapter bias
    losses: Array  # [steps] loss of each step, evaluated before its update
    state: AdamWState = field(repr=False)  # optimiser state after the image


def as_tta_config(tta) -> TTAConfig | None:
    """False/None -> no TTA; True -> default settings; a TTAConfig as given."""
    if tta is False or tta is None:
        return None
    if tta is True:
        return TTAConfig()
    if isinstance(tta, TTAConfig):
        return tta
    raise TypeError(f"tta must be a bool or a TTAConfig, got {type(tta).__name__}")


def array_module(tta_backend: str):
    """numpy, or cupy for ``--tta-backend cupy`` (one line naming the install when it is missing)."""
    if tta_backend != "cupy":
        return np
    try:
        import cupy
    except ImportError as exc:
        raise BackendError(f"--tta-backend cupy needs CuPy and a CUDA GPU (`pip install 'anoclip[cupy]'`): {exc}") from None
    return cupy
