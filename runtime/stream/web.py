"""A live web view of the stream for headless devices: MJPEG per source, snapshots and stats.

Standard library only: a ``ThreadingHTTPServer`` in a daemon thread. Routes:

- ``/``: a self-contained HTML page, one image per source plus a stats panel refreshed every second;
- ``/stream/<index>.mjpg``: ``multipart/x-mixed-replace`` MJPEG of the source's annotated frames;
- ``/snapshot/<index>.jpg``: the latest annotated frame as one JPEG;
- ``/stats.json``: per source the last event's record and the frames seen, plus the numbers the
  pipeline passes to :meth:`WebView.update_stats` under ``"pipeline"``.

The view has no authentication: it binds to loopback unless told otherwise, and warns when it is not.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

from ..errors import AnoclipError
from .events import FrameEvent, Sink

log = logging.getLogger(__name__)

BOUNDARY = "frame"
# Browsers open at most six HTTP/1.1 connections per host and every MJPEG stream holds one; sources
# past this many are shown as snapshots the page reloads, so the stats requests always get through.
MJPEG_SOURCES = 4
# A client that does not take a frame for this long is dropped (its socket send times out).
CLIENT_TIMEOUT_S = 15.0
_DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


@dataclass
class _Channel:
    """The latest frame of one source and the condition its stream clients wait on."""

    name: str
    condition: threading.Condition = field(default_factory=threading.Condition)
    image: np.ndarray | None = None  # the latest annotated frame (BGR)
    sequence: int = 0  # bumped once per written frame; a client sends each sequence at most once
    jpeg: bytes | None = None  # the latest frame encoded, made when a client first asks for it
    jpeg_sequence: int = -1
    frames: int = 0
    record: dict[str, Any] | None = None


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[IPv6]:PORT"`` or ``"PORT"`` (loopback) -> (host, port); port 0 picks a free one."""
    text = address.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise AnoclipError(f"bad web view address {address!r}: give HOST:PORT, e.g. 127.0.0.1:8080 "
                           "(port 0 picks a free port)")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, view: WebView):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.view = view
        super().__init__((host, port), _Handler)

    def handle_error(self, request, client_address) -> None:
        # A client that goes away mid-request is normal for a live view; anything else is logged.
        error = sys.exc_info()[1]
        if isinstance(error, _DISCONNECTED):
            log.debug("web view client %s went away: %s", client_address, error)
        else:
            log.warning("web view request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    server_version = "anoclip-web"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        view = self.server.view
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", view.page().encode())
            return
        if path == "/stats.json":
            self._send(HTTPStatus.OK, "application/json", json.dumps(view.stats()).encode())
            return
        stream = re.fullmatch(r"/stream/(\d{1,6})\.mjpg", path)
        found = stream or re.fullmatch(r"/snapshot/(\d{1,6})\.jpg", path)
        channel = view.channel(int(found.group(1))) if found else None
        if channel is None:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")
        elif stream:
            self._stream(channel)
        else:
            self._snapshot(channel)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _snapshot(self, channel: _Channel) -> None:
        with channel.condition:
            jpeg = self.server.view.latest_jpeg(channel)
        if jpeg is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", b"no frame yet\n")
        else:
            self._send(HTTPStatus.OK, "image/jpeg", jpeg)

    def _stream(self, channel: _Channel) -> None:
        view = self.server.view
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = 0
        try:
            while True:
                with channel.condition:
                    channel.condition.wait_for(lambda: view.closed or (channel.image is not None
                                                                       and channel.sequence != sent))
                    if view.closed:
                        return
                    jpeg, sent = view.latest_jpeg(channel), channel.sequence
                    if jpeg is None:
                        continue
                # Sent outside the lock: a slow client holds back nobody, and misses the frames written
                # while it was busy (it gets the newest one next).
                head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                self.wfile.write(head.encode() + jpeg + b"\r\n")
                self.wfile.flush()
        except _DISCONNECTED as error:
            log.debug("web view stream client %s went away: %s", self.client_address, error)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the signature http.server calls)
        log.debug("web view %s: " + format, self.client_address[0], *args)


