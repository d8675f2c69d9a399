"""Score thresholds: the file that holds them (the decision they make is ``decision.py``).

``anoclip calibrate threshold`` measures, per class, the scores and maps of normal frames and
writes ``thresholds.<sha>.json`` (content-addressed like the folder's other files, named by the
manifest's ``thresholds`` field and hashed with the rest)::

    {"format": "anoclip-thresholds", "format_version": 2,
     "classes": {"bottle": {"image": 0.5031, "pixel": 0.5102, "frames": 200, "quantile": 0.995,
                            "rule": "quantile", ...}}}

Each class says how its image threshold was chosen (``rule``): ``quantile`` (the ``quantile`` of the
normal scores, numpy's linear interpolation) or ``conformal`` (split conformal prediction: with n
normal frames and a false-alarm rate α, the k-th smallest normal score, k = ⌈(n+1)(1−α)⌉ (``rank``);
for a normal frame exchangeable with the calibration frames, P(its score > the threshold) ≤ α, the
``assumption`` the record states). Version 1 files (written before the rule was recorded) are read as
``quantile`` records.

Each class also stores the median of the normal scores and of the map values (``score_median``,
``pixel_median``): the normal centres the severity scale counts from (``decision.py``); files
written before they were stored read them as None, and the scores' mean stands in for both.

Each class also records what its numbers are only valid for: the visual model file (sha256), the
class's text embeddings t+/t- (sha256: re-encoding another class leaves this one valid), the model
kind, whether (and how) TTA made the maps, the tiling and the map smoothing. A class whose record
does not match the loaded artifacts and settings is treated as uncalibrated, with a warning
(:meth:`ClassCalibration.mismatches`, used by ``Detector.threshold_for``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AnoclipError, ArtifactError
from .strict_json import (Check, build, choice, either, flag, integer, list_of, need, null, number, plain_object,
                          sha256, text)

THRESHOLDS = "thresholds.json"  # content-addressed on disk: thresholds.<first 12 hex of sha256>.json
THRESHOLDS_FORMAT = "anoclip-thresholds"
THRESHOLDS_FORMAT_VERSION = 2  # 2: each class records its rule (quantile or conformal)
READABLE_FORMAT_VERSIONS = (1, 2)
RULE_FIELDS = ("rule", "false_alarm_rate", "rank", "assumption")  # added in version 2
MEMORY_FIELDS = ("memory", "memory_weight", "memory_sha256")  # added in version 2
VERSION_2_FIELDS = RULE_FIELDS + MEMORY_FIELDS
QUANTILE_RULE = "quantile"
CONFORMAL_RULE = "conformal"


def conformal_rank(frames: int, false_alarm_rate: float) -> int:
    """k = ⌈(n+1)(1−α)⌉: the image threshold of the conformal rule is the k-th smallest of the n
    normal scores (it exists only when k <= n). α is taken as the decimal it prints as (0.01 is
    1/100 exactly), so that (n+1)(1−α) landing on a whole number is not pushed up by float rounding."""
    alpha = Fraction(repr(float(false_alarm_rate)))
    return math.ceil((frames + 1) * (1 - alpha))


def conformal_frames_needed(false_alarm_rate: float) -> int:
    """The fewest normal frames n with ⌈(n+1)(1−α)⌉ <= n, i.e. n >= 1/α − 1: ⌈1/α⌉ − 1."""
    return math.ceil(1 / Fraction(repr(float(false_alarm_rate)))) - 1


def conformal_assumption(normal: list[str]) -> str:
    """The assumption the conformal guarantee rests on, naming the frames calibrated on."""
    return ("normal frames exchangeable with those calibrated on: " + (", ".join(normal) or "the frames given"))


@dataclass
class ClassCalibration:
    """One class's thresholds as measured on normal frames, and how they were measured."""

    image: float  # image_quantile_value + margin
    pixel: float  # pixel_quantile_value + pixel_margin
    frames: int  # normal frames scored
    quantile: float  # q of the image scores (rule conformal: 1 − α, for reference only; rank says which score)
    margin: float  # added to the image quantile, in score units
    image_quantile_value: float  # the q-quantile of the normal scores itself (conformal: the rank-th smallest score)
    pixel_quantile: float  # q of the map values
    pixel_margin: float
    pixel_quantile_value: float
    pixel_values: int  # map values the pixel quantile was taken over (a subsample of each map)
    score_min: float
    score_max: float
    score_mean: float
    model: str  # "visual" or "visual_qkv"
    model_sha256: str  # of that model's file
    text_features_sha256: str  # of the class's t+/t- (see text_features_sha256)
    tta: bool
    tta_settings: dict[str, Any] | None  # TTAConfig fields when tta
    tiling: str
    smoothing_sigma: float
    created: str  # UTC, ISO 8601
    command: str
    normal: list[str]  # the normal inputs as given
    # how the image threshold was chosen (absent from version 1 files: the quantile rule)
    rule: str = QUANTILE_RULE  # "quantile" or "conformal"
    false_alarm_rate: float | None = None  # conformal: α
    rank: int | None = None  # conformal: k = ⌈(frames+1)(1−α)⌉, image_quantile_value is the k-th smallest score
    assumption: str = ""  # conformal: what the guarantee P(normal score > image threshold) <= α rests on
    # the memory branch the scores were measured with (absent from version 1 files: none)
    memory: str = "off"  # "off" (zero-shot alone), "on" (combined) or "only"
    memory_weight: float | None = None  # with memory "on": w
    memory_sha256: str = ""  # of the class's memory rows (runtime.memory.ClassMemory.sha256)
    # the normal centres severities count from (absent from files written before they were recorded)
    score_median: float | None = None  # median of the normal scores
    pixel_median: float | None = None  # median of the map values the pixel quantile was taken over

    @property
    def centre(self) -> float:
        """The normal centre of the scores: their median (the mean in records without it)."""
        return self.score_mean if self.score_median is None else self.score_median

    @property
    def pixel_centre(self) -> float:
        """The normal centre of the map values: their median (records without it: :attr:`centre`,
        the scores' centre, on the same p_abnormal scale)."""
        return self.centre if self.pixel_median is None else self.pixel_median

    @property
    def memory_setting(self) -> tuple[str, float | None, str]:
        """(memory, memory_weight, memory_sha256): the memory branch the scores were measured with."""
        return (self.memory, self.memory_weight, self.memory_sha256)

    def mismatches(self, model: str, model_sha256: str, text_sha256: str, tta: dict[str, Any] | None,
                   tiling: str, smoothing_sigma: float,
                   memory: tuple[str, float | None, str] = ("off", None, "")) -> list[str]:
        """Why this record does not hold for the given artifacts and settings (empty: it holds).

        ``memory``: the memory branch in force for the class (mode, weight, memory sha256), as
        :meth:`memory_setting` writes it. The TTA seed is not compared: it changes single draws,
        not what maps look like.
        """
        reasons = []
        if memory != self.memory_setting:
            reasons.append(_memory_change(self.memory_setting, memory))
        if (tiling, smoothing_sigma) != (self.tiling, self.smoothing_sigma):
            reasons.append(f"calibrated with tiling {self.tiling} and smoothing {self.smoothing_sigma:g}, used with "
                           f"{tiling} and {smoothing_sigma:g}")
        if model != self.model:
            reasons.append(f"calibrated with model {self.model}, used with {model}")
        elif model_sha256 != self.model_sha256:
            reasons.append(f"the {model} model file changed (sha256 {self.model_sha256[:12]} -> {model_sha256[:12]})")
        if text_sha256 != self.text_features_sha256:
            reasons.append("the class's text embeddings changed")
        if (tta is not None) != self.tta:
            reasons.append("calibrated with TTA maps, used without" if self.tta else "calibrated without TTA, used with it")
        elif tta is not None and _without_seed(tta) != _without_seed(self.tta_settings or {}):
            reasons.append("calibrated with other TTA settings")
        return reasons


