"""Reduced precision on the tiny ViT: `anoclip calibrate int8|fp16` (Q/DQ structure, fp16 types,
parity figures and gate, manifest entries), Detector/CLI --precision, re-export, the stress weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_BACKBONE, TINY_CONFIG, copy_artifacts, one_error_line, run_cli

onnx = pytest.importorskip("onnx")


def calibrate(*args: str):
    from anoclip.calibration.cli import calibrate_group

    return CliRunner().invoke(calibrate_group, list(args))


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """24 smooth colour images of a made-up scene (a few sizes, one far from square)."""
    import cv2

    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for i in range(24):
        size = (96, 80) if i % 5 else (200, 60)
        base = cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), size, interpolation=cv2.INTER_CUBIC)
        noisy = np.clip(base.astype(int) + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"frame{i:02d}.png"), noisy)
    return folder


@pytest.fixture(scope="module")
def reduced(tiny_artifacts, frames, tmp_path_factory) -> Path:
    """A copy of the tiny artifacts with visual_int8 (16 frames, every MatMul quantized: the tiny random
    model's errors sit near the gate, and the search that keeps some in float is tested in
    test_int8_calibration.py) and visual_fp16 (synthetic parity inputs)."""
    folder = copy_artifacts(tiny_artifacts, tmp_path_factory.mktemp("reduced") / "artifacts")
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(frames), "--n", "16",
                       "--parity-frames", "4", "--no-keep-float", "--max-map-error", "0.5", "--max-score-error", "0.5")
    assert result.exit_code == 0, result.output
    result = calibrate("fp16", "--artifacts", str(folder))
    assert result.exit_code == 0, result.output
    return folder


def model_of(folder: Path, name: str):
    from anoclip.runtime.artifacts import read_manifest

    manifest = read_manifest(folder)
    return onnx.load(str(folder / manifest.models[name].file)), manifest


# --------------------------------------------------------------------------------------------------
# int8: what is quantized, and how


def test_int8_quantizes_matrix_products_only_symmetric_with_per_channel_weights(reduced):
    from onnx import numpy_helper

    model, _ = model_of(reduced, "visual_int8")
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    dq_outputs = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantized_ops = {n.op_type for n in model.graph.node if any(i in dq_outputs for i in n.input)}
    # a tensor read by a MatMul is quantized for all its readers (v feeds the V-V scaling Mul and a Transpose)
    assert quantized_ops <= {"MatMul", "Conv", "Gemm", "Mul", "Transpose"}
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Add", "Erf"):
            assert not any(i in dq_outputs for i in node.input), f"{node.op_type} {node.name} reads dequantized input"
        if node.op_type in ("MatMul", "Conv"):
            assert all(i in dq_outputs for i in node.input[:2]), f"{node.name} has an input in float"
            consumers = [n for n in model.graph.node if node.output[0] in n.input]
            assert all(c.op_type != "QuantizeLinear" for c in consumers), "outputs of quantized ops stay float"
    weights = 0
    for dq in dq_outputs.values():
        zero = numpy_helper.to_array(inits[dq.input[2]])
        assert zero.dtype == np.int8 and not zero.any()  # symmetric int8, zero point 0
        if dq.input[0] in inits:  # a weight: one scale per output channel, along that channel's axis
            weight = numpy_helper.to_array(inits[dq.input[0]])
            scale = numpy_helper.to_array(inits[dq.input[1]])
            axis = next(a.i for a in dq.attribute if a.name == "axis")
            consumer = next(n for n in model.graph.node if dq.output[0] in n.input)
            assert axis == (0 if consumer.op_type == "Conv" else 1)
            assert weight.dtype == np.int8 and scale.shape == (weight.shape[axis],)
            weights += 1
        else:
            assert producers[dq.input[0]].op_type == "QuantizeLinear"
            assert numpy_helper.to_array(inits[dq.input[1]]).size == 1  # activations: per tensor
    original, _ = model_of(reduced, "visual")
    constant = {i.name for i in original.graph.initializer}
    assert weights == len({i for n in original.graph.node if n.op_type in ("MatMul", "Conv") for i in n.input
                           if i in constant})  # one per weight tensor (the final projection serves two products)


def test_int8_weights_only_leaves_attention_products_in_float(tiny_artifacts, frames, tmp_path):
    from anoclip.calibration.int8 import Int8Scheme, attention_products, qdq_structure, quantize_int8
    from anoclip.calibration.derived import read_frames
    from anoclip.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(tiny_artifacts)
    split = read_frames([str(frames)], artifacts.manifest, 8, 2)
    quantize_int8(artifacts.model_path(), tmp_path / "w.onnx", split.calibration, Int8Scheme("minmax", attention=False))
    model = onnx.load(str(tmp_path / "w.onnx"))
    structure = qdq_structure(model)
    assert set(structure["quantized_ops"]) == {"MatMul", "Conv"} and structure["weights"]["per_tensor"] == 0
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    names = set(attention_products(onnx.load(str(artifacts.model_path()))))
    assert names and all(not any(i in dq_outputs for i in n.input) for n in model.graph.node if n.name in names)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_int8_other_calibration_methods_run(tiny_artifacts, frames, tmp_path, method):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(frames), "--n", "9", "--parity-frames",
                       "3", "--method", method, "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    assert entry["provenance"]["method"] == method and entry["provenance"]["frames"]["calibration"] == 9


# --------------------------------------------------------------------------------------------------
# fp16: types and casts


def test_fp16_keeps_layernorm_softmax_and_io_in_fp32(reduced):
    from anoclip.calibration.fp16 import cast_structure

    model, _ = model_of(reduced, "visual_fp16")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert all(v.type.tensor_type.elem_type == FLOAT for v in [*model.graph.input, *model.graph.output])
    for node in inferred.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert all(types[i] == FLOAT for i in node.input if i), node.name
            assert types[node.output[0]] == FLOAT
        elif node.op_type in ("MatMul", "Conv", "Erf"):
            assert all(types[i] == FLOAT16 for i in node.input if i), node.name
    structure = cast_structure(model)
    assert structure["misplaced_casts"] == [] and structure["fp16_parameters_of_fp32_ops"] == []
    layernorms = sum(n.op_type == "LayerNormalization" for n in model.graph.node)
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    assert structure["casts"]["fp32 op ->"] == layernorms + softmaxes
    assert structure["casts"]["graph input -> fp16"] == 1 and structure["casts"]["-> graph output fp32"] == 2


# --------------------------------------------------------------------------------------------------
# manifest, provenance, parity


def test_entries_are_listed_hashed_and_record_their_provenance(reduced, frames):
    from anoclip.runtime.artifacts import load_artifacts, read_manifest, verify_files

    manifest = read_manifest(reduced)
    visual_sha = manifest.files[manifest.models["visual"].file]
    for name, precision in (("visual_int8", "int8"), ("visual_fp16", "fp16")):
        entry = manifest.models[name]
        assert entry.file.startswith(f"{name}.") and entry.file.endswith(".onnx") and entry.file in manifest.files
        assert entry.precision == precision and entry.source_sha256 == visual_sha
        assert entry.inputs == manifest.models["visual"].inputs and entry.outputs == manifest.models["visual"].outputs
        parity = entry.provenance["parity"]
        assert parity["passed"] and parity["map_error"] <= parity["gate"]["map_error"]
        assert parity["patch_error"] <= parity["gate"]["patch_error"]
        assert {"image_cos_mean", "image_cos_min", "patch_cos_mean", "patch_cos_min", "max_abs_diff", "map_r_mean",
                "map_r_min", "score_max_abs_diff", "patch_error", "map_error"} <= set(parity)
        assert entry.provenance["command"].startswith(f"anoclip calibrate {precision} ")
        assert f"--artifacts {reduced}" in entry.provenance["command"]
        assert entry.provenance["created"].endswith("Z")
    verify_files(reduced, manifest)  # every file's sha256 as recorded
    int8 = manifest.models["visual_int8"].provenance
    assert int8["images"] == [str(frames)] and int8["method"] == "minmax"
    assert int8["frames"] == {"read": 20, "calibration": 16, "parity": 4, "parity_inputs": "4 held-out frames",
                              "skipped": []}
    assert int8["quantizer"] == "onnxruntime.quantization.quantize_static" and int8["quantizer_version"]
    assert int8["structure"]["zero_points_all_zero"] and not int8["structure"]["float_ops_fed_by_dq"]
    fp16 = manifest.models["visual_fp16"].provenance
    assert fp16["frames"]["parity_inputs"] == "16 synthetic textures"
    assert fp16["parity"]["map_r_mean"] > 0.999
    assert any(line.endswith(f"anoclip calibrate fp16 --artifacts {reduced}") for line in manifest.history)
    load_artifacts(reduced, models=["visual_int8", "visual_fp16"])  # hashes verified at load


def test_parity_figures_of_a_model_against_itself_and_a_broken_one(tiny_artifacts):
    from anoclip.calibration.parity import DEFAULT_GATES, compare, pearson
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.errors import AnoclipError
    from anoclip.calibration.parity import check_gate

    artifacts = load_artifacts(tiny_artifacts)
    grid, size = tuple(artifacts.manifest.grid), tuple(artifacts.manifest.image_size)
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, artifacts.manifest.embed_dim)).astype(np.float32)
    patch = rng.standard_normal((3, grid[0] * grid[1], artifacts.manifest.embed_dim)).astype(np.float32)
    same = compare((image, patch), (image, patch), artifacts.prompts, grid, size)
    assert same.map_r_min == pytest.approx(1.0) and same.patch_cos_min == pytest.approx(1.0) and same.max_abs_diff == 0
    check_gate(same, DEFAULT_GATES["fp16"], "fp16")
    noisy = compare((image, patch), (image, patch + rng.standard_normal(patch.shape).astype(np.float32)),
                    artifacts.prompts, grid, size)
    assert noisy.map_r_mean < 0.9 and noisy.patch_cos_mean < 0.9
    with pytest.raises(AnoclipError, match="fails the parity gate"):
        check_gate(noisy, DEFAULT_GATES["int8"], "int8")
    assert not noisy.passed
    assert pearson(np.ones(4), np.ones(4)) == 1.0 and pearson(np.ones(4), np.arange(4.0)) == 0.0


def test_gate_failure_prints_the_figures_exits_nonzero_and_writes_nothing(tiny_artifacts, frames, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)
    proc = run_cli("calibrate", "int8", "--artifacts", str(folder), "--images", str(frames), "--n", "8",
                   "--parity-frames", "2", "--min-map-r", "1", "--min-cosine", "1", "--no-keep-float")
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "fails the parity gate" in line and "nothing was written" in line
    assert "anomaly map Pearson r mean / min" in proc.stderr and "FAILED" in proc.stderr
    assert folder_state(folder) == before
    proc = run_cli("calibrate", "fp16", "--artifacts", str(folder), "--min-map-r", "1", "--min-cosine", "1",
                   "--parity-frames", "2")
    assert proc.returncode == 1 and "fails the parity gate" in one_error_line(proc.stderr)
    assert folder_state(folder) == before


def test_bad_inputs_end_in_one_error_line_and_leave_the_folder_unchanged(tiny_artifacts, frames, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--images", str(tmp_path / "missing")], "--images", "does not exist"),
        (["--images", str(text)], "--images", "neither an image"),
        (["--images", str(empty)], "--images", "holds no images"),
    ]
    for extra, first, words in cases:
        proc = run_cli("calibrate", "int8", "--artifacts", str(folder), *extra)
        line = one_error_line(proc.stderr)
        assert proc.returncode == 1 and first in line and words in line, line
    proc = run_cli("calibrate", "int8", "--artifacts", str(tmp_path / "nowhere"), "--images", str(frames))
    assert proc.returncode == 1 and "does not exist" in one_error_line(proc.stderr)
    proc = run_cli("calibrate", "int8", "--artifacts", str(folder))
    assert proc.returncode == 2 and "--images" in proc.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run_cli("calibrate", "int8", "--artifacts", str(folder), "--images", str(broken))
    assert proc.returncode == 1 and one_error_line(proc.stderr)
    assert folder_state(folder) == before


def test_missing_onnx_names_the_extra(tiny_artifacts, frames):
    from test_runtime_without_torch import run_blocked

    proc = run_blocked(
        """
        from anoclip.calibration.cli import main
        sys.argv = ["anoclip-calibrate", "int8", "--artifacts", sys.argv[1], "--images", sys.argv[2]]
        main()
        """, str(tiny_artifacts), str(frames))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "needs onnx" in line and "anoclip[quantize]" in line


# --------------------------------------------------------------------------------------------------
# runtime: --precision


def test_detector_picks_the_model_of_the_precision(reduced, rgb_image):
    from anoclip.runtime.detector import Detector

    results = {}
    for precision in ("fp32", "int8", "fp16"):
        detector = Detector.load(reduced, backend="cpu", precision=precision)
        assert detector.precision == precision
        assert detector.model == {"fp32": "visual", "int8": "visual_int8", "fp16": "visual_fp16"}[precision]
        assert Path(detector.backend.path).name.startswith(detector.model + ".")
        results[precision] = detector.predict(rgb_image, "bottle")
    for precision in ("int8", "fp16"):
        r = np.corrcoef(results[precision].anomaly_map.ravel(), results["fp32"].anomaly_map.ravel())[0, 1]
        assert r > 0.95 and abs(results[precision].score - results["fp32"].score) < 1e-2


def test_missing_precision_names_the_command_that_makes_it(tiny_artifacts, tmp_path, rgb_image):
    from anoclip.runtime.detector import Detector
    from anoclip.runtime.errors import AnoclipError, ArtifactError

    with pytest.raises(ArtifactError, match=r"make it with `anoclip calibrate int8 --artifacts .* --images"):
        Detector.load(tiny_artifacts, backend="cpu", precision="int8")
    with pytest.raises(ArtifactError, match="make it with `anoclip calibrate fp16 --artifacts"):
        Detector.load(tiny_artifacts, backend="cpu", precision="fp16")
    with pytest.raises(AnoclipError, match="--model visual"):
        Detector.load(tiny_artifacts, backend="cpu", model="visual_qkv", precision="int8")
    import cv2

    image = tmp_path / "x.png"
    cv2.imwrite(str(image), rgb_image)
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--precision", "int8",
                   "--out", str(tmp_path / "out"), str(image))
    assert proc.returncode == 1
    assert f"anoclip calibrate int8 --artifacts {tiny_artifacts} --images" in one_error_line(proc.stderr)


def test_predict_and_stream_and_threshold_take_precision(reduced, frames, tmp_path):
    from anoclip.runtime.cli import cli

    runner = CliRunner()
    for command in ("predict", "stream"):
        result = runner.invoke(cli, [command, "--help"])
        assert "--precision [fp32|fp16|int8]" in result.output
    result = runner.invoke(cli, ["predict", "--artifacts", str(reduced), "--class", "bottle", "--precision", "int8",
                                 "--out", str(tmp_path / "out"), "--json", str(frames / "frame00.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["score"] > 0


def test_thresholds_of_another_precision_are_stale(reduced, frames, tmp_path, caplog):
    from anoclip.runtime.detector import Detector

    folder = copy_artifacts(reduced, tmp_path / "a")
    result = calibrate("threshold", "--artifacts", str(folder), "--class", "bottle", "--normal", str(frames),
                       "--backend", "cpu")
    assert result.exit_code == 0, result.output
    assert Detector.load(folder, backend="cpu").threshold_for("bottle") is not None
    int8 = Detector.load(folder, backend="cpu", precision="int8")
    with caplog.at_level("WARNING"):
        assert int8.threshold_for("bottle") is None
    assert "calibrated with model visual, used with visual_int8" in caplog.text
    assert "--precision int8" in caplog.text  # the command that calibrates it for int8
    result = calibrate("threshold", "--artifacts", str(folder), "--class", "bottle", "--normal", str(frames),
                       "--backend", "cpu", "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert Detector.load(folder, backend="cpu", precision="int8").threshold_for("bottle") is not None


def test_changed_or_foreign_models_are_refused_at_load(reduced, tmp_path):
    from anoclip.runtime.artifacts import read_manifest, write_manifest
    from anoclip.runtime.detector import Detector
    from anoclip.runtime.errors import ArtifactError

    folder = copy_artifacts(reduced, tmp_path / "a")
    manifest = read_manifest(folder)
    path = folder / manifest.models["visual_int8"].file
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match=r"does not match the sha256.*make it anew with `anoclip calibrate int8"):
        Detector.load(folder, backend="cpu", precision="int8")
    manifest.models["visual_fp16"].source_sha256 = "0" * 64
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match=r"made from another visual model.*anoclip calibrate fp16"):
        Detector.load(folder, backend="cpu", precision="fp16")


def test_exported_manifests_keep_their_old_form(tiny_artifacts):
    data = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert all(not {"precision", "source_sha256", "provenance"} & set(e) for e in data["models"].values())


def test_calibrating_again_replaces_the_model_file(reduced, frames, tmp_path):
    from anoclip.runtime.artifacts import read_manifest

    folder = copy_artifacts(reduced, tmp_path / "a")
    old = read_manifest(folder).models["visual_int8"].file
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(frames), "--n", "12", "--parity-frames",
                       "3", "--method", "percentile")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(folder)
    new = manifest.models["visual_int8"].file
    assert new != old and not (folder / old).exists() and (folder / new).is_file() and old not in manifest.files
    assert "visual_fp16" in manifest.models


def test_an_interrupted_commit_or_a_changed_visual_model_leaves_the_folder_as_it_was(tiny_artifacts, frames,
                                                                                    tmp_path, monkeypatch):
    import anoclip.runtime.folder as folder_module
    from anoclip.calibration.int8 import calibrate_int8
    from anoclip.runtime.artifacts import ModelEntry
    from anoclip.runtime.errors import AnoclipError

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(folder_module, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        calibrate_int8(folder, [str(frames)], frames=8, parity_frames=2, report=lambda line: None)
    assert folder_state(folder) == before  # the model file written before the commit is gone again
    monkeypatch.undo()
    staged = tmp_path / "staged.onnx"
    staged.write_bytes(b"not used")
    entry = ModelEntry(file="", inputs={}, outputs={}, patch_tokens="vv", precision="int8", source_sha256="1" * 64)
    with pytest.raises(AnoclipError, match="changed while this ran.*nothing was written"):
        folder_module.store_derived_model(folder, "visual_int8", staged, entry, "anoclip calibrate int8")
    assert folder_state(folder) == before


# --------------------------------------------------------------------------------------------------
# export: kept while the visual model is unchanged, dropped when it changed


def test_reexport_keeps_reduced_models_of_an_unchanged_visual_model_and_drops_stale_ones(reduced, tmp_path,
                                                                                        export_cli):
    from anoclip.runtime.artifacts import load_artifacts, read_manifest

    folder = copy_artifacts(reduced, tmp_path / "a")
    base = ["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--out", str(folder)]
    result = export_cli([*base, "--classes", "hazelnut"])  # prompts only: the visual model is kept
    assert result.exit_code == 0, result.output
    kept = read_manifest(folder)
    assert {"visual_int8", "visual_fp16"} <= set(kept.models)
    load_artifacts(folder, models=["visual_int8", "visual_fp16"])
    result = export_cli([*base, "--force"])  # re-exported, byte for byte the same: still theirs
    assert result.exit_code == 0, result.output
    assert {"visual_int8", "visual_fp16"} <= set(read_manifest(folder).models)
    result = export_cli([*base, "--force", "--seed", "1"])  # other weights: made from the old model
    assert result.exit_code == 0, result.output
    assert "dropping visual_int8" in result.output and "anoclip calibrate int8 --artifacts" in result.output
    manifest = read_manifest(folder)
    assert not {"visual_int8", "visual_fp16"} & set(manifest.models)
    assert not list(folder.glob("visual_int8.*")) and not list(folder.glob("visual_fp16.*"))
    assert set(manifest.files) == {p.name for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}


# --------------------------------------------------------------------------------------------------
# stress weights and the bench rows


def test_stress_weights_have_outlier_channels_and_say_so(tmp_path, export_cli):
    torch = pytest.importorskip("torch")
    from anoclip.export.model import Outliers, _residual_peak, add_outlier_channels, load_model, register_model_config
    from anoclip.runtime.artifacts import read_manifest

    register_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    loaded = load_model(TINY_BACKBONE, "none")
    plain = _residual_peak(loaded.model.visual)
    channels, peak = add_outlier_channels(loaded, Outliers(2, 50.0))
    assert len(channels) == 2 and peak > 50 > 10 * plain
    assert loaded.pretrained == "none+outliers-k2-s50" and loaded.random_weights
    folder = tmp_path / "stress"
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--outlier-channels", "2",
                         "--outlier-scale", "50", "--classes", "bottle", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert "STRESS WEIGHTS" in result.output
    manifest = read_manifest(folder)
    assert manifest.pretrained == "none+outliers-k2-s50" and manifest.random_weights


def test_stress_option_needs_random_weights(tmp_path):
    from conftest import export_subprocess

    proc = export_subprocess("--model-config", str(TINY_CONFIG), "--pretrained", "laion400m_e32",
                             "--outlier-channels", "2", "--classes", "bottle", "--out", str(tmp_path / "x"))
    assert proc.returncode == 1 and "--pretrained none" in one_error_line(proc.stderr)
    assert not (tmp_path / "x").exists()


def test_bench_times_reduced_precisions_beside_fp32(reduced):
    from anoclip.runtime.cli import cli

    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(reduced), "--runs", "3", "--warmup", "0",
                                      "--image-size", "64", "--backends", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
    for name, precision in (("AnoCLIP", "fp32"), ("AnoCLIP (int8)", "int8"), ("AnoCLIP (fp16)", "fp16")):
        assert rows[name]["precision"] == precision and rows[name]["status"] == "ok" and rows[name]["ms"]["p50"] > 0
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(reduced), "--runs", "3", "--warmup", "0",
                                      "--image-size", "64", "--backends", "cpu", "--precisions", "int8", "--json"])
    names = {r["name"] for r in json.loads(result.stdout)["rows"]}
    assert "AnoCLIP (int8)" in names and "AnoCLIP (fp16)" not in names


# --------------------------------------------------------------------------------------------------
# TensorRT: what can be read off the graph against the ONNX parser's operator tables (no GPU here)


def tensorrt_problems(model, table: dict) -> list[str]:
    """Operators, opset, domains and Q/DQ types the TensorRT ONNX parser of ``table`` would refuse."""
    from onnx import TensorProto, numpy_helper

    problems = []
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    if not table["opset_min"] <= opset <= table["opset_max"]:
        problems.append(f"opset {opset}")
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not table["operators"].get(node.op_type, {}).get("supported"):
            problems.append(f"{node.op_type} ({node.domain or 'ai.onnx'})")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = initializers.get(node.input[2])
            if zero is None or numpy_helper.to_array(zero).any():
                problems.append(f"{node.name}: zero point")
            elif node.op_type == "DequantizeLinear" and zero.data_type != TensorProto.INT8:
                problems.append(f"{node.name}: {TensorProto.DataType.Name(zero.data_type)} quantization")
        if node.op_type == "Cast":
            to = TensorProto.DataType.Name(next(a.i for a in node.attribute if a.name == "to"))
            if {"FLOAT": "FP32", "FLOAT16": "FP16"}.get(to, to) not in table["operators"]["Cast"]["types"]:
                problems.append(f"{node.name}: Cast to {to}")
    return problems


@pytest.mark.parametrize("version", ["10.3", "11.1"])
def test_reduced_models_are_graphs_the_tensorrt_parser_takes(reduced, version):
    table = json.loads((Path(__file__).parent / "data" / f"tensorrt_{version}_onnx_operators.json").read_text())
    for name in ("visual_int8", "visual_fp16"):
        model, _ = model_of(reduced, name)
        assert tensorrt_problems(model, table) == [], name
