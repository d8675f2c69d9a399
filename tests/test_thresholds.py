"""Score thresholds from normal frames: the decision they make, the file and manifest entry that
hold them, their provenance, when they are (not) applied, and the calibrate and predict commands."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from anoclip.calibration.threshold import (ThresholdSettings, calibrate_threshold, measure_threshold,
                                           save_threshold)
from anoclip.runtime.artifacts import load_artifacts, read_manifest, write_manifest
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError, ArtifactError
from anoclip.runtime.integrity import sha256_file
from anoclip.runtime.overlay import REGION_RGB, draw_regions
from anoclip.runtime.decision import ClassThreshold, decide, find_regions
from anoclip.runtime.thresholds import ThresholdTable, read_thresholds, text_features_sha256, threshold_bytes
from anoclip.runtime.tta import TTAConfig

from conftest import TINY_CONFIG, copy_artifacts, one_error_line, run_cli
from fakes import defect_frame, normal_frame, red_defect_detector, write_clip

DEFECT_BOX = (48, 40, 40, 40)  # where defect_frame puts the red square (x, y, width, height)


def rgb(bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bgr[:, :, ::-1])


def calibrate(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("calibrate", "threshold", "--artifacts", str(folder), *args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def thresholds_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("thresholds"))


def overlaps(box: list[int], other: tuple[int, int, int, int]) -> bool:
    x, y, w, h = box
    ox, oy, ow, oh = other
    return x < ox + ow and ox < x + w and y < oy + oh and oy < y + h


@pytest.fixture
def folder(tiny_artifacts, tmp_path) -> Path:
    return copy_artifacts(tiny_artifacts, tmp_path / "artifacts")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "normal.avi", 24)


@pytest.fixture(scope="module")
def calibrated(tiny_artifacts, clip, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of the tiny artifacts with bottle calibrated by the command, on every 2nd frame of a clip."""
    folder = copy_artifacts(tiny_artifacts, tmp_path_factory.mktemp("calibrated") / "artifacts")
    proc = calibrate(folder, "--class", "bottle", "--normal", str(clip), "--stride", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    return folder, proc


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    cv2.imwrite(str(folder / "normal.png"), normal_frame(500))
    cv2.imwrite(str(folder / "defect.png"), defect_frame(500))
    return folder


# ------------------------------------------------------------------------------------------------
# the decision


def test_find_regions_are_8_connected_components_largest_first():
    amap = np.zeros((10, 12), np.float32)
    amap[1:3, 1:3] = 0.9  # 4 pixels ...
    amap[3, 3] = 0.9  # ... and a diagonal neighbour: one region of 5
    amap[6:9, 5:11] = 0.8  # 18 pixels
    amap[0, 11] = 0.5  # equal to the threshold: not above it
    regions = find_regions(amap, 0.5)
    assert regions == [{"box": [5, 6, 6, 3], "area": 18}, {"box": [1, 1, 3, 3], "area": 5}]
    assert all(type(v) is int for r in regions for v in [*r["box"], r["area"]])
    assert find_regions(amap, 0.5, min_area=6) == [regions[0]]
    assert find_regions(amap, 0.95) == []


def test_decide_uses_only_the_thresholds_it_has():
    amap = np.zeros((4, 4), np.float32)
    amap[1, 1] = 1.0
    assert decide(0.7, amap, None) == (None, [])
    assert decide(0.7, amap, ClassThreshold(0.6, None, "override")) == (True, [])
    assert decide(0.5, amap, ClassThreshold(0.6, None, "override")) == (False, [])
    assert decide(0.6, amap, ClassThreshold(0.6, None, "override"))[0] is False  # strictly above
    assert decide(0.7, amap, ClassThreshold(None, 0.5, "override")) == (None, [{"box": [1, 1, 1, 1], "area": 1}])


def test_draw_regions_outlines_the_region_on_a_copy():
    image = np.full((40, 40, 3), 128, np.uint8)
    amap = np.zeros((20, 20), np.float32)  # half the image's size: resized to it
    amap[5:15, 5:15] = 1.0
    drawn = draw_regions(image, amap, 0.5)
    assert drawn.shape == image.shape and (image == 128).all()
    outline = np.all(drawn == REGION_RGB, axis=-1)
    ys, xs = np.nonzero(outline)
    assert outline.any() and 8 <= xs.min() <= 12 and 28 <= xs.max() <= 31 and 8 <= ys.min() <= 12
    assert not outline[20, 20]  # the inside is not filled


# ------------------------------------------------------------------------------------------------
# calibrating through the library, with a backend whose defects score high


def test_calibrated_thresholds_flag_the_defect_and_pass_normal_frames(folder):
    detector = red_defect_detector(folder, "bottle")
    normal = [rgb(normal_frame(i)) for i in range(30)]
    settings = ThresholdSettings(quantile=0.99, margin=0.002, pixel_quantile=1.0, pixel_margin=0.002)
    record, name = calibrate_threshold(detector, "bottle", normal, settings, normal=["30 synthetic frames"],
                                       command="anoclip calibrate threshold --class bottle (test)")
    # provenance: what was run, on what
    assert record.frames == 30 and record.quantile == 0.99 and record.margin == 0.002
    assert record.image == pytest.approx(record.image_quantile_value + 0.002)
    assert record.pixel == pytest.approx(record.pixel_quantile_value + 0.002)
    assert record.score_min <= record.image_quantile_value <= record.score_max
    manifest = read_manifest(folder)
    assert record.model == "visual" and record.model_sha256 == manifest.files[manifest.models["visual"].file]
    bottle = load_artifacts(folder).prompts.get("bottle").text_features
    assert record.text_features_sha256 == text_features_sha256(bottle)
    assert record.tta is False and record.tta_settings is None and record.tiling == "auto"
    assert record.command.endswith("(test)") and record.normal == ["30 synthetic frames"]
    assert record.pixel_values > 30 and record.created.endswith("Z")
    stored = read_thresholds(folder / name).classes["bottle"]
    assert stored == record

    # a fresh detector over the folder reads them back and decides
    detector = red_defect_detector(folder, "bottle")
    threshold = detector.threshold_for("bottle")
    assert record.score_min <= record.score_median <= record.score_max and record.pixel_median < record.pixel
    assert threshold == ClassThreshold(record.image, record.pixel, "calibrated", record.score_median,
                                       record.pixel_median)
    result = detector.predict(rgb(defect_frame(77)), "bottle")
    anomalous, regions = decide(result.score, result.anomaly_map_full, threshold)
    assert anomalous is True and regions and overlaps(regions[0]["box"], DEFECT_BOX)
    assert threshold.severity(result.score) > 1  # severity above 1 exactly when anomalous
    for index in (31, 200, 1001):
        result = detector.predict(rgb(normal_frame(index)), "bottle")
        assert decide(result.score, result.anomaly_map_full, threshold) == (False, [])


def test_overrides_replace_the_calibrated_values_one_by_one(folder, caplog):
    detector = red_defect_detector(folder, "bottle")
    calibrate_threshold(detector, "bottle", [rgb(normal_frame(i)) for i in range(4)])
    detector = red_defect_detector(folder, "bottle")
    record = detector.calibration("bottle")
    assert detector.threshold_for("bottle", image=0.7) == ClassThreshold(0.7, record.pixel, "calibrated+override",
                                                                         None, record.pixel_median)
    assert detector.threshold_for("bottle", 0.7, 0.8) == ClassThreshold(0.7, 0.8, "override")
    # carpet has no calibration: overrides alone, and None (said once) without them
    assert detector.threshold_for("carpet", pixel=0.8) == ClassThreshold(None, 0.8, "override")
    with caplog.at_level(logging.INFO, logger="anoclip"):
        assert detector.threshold_for("carpet") is None
        assert detector.threshold_for("carpet") is None
    said = [r.getMessage() for r in caplog.records if "no threshold set for class carpet" in r.getMessage()]
    assert len(said) == 1 and "anoclip calibrate threshold" in said[0]


def test_few_frames_warn_and_max_frames_limits(folder, caplog):
    detector = red_defect_detector(folder, "bottle")
    with caplog.at_level(logging.WARNING, logger="anoclip"):
        record = measure_threshold(detector, "bottle", (rgb(normal_frame(i)) for i in range(12)), max_frames=5)
    assert record.frames == 5
    text = caplog.text
    assert "only 5 normal frame(s)" in text and "unreliable" in text and "stopped after 5 frames" in text
    with pytest.raises(AnoclipError, match="no normal frames"):
        measure_threshold(detector, "bottle", [])
    with pytest.raises(ValueError):
        ThresholdSettings(quantile=1.5)


def test_a_second_class_keeps_the_first(folder):
    detector = red_defect_detector(folder, "bottle")
    first, first_name = calibrate_threshold(detector, "bottle", [rgb(normal_frame(i)) for i in range(5)])
    detector = Detector.load(folder, backend="cpu", load_thresholds=False)
    _, name = calibrate_threshold(detector, "carpet", [rgb(normal_frame(i)) for i in range(5)])
    table = load_artifacts(folder).thresholds
    assert sorted(table.classes) == ["bottle", "carpet"] and table.classes["bottle"] == first
    assert name != first_name and thresholds_files(folder) == [name]  # the replaced file is gone
    manifest = read_manifest(folder)
    assert manifest.thresholds == name and manifest.files[name] == sha256_file(folder / name)
    assert first_name not in manifest.files
    assert "calibrate threshold --class carpet" in manifest.history[-1]


def test_thresholds_of_another_model_file_are_not_applied(folder, caplog):
    detector = red_defect_detector(folder, "bottle")
    record, _ = calibrate_threshold(detector, "bottle", [rgb(normal_frame(i)) for i in range(4)])
    # what an export of other visual weights leaves: thresholds that name another model file
    record.model_sha256 = "0" * 64
    data = threshold_bytes(ThresholdTable({"bottle": record}))
    sha = hashlib.sha256(data).hexdigest()
    name = f"thresholds.{sha[:12]}.json"
    (folder / name).write_bytes(data)
    manifest = read_manifest(folder)
    manifest.files[name] = sha
    manifest.thresholds = name
    write_manifest(folder, manifest)
    detector = red_defect_detector(folder, "bottle")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="anoclip"):
        assert detector.threshold_for("bottle") is None
        assert detector.threshold_for("bottle", image=0.6) == ClassThreshold(0.6, None, "override")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "calibrated on other artifacts" in warnings[0] and "visual model file changed" in warnings[0]
    assert f"anoclip calibrate threshold --artifacts {folder} --class bottle" in warnings[0]
    # and the calibration refuses to store a record the folder does not hold the model of
    with pytest.raises(AnoclipError, match="changed while calibrating"):
        save_threshold(folder, "bottle", record)


