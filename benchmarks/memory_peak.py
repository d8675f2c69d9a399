"""Peak memory of the stream pipeline and of ``anoclip serve``: is it bounded by the frame size,
whatever the run throws at it?

    python -m anoclip.benchmarks.memory_peak stream --artifacts DIR --size 3840x2160 --frames 20
    python -m anoclip.benchmarks.memory_peak serve --artifacts DIR --requests 1000

* stream: a video file of ``--frames`` frames of ``--size`` is written here with OpenCV (a moving red
  disc on a gradient), then streamed by ``StreamPipeline`` in this process with every sink on but the
  window: events, recording, saved frames (every frame is anomalous: threshold 0), MQTT (to
  ``--mqtt``; by default a loopback port nothing listens on, so its events are counted lost) and the
  web view. Reported: the process's RSS before the run and its peak during it (VmHWM, reset before the
  run where the kernel allows, else sampled every 20 ms), frames processed and each sink's counts.
* serve: ``anoclip serve`` is started on loopback (``benchmarks.serve_process``, the server
  environment of ``benchmarks.serve_environment``), then sent one raw frame of ``--huge`` (default
  16000x16000, above the default --max-pixels: refused per request) and ``--requests`` frames of
  ``--size`` through ``RemoteDetector``. After start, after the huge frame and after the requests:
  the server's process group (the Python process, Triton, the model stubs): the sum of each
  process's RSS (shared memory counted once per process that maps it), of their private memory, of
  their peaks, and the shared memory (/dev/shm) the group maps, counted once.

One JSON line is printed, with the CPU model from /proc/cpuinfo. Figures are MB (2**20 bytes).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

from anoclip.benchmarks.latency.timing import machine_info
from anoclip.benchmarks.options import FrameSize
from anoclip.runtime.errors import AnoclipError

log = logging.getLogger(__name__)

MB = 2**20
SAMPLE_S = 0.02
DEFAULT_VIDEO_FPS = 10.0
REQUEST_TIMEOUT_S = 600.0  # a large model on a few cores: a batch of 8 can take tens of seconds


# ----------------------------------------------------------------------------------------------
# Memory figures


def _status(pid: int | str = "self") -> dict[str, int]:
    """The kB figures of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def _mb(kilobytes: float) -> float:
    return round(kilobytes / 1024, 1)


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class PeakSampler(threading.Thread):
    """Samples this process's VmRSS every ``SAMPLE_S`` until stopped; ``peak`` in kB."""

    def __init__(self):
        super().__init__(name="rss-sampler", daemon=True)
        self.done, self.peak = threading.Event(), 0

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            self.peak = max(self.peak, _status().get("VmRSS", 0))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, _status().get("VmRSS", 0))


def group_memory(pgid: int) -> dict[str, float]:
    """Memory of a process group: sums over its processes, and its /dev/shm files counted once."""
    rss = private = peaks = processes = 0
    shared: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            status = _status(proc.name)
            maps = (proc / "maps").read_text()
        except (OSError, ValueError):
            continue  # gone meanwhile
        processes += 1
        rss += status.get("VmRSS", 0)
        private += status.get("RssAnon", 0)
        peaks += status.get("VmHWM", 0)
        for line in maps.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                shared.add(fields[5].strip())
    shm = 0
    for name in shared:
        try:
            shm += os.stat(name).st_blocks * 512
        except OSError:
            pass
    return {"processes": processes, "rss_sum_MB": _mb(rss), "private_sum_MB": _mb(private),
            "peak_sum_MB": _mb(peaks), "shared_memory_MB": round(shm / MB, 1)}


# ----------------------------------------------------------------------------------------------
# stream


