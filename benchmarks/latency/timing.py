"""Timing helpers shared by the benchmarks: machine description and interleaved timing.

Machines are noisy, so candidates are timed round-robin in one run (each round runs every
candidate once) and compared by ratios of their medians, never against fixed thresholds.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


def machine_info() -> dict[str, object]:
    """CPU model, cores, memory, GPU (if nvidia-smi answers), BLAS and library versions, load."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "logical_cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "gpu": gpu_name(),
        "blas": blas_info(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _version_of("onnxruntime"),
        "opencv": _version_of("cv2"),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _version_of(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def blas_info() -> str:
    """numpy's BLAS library, kernel and threads (threadpoolctl, when installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (install threadpoolctl to see it)"
    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not infos:
        return "unknown"
    i = infos[0]
    return f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}), {i.get('num_threads')} threads"


def gpu_name() -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


@dataclass
class Timing:
    """Per-run milliseconds of one candidate."""

    name: str
    ms: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.ms))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.ms, q))

    @property
    def mean(self) -> float:
        return float(np.mean(self.ms))

    def summary(self) -> dict[str, float]:
        return {"mean": self.mean, "p50": self.median, "p90": self.percentile(90), "p99": self.percentile(99),
                "runs": len(self.ms)}


def time_interleaved(candidates: dict[str, Callable[[], object]], runs: int = 30, warmup: int = 5,
                     progress: Callable[[int], None] | None = None, rotate: bool = False) -> dict[str, Timing]:
    """Time each candidate ``runs`` times, round-robin, after ``warmup`` untimed rounds.

    ``rotate``: start each round one candidate later, so that every candidate runs in every position
    of a round equally often (a candidate that follows a long one can run slower or faster: caches,
    clocks)."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    timings = {name: Timing(name, []) for name in candidates}
    names = list(candidates)
    for index in range(runs):
        shift = index % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = candidates[name]
            start = time.perf_counter()
            fn()
            timings[name].ms.append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress(index + 1)
    return timings


def table_lines(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> list[str]:
    """A benchmark's plain-text table: ``title``, a header, a line per row. ``columns``: (row key,
    heading, format spec such as ``<44`` or ``>9.1f``); a heading takes its column's alignment and width."""
    def head(heading: str, spec: str) -> str:
        align, width = spec[0], spec[1:].split(".")[0].rstrip("fdes")
        return f"{heading:{align}{width}}"

    return [title, " ".join(head(heading, spec) for _, heading, spec in columns),
            *(" ".join(f"{row[key]:{spec}}" for key, _, spec in columns) for row in rows)]

