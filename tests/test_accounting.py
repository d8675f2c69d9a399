"""Every sink accounts for every frame (written, delivered or counted as lost, in the summary and the
exit code), and memory stays bounded on every path of the stream: full disks (a small tmpfs), a
broker that is never up, servers that go away, huge live frames, and a second SIGINT.

The detector is ``RedDefectBackend`` behind a real Detector (tests/fakes.py) where the pipeline is
driven directly, the real tiny ONNX model where the command line runs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from fakes import normal_frame, red_defect_detector, write_clip
from services import free_port
from test_stream import ScriptedCapture

from anoclip.runtime.errors import AnoclipError, ImageError
from anoclip.runtime.outputs import ResultsLog
from anoclip.runtime.serving.transport import ServersUnavailable
from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
from anoclip.runtime.stream import capture as capture_module
from anoclip.runtime.stream.pipeline import EventQueue
from anoclip.runtime.stream.sinks import EventsLog, SavedFrames, scaled_down

CLASSES = ["bottle", "carpet"]


def _stream_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "stream", *args],
                          capture_output=True, text=True, timeout=180)


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the file ends in a broken line"
    return [json.loads(line) for line in data.decode().splitlines()]


@contextlib.contextmanager
def small_disk(path: Path, size: str = "256k", free: int | None = None):
    """A tmpfs of ``size`` mounted at ``path`` (root only), filled up to ``free`` bytes left."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        if free is not None:
            stat = os.statvfs(path)
            with open(path / "filler", "wb") as filler:
                filler.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ----------------------------------------------------------------------------------------------
# Full disks


def test_recording_on_a_full_disk_is_a_sink_error_with_no_stub_left(tmp_path, tiny_artifacts):
    clip = write_clip(tmp_path / "clip.avi", 40)
    with small_disk(tmp_path / "disk", free=4 * 1024) as disk:
        events = tmp_path / "events.jsonl"
        done = _stream_cli("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle",
                           "--record", str(disk / "out.avi"), "--events", str(events))
        assert done.returncode == 3, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["frames_processed"] == 40
        assert summary["sinks"]["recording"] == {"written": 0, "lost": 40}
        assert "is full" in summary["sink_errors"]["recording"]
        assert "recorded 40 frames" not in done.stderr
        assert not (disk / "out.avi").exists() and not list(disk.glob(".*recording*"))  # no stub renamed into place
        assert summary["sinks"]["events"] == {"written": 40, "lost": 0} and len(_lines(events)) == 40


def test_recording_cut_short_by_a_full_disk_is_refused_at_close(tmp_path, monkeypatch):
    """The free-space check before each frame is stood in for (os.statvfs reports plenty), so the
    writer runs into the full tmpfs and only the check of the finished file can tell."""
    from anoclip.runtime.stream import sinks as sinks_module
    from anoclip.runtime.stream.sinks import VideoRecorder
    from test_stream_sinks import make_event

    with small_disk(tmp_path / "disk", free=16 * 1024) as disk:
        recorder = VideoRecorder(disk / "out.avi", 1, [10.0])
        plenty = os.statvfs_result((4096, 4096, 10**6, 10**6, 10**6, 10**6, 10**6, 10**6, 0, 255))
        monkeypatch.setattr(sinks_module.os, "statvfs", lambda path: plenty)
        for i in range(40):
            recorder.write(make_event(i))
        with pytest.raises(AnoclipError, match=r"40 frames written, the finished file cannot be opened or its last "
                                               r"frame read \(is the disk full\?\); it was removed"):
            recorder.close()
        assert recorder.counts() == {"written": 0, "lost": 40}
        assert not (disk / "out.avi").exists() and not list(disk.glob(".*recording*"))


def test_events_on_a_full_disk_keep_whole_lines(tmp_path, tiny_artifacts):
    clip = write_clip(tmp_path / "clip.avi", 40)
    with small_disk(tmp_path / "disk", free=6 * 1024) as disk:
        events = disk / "events.jsonl"
        done = _stream_cli("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle",
                           "--events", str(events))
        assert done.returncode == 3, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        counts = summary["sinks"]["events"]
        assert counts["written"] + counts["lost"] == summary["frames_processed"] == 40 and counts["lost"] > 0
        assert "No space left" in summary["sink_errors"]["events"]
        records = _lines(events)  # every line parses, the last one too
        assert [r["frame"] for r in records] == list(range(counts["written"]))  # all accounted as written are there


