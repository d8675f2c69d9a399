"""How close two runs of a model are: the one comparison behind the export's check against
PyTorch, the reduced-precision parity gate and the engine's parity figures."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Agreement:
    """One output of a candidate run against the reference run.

    max_abs: largest absolute difference; max_rel: that over the reference's largest magnitude;
    cosines: cosine similarity of every embedding vector (the last axis), flattened.
    """

    max_abs: float
    max_rel: float
    cosines: np.ndarray


def agreement(reference: np.ndarray, candidate: np.ndarray, name: str = "output") -> Agreement:
    """Compare two arrays of the same shape (float64 arithmetic); ValueError when the shapes differ."""
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(candidate, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"{name} has shape {out.shape}, the reference {ref.shape}")
    if not ref.size:
        return Agreement(0.0, 0.0, np.ones(0))
    diff = float(np.max(np.abs(ref - out)))
    scale = float(np.max(np.abs(ref)))
    a, b = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    cosines = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return Agreement(diff, diff / scale if scale > 0 else 0.0, cosines)
