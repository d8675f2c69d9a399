"""A live RTSP camera for tests: tests/rtsp_server.py run by Debian's system Python.

Use the ``rtsp_server`` fixture by importing it into a test module::

    from services_rtsp import rtsp_server  # noqa: F401  (pytest fixture)

    def test_something(rtsp_server):
        cap = cv2.VideoCapture(rtsp_server.url, cv2.CAP_FFMPEG)

The fixture yields a started :class:`RtspServer` (160x120 at 15 fps, ``rtsp://127.0.0.1:PORT/test``)
and stops it after the test. Its ``stop()``, ``kill()``, ``pause()``, ``resume()`` and ``start()``
simulate a camera that goes away cleanly, crashes, hangs, and comes back on the same URL. The
test is skipped, with the reason, when ``/usr/bin/python3`` lacks gi / GstRtspServer or a
GStreamer element (``.ci/run`` installs the Debian packages). For other sizes or rates, build
an ``RtspServer(width=..., height=..., fps=...)`` yourself and ``close()`` it.

How OpenCV's FFmpeg backend behaves against it (open time, what a killed or hung server does
to ``read()``, which timeout options bound it) is written down in tests/rtsp_server.py.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
from pathlib import Path

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
MISSING_EXIT = 77  # rtsp_server.py: gi, GstRtspServer or a GStreamer element is not installed
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0

# OPENCV_FFMPEG_CAPTURE_OPTIONS for reading the server: RTP inside the RTSP TCP connection.
FFMPEG_TCP = "rtsp_transport;tcp"
# The same, opened in ~0.1 s instead of ~1.4 s (FFmpeg stops probing after the first packet).
FFMPEG_TCP_FAST_OPEN = "rtsp_transport;tcp|probesize;32"


def timeout_params(open_ms: int, read_ms: int) -> list[int]:
    """``params`` for ``cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)`` that bound open and read."""
    import cv2

    return [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(open_ms), cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(read_ms)]


class RtspUnavailable(Exception):
    """The system Python cannot run the server (missing Debian packages)."""


class RtspServer:
    """tests/rtsp_server.py in a child process, restartable on the port it first got."""

    def __init__(self, *, port: int = 0, path: str = "/test", width: int = 160, height: int = 120,
                 fps: int = 15, log_path: Path | None = None):
        self.port = port
        self.path = path if path.startswith("/") else "/" + path
        self.width, self.height, self.fps = width, height, fps
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._paused = False

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("the server has not been started yet: no port")
        return f"rtsp://127.0.0.1:{self.port}{self.path}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = READY_TIMEOUT_S) -> str:
        """Start the server (again, on the same port after the first start); return its URL once it serves."""
        if self.running:
            raise RuntimeError(f"the RTSP server is already running (pid {self.process.pid})")
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            raise RtspUnavailable(f"{SYSTEM_PYTHON} not found: the RTSP tests need Debian's python3 "
                                  "with python3-gi and gir1.2-gst-rtsp-server-1.0")
        command = [SYSTEM_PYTHON, str(SERVER_SCRIPT), "--port", str(self.port), "--path", self.path,
                   "--width", str(self.width), "--height", str(self.height), "--fps", str(self.fps),
                   "--watch-stdin"]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            # stdin stays open as a lifeline: the server quits when it closes, even if pytest is killed.
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log, text=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._paused = False
        line = self._first_line(timeout)
        if line.startswith("READY "):
            url = line.split(None, 1)[1]
            self.port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
            return url
        status = self._reap(STOP_TIMEOUT_S)
        if status == MISSING_EXIT:
            raise RtspUnavailable(line.removeprefix("MISSING ").strip() or "GStreamer RTSP server missing")
        raise RuntimeError(f"the RTSP server did not start (exit status {status}, first line {line!r})"
                           + self._log_tail())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """A clean shutdown: SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.resume()
            self.process.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def kill(self) -> int | None:
        """A crash: SIGKILL, no chance to close its connections."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
        return self._reap(STOP_TIMEOUT_S)

    def pause(self) -> None:
        """A hang: SIGSTOP. Connections stay open and no more data flows until :meth:`resume`."""
        if self.running and not self._paused:
            self.process.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.running and self._paused:
            self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "RtspServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _first_line(self, timeout: float) -> str:
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            return lines.get(timeout=timeout).strip()
        except queue.Empty:
            self.kill()
            raise RuntimeError(f"the RTSP server printed no READY line within {timeout:.0f} s"
                               + self._log_tail()) from None

    def _reap(self, timeout: float) -> int:
        process = self.process
        try:
            status = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._paused = False
        return status

    def _log_tail(self) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return ""
        text = Path(self.log_path).read_text(errors="replace").strip()
        return "\n" + "\n".join(text.splitlines()[-20:]) if text else ""


@pytest.fixture
def rtsp_server(tmp_path):
    """A started RtspServer serving 160x120 MJPEG at 15 fps; ``.url``, ``.stop()``, ``.kill()``,
    ``.pause()``, ``.resume()``, ``.start()`` (same port). Skips when the Debian packages are missing."""
    server = RtspServer(log_path=tmp_path / "rtsp_server.log")
    try:
        server.start()
    except RtspUnavailable as reason:
        pytest.skip(f"no GStreamer RTSP server: {reason}")
    try:
        yield server
    finally:
        server.close()
