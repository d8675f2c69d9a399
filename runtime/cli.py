"""The ``anoclip`` command group. Stages installed beside the runtime add their own subcommands
through the ``anoclip.commands`` entry-point group (``export`` from the export extra, ...)."""

from __future__ import annotations

import io
import logging
import math
import re
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import click
import numpy as np

from .errors import AnoclipError
from .options import detector_options, load_detector, server_option, threshold_options, tta_config_from
from .plumbing import configure_logging, run_guarded
from .preprocess import DEFAULT_MAX_PIXELS

log = logging.getLogger(__name__)

EXIT_SOME_FAILED = 3
# Overlays and maps of frames above this many pixels are written scaled down to it (a float32 map
# of 8192 x 8192 would be 256 MiB); the map's own resolution is the model grid, upsampled.
DEFAULT_MAX_OUTPUT_PIXELS = 4096 * 4096


class PluginGroup(click.Group):
    """A group whose extra commands come from installed entry points, loaded only when used."""

    def _plugins(self) -> dict:
        return {ep.name: ep for ep in entry_points(group="anoclip.commands")}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        plugin = self._plugins().get(name)
        if plugin is None:
            return None
        try:
            return plugin.load()
        except ImportError as exc:
            missing = exc.name or str(exc)

            @click.command(name, help=f"(unavailable: needs {missing})", add_help_option=False,
                           context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
            def unavailable():
                raise AnoclipError(f"`anoclip {name}` needs {missing}; install it with `pip install 'anoclip[{name}]'`")

            return unavailable


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """AnoCLIP zero-shot anomaly localisation: export, calibrate, predict images, inspect streams, benchmark."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@cli.command("predict")
@click.option("--artifacts", "artifacts_dir", default=None, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export (or --server).")
@server_option
@click.option("--class", "cls", required=True,
              help="Class name baked into the prompt weights (e.g. bottle); several separated by commas, or 'all': "
                   "one run of the visual model scores them all, one result line and map per class.")
@click.option("--out", "out_dir", default="anoclip-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for results.jsonl and, per run, a folder <run>/ of overlays (<name>_overlay.png) "
                   "and raw maps (<name>_map.npy; <name>_<class>_... with several classes).")
@detector_options
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Heat-map opacity.")
@threshold_options
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Largest image (width x height) decoded; files claiming more are skipped unread.")
@click.option("--max-output-pixels", default=DEFAULT_MAX_OUTPUT_PIXELS, show_default=True, type=click.IntRange(min=0),
              help="Overlays and maps of larger frames are written scaled down to this many pixels (0: never).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifacts at load.")
@click.option("--json", "as_json", is_flag=True, help="Also print each result line to stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.argument("paths", nargs=-1, required=True)
def predict_command(artifacts_dir, servers, cls, out_dir, backend, model, precision, tiling, smoothing_sigma, tta, tta_backend, tta_steps, tta_adapter,
                    tta_init, tta_state, seed, alpha, image_threshold, pixel_threshold, threads, max_pixels,
                    max_output_pixels, no_verify, as_json, verbose, paths):
    """Score images (files or folders of images) and write anomaly maps.

    Each run writes into OUT/<run>/ (<run> = UTC time and process id), per image (and class, with
    several: <name>_<class>_...): <name>_overlay.png (heat map over the image, colour range = the map's own min..max) and
    <name>_map.npy (float32 map at the image's resolution, raw p_abnormal; scaled down above
    --max-output-pixels), and appends one line per image to OUT/results.jsonl, under a lock, never
    truncating it: runs at the same time or one after another keep every line and every file. Every
    input gets its own <name> (images sharing a stem take their suffix: a_png, a_jpg). OUT itself is
    never searched for inputs. Unreadable images, and files above --max-pixels, are reported and
    skipped; the exit code is then 3.

    With thresholds for the class (calibrated, or --threshold / --pixel-threshold), each line says
    "anomalous" (score > threshold) and lists the "regions" of the map above the pixel threshold
    ({"box": [x, y, width, height], "area": pixels}), outlined in the overlay; without, they are
    null and [] and only scores are reported.
    """
    from tqdm import tqdm

    from .outputs import IMAGE_SUFFIXES, ResultsLog, discover_images, run_id
    from .plumbing import ensure_writable_folder
    from .preprocess import decode_image, read_file
    from .records import make_record

    configure_logging(verbose)
    tta_config = tta_config_from(tta, tta_steps, tta_adapter, tta_init, tta_state, seed)
    out = Path(out_dir)
    images = discover_images(paths, exclude=out)
    if not images:
        raise AnoclipError(f"no images found in {', '.join(paths)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    detector = load_detector(artifacts_dir, servers, backend=backend, model=model, precision=precision, tiling=tiling,
                             smoothing_sigma=smoothing_sigma, verify=not no_verify, threads=threads,
                             tta=tta_config or False, tta_backend=tta_backend, max_pixels=max_pixels)
    classes = detector.resolve_classes([c.strip() for c in cls.split(",") if c.strip()] if "," in cls else cls)
    for name in classes if tta_config is not None else ():
        detector.tta_adapter(name, tta_config)  # a TTA graph that does not fit: fail before any image too
    detector.threshold_override = (image_threshold, pixel_threshold)
    for name in classes:
        detector.threshold_for(name)  # says once, before any image, when a class has no threshold
    suffixes = class_suffixes(classes)
    ensure_writable_folder(out)
    run = run_id()
    run_dir = out / run  # this run's overlays and maps: no other run, at the same time or later, writes here
    run_dir.mkdir()
    failed = 0
    with ResultsLog(out) as results, tqdm(images, desc="predict", unit="img", file=sys.stderr, disable=None) as bar:
        for path, key in bar:
            captured = time.time()
            try:
                data = read_file(path)
                rgb = decode_image(data, max_pixels, str(path))
                # a remote detector is sent the encoded file as it is, a local one the decoded pixels
                result = detector.predict(data if getattr(detector, "sends_encoded", False) else rgb, classes)
            except AnoclipError as exc:
                failed += 1
                log.error("skipped %s: %s", path, exc)
                continue
            for name, one in result.by_class.items():
                files = _write_maps(run_dir, key + suffixes[name], rgb, one.anomaly_map_full, alpha, max_output_pixels,
                                    one.threshold.pixel if one.threshold else None)
                line = results.append(make_record(one, str(path), captured=captured, run=run, files=files))
                if as_json:
                    click.echo(line, nl=False)
    ok = len(images) - failed
    click.echo(f"{ok} of {len(images)} images scored; results appended to {results.path} (run {run})", err=True)
    if failed:
        click.echo(f"{failed} image(s) could not be read and were skipped", err=True)
        sys.exit(EXIT_SOME_FAILED)


def class_suffixes(classes: list[str]) -> dict[str, str]:
    """The part each class adds to output names: none for one class; ``_<class>`` with several (the
    name's characters other than letters, digits, ``.``, ``-`` and ``_`` replaced, unique)."""
    if len(classes) == 1:
        return {classes[0]: ""}
    suffixes: dict[str, str] = {}
    for name in classes:
        base = "_" + (re.sub(r"[^\w.-]+", "-", name)[:48] or "class")
        suffix, n = base, 1
        while suffix in suffixes.values():
            n += 1
            suffix = f"{base}-{n}"
        suffixes[name] = suffix
    return suffixes


def _write_maps(out: Path, key: str, rgb: np.ndarray, amap: np.ndarray, alpha: float,
                max_pixels: int | None, pixel: float | None = None) -> dict:
    """Write <key>_overlay.png (with the outlines of the regions above ``pixel``, when given) and
    <key>_map.npy into ``out`` atomically (scaled down above ``max_pixels``)."""
    import cv2

    from .overlay import draw_regions, encode_png, overlay
    from .plumbing import atomic_write_bytes

    height, width = amap.shape
    if max_pixels and height * width > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        amap = cv2.resize(amap, size, interpolation=cv2.INTER_AREA)
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    overlay_path, map_path = out / f"{key}_overlay.png", out / f"{key}_map.npy"
    image = overlay(rgb, amap, alpha)
    if pixel is not None:
        image = draw_regions(image, amap, pixel)
    atomic_write_bytes(overlay_path, encode_png(image))
    atomic_write_bytes(map_path, _npy_bytes(amap.astype(np.float32)))
    return {"overlay": str(overlay_path), "map": str(map_path), "map_shape": list(amap.shape)}


def main() -> None:
    run_guarded(cli)
