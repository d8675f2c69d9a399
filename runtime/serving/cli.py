"""``anoclip serve``: answer anomaly requests over HTTP and gRPC through Triton Inference Server."""

from __future__ import annotations

import logging
import os
import re

import click

from anoclip.runtime.options import (detector_options, max_pixels_option, no_verify_option, threads_option, tta_config_from,
                                     verbose_option)
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.plumbing import configure_logging

log = logging.getLogger(__name__)


def _port(ctx, param, value: int) -> int:
    if not 1 <= value <= 65535:
        raise click.BadParameter("must be a TCP port, 1-65535")
    return value


@click.command("serve")
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export.")
@click.option("--classes", default=None, metavar="A,B",
              help="Serve only these classes (comma-separated); default: every class of the prompt weights.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP, gRPC and metrics endpoints listen on. Loopback by default: there is no "
                   "authentication, so 0.0.0.0 opens the server to the whole network (a warning says so).")
@click.option("--http-port", default=8000, show_default=True, type=int, callback=_port, help="HTTP/REST port.")
@click.option("--grpc-port", default=8001, show_default=True, type=int, callback=_port, help="gRPC port.")
@click.option("--metrics-port", default=8002, show_default=True, type=int, callback=_port,
              help="Port of Triton's Prometheus metrics (/metrics): requests, batches, queue and compute times.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Most images one model run takes: Triton's dynamic batcher gathers concurrent requests up to it.")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Longest time (microseconds) a request waits for others to fill a batch; 0: run what is queued.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Model instances run side by side, each with its own Detector and copy of the model in memory. "
                   "With --tta only 1: the adapter state of a class must see every image of it.")
@detector_options
@threads_option("CPU threads for onnxruntime, per instance.")
@max_pixels_option("Largest image (width x height): encoded images claiming more are refused unread, raw frames "
                   "larger than it by their shape (an error of that request alone).")
@no_verify_option
@verbose_option
def serve_command(artifacts_dir, classes, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us,
                  instances, backend, model, precision, tiling, smoothing_sigma, tta, tta_backend, tta_steps, tta_adapter,
                  tta_init,
                  tta_state, seed, threads, max_pixels, no_verify, verbose):
    """Serve the detector through NVIDIA Triton Inference Server (PyTriton) until Ctrl-C or SIGTERM.

    Three models answer on the HTTP and gRPC ports: `anoclip` takes an encoded image (input "image",
    BYTES: PNG, JPEG, ... decoded on the server), `anoclip_frame` a decoded RGB frame (input "frame",
    UINT8 [H, W, 3]); both take "class" (BYTES) and, with --tta, an optional "stream" (BYTES: the
    camera whose adapter state the image adapts) and "reset" (that state starts afresh); optional
    "image_threshold" / "pixel_threshold" replace the calibrated ones. They answer the image score,
    the map at model resolution, the patch probabilities (to rebuild the full-size map), the
    thresholds in force and the decision (anomalous, regions), or an "error" text for that request
    alone (unknown class, undecodable bytes).
    `anoclip_info` describes what is served (classes, thresholds, grid, TTA) as JSON.

    Clients: `anoclip.runtime.serving.client.RemoteDetector(["http://HOST:8000", "grpc://OTHER:8001"])`, a
    drop-in for Detector.predict that spreads requests over the servers and fails over. The URLs are
    printed once every model is loaded (a client started earlier waits up to a minute for it).
    Shared memory and workspaces left by killed servers are removed at start. Needs `pip install 'anoclip[serve]'`.
    """
    from anoclip.runtime.detector import Detector

    from .server import ServeOptions, serve

    configure_logging(verbose)
    tta_config = tta_config_from(tta, tta_steps, tta_adapter, tta_init, tta_state, seed)
    if tta_config is not None and instances > 1:
        raise click.UsageError("--tta keeps one adapter state per class (and stream); use --instances 1")
    if len({http_port, grpc_port, metrics_port}) < 3:
        raise click.UsageError("--http-port, --grpc-port and --metrics-port must differ")
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise AnoclipError("`anoclip serve` needs nvidia-pytriton; install it with `pip install 'anoclip[serve]'` "
                           "(in an environment of its own: it needs numpy < 2)") from None
    detectors = [Detector.load(artifacts_dir, backend=backend, model=model, precision=precision, tiling=tiling,
                               smoothing_sigma=smoothing_sigma, verify=not no_verify, threads=threads,
                               tta=tta_config or False, tta_backend=tta_backend,
                               max_pixels=max_pixels) for _ in range(instances)]
    served = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    for cls in served or []:
        detectors[0].class_prompts(cls)  # unknown class: fail before starting anything
    if tta_config is not None:
        for cls in served or detectors[0].classes:
            detectors[0].tta_adapter(cls, tta_config)  # a TTA graph that does not fit: fail now
    options = ServeOptions(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                           max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances)

    def ready(urls: dict) -> None:
        click.echo(f"models loaded; serving {', '.join(served or detectors[0].classes)} from {artifacts_dir} "
                   f"(pid {os.getpid()}): "
                   f"{urls['http']} {urls['grpc']} metrics {urls['metrics']}; Ctrl-C or SIGTERM stops", err=True)
        click.echo(" ".join([urls["http"], urls["grpc"], urls["metrics"]]))

    try:
        serve(detectors, options, served, on_ready=ready)
    except AnoclipError:
        raise
    except Exception as exc:  # PyTriton and Triton report start-up failures as their own errors
        lines = [line.strip() for line in str(exc).replace("\\n", "\n").splitlines() if line.strip()]
        errors = [line for line in lines[1:] if re.match(r"\w*(Error|Exception): ", line)]
        cause = " ... ".join(lines[:1] + errors[-1:])
        raise AnoclipError(f"the Triton server did not start ({type(exc).__name__}: {cause}); Triton's log is "
                           "above") from None
    click.echo("stopped", err=True)
