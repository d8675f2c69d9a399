"""Score thresholds: the file that holds them (the decision they make is ``decision.py``).

``anoclip calibrate threshold`` measures, per class, the scores and maps of normal frames and
writes ``thresholds.<sha>.json`` (content-addressed like the folder's other files, named by the
manifest's ``thresholds`` field and hashed with the rest)::

    {"format": "anoclip-thresholds", "format_version": 1,
     "classes": {"bottle": {"image": 0.5031, "pixel": 0.5102, "frames": 200, "quantile": 0.995, ...}}}

Each class also records what its numbers are only valid for: the visual model file (sha256), the
class's text embeddings t+/t- (sha256: re-encoding another class leaves this one valid), the model
kind, whether (and how) TTA made the maps, the tiling and the map smoothing. A class whose record
does not match the loaded artifacts and settings is treated as uncalibrated, with a warning
(:meth:`ClassCalibration.mismatches`, used by ``Detector.threshold_for``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AnoclipError, ArtifactError
from .strict_json import (Check, build, either, flag, header, integer, list_of, need, null, number, plain_object, sha256,
                          text)

THRESHOLDS = "thresholds.json"  # content-addressed on disk: thresholds.<first 12 hex of sha256>.json
THRESHOLDS_FORMAT = "anoclip-thresholds"
THRESHOLDS_FORMAT_VERSION = 1


@dataclass
class ClassCalibration:
    """One class's thresholds as measured on normal frames, and how they were measured."""

    image: float  # image_quantile_value + margin
    pixel: float  # pixel_quantile_value + pixel_margin
    frames: int  # normal frames scored
    quantile: float  # q of the image scores
    margin: float  # added to the image quantile, in score units
    image_quantile_value: float  # the q-quantile of the normal scores itself
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

    def mismatches(self, model: str, model_sha256: str, text_sha256: str, tta: dict[str, Any] | None,
                   tiling: str, smoothing_sigma: float) -> list[str]:
        """Why this record does not hold for the given artifacts and settings (empty: it holds).

        The TTA seed is not compared: it changes single draws, not what maps look like.
        """
        reasons = []
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
        header(data, THRESHOLDS_FORMAT, THRESHOLDS_FORMAT_VERSION)
        need(set(data) == {"format", "format_version", "classes"}, f"fields {sorted(data)}, not format, "
                                                                   "format_version and classes")
        classes = data["classes"]
        need(isinstance(classes, dict), "classes must be an object")
        table = {}
        for name, record in classes.items():
            try:
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
}



SUM_TOLERANCE = 1e-9  # float rounding: a threshold is its quantile value plus its margin, as calibrate writes it


def _consistent(record: ClassCalibration) -> ClassCalibration:
    """``record`` when its numbers agree with each other (each threshold is its measured quantile
    value plus its margin; the image quantile lies within the scores' range, the mean too); a
    ValueError naming the disagreement."""
    for threshold, value, margin in (("image", "image_quantile_value", "margin"),
                                     ("pixel", "pixel_quantile_value", "pixel_margin")):
        got, expected = getattr(record, threshold), getattr(record, value) + getattr(record, margin)
        need(abs(got - expected) <= SUM_TOLERANCE, f"{threshold} {got!r} is not {value} + {margin} ({expected!r})")
    for name in ("image_quantile_value", "score_mean"):
        need(record.score_min - SUM_TOLERANCE <= getattr(record, name) <= record.score_max + SUM_TOLERANCE,
             f"{name} {getattr(record, name)!r} lies outside score_min..score_max "
             f"({record.score_min!r}..{record.score_max!r})")
    return record
