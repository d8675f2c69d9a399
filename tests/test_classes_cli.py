"""`anoclip classes add|list|remove` on the device: the exported text tower and the runtime's
tokenizer encode a class as `anoclip-export --classes` does with PyTorch.

Tolerance 1e-5: the same text-tower weights in onnxruntime instead of PyTorch (the export checks
the graph against PyTorch at 1e-5; measured about 1e-6 on the tiny model), then the same
normalise-and-average of the ensemble in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG, artifact_file, one_error_line, run_cli
from test_runtime_without_torch import run_blocked

from anoclip.runtime.artifacts import read_manifest
from anoclip.runtime.prompt_weights import read_prompts

TOL = 1e-5


@pytest.fixture(scope="module")
def with_text(export_cli, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text") / "a"
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                         "--text-tower", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exported_screw(export_cli, tmp_path_factory) -> Path:
    """The same weights with screw and a custom-domain class encoded by the export (PyTorch)."""
    out = tmp_path_factory.mktemp("text") / "b"
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes",
                         "bottle,screw,weld", "--domain", "weld=x-ray image|radiograph", "--defect-types",
                         "weld=crack,pore", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_classes_add_without_torch_equals_the_export(with_text, exported_screw, tmp_path):
    import shutil

    folder = Path(shutil.copytree(with_text, tmp_path / "a"))
    proc = run_blocked(
        """
        import sys
        from anoclip.runtime.cli import main
        folder = sys.argv[1]
        for args in (["screw"], ["weld", "--domain", "x-ray image|radiograph", "--defect-types", "crack,pore"]):
            sys.argv = ["anoclip", "classes", "add", *args, "--artifacts", folder]
            try:
                main()
            except SystemExit as exc:
                assert not exc.code, exc.code
        leaked = [m for m in sys.modules if m.split(".")[0] in Block.blocked]
        assert not leaked, leaked
        """, str(folder))
    assert proc.returncode == 0, proc.stderr
    mine = read_prompts(artifact_file(folder)).classes
    theirs = read_prompts(artifact_file(exported_screw)).classes
    worst = 0.0
    for name in ("screw", "weld"):
        for array in ("text_features", "prompt_features"):
            worst = max(worst, float(np.abs(getattr(mine[name], array) - getattr(theirs[name], array)).max()))
        assert mine[name].recipe["domain_phrases"] == theirs[name].recipe["domain_phrases"]
    assert mine["weld"].defect_types == theirs["weld"].defect_types == ("crack", "pore")
    assert mine["screw"].type_features is None and theirs["screw"].type_features is None
    types = float(np.abs(mine["weld"].type_features - theirs["weld"].type_features).max())
    print(f"classes add (onnxruntime, no torch) against anoclip-export (PyTorch): max abs diff {worst:.2e}, "
          f"defect types {types:.2e}")
    assert worst <= TOL and types <= TOL
    assert np.array_equal(mine["bottle"].text_features, read_prompts(artifact_file(with_text)).classes["bottle"]
                          .text_features)  # the other class as it was


def test_list_and_remove(with_text, tmp_path):
    import shutil

    folder = Path(shutil.copytree(with_text, tmp_path / "a"))
    assert run_cli("classes", "add", "screw", "--artifacts", str(folder)).returncode == 0
    proc = run_cli("classes", "list", "--artifacts", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["class"]: row for row in json.loads(proc.stdout)}
    assert set(rows) == {"bottle", "screw"} and rows["screw"]["sentences"] == 924
    assert rows["screw"]["thresholds"] is None and rows["screw"]["memory_rows"] is None
    proc = run_cli("classes", "remove", "screw", "--artifacts", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert set(read_prompts(artifact_file(folder)).classes) == {"bottle"}
    history = read_manifest(folder).history
    assert "anoclip classes add screw" in history[-2] and "anoclip classes remove screw" in history[-1]


def test_defect_types_replace_and_list(with_text, tmp_path):
    import shutil

    folder = Path(shutil.copytree(with_text, tmp_path / "a"))
    before = read_prompts(artifact_file(folder)).classes["bottle"]
    proc = run_cli("classes", "add", "bottle", "--defect-types", "scratch, dent,stain", "--replace",
                   "--artifacts", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert "3 defect types (scratch, dent, stain)" in proc.stderr
    bottle = read_prompts(artifact_file(folder)).classes["bottle"]
    assert bottle.defect_types == ("scratch", "dent", "stain") and bottle.type_features.shape[0] == 3
    assert np.allclose(np.linalg.norm(bottle.type_features, axis=1), 1.0, atol=1e-6)
    assert len({tuple(np.round(r, 6)) for r in bottle.type_features}) == 3  # one embedding per type
    assert np.allclose(bottle.text_features, before.text_features, atol=TOL)  # the prompts as they were
    proc = run_cli("classes", "list", "--artifacts", str(folder), "--json")
    assert json.loads(proc.stdout)[0]["defect_types"] == ["scratch", "dent", "stain"]
    proc = run_cli("classes", "list", "--artifacts", str(folder))
    assert "defect types scratch, dent, stain" in proc.stdout
    assert run_cli("classes", "add", "screw", "--artifacts", str(folder)).returncode == 0  # the types are kept
    assert read_prompts(artifact_file(folder)).classes["bottle"].defect_types == ("scratch", "dent", "stain")
    import cv2  # predict names the regions: a pixel threshold of 0 makes the whole image one region

    cv2.imwrite(str(tmp_path / "part.png"), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    proc = run_cli("predict", "--artifacts", str(folder), "--backend", "cpu", "--class", "bottle", "--out",
                   str(tmp_path / "out"), "--pixel-threshold", "0", str(tmp_path / "part.png"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    assert [r["box"] for r in record["regions"]] == [[0, 0, 64, 64]] and record["regions"][0]["type"] in \
        ("scratch", "dent", "stain") and -1 <= record["regions"][0]["type_similarity"] <= 1
    assert Path(record["overlay"]).is_file()
    proc = run_cli("classes", "add", "nut", "--defect-types", "a,,b", "--artifacts", str(folder))
    assert proc.returncode == 1 and "empty name" in one_error_line(proc.stderr)


def test_bad_input_is_one_line_and_writes_nothing(with_text, export_cli, tmp_path):
    import shutil

    folder = Path(shutil.copytree(with_text, tmp_path / "a"))
    before = read_manifest(folder)
    long_phrase = " ".join(["verylongword"] * 30)
    for args, said in (([" "], "empty"), (["x" * 65], "more than 64"), (["a/b"], "'/'"),
                       (["bottle"], "--replace encodes it again"), (["&nbsp;"], "tokenizes to nothing"),
                       (["x", "--phrase", long_phrase], "it would be cut")):
        proc = run_cli("classes", "add", *args, "--artifacts", str(folder))
        assert proc.returncode == 1 and said in one_error_line(proc.stderr), (args, proc.stderr)
    proc = run_cli("classes", "remove", "nope", "--artifacts", str(folder))
    assert proc.returncode == 1 and "class 'nope'" in one_error_line(proc.stderr)
    proc = run_cli("classes", "remove", "bottle", "--artifacts", str(folder))
    assert proc.returncode == 1 and "only class" in one_error_line(proc.stderr)
    assert read_manifest(folder) == before
    plain = tmp_path / "plain"
    assert export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                       "--out", str(plain)]).exit_code == 0
    proc = run_cli("classes", "add", "screw", "--artifacts", str(plain))
    assert proc.returncode == 1 and "anoclip-export --text-tower --out" in one_error_line(proc.stderr)


def test_classes_add_on_openvino_equals_the_export(with_text, exported_screw, tmp_path):
    import shutil

    pytest.importorskip("openvino", reason="the openvino text encoder needs OpenVINO (`pip install 'anoclip[openvino]'`)")
    folder = Path(shutil.copytree(with_text, tmp_path / "a"))
    proc = run_cli("classes", "add", "screw", "--backend", "openvino", "--artifacts", str(folder))
    assert proc.returncode == 0, proc.stderr
    mine, theirs = read_prompts(artifact_file(folder)).classes["screw"], read_prompts(artifact_file(exported_screw)).classes["screw"]
    worst = max(float(np.abs(mine.text_features - theirs.text_features).max()),
                float(np.abs(mine.prompt_features - theirs.prompt_features).max()))
    print(f"classes add --backend openvino against anoclip-export (PyTorch): max abs diff {worst:.2e}")
    assert worst <= TOL
    assert mine.recipe["encoded_by"] == "anoclip classes add (OpenVINO)" and mine.recipe["created"]
    rows = {r["class"]: r for r in json.loads(run_cli("classes", "list", "--artifacts", str(folder), "--json").stdout)}
    assert rows["screw"]["encoded_by"] == "anoclip classes add (OpenVINO)"
    assert rows["bottle"]["encoded_by"] == "anoclip-export (PyTorch)"
