"""Stream throughput: does the pipeline keep the engine busy, and what does it add per frame?

    python -m anoclip.benchmarks.stream_throughput --artifacts artifacts/demo

For one source and for four, in one run on one Detector:
* model only: ``Detector.predict_batch`` on frames already decoded in memory (preprocess, model,
  scoring), batch = number of sources: the most frames a second the pipeline could reach;
* end to end: ``StreamPipeline`` on the same clip(s) as video files (decode, capture threads,
  inference, annotation, events file and recording): frames a second from start to the last event.
  The ratio end to end / model only says how well capture, decode, drawing and sinks overlap with
  inference (1.0: entirely);
* added latency: the clip paced like a camera at half the model-only rate (so that frames do not
  queue), capture -> decision minus the model run the frame waited for, p50 and p99 in ms;
* memory: a long run (``--rss-frames``, default 2000) with the process's RSS sampled at frame 200
  and at the end.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from anoclip.benchmarks.accuracy.synthetic import make_clip
from anoclip.benchmarks.latency.timing import machine_info
from anoclip.benchmarks.options import Counts, FrameSize, throughput_options
from anoclip.runtime.detector import Detector
from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
from anoclip.runtime.stream.events import FrameEvent, Sink
from anoclip.runtime.stream.sinks import EventsLog, VideoRecorder

log = logging.getLogger(__name__)


def rss_mib() -> float:
    """Resident set size of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssProbe(Sink):
    """Samples RSS at given processed-frame counts; stops the pipeline after ``stop_after`` frames."""

    name = "rss probe"

    def __init__(self, at: tuple[int, ...], stop_after: int, stop):
        self.at, self.stop_after, self.stop = set(at), stop_after, stop
        self.count = 0
        self.samples: dict[int, float] = {}

    def write(self, event: FrameEvent) -> None:
        self.count += 1
        if self.count in self.at or self.count == self.stop_after:
            self.samples[self.count] = round(rss_mib(), 1)
        if self.count >= self.stop_after:
            self.stop.set()


