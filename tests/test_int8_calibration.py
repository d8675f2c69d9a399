"""Calibration that never throws work away and never litters, and the accuracy-aware int8 search,
on the tiny ViT: temporary files, read-only folders, unreadable inputs, keeping quantized MatMuls in
float until the parity gate passes, weights-only as the last resort."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import copy_artifacts, one_error_line

onnx = pytest.importorskip("onnx")


class Run:
    """A CLI run in this process: exit code, stdout, and stdout + stderr with a user error as the
    one line the command's guard prints for it (``anoclip.runtime.plumbing.run_guarded``)."""

    def __init__(self, result):
        from anoclip.runtime.errors import AnoclipError

        self.exit_code, self.stdout, self.output = result.exit_code, result.stdout, result.output
        if isinstance(result.exception, AnoclipError):
            self.output += f"error: {result.exception}\n"
        elif result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception


def calibrate(*args: str) -> Run:
    from anoclip.calibration.cli import calibrate_group

    return Run(CliRunner().invoke(calibrate_group, list(args)))


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def workspaces(root: Path) -> list[Path]:
    return sorted(root.glob("anoclip-calibrate-*"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """Normal frames of a plain scene (uniform background, one part, small pose and light changes)."""
    from anoclip.benchmarks.accuracy.synthetic import make_plain_scene

    folder = tmp_path_factory.mktemp("scene")
    make_plain_scene(folder, frames=20, size=(96, 80))
    return folder


@pytest.fixture
def temp_root(tmp_path, monkeypatch) -> Path:
    """The temporary folder calibration workspaces go to, for this test alone."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def int8_figures(folder: Path, scene: Path, *extra: str) -> dict:
    """The provenance of an int8 model made from ``scene`` with a gate that passes anything."""
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(scene), "--n", "15", "--parity-frames",
                       "5", "--no-keep-float", "--max-map-error", "100", "--max-score-error", "100",
                       "--min-cosine", "-1", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])["provenance"]


# --------------------------------------------------------------------------------------------------
# no litter, no lost work


def test_temporary_files_are_gone_after_success(tiny_artifacts, scene, tmp_path, temp_root):
    from anoclip.runtime.artifacts import read_manifest

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(scene), "--n", "15",
                       "--parity-frames", "5", "--max-map-error", "100", "--max-score-error", "100")
    assert result.exit_code == 0, result.output
    assert workspaces(temp_root) == [] and list(temp_root.iterdir()) == []  # onnxruntime's temporaries too
    named = set(read_manifest(folder).files) | {"manifest.json"}
    assert {p.name for p in folder.iterdir()} <= named  # no -inferred.onnx, no augmented model


def test_temporary_files_are_gone_after_failure(tiny_artifacts, scene, tmp_path, temp_root):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(scene), "--n", "15",
                       "--parity-frames", "5", "--no-keep-float", "--min-cosine", "1", "--max-map-error", "0")
    assert result.exit_code == 1 and "fails the parity gate" in result.output
    assert list(temp_root.iterdir()) == [] and folder_state(folder) == before


def test_temporary_files_are_gone_after_interrupt(tiny_artifacts, scene, tmp_path, temp_root, monkeypatch):
    import anoclip.calibration.int8 as int8

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)
    seen = {}
    quantize = int8.quantize_int8

    def quantize_then_interrupt(source, target, *args, **kwargs):
        quantize(source, target, *args, **kwargs)
        seen["workspace"] = [p.name for p in workspaces(temp_root)]
        seen["folder"] = folder_state(folder)  # nothing written beside the model while quantizing
        raise KeyboardInterrupt

    monkeypatch.setattr(int8, "quantize_int8", quantize_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        int8.calibrate_int8(folder, [str(scene)], frames=15, parity_frames=5, report=lambda line: None)
    assert len(seen["workspace"]) == 1 and seen["workspace"][0].startswith(f"anoclip-calibrate-{os.getpid()}-")
    assert seen["folder"] == before
    assert list(temp_root.iterdir()) == [] and folder_state(folder) == before


def test_workspaces_of_killed_runs_are_swept_and_live_ones_kept(temp_root):
    from anoclip.calibration.derived import OWNER_FILE, sweep_workspaces, workspace

    dead = temp_root / "anoclip-calibrate-999999999-abc"  # its process is gone, before it locked
    dead.mkdir()
    (dead / "visual_int8.full.onnx").write_bytes(b"x" * 1000)
    unlocked = temp_root / f"anoclip-calibrate-{os.getpid()}-killed"  # a killed run's: nobody holds the lock
    unlocked.mkdir()
    (unlocked / OWNER_FILE).touch()
    live = temp_root / "anoclip-calibrate-1-live"
    live.mkdir()
    (live / OWNER_FILE).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)", str(live / OWNER_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with workspace() as mine:  # a new run sweeps first, and its own workspace is locked
            assert not dead.exists() and not unlocked.exists() and live.exists()
            fd = os.open(mine / OWNER_FILE, os.O_RDONLY)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            assert sweep_workspaces(temp_root) == [] and mine.exists()
        assert not mine.exists()
    finally:
        holder.kill()
        holder.wait()
    assert sweep_workspaces(temp_root) == [live]  # its process died: the next run removes it


def test_read_only_folder_is_one_line_before_any_frame_is_read(tiny_artifacts, scene, tmp_path, monkeypatch):
    import anoclip.calibration.derived as derived
    import anoclip.runtime.plumbing as plumbing

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)
    read = []
    monkeypatch.setattr(derived, "read_frames", lambda *a, **k: read.append(a))
    real_access = os.access
    # root may write anywhere: a folder it cannot write is one on a read-only mount, which access() reports
    monkeypatch.setattr(plumbing.os, "access",
                        lambda path, mode: False if Path(path) == folder and mode & os.W_OK else real_access(path, mode))
    for precision, extra in (("int8", ["--images", str(scene)]), ("fp16", [])):
        result = calibrate(precision, "--artifacts", str(folder), *extra)
        assert result.exit_code == 1, result.output
        line = one_error_line(result.output)
        assert line.startswith("error: cannot write to --artifacts") and str(folder) in line
        assert "read frames" not in result.output
    assert read == [] and folder_state(folder) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line_before_any_frame_is_read_unprivileged(tiny_artifacts, scene, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    folder.chmod(0o555)
    try:
        result = calibrate("int8", "--artifacts", str(folder), "--images", str(scene))
    finally:
        folder.chmod(0o755)
    assert result.exit_code == 1 and "cannot write to --artifacts" in one_error_line(result.output)


def test_unreadable_input_is_skipped_and_counted(tiny_artifacts, scene, tmp_path):
    import shutil

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    frames = tmp_path / "frames"
    shutil.copytree(scene, frames)
    (frames / "frame_005.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # one damaged frame among 20
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(frames), "--n", "15", "--parity-frames",
                       "4", "--max-map-error", "100", "--max-score-error", "100", "--json")
    assert result.exit_code == 0, result.output
    assert "1 input(s) could not be read and were skipped" in result.output
    provenance = json.loads(result.stdout[result.stdout.index("{"):])["provenance"]
    assert provenance["frames"]["read"] == 19 and len(provenance["frames"]["skipped"]) == 1
    assert "frame_005.png" in provenance["frames"]["skipped"][0]
    result = calibrate("fp16", "--artifacts", str(folder), "--images", str(frames), "--parity-frames", "10")
    assert result.exit_code == 0, result.output
    assert "1 input(s) could not be read and were skipped" in result.output


# --------------------------------------------------------------------------------------------------
# accuracy-aware int8


def test_keeping_a_node_in_float_restores_its_float_inputs(tiny_artifacts, scene, tmp_path):
    from anoclip.calibration.derived import read_frames
    from anoclip.calibration.int8 import float_groups, keep_in_float, quantize_int8
    from anoclip.calibration.parity import run_model
    from anoclip.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(tiny_artifacts)
    split = read_frames([str(scene)], artifacts.manifest, 8, 2)
    quantize_int8(artifacts.model_path(), tmp_path / "visual_int8.q.onnx", split.calibration)
    original, quantized = onnx.load(str(artifacts.model_path())), onnx.load(str(tmp_path / "visual_int8.q.onnx"))
    groups = float_groups(original)
    names = {n.name for n in original.graph.node if n.op_type in ("MatMul", "Conv", "Gemm")}
    assert sorted(n for _, nodes in groups for n in nodes) == sorted(names)  # every quantizable node, once
    every = keep_in_float(quantized, original, names)
    onnx.checker.check_model(every)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in every.graph.node)
    onnx.save(every, str(tmp_path / "visual_int8.f.onnx"))
    fp32 = run_model(artifacts.model_path(), split.parity, "fp32")
    back = run_model(tmp_path / "visual_int8.f.onnx", split.parity, "float")
    for a, b in zip(fp32, back):  # the same graph in float: equal up to float32 rounding
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    label, nodes = groups[1]
    some = keep_in_float(quantized, original, nodes)
    dq = {n.output[0] for n in some.graph.node if n.op_type == "DequantizeLinear"}
    for node in some.graph.node:
        if node.name in nodes:
            assert not any(i in dq for i in node.input), f"{node.name} of {label} reads a dequantized tensor"
        elif node.name in names:
            assert all(i in dq for i in node.input[:2]), f"{node.name} lost its quantization"


def test_gate_failure_turned_into_a_pass_by_keeping_matmuls_in_float(tiny_artifacts, scene, tmp_path):
    from anoclip.runtime.artifacts import read_manifest

    full = int8_figures(copy_artifacts(tiny_artifacts, tmp_path / "probe"), scene)["parity"]
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    limit = 0.9 * full["map_error"]  # the fully quantized model fails it; float nodes bring the error down
    result = calibrate("int8", "--artifacts", str(folder), "--images", str(scene), "--n", "15", "--parity-frames", "5",
                       "--max-map-error", f"{limit:.6g}", "--max-score-error", "100", "--min-cosine", "-1", "--json")
    assert result.exit_code == 0, result.output
    assert "int8: the fully quantized model fails the gate (map error" in result.output
    assert "int8: kept in float: " in result.output and "gate (" in result.output and "passed" in result.output
    entry = json.loads(result.stdout[result.stdout.index("{"):])
    search = entry["provenance"]["accuracy_aware"]
    assert search["full"]["passed"] is False and search["full"]["map_error"] == pytest.approx(full["map_error"],
                                                                                           rel=1e-3)
    assert search["result"] != "full int8" and search["final"]["passed"] is True
    assert entry["provenance"]["parity"]["map_error"] <= limit and entry["provenance"]["parity"]["passed"]
    kept = search["kept_in_float"] or [{"nodes": search["attention_products_in_float"]}]
    assert kept and all(item["nodes"] for item in kept)
    assert all("hurt most" in item["why"] for item in search["kept_in_float"])
    assert len(search["sensitivity"]) >= 3 and search["measured"] >= 1 + len(search["sensitivity"]) + 1
    model = onnx.load(str(folder / read_manifest(folder).models["visual_int8"].file))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    in_float = {name for item in kept for name in item["nodes"]}
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv")]
    assert all(not any(i in dq for i in n.input) for n in matmuls if n.name in in_float)
    assert any(all(i in dq for i in n.input[:2]) for n in matmuls if n.name not in in_float)  # still int8


def test_weights_only_is_the_last_resort(tiny_artifacts, scene, tmp_path):
    """A scene where only a model with every attention product in float passes: the groups of
    MatMuls are tried first (at most a third of them), then weights-only is taken, and recorded."""
    from anoclip.calibration.derived import read_frames
    from anoclip.calibration.int8 import Int8Scheme, accuracy_aware_int8, attention_products, float_groups
    from anoclip.calibration.parity import DEFAULT_GATES, Parity, check_gate
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.errors import AnoclipError

    artifacts = load_artifacts(tiny_artifacts)
    source = artifacts.model_path()
    products = set(attention_products(onnx.load(str(source))))
    gate, tried, lines = DEFAULT_GATES["int8"], [], []

    def measure(path: Path) -> Parity:
        """Passes only when no attention product reads a dequantized tensor."""
        model = onnx.load(str(path))
        dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        quantized = {n.name for n in model.graph.node if n.name in products and any(i in dq for i in n.input)}
        tried.append(len(quantized))
        error = 0.5 if quantized else 0.05
        figures = Parity(inputs=5, classes=["bottle"], image_cos_mean=1, image_cos_min=1, patch_cos_mean=0.999,
                         patch_cos_min=0.99, max_abs_diff=0.1, map_r_mean=0.99, map_r_min=0.9, score_max_abs_diff=0,
                         patch_error=error, map_error=error)
        try:
            check_gate(figures, gate, "int8")
        except AnoclipError:
            pass
        return figures

    split = read_frames([str(scene)], artifacts.manifest, 8, 2)
    target = tmp_path / "visual_int8.onnx"
    record = accuracy_aware_int8(source, target, split.calibration, Int8Scheme(), measure, gate, lines.append)
    groups = float_groups(onnx.load(str(source)))
    third = -(-len(groups) // 3)
    assert record["result"] == "weights-only" and record["kept_in_float"] == []
    assert record["attention_products_in_float"] == sorted(products)
    assert record["final"]["passed"] and not record["full"]["passed"]
    # full, each group alone, the worst groups one after another, then weights-only
    assert record["measured"] == len(tried) == 1 + len(groups) + third + 1
    assert tried[-1] == 0 and all(count > 0 for count in tried[:-1])
    assert any(line.startswith("int8: weights-only: gate ratio") and "passed" in line for line in lines)
    assert f"int8: kept in float: the {len(products)} attention products (weights-only)" in lines
    model = onnx.load(str(target))
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weighted = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv") and n.name not in products]
    assert weighted and all(all(i in dq for i in n.input[:2]) for n in weighted)  # the weights stay int8


def test_gate_is_on_errors_relative_to_the_spread_not_on_map_r(tiny_artifacts):
    """A per-frame offset moves every decision at a threshold yet leaves Pearson r at 1; noise on a
    flat map drives r towards 0 while the scores barely move: the gate follows the first, not the second."""
    from anoclip.calibration.parity import DEFAULT_GATES, Gate, check_gate, relative_error
    from anoclip.runtime.errors import AnoclipError

    rng = np.random.default_rng(0)
    reference = rng.normal(0.5, 0.01, (8, 100))
    shifted = reference + 0.02  # two standard deviations: every frame's map is shifted
    assert relative_error(reference, shifted) == pytest.approx(2.0, rel=0.05)
    flat = np.full((8, 100), 0.5) + rng.normal(0, 1e-6, (8, 100))
    flat[:, 0] += np.linspace(0, 0.05, 8)  # frames differ in one patch: the set's spread
    jitter = flat + rng.normal(0, 1e-6, flat.shape)  # per frame nearly flat: r near 0 in most patches
    assert relative_error(flat, jitter) < 0.01
    assert relative_error(np.ones(3), np.ones(3)) == 0 and relative_error(np.ones(3), np.zeros(3)) == float("inf")
    gate = DEFAULT_GATES["int8"]
    assert gate.min_map_r == -1  # reported, not gated, unless asked
    assert Gate(0.98, 0.2, 0.15, min_decision_agreement=1.0).describe()["decision_agreement"] == 1.0
    from anoclip.calibration.parity import Parity

    figures = Parity(inputs=8, classes=["a"], image_cos_mean=1, image_cos_min=1, patch_cos_mean=0.999,
                     patch_cos_min=0.99, max_abs_diff=0.1, map_r_mean=0.10, map_r_min=0.05, score_max_abs_diff=0,
                     patch_error=0.05, map_error=0.05)
    check_gate(figures, gate, "int8")  # r 0.10 on flat maps with small errors: passes
    figures.decision_agreement = 0.875  # one frame of 8 decided otherwise at the folder's threshold
    with pytest.raises(AnoclipError, match="decision agreement 0.875 < 1"):
        check_gate(figures, gate, "int8")


def test_decisions_at_the_folder_thresholds_are_compared(tiny_artifacts):
    from anoclip.calibration.parity import compare
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.scoring import abnormal_probability

    artifacts = load_artifacts(tiny_artifacts)
    grid, size = tuple(artifacts.manifest.grid), tuple(artifacts.manifest.image_size)
    rng = np.random.default_rng(2)
    image = rng.standard_normal((8, artifacts.manifest.embed_dim)).astype(np.float32)
    patch = rng.standard_normal((8, grid[0] * grid[1], artifacts.manifest.embed_dim)).astype(np.float32)
    scores = abnormal_probability(image, artifacts.prompts.get("bottle").text_features)
    thresholds = {"bottle": (float(np.median(scores)), 0.5)}  # half the frames above: decisions can flip
    same = compare((image, patch), (image, patch), artifacts.prompts, grid, size, thresholds=thresholds)
    assert same.decision_agreement == 1.0 and same.pixel_agreement == 1.0 and same.map_error == 0
    other = compare((image, patch), (rng.standard_normal(image.shape).astype(np.float32), patch), artifacts.prompts,
                    grid, size, thresholds=thresholds)
    assert other.decision_agreement < 1.0 and other.pixel_agreement == 1.0  # the maps are the same
    assert compare((image, patch), (image, patch), artifacts.prompts, grid, size).decision_agreement is None


def test_workspace_of_a_run_killed_with_sigkill_is_swept_by_the_next_run(tiny_artifacts, tmp_path):
    import signal
    import time

    from anoclip.benchmarks.accuracy.synthetic import make_plain_scene
    from anoclip.calibration.derived import OWNER_FILE, sweep_workspaces

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = folder_state(folder)
    frames = tmp_path / "frames"
    make_plain_scene(frames, frames=80, size=(96, 80))
    root = tmp_path / "tmp"
    root.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "calibrate", "int8",
                             "--artifacts",
                             str(folder), "--images", str(frames), "--n", "64"],
                            env={**os.environ, "TMPDIR": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = [w for w in workspaces(root) if (w / OWNER_FILE).exists() and any(w.glob("*.onnx"))]
            if found:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the calibration ended before its workspace was seen")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert workspaces(root) == found and folder_state(folder) == before  # the killed run's files stayed outside
    assert sweep_workspaces(root) == found and workspaces(root) == []
