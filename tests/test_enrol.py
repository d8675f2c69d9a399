"""Self-enrolment on the line: `anoclip stream --enrol` learns the memory of normal frames and the
thresholds from the stream's first frames, then inspects; with `continuous` it keeps refreshing
both from frames that pass, through the folder's transaction.

The clips are plain scenes whose normal frames vary at random (pose, lighting, noise), so that they
are exchangeable, as the enrolled thresholds assume (tests/fakes.py ``write_plain_clip``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import copy_artifacts, one_error_line, run_cli
from fakes import write_plain_clip

from anoclip.runtime.artifacts import load_artifacts, read_manifest


def stream(*args):
    from anoclip.runtime.cli import cli

    return CliRunner().invoke(cli, ["stream", *[str(a) for a in args]], catch_exceptions=False)


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def defect_clip(tmp_path_factory) -> Path:
    return write_plain_clip(tmp_path_factory.mktemp("clips") / "line.avi", 300, defect_from=200)


@pytest.fixture(scope="module")
def drift_clip(tmp_path_factory) -> Path:
    return write_plain_clip(tmp_path_factory.mktemp("clips") / "drift.avi", 1200, drift=0.15)


def test_enrol_then_inspect_finds_the_defect_from_its_first_frame(tiny_artifacts, defect_clip, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    out = tmp_path / "events.jsonl"
    result = stream("--artifacts", folder, "--source", defect_clip, "--class", "bottle", "--enrol", "100",
                    "--enrol-image-margin", "0.01", "--events", out, "--stats-interval", "0")
    assert result.exit_code == 0, result.output
    lines = events(out)
    assert [e["frame"] for e in lines] == list(range(300))
    enrolling = [e for e in lines if e["phase"] == "enrolling"]
    assert [e["frame"] for e in enrolling] == list(range(100))
    assert all(e["anomalous"] is None and e["threshold"] is None for e in enrolling)
    manifest = read_manifest(folder)
    inspecting = lines[100:]
    assert all(e["phase"] == "inspecting" and e["calibration"] == {"memory": manifest.memory,
                                                                    "thresholds": manifest.thresholds}
               for e in inspecting)
    assert all(e["branches"] == ["zero_shot", "memory"] for e in inspecting)
    before = [e["frame"] for e in inspecting if e["frame"] < 200 and e["anomalous"]]
    after = [e["frame"] for e in inspecting if e["frame"] >= 200 and not e["anomalous"]]
    assert before == [] and after == [], (before, after)  # no false alarm before the defect, every defect frame
    artifacts = load_artifacts(folder)  # committed: the folder loads, verified, with both in it
    record = artifacts.thresholds.classes["bottle"]
    assert record.frames == 50 and record.memory == "on"
    assert record.memory_sha256 == artifacts.memory.classes["bottle"].sha256
    assert artifacts.memory.classes["bottle"].provenance["normal"] == ["stream:line.avi"]


def _false_alarms(folder: Path, clip: Path, out: Path, *options) -> tuple[int, int, int]:
    result = stream("--artifacts", folder, "--source", clip, "--class", "bottle", "--enrol-refresh", "0",
                    "--enrol-window", "20", "--enrol-quiet", "2", "--enrol-false-alarm-rate", "0.05", "--events", out,
                    "--stats-interval", "0", *options)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    inspected = [e for e in events(out) if e["phase"] == "inspecting"]
    return sum(bool(e["anomalous"]) for e in inspected), len(inspected), summary["enrolment"]["bottle"]["refreshes"]


def test_continuous_enrolment_follows_a_lighting_drift_a_frozen_memory_does_not(tiny_artifacts, drift_clip, tmp_path,
                                                                                 capsys):
    frozen = _false_alarms(copy_artifacts(tiny_artifacts, tmp_path / "frozen"), drift_clip, tmp_path / "f.jsonl",
                           "--enrol", "60")
    continuous = _false_alarms(copy_artifacts(tiny_artifacts, tmp_path / "continuous"), drift_clip,
                               tmp_path / "c.jsonl", "--enrol", "continuous")
    with capsys.disabled():
        print(f"\nlighting drift +15 % over 1200 frames, stated false-alarm rate 0.05: frozen memory "
              f"{frozen[0]} of {frozen[1]} frames ({frozen[0] / frozen[1]:.3f}); continuous enrolment "
              f"{continuous[0]} of {continuous[1]} ({continuous[0] / continuous[1]:.3f}), {continuous[2]} refreshes")
    assert continuous[2] >= 3
    assert continuous[0] / continuous[1] <= 0.05
    assert frozen[0] / frozen[1] > 0.2


def test_a_frozen_enrolment_never_refreshes(tiny_artifacts, drift_clip, tmp_path):
    from anoclip.runtime.detector import Detector
    from anoclip.runtime.normal_frames import ThresholdSettings
    from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
    from anoclip.runtime.stream.enrol import EnrolSettings, Enrolment

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    detector = Detector.load(folder, backend="cpu")
    pipeline = StreamPipeline(detector, [parse_source(str(drift_clip), detector.classes, "bottle")], [],
                              StreamOptions(stats_interval=0))
    pipeline.enrolment = Enrolment(detector, {pipeline.sources[0].name: "bottle"},
                                   EnrolSettings(40, continuous=True, refresh_s=0, window=20, quiet=2,
                                                 thresholds=ThresholdSettings(false_alarm_rate=0.05)))
    pipeline.enrolment.freeze(True)
    pipeline.open()
    summary = pipeline.run()
    assert summary["enrolment"]["bottle"] == {"phase": "inspecting", "refreshes": 0, "frozen": True}
    history = read_manifest(folder).history
    assert sum("enrolment of bottle" in line for line in history) == 1  # the initial commit only


KILL_DURING_REFRESH = r"""
import os, signal, sys
import anoclip.runtime.folder as folder

