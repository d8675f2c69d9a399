"""Metrics against scikit-learn and against plain, slow reference loops written here."""

from __future__ import annotations

import logging
import math
import warnings

import cv2
import numpy as np
import pytest

from anoclip.benchmarks.accuracy import metrics as M

skm = pytest.importorskip("sklearn.metrics")

TOL = 1e-6


def _random_case(rng: np.random.Generator, kind: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(2, 3000))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    if kind == 0:
        s = rng.integers(0, 8, n).astype(np.float64)  # heavy ties
    elif kind == 1:
        s = rng.random(n).astype(np.float32)
    elif kind == 2:
        s = rng.standard_normal(n) * 1e-3  # float64, not float32-exact: argsort path
    else:
        s = np.round(rng.standard_normal(n), 1).astype(np.float32)  # ties, negatives, -0.0
    return y, s


def _sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    p, r, _ = skm.precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.max(np.where(np.isfinite(f1), f1, 0.0)))


@pytest.mark.parametrize("kind", range(4))
def test_threshold_metrics_match_sklearn(kind: int) -> None:
    rng = np.random.default_rng(kind)
    for _ in range(25):
        y, s = _random_case(rng, kind)
        assert abs(M.auroc(y, s) - skm.roc_auc_score(y, s)) <= TOL
        assert abs(M.average_precision(y, s) - skm.average_precision_score(y, s)) <= TOL
        assert abs(M.f1_max(y, s) - _sk_f1_max(y, s)) <= TOL
        p, r, _ = skm.precision_recall_curve(y, s)
        assert abs(M.aupr_trapezoid(y, s) - skm.auc(r, p)) <= TOL


def test_curve_matches_sklearn_counts() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)
    curve = M.binary_clf_curve(y, s)
    fps, tps, thr = skm.roc_curve(y, s, drop_intermediate=False)[0:3]
    # roc_curve prepends (0, 0, inf) and normalises; compare the raw counts.
    np.testing.assert_array_equal(curve.thresholds, thr[1:])
    np.testing.assert_allclose(curve.tps / curve.n_pos, tps[1:])
    np.testing.assert_allclose(curve.fps / curve.n_neg, fps[1:])


def test_negative_zero_and_signed_scores_tie() -> None:
    y = np.array([0, 1, 0, 1])
    s = np.array([-0.0, 0.0, -1.5, 2.0], dtype=np.float32)
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert M.binary_clf_curve(y, s).thresholds.size == 3


def test_pooled_pixels_of_maps_match_sklearn() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 20, 20), bool)
    masks[1, 3:8, 4:9] = True
    masks[2, 10:15, 10:18] = True
    maps = rng.random((4, 20, 20)).astype(np.float32)
    maps[masks] += 0.4
    labels = np.array([0, 1, 1, 0])
    scores = np.array([0.1, 0.7, 0.4, 0.5])
    res = M.evaluate_class(masks, maps, labels, scores)
    y, s = masks.ravel(), maps.ravel()
    assert res.pixel_auroc == pytest.approx(skm.roc_auc_score(y, s), abs=TOL)
    assert res.pixel_ap == pytest.approx(skm.average_precision_score(y, s), abs=TOL)
    assert res.pixel_f1_max == pytest.approx(_sk_f1_max(y, s), abs=TOL)
    assert res.image_auroc == pytest.approx(skm.roc_auc_score(labels, scores), abs=TOL)
    p, r, _ = skm.precision_recall_curve(labels, scores)
    assert res.image_aupr == pytest.approx(skm.auc(r, p), abs=TOL)
    assert res.image_f1_max == pytest.approx(_sk_f1_max(labels, scores), abs=TOL)
    assert res.aupro_03 == pytest.approx(_aupro_reference(masks, maps), abs=TOL)
    assert res.pro_authors == pytest.approx(_pro_authors_reference(masks, maps), abs=TOL)
    for value in res.as_dict().values():
        assert 0.0 <= value <= 1.0


# --- plain reference loops -------------------------------------------------------------------


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [lab == i for i in range(1, n)]


def _overlap_and_fpr(masks: np.ndarray, detected: np.ndarray) -> tuple[float, float]:
    overlaps = [detected[i][r].mean() for i, m in enumerate(masks) for r in _regions(m)]
    normal = ~masks
    return float(np.mean(overlaps)), float((detected & normal).sum() / normal.sum())


def _aupro_reference(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Every distinct value as a threshold (detected: >= t), trapezoid up to the limit."""
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pro, fpr = _overlap_and_fpr(masks, maps >= t)
        fprs.append(fpr)
        pros.append(pro)
    fprs_a, pros_a = np.array(fprs), np.array(pros)
    area = 0.0
    for i in range(1, len(fprs_a)):
        x0, x1, y0, y1 = fprs_a[i - 1], fprs_a[i], pros_a[i - 1], pros_a[i]
        if x0 >= limit:
            break
        if x1 > limit:  # interpolate the last piece
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _pro_authors_reference(masks: np.ndarray, maps: np.ndarray) -> float:
    """The authors' procedure step by step: 200 thresholds, > th, FPR < 0.3, min-max, trapezoid."""
    lo, hi = maps.min(), maps.max()
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / 200):
        pro, fpr = _overlap_and_fpr(masks, maps > th)
        pros.append(pro)
        fprs.append(fpr)
    pros_a, fprs_a = np.array(pros), np.array(fprs)
    keep = fprs_a < 0.3
    f = fprs_a[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return float(skm.auc(f, pros_a[keep]))


@pytest.mark.parametrize("quantise", [None, 0.05, 0.2])
def test_aupro_matches_slow_reference(quantise: float | None) -> None:
    rng = np.random.default_rng(11)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:6, 2:5] = True
    masks[0, 9:12, 9:15] = True  # two regions in one image
    masks[0, 6, 5] = True  # touches the first region diagonally: 8-connected, same region
    masks[1, 0:3, 13:16] = True
    maps = rng.random((3, 16, 16)).astype(np.float32)
    maps[masks] += rng.uniform(-0.2, 0.5, masks.sum()).astype(np.float32)
    if quantise:
        maps = (np.round(maps / quantise) * quantise).astype(np.float32)  # many ties
    assert M.aupro(masks, maps) == pytest.approx(_aupro_reference(masks, maps), abs=1e-9)
    for limit in (0.05, 0.5, 1.0):
        assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(
            _aupro_reference(masks, maps, limit), abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pro_authors_matches_slow_reference(dtype: type) -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((4, 24, 24), bool)
    masks[0, 3:9, 3:7] = True
    masks[1, 12:20, 2:6] = True
    masks[1, 1:3, 20:23] = True
    masks[3, 10:14, 10:14] = True
    maps = rng.random((4, 24, 24)).astype(dtype)
    maps[masks] += dtype(0.3)
    assert M.pro_authors(masks, maps) == pytest.approx(_pro_authors_reference(masks, maps),
                                                       abs=1e-9)


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], bool)
    maps = np.array([[[0.9, 0.5, 0.7], [0.1, 0.2, 0.3]]])
    return masks, maps


