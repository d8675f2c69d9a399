"""MVTec AD / VisA folder layouts and synthetic sets, and the command that writes a synthetic set.

Loaders and mask reading live in :mod:`.layouts` (SPEC section 6), the procedural generators in
:mod:`.synthetic`; this module re-exports both.

Command line::

    python -m anoclip.benchmarks.accuracy.datasets make --layout mvtec --out samples/mvtec
    python -m anoclip.benchmarks.accuracy.datasets clip --out samples/line.avi
"""

from __future__ import annotations

from pathlib import Path

import click

from ..options import FrameSize
from .layouts import (DATASET_TITLES, DATASETS, MVTEC_CLASSES, MVTEC_TEXTURES, VISA_CLASSES, VISA_COLUMNS, VISA_CSV,
                      Sample, list_classes, load_mvtec, load_visa, read_mask)
from .synthetic import DEFECT_KINDS, make_clip, make_mvtec_like, make_visa_like

__all__ = ["DATASETS", "DATASET_TITLES", "DEFECT_KINDS", "MVTEC_CLASSES", "MVTEC_TEXTURES", "VISA_CLASSES",
           "VISA_COLUMNS", "VISA_CSV", "Sample", "list_classes", "load_mvtec", "load_visa", "main", "make_mvtec_like",
           "make_visa_like", "read_mask"]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@click.group()
def main() -> None:
    """Dataset tools for the AnoCLIP benchmarks."""


@main.command("make")
@click.option("--layout", type=click.Choice(DATASETS), required=True,
              help="Folder layout to write: 'mvtec' (MVTec AD) or 'visa' (VisA with 1cls.csv).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Root folder to write the set into (created if missing).")
@click.option("--classes", default=None,
              help="Comma-separated class names. Default: carpet,bottle (mvtec) or candle,pcb1 "
                   "(visa). MVTec texture names get textures, other names objects.")
@click.option("--n-normal", type=click.IntRange(min=0), default=3, show_default=True,
              help="Normal images per class and split (train and test each).")
@click.option("--n-anomalous", type=click.IntRange(min=0), default=3, show_default=True,
              help="Anomalous test images per class (scratch, spot, hole in turn).")
@click.option("--size", default=None, type=FrameSize(square=True),
              help="Image size: N (square) or WxH. Default: 256 (mvtec), 320x240 (visa).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed; the same seed always writes the same images.")
def make_command(layout: str, out: Path, classes: str | None, n_normal: int, n_anomalous: int,
                 size: tuple[int, int] | None, seed: int) -> None:
    """Write a small license-clean synthetic set (procedural images with exact masks)."""
    names = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None
    try:
        if layout == "mvtec":
            if size is not None and size[0] != size[1]:
                raise click.BadParameter("MVTec-like images are square: give one number",
                                         param_hint="--size")
            root = make_mvtec_like(out, names or ("carpet", "bottle"), n_good=n_normal,
                                   n_defect=n_anomalous, size=size[0] if size else 256,
                                   seed=seed)
        else:
            root = make_visa_like(out, names or ("candle", "pcb1"), n_normal=n_normal,
                                  n_anomaly=n_anomalous, size=size or (320, 240), seed=seed)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    found = list_classes(root, layout)
    click.echo(f"wrote a {layout} layout with classes {', '.join(found)} to {root}")


@main.command("clip")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Video file to write: .avi (MJPEG) or .mp4 (MPEG-4).")
@click.option("--class", "cls", default="bottle", show_default=True, help="Synthetic class of the part shown.")
@click.option("--frames", type=click.IntRange(min=1), default=150, show_default=True, help="Length in frames.")
@click.option("--defect-from", type=click.IntRange(min=0), default=100, show_default=True,
              help="First frame showing the defect (>= --frames: none does).")
@click.option("--no-defect", is_flag=True, help="A clip of normal frames only (for calibrating).")
@click.option("--defect", type=click.Choice(DEFECT_KINDS), default="scratch", show_default=True, help="Kind of defect.")
@click.option("--size", default="320x240", show_default=True, type=FrameSize(), help="WIDTHxHEIGHT of the frames.")
@click.option("--fps", type=click.FloatRange(min=1), default=25.0, show_default=True, help="Frame rate stored in the file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the part; the same seeds write the same clip.")
@click.option("--variation-seed", type=int, default=None,
              help="Give every frame its own lighting and sensor noise, drawn with this seed: clips of the same part "
                   "with different variation seeds share no frame (calibrate on one, inspect another).")
def clip_command(out: Path, cls: str, frames: int, defect_from: int, no_defect: bool, defect: str,
                 size: tuple[int, int], fps: float, seed: int, variation_seed: int | None) -> None:
    """Write a synthetic inspection clip: a part jittering under the camera, defective from a known frame."""
    defect_from = frames if no_defect else defect_from
    try:
        make_clip(out, cls, frames, defect_from, size, fps, seed, defect, variation_seed)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    shown = f"from frame {defect_from}" if defect_from < frames else "in no frame"
    click.echo(f"wrote {frames} frames of {cls} to {out}; the {defect} shows {shown}")


if __name__ == "__main__":
    main()
