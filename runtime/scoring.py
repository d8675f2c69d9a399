"""Scores and anomaly maps (SPEC section 4) as plain numpy functions.

p_abnormal(x) = softmax([cos(x, t+), cos(x, t-)])[1] at temperature 1 (CLIP's logit scale is not
used, so values stay near 0.5). The map is p_abnormal of every patch token on the patch grid,
a 3x3 mean filter with replicate padding, then bilinear upsampling with ``align_corners=True``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_EPS = 1e-12


def l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
    return x / np.maximum(norm, _EPS)


def abnormal_probability(tokens: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """tokens [..., D] (any norm), text_features [2, D] (t+, t-) -> p_abnormal [...]."""
    x = l2_normalise(tokens.astype(np.float32, copy=False))
    t = l2_normalise(text_features.astype(np.float32, copy=False))
    cos = x @ t.T  # [..., 2]
    # softmax over two logits, index 1  ==  sigmoid(cos- - cos+)
    return 1.0 / (1.0 + np.exp(cos[..., 0] - cos[..., 1]))


def mean_filter3(grid: np.ndarray) -> np.ndarray:
    """3x3 mean filter with replicate padding over the last two axes (output keeps its size)."""
    padded = np.pad(grid, [(0, 0)] * (grid.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = grid.shape[-2:]
    total = np.zeros_like(grid, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            total += padded[..., dy : dy + h, dx : dx + w]
    return total / np.float32(9.0)


@lru_cache(maxsize=32)
def _align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Linear interpolation weights [out, in] with align_corners=True."""
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    if in_size == 1 or out_size == 1:
        matrix[:, 0] = 1.0
        return matrix
    pos = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), in_size - 2)
    frac = (pos - lo).astype(np.float32)
    rows = np.arange(out_size)
    matrix[rows, lo] = 1.0 - frac
    matrix[rows, lo + 1] += frac
    return matrix


def upsample_bilinear(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling with align_corners=True of [..., h, w] to [..., H, W]."""
    ry = _align_corners_matrix(grid.shape[-2], size[0])
    rx = _align_corners_matrix(grid.shape[-1], size[1])
    return (ry @ grid.astype(np.float32, copy=False) @ rx.T).astype(np.float32)


def patch_grid(probabilities: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[..., M] per-patch values -> smoothed [..., gh, gw] grid."""
    return mean_filter3(probabilities.reshape(*probabilities.shape[:-1], *grid).astype(np.float32))


def anomaly_map(
    patch_tokens: np.ndarray, text_features: np.ndarray, grid: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """patch tokens [..., M, D] -> anomaly map [..., H, W] at ``size``."""
    return upsample_bilinear(patch_grid(abnormal_probability(patch_tokens, text_features), grid), size)


def gaussian_smooth(image_map: np.ndarray, sigma: float) -> np.ndarray:
    """Optional Gaussian smoothing of a map (off by default; not part of the published method)."""
    import cv2

    return cv2.GaussianBlur(image_map.astype(np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
