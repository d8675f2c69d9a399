"""Running statistics of a stream: rates, drops, reconnects and latency percentiles.

Latencies are kept in fixed-size windows (the last ``WINDOW`` frames), so memory stays flat however
long the stream runs; counters are plain integers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict

import numpy as np

from .capture import CaptureThread

WINDOW = 2048
RATE_SMOOTHING = 0.1  # weight of the newest interval in the smoothed frame rate drawn on frames


def percentiles(values, qs=(50, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs}
    array = np.fromiter(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(array, q)), 3) for q in qs}


class StreamStats:
    def __init__(self, captures: list[CaptureThread]):
        self.captures = captures
        self.started = time.perf_counter()
        self.processed = [0] * len(captures)
        self.anomalous = [0] * len(captures)
        self.failed = [0] * len(captures)
        self.scaled = [0] * len(captures)  # live frames scaled down to --max-pixels
        self.total_ms: deque[float] = deque(maxlen=WINDOW)  # capture -> decision
        self.added_ms: deque[float] = deque(maxlen=WINDOW)  # the same minus the model's own time
        self.model_ms: deque[float] = deque(maxlen=WINDOW)  # the model run of the frame's batch
        self.batch_sizes: deque[int] = deque(maxlen=WINDOW)
        self._last_processed: list[float | None] = [None] * len(captures)
        self._rate: list[float | None] = [None] * len(captures)  # frames/s, smoothed over the last frames
        self._window_start = (self.started, 0, 0)  # time, frames read, frames processed at the last report

    def record(self, source: int, anomalous: bool | None, latency: dict[str, float]) -> None:
        self.processed[source] += 1
        now = time.perf_counter()
        last, self._last_processed[source] = self._last_processed[source], now
        if last is not None and now > last:
            rate, previous = 1.0 / (now - last), self._rate[source]
            self._rate[source] = rate if previous is None else previous + RATE_SMOOTHING * (rate - previous)
        self.anomalous[source] += bool(anomalous)
        self.total_ms.append(latency["total"])
        self.added_ms.append(latency["added"])
        self.model_ms.append(latency["model"])

    def fps(self, source: int) -> float | None:
        """The source's current rate of processed frames (smoothed), None before its second frame."""
        return self._rate[source]

    def interval_line(self) -> str:
        """One line on the frames since the previous call: rates in and processed, drops, latency."""
        now = time.perf_counter()
        read = sum(c.counters.read for c in self.captures)
        processed = sum(self.processed)
        then, read0, processed0 = self._window_start
        self._window_start = (now, read, processed)
        span = max(now - then, 1e-9)
        latency = percentiles(self.total_ms)
        return (f"stream: in {(read - read0) / span:.1f} fps, processed {(processed - processed0) / span:.1f} fps, "
                f"dropped {sum(c.counters.dropped for c in self.captures)}, "
                f"corrupt {sum(c.counters.corrupt for c in self.captures)}, failed {sum(self.failed)}, "
                f"scaled {sum(self.scaled)}, latency p50 {latency['p50']} ms "
                f"p99 {latency['p99']} ms, reconnects {sum(c.counters.reconnects for c in self.captures)}")

    def summary(self) -> dict:
        """Everything about the run, for the final JSON line and the web view."""
        elapsed = time.perf_counter() - self.started
        sources = []
        for i, capture in enumerate(self.captures):
            sources.append({"source": capture.spec.name, "class": capture.spec.cls, **asdict(capture.counters),
                            "processed": self.processed[i], "anomalous": self.anomalous[i], "failed": self.failed[i],
                            "scaled": self.scaled[i],
                            "fps_processed": round(self.processed[i] / elapsed, 3) if elapsed > 0 else None})
        processed = sum(self.processed)
        return {
            "elapsed_s": round(elapsed, 3),
            "frames_processed": processed,
            "fps_processed": round(processed / elapsed, 3) if elapsed > 0 else None,
            "frames_read": sum(c.counters.read for c in self.captures),
            "dropped": sum(c.counters.dropped for c in self.captures),
            "corrupt": sum(c.counters.corrupt for c in self.captures),
            "reconnects": sum(c.counters.reconnects for c in self.captures),
            "anomalous": sum(self.anomalous),
            "failed": sum(self.failed),
            "frames_failed": sum(self.failed),  # frames that could not be scored (events with "error"): exit 3
            "scaled": sum(self.scaled),
            "latency_ms": percentiles(self.total_ms),
            "added_latency_ms": percentiles(self.added_ms),
            "model_ms": percentiles(self.model_ms),
            "mean_batch": round(float(np.mean(self.batch_sizes)), 3) if self.batch_sizes else None,
            "sources": sources,
        }
