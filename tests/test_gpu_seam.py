"""The GPU seam without a GPU: the real CLI (`anoclip build-engine`, `anoclip predict --backend
tensorrt-native`, `anoclip-export`) run against tests/tensorrt_standin.py, a STAND-IN for the
``tensorrt`` and ``cuda.bindings.runtime`` modules (not TensorRT: its engine hands the batch to
onnxruntime's CPU session of the model it was built from, and records every call).

What these tests show: that our side of the boundary (which network is built on which TensorRT
release, the sidecar, which engine `--precision` picks, `--no-verify`, buffers, streams and
bindings, chunked batches, the README's Jetson recipe) does what it says. What they cannot show:
that real TensorRT builds these networks, or its numbers and speed (tests/test_engines.py has the
test that runs on a real GPU).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, TINY_CLASSES, TINY_CONFIG, copy_artifacts
from tensorrt_standin import StandIn

ROOT = Path(__file__).resolve().parents[1]
JETPACK_6 = "10.3.0.30"  # TensorRT of JetPack 6
DESKTOP_11 = "11.1.0.4"

pytest.importorskip("onnx", reason="the stand-in's parser reads the ONNX graphs with onnx")


@pytest.fixture
def standin(monkeypatch):
    """Install a stand-in TensorRT release (and its CUDA runtime) in ``sys.modules``; the GPU probe
    reports the stand-in's GPU. Returns the installer: ``standin("10.3.0.30") -> StandIn``."""
    import anoclip.calibration.engine
    import anoclip.runtime.backends.tensorrt
    import anoclip.runtime.gpu
    from anoclip.runtime.engine import GPU

    def install(version: str) -> StandIn:
        fake = StandIn(version)
        for name, module in fake.modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        gpu = GPU(fake.gpu_name, fake.compute_capability)
        for module in (anoclip.runtime.gpu, anoclip.calibration.engine, anoclip.runtime.backends.tensorrt):
            monkeypatch.setattr(module, "probe_gpu", lambda device=0: gpu)
        return fake

    return install


def anoclip(*args: str, program: str = "anoclip") -> tuple[int, str, str]:
    """Run the installed command's ``main()`` (the one console entry point, one-line errors
    included) in-process under click's CliRunner isolation: (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from anoclip.export.cli import main as export_main
    from anoclip.runtime.cli import main

    entry = {"anoclip": main, "anoclip-export": export_main}[program]
    argv = sys.argv
    with CliRunner().isolation() as streams:
        sys.argv = [program, *args]
        try:
            entry()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            sys.argv = argv
        out, err = streams[0].getvalue().decode(), streams[1].getvalue().decode()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def scores(out: str) -> dict[str, float]:
    """image name -> score, from predict --json's lines."""
    found = {}
    for line in out.splitlines():
        record = json.loads(line)
        source = record.get("source", record.get("image"))
        found[Path(source).name] = record["score"]
    return found


@pytest.fixture
def images(tmp_path, rgb_image) -> Path:
    import cv2

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"s{i}.png"), np.roll(rgb_image, 17 * i, axis=1))
    return folder


@pytest.fixture(scope="module")
def fp16_artifacts(tmp_path_factory, tiny_artifacts) -> Path:
    """The tiny artifacts with the fp16 model of `anoclip calibrate fp16`."""
    folder = copy_artifacts(tiny_artifacts, tmp_path_factory.mktemp("fp16") / "a")
    code, out, err = anoclip("calibrate", "fp16", "--artifacts", str(folder))
    assert code == 0, err
    return folder


