"""The memory of normal frames: the artifact, the coreset, and the memory branch of the scores
against an independent implementation of its formula.

The reference is written from the formula in docs/method.md with plain numpy and onnxruntime
(tests/memory_reference.py; it imports nothing of the runtime's scoring): s_i = 1/2 (1 - max_j <p_i/|p_i|, m_j>),
the memory map is s through a 3x3 replicate-padded mean and align-corners bilinear upsampling, the
combined map and score weigh memory and zero-shot with w. Tolerance 1e-5: both sides run the same
visual graph; they differ in float32 summation order only (about 1e-7 on these values).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import artifact_file, copy_artifacts
from memory_reference import formula, unit

from anoclip.runtime.artifacts import load_artifacts, read_manifest
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.memory import covering_radius, greedy_coreset, read_memory, unit_rows

TOL = 1e-5


def anoclip(*args):
    from anoclip.runtime.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------------
# The independent reference


def reference(image_embeds, patch_embeds, text, memory, grid, size, weight, mode):
    """(score, map [H, W]) of one single-tile image by the formula (test_fused_memory's plain-numpy one)."""
    return formula(image_embeds, patch_embeds, text, memory, grid, size, weight, mode == "only")[:2]


def model_tokens(folder, images):
    """image_embeds, patch_embeds of the folder's visual graph on the model-size images, by plain onnxruntime."""
    import onnxruntime as ort

    manifest = read_manifest(folder)
    mean = np.asarray(manifest.mean, np.float32)[:, None, None]
    std = np.asarray(manifest.std, np.float32)[:, None, None]
    batch = np.stack([(im.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std for im in images])
    session = ort.InferenceSession(str(artifact_file(folder, "visual")), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})


@pytest.fixture(scope="module")
def with_memory(fused_artifacts, tmp_path_factory):
    """The dynamic-batch tiny folder with memories of two classes (coreset off)."""
    import cv2

    folder = copy_artifacts(fused_artifacts, tmp_path_factory.mktemp("memory") / "a")
    normal = tmp_path_factory.mktemp("normal")
    rng = np.random.default_rng(5)
    size = tuple(read_manifest(folder).image_size)
    for i in range(6):
        cv2.imwrite(str(normal / f"n{i}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    for cls in ("bottle", "carpet"):
        result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", cls, "--normal", normal,
                         "--max-patches", "100000")
        assert result.exit_code == 0, result.output
    return folder


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("mode", ["on", "only"])
def test_memory_branch_equals_the_formula(with_memory, count, mode):
    manifest = read_manifest(with_memory)
    size, grid = tuple(manifest.image_size), tuple(manifest.grid)
    images = list(np.random.default_rng(count).integers(0, 256, (count, *size, 3), dtype=np.uint8))
    detector = Detector.load(with_memory, backend="cpu", memory=mode, memory_weight=0.3)
    bank = read_memory(artifact_file(with_memory, None).parent / manifest.memory)
    image_embeds, patch_embeds = model_tokens(with_memory, images)
    results = detector.predict_batch(images, ["bottle", "carpet"])
    for i, result in enumerate(results):
        for cls, got in result.by_class.items():
            text = detector.class_prompts(cls).text_features
            score, amap = reference(image_embeds[i], patch_embeds[i], text, bank.classes[cls].patches, grid, size,
                                    0.3, mode)
            assert got.branches == (("memory",) if mode == "only" else ("zero_shot", "memory"))
            assert abs(got.score - score) <= TOL
            assert np.abs(got.anomaly_map_full - amap).max() <= TOL
            assert np.ptp(amap) > 1e-4  # maps that vary: the comparison means something


def test_memory_rows_are_the_normal_frames_tokens(with_memory):
    """Coreset off: the memory holds exactly the unit patch tokens of the normal frames."""
    import cv2

    bank = load_artifacts(with_memory).memory
    normal = sorted(json.loads(json.dumps(bank.classes["bottle"].provenance["normal"])))
    files = sorted(p for n in normal for p in __import__("pathlib").Path(n).glob("*.png"))
    images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    _, patches = model_tokens(with_memory, images)
    rows = bank.classes["bottle"].patches
    assert rows.shape == (len(files) * patches.shape[1], patches.shape[2])
    assert np.abs(rows - unit(patches).reshape(-1, patches.shape[2])).max() <= TOL
    assert bank.classes["bottle"].provenance["coreset"] == "none"


def test_memory_off_and_auto(with_memory, fused_artifacts, rgb_image):
    off = Detector.load(with_memory, backend="cpu", memory="off").predict(rgb_image, "bottle")
    plain = Detector.load(fused_artifacts, backend="cpu").predict(rgb_image, "bottle")
    assert off.branches == ("zero_shot",) and off.score == plain.score
    auto = Detector.load(with_memory, backend="cpu").predict(rgb_image, ["bottle", "screw"])
    assert auto.by_class["bottle"].branches == ("zero_shot", "memory")
    assert auto.by_class["screw"].branches == ("zero_shot",)  # screw has no memory: zero-shot alone
    with pytest.raises(AnoclipError, match="calibrate memory --artifacts .* --class screw"):
        Detector.load(with_memory, backend="cpu", memory="on").predict(rgb_image, "screw")


def test_record_names_the_branches(with_memory, rgb_image):
    from anoclip.runtime.records import make_record

    result = Detector.load(with_memory, backend="cpu").predict(rgb_image, "bottle")
    record = make_record(result, "x.png")
    assert record["branches"] == ["zero_shot", "memory"]
    assert record["branch_scores"]["memory"] == pytest.approx(result.memory_score)
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    schema = json.loads((Path(__file__).parent.parent / "docs" / "record.schema.json").read_text())
    jsonschema.validate(record, schema)


# ----------------------------------------------------------------------------------------------
# The coreset


def test_coreset_is_deterministic_a_subset_and_covers(capsys):
    rng = np.random.default_rng(0)
    rows = unit_rows(rng.standard_normal((3000, 64)))
    for size in (256, 1024):
        first, second = greedy_coreset(rows, size), greedy_coreset(rows, size)
        assert np.array_equal(first, second) and len(set(first.tolist())) == size
        radius = covering_radius(rows, first)
        random_radius = covering_radius(rows, rng.choice(len(rows), size, replace=False))
        with capsys.disabled():
            print(f"\ncoreset {size} of {len(rows)}: covering radius {radius:.4f} (a random subset: "
                  f"{random_radius:.4f}), score units")
        assert radius < random_radius  # k-center covers better than chance
    assert covering_radius(rows, greedy_coreset(rows, 1024)) < covering_radius(rows, greedy_coreset(rows, 256))
    assert np.array_equal(greedy_coreset(rows, 5000), np.arange(3000))


def test_calibrate_memory_coreset_extend_and_provenance(fused_artifacts, tmp_path):
    import cv2

    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"n{i}.png"), np.random.default_rng(i).integers(0, 256, (60, 60, 3), np.uint8))
    result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", "bottle", "--normal", tmp_path / "n0.png",
                     "--normal", tmp_path / "n1.png", "--max-patches", "10", "--augment", "hflip")
    assert result.exit_code == 0, result.output
    record = load_artifacts(folder).memory.classes["bottle"]
    grid = read_manifest(folder).num_patches
    assert record.patches.shape[0] == 10
    assert record.provenance["patches"] == 2 * 2 * grid and record.provenance["augment"] == ["hflip"]
    assert record.provenance["coreset"] == "greedy k-center" and record.provenance["covering_radius"] > 0
    result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", "bottle", "--normal", tmp_path / "n2.png",
                     "--max-patches", "100", "--extend")
    assert result.exit_code == 0, result.output
    record = load_artifacts(folder).memory.classes["bottle"]
    assert record.provenance["frames"] == 3 and record.patches.shape[0] == 10 + grid