def write_video(path: Path, size: tuple[int, int], frames: int, fps: float = DEFAULT_VIDEO_FPS) -> Path:
    """A Motion-JPEG .avi of ``frames`` frames of ``size`` (width, height): a gradient with a red
    disc that moves, so that every frame differs. Written one frame at a time."""
    import cv2

    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise AnoclipError(f"OpenCV cannot write a {width}x{height} Motion-JPEG video to {path}")
    base = np.zeros((height, width, 3), np.uint8)
    base[:, :, 0] = (np.arange(width) * 255 // max(width, 1)).astype(np.uint8)[None, :]
    base[:, :, 1] = 96
    base[:, :, 2] = (np.arange(height) * 255 // max(height, 1)).astype(np.uint8)[:, None]
    radius = max(2, min(width, height) // 8)
    try:
        for i in range(frames):
            frame = base.copy()
            x = radius + (i * max(1, (width - 2 * radius) // max(frames, 1))) % max(1, width - 2 * radius)
            cv2.circle(frame, (x, height // 2), radius, (40, 40, 220), -1)
            writer.write(frame)
    finally:
        writer.release()
    if not path.is_file() or path.stat().st_size == 0:
        raise AnoclipError(f"OpenCV wrote no video to {path}")
    return path


def run_stream(artifacts: str, cls: str | None, backend: str, threads: int | None, size: tuple[int, int],
               frames: int, max_pixels: int, mqtt: str | None, out: str | None) -> dict:
    from anoclip.runtime.detector import Detector
    from anoclip.runtime.options import DEFAULT_MAX_OUTPUT_PIXELS
    from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
    from anoclip.runtime.stream.sinks import EventsLog, SavedFrames, VideoRecorder
    from anoclip.runtime.stream.web import WebView
    from anoclip.benchmarks.serve_process import free_port

    with tempfile.TemporaryDirectory(prefix="memory-peak-") as scratch:
        folder = Path(out or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        video = write_video(folder / f"source-{size[0]}x{size[1]}.avi", size, frames)
        video_s = time.perf_counter() - started
        detector = Detector.load(artifacts, backend=backend, threads=threads)
        cls = cls or detector.classes[0]
        sinks = [EventsLog(folder / "events.jsonl"), VideoRecorder(folder / "recording.avi", 1, [DEFAULT_VIDEO_FPS]),
                 SavedFrames(folder / "saved", max_pixels=DEFAULT_MAX_OUTPUT_PIXELS),
                 WebView(f"127.0.0.1:{free_port()}", ["video"])]
        sinks_off = {"window": "needs a display"}
        try:
            from anoclip.runtime.stream.mqtt import MqttSink

            sinks.append(MqttSink(mqtt or f"mqtt://127.0.0.1:{free_port()}", "anoclip/events"))
        except (ImportError, AnoclipError) as exc:
            sinks_off["mqtt"] = str(exc)
        pipeline = StreamPipeline(detector, [parse_source(str(video), detector.classes, cls)], sinks,
                                  StreamOptions(stats_interval=0, threshold=0.0, max_pixels=max_pixels))
        pipeline.open()
        gc.collect()
        before = _status()["VmRSS"]
        reset = reset_peak()
        sampler = PeakSampler()
        sampler.start()
        started = time.perf_counter()
        summary = pipeline.run()
        run_s = time.perf_counter() - started
        sampled = sampler.stop()
        peak = _status()["VmHWM"] if reset else sampled
    return {
        "mode": "stream", "artifacts": str(artifacts), "class": cls, "backend": backend, "frame": f"{size[0]}x{size[1]}",
        "frames": frames, "frames_processed": summary["frames_processed"], "frames_failed": summary["failed"],
        "rss_before_run_MB": _mb(before), "peak_rss_MB": _mb(peak), "peak_rss_sampled_MB": _mb(sampled),
        "peak_from": "VmHWM" if reset else "sampled", "frame_MB": round(size[0] * size[1] * 3 / MB, 1),
        "run_s": round(run_s, 2), "video_write_s": round(video_s, 2), "sinks": summary["sinks"],
        "sink_errors": pipeline.sink_errors, "sinks_off": sinks_off, **_machine(),
    }


# ----------------------------------------------------------------------------------------------
# serve


def _infer_raw(url: str, frame: np.ndarray, cls: str) -> str:
    """One raw frame to the frame model over HTTP; the request's error text ("" when scored)."""
    import tritonclient.http as http

    from anoclip.runtime.serving import FRAME_MODEL

    client = http.InferenceServerClient(url.split("://", 1)[1], network_timeout=600, connection_timeout=600)
    try:
        inputs = [http.InferInput("frame", [1, *frame.shape], "UINT8"), http.InferInput("class", [1, 1], "BYTES")]
        inputs[0].set_data_from_numpy(frame[None], binary_data=True)
        inputs[1].set_data_from_numpy(np.array([[cls.encode()]], dtype=object))
        answer = client.infer(FRAME_MODEL, inputs, outputs=[http.InferRequestedOutput("error")])
        return bytes(answer.as_numpy("error").reshape(-1)[0]).decode()
    finally:
        client.close()


def run_serve(artifacts: str, cls: str | None, backend: str, threads: int | None, requests: int,
              size: tuple[int, int], huge: tuple[int, int] | None, max_pixels: int | None,
              server_python: str | None) -> dict:
    from anoclip.benchmarks.serve_environment import server_python as build_server_python
    from anoclip.benchmarks.serve_process import ServeProcess
    from anoclip.runtime.serving.client import RemoteDetector

    python = server_python or str(build_server_python())
    options = ["--backend", backend] + (["--threads", str(threads)] if threads else []) + \
        (["--max-pixels", str(max_pixels)] if max_pixels is not None else [])
    result: dict = {"mode": "serve", "artifacts": str(artifacts), "backend": backend, "serve_options": options}
    with tempfile.TemporaryDirectory(prefix="memory-peak-") as folder:
        server = ServeProcess(python, artifacts, folder, options).start(timeout=300)
        try:
            pgid = server.process.pid
            result["after_start"] = group_memory(pgid)
            remote = RemoteDetector([server.http_url], workers=8, timeout=REQUEST_TIMEOUT_S)
            cls = cls or remote.classes[0]
            result["class"] = cls
            if huge:
                frame = np.zeros((huge[1], huge[0], 3), np.uint8)
                started = time.perf_counter()
                result["huge_frame"] = f"{huge[0]}x{huge[1]}"
                result["huge_answer"] = _infer_raw(server.http_url, frame, cls)[:160]
                result["huge_s"] = round(time.perf_counter() - started, 2)
                del frame
                gc.collect()
                time.sleep(1.0)  # the server has answered; let it release what it releases
                result[f"after_{huge[0]}x{huge[1]}"] = group_memory(pgid)
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(16)]
            done, started = 0, time.perf_counter()
            while done < requests:
                batch = images[:min(len(images), requests - done)]
                remote.predict_batch(batch, cls)
                done += len(batch)
            result["requests"], result["frame"] = done, f"{size[0]}x{size[1]}"
            result["requests_s"] = round(time.perf_counter() - started, 2)
            result[f"after_{done}_requests"] = group_memory(pgid)
            remote.close()
        except AnoclipError as exc:
            raise AnoclipError(f"{exc}\nthe server's log ends with:\n{server.log()[-3000:]}") from exc
        finally:
            server.stop()
    result["client_peak_rss_MB"] = _mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    result.update(_machine())
    return result


def _machine() -> dict:
    info = machine_info()
    return {"cpu": info["cpu"], "cores": info["cores"], "memory_gib": info["memory_gib"]}


# ----------------------------------------------------------------------------------------------
# Command line


def _common(command):
    from anoclip.runtime.backends import BACKEND_CHOICES

    command = click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime CPU threads.")(command)
    command = click.option("--backend", default="cpu", show_default=True, type=click.Choice(BACKEND_CHOICES))(command)
    command = click.option("--class", "cls", default=None,
                           help="Class to score (default: the first of the artifacts).")(command)
    return click.option("--artifacts", required=True, type=click.Path(file_okay=False, exists=True),
                        help="Artifact folder written by anoclip-export.")(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Peak memory of the stream pipeline (every sink on) and of `anoclip serve`; one JSON line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command("stream")
@_common
@click.option("--size", default="3840x2160", show_default=True, type=FrameSize(), help="Frame size, WIDTHxHEIGHT.")
@click.option("--frames", default=20, show_default=True, type=click.IntRange(min=1),
              help="Frames of the generated video (all scored).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1),
              help="The pipeline's --max-pixels (default: the runtime's).")
@click.option("--mqtt", default=None, metavar="URL",
              help="Broker for the MQTT sink (default: a loopback port nothing listens on; events counted lost).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Keep the video and the sinks' outputs here (default: a temporary folder, removed).")
def stream_command(artifacts, cls, backend, threads, size, frames, max_pixels, mqtt, out):
    """Stream a generated video of SIZE frames through every sink; the process's peak RSS."""
    from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS

    click.echo(json.dumps(run_stream(artifacts, cls, backend, threads, size, frames, max_pixels or DEFAULT_MAX_PIXELS,
                                     mqtt, out)))


@main.command("serve")
@_common
@click.option("--requests", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Normal frames sent after the huge one (batches of 16 through RemoteDetector).")
@click.option("--size", default="640x480", show_default=True, type=FrameSize(), help="Size of the normal frames.")
@click.option("--huge", default="16000x16000", show_default=True,
              help="One raw frame of this size sent first (0: none).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1), help="The server's --max-pixels.")
@click.option("--server-python", default=None, type=click.Path(dir_okay=False),
              help="Python of an environment with the serve extra (default: benchmarks.serve_environment's).")
def serve_command(artifacts, cls, backend, threads, requests, size, huge, max_pixels, server_python):
    """Start `anoclip serve`, send one huge raw frame and REQUESTS normal ones; the server's memory."""
    huge_size = None if str(huge).strip() == "0" else FrameSize().convert(huge, None, None)
    click.echo(json.dumps(run_serve(artifacts, cls, backend, threads, requests, size, huge_size, max_pixels,
                                    server_python)))


if __name__ == "__main__":
    from anoclip.runtime.plumbing import run_guarded

    run_guarded(main)
