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
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from anoclip.runtime.artifacts import read_manifest, verify_thresholds
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.integrity import resolve_inside
from anoclip.runtime.folder import transaction
from anoclip.runtime.prompt_weights import read_prompts
from anoclip.runtime.thresholds import (CONFORMAL_RULE, QUANTILE_RULE, THRESHOLDS, ClassCalibration, ThresholdTable,
                                        conformal_assumption, conformal_frames_needed, conformal_rank,
                                        read_thresholds, text_features_sha256, threshold_bytes, tta_settings)

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.995
DEFAULT_PIXEL_QUANTILE = 1.0  # the largest normal map value: no normal frame seen would show a region
MIN_RELIABLE_FRAMES = 20  # below this, a high quantile of the scores is little more than their maximum
PIXELS_PER_FRAME = 4096  # map values kept per frame (a strided subsample plus the frame's maximum)
BATCH = 8  # frames per model run
LOCK_WAIT_S = 5.0  # storing takes milliseconds: a calibration of another class finishing is waited for
CALIBRATION_STATE = "calibration"  # the TTA state key the calibration adapts (the detector's others stay as they are)


@dataclass(frozen=True)
class ThresholdSettings:
    """How the thresholds are taken from the normal frames (margins in score units, p_abnormal).

    ``false_alarm_rate`` (α in (0, 1)) replaces ``quantile`` by the conformal rule: the image
    threshold is the ⌈(n+1)(1−α)⌉-th smallest of the n normal scores, plus ``margin``, which must
    then be >= 0 (it only raises the threshold, so the guarantee P(normal score > threshold) <= α
    still holds; a negative one would void it).
    """

    quantile: float = DEFAULT_QUANTILE
    margin: float = 0.0
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE
    pixel_margin: float = 0.0
    false_alarm_rate: float | None = None

    def __post_init__(self) -> None:
        for name in ("quantile", "pixel_quantile"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        for name in ("margin", "pixel_margin"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.false_alarm_rate is not None:
            if not 0.0 < self.false_alarm_rate < 1.0:
                raise ValueError(f"false_alarm_rate must lie in (0, 1), got {self.false_alarm_rate!r}")
            if self.margin < 0:
                raise ValueError(f"margin must be >= 0 with a false-alarm rate (got {self.margin!r}): a negative "
                                 "margin lowers the threshold below the conformal rank and voids the guarantee")

    @property
    def rule(self) -> str:
        return QUANTILE_RULE if self.false_alarm_rate is None else CONFORMAL_RULE

    def frames_needed(self) -> int:
        """The fewest normal frames the image threshold can be taken from (conformal: ⌈1/α⌉ − 1)."""
        return 1 if self.false_alarm_rate is None else max(1, conformal_frames_needed(self.false_alarm_rate))

    def check_frame_count(self, frames: int) -> None:
        """An AnoclipError when ``frames`` normal frames are too few for the conformal rank."""
        needed = self.frames_needed()
        if self.false_alarm_rate is not None and frames < needed:
            alpha = self.false_alarm_rate
            raise AnoclipError(
                f"--false-alarm-rate {alpha:g} needs at least {needed} normal frames (the threshold is the "
                f"ceil((n+1)(1-{alpha:g}))-th smallest of n scores, which exists only from n = {needed}), "
                f"{frames} given; give more normal frames or a larger --false-alarm-rate; nothing was written")


def image_threshold_value(scores: np.ndarray, settings: ThresholdSettings) -> tuple[float, int | None]:
    """(the score the image threshold is taken at, before the margin; the conformal rank k or None).

    Quantile rule: numpy's linear-interpolated ``settings.quantile`` of the scores. Conformal rule:
    the k-th smallest score, k = ⌈(n+1)(1−α)⌉ (an order statistic, no interpolation)."""
    scores = np.asarray(scores, dtype=np.float64)
    if settings.false_alarm_rate is None:
        return float(np.quantile(scores, settings.quantile)), None
    settings.check_frame_count(scores.size)
    rank = conformal_rank(scores.size, settings.false_alarm_rate)
    return float(np.partition(scores, rank - 1)[rank - 1]), rank


def calibrate_threshold(detector: Detector, cls: str, frames: Iterable[np.ndarray],
                        settings: ThresholdSettings = ThresholdSettings(), *, normal: Sequence[str] = (),
                        command: str = "", total: int | None = None, max_frames: int | None = None,
                        replace_file: bool = False) -> tuple[ClassCalibration, str]:
    """Measure ``cls``'s thresholds on ``frames`` (normal RGB frames) with ``detector`` and store
    them in the detector's artifact folder; (the record, the thresholds file's name)."""
    if not replace_file:  # a thresholds file that fails its check stops the run before any frame is scored
        _current_table(detector.artifacts.folder, read_manifest(detector.artifacts.folder))
    record = measure_threshold(detector, cls, frames, settings, normal=normal, command=command, total=total,
                               max_frames=max_frames)
    name, _ = save_threshold(detector.artifacts.folder, cls, record, command, replace_file=replace_file)
    return record, name


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

    text = detector.class_prompts(cls).text_features  # an unknown class fails before any frame is read
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
                    samples.append(_map_sample(result.anomaly_map_full, len(scores)))
                    scores.append(result.score)
                bar.update(len(chunk))
    finally:
        detector.reset_tta(cls, CALIBRATION_STATE)
    if not scores:
        raise AnoclipError("no normal frames were read; give normal images, folders of them or videos with --normal")
    if max_frames is not None and len(scores) == max_frames and _more(source):
        log.warning("stopped after %d frames (max_frames); the later ones were not used", max_frames)
    settings.check_frame_count(len(scores))
    if settings.false_alarm_rate is None and len(scores) < MIN_RELIABLE_FRAMES:
        log.warning("only %d normal frame(s): the %g quantile of so few scores is unreliable; give at least %d "
                    "(better a few hundred)", len(scores), settings.quantile, MIN_RELIABLE_FRAMES)
    values = np.concatenate(samples)
    score_array = np.asarray(scores, dtype=np.float64)
    if not (np.all(np.isfinite(score_array)) and np.all(np.isfinite(values))):
        raise AnoclipError("the normal frames' scores or maps hold NaN or infinity; the model or its artifacts are "
                           "damaged, re-export them")
    image_q, rank = image_threshold_value(score_array, settings)
    normal_inputs = [str(n) for n in normal]
    pixel_q = float(np.quantile(values, settings.pixel_quantile))
    return ClassCalibration(
        image=image_q + settings.margin, pixel=pixel_q + settings.pixel_margin, frames=len(scores),
        quantile=settings.quantile if rank is None else 1 - settings.false_alarm_rate, margin=settings.margin,
        image_quantile_value=image_q,
        pixel_quantile=settings.pixel_quantile, pixel_margin=settings.pixel_margin, pixel_quantile_value=pixel_q,
        pixel_values=int(values.size), score_min=float(score_array.min()), score_max=float(score_array.max()),
        score_mean=float(score_array.mean()), model=detector.model,
        model_sha256=detector.artifacts.model_sha256(detector.model), text_features_sha256=text_features_sha256(text),
        tta=detector.tta is not None, tta_settings=tta_settings(detector.tta), tiling=detector.tiling,
        smoothing_sigma=float(detector.smoothing_sigma), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=command, normal=normal_inputs, rule=settings.rule, false_alarm_rate=settings.false_alarm_rate,
        rank=rank, assumption=conformal_assumption(normal_inputs) if rank is not None else "",
        **dict(zip(("memory", "memory_weight", "memory_sha256"), detector.memory_setting(cls))),
    )


def _more(source) -> bool:
    """Whether ``source`` has a frame left (it is closed afterwards: a video is released)."""
    try:
        return next(source, None) is not None
    except AnoclipError:  # the next input is unreadable: there was more, unused either way
        return True
    finally:
        getattr(source, "close", lambda: None)()


def _map_sample(amap: np.ndarray, index: int) -> np.ndarray:
    """At most PIXELS_PER_FRAME values of a map, every step-th from an offset that moves from frame to
    frame (so that frames together cover every pixel position), plus its maximum (so that quantile 1
    is the largest normal value)."""
    flat = np.asarray(amap, dtype=np.float32).ravel()
    step = -(-flat.size // PIXELS_PER_FRAME)
    if step <= 1:
        return flat.copy()
    return np.append(flat[index % step::step], flat.max())


def save_threshold(folder: str | os.PathLike, cls: str, record: ClassCalibration, command: str = "",
                   replace_file: bool = False) -> tuple[str, ThresholdTable]:
    """Store ``record`` as ``cls``'s thresholds in the artifact folder; (file name, all thresholds).

    The other classes' thresholds are kept, unless ``replace_file`` starts a new file (the way out
    when the current one fails its hash check). The folder must still hold the model and the class
    embeddings ``record`` was measured with.
    """
    folder = Path(folder)
    with transaction(folder, wait=LOCK_WAIT_S) as tx:
        manifest = tx.manifest
        _check_unchanged(folder, manifest, cls, record)
        table = (ThresholdTable() if replace_file else _current_table(folder, manifest)).with_class(cls, record)
        manifest.thresholds = tx.add_file(THRESHOLDS, threshold_bytes(table))
        tx.commit(command or f"calibrate threshold --class {cls}")
    return manifest.thresholds, table


def _current_table(folder: Path, manifest) -> ThresholdTable:
    """The thresholds the manifest names (checked against its sha256); empty when it names none."""
    if not manifest.thresholds:
        return ThresholdTable()
    verify_thresholds(folder, manifest)
    return read_thresholds(resolve_inside(folder, manifest.thresholds))


def _check_unchanged(folder: Path, manifest, cls: str, record: ClassCalibration) -> None:
    """Refuse to store thresholds measured on a model or class embeddings the folder no longer holds
    (an export that ran while the frames were being scored)."""
    entry = manifest.models.get(record.model)
    model_sha = manifest.files.get(entry.file, "") if entry is not None else ""
    text = read_prompts(resolve_inside(folder, manifest.prompts)).get(cls).text_features
    memory = record.memory_setting
    if record.memory != "off":  # the class's memory now, against the one the frames were scored with
        from anoclip.runtime.memory import read_memory

        bank = read_memory(resolve_inside(folder, manifest.memory)) if manifest.memory else None
        now = bank.classes[cls].sha256 if bank is not None and cls in bank.classes else ""
        memory = (record.memory, record.memory_weight, now) if now else ("off", None, "")
    reasons = record.mismatches(record.model, model_sha, text_features_sha256(text), record.tta_settings,
                                record.tiling, record.smoothing_sigma, memory)
    if reasons:
        raise AnoclipError(f"{folder} changed while calibrating ({'; '.join(reasons)}); nothing was written, "
                           "run the calibration again")
