"""Evaluation metrics of SPEC section 6, in numpy only (no torch, no scikit-learn at run time).

Every threshold metric is computed from one sorted pass over the scores (:func:`binary_clf_curve`),
with ties grouped exactly as scikit-learn groups them, so the numbers agree with
``sklearn.metrics`` to floating-point rounding:

* :func:`auroc` - ``roc_auc_score``.
* :func:`average_precision` - ``average_precision_score`` (step-wise sum of (R_n - R_n-1) P_n).
* :func:`f1_max` - the largest 2PR/(P+R) over the points of ``precision_recall_curve``
  (0 where P+R = 0), as the authors compute F1-max.
* :func:`aupr_trapezoid` - ``auc(recall, precision)`` on ``precision_recall_curve``: the
  trapezoid area that the authors report as image AUPR.

Two region-overlap scores, which are not the same number:

* :func:`pro_authors` - the authors' PRO (the "PRO" column of the paper's Table 1): 200 evenly
  spaced thresholds between the class's smallest and largest map value; thresholds with
  FPR < 0.3 kept; the kept FPRs min-max rescaled to [0, 1]; trapezoid of PRO over them.
* :func:`aupro` - the standard AUPRO (as in MVTec AD's evaluation code and anomalib): the exact
  PRO curve over every distinct threshold, integrated over FPR in [0, fpr_limit] with linear
  interpolation at the limit, divided by fpr_limit.

Both use 8-connected ground-truth regions, the mean overlap over all regions of all images of the
class, and the FPR over all normal pixels of the class.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "BinaryCurve",
    "ClassMetrics",
    "RegionWeights",
    "aupr_trapezoid",
    "aupro",
    "auroc",
    "average_precision",
    "binary_clf_curve",
    "evaluate_class",
    "f1_max",
    "mean_over_classes",
    "pro_authors",
    "pro_curve",
    "region_weights",
]

#: FPR limit of both PRO variants (SPEC section 6).
DEFAULT_FPR_LIMIT = 0.3
#: Number of thresholds of the authors' PRO.
AUTHORS_PRO_STEPS = 200

# np.trapezoid is NumPy >= 2.0; NumPy 1.x (>= 1.24, still common on Jetson images) names it np.trapz.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# --------------------------------------------------------------------------------------------
# The sorted pass
# --------------------------------------------------------------------------------------------


def _previous(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """values[k - 1] at each index k of ``steps``, with 0 before the first point."""
    prev = np.zeros(steps.size, dtype=values.dtype)
    has = steps > 0
    prev[has] = values[steps[has] - 1]
    return prev


@dataclass(frozen=True)
class BinaryCurve:
    """Counts at every distinct score, highest score first (sklearn's ``_binary_clf_curve``).

    ``tps[k]`` / ``fps[k]`` count the positives / negatives whose score is >= ``thresholds[k]``.
    ``positive_order`` is set when the curve was built with ``keep_positive_order=True``: the
    indices into the positives (in input order) sorted by descending score, which the region
    overlap needs to accumulate per-pixel weights.

    The metrics only visit the points where ``tps`` grows (at most one per positive sample):
    between two such points recall is constant and every quantity here is either constant or
    monotone, so the sums and maxima over all points reduce to sums and maxima over those.
    """

    tps: np.ndarray
    fps: np.ndarray
    positive_order: np.ndarray | None = None
    #: Distinct scores, highest first: float64 values, or (fast path) their packed uint64 keys,
    #: decoded on first use of ``thresholds``.
    threshold_source: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @cached_property
    def thresholds(self) -> np.ndarray:
        """The distinct scores, highest first, as float64."""
        src = self.threshold_source
        if src.dtype == np.uint64:
            return _key_to_f32(src).astype(np.float64)
        return src.astype(np.float64)

    @property
    def n_pos(self) -> int:
        return int(self.tps[-1]) if self.tps.size else 0

    @property
    def n_neg(self) -> int:
        return int(self.fps[-1]) if self.fps.size else 0

    def n_above(self, values: np.ndarray) -> np.ndarray:
        """For each value, how many distinct thresholds are strictly greater than it."""
        values = np.asarray(values, dtype=np.float64)
        src = self.threshold_source
        ascending = src[::-1]
        if src.dtype != np.uint64:
            return src.size - np.searchsorted(ascending, values, side="right")
        # Packed keys: "> v" equals ">= the smallest float32 above v", searched in key space
        # (no decoding of every threshold).
        above = values.astype(np.float32)
        low = above.astype(np.float64) <= values
        above[low] = np.nextafter(above[low], np.float32(np.inf))
        keys = _sortable_keys_f32(above)
        return src.size - np.searchsorted(ascending, keys, side="left")

    @cached_property
    def positive_steps(self) -> np.ndarray:
        """Indices k where tps[k] > tps[k-1] (with tps[-1] taken as 0)."""
        grows = np.empty(self.tps.size, dtype=bool)
        if self.tps.size:
            grows[0] = self.tps[0] > 0
            np.not_equal(self.tps[1:], self.tps[:-1], out=grows[1:])
        return np.flatnonzero(grows)

    # -- scikit-learn equivalents -------------------------------------------------------------

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoid, ties as half), from exact integer sums."""
        n_pos, n_neg = self.n_pos, self.n_neg
        if n_pos == 0 or n_neg == 0:
            logger.warning("AUROC is undefined with only one class present (%d positives, "
                           "%d negatives); returning nan", n_pos, n_neg)
            return math.nan
        k = self.positive_steps
        dtps = self.tps[k] - _previous(self.tps, k)
        dfps = self.fps[k] - _previous(self.fps, k)
        # Each positive beats the negatives below its score and ties with those at it:
        # 2 * area * n_pos * n_neg = sum dtps * (2 * (n_neg - fps) + dfps), exact in int64.
        twice = int(np.sum(dtps * (2 * (n_neg - self.fps[k]) + dfps), dtype=np.int64))
        return twice / (2.0 * n_pos * n_neg)

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall in sklearn's ``precision_recall_curve`` order (recall falling,
        with the final (precision 1, recall 0) point appended). Needs at least one positive."""
        tps = self.tps.astype(np.float64)
        precision = tps / (tps + self.fps)
        recall = tps / tps[-1]
        return (np.concatenate((precision[::-1], [1.0])), np.concatenate((recall[::-1], [0.0])))

    def _has_positives(self, name: str) -> bool:
        if self.n_pos == 0:
            logger.warning("%s is undefined without positive samples; returning nan", name)
            return False
        return True

    def average_precision(self) -> float:
        """sklearn's ``average_precision_score``: sum over thresholds of (R_n - R_n-1) P_n."""
        if not self._has_positives("average precision"):
            return math.nan
        k = self.positive_steps
        tps = self.tps[k].astype(np.float64)
        recall_step = (tps - _previous(self.tps, k)) / self.n_pos
        return float(max(0.0, np.sum(recall_step * (tps / (tps + self.fps[k])))))

    def f1_max(self) -> float:
        """Largest F1 = 2PR/(P+R) over the precision-recall curve (0 where P+R = 0)."""
        if not self._has_positives("F1-max"):
            return math.nan
        k = self.positive_steps
        tps = self.tps[k].astype(np.float64)
        precision = tps / (tps + self.fps[k])
        recall = tps / self.n_pos
        return float(np.max(2.0 * precision * recall / (precision + recall)))

    def aupr_trapezoid(self) -> float:
        """Trapezoid area under the precision-recall curve: ``auc(recall, precision)``."""
        if not self._has_positives("AUPR"):
            return math.nan
        k = self.positive_steps
        tps = self.tps[k].astype(np.float64)
        prev_tps = _previous(self.tps, k).astype(np.float64)
        prev_all = _previous(self.tps + self.fps, k).astype(np.float64)
        precision = tps / (tps + self.fps[k])
        # The curve starts at (recall 0, precision 1); vertical segments add no area.
        prev_precision = np.divide(prev_tps, prev_all, out=np.ones_like(prev_tps),
                                   where=prev_all > 0)
        return float(np.sum((tps - prev_tps) / self.n_pos * (precision + prev_precision) / 2.0))


