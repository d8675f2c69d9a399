"""TensorRT engines: the sidecar format, the checks that an engine belongs to this machine, the
build's option mapping and network choice, onnxruntime's provider options, the folder commit, and
whether the exported graphs use only operators TensorRT's ONNX parser supports.

Everything here is plain logic that runs without a GPU; the tests that need one (build an engine,
run it) skip with the reason where TensorRT, cuda-python or a CUDA device is missing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from anoclip.runtime.engine import BatchProfile, EngineSidecar, GPU, load_engine_sidecars, parse_sidecar
from anoclip.runtime.gpu import (check_compatible, choose_engine, installed_tensorrt_version, probe_gpu,
                                 versions_compatible)
from anoclip.runtime.errors import AnoclipError, ArtifactError, BackendError

from conftest import DATA, copy_artifacts, one_error_line, run_cli

ORIN = GPU("Orin", "8.7")
RTX = GPU("NVIDIA GeForce RTX 4090", "8.9")
SHA = "ab" * 32


def sidecar(**changes) -> EngineSidecar:
    values = dict(engine="visual_fp16.0123456789ab.engine", engine_sha256="0123456789ab" + "0" * 52, precision="fp16",
                  source_model="visual_fp16", source_file="visual_fp16.aaaaaaaaaaaa.onnx", source_sha256=SHA,
                  tensorrt_version="10.3.0.30", gpu_name="Orin", compute_capability="8.7", strongly_typed=True,
                  input_name="image", input_shape=[-1, 3, 240, 240], profile=BatchProfile(1, 1, 8),
                  workspace_bytes=1 << 30, built="2026-11-30T12:00:00Z", command="anoclip build-engine ...",
                  parity={"reference": "onnxruntime CPU fp32", "images": 4, "patch_embeds_min_cosine": 0.9991})
    values.update(changes)
    return EngineSidecar(**values)


def single_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------
# Sidecar format


def test_sidecar_round_trip():
    original = sidecar(version_compatible=True, fp32_layers=14, versions={"anoclip": "0.1.0"})
    again = parse_sidecar(original.to_json().encode(), "x.json", "DIR")
    assert again == original
    assert isinstance(again.profile, BatchProfile) and str(again.profile) == "1:1:8"


@pytest.mark.parametrize("key, value", [
    ("strongly_typed", "yes"), ("engine_sha256", "abc"), ("compute_capability", 8.7), ("compute_capability", "sm87"),
    ("tensorrt_version", "ten"), ("precision", "bf16"), ("input_shape", [0, 3, 240, 240]), ("input_shape", "1x3"),
    ("profile", {"min": 4, "opt": 2, "max": 8}), ("profile", {"min": 1, "max": 8}), ("workspace_bytes", -1),
    ("workspace_bytes", True), ("parity", {"cosine": float("nan")}), ("parity", {"nested": {"a": 1}}),
    ("versions", {"anoclip": 1}), ("format", "something-else"), ("format_version", 2), ("surprise", 1),
])
def test_sidecar_type_checks(key, value):
    data = json.loads(sidecar().to_json())
    data[key] = value
    with pytest.raises(ArtifactError) as exc:
        parse_sidecar(json.dumps(data).encode(), "DIR/visual_fp16.x.engine.json", "DIR")
    message = single_line(exc)
    assert "DIR/visual_fp16.x.engine.json is not a valid engine sidecar" in message
    assert "anoclip build-engine --artifacts DIR" in message


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[1, 2]", b'{"format": "anoclip-engine"}'])
def test_sidecar_unreadable_or_incomplete(raw):
    with pytest.raises(ArtifactError, match="not a valid engine sidecar"):
        parse_sidecar(raw, "s.json", "DIR")


def test_sidecar_missing_field_is_named():
    data = json.loads(sidecar().to_json())
    del data["gpu_name"]
    with pytest.raises(ArtifactError, match=r"missing fields \['gpu_name'\]"):
        parse_sidecar(json.dumps(data).encode(), "s.json", "DIR")


# ----------------------------------------------------------------------------------------------
# Does the engine belong here?


@pytest.mark.parametrize("built, running, compatible, ok", [
    ("10.3.0.30", "10.3.0.26", False, True),  # build numbers may differ
    ("10.3.0", "10.3.1", False, False),
    ("10.3.0", "10.7.0", False, False),
    ("10.3.0", "10.7.0", True, True),  # version-compatible plans run on later releases of the major
    ("10.7.0", "10.3.0", True, False),
    ("10.8.0", "11.1.0", True, True),  # and 10.x ones on 11.x
    ("11.1.0", "12.0.0", True, False),
    ("10.3.0", "", False, False),
])
def test_version_rule(built, running, compatible, ok):
    assert versions_compatible(built, running, compatible) is ok


def test_version_mismatch_is_one_line_naming_both_and_the_rebuild():
    with pytest.raises(ArtifactError) as exc:
        check_compatible(sidecar(), "10.7.0.23", ORIN, "DIR/visual_fp16.0123456789ab.engine", "DIR")
    message = single_line(exc)
    assert "built with TensorRT 10.3.0.30 for Orin (compute 8.7)" in message
    assert "this machine has TensorRT 10.7.0.23 and Orin (compute 8.7)" in message
    assert "`anoclip build-engine --artifacts DIR --precision fp16 --batch 1:1:8`" in message


@pytest.mark.parametrize("gpu, shown", [(RTX, "NVIDIA GeForce RTX 4090 (compute 8.9)"),
                                        (GPU("Orin (nvgpu)", "8.7"), "Orin (nvgpu) (compute 8.7)"),
                                        (None, "no CUDA GPU")])
def test_gpu_mismatch_is_one_line_naming_both(gpu, shown):
    with pytest.raises(ArtifactError) as exc:
        check_compatible(sidecar(), "10.3.0.30", gpu, "E", "DIR")
    message = single_line(exc)
    assert "for Orin (compute 8.7)" in message and shown in message and "rebuild it here" in message


def test_matching_engine_passes():
    check_compatible(sidecar(), "10.3.0.26", ORIN, "E", "DIR")


def test_choose_engine():
    here = sidecar()
    desktop = sidecar(engine="visual_fp16.ba9876543210.engine", gpu_name=RTX.name, compute_capability="8.9",
                      tensorrt_version="10.7.0")
    sources = {"visual_fp16": SHA}
    assert choose_engine([desktop, here], "fp16", sources, "10.3.0", ORIN, "DIR") is here
    assert choose_engine([desktop, here], "fp16", sources, "10.7.0.1", RTX, "DIR") is desktop
    with pytest.raises(ArtifactError) as exc:
        choose_engine([here], "int8", sources, "10.3.0", ORIN, "DIR")
    assert "has no int8 TensorRT engine (it has fp16 ones that run here: pass --precision fp16)" in single_line(exc)
    assert "`anoclip build-engine --artifacts DIR --precision int8`" in str(exc.value)
    with pytest.raises(ArtifactError) as exc:
        choose_engine([desktop], "int8", sources, "10.3.0", ORIN, "DIR")
    assert "has no int8 TensorRT engine; build one" in single_line(exc)  # none runs here: no --precision hint
    with pytest.raises(ArtifactError) as exc:
        choose_engine([here], "fp16", {"visual_fp16": "cd" * 32}, "10.3.0", ORIN, "DIR")
    assert "built from a visual_fp16 model file the folder no longer holds" in single_line(exc)
    with pytest.raises(ArtifactError) as exc:
        choose_engine([here], "fp16", sources, "11.1.0", ORIN, "DIR")
    assert "TensorRT 10.3.0.30" in single_line(exc) and "TensorRT 11.1.0" in str(exc.value)


def test_the_engine_precision_decides_not_the_model_it_was_built_from():
    weak = sidecar(engine="visual_fp16.0000000000aa.engine", source_model="visual", strongly_typed=False)
    assert choose_engine([weak], "fp16", {"visual": SHA}, "10.3.0", ORIN, "DIR") is weak
    with pytest.raises(ArtifactError) as exc:
        choose_engine([weak], "fp32", {"visual": SHA}, "10.3.0", ORIN, "DIR")
    assert "pass --precision fp16" in single_line(exc)


def test_probe_and_installed_version_answer_without_raising():
    gpu = probe_gpu(0)
    assert gpu is None or (gpu.name and "." in gpu.compute_capability)
    version = installed_tensorrt_version()
    assert version == "" or version[0].isdigit()


# ----------------------------------------------------------------------------------------------
# build-engine options and network choice


def test_batch_spec_and_workspace():
    from anoclip.calibration.engine import parse_batch_spec, workspace_bytes

    assert parse_batch_spec("4") == BatchProfile(1, 4, 4)
    assert parse_batch_spec("1:4:8") == BatchProfile(1, 4, 8)
    assert parse_batch_spec(" 2:2:2 ") == BatchProfile(2, 2, 2)
    for bad in ("0", "8:4:1", "a", "1:2", "1:2:3:4", "-1", "1.5"):
        with pytest.raises(ValueError):
            parse_batch_spec(bad)
    assert workspace_bytes(None) == workspace_bytes(0) == 0
    assert workspace_bytes(1.5) == 3 << 29 and workspace_bytes(2) == 2 << 30
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            workspace_bytes(bad)


def test_profile_follows_the_exported_batch_axis():
    from anoclip.calibration.engine import DEFAULT_DYNAMIC_PROFILE, profile_for

    assert profile_for([1, 3, 240, 240], None) == BatchProfile(1, 1, 1)
    assert profile_for([4, 3, 240, 240], BatchProfile(4, 4, 4)) == BatchProfile(4, 4, 4)
    assert profile_for([-1, 3, 240, 240], None) == DEFAULT_DYNAMIC_PROFILE == BatchProfile(1, 1, 8)
    assert profile_for([-1, 3, 240, 240], BatchProfile(1, 4, 8)) == BatchProfile(1, 4, 8)
    with pytest.raises(AnoclipError) as exc:
        profile_for([1, 3, 240, 240], BatchProfile(1, 4, 8), "DIR")
    assert "fixed batch of 1" in single_line(exc) and "anoclip-export --dynamic-batch --out DIR" in str(exc.value)


@pytest.mark.parametrize("version, precision, models, source, strong, fp16_flag", [
    ("10.3.0.30", "fp32", {"visual"}, "visual", True, False),
    ("11.1.0", "fp32", {"visual"}, "visual", True, False),
    ("10.3.0.30", "fp16", {"visual", "visual_fp16"}, "visual_fp16", True, False),
    ("11.1.0", "fp16", {"visual", "visual_fp16"}, "visual_fp16", True, False),
    ("10.3.0.30", "fp16", {"visual"}, "visual", False, True),  # weakly typed fallback, 10.x only
    ("10.3.0.30", "int8", {"visual", "visual_int8"}, "visual_int8", True, False),
    ("11.1.0", "int8", {"visual", "visual_int8"}, "visual_int8", True, False),
])
def test_network_plan(version, precision, models, source, strong, fp16_flag):
    from anoclip.calibration.engine import network_plan

    plan = network_plan(version, precision, models, "DIR")
    assert (plan.source_model, plan.strongly_typed, plan.fp16_flag, plan.pin_fp32) == (source, strong, fp16_flag, fp16_flag)
    assert plan.clear_tf32 == (precision == "fp32")


@pytest.mark.parametrize("version, precision, needle", [
    ("11.1.0", "fp16", "anoclip calibrate fp16 --artifacts DIR"),
    ("10.3.0", "int8", "anoclip calibrate int8 --artifacts DIR"),
    ("11.1.0", "int8", "anoclip calibrate int8 --artifacts DIR"),
    ("8.6.1", "fp32", "TensorRT 8.6.1 is too old"),
])
def test_network_plan_refusals(version, precision, needle):
    from anoclip.calibration.engine import network_plan

    with pytest.raises(AnoclipError) as exc:
        network_plan(version, precision, {"visual"}, "DIR")
    assert needle in single_line(exc)


def test_parity_figures():
    from anoclip.calibration.engine import compare_outputs, parity_images

    rng = np.random.default_rng(0)
    ref = {"image_embeds": rng.standard_normal((2, 8)), "patch_embeds": rng.standard_normal((2, 5, 8))}
    same = compare_outputs(ref, ref)
    assert same["image_embeds_max_abs"] == 0 and same["patch_embeds_min_cosine"] == pytest.approx(1)
    flipped = {"image_embeds": ref["image_embeds"], "patch_embeds": ref["patch_embeds"].copy()}
    flipped["patch_embeds"][1, 3] *= -1
    figures = compare_outputs(ref, flipped)
    assert figures["patch_embeds_min_cosine"] == pytest.approx(-1)
    assert figures["patch_embeds_max_abs"] == pytest.approx(2 * np.abs(ref["patch_embeds"][1, 3]).max())
    images = parity_images(3, (16, 20), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert images.shape == (3, 3, 16, 20) and images.dtype == np.float32
    with pytest.raises(AnoclipError, match="shape"):
        compare_outputs(ref, {"image_embeds": ref["image_embeds"], "patch_embeds": ref["patch_embeds"][:1]})


# ----------------------------------------------------------------------------------------------
# onnxruntime provider options


def test_provider_options_follow_the_model_file(tmp_path):
    from anoclip.runtime.backends.onnxruntime import file_precision, provider_options

    assert [file_precision(f"{n}.0123456789ab.onnx") for n in ("visual", "visual_fp16", "visual_int8", "tta")] == \
        ["fp32", "fp16", "int8", "fp32"]
    fp16 = provider_options("TensorrtExecutionProvider", "fp16", tmp_path)
    assert fp16["trt_fp16_enable"] is True and fp16["trt_int8_enable"] is False
    assert fp16["trt_engine_cache_enable"] and fp16["trt_timing_cache_enable"]
    assert fp16["trt_engine_cache_path"] == fp16["trt_timing_cache_path"] == str(tmp_path)
    int8 = provider_options("TensorrtExecutionProvider", "int8", tmp_path)
    assert int8["trt_int8_enable"] is False and int8["trt_fp16_enable"] is False  # Q/DQ: explicit quantization
    assert provider_options("TensorrtExecutionProvider", "fp32", tmp_path)["trt_fp16_enable"] is False
    assert provider_options("CUDAExecutionProvider", "fp16", device=1) == {"device_id": 1}
    assert provider_options("CPUExecutionProvider", "fp32") == {}
    assert "trt_engine_cache_enable" not in provider_options("TensorrtExecutionProvider", "fp32")  # no folder, no cache


def test_tensorrt_cache_folder_is_keyed(monkeypatch, tmp_path):
    from anoclip.runtime.backends.onnxruntime import gpu_slug, tensorrt_cache_dir

    monkeypatch.setenv("ANOCLIP_CACHE_DIR", str(tmp_path))
    a = tensorrt_cache_dir("1.22.0", "10.3.0.30", ORIN)
    assert a == tmp_path / "ort-trt" / "ort1.22.0-trt10.3.0.30-orin-sm87"
    others = {tensorrt_cache_dir("1.23.0", "10.3.0.30", ORIN), tensorrt_cache_dir("1.22.0", "10.7.0", ORIN),
              tensorrt_cache_dir("1.22.0", "10.3.0.30", RTX), tensorrt_cache_dir("1.22.0", "", None)}
    assert a not in others and len(others) == 4
    assert gpu_slug(RTX) == "nvidia-geforce-rtx-4090-sm89" and gpu_slug(None) == "no-gpu"
    assert tensorrt_cache_dir("1", "2", ORIN, root=tmp_path / "r").parent == tmp_path / "r"


def test_session_providers(tmp_path):
    from anoclip.runtime.backends.onnxruntime import session_providers

    chain = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                              "visual_fp16.0123456789ab.onnx", cache_dir=tmp_path / "trt")
    assert [name for name, _ in chain] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert chain[0][1]["trt_fp16_enable"] is True and (tmp_path / "trt").is_dir()
    assert chain[1][1] == {"device_id": 0} and chain[2][1] == {}
    given = ("CUDAExecutionProvider", {"device_id": 1})
    assert session_providers([given], "tta.onnx") == [given]


def test_auto_says_which_providers_and_why_not(caplog):
    from anoclip.runtime.backends.onnxruntime import report_providers

    with caplog.at_level(logging.INFO, logger="anoclip"):
        report_providers("auto", ["CPUExecutionProvider"], ["CPUExecutionProvider"], ["CPUExecutionProvider"],
                         Path("visual.onnx"))
        report_providers(None, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                         ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                         ["CUDAExecutionProvider", "CPUExecutionProvider"], Path("visual.onnx"))
    first, second = [r.getMessage() for r in caplog.records]
    assert "on CPU" in first and "TensorRT not in this onnxruntime" in first and "CUDA not in this onnxruntime" in first
    assert "on CUDA, CPU" in second and "TensorRT failed to start" in second


def test_a_named_provider_that_did_not_start_is_an_error():
    from anoclip.runtime.backends.onnxruntime import report_providers

    with pytest.raises(BackendError) as exc:
        report_providers("tensorrt", ["TensorrtExecutionProvider", "CPUExecutionProvider"],
                         ["TensorrtExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"],
                         Path("visual.onnx"))
    assert "could not start TensorRT for visual.onnx" in single_line(exc)


def test_sessions_get_the_shared_options(tiny_artifacts):
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.backends import create_backend
    from anoclip.runtime.tta import OnnxTTARunner

    artifacts = load_artifacts(tiny_artifacts, models=["visual", "tta"])
    backend = create_backend(artifacts, "visual", "cpu")
    assert backend.provider_chain == [("CPUExecutionProvider", {})] and backend.precision == "fp32"
    prompts = artifacts.prompts.get("bottle")
    runner = OnnxTTARunner(str(artifacts.model_path("tta")), backend.providers, T=prompts.prompt_features,
                           text_features=prompts.text_features)
    assert runner.ort.get_providers() == ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------------------------
# Without TensorRT: one line naming what to install


tensorrt_missing = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                      reason="TensorRT is installed here: the message for its absence cannot show")


@tensorrt_missing
def test_build_engine_without_tensorrt_is_one_line(tiny_artifacts):
    proc = run_cli("build-engine", "--artifacts", str(tiny_artifacts), "--precision", "fp32")
    assert proc.returncode != 0
    line = one_error_line(proc.stderr)
    assert "pip install tensorrt" in line and "JetPack" in line


@tensorrt_missing
def test_native_backend_without_tensorrt_is_one_line(tiny_artifacts, rgb_image, tmp_path):
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.backends import BACKEND_CHOICES, create_backend

    assert "tensorrt-native" in BACKEND_CHOICES
    with pytest.raises(BackendError) as exc:
        create_backend(load_artifacts(tiny_artifacts), "visual", "tensorrt-native")
    assert "pip install tensorrt" in single_line(exc)
    image = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(image), rgb_image)
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--backend", "tensorrt-native",
                   "--out", str(tmp_path / "out"), str(image))
    assert proc.returncode != 0 and "pip install tensorrt" in one_error_line(proc.stderr)


def test_build_engine_help_lists_the_options():
    proc = run_cli("build-engine", "--help")
    assert proc.returncode == 0
    for option in ("--precision", "--batch", "--workspace", "--timing-cache", "--parity-images"):
        assert option in proc.stdout


def test_bad_batch_is_a_usage_error(tmp_path):
    proc = run_cli("build-engine", "--artifacts", str(tmp_path), "--precision", "fp16", "--batch", "8:1:4")
    assert proc.returncode == 2 and "1 <= min <= opt <= max" in proc.stderr


# ----------------------------------------------------------------------------------------------
# CUDA calls: error codes become one line (real cuda-python, no GPU needed)


def test_cuda_error_codes_become_one_line():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from anoclip.runtime.backends.tensorrt import Cuda

    cuda = Cuda(cudart)
    assert cuda.check("cudaX", (cudart.cudaError_t.cudaSuccess, 42)) == 42
    assert cuda.check("cudaY", (cudart.cudaError_t.cudaSuccess,)) is None
    with pytest.raises(BackendError) as exc:
        cuda.check("cudaMalloc", (cudart.cudaError_t.cudaErrorMemoryAllocation, None))
    assert "CUDA cudaMalloc failed: cudaErrorMemoryAllocation" in single_line(exc)
    if probe_gpu() is None:  # a real call on a machine without a GPU
        with pytest.raises(BackendError) as exc:
            cuda.device_count()
        assert "CUDA cudaGetDeviceCount failed: cudaError" in single_line(exc)


# ----------------------------------------------------------------------------------------------
# The folder commit (placeholder plan bytes: what is tested is files and manifest, not TensorRT)


def _stored(folder: Path, precision="fp32", gpu=ORIN, version="10.3.0.30", payload=b"placeholder plan"):
    from anoclip.calibration.engine import store_engine
    from anoclip.runtime.artifacts import content_addressed, read_manifest
    from anoclip.runtime.engine import engine_base_name

    manifest = read_manifest(folder)
    source = manifest.models["visual"].file
    sha = hashlib.sha256(payload).hexdigest()
    record = sidecar(engine=content_addressed(engine_base_name(precision), sha), engine_sha256=sha, precision=precision,
                     source_model="visual", source_file=source, source_sha256=manifest.files[source],
                     tensorrt_version=version, gpu_name=gpu.name, compute_capability=gpu.compute_capability)
    return record, store_engine(folder, payload, record, gpu, "build-engine test")


def test_store_commits_engine_and_sidecar(tiny_artifacts, tmp_path):
    from anoclip.runtime.artifacts import load_artifacts, read_manifest, verify_files

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    record, replaced = _stored(folder)
    manifest = read_manifest(folder)
    assert replaced == [] and record.engine in manifest.files and record.engine + ".json" in manifest.files
    assert record.engine.startswith("visual_fp32.") and (folder / record.engine).read_bytes() == b"placeholder plan"
    verify_files(folder, manifest)  # every file, the engine and sidecar included, has the recorded sha256
    assert load_engine_sidecars(folder, manifest) == [record]
    assert manifest.history[-1].endswith("build-engine test")
    load_artifacts(folder)  # the folder still loads as before
    # a second build for the same GPU and TensorRT release replaces the first; another GPU's stays
    other, _ = _stored(folder, gpu=RTX, version="10.7.0", payload=b"desktop plan")
    again, replaced = _stored(folder, payload=b"newer plan")
    assert replaced == [record.engine] and not (folder / record.engine).exists()
    names = {s.engine for s in load_engine_sidecars(folder, read_manifest(folder))}
    assert names == {other.engine, again.engine}
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert leftovers == []


def test_tampered_engine_or_sidecar_is_caught(tiny_artifacts, tmp_path):
    from anoclip.runtime.artifacts import read_manifest, verify_files

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    record, _ = _stored(folder)
    (folder / (record.engine + ".json")).write_text(record.to_json().replace("Orin", "Orin2"))
    with pytest.raises(ArtifactError, match="sha256"):
        load_engine_sidecars(folder, read_manifest(folder))
    assert load_engine_sidecars(folder, read_manifest(folder), skip_damaged=True) == []  # warned, not fatal
    (folder / record.engine).write_bytes(b"other bytes")
    with pytest.raises(ArtifactError, match="sha256"):
        verify_files(folder, read_manifest(folder), [record.engine])


def test_the_same_plan_twice_is_kept_once(tiny_artifacts, tmp_path):
    from anoclip.runtime.artifacts import read_manifest

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    record, _ = _stored(folder)
    sidecar_bytes = (folder / (record.engine + ".json")).read_bytes()
    again, replaced = _stored(folder)
    assert replaced == [] and again.engine == record.engine
    assert (folder / (record.engine + ".json")).read_bytes() == sidecar_bytes
    assert len(load_engine_sidecars(folder, read_manifest(folder))) == 1


def test_a_failed_commit_leaves_the_folder_as_it_was(tiny_artifacts, tmp_path, monkeypatch):
    import anoclip.runtime.folder as folder_module

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(folder_module, "write_manifest", broken)  # the commit point of the folder's transaction
    with pytest.raises(OSError):
        _stored(folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after == before


def test_changed_folder_is_refused(tiny_artifacts, tmp_path):
    from anoclip.calibration.engine import store_engine

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    record = sidecar(source_file=json.loads((folder / "manifest.json").read_text())["models"]["visual"]["file"])
    with pytest.raises(AnoclipError, match="changed while the engine was being built"):
        store_engine(folder, b"plan", record, ORIN, "x")


# ----------------------------------------------------------------------------------------------
# Operators: every op of the exported graphs is in TensorRT's ONNX parser tables (10.3 and 11.x)


OPERATOR_TABLES = sorted(DATA.glob("tensorrt_*_onnx_operators.json"))


def _table(path: Path) -> dict:
    return json.loads(path.read_text())


def test_operator_tables_say_where_they_come_from():
    assert [_table(p)["tensorrt"] for p in OPERATOR_TABLES] == ["10.3", "11.1"]
    for path in OPERATOR_TABLES:
        table = _table(path)
        assert table["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/") and table["read"]
        assert table["operators"]["Conv"]["supported"] and not table["operators"]["QLinearConv"]["supported"]


def _graph_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _graph_nodes(sub)


def _models(folder: Path) -> dict[str, Path]:
    from anoclip.runtime.artifacts import read_manifest

    manifest = read_manifest(folder)
    return {name: folder / manifest.models[name].file
            for name in ("visual", "tta", "visual_fp16", "visual_int8") if name in manifest.models}


def _constant_inputs(model) -> set[str]:
    names = {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _restriction_problems(model, table: dict) -> list[str]:
    """Where the graph breaks a restriction the table states (the ones that can be read off the graph)."""
    from onnx import TensorProto, numpy_helper

    problems = []
    constants = _constant_inputs(model)
    consumed = {i for n in _graph_nodes(model.graph) for i in n.input} | {o.name for o in model.graph.output}
    initializers = {t.name: t for t in model.graph.initializer}
    type_names = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
                  TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.UINT8: "UINT8",
                  TensorProto.BOOL: "BOOL", TensorProto.INT8: "INT8"}
    for node in _graph_nodes(model.graph):
        rule = table["operators"][node.op_type]["restrictions"]
        if node.op_type == "LayerNormalization" and "first output" in rule:
            extra = [o for o in node.output[1:] if o and o in consumed]
            if extra:
                problems.append(f"{node.name}: LayerNormalization outputs {extra} are used")
        if "`axes` must be an initializer" in rule and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                problems.append(f"{node.name}: {node.op_type} axes {node.input[1]} is not an initializer")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zero = initializers.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero) != 0):
                problems.append(f"{node.name}: {node.op_type} zero point is not a zero initializer")
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if type_names.get(to) not in table["operators"]["Cast"]["types"]:
                problems.append(f"{node.name}: Cast to type {to}")
    return problems


@pytest.mark.parametrize("table_path", OPERATOR_TABLES, ids=lambda p: p.stem)
def test_exported_graphs_use_only_supported_operators(tiny_artifacts, table_path):
    onnx = pytest.importorskip("onnx", reason="the onnx package reads the graphs (export extra)")
    table = _table(table_path)
    models = _models(tiny_artifacts)
    assert {"visual", "tta"} <= set(models)
    for name, path in models.items():
        assert_tensorrt_parses(onnx.load(str(path), load_external_data=False), table, name)


def assert_tensorrt_parses(model, table: dict, name: str) -> None:
    """Opset, domains, operators and the restrictions that can be read off the graph, against the
    ONNX parser table of one TensorRT release."""
    opset = {o.domain: o.version for o in model.opset_import}.get("", 0)
    assert table["opset_min"] <= opset <= table["opset_max"], f"{name}: opset {opset}"
    ops = {n.op_type for n in _graph_nodes(model.graph) if n.domain in ("", "ai.onnx")}
    assert not {n.domain for n in _graph_nodes(model.graph)} - {"", "ai.onnx"}, f"{name}: custom domains"
    unsupported = sorted(op for op in ops if not table["operators"].get(op, {}).get("supported"))
    assert not unsupported, f"{name} uses {unsupported}, which TensorRT {table['tensorrt']} does not parse"
    assert not _restriction_problems(model, table), name


# ----------------------------------------------------------------------------------------------
# On a GPU with TensorRT and cuda-python only


def _gpu_stack():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (`pip install tensorrt`, or JetPack)")
    try:
        from cuda.bindings import runtime  # noqa: F401
    except ImportError:
        pytest.importorskip("cuda.cudart", reason="cuda-python is not installed")
    if probe_gpu(0) is None:
        pytest.skip("no CUDA GPU on this machine")


def test_native_engine_matches_onnxruntime(tiny_artifacts, tmp_path, rgb_image):
    _gpu_stack()
    from anoclip.calibration.engine import build_engine
    from anoclip.runtime import Detector

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    result = build_engine(folder, "fp32", parity=3, timing_cache=tmp_path / "timing.cache")
    assert result.sidecar.parity["patch_embeds_min_cosine"] > 0.999
    assert (tmp_path / "timing.cache").stat().st_size > 0
    native = Detector.load(folder, backend="tensorrt-native").predict(rgb_image, "bottle")
    cpu = Detector.load(folder, backend="cpu").predict(rgb_image, "bottle")
    assert abs(native.score - cpu.score) < 1e-3
    np.testing.assert_allclose(native.anomaly_map, cpu.anomaly_map, atol=1e-3)


def test_device_check_without_a_gpu_skips_every_gpu_row():
    import subprocess
    import sys

    if probe_gpu(0) is not None:
        pytest.skip("this machine has a GPU: the device check would run for minutes")
    proc = subprocess.run([sys.executable, "-m", "anoclip.benchmarks.device_check", "--runs", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines()[3:] if line.strip()]
    assert len(rows) == 8
    assert all("skipped: no CUDA GPU" in line for line in rows if "numpy" not in line)
    assert any("TTA loop, numpy (CPU)" in line and " ok" in line for line in rows)


@pytest.mark.parametrize("raised, code", [(RuntimeError("CUDA out of memory"), 1),
                                          (None, 0)])
def test_device_check_exits_nonzero_when_a_row_that_could_run_fails(monkeypatch, capsys, raised, code):
    from anoclip.benchmarks import device_check

    def rows(check, folder):
        def failing():
            raise raised

        def missing():
            raise device_check.SkipRow("cupy not installed (pip install cupy-cuda12x)")

        check.row("TTA loop, numpy (CPU)", lambda: ((lambda: None), (lambda: None), ""))
        check.row("TTA loop, cupy (GPU)", missing)  # a missing library is a skip, never a failure
        if raised is not None:
            check.row("TensorRT native", failing)

    monkeypatch.setattr(device_check, "_probe", lambda: None)
    monkeypatch.setattr(device_check, "_cuda_torch", lambda: None)
    monkeypatch.setattr(device_check, "check_tta", rows)
    assert device_check.main(["--runs", "1"]) == code
    captured = capsys.readouterr()
    assert "skipped: cupy not installed" in captured.out
    assert ("1 row(s) failed: TensorRT native" in captured.err) == (code == 1)
