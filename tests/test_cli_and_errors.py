"""The CLIs end to end on the tiny architecture, and every user error as one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anoclip.runtime.artifacts import load_artifacts, read_manifest, write_manifest
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError, ArtifactError, ImageError, UnknownClassError
from anoclip.runtime.integrity import sha256_file
from anoclip.runtime.prompt_weights import ClassPrompts, PromptBank, read_prompts, write_prompts

from conftest import TINY_CONFIG, artifact_file, copy_artifacts, export_subprocess, one_error_line, run_cli


# ------------------------------------------------------------------------------------------------
# predict


def write_images(folder: Path) -> list[Path]:
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("square.png", (64, 64)), ("wide.jpg", (60, 200))):
        path = folder / name
        cv2.imwrite(str(path), rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def test_predict_writes_overlays_maps_and_jsonl(tiny_artifacts, tmp_path):
    images = write_images(tmp_path / "imgs")
    out = tmp_path / "out"
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--out", str(out),
                   str(tmp_path / "imgs"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [Path(r["source"]).name for r in lines] == sorted(p.name for p in images)
    for record in lines:
        amap = np.load(record["map"])
        assert amap.dtype == np.float32
        assert 0.0 < record["score"] < 1.0
        assert Path(record["overlay"]).is_file()
        assert set(record["timings_ms"]) == {"wait", "preprocess", "model", "scoring", "total", "added"}
    wide = next(r for r in lines if r["source"].endswith("wide.jpg"))
    assert np.load(wide["map"]).shape == (60, 200) and wide["tiles"] == 4  # 48 x 160 after resizing: 4 tiles of 48
    assert not list(out.rglob(".*.tmp"))
    assert {Path(r["map"]).parent for r in lines} == {out / lines[0]["run"]}  # the run's own folder


def test_predict_skips_unreadable_images_and_says_so(tiny_artifacts, tmp_path):
    good = write_images(tmp_path / "imgs")[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "carpet", "--out", str(tmp_path / "o"),
                   str(good), str(bad))
    assert proc.returncode == 3, proc.stderr
    assert "cannot decode" in proc.stderr and "1 of 2 images scored" in proc.stderr
    assert len((tmp_path / "o" / "results.jsonl").read_text().splitlines()) == 1


def test_predict_reads_videos_every_stride_th_frame_with_images(tiny_artifacts, tmp_path):
    from fakes import write_clip

    image = write_images(tmp_path / "imgs")[0]
    clip = write_clip(tmp_path / "clip.avi", 7, size=(60, 80))
    out = tmp_path / "o"
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle,carpet", "--out", str(out),
                   "--stride", "3", "--json", str(clip), str(tmp_path / "imgs" / "*.png"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [json.loads(line) for line in proc.stdout.splitlines()] == lines  # --json echoes every line
    assert [(Path(r["source"]).name, r["frame"], r["class"]) for r in lines] == \
        [("clip.avi", f, c) for f in (0, 3, 6) for c in ("bottle", "carpet")] + [(image.name, 0, "bottle"),
                                                                               (image.name, 0, "carpet")]
    assert Path(lines[2]["map"]).name == "clip_000003_bottle_map.npy" and lines[2]["map_shape"] == [60, 80]
    assert "4 of 4 frames scored" in proc.stderr
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--out", str(out),
                   "--max-pixels", "4500", str(clip), str(image))
    assert proc.returncode == 3 and "80 x 60 pixels, above the limit of 4500" in proc.stderr
    assert "1 of 2 frames scored" in proc.stderr  # the 64 x 64 image is scored, the video skipped whole


@pytest.mark.parametrize("case", ["missing", "empty folder", "pattern", "not an image"])
def test_predict_bad_inputs_are_one_line_before_any_image(tiny_artifacts, tmp_path, case):
    good = write_images(tmp_path / "imgs")[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    bad, expected = {"missing": (tmp_path / "missing.png", "does not exist"),
                     "empty folder": (tmp_path / "empty", "holds no images"),
                     "pattern": (tmp_path / "imgs" / "*.gif", "matches no images"),
                     "not an image": (tmp_path / "notes.txt", "neither an image")}[case]
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "carpet", "--out", str(tmp_path / "o"),
                   str(good), str(bad))
    assert proc.returncode == 1 and expected in one_error_line(proc.stderr)
    assert not (tmp_path / "o").exists()  # stopped before any image was scored


def test_predict_unknown_class_is_one_line(tiny_artifacts, tmp_path):
    image = write_images(tmp_path / "imgs")[0]
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "spaceship", str(image))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "spaceship" in line and "known: bottle, carpet" in line and "--classes spaceship" in line


def test_predict_missing_artifact_file(tiny_artifacts, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    visual = artifact_file(folder, "visual")
    visual.unlink()
    image = write_images(tmp_path / "imgs")[0]
    proc = run_cli("predict", "--artifacts", str(folder), "--class", "bottle", str(image))
    assert proc.returncode == 1
    assert f"{visual.name} is missing" in one_error_line(proc.stderr)
    proc = run_cli("predict", "--artifacts", str(tmp_path / "nowhere"), "--class", "bottle", str(image))
    assert "does not exist" in one_error_line(proc.stderr)


# ------------------------------------------------------------------------------------------------
# Detector API


def test_detector_batch_equals_single(tiny_artifacts, rgb_image):
    detector = Detector.load(tiny_artifacts, backend="cpu")
    square = rgb_image[:, :100]
    wide = np.concatenate([rgb_image, rgb_image[:, ::-1]], axis=1)
    single = [detector.predict(img, "bottle") for img in (square, wide)]
    batch = detector.predict_batch([square, wide], "bottle")
    for a, b in zip(single, batch):
        assert a.score == pytest.approx(b.score, abs=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    assert single[0].anomaly_map.shape == (48, 48) and single[0].anomaly_map_full.shape == square.shape[:2]
    assert single[1].tiles > 1 and single[1].anomaly_map_full.shape == wide.shape[:2]


def test_detector_runs_the_qkv_baseline(tiny_artifacts, rgb_image):
    vv = Detector.load(tiny_artifacts, backend="cpu").predict(rgb_image, "bottle")
    qkv = Detector.load(tiny_artifacts, backend="cpu", model="visual_qkv").predict(rgb_image, "bottle")
    assert vv.score == pytest.approx(qkv.score, abs=1e-6)  # same global token
    assert not np.allclose(vv.anomaly_map, qkv.anomaly_map)


def test_detector_errors(tiny_artifacts, tmp_path):
    detector = Detector.load(tiny_artifacts, backend="cpu")
    with pytest.raises(UnknownClassError, match="known: bottle, carpet"):
        detector.predict(np.zeros((10, 10, 3), np.uint8), "hazelnut")
    with pytest.raises(ImageError, match="no such file"):
        detector.predict(tmp_path / "none.png", "bottle")
    with pytest.raises(ImageError, match="shape"):
        detector.predict(np.zeros((10, 10, 2), np.uint8), "bottle")


# ------------------------------------------------------------------------------------------------
# artifacts that do not belong together


def test_prompts_of_another_backbone_are_refused(tiny_artifacts, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    prompts = artifact_file(folder)
    bank = read_prompts(prompts)
    foreign = PromptBank(bank.classes, "ViT-B-16", "laion400m_e32", bank.embed_dim)
    write_prompts(prompts, foreign)
    manifest = read_manifest(folder)
    manifest.files[prompts.name] = sha256_file(prompts)
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="do not belong.*backbone ViT-B-16 vs anoclip-tiny-vit"):
        load_artifacts(folder)


def test_changed_file_fails_the_hash_check(tiny_artifacts, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    bank = read_prompts(artifact_file(folder))
    bank.classes["extra"] = ClassPrompts("extra", np.eye(2, bank.embed_dim, dtype=np.float32),
                                         np.eye(4, bank.embed_dim, dtype=np.float32))
    write_prompts(artifact_file(folder), bank)
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_artifacts(folder)
    load_artifacts(folder, verify=False)  # the user can opt out


def test_manifest_of_another_format_version(tiny_artifacts, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    data = json.loads((folder / "manifest.json").read_text())
    data["format_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifacts(folder)


# ------------------------------------------------------------------------------------------------
# export


def test_adding_classes_keeps_the_visual_model(tiny_artifacts, tmp_path, export_cli):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    first = read_manifest(folder)
    visual = artifact_file(folder, "visual")
    before = sha256_file(visual)
    mtime = visual.stat().st_mtime_ns
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "hazelnut",
                         "--qkv-tokens", "model", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert artifact_file(folder, "visual") == visual
    assert visual.stat().st_mtime_ns == mtime and sha256_file(visual) == before
    artifacts = load_artifacts(folder)
    assert sorted(artifacts.prompts.classes) == ["bottle", "carpet", "hazelnut"]
    assert artifacts.manifest.command == first.command and "--classes bottle,carpet" in first.command
    assert len(artifacts.manifest.history) == 2 and "--classes hazelnut" in artifacts.manifest.history[-1]
    # the old classes are untouched
    old = read_prompts(artifact_file(tiny_artifacts))
    np.testing.assert_array_equal(artifacts.prompts.get("bottle").prompt_features, old.get("bottle").prompt_features)


def test_failed_check_leaves_nothing_that_loads(tmp_path, export_cli):
    folder = tmp_path / "a"
    with pytest.raises(AnoclipError, match="differs from the PyTorch reference by more than 0; nothing was written"):
        export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                    "--atol", "0", "--out", str(folder)])
    assert not folder.exists()  # created by the export, removed again with nothing in it
    folder.mkdir()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifacts(folder)


def test_unknown_backbone_is_one_line(tmp_path):
    pytest.importorskip("open_clip")
    proc = export_subprocess("--backbone", "ViT-Z-99", "--classes", "bottle", "--out", str(tmp_path / "a"))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "unknown backbone 'ViT-Z-99'" in line and "ViT-B-16" in line


def test_offline_download_is_one_line(tmp_path):
    pytest.importorskip("open_clip")
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = export_subprocess("--backbone", "ViT-B-32", "--pretrained", "laion400m_e32", "--classes", "bottle",
                             "--out", str(tmp_path / "a"), env=env)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "cannot download" in line and "--pretrained /path/to/checkpoint" in line and "--pretrained none" in line
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_local_state_dict_checkpoint(tmp_path, tiny_model, tiny_artifacts, export_cli):
    torch = pytest.importorskip("torch")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_model.model.state_dict(), checkpoint)
    folder = tmp_path / "a"
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", str(checkpoint), "--classes", "bottle",
                         "--out", str(folder)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(folder)
    assert manifest.pretrained.startswith("file:tiny.pt@") and not manifest.random_weights
    assert manifest.command.startswith("anoclip-export")
    # the checkpoint holds the weights of the seeded random model the tiny artifacts came from
    ours = read_prompts(artifact_file(folder)).get("bottle")
    ref = read_prompts(artifact_file(tiny_artifacts)).get("bottle")
    np.testing.assert_allclose(ours.text_features, ref.text_features, atol=1e-6)


def test_bad_pretrained_tag_is_one_line(tmp_path):
    pytest.importorskip("open_clip")
    proc = export_subprocess("--backbone", "ViT-B-16-plus-240", "--pretrained", "laion5b_e99", "--classes", "x",
                             "--out", str(tmp_path / "a"))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "laion400m_e32" in line and "none" in line


def test_version_names_the_installed_release():
    from importlib.metadata import version

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"anoclip {version('anoclip')}"