point, target, clip = sys.argv[1:4]
commits = []
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "placed":  # a refresh's files are in the folder, its manifest not written
    real_add = folder.FolderTransaction.add_file
    def add_file(self, *args, **kwargs):
        name = real_add(self, *args, **kwargs)
        if len(commits) >= 1:  # the initial enrolment committed: this is a refresh
            die()
        return name
    folder.FolderTransaction.add_file = add_file
real_commit = folder.FolderTransaction.commit
def commit(self, history):
    commits.append(history)
    report = real_commit(self, history)
    if point == "committed" and len(commits) == 2:  # the first refresh committed, before pruning is done
        die()
    return report
folder.FolderTransaction.commit = commit
from anoclip.runtime.cli import main
sys.argv = ["anoclip", "stream", "--artifacts", target, "--source", clip, "--class", "bottle", "--enrol", "continuous",
            "--enrol-refresh", "0", "--enrol-window", "20", "--enrol-quiet", "2", "--stats-interval", "0"]
main()
"""


@pytest.mark.parametrize("point", ["placed", "committed"])
def test_kill_9_during_a_refresh_leaves_a_folder_that_loads(tiny_artifacts, drift_clip, tmp_path, point):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_REFRESH, point, str(folder), str(drift_clip)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    artifacts = load_artifacts(folder)  # every file the manifest names is there and verifies
    assert "bottle" in artifacts.memory.classes and "bottle" in artifacts.thresholds.classes
    on_disk = {p.name for p in folder.iterdir() if p.name != "manifest.json" and not p.name.startswith(".")}
    assert set(read_manifest(folder).files) <= on_disk
    result = stream("--artifacts", folder, "--source", drift_clip, "--class", "bottle", "--stats-interval", "0")
    assert result.exit_code == 0, result.output  # and inspects with what it holds


def test_enrolment_refuses_what_it_cannot_do_in_one_line(tiny_artifacts, defect_clip, tmp_path):
    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    proc = run_cli("stream", "--artifacts", str(folder), "--source", str(defect_clip), "--class", "bottle",
                   "--enrol", "40", "--enrol-false-alarm-rate", "0.01")
    assert proc.returncode == 1 and "enrol at least 198 frames" in one_error_line(proc.stderr)
    proc = run_cli("stream", "--artifacts", str(folder), "--source", str(defect_clip), "--class", "bottle",
                   "--enrol", "40", "--memory", "off")
    assert proc.returncode == 1 and "--memory auto, on or only" in one_error_line(proc.stderr)
    proc = run_cli("stream", "--artifacts", str(folder), "--source", str(defect_clip), "--class", "bottle",
                   "--enrol", "1")
    assert proc.returncode == 2 and "'continuous'" in proc.stderr
    proc = run_cli("stream", "--artifacts", str(folder), "--source", str(defect_clip), "--class", "bottle",
                   "--enrol", "continuous", "--tta")
    assert proc.returncode == 1 and "without --tta" in one_error_line(proc.stderr)
    assert read_manifest(folder) == read_manifest(tiny_artifacts)  # nothing was written
