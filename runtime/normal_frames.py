"""What normal frames make, measured the same way wherever they come from (`anoclip calibrate
threshold|memory` from files, `anoclip stream --enrol` from the line itself): the thresholds record
of a class from its normal scores and maps, its memory rows from their patch tokens, and the one
commit that stores both in the folder.

image threshold = the ``quantile`` of the normal frames' scores + ``margin``, or, with a
``false_alarm_rate`` α (split conformal prediction), the k-th smallest of the n normal scores,
k = ⌈(n+1)(1−α)⌉, + ``margin`` (>= 0): a new normal frame exchangeable with the calibration frames
scores above it with probability at most α (over the draw of calibration and new frame together);
pixel threshold = the ``pixel_quantile`` of their map values + ``pixel_margin``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import VISUAL, verify_files, verify_thresholds
from .errors import AnoclipError
from .folder import transaction
from .integrity import resolve_inside
from .memory import MEMORY, ClassMemory, MemoryBank, covering_radius, greedy_coreset, memory_bytes, read_memory
from .prompt_weights import read_prompts
from .thresholds import (CONFORMAL_RULE, QUANTILE_RULE, THRESHOLDS, ClassCalibration, ThresholdTable,
                         conformal_assumption, conformal_frames_needed, conformal_rank, read_thresholds,
                         text_features_sha256, threshold_bytes, tta_settings)

log = logging.getLogger(__name__)

DEFAULT_QUANTILE = 0.995
DEFAULT_PIXEL_QUANTILE = 1.0  # the largest normal map value: no normal frame seen would show a region
MIN_RELIABLE_FRAMES = 20  # below this, a high quantile of the scores is little more than their maximum
PIXELS_PER_FRAME = 4096  # map values kept per frame (a strided subsample plus the frame's maximum)

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


def map_sample(amap: np.ndarray, index: int) -> np.ndarray:
    """At most PIXELS_PER_FRAME values of a map, every step-th from an offset that moves from frame to
    frame (so that frames together cover every pixel position), plus its maximum (so that quantile 1
    is the largest normal value)."""
    flat = np.asarray(amap, dtype=np.float32).ravel()
    step = -(-flat.size // PIXELS_PER_FRAME)
    if step <= 1:
        return flat.copy()
    return np.append(flat[index % step::step], flat.max())


def threshold_record(detector, cls: str, scores: Sequence[float], samples: Sequence[np.ndarray],
                     settings: ThresholdSettings = ThresholdSettings(), *, normal: Sequence[str] = (),
                     command: str = "", memory: tuple[str, float | None, str] | None = None) -> ClassCalibration:
    """The thresholds record of ``cls`` from the normal frames' ``scores`` and map samples
    (:func:`map_sample`), scored by ``detector`` (its model, TTA, tiling, smoothing and memory
    branch are recorded; ``memory``: the branch the scores were made with, when not the detector's
    own, as ``Detector.memory_setting`` states it)."""
    if not scores:
        raise AnoclipError("no normal frames were read; give normal images, folders of them or videos with --normal")
    settings.check_frame_count(len(scores))
    if settings.false_alarm_rate is None and len(scores) < MIN_RELIABLE_FRAMES:
        log.warning("only %d normal frame(s): the %g quantile of so few scores is unreliable; give at least %d "
                    "(better a few hundred)", len(scores), settings.quantile, MIN_RELIABLE_FRAMES)
    values = np.concatenate(samples)
    text = detector.class_prompts(cls).text_features
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
        score_mean=float(score_array.mean()), score_median=float(np.median(score_array)),
        pixel_median=float(np.median(values)), model=detector.model,
        model_sha256=detector.artifacts.model_sha256(detector.model), text_features_sha256=text_features_sha256(text),
        tta=detector.tta is not None, tta_settings=tta_settings(detector.tta), tiling=detector.tiling,
        smoothing_sigma=float(detector.smoothing_sigma), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=command, normal=normal_inputs, rule=settings.rule, false_alarm_rate=settings.false_alarm_rate,
        rank=rank, assumption=conformal_assumption(normal_inputs) if rank is not None else "",
        **dict(zip(("memory", "memory_weight", "memory_sha256"), memory or detector.memory_setting(cls))),
    )



def build_class_memory(rows: np.ndarray, max_patches: int, old: ClassMemory | None = None) -> tuple[np.ndarray, int, float]:
    """(memory rows, rows before the coreset, covering radius) of new ``rows`` plus ``old``'s."""
    from tqdm import tqdm

    if old is not None:
        rows = np.concatenate([old.patches, rows])
    if len(rows) <= max_patches:
        return rows, len(rows), 0.0
    with tqdm(total=max_patches, desc="coreset", unit="patch", file=sys.stderr, disable=None) as bar:
        kept = greedy_coreset(rows, max_patches, progress=lambda k: bar.update(k - bar.n))
        bar.update(max_patches - bar.n)
    return np.ascontiguousarray(rows[kept]), len(rows), covering_radius(rows, kept)



