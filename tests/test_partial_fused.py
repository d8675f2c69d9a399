"""A fused model that lacks classes of its folder (added since `anoclip fuse`): asking it for every
class, or for one it lacks, is one line naming the `anoclip fuse` command; the classes it holds
still score."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_CONFIG, copy_artifacts, one_error_line, run_cli

pytest.importorskip("onnx", reason="the fused graph is built with onnx (export extra)")

from anoclip.runtime.detector import Detector  # noqa: E402
from anoclip.runtime.errors import ArtifactError, UnknownClassError  # noqa: E402


@pytest.fixture(scope="module")
def partial(fused_artifacts, tmp_path_factory, export_cli):
    """The fused folder (bottle, carpet, screw) with class nut added after the fuse."""
    folder = copy_artifacts(fused_artifacts, tmp_path_factory.mktemp("partial") / "a")
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--dynamic-batch",
                         "--classes", "nut", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert "the fused model holds bottle, carpet, screw but not nut" in result.output
    return folder


def test_partial_fused_model_class_all_is_one_line_naming_fuse(partial, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "part.png")
    proc = run_cli("predict", "--artifacts", str(partial), "--model", "fused", "--backend", "cpu", "--class", "all",
                   "--out", str(tmp_path / "out"), str(tmp_path / "part.png"))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "holds bottle, carpet, screw but not nut" in line and f"`anoclip fuse --artifacts {partial}`" in line
    assert not (tmp_path / "out" / "results.jsonl").exists()
    proc = run_cli("predict", "--artifacts", str(partial), "--model", "fused", "--backend", "cpu", "--class", "nut",
                   "--out", str(tmp_path / "out"), str(tmp_path / "part.png"))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "'nut' is not in the fused model" in line
    assert f"`anoclip fuse --artifacts {partial} --classes bottle,carpet,screw,nut`" in line


def test_partial_fused_model_scores_the_classes_it_holds(partial):
    detector = Detector.load(partial, backend="cpu", model="fused")
    assert detector.classes == ["bottle", "carpet", "screw"]
    result = detector.predict(np.zeros((32, 32, 3), np.uint8), ["screw", "bottle"])
    assert list(result.per_class) == ["screw", "bottle"]
    with pytest.raises(ArtifactError, match=r"not nut .*`anoclip fuse --artifacts"):
        detector.predict(np.zeros((32, 32, 3), np.uint8), "all")
    with pytest.raises(UnknownClassError, match="'nope' is not in the prompt weights"):  # not the fuse command
        detector.resolve_classes(["bottle", "nope"])
