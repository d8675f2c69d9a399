"""``anoclip build-engine``: a TensorRT engine of the folder's visual model, built on this machine."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from anoclip.runtime.options import verbose_option
from anoclip.runtime.plumbing import configure_logging, given_command, run_guarded
from anoclip.runtime.vocabulary import PRECISIONS


def _batch(ctx, param, value):
    if value is None:
        return None
    from .engine import parse_batch_spec

    try:
        return parse_batch_spec(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _workspace(ctx, param, value):
    if value is None:
        return None
    from .engine import workspace_bytes

    try:
        workspace_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.command("build-engine", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export; the engine and its sidecar are stored in it.")
@click.option("--precision", required=True, type=click.Choice(PRECISIONS),
              help="fp32: the visual model as exported. fp16: the fp16 model (`anoclip calibrate fp16`; TensorRT 10.x "
                   "falls back to fp16 builder flags on the fp32 model). int8: the Q/DQ model (`anoclip calibrate int8`).")
@click.option("--batch", default=None, callback=_batch, metavar="N|MIN:OPT:MAX",
              help="Batch sizes the engine accepts: N means 1 to N, tuned for N; MIN:OPT:MAX sets all three. Default: "
                   "the model's fixed batch, or 1:1:8 for a model exported with --dynamic-batch. Larger batches run "
                   "in chunks.")
@click.option("--workspace", default=None, type=float, callback=_workspace, metavar="GiB",
              help="Scratch memory TensorRT may use while building, in GiB (default: its own limit, the GPU's memory; "
                   "on a Jetson, whose GPU shares the system memory, 1-2 GiB keeps the build from starving it).")
@click.option("--timing-cache", default=None, type=click.Path(dir_okay=False),
              help="TensorRT timing cache file: read if it exists, written after the build; later builds on the same "
                   "GPU and TensorRT release go faster.")
@click.option("--parity-images", default=4, show_default=True, type=click.IntRange(min=0),
              help="Random images run through the new engine and onnxruntime's CPU fp32 model; the differences are "
                   "stored in the sidecar (0: skip).")
@click.option("--device", default=0, show_default=True, type=click.IntRange(min=0), help="CUDA device to build for.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar as JSON.")
@verbose_option
def build_engine_command(artifacts_dir, precision, batch, workspace, timing_cache, parity_images, device, as_json,
                         verbose):
    """Build the TensorRT engine of the folder's visual model for this GPU.

    Run it on the machine that will run the engine (a Jetson, a desktop GPU): a TensorRT plan only
    loads with the TensorRT release and on the GPU it was built with. The plan is stored as plain
    bytes (visual_<precision>.<sha>.engine, which trtexec, Triton and DeepStream load as is) with a
    JSON sidecar beside it (TensorRT version, GPU, precision, batch profile, the source model's
    sha256, parity figures); the manifest names and hashes both. `--backend tensorrt-native` then
    runs it.
    """
    from .engine import build_engine

    configure_logging(verbose)
    ctx = click.get_current_context()
    result = build_engine(artifacts_dir, precision, batch=batch, workspace_gib=workspace, timing_cache=timing_cache,
                          parity=parity_images, device=device, command=given_command(ctx, "anoclip", "build-engine"),
                          progress=lambda message: click.echo(message, err=True))
    s = result.sidecar
    click.echo(f"stored {result.folder / result.engine} ({s.precision}, batch {s.profile}, TensorRT {s.tensorrt_version}, "
               f"{s.gpu_name} compute {s.compute_capability})", err=True)
    if "image_embeds_min_cosine" in s.parity:
        click.echo("parity with onnxruntime CPU fp32: " + ", ".join(
            f"{k} {v:.3g}" for k, v in s.parity.items() if isinstance(v, float)), err=True)
    if result.replaced:
        click.echo(f"replaced {', '.join(result.replaced)}", err=True)
    if as_json:
        data = asdict(s)
        click.echo(json.dumps(data, indent=2))


def main() -> None:
    run_guarded(build_engine_command)