def memory_setting(mode: str, weight: float, sha: str) -> tuple[str, float | None, str]:
    """(memory, memory_weight, memory_sha256) as a record stores them for the memory branch in force:
    ``mode`` off, on or only (auto resolved for the class), ``sha`` of its memory rows."""
    if mode == "off":
        return ("off", None, "")
    return (mode, float(weight) if mode == "on" else None, sha)


def _memory_change(calibrated: tuple, used: tuple) -> str:
    def said(setting):
        mode, weight, sha = setting
        if mode == "off":
            return "without the memory of normal frames"
        return f"with memory {sha[:12]}" + (f" at weight {weight:g}" if mode == "on" else " alone")
    return f"calibrated {said(calibrated)}, used {said(used)}"


@dataclass
class ThresholdTable:
    """The content of a thresholds file: per class, its calibration."""

    classes: dict[str, ClassCalibration] = field(default_factory=dict)

    def with_class(self, name: str, record: ClassCalibration) -> "ThresholdTable":
        """A copy with ``name``'s record set (the other classes as they are); an AnoclipError when
        the record is one the reader would refuse (a margin that moves a threshold outside [0, 1])."""
        try:
            _consistent(build(ClassCalibration, asdict(record), _FIELD_CHECKS))
        except ValueError as exc:
            raise AnoclipError(f"the thresholds of class {name} cannot be stored: {exc}; scores and map values lie "
                               "in [0, 1], so --margin and --pixel-margin must keep each threshold there") from None
        return ThresholdTable(dict(sorted({**self.classes, name: record}.items())))

    def to_json(self) -> str:
        data = {"format": THRESHOLDS_FORMAT, "format_version": THRESHOLDS_FORMAT_VERSION,
                "classes": {name: asdict(record) for name, record in sorted(self.classes.items())}}
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "ThresholdTable":
        """Build a table from parsed JSON, checking the type of every field; ValueError if malformed."""
        need(isinstance(data, dict), f"a JSON {type(data).__name__}, not an object")
        need(data.get("format") == THRESHOLDS_FORMAT, f"format is {data.get('format')!r}, not {THRESHOLDS_FORMAT!r}")
        version = data.get("format_version")
        need(version in READABLE_FORMAT_VERSIONS and type(version) is int,
             f"format version {version!r}, this runtime reads {' and '.join(map(str, READABLE_FORMAT_VERSIONS))}")
        need(set(data) == {"format", "format_version", "classes"}, f"fields {sorted(data)}, not format, "
                                                                   "format_version and classes")
        classes = data["classes"]
        need(isinstance(classes, dict), "classes must be an object")
        table = {}
        for name, record in classes.items():
            try:
                if isinstance(record, dict):  # version 1 has none of the rule and memory fields, version 2 all
                    present = [f for f in VERSION_2_FIELDS if f in record]
                    if version == 1:
                        need(not present, f"unknown fields {present} (format version 1)")
                    else:
                        need(len(present) == len(VERSION_2_FIELDS),
                             f"missing fields {[f for f in VERSION_2_FIELDS if f not in record]}")
                table[name] = _consistent(build(ClassCalibration, record, _FIELD_CHECKS))
            except ValueError as exc:
                raise ValueError(f"classes.{name}: {exc}") from None
        return cls(table)