def test_a_partial_append_is_taken_back(tmp_path, monkeypatch):
    """A stand-in for the file system: os.write fails with ENOSPC after 10 bytes of the second line."""
    log = ResultsLog(tmp_path)
    log.append({"n": 1})
    real_write = os.write

    def write(fd, data):
        real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(AnoclipError, match="No space left on device; the line was not written"):
        log.append({"n": 2, "text": "x" * 100})
    monkeypatch.setattr(os, "write", real_write)
    log.append({"n": 3})
    log.close()
    assert [r["n"] for r in _lines(tmp_path / "results.jsonl")] == [1, 3]


# ----------------------------------------------------------------------------------------------
# MQTT


def test_stream_with_the_mqtt_broker_never_up_counts_every_event_lost(tmp_path, tiny_artifacts):
    pytest.importorskip("paho.mqtt.client")
    clip = write_clip(tmp_path / "clip.avi", 30)
    started = time.monotonic()
    done = _stream_cli("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle",
                       "--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--events", str(tmp_path / "events.jsonl"),
                       "--stats-interval", "0.05", "--max-fps", "20")
    assert done.returncode == 3, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    mqtt = summary["sinks"]["mqtt"]
    assert mqtt["published"] == mqtt["written"] == 0 and mqtt["failed"] == mqtt["lost"] == 30
    assert summary["sink_errors"]["mqtt"] == "30 frame(s) lost"
    assert "30 MQTT events are lost" in done.stderr and "never reached" in done.stderr
    stats = [line for line in done.stderr.splitlines() if "stream: in" in line]
    assert stats and all(", sinks: events " in line and " written 0 lost, mqtt 0 written " in line for line in stats), stats
    assert time.monotonic() - started < 30  # the 10 s close timeout was not waited out (start-up included)


# ----------------------------------------------------------------------------------------------
# Servers


class _ServersGoing:
    """A stand-in for RemoteDetector over a local Detector: frame ``bad`` is refused by the server
    (an ImageError), and from call ``gone_after`` on every server is gone."""

    sends_encoded = False

    def __init__(self, detector, gone_after: int, bad: int | None = None):
        self.detector, self.gone_after, self.bad, self.calls = detector, gone_after, bad, 0

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def __setattr__(self, name, value):
        if name == "threshold_override":
            self.detector.threshold_override = value
        object.__setattr__(self, name, value)

    def predict_batch(self, images, cls, tta_keys=None, keep_tokens=False):
        self.calls += 1
        if self.calls > self.gone_after:
            raise ServersUnavailable("no server answered: http://127.0.0.1:1: ConnectionRefusedError")
        if self.calls == self.bad:
            raise ImageError("the frame is 9000x9000, above the server's --max-pixels")
        return self.detector.predict_batch(images, cls, tta_keys=tta_keys, keep_tokens=keep_tokens)


def test_every_server_gone_ends_the_run_with_one_error_and_failed_frames_are_error_events(tmp_path, tiny_artifacts):
    clip = write_clip(tmp_path / "clip.avi", 30)
    detector = _ServersGoing(red_defect_detector(tiny_artifacts, "bottle"), gone_after=10, bad=4)
    events = tmp_path / "events.jsonl"
    pipeline = StreamPipeline(detector, [parse_source(str(clip), CLASSES, "bottle")], [EventsLog(events)],
                              StreamOptions(stats_interval=0, max_batch=1))
    pipeline.open()
    with pytest.raises(AnoclipError, match="every server is gone, so the run stops: no server answered"):
        pipeline.run()
    records = _lines(events)
    assert [r["frame"] for r in records] == list(range(11))  # no frame missing: 10 answered, then the one that found none
    errors = {r["frame"]: r["error"] for r in records if r["error"]}
    assert errors == {3: "ImageError: the frame is 9000x9000, above the server's --max-pixels",
                      10: "ServersUnavailable: no server answered: http://127.0.0.1:1: ConnectionRefusedError"}
    assert all(r["score"] is None and r["anomalous"] is None for r in records if r["error"])
    assert pipeline.stats.summary()["failed"] == 2


