"""``anoclip stream``: inspect camera streams, video files and network streams live."""

from __future__ import annotations

import json
import logging
import signal
import sys

import click

from ..options import (colour_scale_option, detector_options, load_detector, max_output_pixels_option,
                       max_pixels_option, memory_options, no_verify_option, server_option, threads_option,
                       threshold_options, tta_config_from, verbose_option)
from ..plumbing import configure_logging
from .pipeline import StreamOptions, StreamPipeline
from .sources import parse_source

log = logging.getLogger(__name__)

EXIT_SINK_FAILED = 3  # also: frames that could not be scored (as predict's exit for skipped images)
DEFAULT_RECORD_FPS = 10.0


DEFAULT_ENROL_FRAMES = 40  # --enrol continuous without a count


def _enrol(ctx, param, value):
    """--enrol N or continuous -> (frames, continuous), None when not given."""
    if value is None:
        return None
    if value == "continuous":
        return DEFAULT_ENROL_FRAMES, True
    try:
        frames = int(value)
    except ValueError:
        frames = 0
    if frames < 2:
        raise click.BadParameter("give a number of frames (2 or more) or 'continuous'")
    return frames, False


def _roi(ctx, param, value):
    if value is None:
        return None
    try:
        numbers = tuple(int(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 4 or numbers[0] < 0 or numbers[1] < 0 or numbers[2] <= 0 or numbers[3] <= 0:
        raise click.BadParameter("write X,Y,WIDTH,HEIGHT in frame pixels, e.g. 100,0,640,480")
    return numbers


@click.command("stream")
@click.option("--artifacts", "artifacts_dir", default=None, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export (or --server).")
@server_option
@click.option("--source", "sources", multiple=True, required=True, metavar="SRC[=CLASS]",
              help="Repeatable. A camera index (0), /dev/videoN, a video file, a folder of images, an image or a "
                   "quoted glob pattern of images (read in order like a video), rtsp:// or http(s):// (anything "
                   "FFmpeg opens), a GStreamer pipeline ending in appsink, or csi://N (Jetson CSI camera, "
                   "?width=&height=&fps= optional). =CLASS scores this source for CLASS instead of --class.")
@click.option("--class", "cls", default=None, help="Class for every source without its own =CLASS.")
@detector_options
@memory_options
@threads_option()
@threshold_options
@click.option("--enrol", default=None, callback=_enrol, metavar="N|continuous",
              help="Learn the scene first: the first N frames of every source (after --enrol-skip) are taken as "
                   "normal (events say phase enrolling, no decision); every other one builds the class's memory of "
                   "normal frames (added to the one in force), the rest its thresholds, both committed to the "
                   f"folder; then it inspects. 'continuous': {DEFAULT_ENROL_FRAMES} frames (none when the class "
                   "already has a memory and thresholds in force), then frames that pass with --enrol-margin keep "
                   "refreshing both, at most once per --enrol-refresh seconds; SIGUSR1 freezes and resumes that.")
@click.option("--enrol-skip", default=0, show_default=True, type=click.IntRange(min=0),
              help="Warm-up frames per source not used for enrolment (auto exposure settling).")
@click.option("--enrol-false-alarm-rate", default=None, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Take the enrolled thresholds by the conformal rule at this false-alarm rate (as calibrate "
                   "threshold --false-alarm-rate; needs N/2 >= ceil(1/A)-1), instead of the 0.995 quantile.")
@click.option("--enrol-image-margin", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Added to the enrolled image threshold, in score units (as calibrate threshold --margin): fewer "
                   "false alarms than the rule states, a defect must score that much higher.")
@click.option("--enrol-refresh", default=300.0, show_default=True, type=click.FloatRange(min=0),
              help="With --enrol continuous: seconds between refreshes at least.")
@click.option("--enrol-window", default=64, show_default=True, type=click.IntRange(min=2),
              help="With --enrol continuous: most recent passing frames a refresh uses, for the memory and for the "
                   "thresholds each.")
@click.option("--enrol-margin", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="With --enrol continuous: a frame joins only with a score at least this far below the threshold.")
@click.option("--enrol-quiet", default=10, show_default=True, type=click.IntRange(min=0),
              help="With --enrol continuous: nor within this many frames of an anomalous frame of its source.")
@click.option("--roi", default=None, callback=_roi, metavar="X,Y,W,H",
              help="Inspect only this rectangle of every frame (maps, regions and recordings are of the crop).")
@click.option("--stride", default=1, show_default=True, type=click.IntRange(min=1),
              help="Score every Nth frame of cameras, streams and videos (an image source: every image).")
@click.option("--max-fps", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Score at most this many frames a second per source (files are slowed down to it).")
@click.option("--loop", is_flag=True, help="Start video files and image sources again at their end (until stopped).")
@max_pixels_option("Largest frame (width x height): larger images of an image source are skipped unread (counted "
                   "as corrupt), a video file of larger frames is refused, and larger frames of cameras and network "
                   "streams are scaled down to it before scoring (counted as scaled), so memory stays bounded.")
@max_output_pixels_option("Saved frames and maps (--save-dir) of larger frames are written scaled down to this many "
                          "pixels (0: never).")
@click.option("--realtime", is_flag=True,
              help="Read video files at their own frame rate like a camera, dropping what the model cannot keep up "
                   "with (default: every frame of a file is scored).")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Most frames (of different sources) scored in one model run.")
@click.option("--record", default=None, type=click.Path(dir_okay=False),
              help="Write the annotated frames as a video (.mp4 or .avi; FILE-<n> per source when there are several).")
@click.option("--record-fps", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Frame rate of the recording (default: the source's rate divided by --stride, else 10).")
@click.option("--events", default=None, type=click.Path(dir_okay=False),
              help="Append one JSON line per scored frame: source, frame index, capture time, score, decision, "
                   "regions, per-stage latency.")
@click.option("--save-dir", default=None, type=click.Path(file_okay=False),
              help="Save every anomalous frame (annotated .jpg) and its map (.npy) here.")
@click.option("--show", is_flag=True, help="Show the annotated frames in a window (needs OpenCV with GUI support).")
@click.option("--web", default=None, metavar="HOST:PORT",
              help="Serve a live view (MJPEG per source, stats as JSON) on this address, e.g. 127.0.0.1:8080. "
                   "It has no authentication: keep it on loopback or a trusted network.")
@click.option("--mqtt", default=None, metavar="URL", help="Publish each decision to this broker "
                                                           "(mqtt://host[:port] or mqtts://; QoS 1, reconnecting).")
@click.option("--topic", default="anoclip/events", show_default=True,
              help="MQTT topic; {source} is replaced by the source name.")
@click.option("--alpha", default=0.4, show_default=True, type=click.FloatRange(0, 1), help="Heat-map opacity.")
@colour_scale_option
@click.option("--stats-interval", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between stats lines in the log (0: none).")
@no_verify_option
@verbose_option
def stream_command(artifacts_dir, servers, sources, cls, backend, model, precision, tiling, smoothing_sigma, tta, tta_backend, tta_steps, tta_adapter,
                   tta_init, tta_state, seed, memory, memory_weight, threads, image_threshold, pixel_threshold, enrol,
                   enrol_skip, enrol_false_alarm_rate, enrol_image_margin, enrol_refresh, enrol_window, enrol_margin, enrol_quiet, roi,
                   stride, max_fps, loop, max_pixels, realtime, batch, record, record_fps, events, save_dir,
                   max_output_pixels, show, web, mqtt, topic, alpha, colour_scale, stats_interval, no_verify, verbose):
    """Score camera streams, network streams, video files and images frame by frame.

    One capture thread per source keeps only its newest frame (a live source never builds a backlog;
    dropped frames are counted); one inference worker scores the newest frames of all sources in
    batches; sinks (--record, --events, --save-dir, --show, --web, --mqtt) run beside it. A live
    source that dies is reopened with backoff; a video file or image source ends the stream at its end
    (--loop repeats it).
    Thresholds come from `anoclip calibrate threshold` (or --threshold/--pixel-threshold); without
    them, scores and maps are reported with no decision. With --tta, every source adapts its own state
    (--tta-state persistent: across its frames), which starts afresh when the source reconnects. Ctrl-C or SIGTERM stops cleanly: the
    recording is finalised and checked, the events file holds whole lines; a second Ctrl-C stops at
    once and removes the unfinished recording. Prints a JSON summary at the end: per sink ("sinks"),
    the frames written and lost; a frame that could not be scored is an events line with "error".
    Exit 3 when a sink failed or lost frames, or frames could not be scored ("frames_failed"); exit 1
    when every --server is gone.
    """
    configure_logging(verbose)
    tta_config = tta_config_from(tta, tta_steps, tta_adapter, tta_init, tta_state, seed)
    if not (record or events or save_dir or show or web or mqtt):
        log.warning("no sink given (--events, --record, --save-dir, --web, --mqtt, --show): only the summary is printed")
    detector = load_detector(artifacts_dir, servers, backend=backend, model=model, precision=precision, tiling=tiling,
                             smoothing_sigma=smoothing_sigma, verify=not no_verify, threads=threads,
                             tta=tta_config or False, tta_backend=tta_backend, memory=memory,
                             memory_weight=memory_weight)
    specs = [parse_source(text, detector.classes, cls) for text in sources]
    if enrol is not None and servers:
        raise click.UsageError("--enrol learns from the model's patch tokens here; the servers send none: give "
                               "--artifacts instead of --server")
    if enrol is not None:  # the memory --memory on|only asks for is made by the enrolment
        detector.enrolling = {spec.cls for spec in specs if isinstance(spec.cls, str)}
    for spec in specs:
        if spec.cls is None:
            raise click.UsageError(f"source {spec.uri!r} has no class: give --class or --source {spec.uri}=CLASS")
        detector.resolve_classes(spec.cls)  # an unknown class fails before any source opens
        if tta_config is not None:
            detector.tta_adapter(spec.cls, tta_config)  # so does a TTA graph that does not fit
    options = StreamOptions(stride=stride, max_fps=max_fps, loop=loop, realtime=realtime, roi=roi, max_pixels=max_pixels,
                            threshold=image_threshold,
                            pixel_threshold=pixel_threshold, alpha=alpha, colour_scale=colour_scale, max_batch=batch,
                            stats_interval=stats_interval)
    pipeline = StreamPipeline(detector, specs, [], options)
    if enrol is not None:
        pipeline.enrolment = _enrolment(detector, pipeline, enrol, enrol_skip, enrol_false_alarm_rate,
                                        enrol_image_margin, enrol_refresh, enrol_window, enrol_margin, enrol_quiet)
    pipeline.open()
    pipeline.sinks.extend(_sinks(pipeline, record, record_fps, events, save_dir, max_output_pixels, show, web, mqtt,
                                 topic))
    _stop_on_signals(pipeline)
    summary = pipeline.run()
    summary["sink_errors"] = pipeline.sink_errors
    click.echo(json.dumps(summary))
    if summary["frames_failed"]:
        log.error("%d frame(s) could not be scored (events lines with \"error\"): exit %d", summary["frames_failed"],
                  EXIT_SINK_FAILED)
    if pipeline.sink_errors or summary["frames_failed"]:  # even when the run otherwise finished
        sys.exit(EXIT_SINK_FAILED)


def _enrolment(detector, pipeline: StreamPipeline, enrol, skip, false_alarm_rate, image_margin, refresh, window, margin,
               quiet):
    from ..errors import AnoclipError
    from ..normal_frames import ThresholdSettings
    from ..plumbing import given_command
    from .enrol import EnrolSettings, Enrolment

    frames, continuous = enrol
    multi = [spec.name for spec in pipeline.sources if not isinstance(spec.cls, str)]
    if multi:
        raise click.UsageError(f"--enrol learns one class per source; {multi[0]} is scored for several")
    try:
        settings = EnrolSettings(frames, skip, continuous, ThresholdSettings(margin=image_margin,
                                                                               false_alarm_rate=false_alarm_rate),
                                 refresh_s=refresh, window=window, margin=margin, quiet=quiet)
    except ValueError as exc:
        raise AnoclipError(f"--enrol: {exc}") from None
    from ..plumbing import ensure_writable_folder

    ensure_writable_folder(detector.artifacts.folder, "--artifacts")
    command = given_command(click.get_current_context(), "anoclip", "stream")
    enrolment = Enrolment(detector, {spec.name: spec.cls for spec in pipeline.sources}, settings, command)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda signum, frame: enrolment.freeze())
    return enrolment


def _sinks(pipeline: StreamPipeline, record, record_fps, events, save_dir, max_output_pixels, show, web, mqtt,
           topic) -> list:
    from .sinks import EventsLog, SavedFrames, VideoRecorder, Window

    sinks = []
    if events:
        sinks.append(EventsLog(events))
    if record:
        rates = [record_fps or _record_rate(capture, pipeline.options) for capture in pipeline.captures]
        sinks.append(VideoRecorder(record, len(pipeline.captures), rates))
    if save_dir:
        sinks.append(SavedFrames(save_dir, max_pixels=max_output_pixels or None))
    if show:
        sinks.append(Window(pipeline.stop.set))
    if mqtt:
        from .mqtt import MqttSink

        sinks.append(MqttSink(mqtt, topic))
    if web:
        from .web import WebView

        sinks.append(WebView(web, [spec.name for spec in pipeline.sources]))
    return sinks


def _record_rate(capture, options: StreamOptions) -> float:
    rate = capture.fps / options.stride if capture.fps else DEFAULT_RECORD_FPS
    return min(rate, options.max_fps) if options.max_fps else rate


def _stop_on_signals(pipeline: StreamPipeline) -> None:
    """SIGINT and SIGTERM end the stream cleanly (a second SIGINT interrupts at once)."""

    def stop(signum, frame):
        if pipeline.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("stopping (%s): finishing the frames in flight and closing the outputs", signal.Signals(signum).name)
        pipeline.stop.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
