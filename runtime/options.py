"""The command-line options that several commands share (predict, stream, serve, calibrate
threshold), declared once: the detector set-up, the threshold overrides, ``--server``, and how
the commands turn them into a Detector (or a client of servers) and a TTA configuration."""

from __future__ import annotations

import math

import click

from .backends import BACKEND_CHOICES
from .errors import AnoclipError
from .preprocess import DEFAULT_MAX_PIXELS
from .vocabulary import TTA_BACKENDS


def _finite(ctx, param, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter("must be a finite number")
    return value


# Overlays, saved frames and maps of frames above this many pixels are written scaled down to it (a
# float32 map of 8192 x 8192 would be 256 MiB); the map's own resolution is the model grid, upsampled.
DEFAULT_MAX_OUTPUT_PIXELS = 4096 * 4096


def max_output_pixels_option(help_text: str = "Overlays and maps of larger frames are written scaled down to this "
                                              "many pixels (0: never)."):
    return click.option("--max-output-pixels", default=DEFAULT_MAX_OUTPUT_PIXELS, show_default=True,
                        type=click.IntRange(min=0), help=help_text)


def threads_option(help_text: str = "CPU threads for onnxruntime."):
    return click.option("--threads", default=None, type=click.IntRange(min=1), help=help_text)


def max_pixels_option(help_text: str = "Largest image (width x height) decoded; larger files are refused unread."):
    return click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
                        help=help_text)


no_verify_option = click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifacts at load.")
colour_scale_option = click.option(
    "--colour-scale", "colour_scale", default="fixed", show_default=True, type=click.Choice(["fixed", "frame"]),
    help="Heat-map colours. fixed: tied to each class's calibrated pixel threshold (coolest at the normal centre, "
         "amber at the threshold, red at twice its distance), the same on every frame, camera and run; a class "
         "without a calibrated pixel threshold gets frame, since nothing fixes the scale then. frame: each map's "
         "own min..max.")
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")


