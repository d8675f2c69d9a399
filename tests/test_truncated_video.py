"""A video that ends before the frame count its header gives (cut short on the way, or holding no
frame at all): predict and stream say what they read against what the header said.

predict exits 3, as for any input it could not read whole (its frames that could be read are
scored and written); stream exits 0, since its exit code speaks for its outputs, every frame that was
read having been scored and written, and its summary counts the frames the file lacked as
``missing``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from fakes import write_clip

HEADER_FRAMES = 200


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """An MJPG AVI of 200 frames cut in half (99 frames decode), and one cut right after its header (none)."""
    folder = tmp_path_factory.mktemp("clips")
    data = write_clip(folder / "full.avi", HEADER_FRAMES).read_bytes()
    (folder / "truncated.avi").write_bytes(data[: len(data) // 2])
    (folder / "empty.avi").write_bytes(data[: data.find(b"movi") + 4])
    return {name: folder / f"{name}.avi" for name in ("truncated", "empty")}


def _stream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "stream", *args],
                          capture_output=True, text=True, timeout=120)


def test_truncated_video_predict_warns_read_against_header_and_exits_3(tiny_artifacts, clips, tmp_path):
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--out", str(tmp_path / "out"),
                   str(clips["truncated"]))
    assert proc.returncode == 3, proc.stderr
    assert f"the video ended after 99 of the {HEADER_FRAMES} frames its header gives" in proc.stderr
    assert "the 101 missing frames were not scored" in proc.stderr and "Traceback" not in proc.stderr
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 99  # what was read is kept


def test_empty_video_predict_warns_read_against_header_and_exits_3(tiny_artifacts, clips, tmp_path):
    proc = run_cli("predict", "--artifacts", str(tiny_artifacts), "--class", "bottle", "--out", str(tmp_path / "out"),
                   str(clips["empty"]))
    assert proc.returncode == 3, proc.stderr
    assert f"the video gave no frames, where its header gives {HEADER_FRAMES}" in proc.stderr


@pytest.mark.parametrize("clip, read", [("truncated", 99), ("empty", 0)])
def test_truncated_or_empty_video_stream_warns_and_counts_missing_frames(tiny_artifacts, clips, tmp_path, clip, read):
    events = tmp_path / "events.jsonl"
    proc = _stream("--artifacts", str(tiny_artifacts), "--class", "bottle", "--source", str(clips[clip]),
                   "--events", str(events))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["frames_processed"] == read and summary["sources"][0]["missing"] == HEADER_FRAMES - read
    expected = (f"ended after {read} of the {HEADER_FRAMES} frames its header gives" if read else
                f"the video gave no frames, where its header gives {HEADER_FRAMES}")
    assert sum(expected in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert len(events.read_text().splitlines()) == read if events.exists() else read == 0
