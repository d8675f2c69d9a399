"""Live network sources against real peers on this machine: malformed URLs, a corrupt JPEG in an
MJPEG stream over HTTP, Ctrl-C while a source opens."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from anoclip.runtime.stream import StreamOptions, StreamPipeline, parse_source
from anoclip.runtime.stream.sinks import EventsLog
from conftest import one_error_line
from fakes import normal_frame, red_defect_detector, write_clip

CLASSES = ["bottle", "carpet"]


def _stream_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from anoclip.runtime.cli import main; main()", "stream", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("args", [["--source", "http://[::1"], ["--source", "rtsp://[zz]/x"],
                                  ["--source", "rtsp://user:secret@[zz]/x"], ["--source", "{clip}", "--mqtt", "mqtt://[::1"]])
def test_malformed_urls_are_one_error_line(tmp_path, tiny_artifacts, args):
    clip = write_clip(tmp_path / "clip.avi", 2)
    process = _stream_cli("--artifacts", str(tiny_artifacts), "--class", "bottle", *[a.format(clip=clip) for a in args])
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    line = one_error_line(err)
    assert "malformed" in line and "URL" in line and "secret" not in line
    assert len(err.strip().splitlines()) <= 3, err  # the line and the start-up log, no traceback


# ----------------------------------------------------------------------------------------------
# A corrupt JPEG in an MJPEG stream


class MjpegCamera(ThreadingHTTPServer):
    """An IP camera serving multipart/x-mixed-replace MJPEG at about 30 fps, for ever; the frames
    of index ``corrupt`` are garbage bytes in place of a JPEG."""

    daemon_threads = True

    def __init__(self, corrupt: set[int]):
        self.corrupt, self.connections = corrupt, 0
        super().__init__(("127.0.0.1", 0), _MjpegHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/video"


class _MjpegHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.connections += 1
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        index = 0
        try:
            while True:
                data = cv2.imencode(".jpg", normal_frame(index))[1].tobytes()
                if index in self.server.corrupt:
                    data = np.random.default_rng(index).integers(0, 256, 3000, dtype=np.uint8).tobytes()
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                 + data + b"\r\n")
                index += 1
                time.sleep(0.03)
        except OSError:  # the client went away
            pass


def test_corrupt_jpeg_in_a_live_mjpeg_stream_is_skipped_and_counted(tmp_path, tiny_artifacts):
    camera = MjpegCamera(corrupt={10, 20})
    try:
        detector = red_defect_detector(tiny_artifacts, "bottle")
        events = tmp_path / "events.jsonl"
        pipeline = StreamPipeline(detector, [parse_source(camera.url, CLASSES, "bottle")], [EventsLog(events)],
                                  StreamOptions(stats_interval=0))
        pipeline.open()
        threading.Timer(2.5, pipeline.stop.set).start()
        source = pipeline.run()["sources"][0]
    finally:
        camera.shutdown()
    assert source["reconnects"] == 0 and camera.connections == 1  # never reopened
    assert source["corrupt"] == 2
    assert source["read"] >= 30 and source["offered"] == source["read"] - 2
    assert len(events.read_text().splitlines()) == source["processed"] > 0


# ----------------------------------------------------------------------------------------------
# Ctrl-C while a source opens


def test_sigint_while_a_network_source_opens_returns_within_a_second(tiny_artifacts):
    with socket.socket() as server:  # accepts the connection and never answers: the open waits its timeout
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(60)
        process = _stream_cli("--artifacts", str(tiny_artifacts), "--class", "bottle",
                              "--source", f"http://127.0.0.1:{server.getsockname()[1]}/video")
        connection, _ = server.accept()
        with connection:
            time.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
            took = time.monotonic() - started
    assert took < 1.5, f"{took:.1f} s"
    assert process.returncode == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err and "terminate called" not in err
    assert not out.strip() or json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Stop while a network source reconnects


@pytest.mark.parametrize("peer", ["closed", "silent"])
def test_stop_while_a_network_source_reconnects_returns_within_a_second(tiny_artifacts, monkeypatch, peer):
    """The stream dies after three frames and is reopened against a closed loopback port (refused at
    once: the stop lands in the backoff wait) or a port that accepts and never answers (the stop lands
    in the open, which would wait out its 10 s timeout)."""
    from test_stream import ScriptedCapture

    from anoclip.runtime.stream import capture as capture_module
    from anoclip.runtime.stream.sources import open_capture

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        if peer == "silent":
            server.listen(8)
        else:
            server.close()
        opens = []

        def opener(spec):
            opens.append(time.monotonic())
            return ScriptedCapture([normal_frame(i) for i in range(3)], 0.05) if len(opens) == 1 else open_capture(spec)

        monkeypatch.setattr(capture_module, "open_capture", opener)
        pipeline = StreamPipeline(red_defect_detector(tiny_artifacts, "bottle"),
                                  [parse_source(f"http://127.0.0.1:{port}/video", CLASSES, "bottle")], [],
                                  StreamOptions(stats_interval=0))
        pipeline.open()
        stopped = []
        threading.Timer(1.2, lambda: (stopped.append(time.monotonic()), pipeline.stop.set())).start()
        summary = pipeline.run()
        took = time.monotonic() - stopped[0]
    assert len(opens) >= 2, "the source was never reopened"
    assert took < 1.0, f"{took:.1f} s"
    assert not pipeline.captures[0].is_alive()  # the capture thread itself ended, not just left behind
    assert summary["frames_processed"] > 0 and summary["reconnects"] == 0
