"""``anoclip calibrate memory``: a class's memory of normal frames, stored in the artifact folder."""

from __future__ import annotations

from pathlib import Path

import click

from anoclip.runtime.options import max_pixels_option, threads_option, verbose_option
from anoclip.runtime.plumbing import configure_logging, given_command
from anoclip.runtime.memory import AUGMENTATIONS, DEFAULT_MAX_PATCHES


def _augmentations(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip()) if value else ()
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(AUGMENTATIONS)}")
    return names


@click.command("memory", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export; the memory is stored in it.")
@click.option("--class", "cls", required=True, help="Class the normal frames show (baked into the prompt weights).")
@click.option("--normal", multiple=True, required=True,
              help="Normal (defect-free) input: an image, a folder of images, a quoted glob pattern of images or a "
                   "video file. Repeat for more. A handful of frames of the scene is enough to start; more cover more "
                   "of its normal variation. Images that cannot be read are skipped, and counted at the end.")
@click.option("--stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Use every N-th frame of videos (neighbouring frames are near copies).")
@click.option("--max-frames", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Use at most this many frames.")
@click.option("--max-patches", default=DEFAULT_MAX_PATCHES, show_default=True, type=click.IntRange(min=1),
              help="Rows the memory keeps: above it a greedy k-center coreset keeps those that cover the others best "
                   "(its covering radius is printed). Scoring time grows with it.")
@click.option("--augment", default="", callback=_augmentations, metavar="LIST",
              help=f"Comma-separated augmented copies of each frame to add ({', '.join(AUGMENTATIONS)}): flips and "
                   "quarter turns for parts that appear mirrored or turned on the line, shift (half a patch) for "
                   "fine texture. Default none.")
@click.option("--extend", is_flag=True,
              help="Add the frames to the class's current memory instead of replacing it.")
@click.option("--backend", default="cpu", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda", "tensorrt", "openvino"]), help="What runs the visual model.")
@click.option("--tiling", default="auto", show_default=True, type=click.Choice(["auto", "never", "always"]),
              help="As predict will run (frames far from square are cut into tiles).")
@threads_option()
@max_pixels_option()
@verbose_option
def memory_command(artifacts_dir, cls, normal, stride, max_frames, max_patches, augment, extend, backend, tiling,
                   threads, max_pixels, verbose):
    """Memory of normal frames of a class (few-shot scoring).

    Runs the visual model on normal frames and keeps their patch tokens (L2-normalised V-V tokens,
    the ones the prompts score). Predict, stream and calibrate threshold then add a memory branch:
    a patch far from every normal patch scores high (docs/method.md). Stored as
    memory.<sha>.safetensors beside the other classes' memories; it is dropped when the visual model
    is re-exported. Calibrate thresholds again afterwards: those made without the memory are not
    applied with it.
    """
    import itertools

    from anoclip.runtime.detector import Detector
    from anoclip.runtime.inputs import FrameReader, plan_inputs
    from anoclip.runtime.plumbing import ensure_writable_folder

    from .memory import calibrate_memory

    configure_logging(verbose)
    reader = FrameReader(plan_inputs(normal, stride, "--normal"), stride, max_pixels)
    detector = Detector.load(artifacts_dir, backend=backend, tiling=tiling, threads=threads, max_pixels=max_pixels,
                             load_thresholds=False, memory="off")
    detector.class_prompts(cls)
    ensure_writable_folder(artifacts_dir, "--artifacts")
    ctx = click.get_current_context()
    report = calibrate_memory(detector, cls, itertools.islice(reader.frames(), max_frames), max_patches=max_patches,
                              augment=augment, extend=extend, normal=list(normal),
                              command=given_command(ctx, "anoclip", "calibrate", "memory"),
                              total=min(reader.expected, max_frames) if reader.expected else None)
    folder = Path(artifacts_dir)
    added = f" added to its {report.earlier} earlier rows" if report.earlier else ""
    click.echo(f"{cls}: memory of {report.kept} patch tokens from {report.frames} normal frame(s){added} "
               f"({report.patches} before the coreset; covering radius {report.covering_radius:.4f} in score units)",
               err=True)
    click.echo(f"stored in {folder / report.file}; predict and stream now add the memory branch for {cls} "
               f"(recalibrate its thresholds: `anoclip calibrate threshold --artifacts {folder} --class {cls} "
               "--normal ...`)", err=True)
    if reader.skipped:
        click.echo(f"{len(reader.skipped)} input(s) could not be read and were skipped (listed above)", err=True)
