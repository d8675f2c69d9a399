"""The few-shot protocol of ``anoclip eval --memory-shots K``: AnoCLIP with a memory of K normal
images per class, beside zero-shot AnoCLIP and WinCLIP+'s published few-shot figures.

Per class and for every K and seed:

1. K normal images are drawn from the class's normal training images (MVTec AD ``train/good``,
   VisA the ``train`` / ``normal`` rows of ``1cls.csv``; :func:`.layouts.load_normal_train`): the
   seed shuffles the image list (``numpy.random.default_rng(seed)``) and the first K are taken, so
   a seed's draws are nested (its 1 shot is among its 4, its 4 among its 8) and the same seed
   always draws the same images.
2. Their memory is built as ``anoclip calibrate memory`` builds one (``calibration.memory``:
   ``patch_tokens`` then ``build_class_memory``, greedy k-center coreset above ``max_patches``
   rows, no augmentation) and held in memory: the detectors of the protocol get an in-memory copy
   of the folder's artifacts with that memory. Nothing is written to the artifact folder.
3. The test split is scored three ways from the same tokens: zero-shot (memory off), memory only
   (memory ``only``) and combined (memory ``on``, weight w). The visual model runs once per test
   image: its outputs are kept (per class) and the three scorings, and every K and seed, read them.
   Zero-shot does not depend on K or the seed: it is one row per class.

Metrics are those of ``anoclip eval`` (:func:`.metrics.evaluate_class`). The mean over classes is
taken per seed, then its mean over seeds is reported with the sample standard deviation over
seeds (the spread) and the range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.plumbing import ensure_writable_folder

from .. import paper
from .layouts import DATASET_TITLES, Sample, load_normal_train
from .metrics import ClassMetrics, evaluate_class, mean_over_classes
from .report import RANDOM_WEIGHTS_WARNING, _pct, _table
from .results import _safe_name, _write_json

log = logging.getLogger(__name__)

MODES = ("zero_shot", "memory_only", "combined")
MODE_LABELS = {"zero_shot": "zero-shot", "memory_only": "memory only", "combined": "combined"}
DETECTOR_MEMORY = {"zero_shot": "off", "memory_only": "only", "combined": "on"}
FEWSHOT = "fewshot.json"
#: Columns of the printed tables (the JSON carries every metric of :class:`.metrics.ClassMetrics`).
COLUMNS = (("pixel_auroc", "px AUROC"), ("aupro_03", "AUPRO@0.3"), ("pro_authors", "PRO (authors)"),
           ("image_auroc", "img AUROC"))


def parse_int_list(values: Sequence[str] | str, what: str, minimum: int) -> list[int]:
    """``("1,4", "8")`` -> ``[1, 4, 8]`` (order kept, repeats dropped); an AnoclipError naming ``what``."""
    if isinstance(values, str):
        values = [values]
    out: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                number = int(part)
            except ValueError:
                raise AnoclipError(f"{what} takes whole numbers (e.g. 1,4,8), got {part!r}") from None
            if number < minimum:
                raise AnoclipError(f"{what} must be >= {minimum}, got {number}")
            if number not in out:
                out.append(number)
    if not out:
        raise AnoclipError(f"{what} is empty: give comma-separated numbers, e.g. 1,4,8")
    return out


def draw_shots(images: Sequence[Path], shots: int, seed: int) -> list[Path]:
    """The ``shots`` normal images of ``seed``: the first ``shots`` of the list shuffled by the seed."""
    if shots > len(images):
        raise AnoclipError(f"{shots} shots asked but only {len(images)} normal training images exist "
                           f"(e.g. {images[0].parent if images else '?'}): lower --memory-shots")
    order = np.random.default_rng(seed).permutation(len(images))
    return [images[i] for i in order[:shots]]


class TokenCache:
    """A backend that runs the wrapped one once per distinct input batch and keeps its outputs, so
    that several scorings of the same images (zero-shot, memory only, combined; every K and seed)
    share one run of the visual model per image. ``runs``: batches that ran the model; ``inputs``:
    the model inputs (tiles) in them."""

    def __init__(self, backend):
        self.backend = backend
        self._outputs: dict[bytes, tuple[np.ndarray, ...]] = {}
        self.runs = 0
        self.inputs = 0

    def run(self, batch: np.ndarray):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        key = hashlib.sha256(repr(batch.shape).encode() + batch.tobytes()).digest()
        if key not in self._outputs:
            self._outputs[key] = tuple(np.asarray(o) for o in self.backend.run(batch))
            self.runs += 1
            self.inputs += batch.shape[0]
        return self._outputs[key]

    def clear(self) -> None:
        self._outputs.clear()

    def describe(self) -> str:
        return self.backend.describe()

    def __getattr__(self, name: str):  # the wrapped backend's name, providers, precision, ...
        return getattr(self.backend, name)


def _detector(base, backend, bank, mode: str, weight: float):
    """A detector like ``base`` on ``backend`` whose artifacts hold ``bank`` (an in-memory copy:
    ``base``'s artifacts and the folder are left as they are), with the memory branch ``mode``."""
    from anoclip.runtime.detector import Detector

    artifacts = dataclasses.replace(base.artifacts, memory=bank)
    return Detector(artifacts, backend, tiling=base.tiling, smoothing_sigma=base.smoothing_sigma, tta=None,
                    max_pixels=base.max_pixels, model=base.model, thresholds=base.thresholds,
                    memory=DETECTOR_MEMORY[mode], memory_weight=weight)


def _score(detector, samples: Sequence[Sample], cls: str, batch_size: int) -> ClassMetrics:
    from .evaluate import _predict_class

    masks, maps, labels, scores = _predict_class(detector, samples, cls, 1, batch_size, progress=False)
    return evaluate_class(masks, maps, labels, np.asarray(scores))


def _metrics_json(metrics: ClassMetrics) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else float(v)) for k, v in metrics.as_dict().items()}


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean, sample std (None for one value), min and max of ``values`` (NaN ones left out)."""
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not a.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def references(dataset: str) -> list[dict[str, Any]]:
    """Published rows (percent), labelled as such: the AnoCLIP paper's zero-shot figures and
    WinCLIP / WinCLIP+'s (:mod:`anoclip.benchmarks.paper`)."""
    rows = [{"method": "AnoCLIP (paper)", "shots": 0, "image_auroc": paper.DETECTION[dataset]["AnoCLIP"][0],
             "pixel_auroc": paper.LOCALISATION[dataset]["AnoCLIP"][0],
             "pro_authors": paper.LOCALISATION[dataset]["AnoCLIP"][2], "source": paper.ANOCLIP_SOURCE}]
    for shots, (image, pixel) in sorted(paper.WINCLIP[dataset].items()):
        rows.append({"method": "WinCLIP" if shots == 0 else "WinCLIP+", "shots": shots, "image_auroc": image,
                     "pixel_auroc": pixel, "source": paper.WINCLIP_SOURCE})
    return rows


