"""``anoclip calibrate``: turn exported artifacts into deployable ones, with the runtime only.

Subcommands: ``threshold`` (score and pixel thresholds of a class from normal frames), ``memory``
(the memory of normal frames of a class, ``memory_cli``), ``int8``
and ``fp16`` (reduced-precision models of the visual model, checked against it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from anoclip.runtime.options import (detector_options, max_pixels_option, memory_options, threads_option,
                                     tta_config_from, verbose_option)
from anoclip.runtime.plumbing import configure_logging, given_command, run_guarded

from .threshold import DEFAULT_PIXEL_QUANTILE, DEFAULT_QUANTILE, PIXELS_PER_FRAME

DEFAULT_MAX_FRAMES = 5000


@click.group("calibrate", context_settings={"help_option_names": ["-h", "--help"]})
def calibrate_group():
    """Make exported artifacts ready to deploy (no PyTorch needed).

    threshold: image-score and pixel thresholds of a class from normal frames, so that predict and
    stream decide "anomalous" and outline regions instead of reporting scores only.

    memory: the memory of normal frames of a class (their patch tokens), which adds a few-shot branch
    to the scores and maps.

    int8, fp16: reduced-precision models of the visual model (Q/DQ int8 for CPUs and TensorRT, fp16
    for GPUs), checked against it before they are stored; run them with --precision.
    """


@calibrate_group.command("threshold")
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export; the thresholds are stored in it.")
@click.option("--class", "cls", required=True, help="Class to calibrate (baked into the prompt weights, e.g. bottle).")
@click.option("--normal", multiple=True, required=True,
              help="Normal (defect-free) input: an image, a folder of images, a quoted glob pattern of images or a "
                   "video file (.mp4, .avi, .mkv, .mov, .webm, ...). Repeat for more. Use frames of the scene the "
                   "detector will watch. Images that cannot be read are skipped, and counted at the end.")
@click.option("--quantile", default=DEFAULT_QUANTILE, show_default=True, type=click.FloatRange(0, 1),
              help="The image threshold is this quantile of the normal frames' scores (plus --margin): a share of "
                   "about 1-Q of normal frames will be called anomalous. Needs at least 1/(1-Q) frames to mean that. "
                   "Not with --false-alarm-rate.")
@click.option("--false-alarm-rate", "false_alarm_rate", default=None,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Instead of --quantile: a stated false-alarm rate A in (0, 1). With n normal frames the image "
                   "threshold is the k-th smallest of their scores, k = ceil((n+1)(1-A)) (split conformal "
                   "prediction), plus --margin: a new normal frame exchangeable with the calibration frames (same "
                   "scene, camera and settings, not picked or ordered by their scores) scores above it with "
                   "probability at most A. Needs at least ceil(1/A)-1 frames (99 for 0.01); fewer is refused "
                   "before any frame is scored when the count is known (images), else after reading them.")
@click.option("--margin", default=0.0, show_default=True, type=float,
              help="Added to the score quantile, in score units (p_abnormal). Default 0: the quantile already sets "
                   "the false-alarm rate, and scores have no fixed scale (they stay near 0.5), so choose a margin "
                   "against the spread of normal scores this command reports; positive: fewer false alarms, more "
                   "missed defects. With --false-alarm-rate it is added on top of the k-th score and must be >= 0: "
                   "the rate then stays at most A (lower, by an amount the margin does not state).")
@click.option("--pixel-quantile", default=DEFAULT_PIXEL_QUANTILE, show_default=True, type=click.FloatRange(0, 1),
              help="The pixel threshold is this quantile of all normal map values (plus --pixel-margin); map "
                   "pixels above it form the reported regions. The default 1 takes the largest value any normal "
                   "frame reached, so that normal frames show no regions (maps are smooth: below 1, most normal "
                   "frames show small ones); lower it (e.g. 0.9999) when a few normal frames are outliers.")
@click.option("--pixel-margin", default=0.0, show_default=True, type=float,
              help="Added to the map quantile, in score units; as --margin.")
@click.option("--stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Use every N-th frame of videos (neighbouring frames are near copies).")
@click.option("--max-frames", default=DEFAULT_MAX_FRAMES, show_default=True, type=click.IntRange(min=1),
              help=f"Use at most this many frames in all (each keeps up to {PIXELS_PER_FRAME} map values in memory).")
@click.option("--replace-file", is_flag=True,
              help="Start a new thresholds file holding only this class; the way out when the current one fails "
                   "its check. Without it, the other classes' thresholds are kept.")
@detector_options
@memory_options
@threads_option()
@max_pixels_option("Largest image (width x height) decoded; larger files are refused unread.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored thresholds and their provenance as JSON.")
@verbose_option
def threshold_command(artifacts_dir, cls, normal, quantile, false_alarm_rate, margin, pixel_quantile, pixel_margin,
                      stride, max_frames, replace_file, backend, model, precision, tiling, smoothing_sigma, tta,
                      tta_backend, tta_steps, tta_adapter, tta_init, tta_state, seed, memory, memory_weight, threads,
                      max_pixels, as_json, verbose):
    """Thresholds of a class from normal frames.

    An image-score threshold (a frame scoring above it is anomalous) and a pixel threshold (map
    pixels above it form the reported regions), from the scores and maps of normal frames.

    Scores every normal frame as predict would (same --model, --tiling and --tta options: calibrate
    with the settings you will run with; thresholds made with others are not applied, with a
    warning). The thresholds are stored in the artifact folder beside those of the other classes
    (thresholds.<sha>.json, named and hashed by the manifest); predict and stream then use them.
    Thresholds measured on another visual model or other prompts of the class are not applied
    either: re-run this command after such an export.

    With --false-alarm-rate A the image threshold carries a guarantee instead of an estimate: for
    normal frames exchangeable with those calibrated on, at most a share A of them is called
    anomalous (in expectation over calibration and new frames). The stored record says which rule
    made the threshold (quantile or conformal), A, the rank k and that assumption.
    """
    from anoclip.runtime.detector import Detector
    from anoclip.runtime.errors import AnoclipError
    from anoclip.runtime.plumbing import ensure_writable_folder

    from anoclip.runtime.inputs import FrameReader, plan_inputs

    from .threshold import ThresholdSettings, calibrate_threshold

    configure_logging(verbose)
    ctx = click.get_current_context()
    if false_alarm_rate is not None and ctx.get_parameter_source("quantile") != click.core.ParameterSource.DEFAULT:
        raise AnoclipError("--false-alarm-rate and --quantile both set the image threshold; give one of them")
    try:
        settings = ThresholdSettings(quantile, margin, pixel_quantile, pixel_margin, false_alarm_rate)
    except ValueError as exc:
        raise AnoclipError(f"{exc}; see --help") from None
    tta_config = tta_config_from(tta, tta_steps, tta_adapter, tta_init, tta_state, seed)
    sources = plan_inputs(normal, stride, "--normal")
    reader = FrameReader(sources, stride, max_pixels)
    if false_alarm_rate is not None:  # too few frames for the conformal rank: refused before any is scored
        known = None if any(s.video for s in sources) else len(sources)  # a video's frame count is an estimate
        settings.check_frame_count(min(known, max_frames) if known is not None else max_frames)
    detector = Detector.load(artifacts_dir, backend=backend, model=model, precision=precision, tiling=tiling,
                             smoothing_sigma=smoothing_sigma, threads=threads, tta=tta_config or False,
                             tta_backend=tta_backend, max_pixels=max_pixels,
                             load_thresholds=False, memory=memory, memory_weight=memory_weight)
    detector.resolve_classes([cls])  # an unknown class, or --memory on without a memory: fail before any frame
    if tta_config is not None:
        detector.tta_adapter(cls, tta_config)  # a TTA graph that does not fit: fail before any frame too
    ensure_writable_folder(artifacts_dir, "--artifacts")
    record, name = calibrate_threshold(
        detector, cls, reader.frames(), settings, normal=list(normal),
        command=_command_line(), total=reader.expected, max_frames=max_frames,
        replace_file=replace_file)
    folder = Path(artifacts_dir)
    if record.rank is None:
        image_line = (f"{cls}: image threshold {record.image:.6g} = quantile {record.quantile:g} of {record.frames} "
                      f"normal scores ({record.image_quantile_value:.6g}) + margin {record.margin:g}")
    else:
        image_line = (f"{cls}: image threshold {record.image:.6g} = the k = {record.rank}-th smallest of n = "
                      f"{record.frames} normal scores ({record.image_quantile_value:.6g}) + margin {record.margin:g}; "
                      f"k = ceil((n+1)(1-α)) with α = {record.false_alarm_rate:g}: a new normal frame exchangeable "
                      f"with these scores above it with probability at most {record.false_alarm_rate:g}")
    for line in (
        image_line,
        f"{cls}: pixel threshold {record.pixel:.6g} = quantile {record.pixel_quantile:g} of {record.pixel_values} "
        f"map values ({record.pixel_quantile_value:.6g}) + margin {record.pixel_margin:g}",
        f"{cls}: normal scores min {record.score_min:.6g}, mean {record.score_mean:.6g}, max {record.score_max:.6g}",
        f"{cls}: scored " + ("zero-shot (no memory of normal frames)" if record.memory == "off" else
                             f"with the memory of normal frames {record.memory_sha256[:12]}" +
                             (f" at weight {record.memory_weight:g}" if record.memory == "on" else " alone")),
        f"stored in {folder / name}; `anoclip predict --artifacts {folder} --class {cls} ...` now decides with them",
    ):
        click.echo(line, err=True)
    if reader.skipped:
        click.echo(f"{len(reader.skipped)} input(s) could not be read and were skipped (listed above); the thresholds "
                   f"are of the {record.frames} frames read", err=True)
    if as_json:
        click.echo(json.dumps({"class": cls, "file": str(folder / name), **asdict(record)}, indent=2))


def _gate_options(precision: str):
    """The parity gate's options, with the precision's defaults."""
    from .parity import DEFAULT_GATES

    gate = DEFAULT_GATES[precision]

    def decorate(command):
        command = click.option(
            "--min-map-r", default=-1.0, show_default=True, type=click.FloatRange(-1, 1),
            help="Also require this mean Pearson r between the anomaly maps of this model and the fp32 one (-1: "
                 "reported only; r is ill-conditioned on the nearly flat maps of normal frames).")(command)
        command = click.option(
            "--max-map-error", default=gate.max_map_error, show_default=True, type=click.FloatRange(min=0),
            help="Parity gate: the same for the anomaly maps (smoothed and upsampled as predict makes them).")(command)
        command = click.option(
            "--max-score-error", default=gate.max_patch_error, show_default=True, type=click.FloatRange(min=0),
            help="Parity gate: the largest RMS difference of the patch scores (p_abnormal of each patch token, "
                 "before the map is smoothed) from fp32's, over the spread (standard deviation) of fp32's patch scores "
                 "over all parity inputs, for every class of the folder. Where the folder has thresholds, the image "
                 "decisions at them must also agree on every parity input.")(command)
        return click.option(
            "--min-cosine", default=gate.min_patch_cosine, show_default=True, type=click.FloatRange(-1, 1),
            help="Parity gate: the least mean cosine between the patch tokens of this model and the fp32 one. Below "
                 "the gate the run fails and nothing is written (README, Reduced precision).")(command)
    return decorate


def _gate(min_cosine: float, max_score_error: float, max_map_error: float, min_map_r: float):
    from .parity import Gate

    return Gate(min_patch_cosine=min_cosine, max_patch_error=max_score_error, max_map_error=max_map_error,
                min_map_r=min_map_r)


def _report_stored(folder: str, precision: str, file: str, as_json: bool, entry) -> None:
    click.echo(f"stored {Path(folder) / file} as the manifest's visual_{precision} model; run it with "
               f"`anoclip predict --artifacts {folder} --precision {precision} ...`", err=True)
    if as_json:
        click.echo(json.dumps({"model": f"visual_{precision}", "file": str(Path(folder) / file), **asdict(entry)},
                              indent=2))


def _reduced_model_options(precision: str, images_help: str, parity_help: str):
    """The options int8 and fp16 share: the folder, the frames, the parity gate, threads and output."""
    options = [
        click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
                     help=f"Artifact folder written by anoclip-export; the {precision} model is stored in it "
                          f"(visual_{precision})."),
        click.option("--images", multiple=True, help=images_help),
        click.argument("paths", nargs=-1),
        click.option("--parity-frames", default=16, show_default=True, type=click.IntRange(min=1), help=parity_help),
        click.option("--stride", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Use every N-th video frame."),
        max_pixels_option(),
        _gate_options(precision),
        threads_option(),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the stored manifest entry (with its provenance) as JSON."),
        verbose_option,
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@calibrate_group.command("int8")
@click.option("--n", "frames", default=64, show_default=True, type=click.IntRange(min=1),
              help="Frames to calibrate the activation ranges on.")
@click.option("--method", default="minmax", show_default=True, type=click.Choice(["minmax", "entropy", "percentile"]),
              help="Activation ranges: minmax (largest |x| seen), entropy (KL-optimal clipping) or percentile "
                   "(99.999th of |x|). minmax measured as good as the others on ViT-B-16-plus-240.")
@click.option("--keep-float/--no-keep-float", "accuracy_aware", default=True, show_default=True,
              help="When the int8 model fails the parity gate, measure which quantized MatMuls hurt most on the parity "
                   "frames and keep them in float until it passes, ending at weights-only (what was kept and why is "
                   "printed and recorded in the model's provenance). --no-keep-float: refuse instead.")
@click.option("--weights-only", is_flag=True,
              help="Quantize only the matrix products with weights, not those of attention (q·kᵀ, softmax·v, "
                   "v·vᵀ): maps closer to fp32 (Pearson r 0.9996 instead of 0.996 on ViT-B-16-plus-240), about 1.3x "
                   "slower on a CPU (148 instead of 115 ms on a 2-core AMD EPYC).")
@_reduced_model_options(
    "int8", images_help="Frames of the scene to calibrate on (defect-free frames are the normal case): an image, a "
                        "folder of images or a video. Repeat, or list more paths after the options.",
    parity_help="Inputs the int8 model is checked on against fp32: frames held out of the calibration (while 3/4 of "
                "the frames remain for it), topped up with augmented views of calibration frames.")
def int8_command(artifacts_dir, images, paths, frames, parity_frames, method, accuracy_aware, weights_only, stride,
                 max_pixels, min_cosine, max_score_error, max_map_error, min_map_r, threads, as_json, verbose):
    """INT8 model of the visual model: static Q/DQ, calibrated on frames of the scene.

    Quantizes the inputs of every MatMul, Gemm and Conv, attention products included (int8,
    symmetric, zero point 0; weights per output channel) and leaves LayerNormalization, Softmax, GELU
    and every Add (CLIP's residual stream holds channels with |x| ~1000) in float, and the outputs of
    the quantized ops too: explicit quantization that onnxruntime runs on CPUs and
    TensorRT 10/11 builds (`anoclip build-engine --precision int8`). Frames are preprocessed as
    predict does (no tiles); unreadable ones are skipped and counted. The model is then checked
    against fp32 on held-out frames (patch cosine, patch score and map errors relative to their
    spread, decisions at the folder's thresholds) and stored only when it passes; when the full
    int8 model does not, the MatMuls that hurt most are kept in float until it does.
    """
    from .int8 import Int8Scheme, calibrate_int8

    configure_logging(verbose)
    inputs = list(images) + list(paths)
    if not inputs:
        raise click.UsageError("give the frames to calibrate on with --images (images, folders or videos)")
    file, entry, _ = calibrate_int8(
        artifacts_dir, inputs, frames=frames, parity_frames=parity_frames,
        scheme=Int8Scheme(method, not weights_only), stride=stride, max_pixels=max_pixels,
        gate=_gate(min_cosine, max_score_error, max_map_error, min_map_r), command=_command_line(), threads=threads,
        report=lambda line: click.echo(line, err=True), accuracy_aware=accuracy_aware)
    _report_skipped(entry)
    _report_stored(artifacts_dir, "int8", file, as_json, entry)


@calibrate_group.command("fp16")
@_reduced_model_options(
    "fp16", images_help="Optional frames of the scene to check the fp16 model on (images, folders, videos; repeat, or "
                        "list more paths after the options); without them it is checked on synthetic textures.",
    parity_help="Inputs the fp16 model is checked on against fp32.")
def fp16_command(artifacts_dir, images, paths, parity_frames, stride, max_pixels, min_cosine, max_score_error,
                 max_map_error, min_map_r, threads, as_json, verbose):
    """fp16 model of the visual model, for GPUs (TensorRT, CUDA).

    Every float operation in fp16 except LayerNormalization and Softmax, kept in fp32 (in fp16 they
    overflow on CLIP's outlier channels); the input and outputs stay fp32. Checked against fp32 like
    int8 and stored only above the gate. CPUs gain nothing from it: onnxruntime runs most fp16
    operations on the CPU through casts.
    """
    from .fp16 import calibrate_fp16

    configure_logging(verbose)
    file, entry, _ = calibrate_fp16(
        artifacts_dir, list(images) + list(paths), parity_frames=parity_frames, stride=stride, max_pixels=max_pixels,
        gate=_gate(min_cosine, max_score_error, max_map_error, min_map_r), command=_command_line(), threads=threads,
        report=lambda line: click.echo(line, err=True))
    _report_skipped(entry)
    _report_stored(artifacts_dir, "fp16", file, as_json, entry)


def _report_skipped(entry) -> None:
    skipped = entry.provenance["frames"].get("skipped") or []
    if skipped:
        click.echo(f"{len(skipped)} input(s) could not be read and were skipped (listed above); the model was made "
                   f"from the {entry.provenance['frames']['read']} frames read", err=True)


def _command_line() -> str:
    ctx = click.get_current_context()
    return given_command(ctx, "anoclip", "calibrate", ctx.command.name)


from .memory_cli import memory_command  # noqa: E402 - registered after the group exists

calibrate_group.add_command(memory_command)


def main() -> None:
    run_guarded(calibrate_group)
