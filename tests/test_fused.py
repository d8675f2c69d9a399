"""The fused graph (anoclip.onnx: image -> scores and maps of K classes) against the runtime's own
path, in plain onnxruntime and OpenVINO, and several classes per pass in the Detector and the CLI.

Tolerance 1e-5 on scores and maps: both sides run the same visual graph on the same input; what
differs is the scoring's float32 arithmetic (the map as two matrix products instead of a filter and
two interpolations, ReduceL2 and ONNX's Sigmoid instead of numpy's), which moves p_abnormal values
near 0.5 by about 1e-7 (measured: at most 1.8e-7 on the tiny model, 6e-7 on ViT-B-16-plus-240).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FUSED_CLASSES, TINY_CONFIG, artifact_file, copy_artifacts, one_error_line, run_cli

onnx = pytest.importorskip("onnx", reason="the fused graph is built with onnx (export extra)")

from anoclip.runtime import scoring  # noqa: E402
from anoclip.runtime.artifacts import read_manifest  # noqa: E402
from anoclip.runtime.backends import OnnxRuntimeBackend  # noqa: E402
from anoclip.runtime.cli import cli  # noqa: E402
from anoclip.runtime.detector import Detector  # noqa: E402
from anoclip.runtime.errors import ArtifactError  # noqa: E402

CLASSES = FUSED_CLASSES
TOL = 1e-5
README = Path(__file__).parent.parent / "README.md"


def runtime_path(visual: Path, batch: np.ndarray, text: list[np.ndarray], grid, size) -> tuple[np.ndarray, np.ndarray]:
    """Scores [B,K] and maps [B,K,H,W] the runtime's way: the visual graph, then scoring.py per class."""
    image_embeds, patch_embeds = OnnxRuntimeBackend(visual, providers="cpu").run(batch)
    scores = np.stack([scoring.abnormal_probability(image_embeds, t) for t in text], axis=1)
    maps = np.stack([scoring.anomaly_map(patch_embeds, t, grid, size) for t in text], axis=1)
    return scores, maps


def run_plain(path: Path, batch: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": batch})))


def inputs(shape, count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape[1:])).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The graph against the runtime


@pytest.mark.parametrize("count", [1, 4])
def test_tiny_fused_graph_matches_the_runtime(fused_artifacts, count):
    manifest = read_manifest(fused_artifacts)
    entry = manifest.models["fused"]
    assert entry.provenance["classes"] == sorted(CLASSES)
    detector = Detector.load(fused_artifacts, backend="cpu")
    text = [detector.class_prompts(c).text_features for c in entry.provenance["classes"]]
    batch = inputs(entry.inputs["image"], count, seed=count)
    scores, maps = runtime_path(artifact_file(fused_artifacts, "visual"), batch, text, manifest.grid, manifest.image_size)
    got = run_plain(artifact_file(fused_artifacts, "fused"), batch)
    assert got["scores"].shape == (count, 3) and got["maps"].shape == (count, 3, *manifest.image_size)
    assert got["patch_scores"].shape == (count, 3, manifest.num_patches)
    assert np.abs(got["scores"] - scores).max() <= TOL
    assert np.abs(got["maps"] - maps).max() <= TOL
    assert np.ptp(got["maps"]) > 1e-3  # maps that vary: the comparison means something


@pytest.fixture(scope="module")
def real_fused(tmp_path_factory):
    """ViT-B-16-plus-240 with random weights, dynamic batch, fused with three random classes."""
    torch = pytest.importorskip("torch")
    from anoclip.export.fused import fuse_graph
    from anoclip.export.model import load_model
    from anoclip.export.onnx_export import export_onnx
    from anoclip.export.vv import VVVisual

    folder = tmp_path_factory.mktemp("real-fused")
    torch.manual_seed(0)
    visual = folder / "visual.onnx"
    export_onnx(VVVisual(load_model("ViT-B-16-plus-240", "none").model.visual), visual, dynamic_batch=True)
    rng = np.random.default_rng(3)
    text = [scoring.l2_normalise(rng.standard_normal((2, 640)).astype(np.float32)) for _ in CLASSES]
    fused = folder / "anoclip.onnx"
    onnx.save(fuse_graph(onnx.load(str(visual)), CLASSES, text, (15, 15), (240, 240), {}), str(fused))
    return visual, fused, text


