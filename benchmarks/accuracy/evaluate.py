"""Accuracy on MVTec AD / VisA layouts, printed as the paper's Tables 1 and 2 (SPEC section 6).

    anoclip eval --artifacts DIR --dataset mvtec --root /data/mvtec_anomaly_detection
    anoclip eval --artifacts DIR --dataset visa --root /data/VisA_20220922 --classes candle,pcb1 --tta

Per class: every test image is scored by :class:`anoclip.runtime.detector.Detector`; the anomaly
maps and ground-truth masks go to :func:`anoclip.benchmarks.accuracy.metrics.evaluate_class`; the
table reports the unweighted mean over classes
(:func:`~anoclip.benchmarks.accuracy.metrics.mean_over_classes`).

Evaluation resolution (one rule for both layouts): the map is ``Result.anomaly_map``, the map at
model resolution, and each mask is resized bilinearly (as Pillow does) to that map's (height,
width) and thresholded at > 0.5 (:func:`anoclip.benchmarks.accuracy.datasets.read_mask`).

* MVTec AD (square images): the map is at the model input size (240x240 for the default
  ViT-B-16-plus-240; always ``Detector.input_size``), as the authors evaluate.
* VisA (about 3:2 frames): the Detector tiles the frame as the authors' VisA script does (short
  side resized to the input size, overlapping square tiles, overlaps averaged), so the map covers
  the resized frame, e.g. 240x360; masks are resized to that same size. Should the frames of one
  class differ in size, maps are resized (bilinear) to the first image's map size.

Image score: p_abnormal of the global token (mean over tiles). With ``--image-views 22`` it is the
mean over the 22 views of :mod:`anoclip.benchmarks.accuracy.augment`, made on the frame the model
sees (the image resized to the input size, or the resized frame that tiling cuts) and run through the
Detector as one batch; the map always comes from the unaltered view. With TTA the adapter runs on
the unaltered view only (TTA never changes the score), so its optimiser state advances once per
image, as in single-view evaluation.

Results: one JSON file per class in the output folder, written atomically, plus ``summary.json``
with the mean. A resumed run reuses a class file when its recorded settings (dataset, backbone,
pretrained tag, graph and its sha256, the class's prompt embeddings, TTA, views, evaluation
format, number of test images) match the current run, so interrupted evaluations continue where
they stopped and changed artifacts are evaluated afresh. The records are :mod:`.results`, the
printed tables :mod:`.report`.

Few-shot protocol (``--memory-shots K``, :mod:`.fewshot`): per class, K normal training images drawn
with each ``--memory-seeds`` seed become an in-memory memory of normal frames (as `anoclip calibrate
memory` builds one; the artifact folder is never written), and the test split is scored zero-shot,
by the memory alone and combined (weight ``--memory-weight``) from one run of the visual model per
test image; the means over seeds and their spread go beside WinCLIP+'s published few-shot figures
(``fewshot.json`` in --out).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click
import cv2
import numpy as np

from anoclip.runtime.backends import BACKEND_CHOICES
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.memory import DEFAULT_MAX_PATCHES, DEFAULT_WEIGHT
from anoclip.runtime.options import no_verify_option, threads_option, verbose_option
from anoclip.runtime.plumbing import ensure_writable_folder

from .augment import NUM_VIEWS, augment_views
from .layouts import DATASET_TITLES, DATASETS, VISA_CSV, Sample, list_classes, load_mvtec, load_visa, read_mask
from .metrics import evaluate_class, mean_over_classes
from .report import RANDOM_WEIGHTS_WARNING, format_report
from .results import SUMMARY, ClassResult, EvalSettings, EvalSummary, _load_previous, _safe_name, _write_json

log = logging.getLogger(__name__)

__all__ = [
    "ClassResult",
    "EvalSettings",
    "EvalSummary",
    "eval_command",
    "evaluate",
    "format_report",
    "plan_classes",
    "predict_views",
]

LOADERS: dict[str, Callable[[str | Path, str], list[Sample]]] = {"mvtec": load_mvtec, "visa": load_visa}


def _prompts_sha256(detector, cls: str) -> str:
    prompts = detector.class_prompts(cls)
    digest = hashlib.sha256()
    for array in (prompts.text_features, prompts.prompt_features):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Planning: every check a user can fail, before any image is scored
# --------------------------------------------------------------------------------------------


def _layout_hint(root: Path, dataset: str) -> str:
    if dataset == "mvtec" and (root / VISA_CSV).is_file():
        return " (this looks like a VisA root: pass --dataset visa)"
    if dataset == "visa" and any((p / "test").is_dir() for p in root.iterdir() if p.is_dir()):
        return " (this looks like an MVTec AD root: pass --dataset mvtec)"
    return ""


def plan_classes(dataset: str, root: str | Path, classes: Sequence[str] | None = None) -> dict[str, list[Sample]]:
    """Test samples of each class to evaluate (all classes of the dataset when ``classes`` is None).

    Raises AnoclipError for a missing root, a folder that is not in the dataset's layout, or a
    class the dataset does not have.
    """
    if dataset not in LOADERS:
        raise AnoclipError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise AnoclipError(f"dataset root {root} does not exist: pass the {DATASET_TITLES[dataset]} folder with --root")
    try:
        found = list_classes(root, dataset)
    except (OSError, ValueError) as exc:
        raise AnoclipError(f"{exc}{_layout_hint(root, dataset)}") from None
    wanted = list(dict.fromkeys(classes)) if classes else found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise AnoclipError(f"class(es) {', '.join(missing)} not found in the {DATASET_TITLES[dataset]} root {root} "
                           f"(classes there: {', '.join(found) or 'none'}): fix --classes")
    plan: dict[str, list[Sample]] = {}
    for cls in wanted:
        try:
            plan[cls] = LOADERS[dataset](root, cls)
        except (OSError, ValueError) as exc:
            raise AnoclipError(str(exc)) from None
    return plan


def check_prompt_classes(detector, classes: Sequence[str], artifacts_dir: str | Path) -> None:
    """Raise AnoclipError naming every class that has no prompt embeddings in the artifacts."""
    known = set(detector.classes)
    missing = [c for c in classes if c not in known]
    if missing:
        raise AnoclipError(
            f"class(es) {', '.join(missing)} not in the prompt weights of {artifacts_dir} "
            f"(known: {', '.join(sorted(known)) or 'none'}); add them with `anoclip-export --out {artifacts_dir} "
            f"--classes {','.join(missing)}` (the visual model is not re-exported) or narrow --classes")


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def predict_views(detector, image: np.ndarray, cls: str) -> tuple[np.ndarray, float, list[float]]:
    """(map of the unaltered view, mean score over the 22 views, the 22 scores) of one RGB image.

    The views are made on the frame the model sees (the image resized to the input size, or to
    the tiled frame for images far from square), so view 0 gives exactly the single-view map.
    """
    from anoclip.runtime.preprocess import as_rgb_uint8, resize_bilinear, tile_layout

    rgb = as_rgb_uint8(image)
    layout = tile_layout(rgb.shape[0], rgb.shape[1], detector.input_size, detector.tiling)
    views = augment_views(resize_bilinear(rgb, layout.resized))
    if detector.tta is None:
        results = detector.predict_batch(views, cls)
    else:  # adapt on the unaltered view only: TTA does not change scores
        results = [detector.predict(views[0], cls)] + detector.predict_batch(views[1:], cls, tta=False)
    scores = [float(r.score) for r in results]
    return results[0].anomaly_map, float(np.mean(scores)), scores


def _read_mask(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if sample.mask_path is None:
        return np.zeros((height, width), dtype=bool)
    try:
        return read_mask(sample.mask_path, (width, height))
    except (OSError, ValueError) as exc:
        raise AnoclipError(str(exc)) from None


def _predict_class(detector, samples: Sequence[Sample], cls: str, image_views: int, batch_size: int,
                   progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """(masks [N,H,W] bool, maps [N,H,W] float32, labels [N], scores) of one class."""
    from anoclip.runtime.preprocess import read_image
    from tqdm import tqdm

    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    scores: list[float] = []
    size: tuple[int, int] | None = None
    step = 1 if image_views > 1 else batch_size
    with tqdm(total=len(samples), desc=cls, unit="img", file=sys.stderr, disable=not progress or None,
              leave=False) as bar:
        for start in range(0, len(samples), step):
            chunk = samples[start:start + step]
            images = [read_image(s.image_path) for s in chunk]
            if image_views > 1:
                pairs = [predict_views(detector, image, cls)[:2] for image in images]
            else:
                pairs = [(r.anomaly_map, r.score) for r in detector.predict_batch(images, cls)]
            for sample, (amap, score) in zip(chunk, pairs):
                if size is None:
                    size = (int(amap.shape[0]), int(amap.shape[1]))
                elif amap.shape != size:
                    log.debug("%s: map %s resized to the class's evaluation size %s", sample.image_path,
                              amap.shape, size)
                    amap = cv2.resize(amap, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
                maps.append(np.asarray(amap, dtype=np.float32))
                masks.append(_read_mask(sample, size))
                scores.append(float(score))
            bar.update(len(chunk))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return np.stack(masks), np.stack(maps), labels, scores

def evaluate(detector, dataset: str, root: str | Path, classes: Sequence[str] | None = None, *,
             out_dir: str | Path | None = None, image_views: int = 1, resume: bool = True, batch_size: int = 8,
             model: str = "visual", artifacts_dir: str | Path | None = None, progress: bool = True,
             plan: dict[str, list[Sample]] | None = None) -> EvalSummary:
    """Evaluate ``detector`` on a dataset in the MVTec AD or VisA layout.

    Args:
        detector: a loaded :class:`~anoclip.runtime.detector.Detector` (its TTA setting is used).
        dataset: ``mvtec`` or ``visa``.
        root: the dataset folder.
        classes: classes to evaluate (default: all classes found under ``root``).
        out_dir: folder for ``<class>.json`` and ``summary.json`` (default: ``eval-results/...``).
        image_views: 1, or 22 for the authors' augmented image score.
        resume: reuse class files whose settings match this run.
        batch_size: images per model call in single-view evaluation.
        model: the graph the detector was loaded with (``visual`` or ``visual_qkv``), for the record.
        artifacts_dir: recorded in the summary (default: the detector's artifact folder).
        progress: show a progress bar per class on stderr.
        plan: samples per class from :func:`plan_classes` (computed when not given).
    """
    if image_views not in (1, NUM_VIEWS):
        raise AnoclipError(f"image views must be 1 or {NUM_VIEWS}, got {image_views}")
    if plan is None:
        plan = plan_classes(dataset, root, classes)
    check_prompt_classes(detector, list(plan), artifacts_dir or detector.artifacts.folder)
    settings = EvalSettings.from_detector(detector, dataset, image_views, model)
    out = Path(out_dir) if out_dir is not None else settings.default_out_dir()
    ensure_writable_folder(out)  # before hours of scoring, not after
    backend = detector.backend.describe()
    results: list[ClassResult] = []
    for cls, samples in plan.items():
        path = out / f"{_safe_name(cls)}.json"
        prompts_sha = _prompts_sha256(detector, cls)
        previous = _load_previous(path, settings, prompts_sha, len(samples)) if resume else None
        if previous is not None:
            log.info("%s: reusing %s", cls, path)
            results.append(previous)
            continue
        t0 = time.perf_counter()
        masks, maps, labels, scores = _predict_class(detector, samples, cls, image_views, batch_size, progress)
        t1 = time.perf_counter()
        metrics = evaluate_class(masks, maps, labels, np.asarray(scores))
        t2 = time.perf_counter()
        result = ClassResult(
            cls=cls, metrics=metrics, images=len(samples), anomalous=int(labels.sum()),
            eval_size=(int(maps.shape[1]), int(maps.shape[2])), settings=settings, prompts_sha256=prompts_sha,
            backend=backend, seconds_predict=t1 - t0, seconds_metrics=t2 - t1,
            image_scores=[{"image": _relative(s.image_path, root), "label": s.label, "score": score}
                          for s, score in zip(samples, scores)])
        _write_json(path, result.to_json())
        log.info("%s: %d images, pixel AUROC %.1f, image AUROC %.1f (%.1f s)", cls, len(samples),
                 100 * metrics.pixel_auroc, 100 * metrics.image_auroc, t2 - t0)
        results.append(result)
    summary = EvalSummary(settings=settings, root=str(root), artifacts=str(artifacts_dir or detector.artifacts.folder),
                          classes=results, mean=mean_over_classes([r.metrics for r in results]),
                          random_weights=bool(detector.artifacts.manifest.random_weights), backend=backend,
                          out_dir=str(out))
    _write_json(out / SUMMARY, summary.to_json())
    return summary


def _relative(path: Path, root: str | Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------

@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export.")
@click.option("--dataset", required=True, type=click.Choice(DATASETS),
              help="Folder layout: mvtec (<class>/test/<defect>/) or visa (split_csv/1cls.csv).")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="Dataset folder (MVTec AD: holds bottle/, cable/, ...; VisA: holds split_csv/).")
@click.option("--classes", default=None,
              help="Comma-separated classes to evaluate (default: every class found under --root).")
@click.option("--tta", is_flag=True, help="AnoCLIP+: test-time adaptation of the patch tokens (maps only).")
@click.option("--image-views", default=str(1), show_default=True, type=click.Choice(["1", str(NUM_VIEWS)]),
              help=f"Image score from the image alone, or the mean over the authors' {NUM_VIEWS} augmented views.")
@click.option("--backend", default="auto", show_default=True, type=click.Choice(BACKEND_CHOICES),
              help="onnxruntime execution provider; auto prefers TensorRT, then CUDA, then CPU.")
@click.option("--model", default="visual", show_default=True, type=click.Choice(["visual", "visual_qkv"]),
              help="visual: AnoCLIP V-V tokens; visual_qkv: the plain-CLIP baseline row (if exported).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Images per model call (single-view evaluation; 22 views are always one call per image).")
@threads_option()
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Results folder (default: eval-results/<dataset>-<backbone>[-tta]-v<views>/).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Reuse class results in --out that were made with the same settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (the table goes to stderr).")
@click.option("--memory-shots", "memory_shots", multiple=True, metavar="K[,K...]",
              help="Few-shot protocol: per class, K normal training images (MVTec AD train/good; VisA the train, "
                   "normal rows of 1cls.csv) drawn per seed become a memory of normal frames, built as `anoclip "
                   "calibrate memory` builds one and held in memory (the artifact folder is not written); the test "
                   "split is then scored zero-shot, by the memory only and combined, from one run of the visual model "
                   "per image. Repeatable or comma-separated, e.g. 1,4,8. Results: fewshot.json in --out, with "
                   "WinCLIP+'s published few-shot figures beside (not measured here).")
@click.option("--memory-seeds", default="0,1,2", show_default=True, metavar="S[,S...]",
              help="Seeds of the few-shot draws: a seed shuffles the class's normal images and the first K are "
                   "taken (the same seed draws the same images; a seed's draws are nested in K). Tables show the "
                   "mean over seeds ± the sample standard deviation.")
@click.option("--memory-weight", default=DEFAULT_WEIGHT, show_default=True, type=click.FloatRange(0, 1),
              help="Weight w of the memory in the combined rows: w * memory + (1 - w) * zero-shot.")
@click.option("--memory-max-patches", default=DEFAULT_MAX_PATCHES, show_default=True, type=click.IntRange(min=1),
              help="Rows a few-shot memory keeps (greedy k-center coreset above it), as `anoclip calibrate memory`.")
@no_verify_option
@verbose_option
def eval_command(artifacts_dir, dataset, root, classes, tta, image_views, backend, model, batch_size, threads,
                 out_dir, resume, as_json, memory_shots, memory_seeds, memory_weight, memory_max_patches, no_verify,
                 verbose):
    """Evaluate on MVTec AD or VisA: per-class pixel AUROC / AP / F1-max, PRO (authors' and
    AUPRO@0.3), image AUROC / F1-max / AUPR, and their mean beside the paper's Tables 1 and 2.

    Maps are compared with the masks at model resolution (240x240 for the default model on MVTec
    AD; the resized, tiled frame on VisA). One JSON file per class and summary.json go to --out; an
    interrupted run continues where it stopped.

    With --memory-shots K: the few-shot protocol instead. Per class and seed, K normal training
    images become a memory of normal frames held in memory (the artifact folder is not written);
    every test image runs the visual model once and is scored three ways: zero-shot (memory off),
    memory only, and combined (--memory-weight). Per class and mean: pixel AUROC, AUPRO@0.3, PRO
    (authors) and image AUROC, mean over seeds ± sample standard deviation, beside the AnoCLIP
    paper's zero-shot and WinCLIP / WinCLIP+'s published figures (published, not measured here).
    fewshot.json in --out holds every row (per class, mode, K and seed).
    """
    from anoclip.runtime.plumbing import configure_logging
    from anoclip.runtime.detector import Detector

    configure_logging(verbose)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if classes is not None and not names:
        raise AnoclipError("--classes is empty: give comma-separated class names, e.g. --classes bottle,cable")
    plan = plan_classes(dataset, root, names)
    if memory_shots:
        return _fewshot(artifacts_dir, dataset, root, plan, memory_shots, memory_seeds, memory_weight,
                        memory_max_patches, tta=tta, image_views=int(image_views), backend=backend, model=model,
                        batch_size=batch_size, threads=threads, out_dir=out_dir, as_json=as_json, verify=not no_verify)
    detector = Detector.load(artifacts_dir, backend=backend, tta=tta, model=model, verify=not no_verify,
                             threads=threads)
    check_prompt_classes(detector, list(plan), artifacts_dir)
    if detector.artifacts.manifest.random_weights:
        click.echo(RANDOM_WEIGHTS_WARNING, err=True)
    summary = evaluate(detector, dataset, root, out_dir=out_dir, image_views=int(image_views), resume=resume,
                       batch_size=batch_size, model=model, artifacts_dir=artifacts_dir, plan=plan)
    click.echo(format_report(summary), err=as_json)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))


def _fewshot(artifacts_dir, dataset, root, plan, memory_shots, memory_seeds, memory_weight, max_patches, *, tta,
             image_views, backend, model, batch_size, threads, out_dir, as_json, verify) -> None:
    """``anoclip eval --memory-shots``: the few-shot protocol of :mod:`.fewshot`, its tables and JSON."""
    from anoclip.runtime.detector import Detector

    from .fewshot import evaluate_fewshot, fewshot_json, format_fewshot, parse_int_list

    shots = parse_int_list(memory_shots, "--memory-shots", 1)
    seeds = parse_int_list(memory_seeds, "--memory-seeds", 0)
    if tta:
        raise AnoclipError("--memory-shots compares zero-shot AnoCLIP with the memory branch: drop --tta")
    if image_views != 1:
        raise AnoclipError("--memory-shots scores one view per image: drop --image-views")
    if model != "visual":
        raise AnoclipError("--memory-shots needs the V-V tokens of the visual model: drop --model visual_qkv")
    detector = Detector.load(artifacts_dir, backend=backend, model=model, verify=verify, threads=threads,
                             memory="off")
    check_prompt_classes(detector, list(plan), artifacts_dir)
    record = evaluate_fewshot(detector, dataset, root, plan, shots=shots, seeds=seeds, weight=memory_weight,
                              max_patches=max_patches, out_dir=out_dir, batch_size=batch_size,
                              artifacts_dir=artifacts_dir)
    click.echo(format_fewshot(record), err=as_json)
    if as_json:
        click.echo(fewshot_json(record))
