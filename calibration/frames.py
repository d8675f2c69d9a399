"""Frames to calibrate on: image files, folders of images and video files, read as RGB arrays.

The inputs are checked before any frame is scored (each exists, is an image, a folder holding
images or a video OpenCV can open), so that a mistake ends the run at once, in one line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.outputs import IMAGE_SUFFIXES, discover_images
from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS, read_image

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts"}


@dataclass(frozen=True)
class FrameSource:
    """One file to read frames from: an image (one frame) or a video (every ``stride``-th frame)."""

    path: Path
    video: bool
    expected: int  # frames it should give (videos: from the frame count OpenCV reports; 0 if unknown)


def plan_sources(inputs: Sequence[str | os.PathLike], stride: int = 1, option: str = "--normal") -> list[FrameSource]:
    """The files behind ``inputs`` in order (folders: their images, sorted); AnoclipError for an
    input that is missing, of another kind, an empty folder or a video that cannot be opened
    (``option``: the command-line option that named them, for the message)."""
    sources: list[FrameSource] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            images = [file for file, _ in discover_images([str(path)])]
            if not images:
                raise AnoclipError(f"{option} {path}: the folder holds no images "
                                   f"({', '.join(sorted(IMAGE_SUFFIXES))}); give a folder of normal images")
            sources += [FrameSource(file, False, 1) for file in images]
        elif not path.is_file():
            raise AnoclipError(f"{option} {path} does not exist; give normal images, folders of them or videos")
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            sources.append(FrameSource(path, True, _video_frames(path, stride)))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            sources.append(FrameSource(path, False, 1))
        else:
            raise AnoclipError(f"{option} {path} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a "
                               f"video ({', '.join(sorted(VIDEO_SUFFIXES))}); give normal images or videos")
    return sources


def iter_frames(sources: Sequence[FrameSource], stride: int = 1,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Iterator[np.ndarray]:
    """RGB uint8 frames of every source in turn (videos: frames 0, stride, 2 stride, ...)."""
    for source in sources:
        if source.video:
            yield from _video(source.path, stride)
        else:
            yield read_image(source.path, max_pixels)


def _open(path: Path):
    import cv2

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise AnoclipError(f"cannot open the video {path} (damaged, or a codec this OpenCV cannot decode); "
                           "convert it (e.g. to H.264 .mp4 or MJPG .avi) or give its frames as images")
    return capture


def _video_frames(path: Path, stride: int) -> int:
    import cv2

    capture = _open(path)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    return (count + stride - 1) // stride if count > 0 else 0


def _video(path: Path, stride: int) -> Iterator[np.ndarray]:
    import cv2

    capture = _open(path)
    read = index = 0
    try:
        while capture.grab():
            if index % stride == 0:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    break
                read += 1
                yield cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if read == 0:
        raise AnoclipError(f"the video {path} gave no frames (empty or damaged); give another video or its frames "
                           "as images")
    log.debug("%s: %d frames read (every %d of %d)", path, read, stride, index)