def test_thresholds_without_tta_are_not_applied_to_tta_maps(folder, caplog):
    calibrate_threshold(red_defect_detector(folder, "bottle"), "bottle", [rgb(normal_frame(i)) for i in range(4)])
    with caplog.at_level(logging.WARNING, logger="anoclip"):
        assert red_defect_detector(folder, "bottle", tta=TTAConfig(steps=1)).threshold_for("bottle") is None
    assert "calibrated without TTA, used with it" in caplog.text
    # calibrated with TTA: applied with TTA (another seed too), not without
    tta = TTAConfig(steps=1, seed=3)
    record, _ = calibrate_threshold(red_defect_detector(folder, "bottle", tta=tta), "bottle",
                                    [rgb(normal_frame(i)) for i in range(4)])
    assert record.tta and record.tta_settings["steps"] == 1 and record.tta_settings["seed"] == 3
    assert red_defect_detector(folder, "bottle", tta=TTAConfig(steps=1, seed=4)).threshold_for("bottle") is not None
    assert red_defect_detector(folder, "bottle").threshold_for("bottle") is None
    assert red_defect_detector(folder, "bottle", tta=TTAConfig(steps=2)).threshold_for("bottle") is None


def test_malformed_thresholds_file_is_one_line(folder, tmp_path):
    detector = red_defect_detector(folder, "bottle")
    _, name = calibrate_threshold(detector, "bottle", [rgb(normal_frame(i)) for i in range(3)])
    data = json.loads((folder / name).read_text())
    for damage in ({"frames": "3"}, {"image": None}, {"model_sha256": "abc"}, {"extra": 1}):
        broken = json.loads(json.dumps(data))
        broken["classes"]["bottle"].update(damage)
        path = tmp_path / "thresholds.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ArtifactError) as info:
            read_thresholds(path)
        message = str(info.value)
        assert "\n" not in message and "not a valid thresholds file" in message and "--replace-file" in message
    path.write_text('{"format": "anoclip-thresholds", "format_version": 3, "classes": {}}')
    with pytest.raises(ArtifactError, match="format version"):
        read_thresholds(path)