@pytest.mark.parametrize("count", [1, 4])
def test_vit_b16_plus_fused_graph_matches_the_runtime(real_fused, count):
    visual, fused, text = real_fused
    batch = inputs((count, 3, 240, 240), count, seed=10 + count)
    scores, maps = runtime_path(visual, batch, text, (15, 15), (240, 240))
    got = run_plain(fused, batch)
    assert got["maps"].shape == (count, 3, 240, 240)
    print(f"batch {count}: scores {np.abs(got['scores'] - scores).max():.2e}, "
          f"maps {np.abs(got['maps'] - maps).max():.2e}")
    assert np.abs(got["scores"] - scores).max() <= TOL
    assert np.abs(got["maps"] - maps).max() <= TOL


@pytest.fixture(scope="module")
def real_fused_memory(real_fused):
    """The same visual model fused with memories of two of the three classes (the model's unit patch
    tokens of random images; coreset off): combined with weight 0.3 and both branch maps, and alone."""
    from anoclip.export.fused import fuse_graph

    visual, fused, text = real_fused
    _, patches = OnnxRuntimeBackend(visual, providers="cpu").run(inputs((3, 3, 240, 240), 3, seed=20))
    rows = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
    memories = {CLASSES[0]: rows[:2].reshape(-1, 640), CLASSES[1]: rows[2]}
    model = onnx.load(str(visual))
    graphs = {}
    for mode in ("combined", "only"):
        graphs[mode] = visual.parent / f"anoclip-memory-{mode}.onnx"
        onnx.save(fuse_graph(model, CLASSES, text, (15, 15), (240, 240), {}, memory=memories, memory_weight=0.3,
                             memory_only=mode == "only", branch_maps=mode == "combined"), str(graphs[mode]))
    return visual, graphs, text, memories


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("mode", ["combined", "only"])
def test_vit_b16_plus_fused_memory_graph_equals_the_formula(real_fused_memory, mode, count):
    """The memory branch in the graph against test_fused_memory's plain-numpy formula; one class
    without a memory in the same graph stays zero-shot."""
    from test_fused_memory import assert_graph_equals_formula

    visual, graphs, text, memories = real_fused_memory
    batch = inputs((count, 3, 240, 240), count, seed=30 + count)
    image_embeds, patch_embeds = OnnxRuntimeBackend(visual, providers="cpu").run(batch)
    got = run_plain(graphs[mode], batch)
    assert got["maps"].shape == (count, 3, 240, 240) and got["memory_scores"].shape == (count, 3)
    assert_graph_equals_formula(got, image_embeds, patch_embeds, CLASSES, text, memories, (15, 15), (240, 240), 0.3,
                                mode == "only", label=f"ViT-B-16-plus-240 {mode}")
    assert np.ptp(got["maps"]) > 1e-4


