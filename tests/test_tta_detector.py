"""AnoCLIP+ through the Detector and the CLI: maps change, scores do not, both TTA backends agree."""

from __future__ import annotations

import re

import numpy as np
import pytest

from anoclip.runtime.detector import Detector
from anoclip.runtime.preprocess import preprocess
from anoclip.runtime.scoring import anomaly_map
from anoclip.runtime.tta import TTAAdapter, TTAConfig


@pytest.fixture
def images():
    rng = np.random.default_rng(11)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]


def test_tta_changes_maps_not_scores(tiny_artifacts, images):
    plain = Detector.load(tiny_artifacts, backend="cpu")
    adapted = Detector.load(tiny_artifacts, backend="cpu", tta=TTAConfig(seed=3))
    for image in images:
        a, b = plain.predict(image, "bottle"), adapted.predict(image, "bottle")
        assert a.score == b.score
        assert not np.allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
        assert "tta" in b.timings and "tta" not in a.timings


def test_detector_tta_equals_the_adapter_applied_by_hand(tiny_artifacts, images):
    config = TTAConfig(seed=5)
    detector = Detector.load(tiny_artifacts, backend="cpu", tta=config)
    prompts = detector.class_prompts("carpet")
    reference = TTAAdapter(prompts.prompt_features, prompts.text_features, config)
    grid, size = detector.grid, detector.input_size
    for image in images:  # the optimiser state carries over image to image in both
        got = detector.predict(image, "carpet").anomaly_map
        batch, _ = preprocess(image, size, detector.mean, detector.std)
        _, patches = detector.backend.run(batch)
        expected = anomaly_map(reference.adapt(patches[0])[None], prompts.text_features, grid, size)[0]
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert detector.tta_adapter("carpet").state.step == 3 * config.steps


def test_fresh_state_policy_restarts_per_image(tiny_artifacts, images):
    detector = Detector.load(tiny_artifacts, backend="cpu", tta=TTAConfig(seed=1, state_policy="fresh"))
    for image in images:
        detector.predict(image, "bottle")
    assert detector.tta_adapter("bottle").state.step == 5


def test_numpy_and_onnx_tta_backends_agree(tiny_artifacts, images):
    config = TTAConfig(seed=9)
    numpy_tta = Detector.load(tiny_artifacts, backend="cpu", tta=config)
    onnx_tta = Detector.load(tiny_artifacts, backend="cpu", tta=config, tta_backend="onnx")
    for image in images:
        a, b = numpy_tta.predict(image, "bottle"), onnx_tta.predict(image, "bottle")
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5)


def test_reset_forgets_the_optimiser_state(tiny_artifacts, images):
    detector = Detector.load(tiny_artifacts, backend="cpu", tta=True)
    detector.predict(images[0], "bottle")
    detector.reset_tta("bottle")
    detector.predict(images[1], "bottle")
    assert detector.tta_adapter("bottle").state.step == 5


def test_predict_cli_with_tta(tiny_artifacts, tmp_path):
    import json
    import subprocess
    import sys

    import cv2

    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    outs = {}
    for flag in ([], ["--tta"], ["--tta", "--tta-backend", "onnx"]):
        out = tmp_path / ("o" + "".join(flag))
        proc = subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "predict",
                               "--artifacts", str(tiny_artifacts), "--class", "bottle", "--out", str(out), *flag,
                               str(image)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        record = json.loads((out / "results.jsonl").read_text())
        outs[" ".join(flag)] = (record["score"], np.load(record["map"]))
    assert outs[""][0] == outs["--tta"][0]
    assert not np.allclose(outs[""][1], outs["--tta"][1])
    np.testing.assert_allclose(outs["--tta"][1], outs["--tta --tta-backend onnx"][1], atol=1e-5)


def test_tta_graph_is_in_the_manifest(tiny_artifacts):
    from anoclip.runtime.artifacts import read_manifest

    manifest = read_manifest(tiny_artifacts)
    file = manifest.models["tta"].file
    assert re.fullmatch(r"tta\.[0-9a-f]{12}\.onnx", file) and file in manifest.files
    assert "patch_tokens" in manifest.models["tta"].inputs


def test_each_stream_keeps_its_own_optimiser_state(tiny_artifacts, images):
    detector = Detector.load(tiny_artifacts, backend="cpu", tta=TTAConfig(seed=2))
    detector.predict_batch(images[:2], "bottle", tta_keys=["cam-a", "cam-b"])
    detector.predict_batch(images[2:], "bottle", tta_keys=["cam-a"])
    assert detector.tta_adapter("bottle", state="cam-a").state.step == 10
    assert detector.tta_adapter("bottle", state="cam-b").state.step == 5
    detector.reset_tta("bottle", "cam-a")
    assert detector.tta_adapter("bottle", state="cam-a").state is None  # a new adapter, no step taken
    assert detector.tta_adapter("bottle", state="cam-b").state.step == 5
    with pytest.raises(ValueError, match="tta_keys"):
        detector.predict_batch(images, "bottle", tta_keys=["cam-a"])


def test_the_tta_backend_only_matters_with_tta(fused_artifacts, images):
    from anoclip.runtime.errors import ArtifactError

    # a folder exported without --tta has no tta.onnx: without --tta nothing asks for it
    detector = Detector.load(fused_artifacts, backend="cpu", tta_backend="onnx")
    assert 0.0 < detector.predict(images[0], "bottle").score < 1.0
    with pytest.raises(ArtifactError, match=r"model 'tta' is not in .*anoclip-export --tta"):
        Detector.load(fused_artifacts, backend="cpu", tta=True, tta_backend="onnx")


# ---------------------------------------------------------------------------------------------
# --tta-backend cupy: the loop on the GPU's arrays


def test_tta_backend_cupy_without_cupy_is_one_line(tiny_artifacts, rgb_image, tmp_path):
    import importlib.util

    import cv2
    from conftest import one_error_line, run_cli

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: the missing-CuPy line cannot be seen here")
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), rgb_image)
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--tta", "--tta-backend", "cupy",
                   "--out", str(tmp_path / "out"), str(image))
    assert proc.returncode == 1
    assert "--tta-backend cupy needs CuPy" in one_error_line(proc.stderr)


def test_tta_backend_cupy_moves_the_tokens_to_the_device_and_back(tiny_artifacts, images, monkeypatch):
    """A stand-in for the ``cupy`` module at its API boundary (``asarray``, ``asnumpy``) records what
    the Detector hands it and keeps the arrays on the host, so the loop's result must equal numpy's."""
    import sys
    import types

    calls = []
    standin = types.ModuleType("cupy")
    standin.asarray = lambda a: calls.append(("asarray", np.shape(a))) or np.array(a)
    standin.asnumpy = lambda a: calls.append(("asnumpy", np.shape(a))) or np.array(a)
    monkeypatch.setitem(sys.modules, "cupy", standin)
    config = TTAConfig(seed=7)
    on_device = Detector.load(tiny_artifacts, backend="cpu", tta=config, tta_backend="cupy")
    on_host = Detector.load(tiny_artifacts, backend="cpu", tta=config)
    for image in images:
        np.testing.assert_array_equal(on_device.predict(image, "bottle").anomaly_map,
                                      on_host.predict(image, "bottle").anomaly_map)
    prompts = on_host.class_prompts("bottle")
    tokens = (on_host.grid[0] * on_host.grid[1], prompts.text_features.shape[1])
    assert calls[:2] == [("asarray", prompts.prompt_features.shape), ("asarray", prompts.text_features.shape)]
    assert calls.count(("asarray", tokens)) == len(images) == calls.count(("asnumpy", tokens))
