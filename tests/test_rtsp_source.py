"""The RTSP test camera (tests/rtsp_server.py) and how OpenCV's FFmpeg backend reads it.

These pin the facts the capture loop of ``anoclip stream`` relies on: frames arrive at the
served size; a crashed camera makes ``read()`` fail at once and a hung one within OpenCV's
read timeout; a failed capture stays failed, and a fresh one reads again once the camera is back.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from services_rtsp import (FFMPEG_TCP, FFMPEG_TCP_FAST_OPEN, RtspServer, RtspUnavailable,  # noqa: F401
                           rtsp_server, timeout_params)

cv2 = pytest.importorskip("cv2")

# Generous bounds: the measured times are < 1 ms (crash) and the timeout plus ~10 ms (hang).
CRASH_FAIL_S = 5.0
TIMEOUT_MS = 1000
TIMEOUT_SLACK_S = 4.0


@pytest.fixture(autouse=True)
def tcp_transport(monkeypatch):
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_TCP)


def open_capture(url: str, params: list[int] | None = None):
    cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params or [])
    assert cap.isOpened(), f"OpenCV (FFmpeg) could not open {url}"
    return cap


def read_frames(cap, count: int) -> list[np.ndarray]:
    frames = []
    for _ in range(count):
        ok, frame = cap.read()
        assert ok, f"read() failed after {len(frames)} frames"
        frames.append(frame)
    return frames


def read_until_failure(cap, limit_s: float) -> tuple[float, float]:
    """Read until ``read()`` returns False; (seconds it took, seconds the failing read blocked)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = time.monotonic()
        ok, _ = cap.read()
        if not ok:
            end = time.monotonic()
            return end - start, end - before
    pytest.fail(f"read() still returned frames {limit_s:.0f} s after the server went away")


def test_opencv_reads_frames_of_the_served_size(rtsp_server):
    assert rtsp_server.url.startswith("rtsp://127.0.0.1:") and rtsp_server.url.endswith("/test")
    cap = open_capture(rtsp_server.url)
    try:
        frames = read_frames(cap, 20)
    finally:
        cap.release()
    assert {frame.shape for frame in frames} == {(rtsp_server.height, rtsp_server.width, 3)}
    assert {frame.dtype for frame in frames} == {np.dtype(np.uint8)}
    # A live picture: the ball moves, so frames differ (JPEG noise alone stays far below this).
    assert max(np.abs(f.astype(np.int16) - frames[0]).max() for f in frames[1:]) > 64


def test_fast_open_options_and_other_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_TCP_FAST_OPEN)
    server = RtspServer(width=96, height=64, fps=30, path="cam1", log_path=tmp_path / "server.log")
    try:
        server.start()
    except RtspUnavailable as reason:
        pytest.skip(f"no GStreamer RTSP server: {reason}")
    try:
        assert server.url.endswith("/cam1")
        cap = open_capture(server.url)
        try:
            frames = read_frames(cap, 5)
            assert cap.get(cv2.CAP_PROP_FRAME_WIDTH) == 96 and cap.get(cv2.CAP_PROP_FRAME_HEIGHT) == 64
        finally:
            cap.release()
        assert {frame.shape for frame in frames} == {(64, 96, 3)}
    finally:
        server.close()


def test_crash_fails_reads_at_once_and_a_fresh_capture_reads_after_restart(rtsp_server, monkeypatch):
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_TCP_FAST_OPEN)
    url = rtsp_server.url
    cap = open_capture(url, timeout_params(TIMEOUT_MS, TIMEOUT_MS))
    try:
        read_frames(cap, 3)
        rtsp_server.kill()
        took, _ = read_until_failure(cap, CRASH_FAIL_S)
        assert took < CRASH_FAIL_S
        # Nothing listens: a new capture fails at once (connection refused).
        start = time.monotonic()
        refused = cv2.VideoCapture(url, cv2.CAP_FFMPEG, timeout_params(TIMEOUT_MS, TIMEOUT_MS))
        assert not refused.isOpened()
        assert time.monotonic() - start < TIMEOUT_MS / 1000 + TIMEOUT_SLACK_S
        refused.release()

        assert rtsp_server.start() == url  # same port, same URL
        # The old capture stays dead even now that the camera is back ...
        ok, _ = cap.read()
        assert not ok
    finally:
        cap.release()
    # ... and a fresh one reads again.
    cap = open_capture(url, timeout_params(TIMEOUT_MS, TIMEOUT_MS))
    try:
        frames = read_frames(cap, 3)
    finally:
        cap.release()
    assert frames[-1].shape == (rtsp_server.height, rtsp_server.width, 3)


def test_a_hung_server_is_bounded_by_opencv_timeouts(rtsp_server, monkeypatch):
    monkeypatch.setenv("OPENCV_FFMPEG_CAPTURE_OPTIONS", FFMPEG_TCP_FAST_OPEN)
    url = rtsp_server.url
    cap = open_capture(url, timeout_params(TIMEOUT_MS, TIMEOUT_MS))
    try:
        read_frames(cap, 3)
        rtsp_server.pause()
        # Frames already received come first, then one read blocks for the read timeout.
        _, blocked = read_until_failure(cap, 30.0)
        assert TIMEOUT_MS / 1000 * 0.5 < blocked < TIMEOUT_MS / 1000 + TIMEOUT_SLACK_S
    finally:
        cap.release()

    start = time.monotonic()
    hung = cv2.VideoCapture(url, cv2.CAP_FFMPEG, timeout_params(TIMEOUT_MS, TIMEOUT_MS))
    took = time.monotonic() - start
    opened = hung.isOpened()
    hung.release()
    assert not opened and took < TIMEOUT_MS / 1000 + TIMEOUT_SLACK_S

    rtsp_server.resume()
    cap = open_capture(url, timeout_params(TIMEOUT_MS * 3, TIMEOUT_MS * 3))
    try:
        frames = read_frames(cap, 3)
    finally:
        cap.release()
    assert frames[-1].shape == (rtsp_server.height, rtsp_server.width, 3)


def test_stop_is_clean_and_start_serves_again(rtsp_server):
    assert rtsp_server.stop() == 0  # SIGTERM: the server exits normally
    assert not rtsp_server.running
    assert rtsp_server.kill() == 0  # already gone: nothing to do
    url = rtsp_server.start()
    assert url == rtsp_server.url and rtsp_server.running
