"""The one reader of inspection inputs: what ``predict``, ``stream`` and ``calibrate`` read frames from.

Finite sources are read in order, every frame kept:

    image.png                   one frame (png, jpg, jpeg, bmp, tif, tiff, webp)
    folder/                     its images, searched recursively, in sorted order
    'folder/*.png'              a glob pattern (quoted, so that the shell leaves it): the images it matches
    clip.mp4                    a video file: frames 0, stride, 2 stride, ...

Live sources (a camera index, ``/dev/videoN``, an rtsp/rtmp/http(s)/udp/tcp/srt URL, a GStreamer
pipeline ending in ``appsink``, ``csi://N``) are named by :func:`anoclip.runtime.stream.sources.parse_source`,
which hands every path back to this module, and read by the stream's capture threads (the newest
frame kept). ``calibrate`` reads finite sources through :class:`FrameReader`; ``predict`` and
``stream`` through the same reader wrapped as a capture (:class:`ReaderCapture`), except the video
files given to ``stream``, which OpenCV reads there (``--realtime``, ``--max-fps``, ``--loop``).

Bad input is handled the same way everywhere: a missing path, a folder or pattern without images, a
file that is neither an image nor a video and a video that cannot be opened stop the run in one line
before any frame is scored (:func:`plan_inputs`); an image that cannot be decoded, or that is larger
than the pixel limit, and a video that gives no frame or frames above the limit, are skipped with a
line and counted (:attr:`FrameReader.skipped`), and the run goes on. A video that ends before the
frame count its header gives (truncated, or damaged on the way) is said in a line with both counts
(:func:`video_shortfall`) and counted the same way, after its frames that could be read were scored.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import AnoclipError
from .preprocess import DEFAULT_MAX_PIXELS, decode_image, read_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts"}
GLOB_CHARACTERS = "*?["
MAX_KEY_BYTES = 160  # output names stay well below the 255-byte limit of file names


@dataclass(frozen=True)
class FiniteSource:
    """One file to read frames from: an image (one frame) or a video (every ``stride``-th frame).

    key: the file's output name, unique among the inputs of a run (see :func:`plan_inputs`).
    expected: frames it should give (videos: from the frame count OpenCV reports; 0 if unknown).
    header_frames: a video's frame count as its header gives it (before the stride; 0 if unknown).
    """

    path: Path
    key: str
    video: bool
    expected: int
    header_frames: int = 0


@dataclass
class InputFrame:
    """One frame as read: RGB uint8, its index in its source (0 for an image) and, for an image
    file, the file's encoded bytes (a remote detector is sent those)."""

    source: FiniteSource
    index: int
    rgb: np.ndarray
    data: bytes | None = None


def is_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file named as an image."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and Path(path).is_file()


