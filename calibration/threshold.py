"""Score thresholds from normal frames: measure them with a Detector, then store them in its folder.

image threshold = the ``quantile`` of the normal frames' scores + ``margin``, or, with a
``false_alarm_rate`` α (split conformal prediction), the k-th smallest of the n normal scores,
k = ⌈(n+1)(1−α)⌉, + ``margin`` (>= 0): a new normal frame exchangeable with the calibration frames
scores above it with probability at most α (over the draw of calibration and new frame together);
pixel threshold = the ``pixel_quantile`` of their map values + ``pixel_margin``.

Storing goes through the folder's transaction (``anoclip.runtime.folder``): the thresholds file
(every class already calibrated, plus this one) is written under a new content-addressed name and
committed with the manifest; the file it replaces is removed afterwards. A failure leaves the
folder as it was.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import Iterable, Sequence

import numpy as np

from anoclip.runtime.artifacts import read_manifest
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.normal_frames import (DEFAULT_PIXEL_QUANTILE, DEFAULT_QUANTILE, PIXELS_PER_FRAME,  # noqa: F401
                                           ThresholdSettings, current_thresholds, image_threshold_value,  # noqa: F401
                                           map_sample, store_normal_frames, threshold_record)
from anoclip.runtime.thresholds import ClassCalibration

log = logging.getLogger(__name__)

BATCH = 8  # frames per model run
CALIBRATION_STATE = "calibration"  # the TTA state key the calibration adapts (the detector's others stay as they are)


def calibrate_threshold(detector: Detector, cls: str, frames: Iterable[np.ndarray],
                        settings: ThresholdSettings = ThresholdSettings(), *, normal: Sequence[str] = (),
                        command: str = "", total: int | None = None, max_frames: int | None = None,
                        replace_file: bool = False) -> tuple[ClassCalibration, str]:
    """Measure ``cls``'s thresholds on ``frames`` (normal RGB frames) with ``detector`` and store
    them in the detector's artifact folder; (the record, the thresholds file's name)."""
    if not replace_file:  # a thresholds file that fails its check stops the run before any frame is scored
        current_thresholds(detector.artifacts.folder, read_manifest(detector.artifacts.folder))
    record = measure_threshold(detector, cls, frames, settings, normal=normal, command=command, total=total,
                               max_frames=max_frames)
    _, name = store_normal_frames(detector.artifacts.folder, cls, record=record,
                                  command=command or f"calibrate threshold --class {cls}", replace_file=replace_file)
    return record, name


def save_threshold(folder: str | os.PathLike, cls: str, record: ClassCalibration, command: str = "",
                   replace_file: bool = False) -> str:
    """Store ``record`` as ``cls``'s thresholds in the artifact folder (the other classes' kept); the file's name."""
    return store_normal_frames(folder, cls, record=record, command=command or f"calibrate threshold --class {cls}",
                               replace_file=replace_file)[1]


def measure_threshold(detector: Detector, cls: str, frames: Iterable[np.ndarray],
                      settings: ThresholdSettings = ThresholdSettings(), *, normal: Sequence[str] = (),
                      command: str = "", total: int | None = None, max_frames: int | None = None) -> ClassCalibration:
    """Score the normal ``frames`` (RGB arrays) for ``cls`` and take the thresholds from them.

    Args:
        detector: runs the frames; its model, TTA, tiling and smoothing are recorded with the result.
        normal: the inputs the frames came from, as given (recorded).
        command: the command line (recorded).
        total: the number of frames expected, for the progress bar.
        max_frames: use at most this many frames.
    """
    from tqdm import tqdm

    detector.class_prompts(cls)  # an unknown class fails before any frame is read
    memory = detector.class_memory(cls)
    shared = sorted(set(map(str, normal)) & set(memory.provenance.get("normal", []))) if memory is not None else []
    if shared:
        log.warning("%s also made the memory of class %s: its frames score near 0 against their own tokens, so these "
                    "thresholds come out too low (false alarms); calibrate on other normal frames", ", ".join(shared), cls)
    if max_frames is not None:  # too few frames allowed for the conformal rank: refused before any is scored
        settings.check_frame_count(max_frames)
    source = iter(frames)
    used = itertools.islice(source, max_frames) if max_frames is not None else source
    scores: list[float] = []
    samples: list[np.ndarray] = []
    total = (min(total, max_frames) if total and max_frames else total) or None
    try:
        with tqdm(total=total, desc=f"calibrate {cls}", unit="frame", file=sys.stderr, disable=None) as bar:
            while chunk := list(itertools.islice(used, BATCH)):
                for result in detector.predict_batch(chunk, cls, tta_keys=[CALIBRATION_STATE] * len(chunk)):
                    samples.append(map_sample(result.anomaly_map_full, len(scores)))
                    scores.append(result.score)
                bar.update(len(chunk))
    finally:
        detector.reset_tta(cls, CALIBRATION_STATE)
    if not scores:
        raise AnoclipError("no normal frames were read; give normal images, folders of them or videos with --normal")
    if max_frames is not None and len(scores) == max_frames and _more(source):
        log.warning("stopped after %d frames (max_frames); the later ones were not used", max_frames)
    return threshold_record(detector, cls, scores, samples, settings, normal=normal, command=command)


def _more(source) -> bool:
    """Whether ``source`` has a frame left (it is closed afterwards: a video is released)."""
    try:
        return next(source, None) is not None
    except AnoclipError:  # the next input is unreadable: there was more, unused either way
        return True
    finally:
        getattr(source, "close", lambda: None)()
