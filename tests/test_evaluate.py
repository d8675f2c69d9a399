"""`anoclip eval` end to end on synthetic MVTec AD / VisA layouts, resuming, the 22 views, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from anoclip.benchmarks.accuracy.augment import (
    NUM_VIEWS,
    ROTATIONS,
    TRANSLATIONS,
    VIEW_NAMES,
    affine_view,
    augment_views,
)
from anoclip.benchmarks.accuracy.datasets import (
    load_mvtec,
    make_mvtec_like,
    make_visa_like,
    read_mask,
)
from anoclip.benchmarks.accuracy.evaluate import predict_views
from anoclip.benchmarks.accuracy.metrics import evaluate_class
from anoclip.runtime.cli import cli
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError
from click.testing import CliRunner

METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pro_authors", "aupro_03", "image_auroc", "image_f1_max",
           "image_aupr")


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec_like(tmp_path_factory.mktemp("mvtec"), ("carpet", "bottle"), n_good=2, n_defect=3, size=64)


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    # class names the tiny artifacts know; frames 96x64 are tiled (48x72 after resizing: 2 tiles)
    return make_visa_like(tmp_path_factory.mktemp("visa"), ("bottle", "carpet"), n_normal=2, n_anomaly=3,
                          size=(96, 64))


def run_eval(*args: str):
    return CliRunner().invoke(cli, ["eval", *args])


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


# ------------------------------------------------------------------------------------------------
# The 22 views


def test_there_are_22_distinct_views_and_the_first_is_the_image():
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    views = augment_views(image)
    assert len(views) == NUM_VIEWS == len(VIEW_NAMES) == 22
    assert views[0] is image or np.array_equal(views[0], image)
    assert len({v.tobytes() + bytes(str(v.shape), "ascii") for v in views}) == 22
    assert all(v.dtype == np.uint8 for v in views)
    assert [v.shape for v in views[19:]] == [(56, 40, 3), (40, 56, 3), (56, 40, 3)]
    assert np.array_equal(views[17], image[:, ::-1])
    grey = views[18]
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 0], grey[..., 2])


def test_rotations_and_translations_match_torch_grid_sample():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    image = np.random.default_rng(1).uniform(0, 1, (30, 44, 3)).astype(np.float32)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    thetas = [np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0]]) for a in ROTATIONS]
    thetas += [np.array([[1.0, 0.0, a], [0.0, 1.0, b]]) for a, b in TRANSLATIONS]
    for theta in thetas:
        grid = F.affine_grid(torch.tensor(theta, dtype=torch.float32)[None], list(x.shape), align_corners=False)
        ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        np.testing.assert_allclose(affine_view(image, theta), ref[0].permute(1, 2, 0).numpy(), atol=1e-5)


def test_22_view_score_is_the_mean_and_the_map_is_the_single_view_map(tiny_artifacts):
    detector = Detector.load(tiny_artifacts)
    image = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    amap, score, scores = predict_views(detector, image, "bottle")
    single = detector.predict(image, "bottle")
    assert len(scores) == 22 and score == pytest.approx(np.mean(scores))
    assert scores[0] == pytest.approx(single.score, abs=1e-6)
    np.testing.assert_allclose(amap, single.anomaly_map, atol=1e-6)
    assert amap.shape == (48, 72)


# ------------------------------------------------------------------------------------------------
# End to end


def test_eval_mvtec_writes_class_files_summary_and_the_tables(tiny_artifacts, mvtec_root, tmp_path):
    out = tmp_path / "res"
    result = ok(run_eval("--artifacts", str(tiny_artifacts), "--dataset", "mvtec", "--root", str(mvtec_root),
                         "--out", str(out), "--batch-size", "3"))
    text = result.stdout
    assert "RANDOM weights" in result.stderr and "RANDOM weights" in text
    for needle in ("Table 1", "Table 2", "PRO (authors, rescaled)", "AUPRO@0.3", "paper: AnoCLIP+", "86.6", "92.5"):
        assert needle in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["classes"]) == {"bottle", "carpet"} and summary["random_weights"] is True
    for cls in ("bottle", "carpet"):
        data = json.loads((out / f"{cls}.json").read_text())
        assert data["images"] == 5 and data["anomalous"] == 3 and data["eval_size"] == [48, 48]
        for name in METRICS:
            assert data["metrics"][name] is None or 0.0 <= data["metrics"][name] <= 1.0
        assert data["settings"]["dataset"] == "mvtec" and data["settings"]["image_views"] == 1
    for name in METRICS:
        values = [summary["classes"][c][name] for c in ("bottle", "carpet")]
        assert summary["mean"][name] == pytest.approx(np.mean(values))
    assert not list(out.glob(".*.tmp"))

    # the recorded metrics are those of the maps and scores the Detector gives directly
    detector = Detector.load(tiny_artifacts)
    samples = load_mvtec(mvtec_root, "bottle")
    results = [detector.predict(s.image_path, "bottle") for s in samples]
    masks = np.stack([read_mask(s.mask_path, 48) if s.mask_path else np.zeros((48, 48), bool) for s in samples])
    expected = evaluate_class(masks, np.stack([r.anomaly_map for r in results]).astype(np.float32),
                              np.array([s.label for s in samples]), np.array([r.score for r in results]))
    data = json.loads((out / "bottle.json").read_text())
    for name, value in expected.as_dict().items():
        assert data["metrics"][name] == pytest.approx(value, abs=1e-6)
    assert [d["score"] for d in data["image_scores"]] == pytest.approx([r.score for r in results], abs=1e-6)


def test_resume_reuses_class_files_and_new_settings_evaluate_again(tiny_artifacts, mvtec_root, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "res"
    args = ["--artifacts", str(tiny_artifacts), "--dataset", "mvtec", "--root", str(mvtec_root), "--out", str(out)]
    ok(run_eval(*args, "--classes", "carpet"))
    first = (out / "carpet.json").read_text()

    calls = []

    def refuse(self, images, cls, tta=None):
        calls.append(cls)
        raise RuntimeError("predict was called")

    monkeypatch.setattr(Detector, "predict_batch", refuse)
    result = ok(run_eval(*args, "--classes", "carpet", "--json"))
    assert calls == [] and (out / "carpet.json").read_text() == first
    assert json.loads(result.stdout)["classes"]["carpet"]["reused"] is True
    assert "Reused from earlier runs: carpet" in result.stderr

    for extra in (["--no-resume"], ["--image-views", "22"], ["--classes", "carpet,bottle"]):
        calls.clear()
        result = run_eval(*args, *([] if "--classes" in extra else ["--classes", "carpet"]), *extra)
        assert isinstance(result.exception, RuntimeError) and calls, extra


def test_eval_visa_tiled_22_views_default_folder(tiny_artifacts, visa_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ok(run_eval("--artifacts", str(tiny_artifacts), "--dataset", "visa", "--root", str(visa_root),
                         "--image-views", "22", "--classes", "carpet", "--json"))
    summary = json.loads(result.stdout)
    out = tmp_path / "eval-results" / "visa-anoclip-tiny-vit-v22"
    assert Path(summary["out_dir"]).resolve() == out.resolve()
    data = json.loads((out / "carpet.json").read_text())
    assert data["eval_size"] == [48, 72] and data["images"] == 5 and data["anomalous"] == 3
    assert data["settings"]["image_views"] == 22
    assert all(data["metrics"][n] is None or 0.0 <= data["metrics"][n] <= 1.0 for n in METRICS)
    assert "85.9" in result.stderr and "79.2" in result.stderr  # the VisA rows of the paper


def test_tta_flag_reaches_the_detector(tiny_artifacts, mvtec_root, monkeypatch):
    seen = {}

    def load(*args, **kwargs):
        seen.update(kwargs)
        raise AnoclipError("stopped after load")

    monkeypatch.setattr(Detector, "load", load)
    result = run_eval("--artifacts", str(tiny_artifacts), "--dataset", "mvtec", "--root", str(mvtec_root), "--tta")
    assert isinstance(result.exception, AnoclipError) and seen["tta"] is True


# ------------------------------------------------------------------------------------------------
# Errors, before any image is scored


@pytest.mark.parametrize("case", ["missing root", "wrong layout", "class not in dataset", "class not in prompts"])
def test_user_errors_are_reported_before_any_work(case, tiny_artifacts, mvtec_root, tmp_path, monkeypatch):
    monkeypatch.setattr(Detector, "predict_batch", lambda *a, **k: pytest.fail("predict was called"))
    root, dataset, extra = mvtec_root, "mvtec", []
    if case == "missing root":
        root, expected = tmp_path / "nowhere", "does not exist"
    elif case == "wrong layout":
        dataset, expected = "visa", "pass --dataset mvtec"
    elif case == "class not in dataset":
        extra, expected = ["--classes", "bottle,screw"], "screw not found"
    else:
        root = make_mvtec_like(tmp_path / "grid", ("grid",), n_good=1, n_defect=1, size=32)
        expected = "not in the prompt weights"
    result = run_eval("--artifacts", str(tiny_artifacts), "--dataset", dataset, "--root", str(root),
                      "--out", str(tmp_path / "res"), *extra)
    assert isinstance(result.exception, AnoclipError), result.output
    assert expected in str(result.exception)
    assert "\n" not in str(result.exception)
    assert not (tmp_path / "res").exists()


def test_error_is_one_line_from_the_installed_command(tiny_artifacts, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "eval",
                           "--artifacts", str(tiny_artifacts), "--dataset", "mvtec", "--root",
                           str(tmp_path / "nowhere")], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset root") and "--root" in lines[0]
