"""`anoclip stream` end to end against real peers: an MQTT broker (mosquitto), a browser (headless
Chromium) and a network camera (a GStreamer RTSP server), each started on loopback by the test and
skipped with the reason where it is not installed. The model is the tiny one (random weights)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fakes import write_clip
from services import Subscriber, chromium, free_port, mosquitto, mosquitto_broker, wait_until  # noqa: F401 (fixtures)
from services_rtsp import rtsp_server  # noqa: F401 (fixture)


def _stream(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "stream", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def _finish(process: subprocess.Popen, timeout: float = 60) -> dict:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_every_event_reaches_the_broker_in_order(tmp_path, tiny_artifacts, mosquitto_broker):
    subscriber = Subscriber(mosquitto_broker, "line/+/events")
    try:
        clip = write_clip(tmp_path / "clip.avi", 30, defect_from=20)
        events = tmp_path / "events.jsonl"
        process = _stream("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle",
                          "--events", str(events), "--mqtt", mosquitto_broker, "--topic", "line/{source}/events",
                          "--threshold", "0.5")
        summary = _finish(process)
        published = _lines(events)
        assert summary["frames_processed"] == len(published) == 30
        wait_until(lambda: len(subscriber.messages) >= 30, timeout=10, what="30 MQTT messages")
        received = [record for _, record in subscriber.messages]
        assert received == published  # the same records, in the same order, nothing extra
        assert {topic for topic, _ in subscriber.messages} == {"line/clip.avi/events"}
    finally:
        subscriber.close()


def test_web_view_in_a_browser(tmp_path, tiny_artifacts, chromium):
    clip = write_clip(tmp_path / "clip.avi", 40, defect_from=20, size=(240, 320))
    port = free_port()
    process = _stream("--artifacts", str(tiny_artifacts), "--source", str(clip), "--class", "bottle", "--loop",
                      "--realtime", "--web", f"127.0.0.1:{port}", "--pixel-threshold", "0.5")
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: _answers(url + "stats.json"), timeout=60, what="the web view")
        page = chromium.open(url, 800, 600)
        page.wait_for("document.querySelector('img') && document.querySelector('img').naturalWidth > 0", timeout=30)
        stats_before = page.evaluate("fetch('/stats.json').then(r => r.json())")
        first = page.screenshot(tmp_path / "view-1.png")
        time.sleep(1.5)
        second = page.screenshot(tmp_path / "view-2.png")
        stats_after = page.evaluate("fetch('/stats.json').then(r => r.json())")
        box = page.element_box("img")
        assert _region(first, box) != _region(second, box)  # the stream image moved on
        assert stats_after["sources"][0]["frames"] > stats_before["sources"][0]["frames"]
        assert stats_after["pipeline"]["frames_processed"] > stats_before["pipeline"]["frames_processed"]
        Path("/tmp/anoclip-stream-webview.png").write_bytes(second)
    finally:
        process.send_signal(signal.SIGINT)
    summary = _finish(process)
    assert summary["frames_processed"] > 0 and summary["sink_errors"] == {}


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _region(png: bytes, box: tuple[int, int, int, int]) -> bytes:
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    x, y, w, h = box
    return image[y:y + h, x:x + w].tobytes()


def test_rtsp_camera_that_dies_is_reopened(tmp_path, tiny_artifacts, rtsp_server):
    events = tmp_path / "events.jsonl"
    process = _stream("--artifacts", str(tiny_artifacts), "--source", rtsp_server.url, "--class", "bottle",
                      "--events", str(events))
    try:
        wait_until(lambda: len(_lines(events)) >= 5, timeout=60, what="5 frames from the RTSP camera")
        rtsp_server.kill()  # the camera crashes mid-stream
        time.sleep(1.0)
        before_restart = len(_lines(events))
        rtsp_server.start()
        wait_until(lambda: len(_lines(events)) >= before_restart + 5, timeout=60, what="frames after the restart")
    finally:
        process.send_signal(signal.SIGINT)
    summary = _finish(process)
    assert summary["reconnects"] >= 1 and summary["sources"][0]["reconnects"] == summary["reconnects"]
    frames = [record["frame"] for record in _lines(events)]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)  # one count across the reconnect
    assert summary["frames_processed"] == len(frames)


def test_http_mjpeg_source(tmp_path, tiny_artifacts):
    """An MJPEG stream over HTTP (here the web view of another pipeline, as an IP camera serves one)."""
    import threading

    import numpy as np
    from fakes import defect_frame, normal_frame, red_defect_detector

    from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
    from anoclip.runtime.detector import Result
    from anoclip.runtime.stream.events import FrameEvent
    from anoclip.runtime.stream.sinks import EventsLog
    from anoclip.runtime.stream.web import WebView

    camera = WebView("127.0.0.1:0", ["camera"])
    stop = threading.Event()

    def serve_frames():
        index = 0
        while not stop.is_set():
            frame = defect_frame(index) if index % 2 else normal_frame(index)
            amap = np.zeros(frame.shape[:2], np.float32)
            result = Result(0.0, amap, amap, np.zeros((1, 4), np.float32), "bottle", frame.shape[:2], 1)
            camera.write(FrameEvent("camera", index, time.time(), result, {}, frame, annotated=frame))
            index += 1
            time.sleep(0.04)

    feeder = threading.Thread(target=serve_frames, daemon=True)
    feeder.start()
    events = tmp_path / "events.jsonl"
    try:
        detector = red_defect_detector(tiny_artifacts, "bottle")
        spec = parse_source(camera.url + "stream/0.mjpg", ["bottle"], "bottle")
        assert spec.kind == "url" and spec.name == "127.0.0.1/stream/0.mjpg"
        pipeline = StreamPipeline(detector, [spec], [EventsLog(events)], StreamOptions(stats_interval=0))
        pipeline.open()
        threading.Timer(2.0, pipeline.stop.set).start()
        summary = pipeline.run()
    finally:
        stop.set()
        camera.close()
    records = _lines(events)
    assert summary["frames_processed"] == len(records) >= 5
    scores = sorted(record["score"] for record in records)
    assert scores[-1] - scores[0] > 0.01  # frames with and without the defect both came through
