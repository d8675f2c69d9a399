"""A hostile or careless user: the artifact folder as a trust boundary, hostile images, concurrent
and repeated runs, interrupted exports. Each case ends in one `error:` line and a nonzero exit, or
in a result that is not lost."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from anoclip.runtime import integrity
from anoclip.runtime.artifacts import load_artifacts, read_manifest, write_manifest
from anoclip.runtime.errors import ArtifactError
from anoclip.runtime.integrity import sha256_file
from anoclip.runtime.prompt_weights import ClassPrompts, PromptBank, read_prompts, write_prompts

from conftest import TINY_CONFIG, artifact_file, copy_artifacts, export_subprocess, one_error_line, run_cli


def write_pngs(folder: Path, names: list[str], size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for name in names:
        path = folder / name
        cv2.imwrite(str(path), rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def predict(folder: Path, *args: str, cls: str = "bottle") -> subprocess.CompletedProcess:
    return run_cli("predict", "--artifacts", str(folder), "--class", cls, *args)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture
def folder(tiny_artifacts, tmp_path) -> Path:
    return copy_artifacts(tiny_artifacts, tmp_path / "artifacts")


@pytest.fixture
def image(tmp_path) -> Path:
    return write_pngs(tmp_path / "imgs", ["one.png"])[0]


def edit_manifest(folder: Path, **changes) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    data.update(changes)
    (folder / "manifest.json").write_text(json.dumps(data))


def rewrite_prompts(folder: Path, bank: PromptBank) -> None:
    """Write changed prompt weights and record their hash, as a forger with write access would."""
    path = artifact_file(folder)
    write_prompts(path, bank)
    manifest = read_manifest(folder)
    manifest.files[path.name] = sha256_file(path)
    write_manifest(folder, manifest)


# ------------------------------------------------------------------------------------------------
# the folder is the trust boundary


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_manifest_naming_a_file_outside_the_folder_is_refused(folder, image, tmp_path, where):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    visual = artifact_file(folder, "visual")
    (outside / "visual.onnx").write_bytes(visual.read_bytes())
    name = "../elsewhere/visual.onnx" if where == "parent" else str(outside / "visual.onnx")
    data = json.loads((folder / "manifest.json").read_text())
    data["models"]["visual"]["file"] = name
    data["files"][name] = data["files"][visual.name]
    (folder / "manifest.json").write_text(json.dumps(data))
    proc = predict(folder, "--out", str(tmp_path / "out"), str(image))
    assert proc.returncode == 1
    assert "not a file inside" in one_error_line(proc.stderr)
    assert not (tmp_path / "out").exists()


def test_symlink_leaving_the_folder_is_refused(folder, image, tmp_path):
    visual = artifact_file(folder, "visual")
    outside = tmp_path / "outside.onnx"
    visual.rename(outside)
    visual.symlink_to(outside)
    proc = predict(folder, "--out", str(tmp_path / "out"), str(image))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "is a link to" in line and "outside the artifact folder" in line


def external_copy(folder: Path, location: str) -> tuple[Path, Path]:
    """Re-save the visual graph with its weights in an external-data file named ``location``."""
    import onnx

    visual = artifact_file(folder, "visual")
    model = onnx.load(str(visual))
    onnx.save_model(model, str(visual), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)  # shape tensors stay inline, as ORT needs
    return visual, folder / location


def test_external_data_files_are_hashed(folder, image, tmp_path):
    visual, data = external_copy(folder, "visual.weights")
    manifest = read_manifest(folder)
    manifest.files[visual.name] = sha256_file(visual)
    write_manifest(folder, manifest)
    # not listed in the manifest
    proc = predict(folder, "--out", str(tmp_path / "o1"), str(image))
    assert proc.returncode == 1 and "does not list" in one_error_line(proc.stderr)
    # listed: it loads and runs
    manifest.files["visual.weights"] = sha256_file(data)
    write_manifest(folder, manifest)
    assert predict(folder, "--out", str(tmp_path / "o2"), str(image)).returncode == 0
    # changed behind the manifest's back
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    proc = predict(folder, "--out", str(tmp_path / "o3"), str(image))
    assert proc.returncode == 1 and "visual.weights does not match the sha256" in one_error_line(proc.stderr)


def test_external_data_outside_the_folder_is_refused(folder, image, tmp_path):
    (tmp_path / "stolen").mkdir()
    visual, data = external_copy(folder, "aaaaaaaaaaa.bin")  # onnx refuses to write "..": edit the bytes
    data.rename(tmp_path / "stolen" / "w.bin")
    visual.write_bytes(visual.read_bytes().replace(b"aaaaaaaaaaa.bin", b"../stolen/w.bin"))
    manifest = read_manifest(folder)
    manifest.files[visual.name] = sha256_file(visual)
    write_manifest(folder, manifest)
    proc = predict(folder, "--out", str(tmp_path / "o"), str(image))
    assert proc.returncode == 1 and "not a file inside" in one_error_line(proc.stderr)


def test_external_data_scan_agrees_with_onnx(folder, tmp_path):
    """Tensors in the graph and in node attributes (Constant), as onnx itself lists them."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    path = artifact_file(folder, "tta")
    model = onnx.load(str(path))
    onnx.save_model(model, str(tmp_path / "t.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    model = onnx.load(str(tmp_path / "t.onnx"), load_external_data=False)
    expected = sorted({e.value for t in _get_all_tensors(model) if uses_external_data(t)
                       for e in t.external_data if e.key == "location"})
    assert len(expected) > 5
    assert integrity.onnx_external_files(tmp_path / "t.onnx") == expected
    assert integrity.onnx_external_files(artifact_file(folder, "visual")) == []


def test_unchanged_files_are_not_hashed_again(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOCLIP_CACHE_DIR", str(tmp_path / "cache"))
    load_artifacts(folder)  # hashes and remembers
    record = json.loads((tmp_path / "cache" / "verified.json").read_text())
    assert str(artifact_file(folder, "visual").resolve()) in record
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700

    def no_hashing(path, *args):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(integrity, "sha256_file", no_hashing)
    load_artifacts(folder)  # nothing hashed
    monkeypatch.undo()
    monkeypatch.setenv("ANOCLIP_CACHE_DIR", str(tmp_path / "cache"))
    # same size, old mtime put back: the ctime still tells, and the change is caught
    prompts = artifact_file(folder)
    stat = prompts.stat()
    raw = bytearray(prompts.read_bytes())
    raw[-1] ^= 0x01
    prompts.write_bytes(bytes(raw))
    os.utime(prompts, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_artifacts(folder)


def test_verification_record_others_can_write_is_ignored(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ANOCLIP_CACHE_DIR", str(cache))
    load_artifacts(folder)
    (cache / "verified.json").chmod(0o666)
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path, *a: calls.append(path) or real(path, *a))
    load_artifacts(folder)
    assert len(calls) >= 2  # model and prompts hashed again


# ------------------------------------------------------------------------------------------------
# hostile images


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A real greyscale PNG of ``width`` x ``height`` zeros: about 1 kB per megapixel compressed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    compress = zlib.compressobj(9)
    row = bytes(width + 1)
    data = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(folder, image, tmp_path, monkeypatch):
    bomb = png_claiming(tmp_path / "bomb.png", 12000, 12000)
    assert bomb.stat().st_size < 1_000_000
    from anoclip.runtime import preprocess

    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded"))
    with pytest.raises(preprocess.ImageError, match="12000 x 12000 pixels, above the limit of 67108864"):
        preprocess.read_image(bomb)
    monkeypatch.undo()
    proc = predict(folder, "--out", str(tmp_path / "o"), str(bomb), str(image))
    assert proc.returncode == 3
    assert "above the limit" in proc.stderr and "--max-pixels" in proc.stderr
    assert [Path(r["source"]).name for r in records(tmp_path / "o")] == ["one.png"]


def test_max_pixels_option_sets_the_limit(folder, image, tmp_path):
    proc = predict(folder, "--max-pixels", "1000", "--out", str(tmp_path / "o"), str(image))
    assert proc.returncode == 3 and "32 x 32 pixels, above the limit of 1000" in proc.stderr


def test_outputs_of_giant_frames_are_bounded(folder, tmp_path):
    big = write_pngs(tmp_path / "imgs", ["big.png"], size=200)[0]
    proc = predict(folder, "--max-output-pixels", "2500", "--out", str(tmp_path / "o"), str(big))
    assert proc.returncode == 0, proc.stderr
    record = records(tmp_path / "o")[0]
    assert record["map_shape"] == [50, 50]
    assert np.load(record["map"]).shape == (50, 50) and cv2.imread(record["overlay"]).shape == (50, 50, 3)


# ------------------------------------------------------------------------------------------------
# concurrent and repeated runs, names


def test_two_concurrent_predict_runs_keep_every_record(folder, tmp_path):
    names = [f"img{i:02d}.png" for i in range(50)]
    first = write_pngs(tmp_path / "a", names)
    second = write_pngs(tmp_path / "b", names)
    out = tmp_path / "shared"
    cmd = [sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "predict", "--artifacts", str(folder),
           "--class", "bottle", "--out", str(out)]
    runs = [subprocess.Popen([*cmd, str(tmp_path / d)], stderr=subprocess.PIPE, text=True) for d in ("a", "b")]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 100
    got = [json.loads(line) for line in lines]  # every line parses
    assert sorted(r["source"] for r in got) == sorted(str(p) for p in first + second)
    assert len({r["run"] for r in got}) == 2
    # a/img00.png and b/img00.png share a name; each run's maps are its own, none overwritten
    assert len({r["map"] for r in got}) == 100 and all(Path(r["map"]).is_file() for r in got)


def test_rerun_appends_instead_of_truncating(folder, image, tmp_path):
    out = tmp_path / "o"
    for _ in range(2):
        proc = predict(folder, "--out", str(out), str(image))
        assert proc.returncode == 0 and "appended" in proc.stderr
    got = records(out)
    assert len(got) == 2 and got[0]["run"] != got[1]["run"]
    assert got[0]["map"] != got[1]["map"] and all(Path(r["map"]).is_file() for r in got)


def test_killed_run_leaves_no_line_that_swallows_the_next(folder, image, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.jsonl").write_text('{"image": "half-writ')  # a run killed mid-line
    assert predict(folder, "--out", str(out), str(image)).returncode == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[0] == '{"image": "half-writ' and json.loads(lines[1])["source"] == str(image)


def test_symlinked_results_file_is_refused(folder, image, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.jsonl").symlink_to(victim)
    proc = predict(folder, "--out", str(out), str(image))
    assert proc.returncode == 1
    assert "is a symbolic link" in one_error_line(proc.stderr)
    assert victim.read_text() == "precious\n"


def test_out_inside_the_input_folder_is_not_read_back(folder, tmp_path):
    inputs = tmp_path / "imgs"
    write_pngs(inputs, ["a.png", "b.png"])
    for _ in range(2):
        assert predict(folder, "--out", str(inputs / "preds"), str(inputs)).returncode == 0
    assert sorted(Path(r["source"]).name for r in records(inputs / "preds")) == ["a.png", "a.png", "b.png", "b.png"]


def test_out_equal_to_the_input_folder_is_one_line(folder, tmp_path):
    inputs = tmp_path / "imgs"
    write_pngs(inputs, ["a.png"])
    proc = predict(folder, "--out", str(inputs), str(inputs))
    assert proc.returncode == 1
    assert "is the input folder" in one_error_line(proc.stderr)
    assert sorted(p.name for p in inputs.iterdir()) == ["a.png"]


def test_name_collisions_get_unique_outputs(folder, tmp_path):
    inputs = tmp_path / "imgs"
    write_pngs(inputs, ["a.png", "a.jpg", "a_1.png", "A.PNG"])
    proc = predict(folder, "--out", str(tmp_path / "o"), str(inputs))
    assert proc.returncode == 0, proc.stderr
    got = records(tmp_path / "o")
    assert len(got) == 4
    maps = {r["map"].lower() for r in got}
    overlays = {r["overlay"].lower() for r in got}
    assert len(maps) == 4 and len(overlays) == 4  # distinct even on a case-insensitive file system
    assert all(Path(r["map"]).is_file() for r in got)


# ------------------------------------------------------------------------------------------------
# one line instead of a traceback


def test_unwritable_out_is_one_line_in_predict(folder, image, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = predict(folder, "--out", str(blocker / "out"), str(image))
    assert proc.returncode == 1 and "cannot create --out" in one_error_line(proc.stderr)


def test_unwritable_out_is_one_line_in_export(tmp_path):
    pytest.importorskip("open_clip")
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = export_subprocess("--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                             "--out", str(blocker / "out"))
    assert proc.returncode == 1 and "cannot create --out" in one_error_line(proc.stderr)


def test_unwritable_out_is_one_line_in_eval(folder, tmp_path):
    from anoclip.benchmarks.accuracy.datasets import make_mvtec_like

    root = make_mvtec_like(tmp_path / "mvtec", classes=("bottle",), n_good=1, n_defect=1, size=32, seed=0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("eval", "--artifacts", str(folder), "--dataset", "mvtec", "--root", str(root),
                   "--out", str(blocker / "out"))
    assert proc.returncode == 1 and "cannot create --out" in one_error_line(proc.stderr)


def test_unwritable_markdown_is_one_line_in_bench(folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("bench", "--artifacts", str(folder), "--runs", "3", "--markdown", str(blocker / "t.md"))
    assert proc.returncode == 1 and "--markdown folder" in one_error_line(proc.stderr)


@pytest.mark.parametrize("content, expected", [
    (b"[]", "is a JSON list, not an object"),
    (b'{"format_version": 2, "models": []}', "malformed"),
    (None, "image_size must be 2 positive integers"),
    (b'{"format_version": 2, "backbone": "x", "surprise": 1}', "unknown fields"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{", "not valid JSON"),
])
def test_manifest_of_the_wrong_shape_is_one_line(folder, image, tmp_path, content, expected):
    if content is None:
        edit_manifest(folder, image_size="abc")
    else:
        (folder / "manifest.json").write_bytes(content)
    proc = predict(folder, "--out", str(tmp_path / "o"), str(image))
    assert proc.returncode == 1
    assert expected in one_error_line(proc.stderr)


@pytest.mark.parametrize("key, value, expected", [
    ("classes", "{not json", "malformed metadata"),
    ("embed_dim", "wide", "malformed metadata"),
])
def test_prompt_weights_with_bad_metadata_are_one_line(folder, image, tmp_path, key, value, expected):
    from safetensors.numpy import save

    path = artifact_file(folder)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    metadata[key] = value
    path.write_bytes(save(tensors, metadata=metadata))
    manifest = read_manifest(folder)
    manifest.files[path.name] = sha256_file(path)
    write_manifest(folder, manifest)
    proc = predict(folder, "--out", str(tmp_path / "o"), str(image))
    assert proc.returncode == 1 and expected in one_error_line(proc.stderr)


def test_prompt_weights_of_the_wrong_width_are_one_line(folder, image, tmp_path):
    bank = read_prompts(artifact_file(folder))
    wide = {n: ClassPrompts(n, np.eye(2, bank.embed_dim + 1, dtype=np.float32),
                            np.eye(4, bank.embed_dim + 1, dtype=np.float32)) for n in bank.classes}
    path = artifact_file(folder)
    from safetensors.numpy import save

    tensors = {f"{k}/{n}": getattr(c, k) for n, c in wide.items() for k in ("text_features", "prompt_features")}
    path.write_bytes(save(tensors, metadata={**bank.metadata}))
    manifest = read_manifest(folder)
    manifest.files[path.name] = sha256_file(path)
    write_manifest(folder, manifest)
    proc = predict(folder, "--out", str(tmp_path / "o"), str(image))
    assert proc.returncode == 1
    assert f"not [2, {bank.embed_dim}]" in one_error_line(proc.stderr)


@pytest.mark.parametrize("damage, expected", [
    ("nan", "NaN or infinite"),
    ("scale", "not unit vectors"),
])
def test_prompt_weights_holding_nan_or_unnormalised_rows_are_refused(folder, image, tmp_path, damage, expected):
    bank = read_prompts(artifact_file(folder))
    tf = bank.classes["bottle"].text_features.copy()
    if damage == "nan":
        tf[0, 0] = np.nan
    else:
        tf *= 3.0
    bank.classes["bottle"].text_features = tf
    path = artifact_file(folder)
    from safetensors.numpy import save  # write_prompts itself refuses such tensors

    tensors = {f"{k}/{n}": getattr(c, k) for n, c in bank.classes.items() for k in ("text_features", "prompt_features")}
    path.write_bytes(save(tensors, metadata=bank.metadata))
    manifest = read_manifest(folder)
    manifest.files[path.name] = sha256_file(path)
    write_manifest(folder, manifest)
    proc = predict(folder, "--out", str(tmp_path / "o"), str(image))
    assert proc.returncode == 1 and expected in one_error_line(proc.stderr)
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_tta_graph_with_other_steps_is_one_line(folder, image, tmp_path):
    proc = predict(folder, "--tta", "--tta-backend", "onnx", "--tta-steps", "3", "--out", str(tmp_path / "o"),
                   str(image))
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert "steps=5" in line and "--tta-steps 3" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# exports that never lose what was there


def export(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``anoclip-export`` as its entry point runs it (one error line, exit code), in this process:
    the tests' exports skip a fresh interpreter and torch import each."""
    pytest.importorskip("open_clip")
    from click.testing import CliRunner

    from anoclip.export.cli import export_command
    from anoclip.runtime.plumbing import run_guarded

    argv = ["anoclip-export", "--model-config", str(TINY_CONFIG), "--pretrained", "none", "--out", str(folder), *args]
    saved, sys.argv = sys.argv, argv
    try:
        with CliRunner().isolation() as (out, err, *_):
            try:
                run_guarded(export_command)
            except SystemExit as exc:
                code = exc.code or 0
            stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
    finally:
        sys.argv = saved
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


def classes(folder: Path) -> list[str]:
    return sorted(load_artifacts(folder).prompts.classes)


def owned_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")


def test_changed_visual_flag_keeps_the_classes(folder, tiny_artifacts):
    before = read_prompts(artifact_file(tiny_artifacts)).get("bottle")
    proc = export(folder, "--dynamic-batch", "--classes", "hazelnut")
    assert proc.returncode == 0, proc.stderr
    assert classes(folder) == ["bottle", "carpet", "hazelnut"]
    assert read_manifest(folder).models["visual"].inputs["image"][0] == -1
    after = read_prompts(artifact_file(folder)).get("bottle")
    np.testing.assert_array_equal(after.prompt_features, before.prompt_features)
    # the old graph is gone, the TTA graph is kept; nothing unreferenced is left
    manifest = read_manifest(folder)
    assert owned_files(folder) == sorted(set(manifest.files))
    assert "tta" in manifest.models


def test_force_keeps_the_classes(folder):
    proc = export(folder, "--force")
    assert proc.returncode == 0, proc.stderr
    assert classes(folder) == ["bottle", "carpet"]


def test_other_weights_re_encode_the_classes(folder, tiny_artifacts):
    proc = export(folder, "--seed", "1", "--force")
    assert proc.returncode == 0, proc.stderr
    assert classes(folder) == ["bottle", "carpet"]
    old = read_prompts(artifact_file(tiny_artifacts)).get("carpet").text_features
    new = read_prompts(artifact_file(folder)).get("carpet").text_features
    assert not np.allclose(old, new)  # encoded again by the other text tower


def test_classes_are_dropped_only_when_asked(folder):
    proc = export(folder, "--drop-classes", "carpet")
    assert proc.returncode == 0, proc.stderr
    assert classes(folder) == ["bottle"]
    proc = export(folder, "--drop-classes", "zebra")
    assert proc.returncode == 1 and "--drop-classes zebra: no such class" in one_error_line(proc.stderr)
    proc = export(folder, "--replace-classes", "--classes", "screw")
    assert proc.returncode == 0, proc.stderr
    assert classes(folder) == ["screw"]


def test_export_rerun_changes_nothing(folder):
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    proc = export(folder, "--classes", "bottle", "--qkv-tokens", "model")
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_export_without_classes_leaves_no_folder(tmp_path):
    proc = export(tmp_path / "new")
    assert proc.returncode == 1 and "no classes given" in one_error_line(proc.stderr)
    assert not (tmp_path / "new").exists()


def test_concurrent_export_is_one_line(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = export(folder, "--classes", "screw")
    finally:
        os.close(fd)
    assert proc.returncode == 1 and "another anoclip process is writing" in one_error_line(proc.stderr)


def test_format_1_folder_loads_and_is_upgraded(folder, image, tmp_path):
    manifest = read_manifest(folder)
    renames = {}
    for name, entry in manifest.models.items():
        renames[entry.file] = f"{name}.onnx"
        entry.file = f"{name}.onnx"
    renames[manifest.prompts] = "prompts.safetensors"
    for old_name, new_name in renames.items():
        (folder / old_name).rename(folder / new_name)
    manifest.files = {renames[k]: v for k, v in manifest.files.items()}
    data = json.loads(manifest.to_json())
    del data["prompts"], data["checkpoint_sha256"]
    data["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(data))
    assert predict(folder, "--out", str(tmp_path / "o"), str(image)).returncode == 0
    proc = export(folder, "--classes", "hazelnut", "--qkv-tokens", "model")
    assert proc.returncode == 0, proc.stderr
    upgraded = read_manifest(folder)
    assert upgraded.format_version == 2 and upgraded.models["visual"].file == "visual.onnx"
    assert classes(folder) == ["bottle", "carpet", "hazelnut"]
    assert not (folder / "prompts.safetensors").exists()