def _as_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores).ravel()
    if s.dtype == np.bool_ or not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating) and np.isnan(s).any():
        raise ValueError("scores contain NaN: fix the map/score computation before evaluating")
    return s


def _as_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels).ravel()
    if y.size != n:
        raise ValueError(f"labels and scores differ in size ({y.size} vs {n})")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("labels must be 0/1 (or bool); got other values")
        y = y.astype(bool)
    return y


def _float32_exact(s: np.ndarray) -> np.ndarray | None:
    """The scores as float32 when that loses nothing (so that the fast packed sort applies)."""
    if s.dtype == np.float32:
        return s
    if s.dtype in (np.float16, np.int8, np.uint8, np.int16, np.uint16):
        return s.astype(np.float32)
    s32 = s.astype(np.float32)
    if np.array_equal(s32, s):
        return s32
    return None


def _sortable_keys_f32(s32: np.ndarray) -> np.ndarray:
    """uint64 keys whose unsigned order is the numeric order of the float32 values."""
    keys = (s32 + np.float32(0.0)).view(np.uint32).astype(np.uint64)  # + 0.0: -0.0 -> +0.0
    # Non-negative floats: set the top bit; negative floats: flip all 32 bits.
    keys ^= ((keys >> np.uint64(31)) * np.uint64(0x7FFFFFFF)) | np.uint64(0x80000000)
    return keys