def plan_inputs(inputs: Sequence[str | os.PathLike], stride: int = 1, option: str = "input",
                exclude: str | os.PathLike | None = None) -> list[FiniteSource]:
    """The files behind ``inputs``, in order (folders and patterns: their images, sorted), each with
    a unique output key; AnoclipError, before any frame is read, for an input that is missing, of
    another kind, a folder or pattern without images or a video that cannot be opened
    (``option``: what named them on the command line, for the message).

    ``exclude``: the output folder: it is not searched (its overlays are images too), and it may not
    be one of the input folders. Keys are unique (case-insensitively): images that share a name stem
    take their suffix (``a.png`` -> ``a_png``, ``a.jpg`` -> ``a_jpg``), and any clash that remains
    gets a counter; an image found under a folder is keyed by its path below it (``sub__a``), prefixed
    with the folder's name when there are several inputs.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, str, bool]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            if skip is not None and path.resolve() == skip:
                raise AnoclipError(f"--out {exclude} is the input folder {raw}; its overlays would be read as inputs "
                                   "on the next run, choose another --out")
            images = _walk(path, skip)
            if not images:
                raise AnoclipError(f"{option} {path}: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            for file in images:
                key = str(file.relative_to(path).with_suffix("")).replace(os.sep, "__")
                found.append((file, f"{path.name}__{key}" if len(inputs) > 1 else key, False))
        elif path.is_file():
            if path.suffix.lower() in VIDEO_SUFFIXES:
                found.append((path, path.stem, True))
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                found.append((path, path.stem, False))
            else:
                raise AnoclipError(f"{option} {path} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a "
                                   f"video ({', '.join(sorted(VIDEO_SUFFIXES))})")
        elif any(c in str(raw) for c in GLOB_CHARACTERS):
            matches = sorted(Path(p) for p in glob.glob(str(raw), recursive=True)
                             if is_image(p) and not (skip is not None and skip in Path(p).resolve().parents))
            if not matches:
                raise AnoclipError(f"{option} {raw} matches no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += [(file, file.stem, False) for file in matches]
        else:
            raise AnoclipError(f"{option} {path} does not exist")
    keys = _unique_keys([(file, key) for file, key, _ in found])
    sources = []
    for (file, _, video), (_, key) in zip(found, keys):
        frames = _video_frames(file) if video else 1
        sources.append(FiniteSource(file, key, video, (frames + stride - 1) // stride if video else 1,
                                    frames if video else 0))
    return sources


class FrameReader:
    """Iterates over the frames of finite ``sources`` in order (an :class:`InputFrame` each), every
    frame kept; images above ``max_pixels`` are refused unread, videos whose frames are larger
    are skipped whole. What is skipped is logged with its reason and listed in :attr:`skipped`."""

    def __init__(self, sources: Sequence[FiniteSource], stride: int = 1, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.sources, self.stride, self.max_pixels = list(sources), stride, max_pixels
        self.skipped: list[tuple[Path, str]] = []

    @property
    def expected(self) -> int | None:
        """The frames the sources should give, None when a video does not say."""
        return sum(s.expected for s in self.sources) if all(s.expected for s in self.sources) else None

    def __iter__(self) -> Iterator[InputFrame]:
        for source in self.sources:
            if source.video:
                yield from self._video(source)
                continue
            try:
                data = read_file(source.path)
                rgb = decode_image(data, self.max_pixels, str(source.path))
            except AnoclipError as exc:
                self._skip(source, str(exc))
                continue
            yield InputFrame(source, 0, rgb, data)

    def frames(self) -> Iterator[np.ndarray]:
        """The RGB frames alone."""
        return (frame.rgb for frame in self)

    def _skip(self, source: FiniteSource, reason: str) -> None:
        self.skipped.append((source.path, reason))
        log.error("skipped %s: %s", source.path, reason)

    def _video(self, source: FiniteSource) -> Iterator[InputFrame]:
        import cv2

        capture = open_video(source.path)
        read = index = 0
        try:
            width, height = (int(capture.get(p) or 0) for p in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT))
            if self.max_pixels is not None and width * height > self.max_pixels:
                self._skip(source, f"its frames are {width} x {height} pixels, above the limit of {self.max_pixels} "
                                   "pixels (raise the limit with --max-pixels if the frames are genuine)")
                return
            while capture.grab():
                if index % self.stride == 0:
                    ok, frame = capture.retrieve()
                    if not ok or frame is None:
                        break
                    read += 1
                    rgb = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
                    yield InputFrame(source, index, rgb)
                index += 1
        finally:
            capture.release()
        short = video_shortfall(index, source.header_frames)
        if read == 0 or short:
            self._skip(source, short or "the video gave no frames (empty or damaged)")
        log.debug("%s: %d frames read (every %d of %d)", source.path, read, self.stride, index)


class ReaderCapture:
    """A :class:`FrameReader` read like a video, through the calls the stream's capture threads
    make of an OpenCV capture (``read``, ``grab``, ``get``, ``set``, ``release``); frames come as
    BGR, and :attr:`origin` is the :class:`InputFrame` of the last one read (its file, its index
    in the file, the file's bytes). It ends after the reader's last frame; what the reader skipped
    is in ``reader.skipped``."""

    def __init__(self, reader: FrameReader):
        self.reader = reader
        self.frames = iter(reader)
        self.origin: InputFrame | None = None

    def isOpened(self) -> bool:  # noqa: N802 (OpenCV's name)
        return True

    def grab(self) -> bool:
        return self.read()[0]

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.origin = next(self.frames, None)
        if self.origin is None:
            return False, None
        return True, np.ascontiguousarray(self.origin.rgb[:, :, ::-1])

    def get(self, prop: int) -> float:
        return 0.0

    def set(self, prop: int, value: float) -> bool:
        return False

    def release(self) -> None:
        getattr(self.frames, "close", lambda: None)()


def open_video(path: Path):
    """A ``cv2.VideoCapture`` of a video file; AnoclipError when OpenCV cannot open it."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise AnoclipError(f"cannot open the video {path} (damaged, or a codec this OpenCV cannot decode); "
                           "convert it (e.g. to H.264 .mp4 or MJPG .avi) or give its frames as images")
    return capture


def video_shortfall(read: int, header_frames: int) -> str | None:
    """Why a video that gave ``read`` frames ended early, when its header gave ``header_frames``
    (more than 1 % more, and at least 2: some containers only estimate their count); None when it did not."""
    if header_frames <= 0 or header_frames - read <= max(1, header_frames // 100):
        return None
    if read == 0:
        return f"the video gave no frames, where its header gives {header_frames} (empty or damaged)"
    return (f"the video ended after {read} of the {header_frames} frames its header gives (truncated or damaged); "
            f"the {header_frames - read} missing frames were not scored")


def _video_frames(path: Path) -> int:
    """The frame count of a video as its header gives it (0: it does not say)."""
    import cv2

    capture = open_video(path)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    return max(count, 0)


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    files = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if skip is None or Path(top, d).resolve() != skip)
        files += [Path(top, n) for n in names if is_image(Path(top, n))]
    return sorted(files)


def _unique_keys(found: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    counts = Counter(key.casefold() for _, key in found)
    used: set[str] = set()
    unique = []
    for file, key in found:
        if counts[key.casefold()] > 1 and file.suffix:
            key = f"{key}_{file.suffix.lstrip('.').lower()}"
        if len(key.encode()) > MAX_KEY_BYTES:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            key = key.encode()[: MAX_KEY_BYTES - 11].decode(errors="ignore") + "_" + digest
        candidate, number = key, 1
        while candidate.casefold() in used:
            number += 1
            candidate = f"{key}_{number}"
        used.add(candidate.casefold())
        unique.append((file, candidate))
    return unique