def test_folder_lock_waits_for_a_short_holder(tmp_path):
    import threading

    from anoclip.runtime.plumbing import folder_lock

    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(AnoclipError, match="another anoclip process is writing"):
            with folder_lock(tmp_path):
                pass
        threading.Timer(0.3, fcntl.flock, [fd, fcntl.LOCK_UN]).start()
        with folder_lock(tmp_path, wait=10):
            pass
    finally:
        os.close(fd)


def test_calibration_never_imports_the_export_stage():
    code = ("import sys\nimport anoclip.calibration.cli, anoclip.calibration.threshold, anoclip.runtime.inputs\n"
            "bad = [m for m in sys.modules if m.startswith(('anoclip.export', 'torch', 'open_clip', 'onnx.'))"
            " or m == 'onnx']\nassert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------------
# the command, on the real tiny model


def test_calibrate_command_stores_the_thresholds_of_a_video(calibrated, clip):
    folder, proc = calibrated
    out = json.loads(proc.stdout)
    assert out["class"] == "bottle" and out["frames"] == 12 and out["quantile"] == 0.995
    assert (out["rule"], out["false_alarm_rate"], out["rank"]) == ("quantile", None, None)
    assert "image threshold" in proc.stderr and "pixel threshold" in proc.stderr and "12 normal" in proc.stderr
    assert "only 12 normal frame(s)" in proc.stderr  # the quantile of so few is unreliable
    manifest = read_manifest(folder)
    name = manifest.thresholds
    assert str(folder / name) == out["file"] and thresholds_files(folder) == [name]
    assert name == f"thresholds.{sha256_file(folder / name)[:12]}.json"
    assert manifest.files[name] == sha256_file(folder / name)
    assert "anoclip calibrate threshold" in manifest.history[-1] and "--stride 2" in manifest.history[-1]
    record = load_artifacts(folder).thresholds.classes["bottle"]  # verified against the manifest
    assert record.image == out["image"] and record.pixel == out["pixel"] and record.normal == [str(clip)]
    assert record.command.startswith("anoclip calibrate threshold --artifacts") and "--normal" in record.command
    assert record.score_min <= record.image <= record.score_max
    detector = Detector.load(folder, backend="cpu")
    assert detector.threshold_for("bottle").origin == "calibrated"


def test_unreadable_normal_images_are_skipped_and_counted(folder, tmp_path):
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(3):
        cv2.imwrite(str(normal / f"{i}.png"), normal_frame(i))
    (normal / "1b.png").write_bytes(b"not an image")  # read after 0.png and 1.png, before 2.png
    proc = calibrate(folder, "--class", "bottle", "--normal", str(normal), "--max-frames", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stderr and "1b.png" in proc.stderr and "cannot decode" in proc.stderr
    assert "1 input(s) could not be read and were skipped" in proc.stderr
    assert json.loads(proc.stdout)["frames"] == 3  # every readable frame, the one after the bad file too


def test_predict_writes_the_decision_and_regions(calibrated, images, tmp_path):
    folder, _ = calibrated
    record = load_artifacts(folder).thresholds.classes["bottle"]
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "bottle", "--out", str(tmp_path / "a"),
                   "--json", str(images))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2 and "no threshold" not in proc.stderr
    for line in lines:
        assert line["threshold"] == record.image and line["anomalous"] == (line["score"] > record.image)
        assert isinstance(line["regions"], list)
    # overrides: every image above a threshold of 0, every pixel above -1 (one region: the image)
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "bottle", "--out", str(tmp_path / "b"),
                   "--json", "--threshold", "0", "--pixel-threshold", "-1", str(images / "defect.png"))
    assert proc.returncode == 0, proc.stderr
    line = json.loads(proc.stdout)
    assert line["anomalous"] is True and line["threshold"] == 0.0
    assert line["regions"] == [{"box": [0, 0, 128, 128], "area": 128 * 128}]
    overlay = cv2.imread(line["overlay"])[:, :, ::-1]
    assert np.all(overlay[0, 5] == REGION_RGB)  # the outline runs along the border