@pytest.fixture(scope="module")
def int8_artifacts(tmp_path_factory, tiny_artifacts) -> Path:
    """The tiny artifacts with the Q/DQ model of `anoclip calibrate int8` (gate off: random weights)."""
    import cv2

    root = tmp_path_factory.mktemp("int8")
    frames = root / "frames"
    frames.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        cv2.imwrite(str(frames / f"f{i}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    folder = copy_artifacts(tiny_artifacts, root / "a")
    code, out, err = anoclip("calibrate", "int8", "--artifacts", str(folder), "--images", str(frames), "--n", "4",
                             "--parity-frames", "2", "--min-map-r", "-1", "--min-cosine", "-1")
    assert code == 0, err
    return folder


def predict(folder: Path, images: Path, tmp_path: Path, *options: str) -> tuple[int, str, str]:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"  # a run folder is named by second and process
    return anoclip("predict", "--artifacts", str(folder), "--class", "bottle", "--out", str(out), "--json", *options,
                   str(images))


def native(folder, images, tmp_path, precision, *options):
    return predict(folder, images, tmp_path, "--backend", "tensorrt-native", "--precision", precision, *options)


def sidecars(folder: Path) -> dict[str, dict]:
    """precision -> sidecar of the engines the manifest names."""
    manifest = json.loads((folder / "manifest.json").read_text())
    found = {}
    for name in manifest["files"]:
        if name.endswith(".engine.json"):
            data = json.loads((folder / name).read_text())
            found[data["precision"]] = data
    return found


# ----------------------------------------------------------------------------------------------
# TensorRT 10.3 (JetPack 6) without an fp16 model: the weakly typed fp16 build, and predict finds it


def test_10_3_without_fp16_model(standin, tiny_artifacts, tmp_path, images):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    trt = standin(JETPACK_6)
    code, _, err = anoclip("build-engine", "--artifacts", str(folder), "--precision", "fp16")
    assert code == 0, err
    fp16 = sidecars(folder)["fp16"]
    assert (fp16["source_model"], fp16["strongly_typed"]) == ("visual", False)  # built from the fp32 model
    assert trt.called("builder.create_network") == [0]  # weakly typed network
    assert set(trt.called("config.set_flag")) == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    pinned = [name for name, _ in trt.called("layer.precision")]
    assert fp16["fp32_layers"] == len(pinned) > 0  # LayerNormalization and Softmax kept in fp32
    assert fp16["parity"]["patch_embeds_min_cosine"] > 0.9999  # the stand-in runs the fp32 model

    code, out, err = native(folder, images, tmp_path, "fp16")
    assert code == 0, err
    code, reference, err = predict(folder, images, tmp_path, "--backend", "cpu")
    assert code == 0, err
    got, want = scores(out), scores(reference)
    assert got.keys() == want.keys() and len(got) == 3
    assert all(abs(got[k] - want[k]) < 1e-5 for k in got)
    assert trt.called("context.execute_async_v3")

    for precision in ("fp32", "int8"):
        code, _, err = native(folder, images, tmp_path, precision)
        line = error_line(err)
        assert code != 0
        assert f"has no {precision} TensorRT engine (it has fp16 ones that run here: pass --precision fp16)" in line
        assert f"`anoclip build-engine --artifacts {folder} --precision {precision}`" in line


def test_buffers_and_streams_are_released(standin, tiny_artifacts, tmp_path, rgb_image):
    from anoclip.calibration.engine import build_engine
    from anoclip.runtime import Detector

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    trt = standin(JETPACK_6)
    build_engine(folder, "fp32", parity=0)
    detector = Detector.load(folder, backend="tensorrt-native", precision="fp32")
    assert detector.precision == "fp32" and "TensorRT 10.3.0.30 native [fp32" in detector.backend.describe()
    detector.predict(rgb_image, "bottle")
    assert set(trt.called("get_cuda_native_handle")) == {"cudaStream_t"}  # its address, not int(stream)
    detector.backend.close()
    assert not trt.cudart.allocations["host"] and not trt.cudart.allocations["device"]
    assert trt.called("cudaStreamDestroy") == trt.called("cudaStreamCreate")[-1:]


# ----------------------------------------------------------------------------------------------
# TensorRT 10.3 with the fp16 model, and 11.1


def test_10_3_with_fp16_model(standin, fp16_artifacts, tmp_path, images):
    folder = copy_artifacts(fp16_artifacts, tmp_path / "a")
    trt = standin(JETPACK_6)
    for precision in ("fp16", "fp32"):
        code, _, err = anoclip("build-engine", "--artifacts", str(folder), "--precision", precision)
        assert code == 0, err
    built = sidecars(folder)
    assert (built["fp16"]["source_model"], built["fp16"]["strongly_typed"]) == ("visual_fp16", True)
    assert (built["fp32"]["source_model"], built["fp32"]["strongly_typed"]) == ("visual", True)
    assert trt.called("builder.create_network") == [2, 2]  # 1 << STRONGLY_TYPED, both builds
    assert trt.called("config.set_flag") == [] and trt.called("config.clear_flag") == ["TF32"]  # fp32: no TF32
    assert not trt.called("layer.precision")
    for precision in ("fp16", "fp32"):
        code, out, err = native(folder, images, tmp_path, precision)
        assert code == 0, err
        assert len(scores(out)) == 3
    code, _, err = native(folder, images, tmp_path, "int8")
    assert code != 0 and "it has fp32 and fp16 ones that run here" in error_line(err)
    from anoclip.runtime import Detector

    detector = Detector.load(folder, backend="tensorrt-native", precision="fp16")
    assert (detector.model, detector.precision) == ("visual_fp16", "fp16")  # thresholds: the model it was built from


def test_11_1(standin, tiny_artifacts, fp16_artifacts, tmp_path, images):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    trt = standin(DESKTOP_11)
    assert not hasattr(trt.trt.BuilderFlag, "FP16")  # weak typing is gone in 11.x
    code, _, err = anoclip("build-engine", "--artifacts", str(folder), "--precision", "fp16")
    line = error_line(err)
    assert code != 0 and "builds only strongly typed networks" in line
    assert f"`anoclip calibrate fp16 --artifacts {folder}`" in line
    code, _, err = anoclip("build-engine", "--artifacts", str(folder), "--precision", "int8")
    assert code != 0 and f"`anoclip calibrate int8 --artifacts {folder}" in error_line(err)
    assert not trt.called("builder.create_network")  # refused before any TensorRT call

    code, _, err = anoclip("build-engine", "--artifacts", str(folder), "--precision", "fp32")
    assert code == 0, err
    assert trt.called("builder.create_network") == [0]  # always strongly typed: no creation flag on 11.x
    assert sidecars(folder)["fp32"]["strongly_typed"] is True

    folder16 = copy_artifacts(fp16_artifacts, tmp_path / "b")
    code, _, err = anoclip("build-engine", "--artifacts", str(folder16), "--precision", "fp16")
    assert code == 0, err
    assert sidecars(folder16)["fp16"]["source_model"] == "visual_fp16"
    assert not trt.called("config.set_flag") and not trt.called("layer.precision")
    for where, precision in ((folder, "fp32"), (folder16, "fp16")):
        code, out, err = native(where, images, tmp_path, precision)
        assert code == 0, err
        assert len(scores(out)) == 3


@pytest.mark.parametrize("version", [JETPACK_6, DESKTOP_11])
def test_int8_engine_from_the_qdq_model(standin, int8_artifacts, tmp_path, images, version):
    folder = copy_artifacts(int8_artifacts, tmp_path / "a")
    trt = standin(version)
    code, _, err = anoclip("build-engine", "--artifacts", str(folder), "--precision", "int8")
    assert code == 0, err
    built = sidecars(folder)["int8"]
    assert (built["source_model"], built["strongly_typed"]) == ("visual_int8", True)
    assert not trt.called("config.set_flag")  # explicit quantization: no INT8 flag, no calibrator
    code, out, err = native(folder, images, tmp_path, "int8")
    assert code == 0, err
    code, reference, err = predict(folder, images, tmp_path, "--backend", "cpu", "--precision", "int8")
    assert code == 0, err
    got, want = scores(out), scores(reference)
    # the stand-in runs the Q/DQ model itself, in a session without our int8 options (MatMulAddFusion
    # stays on there), so the two differ by the rounding of the fused graph: ~1e-4 here
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-3 for k in want)


def test_an_engine_of_another_release_is_one_line(standin, tiny_artifacts, tmp_path, images):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    standin(JETPACK_6)
    assert anoclip("build-engine", "--artifacts", str(folder), "--precision", "fp32")[0] == 0
    standin(DESKTOP_11)
    code, _, err = native(folder, images, tmp_path, "fp32")
    line = error_line(err)
    assert code != 0 and "built with TensorRT 10.3.0.30" in line and "this machine has TensorRT 11.1.0.4" in line
    assert f"`anoclip build-engine --artifacts {folder} --precision fp32 --batch 1:1:1`" in line


# ----------------------------------------------------------------------------------------------
# --no-verify reaches the engine; the backend never re-reads the manifest


def test_no_verify_reaches_the_engine(standin, tiny_artifacts, tmp_path, images, monkeypatch):
    import anoclip.runtime.artifacts as artifacts_module

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    standin(JETPACK_6)
    assert anoclip("build-engine", "--artifacts", str(folder), "--precision", "fp16")[0] == 0
    side = next(folder.glob("visual_fp16.*.engine.json"))
    side.write_text(side.read_text().replace('"command": "', '"command": "edited: '))  # still a valid sidecar
    code, _, err = native(folder, images, tmp_path, "fp16")
    assert code != 0 and "has no fp16 TensorRT engine" in error_line(err)  # its hash no longer matches: left out

    reads = []
    real = artifacts_module.read_manifest
    monkeypatch.setattr(artifacts_module, "read_manifest", lambda f: reads.append(f) or real(f))
    code, out, err = native(folder, images, tmp_path, "fp16", "--no-verify")
    assert code == 0, err
    assert len(scores(out)) == 3 and len(reads) == 1  # the folder is opened once: by load_artifacts


def test_engines_are_of_the_visual_model_only(standin, fused_artifacts, tmp_path, images):
    standin(JETPACK_6)
    code, _, err = predict(fused_artifacts, images, tmp_path, "--model", "fused", "--backend", "tensorrt-native")
    line = error_line(err)
    assert code != 0 and "runs engines of the visual model, not of fused" in line and "--model visual" in line


# ----------------------------------------------------------------------------------------------
# Batches larger than the profile run in chunks (a dynamic-batch export)


def test_native_batches_run_in_chunks(standin, fused_artifacts, tmp_path):
    from anoclip.calibration.engine import build_engine
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.backends import create_backend

    folder = copy_artifacts(fused_artifacts, tmp_path / "a")
    trt = standin(DESKTOP_11)
    from anoclip.runtime.engine import BatchProfile

    build_engine(folder, "fp32", batch=BatchProfile(2, 2, 3), parity=0)
    artifacts = load_artifacts(folder)
    engine = create_backend(artifacts, "visual", "tensorrt-native", precision="fp32")
    cpu = create_backend(artifacts, "visual", "cpu")
    batch = np.random.default_rng(0).standard_normal((7, 3, *artifacts.manifest.image_size)).astype(np.float32)
    got, want = engine.run_all(batch), cpu.run_all(batch)
    for name in ("image_embeds", "patch_embeds"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    shapes = [shape[0] for _, shape, ok in trt.called("context.set_input_shape") if ok]
    assert shapes[-3:] == [3, 3, 2]  # 7 = 3 + 3 + 1, the last padded up to the profile's minimum of 2
    one = engine.run_all(batch[:1])
    np.testing.assert_allclose(one["patch_embeds"], want["patch_embeds"][:1], atol=1e-5)
    assert engine.run_all(batch[:0])["patch_embeds"].shape == (0, *want["patch_embeds"].shape[1:])
    engine.close()


def test_run_in_chunks():
    from anoclip.runtime.backends.batching import run_in_chunks

    seen = []

    def run(chunk):
        seen.append(chunk.shape[0])
        return {"double": chunk * 2, "sum": chunk.reshape(chunk.shape[0], -1).sum(axis=1)}

    batch = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    for most, least, calls in ((None, 1, [7]), (7, 1, [7]), (3, 1, [3, 3, 1]), (3, 3, [3, 3, 3]), (4, 2, [4, 3]),
                               (8, 8, [8])):
        seen.clear()
        out = run_in_chunks(run, batch, most, least)
        assert seen == calls, (most, least)
        np.testing.assert_array_equal(out["double"], batch * 2)
        np.testing.assert_array_equal(out["sum"], batch.sum(axis=1))
    seen.clear()
    empty = run_in_chunks(run, batch[:0], 4, 2)
    assert seen == [2] and empty["double"].shape == (0, 2)
    with pytest.raises(ValueError):
        run_in_chunks(run, batch, 2, 3)


# ----------------------------------------------------------------------------------------------
# A later export keeps the engine registered and loadable


def test_export_adding_a_class_keeps_the_engine(standin, export_cli, tiny_artifacts, tmp_path, images):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    standin(JETPACK_6)
    assert anoclip("build-engine", "--artifacts", str(folder), "--precision", "fp16")[0] == 0
    before = sidecars(folder)["fp16"]
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes",
                         ",".join([*TINY_CLASSES, "another"]), "--qkv-tokens", "model", "--tta", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert sidecars(folder).get("fp16") == before  # still registered, unchanged
    code, out, err = native(folder, images, tmp_path, "fp16")
    assert code == 0, err
    assert len(scores(out)) == 3
    code, out, err = anoclip("predict", "--artifacts", str(folder), "--class", "another", "--backend",
                             "tensorrt-native", "--precision", "fp16", "--out", str(tmp_path / "o2"), "--json",
                             str(images))
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# The README's TensorRT recipes, as written


def readme_recipe(first_comment: str) -> list[list[str]]:
    """The commands of the README's TensorRT block from the comment line starting with
    ``first_comment`` up to the next comment line: each as its words (comments cut off)."""
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text[text.index("### TensorRT engines"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    commands, inside = [], False
    for line in block.strip().splitlines():
        if line.startswith("#"):
            if inside:
                break
            inside = line.startswith(first_comment)
            continue
        if inside:
            commands.append(shlex.split(line, comments=True))
    assert commands, first_comment
    return commands


def run_recipe(commands: list[list[str]], replace: dict[str, str]) -> list[str]:
    """Run each `anoclip` command of a recipe (pip installs are what the stand-in replaces); the
    stderr of each."""
    outputs = []
    for words in commands:
        if words[0] == "pip":
            assert words[1] == "install" and any(w.startswith(("cuda-python", "tensorrt")) for w in words[2:]), words
            continue
        assert words[0] == "anoclip", words
        args = [replace.get(w, w) for w in words[1:]]
        args = [str(Path(a).expanduser()) if a.startswith("~/") else a for a in args]
        code, _, err = anoclip(*args)
        assert code == 0, f"{' '.join(words)}\n{err}"
        outputs.append(err)
    return outputs


def test_readme_jetson_recipe(standin, tiny_artifacts, tmp_path, images, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = copy_artifacts(tiny_artifacts, tmp_path / "demo")
    commands = readme_recipe("# Jetson Orin, JetPack 6")
    assert [w[:2] for w in commands] == [["pip", "install"], ["anoclip", "build-engine"], ["anoclip", "predict"]]
    trt = standin(JETPACK_6)
    outputs = run_recipe(commands, {"artifacts/demo": str(folder), "samples/": str(images)})
    assert "stored" in outputs[0] and "3 of 3 images scored" in outputs[1]
    assert (tmp_path / "home" / "trt.cache").is_file()  # --timing-cache ~/trt.cache
    assert ("config.set_memory_pool_limit", ("WORKSPACE", 1 << 30)) in trt.calls  # --workspace 1
    assert trt.called("context.execute_async_v3")  # predict ran the engine the recipe built


def test_readme_desktop_recipe(standin, fused_artifacts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = copy_artifacts(fused_artifacts, tmp_path / "demo")  # a --dynamic-batch export
    commands = readme_recipe("# desktop GPU")
    trt = standin(DESKTOP_11)
    run_recipe(commands, {"artifacts/demo": str(folder)})
    assert sidecars(folder)["fp32"]["profile"] == {"min": 1, "opt": 4, "max": 8}
    (name, low, opt, high), = trt.called("profile.set_shape")
    assert (low[0], opt[0], high[0]) == (1, 4, 8)


# ----------------------------------------------------------------------------------------------
# The stand-in says what it is


def test_the_standin_is_labelled_as_one():
    fake = StandIn("10.3.0.30")
    modules = fake.modules()
    assert "STAND-IN" in modules["tensorrt"].__doc__ and "STAND-IN" in modules["cuda.bindings.runtime"].__doc__
    assert "not a GPU" in fake.gpu_name
    assert re.search(r"STAND-IN", (DATA.parent / "tensorrt_standin.py").read_text().split("\n", 1)[0])
