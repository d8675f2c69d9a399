"""Region-overlap scores (SPEC section 6): the authors' PRO and the standard AUPRO@0.3.

Both use 8-connected ground-truth regions, the mean overlap over all regions of all images of the
class and the FPR over all normal pixels of the class, read off the pixel curve of
:func:`~anoclip.benchmarks.accuracy.curves.binary_clf_curve`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from .curves import BinaryCurve, _previous, _trapezoid, binary_clf_curve

logger = logging.getLogger(__name__)

#: FPR limit of both PRO variants (SPEC section 6).
DEFAULT_FPR_LIMIT = 0.3
#: Number of thresholds of the authors' PRO.
AUTHORS_PRO_STEPS = 200



@dataclass(frozen=True)
class RegionWeights:
    """Weight of every anomalous pixel (in ``masks[masks]`` order) in the mean region overlap.

    Each anomalous pixel carries 1 / (size of its 8-connected region) / (number of regions), so
    the summed weight of the pixels above a threshold is the mean per-region overlap there.
    """

    weights: np.ndarray
    n_regions: int


def _as_masks_maps(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim == 2:
        masks = masks[None]
    if maps.ndim == 2:
        maps = maps[None]
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be [N,H,W] of the same shape, got "
                         f"{masks.shape} and {maps.shape}: resize the maps to the mask size")
    return _binarize_masks(masks), maps


def _binarize_masks(masks: np.ndarray) -> np.ndarray:
    """bool as given; integers > 0; floats > 0.5 (masks scaled to [0, 1], SPEC section 6)."""
    if masks.dtype == np.bool_:
        return masks
    if np.issubdtype(masks.dtype, np.integer):
        return masks > 0
    return masks > 0.5


def region_weights(masks: np.ndarray) -> RegionWeights:
    """Per-pixel weights of the mean region overlap, from 8-connected ground-truth regions."""
    masks = _binarize_masks(np.asarray(masks))
    if masks.ndim == 2:
        masks = masks[None]
    per_image: list[np.ndarray] = []
    areas: list[np.ndarray] = []
    n_regions = 0
    for mask in masks:
        if not mask.any():
            continue
        n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8,
                                                   ltype=cv2.CV_32S)
        ids = labels[mask]  # 1..n_labels-1, row-major like masks[masks]
        area = np.bincount(ids, minlength=n_labels)[1:]
        per_image.append(ids - 1 + n_regions)
        areas.append(area)
        n_regions += n_labels - 1
    if n_regions == 0:
        return RegionWeights(weights=np.zeros(0, dtype=np.float64), n_regions=0)
    all_areas = np.concatenate(areas).astype(np.float64)
    weights = 1.0 / (all_areas[np.concatenate(per_image)] * n_regions)
    return RegionWeights(weights=weights, n_regions=n_regions)


def _cumulative_overlap(curve: BinaryCurve, rw: RegionWeights) -> np.ndarray:
    """c[m] = summed weight of the m highest-scoring anomalous pixels (c[0] = 0)."""
    if curve.positive_order is None:
        raise ValueError("the curve was built without keep_positive_order=True")
    cum = np.empty(rw.weights.size + 1, dtype=np.float64)
    cum[0] = 0.0
    np.cumsum(rw.weights[curve.positive_order], out=cum[1:])
    # tps[k] always sits on a tie boundary of the anomalous pixels, so the first tps[k] of them
    # in descending order are exactly those with score >= thresholds[k]: PRO_k = cum[tps[k]].
    return cum


def _pro_points(curve: BinaryCurve, rw: RegionWeights) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, highest threshold first."""
    cum = _cumulative_overlap(curve, rw)
    return curve.fps / max(curve.n_neg, 1), cum[curve.tps]