def test_predict_without_a_threshold_reports_scores_only(calibrated, images, tmp_path):
    folder, _ = calibrated
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "carpet", "--out", str(tmp_path),
                   "--json", str(images))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(line["anomalous"], line["threshold"], line["regions"]) for line in lines] == [(None, None, [])] * 2
    assert proc.stderr.count("no threshold set for class carpet") == 1


def test_changed_thresholds_file_is_one_line(calibrated, images, tmp_path):
    folder = copy_artifacts(calibrated[0], tmp_path / "artifacts")
    path = folder / read_manifest(folder).thresholds
    data = json.loads(path.read_text())
    data["classes"]["bottle"]["image"] = 0.0
    path.write_text(json.dumps(data))
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "bottle", "--out", str(tmp_path / "out"),
                   str(images))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "does not match the sha256 in the manifest" in line and "--replace-file" in line
    # the calibration refuses to merge with it before scoring a frame, unless told to start anew
    before = snapshot(folder)
    proc = calibrate(folder, "--class", "carpet", "--normal", str(images))
    assert proc.returncode == 1 and "does not match the sha256" in one_error_line(proc.stderr)
    assert snapshot(folder) == before
    proc = calibrate(folder, "--class", "carpet", "--normal", str(images), "--replace-file")
    assert proc.returncode == 0, proc.stderr
    assert sorted(load_artifacts(folder).thresholds.classes) == ["carpet"]


