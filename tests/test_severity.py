"""The severity scale (0 at the normal centre, 1 at the threshold) in records and annotations, and
the fixed colour scale of overlays: a pure function of the map value and the class's pixel
thresholds (docs/method.md, section 5c)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from anoclip.runtime.decision import ClassThreshold, decide, severity
from anoclip.runtime.detector import Result
from anoclip.runtime.overlay import (SCALE_TABLE, THRESHOLD_RGB, colour_scale_for, colourise, heat_colours,
                                     overlay)
from anoclip.runtime.records import make_error_record, make_record
from anoclip.runtime.stream.annotate import annotate, headline
from anoclip.runtime.stream.events import FrameEvent
from anoclip.runtime.thresholds import ClassCalibration, ThresholdTable

RECORD_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "record.schema.json").read_text())
CALIBRATED = ClassThreshold(0.52, 0.6, "calibrated", centre=0.5, pixel_centre=0.4)


def _result(score: float, amap: np.ndarray, threshold: ClassThreshold | None) -> Result:
    result = Result(score, amap, amap, np.zeros((1, 4), np.float32), "bottle", amap.shape, 1)
    result.threshold = threshold
    result.anomalous, result.regions = decide(score, amap, threshold)
    return result


def _checked(record: dict) -> dict:
    record = json.loads(json.dumps(record, allow_nan=False))
    jsonschema.Draft202012Validator(RECORD_SCHEMA).validate(record)
    return record


# ----------------------------------------------------------------------------------------------
# severity


def test_severity_is_zero_at_the_normal_centre_and_one_at_the_threshold():
    assert CALIBRATED.severity(0.5) == 0.0
    assert CALIBRATED.severity(0.52) == 1.0
    assert CALIBRATED.severity(0.54) == pytest.approx(2.0)
    assert CALIBRATED.severity(0.49) == pytest.approx(-0.5)
    assert CALIBRATED.pixel_severity(0.4) == 0.0 and CALIBRATED.pixel_severity(0.6) == 1.0
    assert severity(0.7, None) is None
    assert ClassThreshold(0.6, None, "calibrated", 0.6).severity(0.55) is None  # threshold at the centre: no scale


def test_no_severity_without_a_calibration():
    override = ClassThreshold.in_force(None, 0.52, 0.6, centres=(0.5, 0.4))  # no calibration: its centres are not kept
    assert override == ClassThreshold(0.52, 0.6, "override")
    assert override.severity(0.6) is None and override.pixel_scale is None
    mixed = ClassThreshold.in_force((0.53, 0.6), image=0.52, centres=(0.5, 0.4))
    assert (mixed.origin, mixed.severity(0.52), mixed.pixel_severity(0.6)) == ("calibrated+override", None, 1.0)
    assert ClassThreshold(0.4, 0.3, "calibrated", 0.5, 0.4).severity(0.6) is None  # a threshold below the centre


def _calibration(**changes) -> ClassCalibration:
    record = ClassCalibration(
        image=0.52, pixel=0.6, frames=20, quantile=0.99, margin=0.0, image_quantile_value=0.52, pixel_quantile=0.999,
        pixel_margin=0.0, pixel_quantile_value=0.6, pixel_values=1000, score_min=0.49, score_max=0.53,
        score_mean=0.505, model="visual", model_sha256="0" * 64, text_features_sha256="1" * 64, tta=False,
        tta_settings=None, tiling="none", smoothing_sigma=4.0, created="2026-01-01T00:00:00Z", command="test",
        normal=["normal/"], score_median=0.5, pixel_median=0.4)
    return replace(record, **changes)


def test_the_calibration_stores_its_centres_and_reads_files_without_them():
    record = _calibration()
    assert (record.centre, record.pixel_centre) == (0.5, 0.4)
    table = ThresholdTable.from_dict(json.loads(ThresholdTable({"bottle": record}).to_json()))
    assert table.classes["bottle"] == record
    older = asdict(record)
    del older["score_median"], older["pixel_median"]  # a file written before the centres were stored
    read = ThresholdTable.from_dict({"format": "anoclip-thresholds", "format_version": 2,
                                     "classes": {"bottle": older}}).classes["bottle"]
    assert (read.score_median, read.centre, read.pixel_centre) == (None, 0.505, 0.505)  # the mean, for both
    with pytest.raises(ValueError, match="score_median"):
        ThresholdTable.from_dict({"format": "anoclip-thresholds", "format_version": 2,
                                  "classes": {"bottle": {**asdict(record), "score_median": 0.6}}})


# ----------------------------------------------------------------------------------------------
# records


def test_records_carry_the_severity_beside_the_raw_score():
    amap = np.linspace(0.2, 0.8, 64, dtype=np.float32).reshape(8, 8)
    record = _checked(make_record(_result(0.53, amap, CALIBRATED), "a.png"))
    assert record["score"] == 0.53 and record["severity"] == pytest.approx(1.5)
    assert record["map_severity"] == pytest.approx((0.8 - 0.4) / (0.6 - 0.4), abs=1e-6)
    assert record["anomalous"] is True
    for threshold in (None, ClassThreshold(0.52, 0.6, "override")):
        bare = _checked(make_record(_result(0.53, amap, threshold), "a.png"))
        assert (bare["severity"], bare["map_severity"]) == (None, None)
    error = _checked(make_error_record("bottle", "a.png", "RuntimeError: failed"))
    assert (error["severity"], error["map_severity"]) == (None, None)
    with pytest.raises(jsonschema.ValidationError):  # an error record has no severity
        _checked({**error, "severity": 1.0})
    older = make_record(_result(0.53, amap, CALIBRATED), "a.png")
    del older["severity"], older["map_severity"]
    _checked(older)  # version 2 records written before the field still validate


# ----------------------------------------------------------------------------------------------
# the fixed colour scale


def test_the_fixed_colour_scale_is_the_same_on_every_frame():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.3, 0.9, (16, 16)).astype(np.float32)
    scale = CALIBRATED.pixel_scale
    first = heat_colours(values, scale)
    other_frame = np.concatenate([values, np.full((4, 16), 0.05, np.float32)])  # another frame, another range
    assert np.array_equal(heat_colours(other_frame, scale)[:16], first)
    assert np.array_equal(heat_colours(values.copy(), CALIBRATED.pixel_scale), first)  # another run
    # the per-frame scale, by contrast, colours the same values differently
    assert not np.array_equal(colourise(other_frame)[:16], colourise(values))
    # and on two cameras' frames, blended over a black image, the same map gives the same overlay
    black = np.zeros((16, 16, 3), np.uint8)
    assert np.array_equal(overlay(black, values, 0.5, scale=scale), overlay(black.copy(), values, 0.5, scale=scale))


def test_the_threshold_gets_its_colour_and_the_normal_centre_the_coolest():
    centre, threshold = CALIBRATED.pixel_scale
    amap = np.array([[threshold, centre, centre - 0.1, 0.0, 1.0, centre + 2 * (threshold - centre)]], np.float32)
    colours = heat_colours(amap, (centre, threshold))
    assert tuple(colours[0, 0]) == THRESHOLD_RGB
    assert all(tuple(c) == tuple(SCALE_TABLE[0]) for c in colours[0, 1:4])  # at and below the centre: the coolest
    assert tuple(colours[0, 4]) == tuple(colours[0, 5]) == tuple(SCALE_TABLE[-1])  # twice the distance and above
    warmth = heat_colours(np.linspace(centre, threshold, 50)[None, :], (centre, threshold))[0].astype(int)
    assert warmth[0, 0] < warmth[-1, 0]  # red grows towards the threshold


def test_the_colour_scale_falls_back_to_the_frame_without_a_calibrated_pixel_threshold():
    assert colour_scale_for(CALIBRATED) == (0.4, 0.6)
    assert colour_scale_for(CALIBRATED, "frame") is None
    assert colour_scale_for(None) is None and colour_scale_for(ClassThreshold(0.5, 0.6, "override")) is None
    with pytest.raises(ValueError):
        colour_scale_for(CALIBRATED, "auto")


# ----------------------------------------------------------------------------------------------
# the annotated frame


def _event(score: float, threshold: ClassThreshold | None, source: str = "cam0") -> FrameEvent:
    frame = np.full((96, 128, 3), 90, np.uint8)
    amap = np.full((96, 128), 0.45, np.float32)
    return FrameEvent(source=source, frame_index=3, captured=time.time(), result=_result(score, amap, threshold),
                      latency_ms=None, frame=frame)


def test_the_annotation_shows_the_severity_against_one():
    assert headline(_event(0.51, CALIBRATED), "ok") == "ok  severity 0.50 / 1.00"
    assert headline(_event(0.53, CALIBRATED), "ANOMALY") == "ANOMALY  severity 1.50 / 1.00"
    assert headline(_event(0.53, ClassThreshold(0.52, None, "override")), "ANOMALY") == "ANOMALY  no thresholds"
    assert headline(_event(0.53, None), "no thresholds") == "no thresholds"
    # the heat map of two cameras' frames with the same map is drawn the same
    one, two = annotate(_event(0.51, CALIBRATED, "cam0")), annotate(_event(0.51, CALIBRATED, "cam1"))
    assert one.shape == (96, 128, 3) and np.array_equal(one[40:60, 40:80], two[40:60, 40:80])
    frame_scaled = annotate(_event(0.51, CALIBRATED), colour_scale="frame")
    assert not np.array_equal(frame_scaled[40:60, 40:80], one[40:60, 40:80])


def test_the_colour_bar_says_no_thresholds_only_when_none_fix_the_scale():
    from anoclip.runtime.overlay import legend_note

    assert legend_note(CALIBRATED) == ""  # --colour-scale frame on a calibrated class: nothing to excuse
    assert legend_note(None) == "no thresholds"
    assert legend_note(ClassThreshold(0.52, 0.6, "override")) == "no thresholds"
