"""Threshold metrics from one sorted pass over the scores, numpy only.

:func:`binary_clf_curve` sorts once and groups ties exactly as scikit-learn does; every metric
below reads that curve, so the numbers agree with ``sklearn.metrics`` to floating-point rounding:
:func:`auroc` (``roc_auc_score``), :func:`average_precision` (``average_precision_score``),
:func:`f1_max` (largest 2PR/(P+R) over ``precision_recall_curve``, 0 where P+R = 0) and
:func:`aupr_trapezoid` (``auc(recall, precision)``: the authors' image AUPR).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

logger = logging.getLogger(__name__)

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
