"""Shared fixtures: a tiny open_clip ViT with random weights, exported once per test run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
TINY_CONFIG = DATA / "anoclip-tiny-vit.json"
TINY_BACKBONE = "anoclip-tiny-vit"
TINY_CLASSES = ("bottle", "carpet")
FUSED_CLASSES = ("bottle", "carpet", "screw")


def run_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def export_subprocess(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from anoclip.export.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _export_cli(args: list[str]):
    from click.testing import CliRunner

    from anoclip.export.cli import export_command

    return CliRunner().invoke(export_command, args, catch_exceptions=False)


def artifact_file(folder: Path, model: str | None = None) -> Path:
    """The file of ``model`` (e.g. "visual", "tta") in an artifact folder; the prompt weights when None."""
    from anoclip.runtime.artifacts import read_manifest

    manifest = read_manifest(folder)
    return folder / (manifest.prompts if model is None else manifest.models[model].file)


@pytest.fixture(scope="session", autouse=True)
def verification_cache(tmp_path_factory) -> Path:
    """Hashes verified during the tests are remembered in a folder of their own, not the user's cache."""
    import os

    folder = tmp_path_factory.mktemp("anoclip-cache")
    os.environ["ANOCLIP_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def export_cli():
    """Invoke ``anoclip-export`` in-process with the given arguments."""
    pytest.importorskip("open_clip")
    return _export_cli


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, export_cli) -> Path:
    """Tiny ViT artifacts (random weights, seed 0): V-V and QKV models, tta.onnx, classes bottle and carpet."""
    out = tmp_path_factory.mktemp("tiny-artifacts")
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes",
                         ",".join(TINY_CLASSES), "--qkv-tokens", "model", "--tta", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def fused_artifacts(tmp_path_factory, export_cli) -> Path:
    """Tiny ViT artifacts with a dynamic batch, classes bottle, carpet and screw, and the fused graph."""
    out = tmp_path_factory.mktemp("fused-artifacts")
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", ",".join(FUSED_CLASSES),
                         "--dynamic-batch", "--fused", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_model():
    """The same tiny open_clip model the tiny artifacts were exported from (seed 0)."""
    torch = pytest.importorskip("torch")
    from anoclip.export.model import load_model, register_model_config

    register_model_config(TINY_CONFIG)
    torch.manual_seed(0)
    return load_model(TINY_BACKBONE, "none")


@pytest.fixture
def rgb_image() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