def _hand_edit(folder: Path, damage: dict) -> None:
    """Change bottle's record in the folder's thresholds file and update the manifest's sha256 to match."""
    manifest = read_manifest(folder)
    path = folder / manifest.thresholds
    data = json.loads(path.read_text())
    data["classes"]["bottle"].update(damage)
    path.write_text(json.dumps(data))
    manifest.files[manifest.thresholds] = sha256_file(path)
    write_manifest(folder, manifest)


def test_thresholds_outside_0_1_or_off_their_quantiles_are_refused_on_load(calibrated, images, tmp_path):
    record = read_thresholds(calibrated[0] / read_manifest(calibrated[0]).thresholds).classes["bottle"]
    folder = copy_artifacts(calibrated[0], tmp_path / "artifacts")
    _hand_edit(folder, {"image": -1.0})
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "bottle", "--out", str(tmp_path / "out"),
                   str(images))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "not a valid thresholds file" in line and "image must be a finite number in [0, 1], got -1.0" in line
    assert "--replace-file" in line and not (tmp_path / "out" / "results.jsonl").exists()
    shift = record.score_max - record.image_quantile_value + 0.01  # moves the quantile above every score
    for damage, expected in (({"image": 2.0}, "image must be a finite number in [0, 1]"),
                             ({"pixel": 2}, "pixel must be a finite number in [0, 1]"),
                             ({"score_max": 1.5}, "score_max must be a finite number in [0, 1]"),
                             ({"image": record.image + 0.1}, "image 0."),
                             ({"pixel": record.pixel / 2}, "is not pixel_quantile_value + pixel_margin"),
                             ({"image": record.image + shift, "image_quantile_value": record.image_quantile_value + shift},
                              "image_quantile_value")):
        _hand_edit(folder, {**{k: getattr(record, k) for k in ("image", "pixel", "image_quantile_value",
                                                             "score_max")}, **damage})
        with pytest.raises(ArtifactError, match="not a valid thresholds file") as info:
            load_artifacts(folder)
        assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)
    _hand_edit(folder, {k: getattr(record, k) for k in ("image", "pixel", "image_quantile_value", "score_max")})
    assert load_artifacts(folder).thresholds.classes["bottle"] == record  # as calibrated: accepted


