"""Sources by name: what ``--source`` accepts and how each kind is opened.

    0, 1, ...                    a camera by index (V4L2 on Linux)
    /dev/video0                  a camera by device path
    clip.mp4                     a video file (read to its end, every frame; ``--loop`` repeats it)
    folder/, a.png, 'dir/*.png'  images: a folder of them, one image, or a quoted glob pattern, read in
                                 order like the frames of a video (``anoclip.runtime.inputs``, the
                                 reader predict and calibrate use)
    rtsp://, rtsps://, rtmp://,  network streams, opened with OpenCV's FFmpeg backend
    http(s)://, udp://, tcp://
    csi://0[?width=&height=&fps=]  a Jetson CSI camera: the nvarguscamerasrc pipeline below
    "... ! appsink"              any GStreamer pipeline (needs an OpenCV built with GStreamer)

``SRC=CLASS`` names the class a source is scored for; it is split off only when the text after the
last ``=`` is one of the artifact's classes, so URLs and pipelines with ``=`` in them stay whole.

Every source also gets a short name for events, topics and file names: ``camera0``, ``video0``, the
file's or folder's name, ``host/path`` of a URL (never its credentials), ``csi0``, ``gstreamer``;
names that repeat get ``-2``, ``-3``, ...
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import SplitResult, parse_qs, urlsplit

from ..errors import AnoclipError
from ..inputs import GLOB_CHARACTERS, FiniteSource, is_image, plan_inputs

URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
CSI_DEFAULTS = {"width": 1920, "height": 1080, "fps": 30}
# Network streams: bound how long opening and reading may block, so that a dead camera is noticed
# and reopened instead of hanging its capture thread (OpenCV passes these to FFmpeg).
OPEN_TIMEOUT_MS = 10_000
READ_TIMEOUT_MS = 5_000


def csi_pipeline(sensor: int, width: int, height: int, fps: int) -> str:
    """The GStreamer pipeline of a Jetson CSI camera, ending in an appsink of BGR frames that keeps
    only the newest buffer."""
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={width},height={height},"
            f"framerate={fps}/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink drop=true max-buffers=1 sync=false")


@dataclass(frozen=True)
class SourceSpec:
    """One ``--source``: its short name, what OpenCV opens, and how.

    live: a camera or network stream (frames arrive in real time: only the newest is kept, and a
        stream that dies is reopened); False for a video file or images (every frame is read, in order).
    """

    name: str
    uri: str  # as given (without =CLASS)
    kind: str  # device, file (a video), images (a folder, an image or a pattern), url, gstreamer
    target: str | int
    cls: str | tuple[str, ...] | None  # a tuple: every frame is scored for each of these classes
    live: bool
    inputs: tuple[FiniteSource, ...] = ()  # kind images: the files the reader reads, in order

    @property
    def api(self) -> int:
        import cv2

        return {"url": cv2.CAP_FFMPEG, "file": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER}.get(self.kind, cv2.CAP_ANY)


def split_url(url: str, what: str = "source") -> SplitResult:
    """``urlsplit`` of a URL given on the command line, its host checked; one AnoclipError naming
    ``what`` and the URL (less its credentials) when it is malformed (an unclosed ``[``, a bracketed
    host that is no IPv6 address)."""
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 (checks a bracketed host)
        return parts
    except ValueError as exc:
        shown = re.sub(r"://[^/@]*@", "://", url)
        raise AnoclipError(f"malformed {what} URL {shown!r} ({exc}); write scheme://host[:port]/path, with an "
                           "IPv6 host in brackets ([::1])") from None


def split_class(text: str, classes: list[str]) -> tuple[str, str | None]:
    """``SRC=CLASS`` -> (SRC, CLASS) when CLASS is one of ``classes``; otherwise (text, None)."""
    source, sep, cls = text.rpartition("=")
    if sep and source and cls in classes:
        return source, cls
    return text, None


def parse_source(text: str, classes: list[str], default_cls: str | None = None) -> SourceSpec:
    """Read one ``--source`` value (see the module docstring)."""
    raw, cls = split_class(text.strip(), classes)
    cls = cls or default_cls
    if not raw:
        raise AnoclipError("an empty --source was given; pass a camera index, a device, a file, a URL or a pipeline")
    if raw.isdigit():
        return SourceSpec(f"camera{raw}", raw, "device", int(raw), cls, live=True)
    if re.fullmatch(r"/dev/video\d+", raw):
        return SourceSpec(raw.rsplit("/", 1)[-1], raw, "device", raw, cls, live=True)
    scheme = match.group(1).lower() if (match := re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", raw)) else ""
    if scheme == "csi":
        return SourceSpec(f"csi{split_url(raw).netloc or 0}", raw, "gstreamer", _csi(raw), cls, live=True)
    if scheme in URL_SCHEMES:
        parts = split_url(raw)
        return SourceSpec(f"{parts.hostname or scheme}{parts.path.rstrip('/')}", raw, "url", raw, cls, live=True)
    if "!" in raw:
        if "appsink" not in raw.rsplit("!", 1)[-1]:
            raise AnoclipError(f"GStreamer source {raw!r} must end in `! appsink` for OpenCV to read its frames")
        return SourceSpec("gstreamer", raw, "gstreamer", raw, cls, live=True)
    if scheme:
        raise AnoclipError(f"source {raw!r}: unknown scheme {scheme}:// (known: csi, {', '.join(URL_SCHEMES)})")
    path = Path(raw)
    if path.is_dir() or is_image(path) or (not path.exists() and any(c in raw for c in GLOB_CHARACTERS)):
        name = path.name if path.exists() else path.parent.name
        return SourceSpec(name or "images", raw, "images", raw, cls, live=False,
                          inputs=tuple(plan_inputs([raw], option="source")))
    if path.is_file():
        return SourceSpec(path.name, raw, "file", str(path), cls, live=False)
    raise AnoclipError(f"source {raw!r}: no such file, camera index, /dev/videoN device, URL or GStreamer pipeline")


def unique_names(specs: list[SourceSpec]) -> list[SourceSpec]:
    """The specs with repeated names made unique: ``clip.avi``, ``clip.avi-2``, ..."""
    counts, seen = Counter(spec.name for spec in specs), Counter()
    unique = []
    for spec in specs:
        seen[spec.name] += 1
        unique.append(spec if counts[spec.name] == 1 or seen[spec.name] == 1
                      else replace(spec, name=f"{spec.name}-{seen[spec.name]}"))
    return unique


def _csi(raw: str) -> str:
    parts = urlsplit(raw)
    sensor = parts.netloc or "0"
    if not sensor.isdigit():
        raise AnoclipError(f"source {raw!r}: write csi://N with N the sensor id (csi://0)")
    settings = dict(CSI_DEFAULTS)
    for key, values in parse_qs(parts.query).items():
        if key not in settings or not values[-1].isdigit():
            raise AnoclipError(f"source {raw!r}: {key}= is not a csi:// setting (width, height, fps; whole numbers)")
        settings[key] = int(values[-1])
    return csi_pipeline(int(sensor), settings["width"], settings["height"], settings["fps"])


def check_backend(spec: SourceSpec) -> None:
    """Raise when this OpenCV cannot open the kind of source at all (before any thread starts)."""
    import cv2

    if spec.kind == "gstreamer" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        raise AnoclipError(
            f"source {spec.uri!r} needs OpenCV built with GStreamer, and this OpenCV {cv2.__version__} has none "
            "(cv2.getBuildInformation(): GStreamer NO); on a Jetson use JetPack's OpenCV (python3-opencv, with "
            "`pip uninstall opencv-python-headless`), elsewhere an OpenCV built with -DWITH_GSTREAMER=ON"
        )


def open_capture(spec: SourceSpec):
    """A ``cv2.VideoCapture`` of the source, or None when it does not open.

    A network stream is opened in a thread of its own while the calling thread waits in short
    steps, so that Ctrl-C (a KeyboardInterrupt) ends the wait at once instead of after the open
    timeout; the abandoned capture is released when its open returns."""
    import cv2

    params: list[int] = []
    if spec.kind != "url":
        capture = cv2.VideoCapture(spec.target, spec.api, params)
    else:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
        os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        capture = _Opening(lambda: cv2.VideoCapture(spec.target, spec.api, params)).wait()
    if not capture.isOpened():
        capture.release()
        return None
    if spec.kind == "device":
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the driver keeps one frame, not a backlog
    return capture


class _Opening(threading.Thread):
    """Runs ``opener`` (a blocking open) in a daemon thread; :meth:`wait` returns what it opened,
    and a caller interrupted while waiting leaves it to be released when the open returns."""

    def __init__(self, opener):
        super().__init__(name="open-source", daemon=True)
        self.opener, self.lock = opener, threading.Lock()
        self.capture, self.error, self.abandoned = None, None, False

    def run(self) -> None:
        try:
            capture = self.opener()
        except BaseException as exc:  # handed to the waiting caller
            capture, self.error = None, exc
        with self.lock:
            if self.abandoned and capture is not None:
                capture.release()
            else:
                self.capture = capture

    def wait(self):
        self.start()
        try:
            while self.is_alive():
                self.join(0.1)  # short steps: a signal's handler runs between them
        except BaseException:
            with self.lock:
                self.abandoned = True
                if self.capture is not None:
                    self.capture.release()
            raise
        if self.error is not None:
            raise self.error
        return self.capture