def test_predict_with_every_server_gone_is_one_line_and_exit_1(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), normal_frame(i))
    port = free_port()
    done = subprocess.run([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "predict", "--server", f"http://127.0.0.1:{port}",
                           "--class", "bottle", "--out", str(tmp_path / "out"), str(images)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no server answered" in lines[0], done.stderr


# ----------------------------------------------------------------------------------------------
# Bounded memory


def test_live_frames_above_the_pixel_limit_are_scaled_down_and_counted(tmp_path, tiny_artifacts, monkeypatch):
    frames = [cv2.resize(normal_frame(i), (400, 300)) for i in range(5)]
    monkeypatch.setattr(capture_module, "open_capture", lambda spec, cameras=[ScriptedCapture(frames, 0.05)]:
                        cameras.pop() if cameras else None)
    detector = red_defect_detector(tiny_artifacts, "bottle")
    events = tmp_path / "events.jsonl"
    pipeline = StreamPipeline(detector, [parse_source("0", CLASSES, "bottle")], [EventsLog(events)],
                              StreamOptions(stats_interval=0, max_pixels=200 * 150))
    pipeline.open()
    threading.Timer(1.5, pipeline.stop.set).start()
    summary = pipeline.run()
    records = _lines(events)
    assert summary["scaled"] == summary["frames_processed"] == len(records) > 0
    assert all(r["image_size"] == [150, 200] for r in records)


def test_saved_frames_and_maps_are_scaled_above_max_output_pixels(tmp_path):
    amap, image = np.random.rand(600, 800).astype(np.float32), np.zeros((600, 800, 3), np.uint8)
    small_map, small_image = scaled_down(amap, image, 400 * 300)
    assert small_map.shape == (300, 400) and small_image.shape == (300, 400, 3)
    assert scaled_down(amap, image, None)[0] is amap
    assert SavedFrames(tmp_path / "saved", max_pixels=400 * 300).max_pixels == 400 * 300


def test_the_sink_queue_is_bounded_in_bytes():
    class Event:
        def __init__(self, nbytes):
            self.frame, self.result = np.zeros(nbytes // 2, np.uint8), None

    queue = EventQueue(count=8, max_bytes=1000)
    queue.put(Event(800))  # alone: always fits
    blocked = threading.Thread(target=queue.put, args=(Event(400),), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # 800 + 400 bytes > 1000: waits for room
    assert queue.get() is not None
    blocked.join(2)
    assert not blocked.is_alive() and queue.get() is not None
    queue.put(None)  # the end always goes in


# ----------------------------------------------------------------------------------------------
# Signals


def test_a_second_sigint_removes_the_hidden_partial_recording(tmp_path, tiny_artifacts):
    clip = write_clip(tmp_path / "clip.avi", 10)
    events, video = tmp_path / "events.jsonl", tmp_path / "out.avi"
    process = subprocess.Popen([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "stream",
                                "--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle", "--loop",
                                "--events", str(events), "--record", str(video)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".*recording*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".*recording*")), "the recording never started"
    # a sink that takes long to close keeps the first SIGINT's clean stop busy
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert process.returncode in (0, 130)
    assert not list(tmp_path.glob(".*recording*"))  # no hidden partial file left behind
    if process.returncode == 0:  # the first SIGINT's clean stop won the race: the file is finished
        assert video.exists()


def test_frames_that_could_not_be_scored_end_the_stream_with_exit_3_and_their_count(tmp_path, tiny_artifacts,
                                                                                   monkeypatch):
    """The command line over a detector whose server refuses two frames (and stays up): the run ends at
    the end of the file, every frame is an events line, and the exit code says that two were not scored."""
    from click.testing import CliRunner

    from anoclip.runtime.stream import cli as stream_cli

    clip = write_clip(tmp_path / "clip.avi", 12)
    detector = _ServersGoing(red_defect_detector(tiny_artifacts, "bottle"), gone_after=10**6, bad=4)
    refused = detector.predict_batch

    def predict_batch(images, cls, tta_keys=None, keep_tokens=False):
        if detector.calls + 1 == 8:  # a second refusal, of a later batch
            detector.calls += 1
            raise ImageError("the frame could not be decoded by the server")
        return refused(images, cls, tta_keys=tta_keys, keep_tokens=keep_tokens)

    monkeypatch.setattr(detector, "predict_batch", predict_batch, raising=False)
    monkeypatch.setattr(stream_cli, "load_detector", lambda *args, **kwargs: detector)
    monkeypatch.setattr(stream_cli, "_stop_on_signals", lambda pipeline: None)
    events = tmp_path / "events.jsonl"
    done = CliRunner().invoke(stream_cli.stream_command, ["--artifacts", str(tiny_artifacts), "--source", str(clip),
                                                          "--class", "bottle", "--batch", "1", "--stats-interval", "0",
                                                          "--events", str(events)])
    assert done.exit_code == 3, done.output
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["frames_failed"] == summary["failed"] == 2 and summary["sink_errors"] == {}
    assert summary["frames_processed"] == 10
    records = _lines(events)
    assert len(records) == 12 and sum(1 for r in records if r["error"]) == 2