def _as_version_1(folder: Path) -> dict:
    """Rewrite the folder's thresholds file as format version 1 wrote it (no rule fields), with the
    manifest's sha256 updated to match; the version 1 data."""
    manifest = read_manifest(folder)
    path = folder / manifest.thresholds
    data = json.loads(path.read_text())
    data["format_version"] = 1
    for record in data["classes"].values():
        for key in ("rule", "false_alarm_rate", "rank", "assumption", "memory", "memory_weight", "memory_sha256",
                    "score_median", "pixel_median"):
            del record[key]
    path.write_text(json.dumps(data, indent=2))
    manifest.files[manifest.thresholds] = sha256_file(path)
    write_manifest(folder, manifest)
    return data


def test_a_version_1_thresholds_file_still_loads_as_the_quantile_rule(calibrated, images, tmp_path):
    folder = copy_artifacts(calibrated[0], tmp_path / "artifacts")
    stored = read_thresholds(folder / read_manifest(folder).thresholds).classes["bottle"]
    assert (stored.rule, stored.false_alarm_rate, stored.rank, stored.assumption) == ("quantile", None, None, "")
    old = _as_version_1(folder)
    assert "rule" not in old["classes"]["bottle"] and old["format_version"] == 1
    record = load_artifacts(folder).thresholds.classes["bottle"]
    # the missing fields read as the quantile rule, the missing centres as None
    assert record == replace(stored, score_median=None, pixel_median=None)
    detector = Detector.load(folder, backend="cpu")
    assert detector.threshold_for("bottle") == ClassThreshold(stored.image, stored.pixel, "calibrated",
                                                              stored.score_mean, stored.score_mean)  # centres: the mean
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "bottle", "--out", str(tmp_path / "out"),
                   str(images))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(line["threshold"] is not None and line["anomalous"] is not None for line in lines)
    # calibrating another class writes the current version, the old class kept as it was
    proc = calibrate(folder, "--class", "carpet", "--normal", str(images))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((folder / read_manifest(folder).thresholds).read_text())
    assert data["format_version"] == 2 and data["classes"]["bottle"]["rule"] == "quantile"
    assert load_artifacts(folder).thresholds.classes["bottle"] == replace(stored, score_median=None, pixel_median=None)


def test_rule_fields_must_match_the_file_version(calibrated, tmp_path):
    data = json.loads((calibrated[0] / read_manifest(calibrated[0]).thresholds).read_text())
    path = tmp_path / "thresholds.json"
    for version, drop, keep, expected in ((2, ("rank",), (), "missing fields ['rank']"),
                                          (1, ("rule", "false_alarm_rate", "rank", "memory", "memory_weight",
                                               "memory_sha256"), ("assumption",),
                                           "unknown fields ['assumption'] (format version 1)")):
        broken = json.loads(json.dumps(data))
        broken["format_version"] = version
        for key in drop:
            del broken["classes"]["bottle"][key]
        path.write_text(json.dumps(broken))
        with pytest.raises(ArtifactError, match="not a valid thresholds file") as info:
            read_thresholds(path)
        assert expected in str(info.value), str(info.value)
    for damage, expected in (({"rule": "median"}, "rule must be one of quantile, conformal"),
                             ({"rank": 3}, "false_alarm_rate and rank must be null with rule quantile"),
                             ({"false_alarm_rate": 0.01}, "must be null with rule quantile"),
                             ({"memory": "on"}, "memory 'on' with weight None"),
                             ({"memory_weight": 0.5}, "do not go together")):
        broken = json.loads(json.dumps(data))
        broken["classes"]["bottle"].update(damage)
        path.write_text(json.dumps(broken))
        with pytest.raises(ArtifactError, match=expected):
            read_thresholds(path)


