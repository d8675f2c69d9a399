"""The memory of normal frames inside the fused graph (`anoclip fuse` with a folder's memory): the
graph's outputs against the formula, the Detector with ``--model fused`` against the visual model's
path, the refusals when graph and folder or settings differ, the operators TensorRT parses, and the
Triton repository of such a graph.

The reference (``memory_reference.formula``) is written from the formula in docs/method.md with plain numpy (it
imports nothing of the runtime's scoring or memory code): s_i = 1/2 (1 - max_j <p_i/|p_i|, m_j>),
combined per patch as w s + (1 - w) p_abnormal and per image as w max_i s_i + (1 - w) zero-shot
score (``only``: s and max s alone), each map through a 3x3 replicate-padded mean and align-corners
bilinear upsampling. Tolerance 1e-5: both sides run the same visual graph on the same input; what
differs is float32 summation order (about 1e-7).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FUSED_CLASSES, artifact_file, copy_artifacts, one_error_line, run_cli
from memory_reference import formula

onnx = pytest.importorskip("onnx", reason="the fused graph is built with onnx (export extra)")

from anoclip.runtime.artifacts import load_artifacts, read_manifest  # noqa: E402
from anoclip.runtime.detector import Detector  # noqa: E402
from anoclip.runtime.errors import AnoclipError, ArtifactError  # noqa: E402

TOL = 1e-5
MEMORY_CLASSES = ("bottle", "carpet")  # screw keeps no memory: zero-shot alone in the same graph


def anoclip(*args):
    from anoclip.runtime.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ----------------------------------------------------------------------------------------------
# The independent reference (plain numpy, float64)


def assert_graph_equals_formula(got, image_embeds, patch_embeds, classes, text, memories, grid, size, weight, only,
                                label=""):
    """Every output of the fused graph against :func:`formula`, per image and class; prints the
    largest differences."""
    worst: dict[str, float] = {}
    names = ("scores", "maps", "patch_scores", "zero_shot_scores", "memory_scores", "memory_maps", "zero_shot_maps")
    for i in range(len(image_embeds)):
        for k, cls in enumerate(classes):
            want = formula(image_embeds[i], patch_embeds[i], text[k], memories.get(cls), grid, size, weight, only)
            for name, value in zip(names, want):
                if name in got:
                    worst[name] = max(worst.get(name, 0.0), float(np.abs(got[name][i, k] - value).max()))
    print(f"{label} batch {len(image_embeds)}: " + ", ".join(f"{n} {d:.2e}" for n, d in worst.items()))
    assert {"scores", "maps", "patch_scores", "zero_shot_scores", "memory_scores"} <= set(worst)
    assert max(worst.values()) <= TOL, worst


def run_plain(path, batch: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch})))


# ----------------------------------------------------------------------------------------------
# The tiny model through the CLI


def _normal_frames(folder, tmp_path_factory):
    import cv2

    normal = tmp_path_factory.mktemp("normal")
    rng = np.random.default_rng(5)
    size = tuple(read_manifest(folder).image_size)
    for i in range(4):
        cv2.imwrite(str(normal / f"n{i}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return normal


@pytest.fixture(scope="module")
def memory_folder(fused_artifacts, tmp_path_factory):
    """The dynamic-batch tiny folder with memories of bottle and carpet (coreset off), fused again
    with them (weight 0.3, both branch maps)."""
    folder = copy_artifacts(fused_artifacts, tmp_path_factory.mktemp("fused-memory") / "a")
    normal = _normal_frames(folder, tmp_path_factory)
    for cls in MEMORY_CLASSES:
        result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", cls, "--normal", normal,
                         "--max-patches", "100000")
        assert result.exit_code == 0, result.output
    result = anoclip("fuse", "--artifacts", folder, "--memory-weight", "0.3", "--branch-maps")
    assert result.exit_code == 0, result.output
    assert "with the memory of normal frames of bottle" in result.output
    return folder


@pytest.fixture(scope="module")
def only_folder(memory_folder, tmp_path_factory):
    folder = copy_artifacts(memory_folder, tmp_path_factory.mktemp("fused-memory-only") / "a")
    result = anoclip("fuse", "--artifacts", folder, "--classes", ",".join(MEMORY_CLASSES), "--memory", "only")
    assert result.exit_code == 0, result.output
    return folder


def _visual_tokens(folder, batch):
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact_file(folder, "visual")), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("mode", ["combined", "only"])
def test_tiny_fused_memory_graph_equals_the_formula(memory_folder, only_folder, mode, count):
    folder = memory_folder if mode == "combined" else only_folder
    manifest = read_manifest(folder)
    entry = manifest.models["fused"]
    classes = entry.provenance["classes"]
    artifacts = load_artifacts(folder)
    text = [artifacts.prompts.get(c).text_features for c in classes]
    memories = {c: artifacts.memory.classes[c].patches for c in MEMORY_CLASSES}
    batch = np.random.default_rng(count).standard_normal((count, 3, *manifest.image_size)).astype(np.float32)
    got = run_plain(artifact_file(folder, "fused"), batch)
    image_embeds, patch_embeds = _visual_tokens(folder, batch)
    assert got["memory_scores"].shape == (count, len(classes))
    assert_graph_equals_formula(got, image_embeds, patch_embeds, classes, text, memories, tuple(manifest.grid),
                                tuple(manifest.image_size), 0.3, mode == "only", label=f"tiny {mode}")
    assert np.ptp(got["maps"]) > 1e-4
    if mode == "combined":
        screw = classes.index("screw")
        assert np.all(got["memory_scores"][:, screw] == 0) and np.all(got["memory_maps"][:, screw] == 0)
        assert np.array_equal(got["scores"][:, screw], got["zero_shot_scores"][:, screw])


def test_entry_and_metadata_record_the_memory(memory_folder):
    manifest = read_manifest(memory_folder)
    entry = manifest.models["fused"]
    bank = load_artifacts(memory_folder).memory
    want = {c: {"sha256": bank.classes[c].sha256, "rows": int(bank.classes[c].patches.shape[0])} for c in MEMORY_CLASSES}
    assert entry.provenance["memory"] == want
    assert entry.provenance["memory_weight"] == 0.3 and entry.provenance["memory_mode"] == "combined"
    model = onnx.load(str(artifact_file(memory_folder, "fused")))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["anoclip.memory"])
    assert meta == {"memory": want, "memory_weight": 0.3, "memory_mode": "combined"}
    names = [o.name for o in model.graph.output]
    assert names == ["scores", "maps", "patch_scores", "zero_shot_scores", "memory_scores", "memory_maps",
                     "zero_shot_maps"]
    assert list(entry.outputs) == names and entry.outputs["memory_maps"] == [-1, 3, *manifest.image_size]


def test_fused_detector_with_memory_equals_the_visual_model(memory_folder, only_folder, rgb_image):
    wide = np.random.default_rng(2).integers(0, 256, (50, 180, 3), dtype=np.uint8)  # tiled
    for folder, mode, classes in ((memory_folder, "auto", "all"), (memory_folder, "on", list(MEMORY_CLASSES)),
                                  (only_folder, "only", list(MEMORY_CLASSES))):
        fused = Detector.load(folder, backend="cpu", model="fused", memory=mode, memory_weight=0.3)
        visual = Detector.load(folder, backend="cpu", memory=mode, memory_weight=0.3)
        assert fused.backend.output_names[:5] == ["scores", "maps", "patch_scores", "zero_shot_scores", "memory_scores"]
        worst = 0.0
        for image in (rgb_image, wide):
            ours, reference = fused.predict(image, classes), visual.predict(image, classes)
            assert list(ours.by_class) == list(reference.by_class)
            for name, one in ours.by_class.items():
                other = reference.by_class[name]
                assert one.branches == other.branches and one.tiles == other.tiles
                for a, b in ((one.score, other.score), (one.zero_shot_score, other.zero_shot_score),
                             (one.memory_score, other.memory_score)):
                    assert (a is None) == (b is None)
                    worst = max(worst, abs(a - b) if a is not None else 0.0)
                for a, b in ((one.anomaly_map, other.anomaly_map), (one.anomaly_map_full, other.anomaly_map_full),
                             (one.patch_probabilities, other.patch_probabilities)):
                    assert a.shape == b.shape
                    worst = max(worst, float(np.abs(a - b).max()))
        print(f"memory {mode}: largest difference fused - visual {worst:.2e}")
        assert worst <= TOL
    several = Detector.load(memory_folder, backend="cpu", model="fused", memory_weight=0.3).predict(rgb_image, "all")
    assert several.by_class["bottle"].branches == ("zero_shot", "memory")
    assert several.by_class["screw"].branches == ("zero_shot",) and several.by_class["screw"].memory_score is None


def test_fused_tta_with_baked_memory_equals_the_visual_model(memory_folder, tmp_path, rgb_image):
    folder = copy_artifacts(memory_folder, tmp_path / "a")
    result = anoclip("fuse", "--artifacts", folder, "--memory-weight", "0.3", "--patch-embeds")
    assert result.exit_code == 0, result.output
    fused = Detector.load(folder, backend="cpu", model="fused", memory_weight=0.3, tta=True).predict(rgb_image, "bottle")
    visual = Detector.load(folder, backend="cpu", memory_weight=0.3, tta=True).predict(rgb_image, "bottle")
    assert fused.branches == visual.branches == ("zero_shot", "memory")
    assert abs(fused.score - visual.score) <= TOL and abs(fused.memory_score - visual.memory_score) <= TOL
    np.testing.assert_allclose(fused.anomaly_map, visual.anomaly_map, atol=TOL)


# ----------------------------------------------------------------------------------------------
# Refusals: one line naming `anoclip fuse`


def test_settings_the_graph_did_not_bake_are_refused(memory_folder, only_folder, rgb_image):
    make = f"anoclip fuse --artifacts {memory_folder}"
    cases = (({"memory_weight": 0.5}, f"bakes memory weight 0.3 and this runs 0.5; make it with `{make} --memory-weight 0.5`"),
             ({"memory": "off", "memory_weight": 0.3}, "cannot leave it out (--memory off)"),
             ({"memory": "only"}, f"bakes --memory auto and this runs --memory only; make it with `{make} --memory only`"))
    for options, expected in cases:
        detector = Detector.load(memory_folder, backend="cpu", model="fused", **options)
        with pytest.raises(ArtifactError) as caught:
            detector.predict(rgb_image, "bottle")
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ArtifactError, match="bakes --memory only and this runs --memory auto"):
        Detector.load(only_folder, backend="cpu", model="fused").predict(rgb_image, "bottle")
    # a class whose memory the graph did not bake, in a graph without patch tokens: fused again names the fix
    assert Detector.load(memory_folder, backend="cpu", model="fused", memory="off").predict(rgb_image, "screw").branches \
        == ("zero_shot",)


def test_a_changed_memory_makes_the_fused_model_stale_and_refused(memory_folder, tmp_path, rgb_image, caplog):
    import logging

    import cv2

    folder = copy_artifacts(memory_folder, tmp_path / "a")
    cv2.imwrite(str(tmp_path / "more.png"), np.random.default_rng(9).integers(0, 256, (40, 40, 3), np.uint8))
    with caplog.at_level(logging.INFO):
        result = anoclip("calibrate", "memory", "--artifacts", folder, "--class", "carpet", "--normal",
                         tmp_path / "more.png", "--max-patches", "100000", "--extend")
    assert result.exit_code == 0, result.output
    make = f"anoclip fuse --artifacts {folder}"
    stale = [r.getMessage() for r in caplog.records if "baked memory" in r.getMessage()]
    assert stale == [f"the fused model's baked memory of normal frames of carpet is no longer the folder's; `{make} "
                     f"--classes bottle,carpet,screw --memory-weight 0.3` bakes the current one (predicting with it is "
                     "refused until then)"]
    detector = Detector.load(folder, backend="cpu", model="fused", memory_weight=0.3)
    assert detector.predict(rgb_image, "bottle").branches == ("zero_shot", "memory")  # bottle's memory is the same
    cv2.imwrite(str(tmp_path / "part.png"), cv2.cvtColor(rgb_image, cv2.COLOR_RGB2BGR))
    proc = run_cli("predict", "--artifacts", str(folder), "--model", "fused", "--memory-weight", "0.3", "--class",
                   "carpet", str(tmp_path / "part.png"))
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert f"the memory of normal frames of class carpet in {folder} changed since its fused model baked it" in line
    assert f"`{make}`" in line
    result = anoclip("fuse", "--artifacts", folder, "--memory-weight", "0.3")
    assert result.exit_code == 0, result.output
    assert Detector.load(folder, backend="cpu", model="fused", memory_weight=0.3).predict(rgb_image, "carpet").branches \
        == ("zero_shot", "memory")


def test_fuse_refuses_memory_requests_the_folder_cannot_meet(memory_folder, fused_artifacts, tmp_path):
    proc = run_cli("fuse", "--artifacts", str(memory_folder), "--memory", "on")
    assert proc.returncode == 1
    assert "class screw has no memory of normal frames" in one_error_line(proc.stderr)
    with pytest.raises(AnoclipError, match="--branch-maps needs a class with a memory"):
        anoclip("fuse", "--artifacts", copy_artifacts(fused_artifacts, tmp_path / "a"), "--branch-maps")


def test_fuse_without_memory_keeps_the_zero_shot_graph(memory_folder, tmp_path, rgb_image):
    folder = copy_artifacts(memory_folder, tmp_path / "a")
    result = anoclip("fuse", "--artifacts", folder, "--memory", "off")
    assert result.exit_code == 0, result.output
    entry = read_manifest(folder).models["fused"]
    assert "memory" not in entry.provenance and list(entry.outputs) == ["scores", "maps", "patch_scores"]
    one = Detector.load(folder, backend="cpu", model="fused", memory="off").predict(rgb_image, "bottle")
    assert one.branches == ("zero_shot",)
    with pytest.raises(ArtifactError, match=f"`anoclip fuse --artifacts {folder}` \\(bakes the folder's memory"):
        Detector.load(folder, backend="cpu", model="fused").predict(rgb_image, "bottle")


# ----------------------------------------------------------------------------------------------
# Consumers of the graph


@pytest.mark.parametrize("version", ["10.3", "11.1"])
def test_fused_memory_graph_uses_only_operators_tensorrt_parses(memory_folder, version):
    from pathlib import Path

    from test_engines import assert_tensorrt_parses

    table = json.loads((Path(__file__).parent / "data" / f"tensorrt_{version}_onnx_operators.json").read_text())
    model = onnx.load(str(artifact_file(memory_folder, "fused")))
    assert {"ReduceMax", "Concat", "Mul", "Sub", "Add"} <= {n.op_type for n in model.graph.node}
    assert_tensorrt_parses(model, table, "fused with memory")


def test_triton_repository_declares_the_memory_outputs(memory_folder, tmp_path):
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="Triton's model-config schema (dev extra)")
    from test_triton_repository import assert_config_matches_onnx, parse_config

    repo = tmp_path / "repo"
    proc = run_cli("export-triton", "--artifacts", str(memory_folder), "--out", str(repo))
    assert proc.returncode == 0, proc.stderr
    config = parse_config(repo / "anoclip_fused" / "config.pbtxt")
    assert_config_matches_onnx(config, repo / "anoclip_fused" / "1" / "model.onnx")
    assert {o.name for o in config.output} >= {"zero_shot_scores", "memory_scores", "memory_maps", "zero_shot_maps"}
    assert json.loads(config.parameters["anoclip.classes"].string_value) == sorted(FUSED_CLASSES)


def test_triton_config_declares_the_decision_as_bool():
    pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="Triton's model-config schema (dev extra)")
    from google.protobuf import text_format
    from test_triton_repository import model_config_pb2

    from anoclip.runtime.artifacts import ModelEntry
    from anoclip.runtime.serving.model_repository import model_config

    entry = ModelEntry(file="", inputs={"image": [-1, 3, 32, 32]}, patch_tokens="", outputs={
        "scores": [-1, 2], "memory_scores": [-1, 2], "anomalous": [-1, 2], "mask": [-1, 2, 32, 32]})

    config = text_format.Parse(model_config("anoclip_fused", "onnxruntime_onnx", entry, max_batch=8, queue_delay_us=0,
                                            instances=1, kind="KIND_CPU", parameters={}),
                               model_config_pb2.ModelConfig())
    kinds = {o.name: model_config_pb2.DataType.Name(o.data_type) for o in config.output}
    assert kinds == {"scores": "TYPE_FP32", "memory_scores": "TYPE_FP32", "anomalous": "TYPE_BOOL", "mask": "TYPE_BOOL"}


def test_baked_thresholds_must_be_calibrated_with_the_baked_memory(memory_folder, tmp_path, tmp_path_factory, rgb_image):
    folder = copy_artifacts(memory_folder, tmp_path / "a")
    normal = _normal_frames(folder, tmp_path_factory)
    result = anoclip("calibrate", "threshold", "--artifacts", folder, "--class", "bottle", "--normal", normal,
                     "--quantile", "0.9", "--memory-weight", "0.3")
    assert result.exit_code == 0, result.output
    with pytest.raises(AnoclipError) as caught:
        anoclip("fuse", "--artifacts", folder, "--classes", "bottle", "--thresholds")  # weight 0.5 by default
    assert "do not hold for the fused graph" in str(caught.value) and "--memory on --memory-weight 0.5" in str(caught.value)
    result = anoclip("fuse", "--artifacts", folder, "--classes", "bottle", "--thresholds", "--memory-weight", "0.3")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(folder)
    image = manifest.models["fused"].provenance["thresholds"]["classes"]["bottle"]["image"]
    batch = np.random.default_rng(3).standard_normal((4, 3, *manifest.image_size)).astype(np.float32)
    out = run_plain(artifact_file(folder, "fused"), batch)
    assert out["anomalous"].dtype == bool and out["memory_scores"].shape == (4, 1)
    assert np.array_equal(out["anomalous"], out["scores"] > np.float32(image))  # the combined score decides
