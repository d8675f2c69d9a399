#!/usr/bin/python3
"""A small RTSP server for the stream tests: a live test pattern as MJPEG over RTP.

Run it with Debian's system Python (``/usr/bin/python3``), the interpreter the ``python3-gi``
package is built for; the project's own interpreter cannot import ``gi``::

    /usr/bin/python3 tests/rtsp_server.py --port 8554

It serves ``rtsp://127.0.0.1:PORT/PATH`` (one media shared by all clients) and prints
``READY rtsp://127.0.0.1:PORT/PATH`` on stdout once it is listening; with ``--port 0`` the
system picks a free port and the READY line names it. SIGTERM or SIGINT stops
it with exit status 0. When ``gi``, GstRtspServer or a GStreamer element is missing it prints
one line starting with ``MISSING`` and exits with status 77 (tests/services_rtsp.py turns that
into a skip).

Needs (Debian 12): python3-gi, gir1.2-gst-rtsp-server-1.0 (pulls gir1.2-gstreamer-1.0,
gir1.2-gst-plugins-base-1.0 and libgstrtspserver), gstreamer1.0-plugins-base (videotestsrc,
videoconvert), gstreamer1.0-plugins-good (jpegenc, rtpjpegpay).

What OpenCV's FFmpeg backend does with it (opencv-python 5.0.0 wheel, FFmpeg libavformat 62.12,
GStreamer 1.22, Debian 12, loopback; 2-3 runs of each case with OpenCV's params, one of each
FFmpeg option variant; runs agreed within 0.03 s):

* Transport: ``OPENCV_FFMPEG_CAPTURE_OPTIONS="rtsp_transport;tcp"`` (RTP interleaved in the RTSP
  connection) reads reliably; UDP (FFmpeg's default, and ``rtsp_transport;udp``) works on
  loopback too and fails the same way below. The tests use TCP, which needs no extra ports.
  OpenCV reads that variable at each open, not at import.
* Open: ``cv2.VideoCapture(url, cv2.CAP_FFMPEG)`` takes 1.43-1.46 s at 15 fps (0.73 s at 30 fps):
  FFmpeg probes about 20 frames before it returns, and those frames then sit in the buffer, so
  the first reads return at once and lag the live picture by that much. Adding ``probesize;32``
  (``"rtsp_transport;tcp|probesize;32"``) opens in 0.05-0.10 s with the same frame size; the
  first read returns within 10 ms. The server prints READY 0.05-0.2 s after it is started.
  At 5 fps the probing takes 4.2 s. An open timeout (below) shorter than the probing cuts it
  short: OpenCV logs "Stream timeout triggered" yet the open succeeds and frames read fine
  (seen with 150, 500 and 1000 ms at 5 and 15 fps), so the open timeout does not have to
  cover the probing; with ``probesize;32`` it never fires.
* Server killed (SIGKILL) mid-stream: the RTSP connection closes and, once the buffered frames
  are read, ``read()`` returns False at once (< 1 ms), with or without timeout options, TCP or
  UDP. Every later ``read()`` on that capture returns False at once, also after the server is
  back: the capture has to be released and opened again.
* Server alive but silent (SIGSTOP; the same as a camera that hangs or a network that drops
  packets): without options ``read()`` blocks 30.0-30.1 s before it returns False (OpenCV's
  default read timeout), and each further ``read()`` blocks another 30 s; an open against it
  blocks 30 s too. Bounded by OpenCV's own params, ``cv2.VideoCapture(url, cv2.CAP_FFMPEG,
  [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 2000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2000])``: ``read()``
  returns False after 2.004-2.010 s (TCP and UDP) and the open fails after 2.004 s. FFmpeg's
  rtsp ``timeout`` option in microseconds (``"rtsp_transport;tcp|timeout;2000000"``) also
  bounds it, less tightly: the read failed after 4.2 s, the open after 2.1 s. ``stimeout``
  (gone from FFmpeg 5 on) and ``rw_timeout`` have no effect here: still 30 s.
* Opening while nothing listens on the port fails at once (connection refused, < 5 ms).
* Server restarted on the same port (binding it again right after a SIGKILL works): a new capture opens as fast as the first one (1.43-1.46 s, or 0.06-0.10 s with
  ``probesize;32``) and reads frames.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

MISSING_EXIT = 77
ELEMENTS = ("videotestsrc", "videoconvert", "jpegenc", "rtpjpegpay")


def missing(what: str) -> None:
    print(f"MISSING {what}", flush=True)
    sys.exit(MISSING_EXIT)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8554,
                        help="TCP port to listen on (default 8554; 0 picks a free one, READY names it)")
    parser.add_argument("--path", default="/test", help="mount point (default /test)")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--pattern", default="ball", help="videotestsrc pattern (default ball)")
    parser.add_argument("--watch-stdin", action="store_true",
                        help="also stop when stdin reaches end of file (the parent process is gone)")
    args = parser.parse_args(argv)
    if not 0 <= args.port < 65536:
        parser.error("--port must be in 0..65535")
    if not args.path.startswith("/"):
        args.path = "/" + args.path
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as error:
        missing(f"gi / GstRtspServer 1.0 ({error}): install python3-gi and gir1.2-gst-rtsp-server-1.0")

    Gst.init(None)
    absent = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    if absent:
        missing(f"GStreamer elements {', '.join(absent)}: install gstreamer1.0-plugins-base "
                "and gstreamer1.0-plugins-good")

    launch = (f"( videotestsrc is-live=true pattern={args.pattern} "
              f"! video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1 "
              f"! videoconvert ! video/x-raw,format=I420 ! jpegenc "
              f"! rtpjpegpay name=pay0 pt=26 )")

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(launch)
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)

    loop = GLib.MainLoop()
    # Binds and listens now, so a port in use fails here.
    source_id = server.attach(None)
    if source_id == 0:
        print(f"ERROR cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1

    def stop(*_args) -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, signum, stop)
    if args.watch_stdin:
        stdin_fd = sys.stdin.fileno()

        def stdin_event(_channel, condition) -> bool:
            if condition & (GLib.IOCondition.HUP | GLib.IOCondition.ERR) or not os.read(stdin_fd, 4096):
                return stop()
            return GLib.SOURCE_CONTINUE

        GLib.io_add_watch(GLib.IOChannel.unix_new(stdin_fd), GLib.PRIORITY_DEFAULT,
                          GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR, stdin_event)

    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}{args.path}", flush=True)
    try:
        loop.run()
    finally:
        GLib.source_remove(source_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
