"""What scoring several classes costs: one visual pass for K classes against one call per class.

``python -m anoclip.benchmarks.latency.class_count --artifacts DIR`` times, round-robin in one
process on the same frame:

* the fused graph (``anoclip.onnx``) with 1, 4 and all of the folder's classes (15 for an export of
  the MVTec list), run as any ONNX consumer runs it: one ``session.run`` on a preprocessed batch of 1;
* the runtime (``Detector.predict``, visual model) with the same class counts in one call: one visual
  pass, then scores and maps at the image's resolution per class;
* the same classes as that many single-class calls, one visual pass each (what a line pays without
  several classes per pass).

Ratios are to the 1-class row of the same kind, measured in the same run; each round starts one row
later than the last, so every row runs in every position equally often. The fused graphs are
built into a temporary folder from the folder's visual model and prompt weights (needs onnx).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from anoclip.runtime.artifacts import VISUAL, load_artifacts
from anoclip.runtime.backends import OnnxRuntimeBackend
from anoclip.runtime.detector import Detector
from anoclip.runtime.fused import OUTPUTS
from anoclip.runtime.plumbing import configure_logging
from anoclip.runtime.preprocess import preprocess

from .timing import machine_info, table_lines, time_interleaved


def class_counts(total: int) -> list[int]:
    """1, 4 and every class (those of them the folder has)."""
    return sorted({k for k in (1, 4, total) if k <= total})


def build_fused(artifacts, classes: list[str], folder: Path) -> Path:
    import onnx

    from anoclip.export.fused import fuse_graph

    manifest = artifacts.manifest
    model = fuse_graph(onnx.load(str(artifacts.model_path(VISUAL))), classes,
                       [artifacts.prompts.get(c).text_features for c in classes], tuple(manifest.grid),
                       tuple(manifest.image_size), {})
    path = folder / f"anoclip-{len(classes)}.onnx"
    onnx.save(model, str(path))
    return path


def run(artifacts_dir: str, runs: int, warmup: int, image_size: int, threads: int | None, progress) -> dict:
    artifacts = load_artifacts(artifacts_dir, models=[VISUAL], load_thresholds=False)
    classes = sorted(artifacts.prompts.classes)
    counts = class_counts(len(classes))
    frame = np.random.default_rng(0).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    detector = Detector.load(artifacts_dir, backend="cpu", threads=threads, load_thresholds=False)
    batch, _ = preprocess(frame, detector.input_size, detector.mean, detector.std, "never")
    candidates = {}
    with tempfile.TemporaryDirectory(prefix="anoclip-class-count-") as tmp:
        for k in counts:
            progress(f"building the fused graph of {k} class(es)")
            backend = OnnxRuntimeBackend(build_fused(artifacts, classes[:k], Path(tmp)), providers="cpu",
                                         threads=threads, outputs=OUTPUTS)
            candidates[f"fused graph, {k} class(es) in one pass"] = lambda b=backend: b.run_all(batch)
    for k in counts:
        candidates[f"runtime, {k} class(es) in one call"] = lambda k=k: detector.predict(frame, classes[:k])
    candidates[f"runtime, {counts[-1]} single-class calls"] = lambda: [detector.predict(frame, c) for c in classes]
    from tqdm import tqdm

    progress(f"timing {len(candidates)} rows x {runs} runs, round-robin, after {warmup} warm-up")
    with tqdm(total=runs, desc="class count", unit="round", file=sys.stderr, disable=None) as bar:
        timings = time_interleaved(candidates, runs=runs, warmup=warmup, progress=lambda i: bar.update(1), rotate=True)
    rows = []
    for name, timing in timings.items():
        base = next(t for n, t in timings.items() if n.split(",")[0] == name.split(",")[0])
        rows.append({"row": name, **{k: round(v, 1) for k, v in timing.summary().items()},
                     "x 1 class": round(timing.median / base.median, 3)})
    return {"machine": machine_info(), "backbone": artifacts.manifest.backbone,
            "weights": artifacts.manifest.pretrained, "frame": f"{image_size}x{image_size} RGB",
            "classes": classes, "runs": runs, "warmup": warmup, "rows": rows}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder with several classes (e.g. the 15 MVTec classes), ideally --dynamic-batch.")
@click.option("--runs", default=14, show_default=True, type=click.IntRange(min=3),
              help="Timed rounds (a multiple of the 7 rows gives every row every position equally often).")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed rounds first.")
@click.option("--image-size", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Side of the random frame (MVTec-sized by default).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def main(artifacts_dir, runs, warmup, image_size, threads, as_json):
    """ms per image for 1, 4 and all classes in one pass against one call per class."""
    configure_logging()
    result = run(artifacts_dir, runs, warmup, image_size, threads, lambda line: click.echo(line, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))


def report_lines(result: dict) -> list[str]:
    m = result["machine"]
    title = (f"{m['cpu']}, {m['cores']} cores; {result['backbone']} ({result['weights']}); {result['frame']}; "
             f"{result['runs']} runs after {result['warmup']} warm-up, round-robin")
    return table_lines(title, [("row", "row", "<44"), ("p50", "p50 ms", ">9.1f"), ("mean", "mean ms", ">9.1f"),
                               ("p90", "p90 ms", ">9.1f"), ("x 1 class", "x 1 class", ">10.3f")], result["rows"])


if __name__ == "__main__":
    sys.exit(main())
