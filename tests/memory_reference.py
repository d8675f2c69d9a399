"""The memory branch written from its formula (docs/method.md) in plain numpy, importing nothing of
the runtime: the reference the runtime's path and the fused graph are checked against."""

from __future__ import annotations

import numpy as np


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.sqrt((x ** 2).sum(-1, keepdims=True)), 1e-12)


def p_abnormal(tokens, text):
    logits = unit(tokens) @ unit(text).T  # [..., 2]: cos with t+, t-
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[..., 1]


def mean3(grid):
    padded = np.pad(grid, ((1, 1), (1, 1)), mode="edge")
    h, w = grid.shape
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def bilinear_align_corners(grid, size):
    def axis(n_in, n_out):
        f = np.arange(n_out) * (n_in - 1) / max(n_out - 1, 1)
        i0 = np.minimum(np.floor(f).astype(int), max(n_in - 2, 0))
        return i0, np.minimum(i0 + 1, n_in - 1), f - i0

    y0, y1, ay = axis(grid.shape[0], size[0])
    x0, x1, ax = axis(grid.shape[1], size[1])
    top = grid[y0][:, x0] * (1 - ax) + grid[y0][:, x1] * ax
    bottom = grid[y1][:, x0] * (1 - ax) + grid[y1][:, x1] * ax
    return top * (1 - ay[:, None]) + bottom * ay[:, None]


def formula(image_embeds, patch_embeds, text, memory, grid, size, weight, only):
    """One image's (score, map, per-patch values, zero-shot score, memory score, memory map,
    zero-shot map) of one class; ``memory`` None: zero-shot alone (memory score and map 0)."""
    zero_patch, zero_score = p_abnormal(patch_embeds, text), float(p_abnormal(image_embeds, text))
    to_map = lambda values: bilinear_align_corners(mean3(values.reshape(grid)), size)  # noqa: E731
    if memory is None:
        return zero_score, to_map(zero_patch), zero_patch, zero_score, 0.0, np.zeros(size), to_map(zero_patch)
    s = 0.5 * (1.0 - (unit(patch_embeds) @ unit(memory).T).max(axis=1))  # [M]
    w = 1.0 if only else weight
    patch, score = w * s + (1 - w) * zero_patch, w * s.max() + (1 - w) * zero_score
    return float(score), to_map(patch), patch, zero_score, float(s.max()), to_map(s), to_map(zero_patch)