def _check_pro_inputs(curve: BinaryCurve, rw: RegionWeights, name: str) -> bool:
    if rw.n_regions == 0:
        logger.warning("%s is undefined: the class has no anomalous pixels; returning nan", name)
        return False
    if curve.n_neg == 0:
        logger.warning("%s is undefined: the class has no normal pixels; returning nan", name)
        return False
    return True


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact PRO curve: (fpr, pro, thresholds), one point per distinct map value (highest
    threshold first; a pixel counts as detected when its value is >= the threshold), preceded
    by the point (0, 0) at threshold +inf."""
    masks, maps = _as_masks_maps(masks, maps)
    curve = binary_clf_curve(masks, maps, keep_positive_order=True)
    rw = region_weights(masks)
    if not _check_pro_inputs(curve, rw, "PRO curve"):
        return np.array([0.0]), np.array([math.nan]), np.array([math.inf])
    fpr, pro = _pro_points(curve, rw)
    return (np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro)),
            np.concatenate(([math.inf], curve.thresholds)))


def _aupro_from(curve: BinaryCurve, rw: RegionWeights, fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if not _check_pro_inputs(curve, rw, "AUPRO"):
        return math.nan
    cum = _cumulative_overlap(curve, rw)
    # The curve (0, 0), (fpr_k, pro_k), ... is piecewise linear and PRO only grows where tps
    # grows. Summing, over those steps j, the rise dy_j times the length it stays counted inside
    # [0, L] gives the trapezoid area with linear interpolation at L:
    #   x_j <= L:            dy_j * ((L - x_j) + (x_j - x_{j-1}) / 2)
    #   x_{j-1} < L < x_j:   dy_j * (L - x_{j-1})**2 / (2 (x_j - x_{j-1}))
    k = curve.positive_steps
    n_neg = float(curve.n_neg)
    x = curve.fps[k] / n_neg
    x_prev = _previous(curve.fps, k) / n_neg
    dy = cum[curve.tps[k]] - cum[_previous(curve.tps, k)]
    limit = float(fpr_limit)
    inside = x <= limit
    crossing = ~inside & (x_prev < limit)
    length = np.zeros_like(x)
    length[inside] = (limit - x[inside]) + (x[inside] - x_prev[inside]) / 2.0
    xc, xpc = x[crossing], x_prev[crossing]
    length[crossing] = (limit - xpc) ** 2 / (2.0 * (xc - xpc))
    return float(np.sum(dy * length) / limit)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Standard AUPRO: exact PRO curve over all distinct thresholds, area over FPR in
    [0, fpr_limit] (linear interpolation at the limit), divided by fpr_limit.

    masks: [N,H,W] (bool; integers > 0; floats > 0.5). maps: [N,H,W] scores.
    """
    masks, maps = _as_masks_maps(masks, maps)
    curve = binary_clf_curve(masks, maps, keep_positive_order=True)
    return _aupro_from(curve, region_weights(masks), fpr_limit)


def _authors_thresholds(maps: np.ndarray, steps: int) -> np.ndarray | None:
    min_th, max_th = maps.min(), maps.max()
    if not max_th > min_th:
        return None
    delta = (max_th - min_th) / steps
    # The same call as the authors' loop, so the very same thresholds come out.
    return np.arange(min_th, max_th, delta).astype(np.float64)


def _pro_authors_from(curve: BinaryCurve, rw: RegionWeights, maps: np.ndarray,
                      steps: int, fpr_limit: float) -> float:
    if not _check_pro_inputs(curve, rw, "PRO (authors)"):
        return math.nan
    ths = _authors_thresholds(maps, steps)
    if ths is None:
        logger.warning("PRO (authors) is undefined for a constant map; returning nan")
        return math.nan
    cum = _cumulative_overlap(curve, rw)
    # A pixel is detected when its value is > th: the lowest distinct value above th carries
    # the counts (thresholds are descending; g of them lie above th).
    g = curve.n_above(ths)
    idx = np.maximum(g - 1, 0)
    fprs = np.where(g > 0, curve.fps[idx] / curve.n_neg, 0.0)
    pros = np.where(g > 0, cum[curve.tps[idx]], 0.0)
    keep = fprs < fpr_limit
    fprs, pros = fprs[keep], pros[keep]
    if fprs.size < 2 or not fprs.max() > fprs.min():
        logger.warning("PRO (authors) is undefined: fewer than two distinct FPRs below %.2f; "
                       "returning nan", fpr_limit)
        return math.nan
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    # fprs fall as the threshold rises; sklearn's auc() then flips the sign of the trapezoid.
    dx = np.diff(fprs)
    direction = -1.0 if (dx < 0).any() else 1.0
    return float(direction * _trapezoid(pros, fprs))


def pro_authors(masks: np.ndarray, maps: np.ndarray, steps: int = AUTHORS_PRO_STEPS,
                fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """The authors' PRO (paper Table 1), not the standard AUPRO.

    Thresholds ``np.arange(min, max, (max - min) / steps)`` over all maps of the class; a pixel
    is detected when its value is > the threshold; PRO = mean overlap over all 8-connected
    regions of all images; FPR over all normal pixels; thresholds with FPR < fpr_limit kept; the
    kept FPRs min-max rescaled to [0, 1]; trapezoid of PRO over the rescaled FPR.
    """
    masks, maps = _as_masks_maps(masks, maps)
    curve = binary_clf_curve(masks, maps, keep_positive_order=True)
    return _pro_authors_from(curve, region_weights(masks), maps, steps, fpr_limit)