def text_features_sha256(text_features: np.ndarray) -> str:
    """sha256 of a class's t+/t- as float32 (shape included): what a calibration of the class
    depends on in the prompt weights."""
    array = np.ascontiguousarray(text_features, dtype="<f4")
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def tta_settings(config: Any) -> dict[str, Any] | None:
    """A TTAConfig as JSON-ready settings (None without TTA)."""
    if config is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _without_seed(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "seed"}


# ----------------------------------------------------------------------------------------------
# Reading and writing


def read_thresholds(path: str | os.PathLike) -> ThresholdTable:
    """Read and check a thresholds file; an ArtifactError naming the fix when it is malformed."""
    path = Path(path)
    fix = (f"calibrate anew with `anoclip calibrate threshold --artifacts {path.parent} --class ... --normal ... "
           "--replace-file` (then once more for each other class)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        return ThresholdTable.from_dict(data)
    except (OSError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a valid thresholds file ({exc}); {fix}") from None


def threshold_bytes(table: ThresholdTable) -> bytes:
    """The file content of ``table`` (stored by the folder's transaction as ``thresholds.<sha>.json``);
    a ValueError rather than anything the reader would refuse."""
    content = table.to_json()
    ThresholdTable.from_dict(json.loads(content))
    return content.encode()


_FIELD_CHECKS: dict[str, Check] = {  # scores and map values are probabilities: thresholds and statistics in [0, 1]
    "image": number(0, 1), "pixel": number(0, 1), "frames": integer(1), "quantile": number(0, 1), "margin": number(),
    "image_quantile_value": number(0, 1), "pixel_quantile": number(0, 1), "pixel_margin": number(),
    "pixel_quantile_value": number(0, 1), "pixel_values": integer(1), "score_min": number(0, 1),
    "score_max": number(0, 1), "score_mean": number(0, 1), "model": text(), "model_sha256": sha256, "text_features_sha256": sha256, "tta": flag,
    "tta_settings": either(null, plain_object), "tiling": text(), "smoothing_sigma": number(0), "created": text(),
    "command": text(), "normal": list_of(text(), "strings"),
    "rule": choice((QUANTILE_RULE, CONFORMAL_RULE)), "false_alarm_rate": either(null, number(0, 1)),
    "rank": either(null, integer(1)), "assumption": text(),
    "memory": choice(("off", "on", "only")), "memory_weight": either(null, number(0, 1)),
    "memory_sha256": either(choice([""]), sha256),
    "score_median": either(null, number(0, 1)), "pixel_median": either(null, number(0, 1)),
}



SUM_TOLERANCE = 1e-9  # float rounding: a threshold is its quantile value plus its margin, as calibrate writes it


def _consistent(record: ClassCalibration) -> ClassCalibration:
    """``record`` when its numbers agree with each other (each threshold is its measured quantile
    value plus its margin; the image quantile lies within the scores' range, the mean too); a
    ValueError naming the disagreement."""
    need(record.memory_setting == memory_setting(record.memory, record.memory_weight or 0.0, record.memory_sha256)
         and (record.memory == "off") == (record.memory_sha256 == ""),
         f"memory {record.memory!r} with weight {record.memory_weight!r} and sha256 {record.memory_sha256!r} do not "
         "go together (off: null and empty; on: a weight and the memory's sha256; only: null weight)")
    for threshold, value, margin in (("image", "image_quantile_value", "margin"),
                                     ("pixel", "pixel_quantile_value", "pixel_margin")):
        got, expected = getattr(record, threshold), getattr(record, value) + getattr(record, margin)
        need(abs(got - expected) <= SUM_TOLERANCE, f"{threshold} {got!r} is not {value} + {margin} ({expected!r})")
    for name in ("image_quantile_value", "score_mean") + (() if record.score_median is None else ("score_median",)):
        need(record.score_min - SUM_TOLERANCE <= getattr(record, name) <= record.score_max + SUM_TOLERANCE,
             f"{name} {getattr(record, name)!r} lies outside score_min..score_max "
             f"({record.score_min!r}..{record.score_max!r})")
    if record.rule == QUANTILE_RULE:
        need(record.false_alarm_rate is None and record.rank is None,
             "false_alarm_rate and rank must be null with rule quantile")
        return record
    alpha, rank = record.false_alarm_rate, record.rank
    need(alpha is not None and 0 < alpha < 1, f"rule conformal needs a false_alarm_rate in (0, 1), got {alpha!r}")
    expected_rank = conformal_rank(record.frames, alpha)
    need(rank == expected_rank, f"rank {rank!r} is not ceil((frames+1)(1-false_alarm_rate)) = {expected_rank} "
                                f"for {record.frames} frames at {alpha!r}")
    need(rank <= record.frames, f"rank {rank} exceeds the {record.frames} frames: no such order statistic")
    for end, value in ((record.frames, record.score_max), (1, record.score_min)):  # the largest or smallest score
        need(rank != end or record.image_quantile_value == value,
             f"image_quantile_value {record.image_quantile_value!r} is not the score of rank {rank} ({value!r})")
    need(abs(record.quantile - (1 - alpha)) <= SUM_TOLERANCE,
         f"quantile {record.quantile!r} is not 1 - false_alarm_rate ({1 - alpha!r}) with rule conformal")
    need(record.margin >= 0, f"margin {record.margin!r} is negative: below the conformal order statistic the "
                             "false-alarm guarantee does not hold")
    need(record.assumption != "", "rule conformal needs the assumption its guarantee rests on")
    return record
