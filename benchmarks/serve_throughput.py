"""Serving throughput: what does Triton (``anoclip serve``) cost and give, against a local Detector?

    python -m anoclip.benchmarks.serve_throughput --artifacts artifacts/demo

In one run on one machine:
* local: ``Detector.predict`` in this process, one frame after another: ms per frame (p50, p99)
  and frames a second;
* served: a server started on loopback (``anoclip serve``, dynamic batching) and ``RemoteDetector``
  clients, 1, 4 and 8 at once, each sending frames one after another: requests a second and the
  latency of each request as a client sees it (p50, p99), and the mean batch Triton ran (its own
  counters: requests / model runs);
* the overhead per request: served p50 with one client minus local p50 (transport, Triton's
  queue, the Python stub, decoding the request).

Client and server share the machine's cores, so served numbers include the client's own work.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time

import click
import numpy as np

from anoclip.benchmarks.latency.timing import Timing, machine_info
from anoclip.benchmarks.options import Counts, FrameSize, throughput_options
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError

log = logging.getLogger(__name__)


def test_frames(count: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Random RGB frames, (width, height)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


def local_run(detector: Detector, frames: list[np.ndarray], cls: str, requests: int, bar) -> dict:
    for frame in frames[:3]:
        detector.predict(frame, cls)  # warm-up
    ms = []
    started = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        detector.predict(frames[i % len(frames)], cls)
        ms.append((time.perf_counter() - t0) * 1e3)
        bar.update()
    wall = time.perf_counter() - started
    return {"clients": 1, **_stats(ms, requests / wall)}


def served_run(remote, server, frames: list[np.ndarray], cls: str, clients: int, requests: int, bar) -> dict:
    from anoclip.runtime.serving import FRAME_MODEL

    for frame in frames[:2]:
        remote.predict(frame, cls)  # warm-up (and a connection per protocol)
    runs0 = server.metric("nv_inference_exec_count", FRAME_MODEL)
    count0 = server.metric("nv_inference_request_success", FRAME_MODEL)
    per_client = max(1, requests // clients)
    ms: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for k in range(per_client):
                t0 = time.perf_counter()
                remote.predict(frames[(index + k) % len(frames)], cls)
                with lock:
                    ms.append((time.perf_counter() - t0) * 1e3)
                    bar.update()
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise AnoclipError(f"a client failed: {errors[0]}")
    runs = server.metric("nv_inference_exec_count", FRAME_MODEL) - runs0
    count = server.metric("nv_inference_request_success", FRAME_MODEL) - count0
    return {"clients": clients, **_stats(ms, len(ms) / wall), "mean_batch": count / runs if runs else float("nan")}


def _stats(ms: list[float], per_second: float) -> dict:
    summary = Timing("run", ms).summary()
    return {"per_second": per_second, "p50_ms": summary["p50"], "p99_ms": summary["p99"], "requests": len(ms)}


def run(artifacts: str, cls: str | None, requests: int, size: tuple[int, int], client_counts: tuple[int, ...],
        protocol: str, server_python: str | None, serve_options: list[str], threads: int | None, backend: str) -> dict:
    from tqdm import tqdm

    from anoclip.benchmarks.serve_environment import server_python as build_server_python
    from anoclip.benchmarks.serve_process import ServeProcess
    from anoclip.runtime.serving.client import RemoteDetector

    detector = Detector.load(artifacts, backend=backend, threads=threads)
    cls = cls or detector.classes[0]
    detector.class_prompts(cls)
    frames = test_frames(8, size)
    total = requests * (1 + len(client_counts))
    with tqdm(total=total, desc="serve benchmark", unit="req", file=sys.stderr, disable=None) as bar:
        local = local_run(detector, frames, cls, requests, bar)
        del detector  # the server gets the cores' memory bandwidth to itself
        python = server_python or _pytriton_python() or str(build_server_python())
        options = [*serve_options, "--backend", backend] + (["--threads", str(threads)] if threads else [])
        with tempfile.TemporaryDirectory() as folder:
            bar.set_postfix_str("starting the server")
            server = ServeProcess(python, artifacts, folder, options).start()
            try:
                remote = RemoteDetector([server.grpc_url if protocol == "grpc" else server.http_url],
                                        workers=max(client_counts))
                served = []
                for clients in client_counts:
                    bar.set_postfix_str(f"{clients} client(s)")
                    served.append(served_run(remote, server, frames, cls, clients, requests, bar))
                remote.close()
            finally:
                server.stop()
    return {"artifacts": artifacts, "class": cls, "frame": f"{size[0]}x{size[1]}", "protocol": protocol,
            "serve_options": options, "machine": machine_info(), "local": local, "served": served,
            "overhead_ms": served[0]["p50_ms"] - local["p50_ms"] if client_counts[0] == 1 else None}


def _pytriton_python() -> str | None:
    try:
        import pytriton  # noqa: F401
    except ImportError:
        return None
    return sys.executable


def report_lines(result: dict) -> list[str]:
    machine = result["machine"]
    lines = [f"machine: {machine['cpu']}, {machine['cores']} cores; {result['frame']} frames, class {result['class']}, "
             f"{result['protocol']}; server: {' '.join(result['serve_options'])}",
             "", f"{'':<10}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}"]
    local = result["local"]
    lines.append(f"{'local':<10}{1:>8}{local['per_second']:>9.1f}{local['p50_ms']:>9.1f}{local['p99_ms']:>9.1f}{'':>7}")
    for row in result["served"]:
        lines.append(f"{'served':<10}{row['clients']:>8}{row['per_second']:>9.1f}{row['p50_ms']:>9.1f}"
                     f"{row['p99_ms']:>9.1f}{row['mean_batch']:>7.2f}")
    if result["overhead_ms"] is not None:
        lines += ["", f"overhead per request (served p50 at 1 client - local p50): {result['overhead_ms']:.1f} ms"]
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@throughput_options("Artifact folder written by anoclip-export (--dynamic-batch lets the server batch).", "cpu",
                    "CPU threads for onnxruntime (both sides).")
@click.option("--requests", default=200, show_default=True, type=click.IntRange(min=8),
              help="Requests per measurement (local, and each client count).")
@click.option("--clients", "client_counts", default="1,4,8", show_default=True, type=Counts(),
              help="Comma-separated numbers of concurrent clients.")
@click.option("--size", default="640x640", show_default=True, type=FrameSize(),
              help="WIDTHxHEIGHT of the frames, sent raw (anoclip_frame).")
@click.option("--protocol", default="grpc", show_default=True, type=click.Choice(["grpc", "http"]))
@click.option("--server-python", default=None, type=click.Path(dir_okay=False),
              help="Python of an environment with 'anoclip[serve]' (default: this one if it has PyTriton, "
                   "else the one `python -m anoclip.benchmarks.serve_environment` builds).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(min=0))
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1))
def main(artifacts, cls, backend, threads, as_json, requests, client_counts, size, protocol, server_python, max_batch,
         max_queue_delay_us, instances):
    from anoclip.runtime.plumbing import configure_logging

    configure_logging(False)
    logging.getLogger("anoclip.runtime.serving.client").setLevel(logging.ERROR)
    options = ["--max-batch", str(max_batch), "--max-queue-delay-us", str(max_queue_delay_us), "--instances", str(instances)]
    result = run(artifacts, cls, requests, size, client_counts, protocol, server_python, options, threads, backend)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))


if __name__ == "__main__":
    from anoclip.runtime.plumbing import run_guarded

    run_guarded(main)
