"""anoclip stream: sources, capture, the pipeline and its file sinks, on clips made with OpenCV.

Decisions are tested with ``RedDefectBackend`` (tests/fakes.py) behind a real Detector: a red
square is a defect, so events must turn anomalous exactly at the frame it appears. The command
line runs the real tiny ONNX model (random weights: scores mean nothing there, the plumbing does).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
from anoclip.runtime.stream import capture as capture_module
from anoclip.runtime.stream.sinks import EventsLog, SavedFrames, VideoRecorder
from anoclip.runtime.stream.sources import check_backend, csi_pipeline, unique_names
from conftest import one_error_line
from fakes import defect_frame, normal_frame, red_defect_detector, write_clip

CLASSES = ["bottle", "carpet"]


def _frame_count(path) -> int:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    count = 0
    while capture.read()[0]:
        count += 1
    return count


def _read_events(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


# ----------------------------------------------------------------------------------------------
# Sources


def test_sources_by_kind(tmp_path):
    clip = write_clip(tmp_path / "clip.avi", 3)
    camera = parse_source("0", CLASSES, "bottle")
    assert (camera.kind, camera.target, camera.name) == ("device", 0, "camera0")
    assert parse_source("/dev/video2", CLASSES).live and parse_source("/dev/video2", CLASSES).name == "video2"
    spec = parse_source(f"{clip}=carpet", CLASSES, "bottle")
    assert (spec.kind, spec.cls, spec.live, spec.target, spec.name) == ("file", "carpet", False, str(clip), "clip.avi")
    url = "rtsp://admin:secret@10.0.0.5:554/stream?channel=1&subtype=0"
    spec = parse_source(url, CLASSES, "bottle")
    assert (spec.kind, spec.target, spec.cls) == ("url", url, "bottle")  # '=' inside a URL stays in it
    assert spec.name == "10.0.0.5/stream"  # no credentials in event names
    assert parse_source(url + "=carpet", CLASSES).cls == "carpet"
    pipeline = "videotestsrc ! video/x-raw,width=64 ! appsink"
    assert parse_source(pipeline, CLASSES, "bottle").kind == "gstreamer"
    spec = parse_source("csi://1?width=1280&height=720&fps=60", CLASSES, "bottle")
    assert spec.target == csi_pipeline(1, 1280, 720, 60) and spec.name == "csi1"
    names = [s.name for s in unique_names([parse_source(str(clip), CLASSES, "bottle")] * 3)]
    assert names == ["clip.avi", "clip.avi-2", "clip.avi-3"]
    assert "nvarguscamerasrc sensor-id=1" in spec.target and spec.target.endswith("appsink drop=true max-buffers=1 sync=false")


@pytest.mark.parametrize("text, message", [
    ("videotestsrc ! autovideosink", "must end in `! appsink`"),
    ("ftp://host/clip.mp4", "unknown scheme"),
    ("missing.mp4", "no such file"),
    ("csi://left", "csi://N"),
    ("csi://0?exposure=3", "not a csi:// setting"),
])
def test_bad_sources(text, message):
    with pytest.raises(AnoclipError, match=message.replace("(", r"\(")):
        parse_source(text, CLASSES, "bottle")


def test_gstreamer_source_needs_opencv_with_gstreamer():
    import cv2

    if cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(AnoclipError, match="needs OpenCV built with GStreamer"):
        check_backend(parse_source("csi://0", CLASSES, "bottle"))


# ----------------------------------------------------------------------------------------------
# The pipeline with the red-defect backend


@pytest.fixture(scope="module")
def defect_detector(tiny_artifacts):
    return red_defect_detector(tiny_artifacts, "bottle")


@pytest.fixture(scope="module")
def thresholds(defect_detector):
    """Image and pixel thresholds just above what normal frames give."""
    results = [defect_detector.predict(normal_frame(i)[:, :, ::-1], "bottle") for i in range(0, 40, 3)]
    image = max(r.score for r in results)
    pixel = max(float(r.anomaly_map_full.max()) for r in results)
    return image + 1e-3, pixel + 1e-3


def _run(detector, specs, sinks, **options) -> dict:
    pipeline = StreamPipeline(detector, specs, sinks, StreamOptions(stats_interval=0, **options))
    pipeline.open()
    return pipeline.run()


def test_defect_turns_events_anomalous_at_its_frame(tmp_path, defect_detector, thresholds):
    clip = write_clip(tmp_path / "line.avi", 40, defect_from=25)
    events, video = tmp_path / "events.jsonl", tmp_path / "annotated.avi"
    spec = parse_source(str(clip), CLASSES, "bottle")
    summary = _run(defect_detector, [spec], [EventsLog(events), VideoRecorder(video, 1, [25.0]),
                                             SavedFrames(tmp_path / "saved")],
                   threshold=thresholds[0], pixel_threshold=thresholds[1])
    records = _read_events(events)
    assert [r["frame"] for r in records] == list(range(40))  # a file: every frame, in order, none dropped
    assert [r["anomalous"] for r in records] == [False] * 25 + [True] * 15
    assert all(not r["regions"] for r in records[:25])
    for record in records[25:]:  # the region lies on the red square (x 48..88, y 40..80)
        x, y, w, h = record["regions"][0]["box"]
        assert x < 88 and x + w > 48 and y < 80 and y + h > 40
    assert summary["frames_processed"] == 40 and summary["dropped"] == 0 and summary["anomalous"] == 15
    assert _frame_count(video) == 40
    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert len(saved) == 30 and saved[0] == "0-line.avi_00000025.jpg" and saved[1] == "0-line.avi_00000025_map.npy"
    saved_map = np.load(tmp_path / "saved" / saved[1])
    assert saved_map.shape == (128, 128) and saved_map.dtype == np.float32
    assert set(records[0]["timings_ms"]) >= {"wait", "preprocess", "model", "scoring", "total", "added"}


def test_calibrated_thresholds_decide_by_default(tmp_path, tiny_artifacts):
    from anoclip.calibration.threshold import ThresholdSettings, calibrate_threshold
    from conftest import copy_artifacts

    folder = copy_artifacts(tiny_artifacts, tmp_path / "artifacts")
    normal_clip = write_clip(tmp_path / "normal.avi", 30)
    capture = cv2.VideoCapture(str(normal_clip))
    normal = [frame[:, :, ::-1] for ok, frame in iter(capture.read, (False, None))]
    settings = ThresholdSettings(quantile=1.0, margin=1e-4, pixel_quantile=1.0, pixel_margin=1e-4)
    calibrate_threshold(red_defect_detector(folder, "bottle"), "bottle", normal, settings)
    clip = write_clip(tmp_path / "line.avi", 30, defect_from=20)
    events = tmp_path / "events.jsonl"
    detector = red_defect_detector(folder, "bottle")  # loads the folder's thresholds
    _run(detector, [parse_source(str(clip), CLASSES, "bottle")], [EventsLog(events)])
    records = _read_events(events)
    assert [r["anomalous"] for r in records] == [False] * 20 + [True] * 10
    assert records[0]["threshold"] == detector.threshold_for("bottle").image
    assert all(r["regions"] for r in records[20:]) and not any(r["regions"] for r in records[:20])


def test_sources_of_two_classes_batch_and_stride(tmp_path, defect_detector, thresholds):
    first = write_clip(tmp_path / "a.avi", 12, defect_from=6)
    second = write_clip(tmp_path / "b.avi", 12)
    events = tmp_path / "events.jsonl"
    specs = [parse_source(str(first), CLASSES, "bottle"), parse_source(str(second), CLASSES, "bottle")]
    summary = _run(defect_detector, specs, [EventsLog(events)], stride=2, threshold=thresholds[0])
    records = _read_events(events)
    by_source = {name: [r for r in records if r["source"] == name] for name in ("a.avi", "b.avi")}
    assert [r["frame"] for r in by_source["a.avi"]] == [0, 2, 4, 6, 8, 10]
    assert [r["anomalous"] for r in by_source["a.avi"]] == [False] * 3 + [True] * 3
    assert not any(r["anomalous"] for r in by_source["b.avi"])
    assert summary["frames_processed"] == 12 and summary["mean_batch"] > 1  # both sources in one model run


def test_a_folder_of_images_is_a_source_read_in_order_through_the_one_reader(tmp_path, defect_detector, thresholds):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:02d}.png"), defect_frame(i) if i >= 4 else normal_frame(i))
    (folder / "02b.png").write_bytes(b"not an image")  # skipped with a line, counted as corrupt
    events = tmp_path / "events.jsonl"
    spec = parse_source(f"{folder}=carpet", CLASSES, "bottle")
    assert (spec.kind, spec.name, spec.cls, spec.live, len(spec.inputs)) == ("images", "shots", "carpet", False, 7)
    pattern = parse_source(str(folder / "0[0-2].png"), CLASSES, "bottle")
    assert pattern.kind == "images" and [s.path.name for s in pattern.inputs] == ["00.png", "01.png", "02.png"]
    summary = _run(defect_detector, [parse_source(str(folder), CLASSES, "bottle")],
                   [EventsLog(events), SavedFrames(tmp_path / "saved")], stride=3, threshold=thresholds[0])
    records = _read_events(events)
    assert [r["source"] for r in records] == [str(folder / f"{i:02d}.png") for i in range(6)]  # every image
    assert {r["frame"] for r in records} == {0} and [r["anomalous"] for r in records] == [False] * 4 + [True] * 2
    assert summary["frames_processed"] == 6 and summary["corrupt"] == 1 and summary["dropped"] == 0
    assert sorted(p.name for p in (tmp_path / "saved").glob("*.jpg")) == ["0-shots_04.jpg", "0-shots_05.jpg"]


@pytest.mark.parametrize("text, message", [
    ("{tmp}/empty", "holds no images"),
    ("{tmp}/*.gif", "matches no images"),
])
def test_image_sources_without_images_are_one_error(tmp_path, text, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnoclipError, match=message):
        parse_source(text.format(tmp=tmp_path), CLASSES, "bottle")


def test_finite_sources_keep_to_the_pixel_limit(tmp_path, defect_detector):
    clip = write_clip(tmp_path / "clip.avi", 3)
    pipeline = StreamPipeline(defect_detector, [parse_source(str(clip), CLASSES, "bottle")], [],
                              StreamOptions(stats_interval=0, max_pixels=100 * 100))
    with pytest.raises(AnoclipError, match="128 x 128 pixels, above the limit of 10000"):
        pipeline.open()


def test_without_threshold_scores_are_reported_undecided(tmp_path, defect_detector):
    clip = write_clip(tmp_path / "clip.avi", 4)
    events = tmp_path / "events.jsonl"
    _run(defect_detector, [parse_source(str(clip), CLASSES, "bottle")], [EventsLog(events)])
    records = _read_events(events)
    assert len(records) == 4 and all(r["anomalous"] is None and r["regions"] == [] for r in records)
    assert all(0 < r["score"] < 1 for r in records)


def test_region_of_interest_crops_frames(tmp_path, defect_detector, thresholds):
    clip = write_clip(tmp_path / "clip.avi", 3, defect_from=0)
    events = tmp_path / "events.jsonl"
    _run(defect_detector, [parse_source(str(clip), CLASSES, "bottle")], [EventsLog(events)],
         roi=(0, 0, 40, 128), threshold=thresholds[0])  # left strip: the red square is outside it
    assert [r["anomalous"] for r in _read_events(events)] == [False] * 3


# ----------------------------------------------------------------------------------------------
# Capture: drops, corrupt frames, reconnects (a scripted capture stands in for a camera)


class ScriptedCapture:
    """A camera that yields ``frames`` frames (``None`` entries are corrupt reads) then dies."""

    def __init__(self, frames, delay=0.0):
        self.frames, self.delay, self.position = list(frames), delay, 0

    def read(self):
        time.sleep(self.delay)
        if self.position >= len(self.frames):
            return False, None
        image = self.frames[self.position]
        self.position += 1
        return True, image

    def grab(self):
        return self.read()[0]

    def get(self, prop):
        return 0.0

    def set(self, prop, value):
        return True

    def release(self):
        pass


def test_live_source_reconnects_resets_tta_and_counts(tmp_path, tiny_artifacts, monkeypatch):
    from anoclip.runtime.tta import TTAConfig

    opened = []
    sessions = [[normal_frame(i) for i in range(5)] + [None], [normal_frame(i) for i in range(5)], None,
                [normal_frame(i) for i in range(3)]]

    def fake_open(spec):
        opened.append(time.perf_counter())
        script = sessions[len(opened) - 1] if len(opened) <= len(sessions) else None
        return None if script is None else ScriptedCapture(script, delay=0.02)

    monkeypatch.setattr(capture_module, "open_capture", fake_open)
    monkeypatch.setattr(capture_module, "BACKOFF_START_S", 0.05)
    detector = red_defect_detector(tiny_artifacts, "bottle", tta=TTAConfig(steps=1))
    resets = []
    original_reset = detector.reset_tta
    monkeypatch.setattr(detector, "reset_tta", lambda cls=None, state=None: (resets.append(state), original_reset(cls, state)))
    events = tmp_path / "events.jsonl"
    spec = parse_source("rtsp://camera.invalid/line", CLASSES, "bottle")
    pipeline = StreamPipeline(detector, [spec], [EventsLog(events)], StreamOptions(stats_interval=0))
    pipeline.open()
    threading.Timer(3.0, pipeline.stop.set).start()
    summary = pipeline.run()
    source = summary["sources"][0]
    assert source["reconnects"] == 2  # the second session ended, one reopen failed, the third opened
    assert source["corrupt"] == 1
    assert source["read"] == 14 and summary["frames_processed"] + source["dropped"] == 13
    assert resets and set(resets) == {"camera.invalid/line"}
    assert opened[2] - opened[1] >= 0.05 and opened[3] - opened[2] >= 0.1  # backoff doubles


def test_live_source_keeps_only_the_newest_frame(tmp_path, tiny_artifacts, monkeypatch):
    frames = [normal_frame(i) for i in range(60)]
    cameras = [ScriptedCapture(frames, delay=0.002)]  # opens once; reopening it later fails
    monkeypatch.setattr(capture_module, "open_capture", lambda spec: cameras.pop() if cameras else None)
    detector = red_defect_detector(tiny_artifacts, "bottle")
    slow_predict = detector.predict_batch

    def predict_batch(*args, **kwargs):
        time.sleep(0.05)  # a model slower than the camera
        return slow_predict(*args, **kwargs)

    monkeypatch.setattr(detector, "predict_batch", predict_batch)
    events = tmp_path / "events.jsonl"
    pipeline = StreamPipeline(detector, [parse_source("0", CLASSES, "bottle")], [EventsLog(events)],
                              StreamOptions(stats_interval=0))
    pipeline.open()
    threading.Timer(1.5, pipeline.stop.set).start()
    summary = pipeline.run()
    source = summary["sources"][0]
    assert source["dropped"] > 20 and source["processed"] < 20
    assert source["processed"] + source["dropped"] == source["offered"] == 60
    indexes = [r["frame"] for r in _read_events(events)]
    assert indexes == sorted(indexes) and indexes[-1] == 59  # the newest frame is always the one taken


# ----------------------------------------------------------------------------------------------
# The command line, with the real tiny model


def _stream_cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "stream", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_cli_streams_a_file_to_every_file_sink(tmp_path, tiny_artifacts):
    clip = write_clip(tmp_path / "clip.avi", 20, defect_from=10)
    events, video = tmp_path / "events.jsonl", tmp_path / "out.mp4"
    process = _stream_cli("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "carpet",
                          "--events", str(events), "--record", str(video), "--save-dir", str(tmp_path / "saved"),
                          "--threshold", "0.0", "--pixel-threshold", "1.0")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["frames_processed"] == 20 and summary["sink_errors"] == {}
    records = _read_events(events)
    assert [r["frame"] for r in records] == list(range(20)) and all(r["anomalous"] for r in records)
    assert _frame_count(video) == 20
    assert len(list((tmp_path / "saved").glob("*.jpg"))) == 20
    assert not list(tmp_path.glob(".*recording*"))


def test_sigint_finalises_recording_and_events(tmp_path, tiny_artifacts):
    clip = write_clip(tmp_path / "clip.avi", 10)
    events, video = tmp_path / "events.jsonl", tmp_path / "out.avi"
    process = _stream_cli("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle", "--loop",
                          "--events", str(events), "--record", str(video))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not events.exists() or len(events.read_bytes().splitlines()) < 15):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    records = _read_events(events)  # every line parses: only whole lines were written
    assert len(records) == summary["frames_processed"] >= 15
    assert _frame_count(video) == len(records)  # the recording was finalised and holds every scored frame


@pytest.mark.parametrize("args, message", [
    (["--source", "{tmp}/missing.avi"], "no such file"),
    (["--source", "{tmp}/not-a-video.mp4"], "cannot open source"),
    (["--source", "csi://0"], "GStreamer"),
    (["--source", "{clip}", "--class", "wood"], "wood"),
    (["--source", "{clip}", "--record", "{tmp}/out.gif"], "unknown video type"),
    (["--source", "{clip}", "--show"], "GUI"),
    (["--source", "{clip}", "--roi", "200,0,10,10"], "starts outside the 128x128 frames"),
])
def test_cli_bad_input_is_one_error_line(tmp_path, tiny_artifacts, args, message):
    if "--show" in args and cv2.getBuildInformation().count("GUI:                           NONE") == 0:
        pytest.skip("this OpenCV has GUI support")
    if "csi://0" in args and cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        pytest.skip("this OpenCV has GStreamer")
    clip = write_clip(tmp_path / "clip.avi", 2)
    (tmp_path / "not-a-video.mp4").write_text("hello")
    args = [a.format(tmp=tmp_path, clip=clip) for a in args]
    process = _stream_cli("--artifacts", str(tiny_artifacts), "--class", "bottle", *args)
    out, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert message in one_error_line(err)
    assert not list(tmp_path.glob("*.gif"))
