"""The OpenVINO backend against onnxruntime on the tiny export, and its one-line errors."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from anoclip.runtime.backends import OnnxRuntimeBackend
from anoclip.runtime.errors import BackendError

from conftest import TINY_CONFIG, artifact_file

try:
    import openvino  # noqa: F401
except (ImportError, OSError):  # OSError: the package is there, its libraries are not
    HAS_OPENVINO = False
else:
    HAS_OPENVINO = True
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO,
                                    reason="openvino is not installed (pip install 'anoclip[openvino]')")

# Both runtimes compute in fp32 from the same weights; they differ only in kernels and summation
# order (OpenVINO fuses attention and layer norm differently). The largest difference of the
# embeddings is 2e-6 on the tiny export (values up to ~3.5) and 7e-6 on ViT-B-16-plus-240 (up to ~5),
# ~1e-6 relative; 1e-4 is the bound the export holds ONNX to against PyTorch (tests/test_vv_export.py):
# 50x headroom, and still far below what bf16 (~3e-2) or int8 (~2e-1) change.
ATOL = RTOL = 1e-4


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def frames(shape, count: int, seed: int = 0) -> np.ndarray:
    _, _, height, width = shape
    return np.random.default_rng(seed).normal(size=(count, 3, height, width)).astype(np.float32)


def test_missing_openvino_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(BackendError) as exc:
        OpenVinoBackend(tmp_path / "visual.onnx")
    assert "pip install 'anoclip[openvino]'" in one_line(exc)


def test_backend_module_imports_without_openvino(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.delitem(sys.modules, "anoclip.runtime.backends.openvino", raising=False)
    module = importlib.import_module("anoclip.runtime.backends.openvino")
    assert module.OpenVinoBackend.__name__ == "OpenVinoBackend"


@needs_openvino
@pytest.mark.parametrize("count", [1, 3])
def test_matches_onnxruntime_on_the_static_batch_model(tiny_artifacts, count):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    model = artifact_file(tiny_artifacts, "visual")
    reference = OnnxRuntimeBackend(model, providers="cpu")
    backend = OpenVinoBackend(model, threads=1)
    assert backend.name == "openvino" and backend.batch_size == 1  # the default export has batch 1
    assert "f32" in backend.describe() and "CPU" in backend.describe()
    batch = frames(reference.session.get_inputs()[0].shape, count)
    image, patches = backend.run(batch)
    ref_image, ref_patches = reference.run(batch)
    assert image.dtype == patches.dtype == np.float32
    assert image.shape == ref_image.shape and patches.shape == ref_patches.shape
    assert image.shape[0] == patches.shape[0] == count
    np.testing.assert_allclose(image, ref_image, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(patches, ref_patches, atol=ATOL, rtol=RTOL)


@needs_openvino
def test_dynamic_batch_model_runs_any_batch(export_cli, tmp_path):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    out = tmp_path / "dynamic"
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                         "--dynamic-batch", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = artifact_file(out, "visual")
    reference = OnnxRuntimeBackend(model, providers="cpu")
    backend = OpenVinoBackend(model)
    assert backend.batch_size is None
    shape = reference.session.get_inputs()[0].shape
    for count in (1, 4, 2):
        batch = frames(shape, count, seed=count)
        for got, want in zip(backend.run(batch), reference.run(batch)):
            assert got.shape[0] == count
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@needs_openvino
def test_outputs_are_not_overwritten_by_the_next_run(tiny_artifacts):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    model = artifact_file(tiny_artifacts, "visual")
    backend = OpenVinoBackend(model)
    shape = OnnxRuntimeBackend(model, providers="cpu").session.get_inputs()[0].shape
    first = [a.copy() for a in backend.run(frames(shape, 1, seed=1))]
    kept = backend.run(frames(shape, 1, seed=1))
    backend.run(frames(shape, 1, seed=2))
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


@needs_openvino
def test_detector_scores_match_onnxruntime(tiny_artifacts, rgb_image):
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.backends.openvino import OpenVinoBackend
    from anoclip.runtime.detector import Detector

    artifacts = load_artifacts(tiny_artifacts)
    ov_result = Detector(artifacts, OpenVinoBackend(artifacts.model_path())).predict(rgb_image, "bottle")
    ort_result = Detector.load(tiny_artifacts, backend="cpu").predict(rgb_image, "bottle")
    assert ov_result.score == pytest.approx(ort_result.score, abs=1e-4)
    np.testing.assert_allclose(ov_result.anomaly_map, ort_result.anomaly_map, atol=1e-4)


@needs_openvino
def test_model_without_the_embedding_outputs_is_refused(tiny_artifacts):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    with pytest.raises(BackendError) as exc:
        OpenVinoBackend(artifact_file(tiny_artifacts, "tta"))
    assert "has no output 'image_embeds'" in one_line(exc)


@needs_openvino
@pytest.mark.parametrize("options,message", [
    ({"hint": "FASTEST"}, "unknown OpenVINO performance hint 'FASTEST'"),
    ({"precision": "int4"}, "unknown OpenVINO precision 'int4'"),
    ({"device": "NOSUCHDEVICE"}, "OpenVINO device 'NOSUCHDEVICE' is not available here"),
    ({"threads": 0}, "threads must be at least 1"),
])
def test_bad_options_are_one_line_errors(tiny_artifacts, options, message):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    with pytest.raises(BackendError) as exc:
        OpenVinoBackend(artifact_file(tiny_artifacts, "visual"), **options)
    assert message in one_line(exc)


@needs_openvino
def test_unreadable_model_is_one_line_error(tmp_path):
    from anoclip.runtime.backends.openvino import OpenVinoBackend

    with pytest.raises(BackendError) as exc:
        OpenVinoBackend(tmp_path / "missing.onnx")
    assert "does not exist" in one_line(exc)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(BackendError) as exc:
        OpenVinoBackend(broken)
    assert f"OpenVINO cannot load {broken}" in one_line(exc)


def test_cpu_runtimes_benchmark_table(tiny_artifacts):
    from anoclip.benchmarks.latency.cpu_runtimes import report_lines, run_cpu_runtimes

    result = run_cpu_runtimes(tiny_artifacts, runs=3, warmup=0, threads=1, samples=2)
    rows = {row["row"]: row for row in result["rows"]}
    assert rows["ORT fp32"]["vs_ort_fp32"] == 1.0 and rows["ORT fp32"]["max_abs_diff"] == 0.0
    if HAS_OPENVINO:
        assert rows["OpenVINO fp32"]["max_abs_diff"] < ATOL
        assert [p["rows"] for p in result["openvino_vs_onnxruntime"]] == ["OpenVINO fp32 / ORT fp32"]
    else:
        assert any("openvino is not installed" in note for note in result["notes"])
    assert any("int8 rows left out" in note for note in result["notes"])
    text = "\n".join(report_lines(result))
    assert "ORT fp32" in text and result["machine"]["cpu"] in text
