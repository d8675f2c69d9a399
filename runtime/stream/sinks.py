"""Sinks that write to files or the screen: recording, events file, saved anomalous frames, window,
and predict's overlays and maps. (The live web view and MQTT have modules of their own.)"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import AnoclipError
from ..outputs import ResultsLog
from ..plumbing import atomic_write_bytes, ensure_writable_folder
from .events import FrameEvent, Sink

log = logging.getLogger(__name__)

FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class VideoRecorder(Sink):
    """``--record FILE``: the annotated frames as a video (one file per source: FILE, or FILE's stem
    with ``-<n>`` for source n when there are several).

    Each file is written under a hidden temporary name beside it and renamed into place when the
    stream ends (SIGINT and SIGTERM included), so FILE is always a finished, playable video: before
    the rename the finished file is opened with OpenCV and must hold every frame written, its last
    one readable (OpenCV's writer only warns when the disk is full); a file that does not is
    removed, its frames counted as lost and the recording is a sink error. Before each frame the
    free space is checked: less than twice the raw frame left is a sink error at once (the disk is
    full), not hours of frames written into nothing. A second SIGINT (``abandon``) removes the hidden file.
    Frames of another size than the first (a camera that reconnected at another resolution) are
    resized to it.
    """

    name = "recording"

    def __init__(self, path: str | os.PathLike, sources: int, fps: list[float]):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FOURCC:
            raise AnoclipError(f"--record {path}: unknown video type {suffix or '(none)'}; use one of {', '.join(FOURCC)}")
        ensure_writable_folder(self.path.parent if str(self.path.parent) else Path("."), "--record")
        self.fourcc = FOURCC[suffix]
        self.targets = [self.path] if sources == 1 else [self.path.with_name(f"{self.path.stem}-{i}{self.path.suffix}")
                                                          for i in range(sources)]
        self.fps = fps
        self.writers: dict[int, object] = {}
        self.sizes: dict[int, tuple[int, int]] = {}
        self.frames = [0] * sources

    def _partial(self, index: int) -> Path:
        target = self.targets[index]
        return target.with_name(f".{target.stem}.recording{target.suffix}")

    def write(self, event: FrameEvent) -> None:
        import cv2

        index = event.source_index
        image = event.annotated
        target = self.targets[index]
        stat = os.statvfs(target.parent)
        if stat.f_bavail * stat.f_frsize < 2 * image.nbytes:
            raise AnoclipError(f"the disk of {target} is full ({stat.f_bavail * stat.f_frsize} bytes free)")
        if index not in self.writers:
            height, width = image.shape[:2]
            writer = cv2.VideoWriter(str(self._partial(index)), cv2.VideoWriter_fourcc(*self.fourcc),
                                     self.fps[index], (width, height))
            if not writer.isOpened():
                raise AnoclipError(f"OpenCV cannot write {self.targets[index]} ({self.fourcc}); try another suffix")
            self.writers[index], self.sizes[index] = writer, (width, height)
        if image.shape[1::-1] != self.sizes[index]:
            image = cv2.resize(image, self.sizes[index], interpolation=cv2.INTER_AREA)
        self.writers[index].write(image)
        self.frames[index] += 1

    def close(self) -> None:
        failures = []
        for index, writer in self.writers.items():
            writer.release()
            partial, frames = self._partial(index), self.frames[index]
            found = _video_frames(partial)
            if found != frames:
                self.lost += frames
                partial.unlink(missing_ok=True)
                failures.append(f"{self.targets[index]}: {frames} frames written, the finished file "
                                + ("cannot be opened or its last frame read" if found is None else f"holds {found}")
                                + " (is the disk full?); it was removed")
                continue
            os.replace(partial, self.targets[index])
            self.written += frames
            log.info("recorded %d frames to %s", frames, self.targets[index])
        self.writers = {}
        if failures:
            raise AnoclipError("; ".join(failures))

    def abandon(self) -> None:
        """Remove the hidden unfinished files (the run is interrupted before they could be finished)."""
        for index in list(self.writers):
            self._partial(index).unlink(missing_ok=True)
            self.lost += self.frames[index]


def _video_frames(path: Path) -> int | None:
    """The frames a finished video file holds, as OpenCV reads its header; None when it cannot be
    opened or its last frame cannot be read (a header written over a file cut short)."""
    import cv2

    if not path.is_file() or path.stat().st_size == 0:
        return None
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if count > 0:
            capture.set(cv2.CAP_PROP_POS_FRAMES, count - 1)
            if not capture.read()[0]:
                return None
        return count
    finally:
        capture.release()


class EventsLog(Sink):
    """``--events FILE.jsonl`` (and predict's ``results.jsonl``): one JSON line per processed frame
    and class, appended whole under a lock (a killed run never leaves half a line that the next run
    would continue); ``echo``, when given, also receives every line."""

    name = "events"
    draws = False
    takes_errors = True

    def __init__(self, path: str | os.PathLike, echo: Callable[[str], None] | None = None, option: str = "--events"):
        path = Path(path)
        ensure_writable_folder(path.parent if str(path.parent) else Path("."), option)
        self.log = ResultsLog(path.parent, path.name)
        self.echo = echo

    @property
    def path(self) -> Path:
        return self.log.path

    def write(self, event: FrameEvent) -> None:
        for record in event.records():
            line = self.log.append(record)
            if self.echo is not None:
                self.echo(line)
        self.written += 1

    def close(self) -> None:
        self.log.close()


class SavedFrames(Sink):
    """``--save-dir DIR``: for every anomalous frame, ``<n>-<source>_<frame>.jpg`` (annotated) and
    ``<n>-<source>_<frame>_map.npy`` (n: the source's position on the command line) (float32 p_abnormal at the frame's
    resolution, both scaled down above ``max_pixels``), written atomically.
    A frame of an image source is named by its file instead of ``<frame>`` (``<n>-<source>_<file's key>``)."""

    name = "saved frames"

    def __init__(self, folder: str | os.PathLike, quality: int = 90, max_pixels: int | None = None):
        self.folder = Path(folder)
        ensure_writable_folder(self.folder, "--save-dir")
        self.quality = quality
        self.max_pixels = max_pixels

    def write(self, event: FrameEvent) -> None:
        import cv2

        if not event.anomalous:
            return
        stem = (f"{event.source_index}-{_safe(event.source)}_{event.frame_index:08d}" if event.key is None
                else f"{event.source_index}-{_safe(event.source)}_{_safe(event.key)}")  # a frame of an image source
        amap, image = scaled_down(event.anomaly_map, event.annotated, self.max_pixels)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise AnoclipError("JPEG encoding of an annotated frame failed")
        atomic_write_bytes(self.folder / f"{stem}_map.npy", npy_bytes(amap))
        atomic_write_bytes(self.folder / f"{stem}.jpg", jpeg.tobytes())
        self.written += 1


class PredictionFiles(Sink):
    """predict's files: for every frame and class, ``<key><suffix>_overlay.png`` (heat map over the
    frame, with the outlines of the regions above the pixel threshold) and ``<key><suffix>_map.npy``
    (float32 p_abnormal at the frame's resolution) in ``folder``, written atomically, scaled down
    above ``max_pixels``; what was written goes into the class's record (``event.files``).
    ``colour_scale``: "fixed" (tied to the class's calibrated pixel threshold, where it has one) or
    "frame" (each map's own range), with the colour bar drawn either way.

    suffixes: per class, the part it adds to the names (see ``class_suffixes``)."""

    name = "overlays and maps"
    draws = False

    def __init__(self, folder: str | os.PathLike, suffixes: dict[str, str], alpha: float = 0.5,
                 max_pixels: int | None = None, colour_scale: str = "fixed"):
        self.folder, self.suffixes, self.alpha, self.max_pixels = Path(folder), suffixes, alpha, max_pixels
        self.colour_scale = colour_scale

    def write(self, event: FrameEvent) -> None:
        from ..overlay import colour_scale_for, draw_regions, encode_png, legend_note, overlay

        rgb = event.frame[:, :, ::-1]
        for name, one in event.result.by_class.items():
            amap, image = scaled_down(one.anomaly_map_full, rgb, self.max_pixels)
            stem = f"{event.key}{self.suffixes[name]}"
            overlay_path, map_path = self.folder / f"{stem}_overlay.png", self.folder / f"{stem}_map.npy"
            drawn = overlay(np.ascontiguousarray(image), amap, self.alpha,
                            scale=colour_scale_for(one.threshold, self.colour_scale), legend=True,
                            legend_note=legend_note(one.threshold))
            if one.threshold is not None and one.threshold.pixel is not None:
                drawn = draw_regions(drawn, amap, one.threshold.pixel, regions=one.regions,
                                     regions_size=one.anomaly_map_full.shape[:2])
            atomic_write_bytes(overlay_path, encode_png(drawn))
            atomic_write_bytes(map_path, npy_bytes(amap))
            event.files[name] = {"overlay": str(overlay_path), "map": str(map_path), "map_shape": list(amap.shape)}
        self.written += 1


def scaled_down(amap: np.ndarray, image: np.ndarray, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A map and its image scaled down together to at most ``max_pixels`` (as they are when within it)."""
    import cv2

    height, width = amap.shape
    if not max_pixels or height * width <= max_pixels:
        return amap, image
    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return (cv2.resize(amap, size, interpolation=cv2.INTER_AREA),
            cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_AREA))


def class_suffixes(classes: list[str]) -> dict[str, str]:
    """The part each class adds to output names: none for one class; ``_<class>`` with several (the
    name's characters other than letters, digits, ``.``, ``-`` and ``_`` replaced, unique)."""
    if len(classes) == 1:
        return {classes[0]: ""}
    suffixes: dict[str, str] = {}
    for name in classes:
        base = "_" + (re.sub(r"[^\w.-]+", "-", name)[:48] or "class")
        suffix, n = base, 1
        while suffix in suffixes.values():
            n += 1
            suffix = f"{base}-{n}"
        suffixes[name] = suffix
    return suffixes


def npy_bytes(array: np.ndarray) -> bytes:
    """A float32 .npy file of ``array`` (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


class Window(Sink):
    """``--show``: one OpenCV window per source; ``q`` or Esc in a window stops the stream."""

    name = "window"

    def __init__(self, on_quit: Callable[[], None]):
        import cv2

        if not has_gui():
            raise AnoclipError(f"--show needs OpenCV with GUI support, and this OpenCV {cv2.__version__} has none "
                               "(opencv-python-headless); use --web 127.0.0.1:8080 to watch in a browser, or "
                               "install opencv-python instead")
        self.on_quit = on_quit

    def write(self, event: FrameEvent) -> None:
        import cv2

        cv2.imshow(f"anoclip: {event.source}", event.annotated)
        self.written += 1
        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
            self.on_quit()

    def close(self) -> None:
        import cv2

        cv2.destroyAllWindows()


def has_gui() -> bool:
    import cv2

    info = cv2.getBuildInformation()
    match = re.search(r"^\s*GUI:\s*(\S+)", info, re.MULTILINE)
    return bool(match) and match.group(1).upper() != "NONE"


def _safe(name: str) -> str:
    """A source name as a short file-name part: its last path element, in letters, digits, dot,
    dash and underscore."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.rstrip("/").rsplit("/", 1)[-1]).strip("._")[:60] or "source"