def test_margin_moving_a_threshold_outside_0_1_is_one_line(calibrated, images, tmp_path):
    folder = copy_artifacts(calibrated[0], tmp_path / "artifacts")
    before = snapshot(folder)
    proc = calibrate(folder, "--class", "carpet", "--normal", str(images), "--margin", "2")
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "thresholds of class carpet cannot be stored: image must be a finite number in [0, 1]" in line
    assert "--margin and --pixel-margin must keep each threshold there" in line
    assert snapshot(folder) == before


def test_reexport_keeps_the_thresholds(calibrated, export_cli, tmp_path, caplog):
    folder = copy_artifacts(calibrated[0], tmp_path / "artifacts")
    name = read_manifest(folder).thresholds
    common = ["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--out", str(folder)]
    result = export_cli([*common, "--classes", "screw"])  # prompts only: bottle's embeddings are kept
    assert result.exit_code == 0, result.output
    manifest = read_manifest(folder)
    assert manifest.thresholds == name and manifest.files[name] == sha256_file(folder / name)
    assert Detector.load(folder, backend="cpu").threshold_for("bottle").origin == "calibrated"
    result = export_cli([*common, "--seed", "1", "--force"])  # other weights: the thresholds go stale
    assert result.exit_code == 0, result.output
    assert read_manifest(folder).thresholds == name and (folder / name).is_file()
    with caplog.at_level(logging.WARNING, logger="anoclip"):
        assert Detector.load(folder, backend="cpu").threshold_for("bottle") is None
    assert "visual model file changed" in caplog.text and "re-run `anoclip calibrate threshold" in caplog.text


@pytest.mark.parametrize("case", ["unknown class", "missing", "not a video", "damaged video", "empty folder",
                                  "bad quantile", "locked"])
def test_bad_input_is_one_line_and_leaves_the_folder_as_it_was(calibrated, images, tmp_path, case):
    folder = copy_artifacts(calibrated[0], tmp_path / "artifacts")
    before = snapshot(folder)
    normal, extra, expected = str(images), [], ""
    if case == "unknown class":
        extra, expected = ["--class", "zebra"], "class 'zebra' is not in the prompt weights"
    elif case == "missing":
        normal, expected = str(tmp_path / "nowhere.mp4"), "does not exist"
    elif case == "not a video":
        (tmp_path / "notes.txt").write_text("hello")
        normal, expected = str(tmp_path / "notes.txt"), "neither an image"
    elif case == "damaged video":
        (tmp_path / "broken.mp4").write_bytes(os.urandom(4096))
        normal, expected = str(tmp_path / "broken.mp4"), "broken.mp4"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        normal, expected = str(tmp_path / "empty"), "holds no images"
    elif case == "bad quantile":
        extra, expected = ["--quantile", "1.5"], "--quantile"
    args = ["--class", "bottle", "--normal", normal, *extra]
    if case == "locked":
        expected = "another anoclip process is writing"
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            proc = calibrate(folder, *args)
        finally:
            os.close(fd)
    else:
        proc = calibrate(folder, *args)
    assert proc.returncode != 0
    if case == "bad quantile":  # a usage error of click's own
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    else:
        assert expected in one_error_line(proc.stderr)
    assert snapshot(folder) == before
