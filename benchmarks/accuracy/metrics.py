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

The threshold metrics live in :mod:`.curves`, the region-overlap scores in :mod:`.regions`; this
module re-exports both and adds the per-class metric set and the mean over classes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np

from .curves import BinaryCurve, aupr_trapezoid, auroc, average_precision, binary_clf_curve, f1_max
from .regions import (
    AUTHORS_PRO_STEPS,
    DEFAULT_FPR_LIMIT,
    RegionWeights,
    _as_masks_maps,
    _aupro_from,
    _pro_authors_from,
    aupro,
    pro_authors,
    pro_curve,
    region_weights,
)

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



# --------------------------------------------------------------------------------------------
# One class, and the mean over classes
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