def decoded_frames(path: Path, count: int) -> list[np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def model_only_fps(detector: Detector, frames: list[np.ndarray], cls: str, batch: int) -> float:
    detector.predict_batch([f[:, :, ::-1] for f in frames[:batch]], cls)  # warm-up
    started = time.perf_counter()
    done = 0
    for start in range(0, len(frames) - batch + 1, batch):
        detector.predict_batch([f[:, :, ::-1] for f in frames[start:start + batch]], cls)
        done += batch
    return done / (time.perf_counter() - started)


def pipeline_run(detector: Detector, clips: list[Path], cls: str, folder: Path, **options) -> tuple[dict, float]:
    specs = [parse_source(str(clip), detector.classes, cls) for clip in clips]
    sinks = [EventsLog(folder / "events.jsonl"), VideoRecorder(folder / "annotated.avi", len(specs), [25.0] * len(specs))]
    extra = options.pop("sinks", [])
    pipeline = StreamPipeline(detector, specs, sinks + extra, StreamOptions(stats_interval=0, **options))
    for sink in extra:
        if isinstance(sink, RssProbe):
            sink.stop = pipeline.stop
    pipeline.open()
    started = time.perf_counter()
    summary = pipeline.run()
    return summary, summary["frames_processed"] / (time.perf_counter() - started)


def run(artifacts: str, cls: str | None, frames: int, rss_frames: int, size: tuple[int, int], threads: int | None,
        backend: str, source_counts: tuple[int, ...] = (1, 4)) -> dict:
    detector = Detector.load(artifacts, backend=backend, threads=threads)
    cls = cls or detector.classes[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="anoclip-stream-bench-") as tmp:
        tmp = Path(tmp)
        clip = make_clip(tmp / "line.avi", cls if cls in ("bottle", "carpet") else "bottle", frames, frames * 2 // 3, size)
        decoded = decoded_frames(clip, frames)
        for sources in source_counts:
            model_fps = model_only_fps(detector, decoded, cls, sources)
            run_dir = tmp / f"run-{sources}"
            run_dir.mkdir()
            summary, e2e_fps = pipeline_run(detector, [clip] * sources, cls, run_dir)
            camera_fps = max(model_fps / sources / 2, 0.05)  # half of what the model can take: no queueing
            paced = make_clip(tmp / f"paced-{sources}.avi", "bottle", min(100, max(20, int(camera_fps * 20))), None,
                              size, fps=camera_fps)
            latency_dir = tmp / f"latency-{sources}"
            latency_dir.mkdir()
            paced_summary, _ = pipeline_run(detector, [paced] * sources, cls, latency_dir, realtime=True)
            rows.append({"sources": sources, "model_only_fps": round(model_fps, 3), "end_to_end_fps": round(e2e_fps, 3),
                         "ratio": round(e2e_fps / model_fps, 3), "frames": summary["frames_processed"],
                         "paced_camera_fps": round(camera_fps, 3),
                         "added_latency_ms": paced_summary["added_latency_ms"],
                         "latency_ms": paced_summary["latency_ms"], "model_ms": paced_summary["model_ms"]})
            log.info("%d source(s): %s", sources, rows[-1])
        memory = None
        if rss_frames:
            probe = RssProbe((200,), rss_frames, None)
            rss_dir = tmp / "rss"
            rss_dir.mkdir()
            rss_start = rss_mib()
            summary, _ = pipeline_run(detector, [clip], cls, rss_dir, loop=True, sinks=[probe])
            first, last = probe.samples.get(200), probe.samples.get(rss_frames)
            memory = {"frames": summary["frames_processed"], "rss_before_mib": round(rss_start, 1),
                      "rss_at_200_mib": first, "rss_at_end_mib": last,
                      "growth": round(last / first - 1, 4) if first and last else None}
    return {"machine": machine_info(), "artifacts": artifacts, "backbone": detector.artifacts.manifest.backbone,
            "backend": detector.backend.describe(), "class": cls, "frame_size": list(size), "clip_frames": frames,
            "rows": rows, "memory": memory}


def report_lines(result: dict) -> list[str]:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}; "
             f"{result['backbone']} on {result['backend']}; frames {result['frame_size'][0]}x{result['frame_size'][1]}",
             "| sources | model only fps | end to end fps | ratio | added latency p50 / p99 ms | model ms p50 |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        added = row["added_latency_ms"]
        lines.append(f"| {row['sources']} | {row['model_only_fps']:.2f} | {row['end_to_end_fps']:.2f} | "
                     f"{row['ratio']:.2f} | {added['p50']} / {added['p99']} | {row['model_ms']['p50']} |")
    memory = result["memory"]
    if memory:
        lines.append(f"memory: {memory['frames']} frames, RSS {memory['rss_at_200_mib']} MiB at frame 200, "
                     f"{memory['rss_at_end_mib']} MiB at the end (growth {memory['growth']:+.1%})")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@throughput_options("Artifact folder written by anoclip-export.", "auto", "CPU threads for onnxruntime.")
@click.option("--frames", default=120, show_default=True, type=click.IntRange(min=8),
              help="Frames of the clip timed for throughput.")
@click.option("--rss-frames", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Frames of the memory run (0: skip it; the RSS is sampled at frame 200 and at the end).")
@click.option("--sources", "source_counts", default="1,4", show_default=True, type=Counts(),
              help="Numbers of sources to time (comma-separated); each reads the same clip.")
@click.option("--size", default="640x480", show_default=True, type=FrameSize(), help="WIDTHxHEIGHT of the clip's frames.")
def main(artifacts, cls, backend, threads, as_json, frames, rss_frames, source_counts, size):
    """Frames per second of `anoclip stream` against the model alone, its added latency and its memory."""
    from anoclip.runtime.plumbing import configure_logging

    configure_logging(False)
    logging.getLogger("anoclip.runtime.stream").setLevel(logging.WARNING)
    result = run(artifacts, cls, frames, rss_frames, size, threads, backend, source_counts)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))


if __name__ == "__main__":
    from anoclip.runtime.plumbing import run_guarded

    run_guarded(main)
    sys.exit(0)
