"""The ``anoclip`` command group. Stages installed beside the runtime add their own subcommands
through the ``anoclip.commands`` entry-point group (``export`` from the export extra, ...)."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from .errors import AnoclipError
from .options import (colour_scale_option, detector_options, load_detector, max_output_pixels_option,
                      max_pixels_option, memory_options, no_verify_option, server_option, threads_option,
                      threshold_options, tta_config_from, verbose_option)
from .plumbing import configure_logging, run_guarded

log = logging.getLogger(__name__)

EXIT_SOME_FAILED = 3


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
@click.version_option(package_name="anoclip", prog_name="anoclip", message="%(prog)s %(version)s")
def cli():
    """AnoCLIP zero-shot anomaly localisation: export, calibrate, predict images, inspect streams, benchmark."""


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
@memory_options
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="Heat-map opacity.")
@colour_scale_option
@threshold_options
@threads_option()
@click.option("--stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Score every Nth frame of video inputs.")
@max_pixels_option("Largest image or video frame (width x height) decoded; images claiming more are skipped "
                   "unread, videos with larger frames are skipped.")
@max_output_pixels_option()
@no_verify_option
@click.option("--json", "as_json", is_flag=True, help="Also print each result line to stdout.")
@verbose_option
@click.argument("paths", nargs=-1, required=True)
def predict_command(artifacts_dir, servers, cls, out_dir, backend, model, precision, tiling, smoothing_sigma, tta, tta_backend, tta_steps, tta_adapter,
                    tta_init, tta_state, seed, memory, memory_weight, alpha, colour_scale, image_threshold, pixel_threshold, threads, stride, max_pixels,
                    max_output_pixels, no_verify, as_json, verbose, paths):
    """Score images and videos (image files, folders of images, quoted glob patterns, video files)
    and write anomaly maps: the finite case of `anoclip stream`, with the same reader, scoring and
    records.

    Each run writes into OUT/<run>/ (<run> = UTC time and process id), per image or video frame (and
    class, with several: <name>_<class>_...): <name>_overlay.png (heat map over the image with its
    colour bar: --colour-scale fixed, the default, ties the colours to the class's calibrated pixel
    threshold, the same on every image; frame, and classes without a calibrated pixel threshold,
    spread the map's own min..max) and <name>_map.npy (float32 map at the image's resolution, raw
    p_abnormal; scaled down above --max-output-pixels), and appends one record per image (video:
    per --stride-th frame; "frame" is its index) to OUT/results.jsonl, under a lock, never
    truncating it: runs at the same time or one after another keep every line and every file. Every
    input gets its own <name> (images sharing a stem take their suffix: a_png, a_jpg; a video's
    frames <stem>_<frame>). OUT itself is never searched for inputs. A missing input, a folder
    without images or a video that cannot be opened stops the run before any image is scored;
    unreadable images, and images above --max-pixels, are reported and skipped; the exit code is
    then 3.

    With thresholds for the class (calibrated, or --threshold / --pixel-threshold), each line says
    "anomalous" (score > threshold) and lists the "regions" of the map above the pixel threshold
    ({"box": [x, y, width, height], "area": pixels}), outlined in the overlay; without, they are
    null and [] and only scores are reported.
    """
    from .inputs import plan_inputs
    from .outputs import RESULTS
    from .plumbing import ensure_writable_folder
    from .stream.pipeline import StreamOptions, StreamPipeline
    from .stream.sinks import EventsLog, PredictionFiles, class_suffixes
    from .stream.sources import SourceSpec

    configure_logging(verbose)
    tta_config = tta_config_from(tta, tta_steps, tta_adapter, tta_init, tta_state, seed)
    out = Path(out_dir)
    inputs = tuple(plan_inputs(paths, stride, exclude=out))
    detector = load_detector(artifacts_dir, servers, backend=backend, model=model, precision=precision, tiling=tiling,
                             smoothing_sigma=smoothing_sigma, verify=not no_verify, threads=threads,
                             tta=tta_config or False, tta_backend=tta_backend, max_pixels=max_pixels,
                             memory=memory, memory_weight=memory_weight)
    classes = detector.resolve_classes([c.strip() for c in cls.split(",") if c.strip()] if "," in cls else cls)
    for name in classes if tta_config is not None else ():
        detector.tta_adapter(name, tta_config)  # a TTA graph that does not fit: fail before any image too
    detector.threshold_override = (image_threshold, pixel_threshold)
    for name in classes:
        detector.threshold_for(name)  # says once, before any image, when a class has no threshold
    ensure_writable_folder(out)
    # the inputs are one finite source of the stream's pipeline: read in order by the one reader, no frame
    # dropped, scored one frame per model run, written by the sinks of the stream's saved frames and events
    source = SourceSpec("inputs", " ".join(paths), "images", "", tuple(classes) if len(classes) > 1 else classes[0],
                        live=False, inputs=inputs)
    options = StreamOptions(stride=stride, max_pixels=max_pixels, threshold=image_threshold,
                            pixel_threshold=pixel_threshold, alpha=alpha, max_batch=1, stats_interval=0,
                            stop_on_sink_error=True)
    pipeline = StreamPipeline(detector, [source], [], options)
    run_dir = out / pipeline.run_id  # this run's overlays and maps: no other run, at the same time or later, writes here
    run_dir.mkdir()
    results = EventsLog(out / RESULTS, echo=(lambda line: click.echo(line, nl=False)) if as_json else None,
                        option="--out")
    pipeline.sinks += [PredictionFiles(run_dir, class_suffixes(classes), alpha, max_output_pixels, colour_scale),
                       results, _Progress(sum(s.expected for s in inputs) if all(s.expected for s in inputs) else None)]
    pipeline.open()
    summary = pipeline.run()
    for name, error in pipeline.sink_errors.items():
        raise AnoclipError(f"writing the {name} of run {pipeline.run_id} failed: {error}")
    scored, failed = summary["frames_processed"], summary["failed"] + summary["corrupt"]
    unit = "frames" if any(s.video for s in inputs) else "images"
    click.echo(f"{scored} of {scored + failed} {unit} scored; results appended to {results.path} "
               f"(run {pipeline.run_id})", err=True)
    if failed:
        click.echo(f"{failed} input(s) could not be read or scored and were skipped", err=True)
        sys.exit(EXIT_SOME_FAILED)


class _Progress:
    """predict's progress bar, as a sink of the pipeline."""

    name = "progress bar"
    draws = False

    def __init__(self, total: int | None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="predict", unit="img", file=sys.stderr, disable=None)

    def write(self, event) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


from .classes_cli import classes_group  # noqa: E402 - registered after the group exists

cli.add_command(classes_group)


def main() -> None:
    run_guarded(cli)
