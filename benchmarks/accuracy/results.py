"""What ``anoclip eval`` records: the settings a class result depends on, per-class results and the
summary, as JSON files that a resumed run reads back.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from anoclip.runtime.integrity import sha256_file
from anoclip.runtime.plumbing import atomic_write_bytes

from .. import paper
from .metrics import ClassMetrics

log = logging.getLogger(__name__)

#: Bumped whenever the evaluation protocol changes, so that older class files are not reused.
EVAL_FORMAT = 1
SUMMARY = "summary.json"


@dataclass(frozen=True)
class EvalSettings:
    """What a class result depends on besides the class's own prompt embeddings and images."""

    dataset: str
    backbone: str
    pretrained: str
    model: str
    model_sha256: str
    tta: bool
    image_views: int
    eval_format: int = EVAL_FORMAT

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_detector(cls, detector, dataset: str, image_views: int, model: str = "visual") -> EvalSettings:
        manifest = detector.artifacts.manifest
        sha = manifest.files.get(manifest.models[model].file) or sha256_file(detector.artifacts.model_path(model))
        return cls(dataset=dataset, backbone=manifest.backbone, pretrained=manifest.pretrained, model=model,
                   model_sha256=sha, tta=detector.tta is not None, image_views=image_views)

    def default_out_dir(self) -> Path:
        """``eval-results/<dataset>-<backbone>[-qkv][-tta]-v<views>``."""
        name = f"{self.dataset}-{_safe_name(self.backbone)}"
        name += "-qkv" if self.model != "visual" else ""
        name += "-tta" if self.tta else ""
        return Path("eval-results") / f"{name}-v{self.image_views}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def _metrics_to_json(metrics: ClassMetrics) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v) for k, v in metrics.as_dict().items()}


def _metrics_from_json(data: dict[str, Any]) -> ClassMetrics:
    return ClassMetrics(**{f.name: math.nan if data.get(f.name) is None else float(data[f.name])
                           for f in fields(ClassMetrics)})


@dataclass
class ClassResult:
    """Metrics of one class and what they were computed from."""

    cls: str
    metrics: ClassMetrics
    images: int
    anomalous: int
    eval_size: tuple[int, int]
    settings: EvalSettings
    prompts_sha256: str
    backend: str = ""
    seconds_predict: float = 0.0
    seconds_metrics: float = 0.0
    image_scores: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "metrics": _metrics_to_json(self.metrics),
            "images": self.images,
            "anomalous": self.anomalous,
            "eval_size": list(self.eval_size),
            "settings": self.settings.as_dict(),
            "prompts_sha256": self.prompts_sha256,
            "backend": self.backend,
            "seconds_predict": round(self.seconds_predict, 3),
            "seconds_metrics": round(self.seconds_metrics, 3),
            "ms_per_image": round(1e3 * self.seconds_predict / max(self.images, 1), 2),
            "image_scores": self.image_scores,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClassResult:
        return cls(cls=data["class"], metrics=_metrics_from_json(data["metrics"]), images=int(data["images"]),
                   anomalous=int(data["anomalous"]), eval_size=tuple(data["eval_size"]),
                   settings=EvalSettings(**data["settings"]), prompts_sha256=data["prompts_sha256"],
                   backend=data.get("backend", ""), seconds_predict=float(data.get("seconds_predict", 0.0)),
                   seconds_metrics=float(data.get("seconds_metrics", 0.0)),
                   image_scores=list(data.get("image_scores", [])), reused=True)


@dataclass
class EvalSummary:
    """Per-class results and their unweighted mean."""

    settings: EvalSettings
    root: str
    artifacts: str
    classes: list[ClassResult]
    mean: ClassMetrics
    random_weights: bool
    backend: str
    out_dir: str

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.settings.dataset,
            "root": self.root,
            "artifacts": self.artifacts,
            "settings": self.settings.as_dict(),
            "backend": self.backend,
            "random_weights": self.random_weights,
            "out_dir": self.out_dir,
            "mean": _metrics_to_json(self.mean),
            "classes": {r.cls: {**_metrics_to_json(r.metrics), "images": r.images, "anomalous": r.anomalous,
                                "reused": r.reused} for r in self.classes},
            "paper": {"localisation": {k: dict(zip(paper.LOCALISATION_COLUMNS, v))
                                       for k, v in paper.LOCALISATION[self.settings.dataset].items()},
                      "detection": {k: dict(zip(paper.DETECTION_COLUMNS, v))
                                    for k, v in paper.DETECTION[self.settings.dataset].items()},
                      "unit": "percent"},
            "metrics_unit": "fraction",
        }


def _load_previous(path: Path, settings: EvalSettings, prompts_sha: str, images: int) -> ClassResult | None:
    if not path.is_file():
        return None
    try:
        previous = ClassResult.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s); evaluating the class again", path, exc)
        return None
    if previous.settings != settings or previous.prompts_sha256 != prompts_sha or previous.images != images:
        log.info("%s was made with other settings; evaluating the class again", path)
        return None
    return previous


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())