def evaluate_fewshot(detector, dataset: str, root: str | Path, plan: dict[str, list[Sample]], *,
                     shots: Sequence[int], seeds: Sequence[int], weight: float, max_patches: int,
                     out_dir: str | Path | None = None, batch_size: int = 8, artifacts_dir: str | Path | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Run the few-shot protocol (module docstring) with ``detector`` (loaded with memory off, no
    TTA) and return its record (also written as ``fewshot.json`` in ``out_dir``)."""
    from anoclip.calibration.memory import build_class_memory, patch_tokens
    from anoclip.runtime.artifacts import VISUAL
    from anoclip.runtime.memory import ClassMemory, MemoryBank, check_weight
    from anoclip.runtime.preprocess import read_image
    from tqdm import tqdm

    weight = check_weight(weight)
    if detector.tta is not None:
        raise AnoclipError("--memory-shots compares zero-shot AnoCLIP with the memory branch: drop --tta")
    if detector.model != VISUAL:
        raise AnoclipError("--memory-shots needs the V-V tokens of the visual model: use --model visual")
    manifest = detector.artifacts.manifest
    out = Path(out_dir) if out_dir is not None else (
        Path("eval-results") / f"{dataset}-{_safe_name(manifest.backbone)}-fewshot")
    ensure_writable_folder(out)
    normals = {cls: load_normal_train(root, dataset, cls) for cls in plan}
    for cls, images in normals.items():  # too few normal images fails before any scoring
        draw_shots(images, max(shots), 0)
    visual_sha = detector.artifacts.model_sha256(VISUAL)
    cache = TokenCache(detector.backend)
    token_detector = _detector(detector, cache, None, "zero_shot", weight)
    rows: list[dict[str, Any]] = []
    test_images = 0
    started = time.perf_counter()
    total = len(plan) * (1 + 2 * len(shots) * len(seeds))
    with tqdm(total=total, desc="few-shot", unit="scoring", file=sys.stderr, disable=not progress or None) as bar:
        for cls, samples in plan.items():
            cache.clear()
            inputs_before = cache.inputs
            zero = _score(_detector(detector, cache, None, "zero_shot", weight), samples, cls, batch_size)
            test_inputs = cache.inputs - inputs_before
            test_images += len(samples)
            rows.append({"class": cls, "mode": "zero_shot", "shots": 0, "seed": None,
                         "metrics": _metrics_json(zero)})
            bar.update(1)
            for seed in seeds:
                for k in shots:
                    drawn = draw_shots(normals[cls], k, seed)
                    # one image at a time, so that an image drawn again (another K, another seed) reuses its tokens
                    tokens = np.concatenate([patch_tokens(token_detector, [read_image(p)], total=1,
                                                          desc=f"memory {cls}")[0] for p in drawn])
                    memory_rows, before, radius = build_class_memory(tokens, max_patches)
                    provenance = {"frames": k, "patches": before, "kept": len(memory_rows),
                                  "max_patches": max_patches, "covering_radius": radius, "seed": seed,
                                  "normal": [_relative(p, root) for p in drawn]}
                    bank = MemoryBank({cls: ClassMemory(cls, memory_rows, provenance)}, visual_sha, manifest.embed_dim)
                    for mode in ("memory_only", "combined"):
                        inputs = cache.inputs
                        metrics = _score(_detector(detector, cache, bank, mode, weight), samples, cls, batch_size)
                        if cache.inputs != inputs:  # the test tokens were all kept: no model run here
                            log.warning("%s: %d test tiles ran the visual model again", cls, cache.inputs - inputs)
                        rows.append({"class": cls, "mode": mode, "shots": k, "seed": seed, "weight": weight
                                     if mode == "combined" else None, "memory": provenance,
                                     "metrics": _metrics_json(metrics)})
                        bar.update(1)
            log.info("%s: %d test images, %d model inputs (tiles) for them, each run once", cls, len(samples),
                     test_inputs)
    settings = [("zero_shot", 0)] + [(mode, k) for k in shots for mode in ("memory_only", "combined")]
    summary = []
    for mode, k in settings:
        chosen = [r for r in rows if r["mode"] == mode and r["shots"] == k]
        seed_list = [None] if mode == "zero_shot" else list(seeds)
        per_seed = []
        for seed in seed_list:
            metrics = [_from_json(r["metrics"]) for r in chosen if r["seed"] == seed]
            per_seed.append(_metrics_json(mean_over_classes(metrics)))
        names = list(per_seed[0])
        per_class = {cls: {m: _stats([r["metrics"][m] if r["metrics"][m] is not None else math.nan
                                      for r in chosen if r["class"] == cls]) for m in names} for cls in plan}
        summary.append({"mode": mode, "shots": k, "weight": weight if mode == "combined" else None,
                        "seeds": [s for s in seed_list if s is not None],
                        "mean": {m: _stats([p[m] if p[m] is not None else math.nan for p in per_seed])
                                 for m in names},
                        "per_seed": per_seed, "classes": per_class})
    record = {
        "dataset": dataset, "root": str(root), "artifacts": str(artifacts_dir or detector.artifacts.folder),
        "backbone": manifest.backbone, "pretrained": manifest.pretrained,
        "random_weights": bool(manifest.random_weights), "backend": detector.backend.describe(),
        "protocol": {"shots": list(shots), "seeds": list(seeds), "weight": weight, "max_patches": max_patches,
                     "augment": [], "normal_split": "train/good" if dataset == "mvtec" else
                     "split_csv/1cls.csv rows with split train, label normal",
                     "draw": "numpy.random.default_rng(seed).permutation(normal images)[:K] (nested in K)",
                     "modes": {m: f"Detector memory={DETECTOR_MEMORY[m]}" for m in MODES},
                     "spread": "sample standard deviation over seeds of the mean over classes",
                     "artifact_folder": "unchanged: the memories are held in memory, never stored"},
        "classes": list(plan), "test_images": test_images, "model_inputs": cache.inputs,
        "seconds": round(time.perf_counter() - started, 2),
        "rows": rows, "summary": summary, "references": references(dataset),
        "metrics_unit": "fraction", "references_unit": "percent", "out_dir": str(out),
    }
    _write_json(out / FEWSHOT, record)
    return record


def _from_json(data: dict[str, float | None]) -> ClassMetrics:
    return ClassMetrics(**{k: math.nan if v is None else float(v) for k, v in data.items()})


def _relative(path: Path, root: str | Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _spread(stats: dict[str, float | None]) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = _pct(stats["mean"])
    return text if stats["std"] is None else f"{text} ± {100 * stats['std']:.1f}"


def format_fewshot(record: dict[str, Any]) -> str:
    """The per-class and mean tables of a few-shot record, then the published references."""
    title = DATASET_TITLES[record["dataset"]]
    protocol = record["protocol"]
    lines = [RANDOM_WEIGHTS_WARNING, ""] if record["random_weights"] else []
    lines.append(f"{title}: {record['backbone']} ({record['pretrained']}), AnoCLIP few-shot protocol: K normal "
                 f"images ({protocol['normal_split']}) per class, seeds {','.join(map(str, protocol['seeds']))}, "
                 f"memory weight w={protocol['weight']:g}, coreset above {protocol['max_patches']} rows; "
                 f"backend {record['backend']}")
    lines.append(f"{record['test_images']} test images; the visual model ran on {record['model_inputs']} inputs "
                 "(tiles: every test image and every distinct shot once); the artifact folder was not written")
    lines.append("")
    header = ["class", "shots", "mode", *(label for _, label in COLUMNS)]
    body = []
    for cls in record["classes"]:
        for s in record["summary"]:
            label = MODE_LABELS[s["mode"]] + (f" (w={s['weight']:g})" if s["weight"] is not None else "")
            body.append([cls, str(s["shots"]), label, *(_spread(s["classes"][cls][m]) for m, _ in COLUMNS)])
    for s in record["summary"]:
        label = MODE_LABELS[s["mode"]] + (f" (w={s['weight']:g})" if s["weight"] is not None else "")
        body.append([f"mean ({len(record['classes'])})", str(s["shots"]), label,
                     *(_spread(s["mean"][m]) for m, _ in COLUMNS)])
    lines += _table(header, body)
    lines += ["", f"Published references, {title} (mean over classes, %; not measured here)"]
    ref_body = []
    for ref in record["references"]:
        ref_body.append([ref["method"], str(ref["shots"]), f"{ref['image_auroc']:.1f}", f"{ref['pixel_auroc']:.1f}",
                         f"{ref['pro_authors']:.1f}" if "pro_authors" in ref else "-", ref["source"]])
    lines += _table(["method", "shots", "img AUROC", "px AUROC", "PRO (authors)", "source"], ref_body)
    lines += ["", "Values are % (mean over seeds ± sample standard deviation over seeds; zero-shot has no seed). "
              "AUPRO@0.3: area under the PRO curve over FPR [0, 0.3] / 0.3; PRO (authors): the AnoCLIP paper's "
              "rescaled PRO. WinCLIP+'s published figures use its own few-shot draws, not these.",
              f"Results: {Path(record['out_dir']) / FEWSHOT}"]
    return "\n".join(lines)


def fewshot_json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, allow_nan=False)