@pytest.mark.parametrize("count", [1, 4])
@pytest.mark.parametrize("mode", ["on", "only"])
def test_vit_b16_plus_detector_memory_path_equals_the_formula(real_fused_memory, fused_artifacts, mode, count):
    """The runtime's own path (Detector.predict_batch: preprocessing, the visual model, memory scores,
    combination, maps) on ViT-B-16-plus-240 tokens against the plain-numpy formula: the tiny folder's
    files with the ViT-B visual model as the backend, its prompts and memories in their place."""
    from memory_reference import formula

    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.memory import ClassMemory, MemoryBank
    from anoclip.runtime.prompt_weights import ClassPrompts, PromptBank

    visual, graphs, text, memories = real_fused_memory
    artifacts = load_artifacts(fused_artifacts)
    manifest = artifacts.manifest
    manifest.image_size, manifest.grid, manifest.embed_dim = (240, 240), (15, 15), 640
    artifacts.prompts = PromptBank({c: ClassPrompts(c, t, t) for c, t in zip(CLASSES, text)}, "ViT-B-16-plus-240",
                                   "none", 640)
    artifacts.memory = MemoryBank({c: ClassMemory(c, np.ascontiguousarray(m, np.float32)) for c, m in memories.items()},
                                  "", 640)
    detector = Detector(artifacts, OnnxRuntimeBackend(visual, providers="cpu"), memory=mode, memory_weight=0.3)
    images = list(np.random.default_rng(40 + count).integers(0, 256, (count, 240, 240, 3), dtype=np.uint8))
    mean, std = np.float32(manifest.mean)[:, None, None], np.float32(manifest.std)[:, None, None]
    batch = np.stack([(im.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std for im in images])
    image_embeds, patch_embeds = OnnxRuntimeBackend(visual, providers="cpu").run(batch)
    classes = list(memories)  # the two classes with a memory
    worst = {"score": 0.0, "map": 0.0}
    for i, result in enumerate(detector.predict_batch(images, classes)):
        for cls, got in result.by_class.items():
            want = formula(image_embeds[i], patch_embeds[i], text[CLASSES.index(cls)], memories[cls], (15, 15),
                           (240, 240), 0.3, mode == "only")
            worst["score"] = max(worst["score"], abs(got.score - want[0]))
            worst["map"] = max(worst["map"], float(np.abs(got.anomaly_map_full - want[1]).max()))
    print(f"runtime path, memory {mode}, batch {count}: score {worst['score']:.2e}, map {worst['map']:.2e}")
    assert max(worst.values()) <= TOL, worst


def test_fused_graph_metadata_and_manifest_entry(fused_artifacts):
    manifest = read_manifest(fused_artifacts)
    entry = manifest.models["fused"]
    model = onnx.load(str(artifact_file(fused_artifacts, "fused")))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["anoclip.classes"]) == entry.provenance["classes"]
    assert json.loads(meta["anoclip.mean"]) == list(manifest.mean) and json.loads(meta["anoclip.std"]) == list(manifest.std)
    assert json.loads(meta["anoclip.grid"]) == list(manifest.grid)
    assert json.loads(meta["anoclip.image_size"]) == list(manifest.image_size)
    assert meta["anoclip.method_version"] == entry.provenance["method_version"]
    assert entry.source_sha256 == manifest.files[manifest.models["visual"].file]
    assert [o.name for o in model.graph.output] == ["scores", "maps", "patch_scores"]
    assert entry.outputs["maps"] == [-1, 3, *manifest.image_size]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("version", ["10.3", "11.1"])
def test_fused_graph_uses_only_operators_tensorrt_parses(fused_artifacts, version):
    from test_engines import assert_tensorrt_parses

    table = json.loads((Path(__file__).parent / "data" / f"tensorrt_{version}_onnx_operators.json").read_text())
    assert_tensorrt_parses(onnx.load(str(artifact_file(fused_artifacts, "fused"))), table, "fused")


# ----------------------------------------------------------------------------------------------
# Without this project: plain onnxruntime (the README's snippet) and plain OpenVINO


def readme_snippet() -> str:
    text = README.read_text()
    start = text.index("With plain onnxruntime, numpy and Pillow")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    return match.group(1)