def test_aupro_hand_case() -> None:
    # Curve (fpr, pro): (0,0) (0,.5) (.25,.5) (.25,1) (.5,1) ...
    # Area on [0, .3]: .25 * .5 + .05 * 1 = .175; / .3
    masks, maps = _hand_case()
    assert M.aupro(masks, maps) == pytest.approx(0.175 / 0.3, abs=1e-12)
    fpr, pro, thr = M.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr[:4], [0, 0, 0.25, 0.25])
    np.testing.assert_allclose(pro[:4], [0, 0.5, 0.5, 1.0])
    assert thr[0] == math.inf and thr[1] == 0.9


def test_pro_authors_hand_case() -> None:
    # Kept thresholds (FPR < .3): th in [.3, .7) -> FPR .25 and PRO 1 (th < .5) or .5;
    # th >= .7 -> FPR 0, PRO .5. Rescaled FPR 1 -> 0 at PRO .5: area .5.
    masks, maps = _hand_case()
    assert M.pro_authors(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_perfect_maps() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 10, 10), bool)
    masks[0, 2:5, 2:5] = True
    masks[2, 6:9, 1:4] = True
    maps = rng.uniform(0.0, 0.5, masks.shape)
    maps[masks] = 1.0
    assert M.aupro(masks, maps) == pytest.approx(1.0)
    assert M.pro_authors(masks, maps) == pytest.approx(1.0)
    assert M.auroc(masks, maps) == 1.0
    assert M.average_precision(masks, maps) == pytest.approx(1.0)
    assert M.f1_max(masks, maps) == pytest.approx(1.0)


def test_region_weights_are_8_connected() -> None:
    mask = np.zeros((1, 5, 5), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal neighbours: one region
    mask[0, 4, 4] = True
    rw = M.region_weights(mask)
    assert rw.n_regions == 2
    np.testing.assert_allclose(rw.weights, [0.25, 0.25, 0.5])


def test_no_anomalous_pixels_gives_nan_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    masks = np.zeros((2, 8, 8), bool)
    maps = np.random.default_rng(0).random((2, 8, 8))
    with caplog.at_level(logging.WARNING):
        res = M.evaluate_class(masks, maps, np.array([0, 1]), np.array([0.2, 0.8]))
    assert math.isnan(res.pixel_auroc) and math.isnan(res.aupro_03)
    assert math.isnan(res.pro_authors) and math.isnan(res.pixel_f1_max)
    assert res.image_auroc == 1.0
    assert "undefined" in caplog.text


def test_single_class_labels_and_bad_inputs() -> None:
    assert math.isnan(M.auroc(np.zeros(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.array([0, 1]), np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="0/1"):
        M.auroc(np.array([0, 2]), np.array([0.5, 0.1]))
    with pytest.raises(ValueError, match="same shape"):
        M.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="one label"):
        M.evaluate_class(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), np.zeros(3), np.zeros(2))


def test_constant_map_and_mask_dtypes() -> None:
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, 1:3, 1:3] = 255  # 0/255 integers count as > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(M.pro_authors(masks, np.ones((1, 6, 6))))
    maps = np.random.default_rng(1).random((1, 6, 6))
    as_float = masks.astype(np.float32) / 255.0  # floats count as > 0.5
    assert M.aupro(masks, maps) == M.aupro(as_float, maps) == M.aupro(masks > 0, maps)


def test_mean_over_classes() -> None:
    a = M.ClassMetrics(*([0.5] * 8))
    b = M.ClassMetrics(*([1.0] * 7 + [math.nan]))
    mean = M.mean_over_classes([a, b])
    assert mean.pixel_auroc == 0.75 and math.isnan(mean.image_aupr)
    assert M.mean_over_classes([a, b], skip_nan=True).image_aupr == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_n_above_matches_brute_force(dtype: type) -> None:
    rng = np.random.default_rng(2)
    s = (np.round(rng.standard_normal(400), 2) if dtype is np.float32
         else rng.standard_normal(400)).astype(dtype)
    curve = M.binary_clf_curve(rng.integers(0, 2, 400), s)
    probes = np.concatenate([s.astype(np.float64), rng.standard_normal(200),
                             np.nextafter(s.astype(np.float64), np.inf), [-10.0, 10.0]])
    expected = (curve.thresholds[None, :] > probes[:, None]).sum(axis=1)
    np.testing.assert_array_equal(curve.n_above(probes), expected)
