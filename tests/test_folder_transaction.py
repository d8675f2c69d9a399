"""The artifact folder's one transaction, seen from every writer.

A folder holding every kind of file (visual, visual_qkv, tta, prompts, int8, fp16, fused,
thresholds, the memory of normal frames, the text tower with its vocabulary and recipe, TensorRT
engines of the fp32 and int8 models) is written by each writer in turn; what the
writer keeps, replaces, drops (with a line naming the command that remakes it) or marks stale is
asserted for every file kind. Engines are stored with placeholder plan bytes through
``store_engine``, the commit half of ``anoclip build-engine`` (building needs TensorRT): what is
tested here is files and manifest, not TensorRT.

Then each writer (one export: all exports commit the same way) is killed (SIGKILL) at three points
of its commit: after its first file is placed, with the new manifest written but not yet renamed
over the old one, and after the commit before pruning. The folder loads afterwards, verified, with
the old state or the new one.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TINY_CONFIG, copy_artifacts

KINDS = ("visual", "visual_qkv", "tta", "prompts", "visual_int8", "visual_fp16", "fused", "thresholds", "memory",
         "text", "text_vocabulary", "text_recipe", "engine fp32", "engine int8")


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    import cv2

    folder = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(3)
    for i in range(16):
        base = cv2.resize(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), (96, 80), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"f{i:02d}.png"), np.clip(base.astype(int) + rng.integers(-9, 9, base.shape), 0, 255)
                    .astype(np.uint8))
    return folder


def anoclip(*args: str):
    from anoclip.runtime.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def placeholder_engine(folder: Path, precision: str, model: str, payload: bytes) -> list[str]:
    """Store placeholder plan bytes as the ``precision`` engine built from ``model`` (the commit
    half of build-engine)."""
    from anoclip.calibration.engine import store_engine
    from anoclip.runtime.artifacts import content_addressed, read_manifest
    from anoclip.runtime.engine import GPU, BatchProfile, EngineSidecar, engine_base_name

    manifest = read_manifest(folder)
    source = manifest.models[model].file
    sha = hashlib.sha256(payload).hexdigest()
    record = EngineSidecar(
        engine=content_addressed(engine_base_name(precision), sha), engine_sha256=sha, precision=precision,
        source_model=model, source_file=source, source_sha256=manifest.files[source], tensorrt_version="10.3.0.30",
        gpu_name="Orin", compute_capability="8.7", strongly_typed=True, input_name="image",
        input_shape=list(manifest.models[model].inputs["image"]), profile=BatchProfile(1, 1, 1), workspace_bytes=0,
        built="2026-12-07T00:00:00Z", command="placeholder", parity={})
    return store_engine(folder, payload, record, GPU("Orin", "8.7"), f"build-engine --precision {precision}")


@pytest.fixture(scope="module")
def full(tiny_artifacts, frames, tmp_path_factory) -> Path:
    folder = copy_artifacts(tiny_artifacts, tmp_path_factory.mktemp("full") / "a")
    result = export(folder, "--text-tower")
    assert result.exit_code == 0, result.output
    steps = [("calibrate", "int8", "--artifacts", folder, "--images", frames, "--n", "8", "--parity-frames", "2"),
             ("calibrate", "fp16", "--artifacts", folder, "--parity-frames", "2"),
             ("calibrate", "memory", "--artifacts", folder, "--class", "bottle", "--normal", frames),
             ("fuse", "--artifacts", folder, "--classes", "bottle,carpet"),
             ("calibrate", "threshold", "--artifacts", folder, "--class", "bottle", "--normal", frames)]
    for args in steps:
        result = anoclip(*args)
        assert result.exit_code == 0, result.output
    placeholder_engine(folder, "fp32", "visual", b"placeholder fp32 plan")
    placeholder_engine(folder, "int8", "visual_int8", b"placeholder int8 plan")
    return folder


def kinds_of(folder: Path) -> dict[str, str]:
    """File kind -> the file the manifest names for it."""
    from anoclip.runtime.artifacts import read_manifest

    manifest = read_manifest(folder)
    found = {name: entry.file for name, entry in manifest.models.items()}
    found["prompts"] = manifest.prompts
    if manifest.thresholds:
        found["thresholds"] = manifest.thresholds
    if manifest.memory:
        found["memory"] = manifest.memory
    if manifest.text_vocabulary:
        found["text_vocabulary"] = manifest.text_vocabulary
    if manifest.text_recipe:
        found["text_recipe"] = manifest.text_recipe
    for name in manifest.files:
        if name.endswith(".engine"):
            found[f"engine {name.split('.')[0].removeprefix('visual_')}"] = name
    return found


# Each writer, as a user runs it; the engine writer is store_engine with a placeholder plan.
WRITERS = {
    "export +class": lambda f, frames: export(f, "--classes", "screw"),
    "export new visual": lambda f, frames: export(f, "--classes", "bottle", "--vv-blocks", "1"),
    "calibrate int8": lambda f, frames: anoclip("calibrate", "int8", "--artifacts", f, "--images", frames, "--n", "12",
                                                "--parity-frames", "2"),
    "calibrate fp16": lambda f, frames: anoclip("calibrate", "fp16", "--artifacts", f, "--parity-frames", "2"),
    "calibrate threshold": lambda f, frames: anoclip("calibrate", "threshold", "--artifacts", f, "--class", "carpet",
                                                     "--normal", frames),
    "calibrate memory": lambda f, frames: anoclip("calibrate", "memory", "--artifacts", f, "--class", "carpet",
                                                  "--normal", frames, "--max-patches", "64"),
    "build-engine fp16": lambda f, frames: placeholder_engine(f, "fp16", "visual_fp16", b"placeholder fp16 plan"),
    "fuse": lambda f, frames: anoclip("fuse", "--artifacts", f, "--classes", "bottle"),
    "classes add": lambda f, frames: anoclip("classes", "add", "screw", "--artifacts", f),
    "classes remove": lambda f, frames: anoclip("classes", "remove", "bottle", "--artifacts", f),
}

# What each writer does to each kind: same (kept as it was), new (the writer's own file), dropped
# (with a line naming the command that remakes it), stale (kept, with a line saying why it no longer
# fits), absent (the kind was not there and is not now).
K, N, D, S = "same", "new", "dropped", "stale"
EXPECTED = {
    "export +class": {"prompts": N, "fused": S},
    "export new visual": {"visual": N, "visual_qkv": D, "prompts": N, "visual_int8": D, "visual_fp16": D, "fused": D,
                          "thresholds": S, "memory": D, "engine fp32": D, "engine int8": D},
    "calibrate int8": {"visual_int8": N, "engine int8": D},
    "calibrate fp16": {},  # the fp16 conversion is deterministic: the same file, nothing changes
    "calibrate threshold": {"thresholds": N},
    "calibrate memory": {"memory": N},
    "build-engine fp16": {"engine fp16": N},
    "fuse": {"fused": N},
    "classes add": {"prompts": N, "fused": S},  # the fused graph lacks the new class: partial, said
    "classes remove": {"prompts": N, "fused": D, "thresholds": S},  # bottle was baked and calibrated
}
LINES = {"visual_qkv": "--qkv-tokens model", "visual_int8": "calibrate int8", "visual_fp16": "calibrate fp16", "fused": "anoclip fuse",
         "engine fp32": "build-engine", "engine int8": "build-engine", "thresholds": "calibrate threshold",
         "memory": "calibrate memory"}


def export(folder: Path, *args: str):
    from anoclip.export.cli import export_command

    return CliRunner().invoke(export_command, ["--model-config", str(TINY_CONFIG), "--pretrained", "none",
                                               "--out", str(folder), *args], catch_exceptions=False)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_keeps_drops_or_marks_every_kind(full, frames, tmp_path, writer, caplog):
    pytest.importorskip("open_clip")
    from anoclip.runtime.artifacts import load_artifacts, read_manifest

    folder = copy_artifacts(full, tmp_path / "a")
    before = kinds_of(folder)
    assert set(before) == set(KINDS)
    with caplog.at_level(logging.WARNING):
        result = WRITERS[writer](folder, frames)
    said = (getattr(result, "output", "") or "") + caplog.text
    assert getattr(result, "exit_code", 0) == 0, said
    after = kinds_of(folder)
    got = {}
    for kind in sorted(set(before) | set(after)):
        if kind not in after:
            got[kind] = D
        elif kind not in before or after[kind] != before[kind]:
            got[kind] = N
        elif _stale_line(kind, said):
            got[kind] = S
        else:
            got[kind] = K
    expected = {kind: EXPECTED[writer].get(kind, K) for kind in got}
    assert got == expected, said
    for kind, state in got.items():
        if state == D and kind in LINES:  # a dropped derived file is said, with the command that remakes it
            assert any(kind.split()[-1] in line and LINES[kind] in line for line in said.splitlines()
                       if "dropping" in line), (kind, said)
    manifest = read_manifest(folder)
    on_disk = {p.name for p in folder.iterdir() if p.name != "manifest.json"}
    assert on_disk == set(manifest.files), "unnamed files pruned, named ones present"
    load_artifacts(folder, models=[m for m in manifest.models if m != "tta"])  # everything named verifies


def _stale_line(kind: str, said: str) -> bool:
    if kind == "fused":
        return "the fused model holds" in said
    if kind == "thresholds":
        return "thresholds of" in said and "are stale" in said
    return False


# -- kill -9 at three points of every writer's commit -------------------------------------------

KILL_CHILD = r"""
import os, signal, sys, types
import anoclip.runtime.folder as folder

