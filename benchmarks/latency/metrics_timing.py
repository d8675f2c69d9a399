"""Time :func:`anoclip.benchmarks.accuracy.metrics.evaluate_class` on a set as large as MVTec AD's test set.

    python -m anoclip.benchmarks.latency.metrics_timing [--images 1725 --size 240 --classes 15]

Maps are random, masks hold one to three elliptic blobs on about a third of the images. The set
is evaluated per class (``--classes`` equal groups, as the benchmark does) and pooled as one class;
both report the total seconds and the seconds per stage.
"""

from __future__ import annotations

import json
import os
import time

import click
import cv2
import numpy as np

from ..accuracy.metrics import evaluate_class
from .timing import machine_info


def synthetic_set(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray, np.ndarray]:
    """(masks [N,S,S] bool, maps [N,S,S] float32, labels [N], scores [N])."""
    rng = np.random.default_rng(seed)
    maps = rng.random((n_images, size, size), dtype=np.float32)
    masks = np.zeros((n_images, size, size), dtype=bool)
    labels = (rng.random(n_images) < 1 / 3).astype(np.int64)
    canvas = np.zeros((size, size), np.uint8)
    for i in np.flatnonzero(labels):
        canvas[:] = 0
        for _ in range(int(rng.integers(1, 4))):
            center = (int(rng.integers(size)), int(rng.integers(size)))
            axes = (int(rng.integers(3, size // 8)), int(rng.integers(3, size // 8)))
            cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks[i] = canvas > 0
        maps[i][masks[i]] += 0.3  # a weak signal, so the curves are not degenerate
    scores = rng.random(n_images) + 0.3 * labels
    return masks, maps, labels, scores


def _run(masks: np.ndarray, maps: np.ndarray, labels: np.ndarray, scores: np.ndarray,
         n_classes: int, repeat: int) -> dict[str, object]:
    """Evaluate ``n_classes`` consecutive groups; keep the fastest of ``repeat`` passes."""
    bounds = np.linspace(0, labels.size, n_classes + 1).round().astype(int)
    groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # views, no copies
    best: dict[str, object] | None = None
    for _ in range(repeat):
        timings: dict[str, float] = {}
        start = time.perf_counter()
        results = [evaluate_class(masks[g], maps[g], labels[g], scores[g], timings=timings)
                   for g in groups]
        total = time.perf_counter() - start
        if best is None or total < best["total_s"]:  # type: ignore[operator]
            best = {"classes": n_classes, "total_s": total, "stages_s": timings,
                    "first_class": results[0].as_dict()}
    assert best is not None
    return best


@click.command()
@click.option("--images", type=click.IntRange(min=3), default=1725, show_default=True,
              help="Number of test images (MVTec AD's test split has 1,725).")
@click.option("--size", type=click.IntRange(min=16), default=240, show_default=True,
              help="Map and mask side in pixels (the evaluation resolution).")
@click.option("--classes", "n_classes", type=click.IntRange(min=1), default=15,
              show_default=True, help="Equal groups evaluated one by one, like MVTec's classes.")
@click.option("--mode", type=click.Choice(["both", "per-class", "pooled"]), default="both",
              show_default=True,
              help="Evaluate per class, all pixels pooled as one class, or both.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random set.")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Passes per mode; the fastest is reported (other load on the machine inflates "
                   "single passes).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def main(images: int, size: int, n_classes: int, mode: str, seed: int, repeat: int,
         as_json: bool) -> None:
    """Time the full metric set (pixel AUROC/AP/F1-max, both PROs, image metrics)."""
    info = machine_info()
    t0 = time.perf_counter()
    masks, maps, labels, scores = synthetic_set(images, size, seed)
    gen_s = time.perf_counter() - t0
    runs = []
    if mode in ("both", "per-class"):
        runs.append(_run(masks, maps, labels, scores, n_classes, repeat))
    if mode in ("both", "pooled"):
        runs.append(_run(masks, maps, labels, scores, 1, repeat))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report = {"machine": info, "load_average_1min": load, "images": images, "size": size,
              "pixels": int(masks.size), "anomalous_images": int(labels.sum()),
              "generate_s": gen_s, "runs": runs}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"CPU: {info['cpu']} ({info['cores']} usable of {info['logical_cores']} "
               f"logical cores); Python {info['python']}, numpy {info['numpy']}, "
               f"OpenCV {info['opencv']}; load average {load if load is None else round(load, 2)}")
    click.echo(f"set: {images} images of {size}x{size} = {masks.size:,} pixels, "
               f"{int(labels.sum())} anomalous images (generated in {gen_s:.1f} s)")
    for run in runs:
        label = "pooled as one class" if run["classes"] == 1 else f"{run['classes']} classes"
        best = f" (fastest of {repeat})" if repeat > 1 else ""
        click.echo(f"\nevaluate_class, {label}: {run['total_s']:.2f} s total{best}")
        stages: dict[str, float] = run["stages_s"]  # type: ignore[assignment]
        for stage, seconds in stages.items():
            click.echo(f"  {stage:<14} {seconds:7.2f} s")


if __name__ == "__main__":
    main()