def _packed_sorted_keys(y: np.ndarray, s32: np.ndarray) -> np.ndarray:
    """uint64 keys, ascending: 2 * (order-preserving bits of the float32 score) + label."""
    keys = _sortable_keys_f32(s32)
    keys <<= np.uint64(1)
    keys |= y
    keys.sort()
    return keys


def _key_to_f32(keys: np.ndarray) -> np.ndarray:
    keys = keys.astype(np.uint32)
    positive = (keys >> np.uint32(31)).astype(bool)
    bits = np.where(positive, keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.view(np.float32)


def binary_clf_curve(labels: np.ndarray, scores: np.ndarray, *,
                     keep_positive_order: bool = False) -> BinaryCurve:
    """True/false positive counts at every distinct score, highest first.

    Same output as scikit-learn's private ``_binary_clf_curve`` (thresholds, tps, fps), ties
    grouped. Scores that are exactly representable in float32 take a fast path: the score's
    order-preserving bits and the label are packed into one uint64 and sorted (no argsort).
    Other scores are argsorted in their own precision.
    """
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    n = s.size
    if n == 0:
        raise ValueError("no scores to evaluate")
    s32 = _float32_exact(s)
    if s32 is not None:
        keys = _packed_sorted_keys(y, s32)  # ascending
        low_byte = 0 if sys.byteorder == "little" else 7
        y_sorted = keys.view(np.uint8)[low_byte::8] & np.uint8(1)
        keys >>= np.uint64(1)
        ends = np.flatnonzero(keys[1:] != keys[:-1])  # last index of each group but the top one
        source = np.empty(ends.size + 1, dtype=np.uint64)
        np.take(keys, ends, out=source[:-1])
        source[-1] = keys[-1]
        del keys
    else:
        order = np.argsort(s, kind="stable")
        s_sorted = s[order]
        y_sorted = y[order].view(np.uint8)
        del order
        ends = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
        source = s_sorted[np.append(ends, n - 1)].astype(np.float64)
        del s_sorted
    # In ascending order the group that starts at index i has n - i samples at or above it.
    cum = np.cumsum(y_sorted, dtype=np.int32 if n < 2**31 - 1 else np.int64)
    del y_sorted
    n_pos = int(cum[-1])
    tps = np.zeros(ends.size + 1, dtype=np.int64)  # first: positives below each group
    tps[1:] = cum[ends]
    del cum
    fps = np.zeros(ends.size + 1, dtype=np.int64)  # first: group starts
    np.add(ends, 1, out=fps[1:])
    del ends
    fps -= tps            # negatives below the group
    fps *= -1
    fps += n - n_pos      # negatives at or above
    tps *= -1
    tps += n_pos          # positives at or above
    positive_order = None
    if keep_positive_order:
        positive_order = np.argsort(s[y], kind="stable")[::-1]
    # Descending views: no copies.
    return BinaryCurve(tps=tps[::-1], fps=fps[::-1], positive_order=positive_order,
                       threshold_source=source[::-1])


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; equals ``sklearn.metrics.roc_auc_score``."""
    return binary_clf_curve(labels, scores).auroc()


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Equals ``sklearn.metrics.average_precision_score``."""
    return binary_clf_curve(labels, scores).average_precision()


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Max F1 over all thresholds of ``precision_recall_curve`` (0 where P+R = 0)."""
    return binary_clf_curve(labels, scores).f1_max()


def aupr_trapezoid(labels: np.ndarray, scores: np.ndarray) -> float:
    """``auc(recall, precision)`` on ``precision_recall_curve``: the authors' image AUPR."""
    return binary_clf_curve(labels, scores).aupr_trapezoid()


# --------------------------------------------------------------------------------------------
# Region overlap
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# One class
# --------------------------------------------------------------------------------------------


@dataclass
class ClassMetrics:
    """The metric set of SPEC section 6 for one class; every value is in [0, 1] or nan.

    pro_authors: the authors' PRO (paper Table 1). aupro_03: standard AUPRO@0.3.
    """

    pixel_auroc: float
    pixel_ap: float
    pixel_f1_max: float
    pro_authors: float
    aupro_03: float
    image_auroc: float
    image_f1_max: float
    image_aupr: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@contextmanager
def _timed(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def evaluate_class(masks: np.ndarray, maps: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                   *, timings: dict[str, float] | None = None) -> ClassMetrics:
    """All metrics of one class.

    masks: [N,H,W] ground truth (bool; integers > 0; floats > 0.5), all-zero for normal images.
    maps: [N,H,W] anomaly maps at the mask resolution. labels: [N] 0 normal / 1 anomalous.
    scores: [N] image scores. Pixel metrics pool all pixels of the class. ``timings``, when
    given, receives the seconds spent per stage.
    """
    with _timed(timings, "validate"):
        masks, maps = _as_masks_maps(masks, maps)
        labels = np.asarray(labels).ravel()
        scores = np.asarray(scores).ravel()
        if labels.size != masks.shape[0] or scores.size != masks.shape[0]:
            raise ValueError(f"{masks.shape[0]} maps but {labels.size} labels and "
                             f"{scores.size} scores: give one label and score per image")
    with _timed(timings, "pixel_curve"):
        curve = binary_clf_curve(masks, maps, keep_positive_order=True)
    with _timed(timings, "pixel_auroc"):
        pixel_auroc = curve.auroc()
    with _timed(timings, "pixel_ap"):
        pixel_ap = curve.average_precision()
    with _timed(timings, "pixel_f1_max"):
        pixel_f1 = curve.f1_max()
    with _timed(timings, "regions"):
        rw = region_weights(masks)
    with _timed(timings, "pro_authors"):
        pro_a = _pro_authors_from(curve, rw, maps, AUTHORS_PRO_STEPS, DEFAULT_FPR_LIMIT)
    with _timed(timings, "aupro_03"):
        aupro_03 = _aupro_from(curve, rw, DEFAULT_FPR_LIMIT)
    with _timed(timings, "image"):
        image_curve = binary_clf_curve(labels, scores)
        image_auroc = image_curve.auroc()
        image_f1 = image_curve.f1_max()
        image_aupr = image_curve.aupr_trapezoid()
    return ClassMetrics(pixel_auroc=pixel_auroc, pixel_ap=pixel_ap, pixel_f1_max=pixel_f1,
                        pro_authors=pro_a, aupro_03=aupro_03, image_auroc=image_auroc,
                        image_f1_max=image_f1, image_aupr=image_aupr)


def mean_over_classes(results: Sequence[ClassMetrics], *, skip_nan: bool = False) -> ClassMetrics:
    """Unweighted mean over classes (SPEC section 6). A nan in any class makes that field nan
    unless ``skip_nan``."""
    if not results:
        raise ValueError("no class results to average")
    values = {}
    for f in fields(ClassMetrics):
        column = np.array([getattr(r, f.name) for r in results], dtype=np.float64)
        if np.isnan(column).any():
            logger.warning("%s is nan for %d of %d classes%s", f.name, int(np.isnan(column).sum()),
                           column.size, " (left out of the mean)" if skip_nan else "")
        if skip_nan:
            values[f.name] = float(np.nanmean(column)) if (~np.isnan(column)).any() else math.nan
        else:
            values[f.name] = float(np.mean(column))
    return ClassMetrics(**values)