# ----------------------------------------------------------------------------------------------
# Storing


LOCK_WAIT_S = 5.0  # storing takes milliseconds: another class's calibration finishing is waited for


def store_normal_frames(folder: str | os.PathLike, cls: str, *, memory: ClassMemory | None = None,
                        visual_sha256: str = "", record: ClassCalibration | None = None, command: str,
                        replace_file: bool = False) -> tuple[str, str]:
    """Commit ``cls``'s new memory and/or thresholds record in one transaction, every other class's
    kept; (the memory file's name, the thresholds file's name), "" for a kind the folder has none of.

    The folder must still hold the visual model the memory's tokens came from (``visual_sha256``)
    and the model, class embeddings and memory the record was measured with. ``replace_file``
    starts a new thresholds file (the way out when the current one fails its check).
    """
    folder = Path(folder)
    with transaction(folder, wait=LOCK_WAIT_S) as tx:
        manifest = tx.manifest
        if memory is not None:
            tx.require_source(VISUAL, visual_sha256, f"anoclip calibrate memory --artifacts {folder} --class {cls} "
                                                     "--normal ...")
            bank = current_memory(folder, manifest)
            if bank.visual_sha256 != visual_sha256:
                bank = MemoryBank({}, visual_sha256, manifest.embed_dim)
            manifest.memory = tx.add_file(MEMORY, memory_bytes(bank.with_class(memory)))
        if record is not None:
            _check_unchanged(folder, manifest, cls, record, memory)
            table = ThresholdTable() if replace_file else current_thresholds(folder, manifest)
            manifest.thresholds = tx.add_file(THRESHOLDS, threshold_bytes(table.with_class(cls, record)))
        tx.commit(command)
    return manifest.memory, manifest.thresholds


def current_thresholds(folder: Path, manifest) -> ThresholdTable:
    """The thresholds the manifest names (checked against its sha256); empty when it names none."""
    if not manifest.thresholds:
        return ThresholdTable()
    verify_thresholds(folder, manifest)
    return read_thresholds(resolve_inside(folder, manifest.thresholds))


def current_memory(folder: str | os.PathLike, manifest=None) -> MemoryBank:
    """The memories the manifest names (checked against its sha256); empty when it names none."""
    from .artifacts import read_manifest

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    if not manifest.memory:
        return MemoryBank({}, "", manifest.embed_dim)
    verify_files(folder, manifest, [manifest.memory])
    return read_memory(resolve_inside(folder, manifest.memory))


def _check_unchanged(folder: Path, manifest, cls: str, record: ClassCalibration, memory: ClassMemory | None) -> None:
    """Refuse to store thresholds measured on a model, class embeddings or memory the folder no
    longer holds (another writer committed while the frames were being scored)."""
    entry = manifest.models.get(record.model)
    model_sha = manifest.files.get(entry.file, "") if entry is not None else ""
    text = read_prompts(resolve_inside(folder, manifest.prompts)).get(cls).text_features
    setting = record.memory_setting
    if record.memory != "off":  # the class's memory as it will be committed, against the one the frames were scored with
        if memory is None:
            bank = current_memory(folder, manifest)
            memory = bank.classes.get(cls)
        setting = (record.memory, record.memory_weight, memory.sha256) if memory is not None else ("off", None, "")
    reasons = record.mismatches(record.model, model_sha, text_features_sha256(text), record.tta_settings,
                                record.tiling, record.smoothing_sigma, setting)
    if reasons:
        raise AnoclipError(f"{folder} changed while calibrating ({'; '.join(reasons)}); nothing was written, "
                           "run the calibration again")
