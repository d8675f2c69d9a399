"""Scores and anomaly maps (SPEC section 4) as plain array functions.

p_abnormal(x) = softmax([cos(x, t+), cos(x, t-)])[1] at temperature 1 (CLIP's logit scale is not
used, so values stay near 0.5). The map is p_abnormal of every patch token on the patch grid,
a 3x3 mean filter with replicate padding, then bilinear upsampling with ``align_corners=True``.

``l2_normalise`` and ``abnormal_probability`` take numpy or cupy arrays (the namespace of their
inputs) and are the definitions the test-time adaptation loop uses too; the map functions below
them are numpy only.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

_EPS = 1e-12  # as torch.nn.functional.normalize


def array_namespace(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a cupy array, else ``numpy``."""
    for a in arrays:
        if a is not None and type(a).__module__.split(".", 1)[0] == "cupy":
            import cupy  # optional dependency

            return cupy
    return np


def float_dtype(a: Any) -> Any:
    """``a``'s dtype when it is float32 or float64, else float32."""
    return a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float32)


def vector_norm(x: Any, axis: int = -1, *, xp: ModuleType | None = None) -> Any:
    """Euclidean norm along ``axis`` (kept as a size-1 axis), without overflow for huge entries."""
    xp = array_namespace(x) if xp is None else xp
    x = xp.moveaxis(x, axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    r = xp.sqrt(xp.einsum("ij,ij->i", rows, rows))  # einsum: an overflow gives inf, never an error
    if xp is np:  # rescale only the rows whose squares overflowed
        bad = ~np.isfinite(r)
        if bad.any():
            r[bad] = _rescaled_norm(rows[bad], np)
    else:  # no data-dependent branch (a device sync): rescale every row, keep where needed
        r = xp.where(xp.isfinite(r), r, _rescaled_norm(rows, xp))
    return xp.moveaxis(r.reshape(*x.shape[:-1], 1), -1, axis)


def _rescaled_norm(rows: Any, xp: ModuleType) -> Any:
    scale = xp.max(xp.abs(rows), axis=1)
    safe = xp.where(scale > 0, scale, 1).astype(rows.dtype)
    scaled = rows / safe[:, None]
    return xp.sqrt(xp.einsum("ij,ij->i", scaled, scaled)) * safe


def l2_normalise(x: Any, axis: int = -1, *, eps: float = _EPS, xp: ModuleType | None = None) -> Any:
    """``x / max(|x|, eps)`` along ``axis`` (torch.nn.functional.normalize semantics)."""
    return x / (array_namespace(x) if xp is None else xp).maximum(vector_norm(x, axis, xp=xp), eps)


def sigmoid(x: Any, *, xp: ModuleType | None = None) -> Any:
    """``1 / (1 + exp(-x))`` without overflow for any x."""
    xp = array_namespace(x) if xp is None else xp
    e = xp.exp(-xp.abs(x))
    big = 1.0 / (1.0 + e)
    return xp.where(x >= 0, big, e * big)


def abnormal_probability(tokens: Any, text_features: Any, *, normalise_text: bool = True, eps: float = _EPS,
                         xp: ModuleType | None = None) -> Any:
    """tokens [..., D] (any norm), text_features [2, D] (t+, t-) -> p_abnormal [...].

    The dtype follows the tokens (float32 or float64). ``normalise_text=False`` takes the text
    features as they are (the adaptation loss does; CLIP's are unit rows anyway).
    """
    xp = array_namespace(tokens, text_features) if xp is None else xp
    x = tokens.astype(float_dtype(tokens), copy=False)
    t = xp.asarray(text_features, dtype=x.dtype)
    if normalise_text:
        t = l2_normalise(t, eps=eps, xp=xp)
    # softmax over two logits, index 1  ==  sigmoid(cos- - cos+)
    return sigmoid(l2_normalise(x, eps=eps, xp=xp) @ (t[1] - t[0]), xp=xp)


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
    return (ry @ grid.astype(np.float32, copy=False) @ rx.T).astype(np.float32, copy=False)


@lru_cache(maxsize=32)
def _mean3_matrix(size: int) -> np.ndarray:
    """[size, size] weights of a 3-tap mean along one axis with replicate padding: the 3x3 mean
    filter of :func:`mean_filter3` is this matrix applied along rows and along columns."""
    matrix = np.zeros((size, size), dtype=np.float64)
    for i in range(size):
        for d in (-1, 0, 1):
            matrix[i, min(max(i + d, 0), size - 1)] += 1.0 / 3.0
    return matrix


def map_matrices(grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The map of :func:`anomaly_map` as two matrix products: for per-patch values P [gh, gw],
    ``rows @ P @ cols`` is ``upsample_bilinear(mean_filter3(P), size)``.

    Both steps are linear and act on rows and columns separately, so the 3x3 filter with replicate
    padding (1/3 of three neighbours, twice) folds into the align-corners interpolation weights:
    rows = Ry @ Fy [H, gh], cols = (Rx @ Fx)^T [gw, W], composed in float64. The results differ from
    the step-by-step computation by float32 rounding only.
    """
    rows = _align_corners_matrix(grid[0], size[0]).astype(np.float64) @ _mean3_matrix(grid[0])
    cols = _align_corners_matrix(grid[1], size[1]).astype(np.float64) @ _mean3_matrix(grid[1])
    return rows.astype(np.float32), np.ascontiguousarray(cols.T).astype(np.float32)


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