class WebView(Sink):
    """Serves the annotated frames and live stats over HTTP while the stream runs.

    The constructor binds the address and starts serving at once, so a bad or taken address fails
    before any other work starts; :attr:`url` is the page's address (the real port when ``port`` is 0).
    ``sources`` are the source names in display order (stream ``<index>`` is the index in this list);
    a source first seen in :meth:`write` is appended. ``quality`` is the JPEG quality (1-100).
    A frame is JPEG-encoded once, when the first client asks for it, whatever the number of clients;
    with nobody watching, nothing is encoded.
    """

    name = "web"

    def __init__(self, address: str = "127.0.0.1:8080", sources: Sequence[str] = (), quality: int = 80):
        if not 1 <= int(quality) <= 100:
            raise AnoclipError(f"JPEG quality {quality} is out of range: give a number from 1 to 100")
        self.quality = int(quality)
        self.closed = False
        self._lock = threading.Lock()
        self._channels: list[_Channel] = []
        self._by_name: dict[str, _Channel] = {}
        self._pipeline: dict[str, Any] = {}
        self._started = time.time()
        for source in sources:
            self._add_channel(source)
        host, port = parse_address(address)
        try:
            self._server = _Server(host, port, self)
        except OSError as error:
            reason = error.strerror or str(error)
            raise AnoclipError(f"cannot serve the web view on {address}: {reason}; "
                               "give a free HOST:PORT (port 0 picks one)") from None
        bound_host, bound_port = self._server.server_address[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}/"
        self.port = bound_port
        if not _is_loopback(bound_host):
            log.warning("the web view at %s has no authentication and is reachable from other machines", self.url)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="anoclip-web", daemon=True)
        self._thread.start()
        log.info("web view at %s", self.url)

    # -- the sink side ---------------------------------------------------------------------------

    def write(self, event: FrameEvent) -> None:
        if self.closed:
            return
        image = event.annotated if event.annotated is not None else event.frame
        channel = self._by_name.get(event.source) or self._add_channel(event.source)
        record = event.record()
        with channel.condition:
            channel.image = image
            channel.sequence += 1
            channel.frames += 1
            channel.record = record
            channel.condition.notify_all()
        self.written += 1  # shown: the view keeps only the newest frame by design, so nothing is lost

    def latest_jpeg(self, channel: _Channel) -> bytes | None:
        """The channel's latest frame as JPEG, encoded on first use (call with its condition held)."""
        if channel.image is not None and channel.jpeg_sequence != channel.sequence:
            ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(channel.image),
                                       [cv2.IMWRITE_JPEG_QUALITY, self.quality])
            if not ok:
                log.warning("could not JPEG-encode the latest frame of %s for the web view", channel.name)
                return None
            channel.jpeg, channel.jpeg_sequence = encoded.tobytes(), channel.sequence
        return channel.jpeg

    def update_stats(self, stats: dict[str, Any]) -> None:
        """Merge the pipeline's numbers (fps, dropped frames, latency...) into ``/stats.json``'s ``"pipeline"``."""
        with self._lock:
            self._pipeline.update(stats)

    def close(self) -> None:
        """Stop serving and end every open stream."""
        if self.closed:
            return
        self.closed = True
        for channel in self.channels():
            with channel.condition:
                channel.condition.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        log.debug("web view at %s closed", self.url)

    # -- what the handler reads ------------------------------------------------------------------

    def channels(self) -> list[_Channel]:
        with self._lock:
            return list(self._channels)

    def channel(self, index: int) -> _Channel | None:
        channels = self.channels()
        return channels[index] if 0 <= index < len(channels) else None

    def stats(self) -> dict[str, Any]:
        sources = []
        for index, channel in enumerate(self.channels()):
            with channel.condition:
                sources.append({"index": index, "name": channel.name, "frames": channel.frames, "last": channel.record})
        with self._lock:
            pipeline = dict(self._pipeline)
        return {"time": time.time(), "uptime_s": round(time.time() - self._started, 3), "sources": sources,
                "pipeline": pipeline}

    def page(self) -> str:
        cards = []
        for index, channel in enumerate(self.channels()):
            src = f"/stream/{index}.mjpg" if index < MJPEG_SOURCES else f"/snapshot/{index}.jpg"
            poll = "" if index < MJPEG_SOURCES else ' data-poll="1"'
            cards.append(f'<figure><img id="view{index}" src="{src}" alt="{html.escape(channel.name)}"{poll}>'
                         f"<figcaption>{html.escape(channel.name)}</figcaption></figure>")
        return _PAGE.replace("{cards}", "\n".join(cards) or "<p>no source yet: reload once frames arrive</p>")

    def _add_channel(self, name: str) -> _Channel:
        with self._lock:
            if name not in self._by_name:
                channel = _Channel(name)
                self._channels.append(channel)
                self._by_name[name] = channel
            return self._by_name[name]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>anoclip live view</title>
<style>
body { margin: 0; padding: 12px; background: #1b1d21; color: #e6e6e6; font: 14px system-ui, sans-serif; }
h1 { font-size: 16px; margin: 0 0 10px; }
#views { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 12px; }
figure { margin: 0; background: #000; }
figure img { display: block; width: 100%; height: auto; max-height: 72vh; object-fit: contain; min-height: 60px; }
figcaption { padding: 4px 6px; background: #2a2d33; }
#stats { margin-top: 12px; background: #2a2d33; padding: 8px; white-space: pre; font: 13px monospace; }
.bad { color: #ff6b6b; }
</style></head>
<body><h1>anoclip live view</h1>
<div id="views">
{cards}
</div>
<div id="stats">waiting for stats...</div>
<script>
function fmt(v) { return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v); }
function render(s) {
  const lines = [];
  for (const src of s.sources) {
    const e = src.last;
    if (!e) { lines.push(src.name + ": no frame yet"); continue; }
    const age = (s.time - e.captured).toFixed(1);
    const severity = typeof e.severity === "number" ? e.severity.toFixed(2) + " / 1.00" : "no thresholds";
    const score = typeof e.score === "number" ? e.score.toFixed(6) : String(e.score);
    lines.push(src.name + ": frames " + src.frames + "  frame #" + e.frame + "  severity " + severity +
      "  (score " + score + ")" +
      "  anomalous " + e.anomalous + "  captured " + new Date(e.captured * 1000).toLocaleTimeString() +
      " (" + age + " s ago)");
  }
  for (const [k, v] of Object.entries(s.pipeline)) {
    lines.push(k + ": " + (typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v)));
  }
  const box = document.getElementById("stats");
  box.textContent = lines.join("\\n");
  box.className = "";
}
async function refresh() {
  try {
    const r = await fetch("/stats.json", {cache: "no-store"});
    render(await r.json());
  } catch (err) {
    const box = document.getElementById("stats");
    box.textContent = "stream not reachable (" + err + ")";
    box.className = "bad";
  }
}
for (const img of document.querySelectorAll("img[data-poll]")) {
  const base = img.getAttribute("src");
  const next = () => setTimeout(() => { img.src = base + "?t=" + Date.now(); }, 200);
  img.addEventListener("load", next);
  img.addEventListener("error", () => setTimeout(next, 800));
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
"""