def test_readme_snippet_runs_the_graph_with_plain_onnxruntime(fused_artifacts, tmp_path):
    from PIL import Image

    image = tmp_path / "part.png"
    rgb = np.random.default_rng(5).integers(0, 256, (120, 100, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(image)
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 14
    check = "\nassert not [m for m in sys.modules if m.split('.')[0] == 'anoclip'], 'anoclip was imported'\n"
    proc = subprocess.run([sys.executable, "-c", code + check, str(artifact_file(fused_artifacts, "fused")), str(image)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = dict(re.findall(r"^(\w+): score ([0-9.]+), map max", proc.stdout, re.M))
    result = Detector.load(fused_artifacts, backend="cpu", model="fused", tiling="never").predict(rgb, "all")
    assert list(printed) == list(result.per_class) and len(printed) == 3
    for name, one in result.per_class.items():
        assert abs(float(printed[name]) - one.score) <= 1e-6  # printed with 6 decimals


def test_plain_openvino_runs_the_graph(fused_artifacts, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (extra openvino)")
    batch = inputs(read_manifest(fused_artifacts).models["fused"].inputs["image"], 2, seed=4)
    np.save(tmp_path / "batch.npy", batch)
    code = (
        "import sys, numpy as np, openvino as ov\n"
        "model = ov.Core().compile_model(sys.argv[1], 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})\n"
        "result = model({0: np.load(sys.argv[2])})\n"
        "np.savez(sys.argv[3], **{port.get_any_name(): result[port] for port in model.outputs})\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'anoclip']\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(artifact_file(fused_artifacts, "fused")),
                           str(tmp_path / "batch.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "out.npz")
    want = run_plain(artifact_file(fused_artifacts, "fused"), batch)
    for name in ("scores", "maps", "patch_scores"):
        assert np.abs(got[name] - want[name]).max() <= TOL, name


def test_openvino_backend_runs_the_fused_model(fused_artifacts, rgb_image):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (extra openvino)")
    ours = Detector.load(fused_artifacts, backend="openvino", model="fused").predict(rgb_image, "all")
    reference = Detector.load(fused_artifacts, backend="cpu").predict(rgb_image, "all")
    for name, one in ours.per_class.items():
        assert abs(one.score - reference.per_class[name].score) <= TOL
        assert np.abs(one.anomaly_map_full - reference.per_class[name].anomaly_map_full).max() <= TOL


# ----------------------------------------------------------------------------------------------
# Several classes per pass


def test_several_classes_equal_single_class_calls(fused_artifacts, rgb_image):
    wide = np.random.default_rng(1).integers(0, 256, (60, 200, 3), dtype=np.uint8)  # tiled
    detector = Detector.load(fused_artifacts, backend="cpu")
    results = detector.predict_batch([rgb_image, wide], ["screw", "bottle"])
    for image, result in zip([rgb_image, wide], results):
        assert list(result.per_class) == ["screw", "bottle"] and result.cls == "screw"
        assert result.score == result.per_class["screw"].score  # the first class's fields, as before
        for name, one in result.by_class.items():
            single = detector.predict(image, name)
            assert single.per_class is None and single.by_class == {name: single}
            assert one.score == single.score and one.tiles == single.tiles
            np.testing.assert_array_equal(one.anomaly_map_full, single.anomaly_map_full)
    assert list(detector.predict(rgb_image, "all").per_class) == sorted(CLASSES)


def test_fused_model_gives_the_visual_model_s_results(fused_artifacts, rgb_image):
    fused = Detector.load(fused_artifacts, backend="cpu", model="fused")
    visual = Detector.load(fused_artifacts, backend="cpu")
    assert fused.classes == sorted(CLASSES)
    wide = np.random.default_rng(2).integers(0, 256, (50, 180, 3), dtype=np.uint8)
    for image in (rgb_image, wide):
        ours, reference = fused.predict(image, "all"), visual.predict(image, "all")
        for name, one in ours.per_class.items():
            other = reference.per_class[name]
            assert abs(one.score - other.score) <= TOL
            for a, b in ((one.anomaly_map, other.anomaly_map), (one.anomaly_map_full, other.anomaly_map_full),
                         (one.patch_probabilities, other.patch_probabilities)):
                assert a.shape == b.shape and np.abs(a - b).max() <= TOL


def test_tta_adapts_each_class_on_the_same_tokens(fused_artifacts, rgb_image):
    several = Detector.load(fused_artifacts, backend="cpu", tta=True).predict(rgb_image, ["carpet", "bottle"])
    for name in ("carpet", "bottle"):
        alone = Detector.load(fused_artifacts, backend="cpu", tta=True).predict(rgb_image, name)
        np.testing.assert_allclose(several.per_class[name].anomaly_map, alone.anomaly_map, atol=1e-6)
        assert "tta" in several.per_class[name].timings


def test_fused_tta_needs_the_patch_tokens(fused_artifacts, tmp_path, rgb_image):
    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    detector = Detector.load(folder, backend="cpu", model="fused", tta=True)
    with pytest.raises(ArtifactError, match="--patch-embeds"):
        detector.predict(rgb_image, "bottle")
    result = CliRunner().invoke(cli, ["fuse", "--artifacts", str(folder), "--classes", "bottle", "--patch-embeds"])
    assert result.exit_code == 0, result.output
    fused = Detector.load(folder, backend="cpu", model="fused", tta=True).predict(rgb_image, "bottle")
    visual = Detector.load(folder, backend="cpu", tta=True).predict(rgb_image, "bottle")
    np.testing.assert_allclose(fused.anomaly_map, visual.anomaly_map, atol=TOL)


# ----------------------------------------------------------------------------------------------
# anoclip fuse and the folder


def test_fuse_command_orders_classes_and_fixes_the_batch(fused_artifacts, tmp_path):
    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    old = artifact_file(folder, "fused")
    result = CliRunner().invoke(cli, ["fuse", "--artifacts", str(folder), "--classes", "screw,bottle", "--batch", "4"])
    assert result.exit_code == 0, result.output
    entry = read_manifest(folder).models["fused"]
    assert entry.provenance["classes"] == ["screw", "bottle"] and entry.inputs["image"][0] == 4
    assert entry.provenance["command"] == "anoclip fuse --artifacts " + str(folder) + " --classes screw,bottle --batch 4"
    assert not old.exists()  # the file it replaced is gone
    detector = Detector.load(folder, backend="cpu", model="fused")
    assert detector.backend.batch_size == 4 and detector.classes == ["screw", "bottle"]
    assert len(detector.predict_batch([np.zeros((48, 48, 3), np.uint8)] * 5, "bottle")) == 5  # padded chunks
    with pytest.raises(ArtifactError, match="not in the fused model"):
        detector.predict(np.zeros((48, 48, 3), np.uint8), "carpet")


def test_fuse_refuses_bad_requests_and_leaves_the_folder(tiny_artifacts, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = (folder / "manifest.json").read_bytes()
    for args, expected in ((["--classes", "nope"], "class 'nope' is not in the prompt weights"),
                           (["--batch", "4"], "fixed batch of 1")):
        proc = run_cli("fuse", "--artifacts", str(folder), *args)
        assert proc.returncode == 1 and expected in one_error_line(proc.stderr)
        assert (folder / "manifest.json").read_bytes() == before
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "part.png")
    proc = run_cli("predict", "--artifacts", str(folder), "--model", "fused", "--class", "bottle",
                   "--out", str(tmp_path / "out"), str(tmp_path / "part.png"))
    assert proc.returncode == 1 and "anoclip fuse --artifacts" in one_error_line(proc.stderr)
    proc = run_cli("fuse", "--artifacts", str(folder))  # the static batch of the visual model
    assert proc.returncode == 0, proc.stderr
    entry = read_manifest(folder).models["fused"]
    assert entry.inputs["image"][0] == 1 and entry.outputs["scores"] == [1, 2]
    result = Detector.load(folder, backend="cpu", model="fused").predict_batch([np.zeros((32, 32, 3), np.uint8)] * 3, "all")
    assert len(result) == 3 and list(result[0].per_class) == ["bottle", "carpet"]


def test_fused_model_of_dropped_class_is_dropped_with_a_line(fused_artifacts, tmp_path, export_cli):
    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--drop-classes", "screw",
                         "--dynamic-batch", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert "dropping fused: class(es) screw were re-encoded or removed" in result.output
    with pytest.raises(ArtifactError, match="model 'fused' is not in .*make it with `anoclip fuse"):
        Detector.load(folder, backend="cpu", model="fused")
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--dynamic-batch", "--fused",
                         "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert Detector.load(folder, backend="cpu", model="fused").classes == ["bottle", "carpet"]


def test_predict_writes_one_line_and_map_per_class(fused_artifacts, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rgb = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(images / "part.png")
    out = tmp_path / "out"
    proc = run_cli("predict", "--artifacts", str(fused_artifacts), "--model", "fused", "--backend", "cpu",
                   "--class", "carpet,bottle", "--out", str(out), str(images))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["class"] for line in lines] == ["carpet", "bottle"]
    reference = Detector.load(fused_artifacts, backend="cpu").predict(rgb, ["carpet", "bottle"])
    for line in lines:
        assert Path(line["map"]).name == f"part_{line['class']}_map.npy"
        assert Path(line["overlay"]).is_file()
        one = reference.per_class[line["class"]]
        assert abs(line["score"] - one.score) <= TOL
        assert np.abs(np.load(line["map"]) - one.anomaly_map_full).max() <= TOL


def test_fuse_thresholds_bakes_the_decision_predict_takes(fused_artifacts, tmp_path, caplog):
    from PIL import Image

    from anoclip.runtime.preprocess import preprocess

    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    manifest = read_manifest(folder)
    height, width = manifest.image_size
    rng = np.random.default_rng(11)
    normal = tmp_path / "normal"
    normal.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(normal / f"{i}.png")
    fuse = ["fuse", "--artifacts", str(folder), "--classes", "carpet,bottle", "--thresholds"]
    refused = CliRunner().invoke(cli, fuse)
    assert refused.exit_code != 0 and "class carpet has no calibrated thresholds" in str(refused.exception)
    assert f"anoclip calibrate threshold --artifacts {folder} --class carpet" in str(refused.exception)
    for cls in ("carpet", "bottle"):
        result = CliRunner().invoke(cli, ["calibrate", "threshold", "--artifacts", str(folder), "--class", cls,
                                          "--normal", str(normal), "--quantile", "0.5", "--pixel-quantile", "0.9"])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, fuse)
    assert result.exit_code == 0, result.output
    entry = read_manifest(folder).models["fused"]
    baked = entry.provenance["thresholds"]
    assert baked["file"] == read_manifest(folder).thresholds and list(baked["classes"]) == ["carpet", "bottle"]
    assert entry.outputs["anomalous"][1:] == [2] and entry.outputs["mask"][1:] == [2, height, width]
    graph = onnx.load(str(artifact_file(folder, "fused")))
    assert json.loads({p.key: p.value for p in graph.metadata_props}["anoclip.thresholds"]) == baked

    detector = Detector.load(folder, backend="cpu")
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(6)]
    batch = np.concatenate([preprocess(f, manifest.image_size, manifest.mean, manifest.std, tiling="never")[0]
                            for f in frames])
    out = run_plain(artifact_file(folder, "fused"), batch)
    assert out["anomalous"].dtype == bool and out["mask"].shape == (6, 2, height, width)
    decided = set()
    for i, frame in enumerate(frames):
        result = detector.predict(frame, ["carpet", "bottle"])
        for k, (cls, one) in enumerate(result.by_class.items()):
            assert one.threshold.image == baked["classes"][cls]["image"]
            assert bool(out["anomalous"][i, k]) == one.anomalous
            decided.add(one.anomalous)
            expected = one.anomaly_map_full > one.threshold.pixel
            near = np.abs(one.anomaly_map_full - one.threshold.pixel) <= TOL  # float32 rounding of the two paths
            assert np.array_equal(out["mask"][i, k][~near], expected[~near])
            assert abs(int(out["mask"][i, k].sum()) - sum(r["area"] for r in one.regions)) <= near.sum()
    assert decided == {True, False}  # both decisions were exercised

    result = CliRunner().invoke(cli, ["calibrate", "threshold", "--artifacts", str(folder), "--class", "bottle",
                                      "--normal", str(normal), "--quantile", "0.9"])
    assert result.exit_code == 0, result.output
    stale = [r.getMessage() for r in caplog.records if "baked thresholds" in r.getMessage()]
    assert stale == [f"the fused model's baked thresholds of bottle are no longer the folder's calibrated ones; "
                     f"`anoclip fuse --artifacts {folder} --classes carpet,bottle --thresholds` bakes the current ones"]


# ----------------------------------------------------------------------------------------------
# Benchmarks


def test_bench_times_the_fused_row(fused_artifacts):
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(fused_artifacts), "--runs", "3", "--warmup", "0",
                                      "--image-size", "64", "--backends", "cpu", "--class", "carpet", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
    row = rows["AnoCLIP (fused graph, 3 classes)"]
    assert row["status"] == "ok" and row["ms"]["p50"] > 0 and row["stages_ms"]["model"] > 0


def test_class_count_benchmark_rows(fused_artifacts):
    from anoclip.benchmarks.latency.class_count import main

    result = CliRunner().invoke(main, ["--artifacts", str(fused_artifacts), "--runs", "3", "--warmup", "0",
                                       "--image-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["row"]: r for r in json.loads(result.stdout)["rows"]}
    assert list(rows) == ["fused graph, 1 class(es) in one pass", "fused graph, 3 class(es) in one pass",
                          "runtime, 1 class(es) in one call", "runtime, 3 class(es) in one call",
                          "runtime, 3 single-class calls"]
    assert rows["fused graph, 1 class(es) in one pass"]["x 1 class"] == 1.0
    assert all(r["p50"] > 0 and r["runs"] == 3 for r in rows.values())


def test_fuse_writes_outside_the_folder_and_leaves_nothing_behind(fused_artifacts, tmp_path, monkeypatch):
    """The graph is written in a locked workspace of the temporary folder; one a killed fuse left
    (its owner gone) is removed by the next fuse, and a fuse leaves none of its own."""
    import tempfile

    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    orphan = temp_root / "anoclip-fuse-999999999-left"
    orphan.mkdir()
    (orphan / "anoclip.onnx").write_bytes(b"x" * 1024)
    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    result = CliRunner().invoke(cli, ["fuse", "--artifacts", str(folder), "--classes", "bottle"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert list(temp_root.iterdir()) == []