point, writer, target, frames = sys.argv[1:5]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
def then_die(method):
    def wrapped(*args, **kwargs):
        method(*args, **kwargs)
        die()
    return wrapped
if point == "placed":  # the writer's first file is in the folder, the manifest untouched
    folder.FolderTransaction.add_file = then_die(folder.FolderTransaction.add_file)
    folder.FolderTransaction.add_engine = then_die(folder.FolderTransaction.add_engine)
elif point == "manifest":  # the new manifest written to its temporary file, not yet renamed
    import anoclip.runtime.plumbing as plumbing
    real_replace = os.replace
    def rename_or_die(src, dst, *a, **k):
        if str(dst).endswith("manifest.json"):
            die()
        return real_replace(src, dst, *a, **k)
    plumbing.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    plumbing.os.replace = rename_or_die
elif point == "pruning":  # committed, unnamed files not yet removed
    calls = []
    real_prune = folder.prune
    def prune(*args):
        calls.append(1)
        return die() if len(calls) == 2 else real_prune(*args)
    folder.prune = prune
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[5])))
import test_folder_transaction as t
from pathlib import Path
t.WRITERS[writer](Path(target), Path(frames))
"""


@pytest.fixture(scope="module")
def without_fp16(full, tmp_path_factory) -> Path:
    """The full folder less its fp16 model (and so what `calibrate fp16` writes anew)."""
    from anoclip.runtime.folder import transaction

    folder = copy_artifacts(full, tmp_path_factory.mktemp("without-fp16") / "a")
    with transaction(folder) as tx:
        tx.remove_model("visual_fp16")
        tx.commit("test: fp16 model taken out")
    assert "visual_fp16" not in kinds_of(folder)
    return folder


@pytest.mark.parametrize("writer", ["export new visual", "calibrate int8", "calibrate fp16", "calibrate threshold",
                                    "calibrate memory", "build-engine fp16", "fuse"])  # an export adding a class commits the same way
def test_a_writer_killed_at_any_point_leaves_the_old_or_the_new_folder(full, without_fp16, frames, tmp_path, writer):
    pytest.importorskip("open_clip")
    from anoclip.runtime.artifacts import load_artifacts, read_manifest

    base = without_fp16 if writer == "calibrate fp16" else full
    old = kinds_of(base)
    changed = {"visual_fp16"} if base is without_fp16 else {k for k, state in EXPECTED[writer].items() if state in (N, D)}
    for point in ("placed", "manifest", "pruning"):
        folder = copy_artifacts(base, tmp_path / point)
        proc = subprocess.run([sys.executable, "-c", KILL_CHILD, point, writer, str(folder), str(frames), __file__],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        now = kinds_of(folder)
        if point == "pruning":  # committed: the writer's change is in, the rest as it was
            assert {k for k in set(old) | set(now) if old.get(k) != now.get(k)} == changed, (now, old)
        else:
            assert now == old and read_manifest(folder) == read_manifest(base), point
        manifest = read_manifest(folder)
        load_artifacts(folder, models=[m for m in manifest.models if m != "tta"])  # loads, every file verified
        if point == "placed":  # the next run of the writer completes and clears what the killed one left
            assert {p.name for p in folder.iterdir()} - {"manifest.json"} != set(manifest.files)
            result = WRITERS[writer](folder, frames)
            assert getattr(result, "exit_code", 0) == 0, getattr(result, "output", "")
            assert {p.name for p in folder.iterdir()} - {"manifest.json"} == set(read_manifest(folder).files)