def test_unknown_class_and_bad_augmentation_are_one_line(fused_artifacts, tmp_path):
    from conftest import one_error_line, run_cli

    import cv2

    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    cv2.imwrite(str(tmp_path / "n.png"), np.zeros((40, 40, 3), np.uint8))
    proc = run_cli("calibrate", "memory", "--artifacts", str(folder), "--class", "nope", "--normal", str(tmp_path))
    assert proc.returncode != 0 and "class 'nope'" in one_error_line(proc.stderr)
    proc = run_cli("calibrate", "memory", "--artifacts", str(folder), "--class", "bottle", "--normal", str(tmp_path),
                   "--augment", "twirl")
    assert proc.returncode == 2 and "twirl" in proc.stderr


def test_a_new_visual_model_drops_the_memory(with_memory, export_cli, tmp_path, caplog):
    from conftest import TINY_CONFIG

    folder = copy_artifacts(with_memory, tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--seed", "1", "--force", "--classes",
                             "bottle", "--dynamic-batch", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    said = caplog.text + result.output
    if read_manifest(folder).memory:  # the same visual weights (seed ignored): the memory holds
        pytest.skip("the export made the same visual model")
    assert "dropping memory" in said and "anoclip calibrate memory --artifacts" in said
    assert not list(folder.glob("memory.*"))
    assert load_artifacts(folder).memory is None


# ----------------------------------------------------------------------------------------------
# Thresholds remember the memory they were calibrated with


def test_thresholds_hold_for_the_memory_they_were_calibrated_with(with_memory, tmp_path, caplog):
    import cv2

    folder = copy_artifacts(with_memory, tmp_path / "a")
    other = tmp_path / "other"
    other.mkdir()
    for i in range(8):
        cv2.imwrite(str(other / f"o{i}.png"), np.random.default_rng(100 + i).integers(0, 256, (48, 48, 3), np.uint8))
    result = anoclip("calibrate", "threshold", "--artifacts", folder, "--class", "bottle", "--normal", other,
                     "--memory-weight", "0.25")
    assert result.exit_code == 0, result.output
    assert "with the memory of normal frames" in result.output and "at weight 0.25" in result.output
    record = load_artifacts(folder).thresholds.classes["bottle"]
    memory = load_artifacts(folder).memory.classes["bottle"]
    assert (record.memory, record.memory_weight, record.memory_sha256) == ("on", 0.25, memory.sha256)
    assert Detector.load(folder, backend="cpu", memory_weight=0.25).calibration("bottle") == record
    for options, said in (({"memory": "off"}, "used without the memory"), ({"memory_weight": 0.5}, "at weight 0.5"),
                          ({"memory": "only"}, "alone")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert Detector.load(folder, backend="cpu", **options).calibration("bottle") is None
        assert "not applied" in caplog.text and said in caplog.text, caplog.text
    # a new memory of the class makes them stale
    result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", "bottle", "--normal", other, "--extend")
    assert result.exit_code == 0, result.output
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert Detector.load(folder, backend="cpu", memory_weight=0.25).calibration("bottle") is None
    assert "calibrated with memory" in caplog.text


def test_calibrating_thresholds_on_the_memorys_own_frames_is_warned(with_memory, tmp_path, caplog):
    folder = copy_artifacts(with_memory, tmp_path / "a")
    normal = load_artifacts(folder).memory.classes["bottle"].provenance["normal"]
    with caplog.at_level(logging.WARNING):
        result = anoclip("calibrate", "threshold", "--artifacts", folder, "--class", "bottle", "--normal", *normal)
    assert result.exit_code == 0, result.output
    assert "also made the memory of class bottle" in caplog.text


def test_a_new_memory_says_which_thresholds_it_made_stale(with_memory, tmp_path, caplog):
    import cv2

    folder = copy_artifacts(with_memory, tmp_path / "a")
    cv2.imwrite(str(tmp_path / "o.png"), np.random.default_rng(9).integers(0, 256, (48, 48, 3), np.uint8))
    for cls in ("bottle", "carpet"):
        assert anoclip("calibrate", "threshold", "--artifacts", folder, "--class", cls, "--normal",
                       tmp_path / "o.png").exit_code == 0
    with caplog.at_level(logging.WARNING):
        result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", "bottle", "--normal",
                         tmp_path / "o.png")
    assert result.exit_code == 0, result.output
    stale = [line for line in caplog.text.splitlines() if "are stale" in line]
    assert len(stale) == 1 and "thresholds of bottle" in stale[0] and "memory of normal frames changed" in stale[0]
