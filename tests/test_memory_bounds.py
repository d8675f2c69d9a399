"""The memory benchmark (``python -m anoclip.benchmarks.memory_peak``) runs both of its modes on the
tiny model at tiny sizes and prints its one JSON line: the stream pipeline with every sink on, and
``anoclip serve`` after a refused raw frame and normal requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services_triton import serve_python  # noqa: F401 (fixture)

BENCHMARK = [sys.executable, "-m", "anoclip.benchmarks.memory_peak"]


def _run(*args: str) -> dict:
    done = subprocess.run([*BENCHMARK, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_benchmark_help_names_both_modes():
    done = subprocess.run([*BENCHMARK, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "stream" in done.stdout and "serve" in done.stdout


def test_memory_benchmark_imports_nothing_from_the_tests():
    source = (Path(__file__).resolve().parents[1] / "benchmarks" / "memory_peak.py").read_text()
    assert not any(word in source for word in ("from test", "import test", "services_triton", "sys.path"))


def test_memory_benchmark_streams_a_generated_video_through_every_sink(tiny_artifacts, tmp_path):
    result = _run("stream", "--artifacts", str(tiny_artifacts), "--size", "96x64", "--frames", "4",
                  "--out", str(tmp_path / "out"))
    assert result["mode"] == "stream" and result["frame"] == "96x64"
    assert result["frames_processed"] == 4 and result["frames_failed"] == 0
    assert result["peak_rss_MB"] >= result["rss_before_run_MB"] > 0
    sinks = result["sinks"]
    assert {"events", "recording", "saved frames", "web", "mqtt"} <= set(sinks)
    assert all(sinks[name]["written"] == 4 for name in ("events", "recording", "saved frames", "web"))
    assert sinks["mqtt"]["lost"] == 4  # no broker: counted, never held
    assert result["cpu"] and (tmp_path / "out" / "events.jsonl").is_file()


def test_memory_benchmark_measures_a_served_model(tiny_artifacts, serve_python):  # noqa: F811 (fixture)
    result = _run("serve", "--artifacts", str(tiny_artifacts), "--requests", "16", "--size", "64x64", "--huge",
                  "300x200", "--max-pixels", "10000", "--threads", "1", "--server-python", str(serve_python))
    assert result["mode"] == "serve" and result["requests"] == 16
    assert result["huge_answer"].startswith("ImageError: the frame is 300x200, above the server's --max-pixels 10000")
    for key in ("after_start", "after_300x200", "after_16_requests"):
        figures = result[key]
        assert figures["processes"] >= 2 and figures["rss_sum_MB"] > 0 and figures["shared_memory_MB"] >= 0
    assert result["cpu"]
