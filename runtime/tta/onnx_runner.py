"""The adapter loop as one ONNX graph (``tta.onnx``, built by ``anoclip.export.tta_graph`` from the
same step functions as the array loop), run through onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import (
    TTA_GRAPH_INPUTS,
    TTA_GRAPH_OUTPUTS,
    TTA_METADATA_PREFIX,
    AdamWState,
    Array,
    TTAConfig,
    TTAResult,
)
from .loop import _AdapterLoop


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
        from ..backends.onnxruntime import session_providers

        self.path = str(path)
        if providers is None:
            providers = ["CPUExecutionProvider"]
        # the provider options of the visual model's session (TensorRT cache folder and precision)
        self.ort = ort.InferenceSession(self.path, ort_options, providers=session_providers(list(providers), self.path))
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
            # float32 counts exactly to 2**24 (a stream of ~3 million images); the bias
            # corrections are 1 long before that
            "step": np.asarray(min(s.step, 2**24), dtype=np.float32),
        }
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        out = dict(zip(TTA_GRAPH_OUTPUTS, self.ort.run(list(TTA_GRAPH_OUTPUTS), feeds)))
        state = AdamWState(out["m_weight_out"], out["v_weight_out"], out["m_bias_out"], out["v_bias_out"],
                           int(s.step) + cfg.steps)
        return TTAResult(out["adapted_tokens"], out["abnormal_probs"], out["weight_out"], out["bias_out"],
                         out["losses"], state)
