"""Batches of any size for models that take a fixed or bounded batch: written once for every backend."""

from __future__ import annotations

from typing import Callable

import numpy as np

Outputs = dict[str, np.ndarray]


def run_in_chunks(run: Callable[[np.ndarray], Outputs], batch: np.ndarray, most: int | None,
                  least: int = 1) -> Outputs:
    """Every output of ``run`` for ``batch`` [N, ...], each concatenated along the batch axis.

    ``run`` sees chunks of at most ``most`` images (None: no limit, one call), each padded with zero
    images up to ``least`` (a fixed-batch model: ``least == most``); the padding's outputs are cut
    off. An empty batch gives outputs with no rows (the model runs once on ``least`` zero images for
    their shapes).
    """
    total = batch.shape[0]
    if most is not None and (most < 1 or least > most):
        raise ValueError(f"chunks need 1 <= least <= most, got least {least}, most {most}")
    if total and least <= total and (most is None or total <= most):
        return run(batch)
    step = most if most is not None else max(total, least)
    parts = []
    for start in range(0, max(total, 1), step):
        chunk = batch[start:start + step]
        count = chunk.shape[0]
        if count < least:
            chunk = np.concatenate([chunk, np.zeros((least - count, *batch.shape[1:]), batch.dtype)])
        parts.append({name: value[:count] for name, value in run(chunk).items()})
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