def detector_options(command):
    """The options that set up the Detector the way ``predict`` runs it (backend, model, tiling,
    TTA); the command receives them as keyword arguments (``tta_config_from`` turns the TTA ones
    into a TTAConfig)."""
    options = [
        click.option("--backend", default="auto", show_default=True,
                     type=click.Choice(BACKEND_CHOICES),
                     help="onnxruntime execution provider; auto prefers TensorRT, then CUDA, then CPU."),
        click.option("--model", default="visual", show_default=True,
                     type=click.Choice(["visual", "visual_qkv", "fused"]),
                     help="visual: AnoCLIP V-V tokens; visual_qkv: the plain-CLIP baseline (if exported); fused: "
                          "anoclip.onnx of `anoclip fuse`, scores and maps of its classes from one graph."),
        click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
                     help="Of the visual model: fp32 as exported; int8 the Q/DQ model of `anoclip calibrate int8`; "
                          "fp16 that of `anoclip calibrate fp16`. With --backend tensorrt-native: the engine of that "
                          "precision (`anoclip build-engine --precision`), whatever model it was built from. "
                          "Thresholds hold for the precision they were calibrated with."),
        click.option("--tiling", default="auto", show_default=True, type=click.Choice(["auto", "never", "always"]),
                     help="Cut frames far from square (aspect > 1.2) into overlapping square tiles."),
        click.option("--smoothing-sigma", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="Gaussian smoothing of the maps, in model pixels (0: off, as published). Thresholds hold "
                          "for the smoothing they were calibrated with."),
        click.option("--tta", is_flag=True,
                     help="AnoCLIP+: adapt the patch tokens at test time (maps change, scores do not)."),
        click.option("--tta-backend", default="numpy", show_default=True, type=click.Choice(TTA_BACKENDS),
                     help="What runs the --tta loop: numpy array code on the CPU, the same code on CuPy arrays on "
                          "the GPU (extra cupy), or the exported tta.onnx through onnxruntime (export with --tta)."),
        click.option("--tta-steps", default=5, show_default=True, type=click.IntRange(min=1),
                     help="Adapter steps per image."),
        click.option("--tta-adapter", default="text", show_default=True, type=click.Choice(["text", "linear"]),
                     help="text: tanh adapter over the prompt embeddings (authors' MVTec code); "
                          "linear: their VisA script."),
        click.option("--tta-init", default="random", show_default=True, type=click.Choice(["random", "prompts"]),
                     help="random: like torch.nn.Linear, re-drawn per image (authors' code); prompts: from T (paper)."),
        click.option("--tta-state", default="persistent", show_default=True, type=click.Choice(["persistent", "fresh"]),
                     help="persistent: one AdamW state per class across images (authors' code); "
                          "fresh: new per image."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the TTA draws (parameters, noise)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def memory_options(command):
    """--memory and --memory-weight: the memory branch of the scores (`anoclip calibrate memory`),
    passed as ``memory`` and ``memory_weight``."""
    from .memory import DEFAULT_WEIGHT, MEMORY_MODES

    command = click.option("--memory-weight", default=DEFAULT_WEIGHT, show_default=True, type=click.FloatRange(0, 1),
                           help="Weight w of the memory branch: score and map are w * memory + (1 - w) * zero-shot.")(
        command)
    return click.option("--memory", default="auto", show_default=True, type=click.Choice(MEMORY_MODES),
                        help="The memory of normal frames (`anoclip calibrate memory`): auto uses it for the classes "
                             "that have one; on requires it; off scores zero-shot only; only scores with the memory "
                             "alone. Thresholds hold for the memory setting they were calibrated with.")(command)


def threshold_options(command):
    """--threshold (passed as ``image_threshold``) and --pixel-threshold: overrides of the calibrated thresholds."""
    command = click.option("--pixel-threshold", default=None, type=float, callback=_finite,
                           help="Map threshold: pixels above it form the reported regions, outlined in the overlay. "
                                "Overrides the class's calibrated one.")(command)
    return click.option("--threshold", "image_threshold", default=None, type=float, callback=_finite,
                        help="Image-score threshold: an image or frame scoring above it is anomalous. Overrides the "
                             "class's calibrated one (from `anoclip calibrate threshold`).")(command)


# Options that set up a model run here; with --server the servers' own settings apply instead.
LOCAL_MODEL_OPTIONS = ("artifacts_dir", "backend", "model", "precision", "tiling", "smoothing_sigma", "tta", "tta_backend",
                       "tta_steps", "tta_adapter", "tta_init", "tta_state", "seed", "threads", "no_verify", "memory",
                       "memory_weight")


def server_option(command):
    """--server URL (repeatable): score on `anoclip serve` servers instead of a local model."""
    return click.option("--server", "servers", multiple=True, metavar="URL",
                        help="Score on `anoclip serve` servers (Triton: http://HOST:8000 or grpc://HOST:8001) instead "
                             "of a local model; repeat it for several: requests are spread over them and one a server "
                             "fails goes to another. The model, thresholds and TTA settings are the servers'.")(command)


def load_detector(artifacts_dir: str | None, servers: tuple[str, ...], **options):
    """The local Detector of ``artifacts_dir`` (``options`` as ``Detector.load`` takes them), or the
    client of ``servers``, which answers the same calls with the same results."""
    ctx = click.get_current_context()
    if servers:
        given = [p.opts[0] for p in ctx.command.params if p.name in LOCAL_MODEL_OPTIONS
                 and ctx.get_parameter_source(p.name) not in (click.core.ParameterSource.DEFAULT, None)]
        if given:
            raise click.UsageError(f"{', '.join(given)} set up a local model; with --server the servers' model and "
                                   "settings apply (give those options to `anoclip serve`)")
        try:
            from anoclip.runtime.serving.client import RemoteDetector
        except ImportError as exc:
            raise AnoclipError(f"--server needs {exc.name or 'tritonclient'}; install it with "
                               "`pip install 'anoclip[client]'`") from None
        return RemoteDetector(list(servers))
    if not artifacts_dir:
        raise click.UsageError("give --artifacts DIR (the model runs here) or --server URL (on `anoclip serve` servers)")
    from .detector import Detector

    return Detector.load(artifacts_dir, **options)


def tta_config_from(tta: bool, tta_steps: int, tta_adapter: str, tta_init: str, tta_state: str, seed: int):
    """The TTAConfig of the TTA options (None without --tta); a usage error for settings that do not go together."""
    from .tta import TTAConfig

    if not tta:
        return None
    try:
        return TTAConfig(steps=tta_steps, adapter=tta_adapter, init=tta_init, state_policy=tta_state, seed=seed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
