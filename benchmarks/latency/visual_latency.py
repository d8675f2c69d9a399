"""Visual tower latency, batch 1, against the baselines a user would otherwise run.

    python -m anoclip.benchmarks.latency.visual_latency [--artifacts DIR | --backbone NAME] [--runs 20] [--json]

Rows, timed round-robin in one process with the same thread count:

* PyTorch eager AnoCLIP: open_clip's model with the V-V computation exactly as SPEC section 2
  states it, every block on all tokens (:func:`.eager.authors_vv`);
* PyTorch eager CLIP: open_clip's own ``model.encode_image``;
* ORT CLIP: ``visual_qkv.onnx`` (the plain-CLIP baseline with QKV patch tokens);
* ORT AnoCLIP (shortcut): ``visual.onnx`` of a default export, whose last block runs its query
  and MLP on the class token only (the only token read from the standard stream there);
* ORT AnoCLIP (full last block): ``visual.onnx`` of an ``--qkv-tokens add`` export, whose last
  block computes every token, as the authors' code timed in the paper's Table 7 does.

Without ``--artifacts`` it exports ``--backbone`` with random weights (``--pretrained none``, seed 0)
into a temporary folder; latency does not depend on the weights' values. Models an artifact
folder lacks are exported from the same weights into a temporary folder. Before timing, the eager
V-V patch tokens are compared with ``VVVisual`` and the ONNX models (max abs difference). It also
measures the peak resident memory of an ``anoclip predict`` process on one image.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

from anoclip.runtime.artifacts import VISUAL, VISUAL_QKV, read_manifest
from anoclip.runtime.backends import OnnxRuntimeBackend

from .. import paper
from .timing import machine_info, time_interleaved

log = logging.getLogger(__name__)

EAGER_VV = "PyTorch eager AnoCLIP (V-V, all tokens)"
EAGER_CLIP = "PyTorch eager CLIP (encode_image)"
ORT_CLIP = "ORT CLIP (visual_qkv.onnx)"
ORT_SHORTCUT = "ORT AnoCLIP, last-block shortcut"
ORT_FULL = "ORT AnoCLIP, full last block"
ROWS = (EAGER_VV, EAGER_CLIP, ORT_CLIP, ORT_SHORTCUT, ORT_FULL)
#: Patch outputs of the exported module behind each ONNX row (export/vv.py ``patch_outputs``).
ONNX_ROWS = {ORT_CLIP: "qkv", ORT_SHORTCUT: "vv", ORT_FULL: "both"}


def export_random(backbone: str, folder: Path) -> Path:
    """Export ``backbone`` with random weights (seed 0), with the plain-CLIP model beside the V-V one."""
    from anoclip.export.exporter import ExportOptions, run_export

    opts = ExportOptions(backbone, "none", folder, ["bottle"], {}, 17, False, None, "model", False, True, 1e-4, 128, 0)
    run_export(opts, f"anoclip-export --backbone {backbone} --pretrained none --classes bottle --qkv-tokens model "
                     f"--out {folder}")
    return folder


def folder_models(folder: Path) -> dict[str, Path]:
    """The ONNX rows an artifact folder already holds: its visual.onnx is the full-last-block model
    when it also outputs the QKV tokens (``--qkv-tokens add``), else the shortcut model."""
    manifest = read_manifest(folder)
    models = {}
    if VISUAL_QKV in manifest.models:
        models[ORT_CLIP] = folder / manifest.models[VISUAL_QKV].file
    visual = manifest.models[VISUAL]
    models[ORT_FULL if "qkv_patch_embeds" in visual.outputs else ORT_SHORTCUT] = folder / visual.file
    return models


def load_eager(folder: Path, model_config: str | None):
    """The open_clip model the folder was exported from, or (None, why not)."""
    manifest = read_manifest(folder)
    try:
        from .eager import load_reference

        loaded = load_reference(manifest.backbone, "none" if manifest.random_weights else manifest.pretrained,
                                model_config)
    except ImportError as exc:
        return None, f"PyTorch rows skipped: {exc} (pip install 'anoclip[export]')"
    except Exception as exc:  # offline download, unknown backbone: the ONNX rows still run
        return None, f"PyTorch rows skipped: {exc}"
    if manifest.visual_weights_sha256 and manifest.visual_weights_sha256 != loaded.weights_sha256("visual"):
        return None, (f"PyTorch rows skipped: the weights loaded for {manifest.backbone} / {manifest.pretrained} "
                      f"are not those {folder} was exported from (another --seed?)")
    return loaded, None


def export_missing(loaded, models: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Export the ONNX rows ``models`` lacks from ``loaded`` into ``folder``."""
    from anoclip.export.onnx_export import export_onnx
    from anoclip.export.vv import VVVisual

    models = dict(models)
    for name, patch_outputs in ONNX_ROWS.items():
        if name not in models:
            entry = export_onnx(VVVisual(loaded.model.visual, patch_outputs=patch_outputs), folder / f"{patch_outputs}.onnx")
            models[name] = folder / entry.file
    return models


def run_visual_latency(artifacts: str | None, backbone: str, model_config: str | None = None, runs: int = 20,
                       warmup: int = 3, threads: int | None = None, measure_rss: bool = True) -> dict:
    """Check the eager V-V tokens against the exported ones, then time every row; return the result."""
    threads = threads or machine_info()["cores"]
    with tempfile.TemporaryDirectory() as tmp:
        if artifacts:
            folder = Path(artifacts)
        else:
            if model_config:
                from anoclip.export.model import register_model_config

                backbone = register_model_config(model_config)
            folder = export_random(backbone, Path(tmp) / "artifacts")
        manifest = read_manifest(folder)
        loaded, note = load_eager(folder, model_config)
        models = folder_models(folder)
        if loaded is not None:
            models = export_missing(loaded, models, Path(tmp))
        height, width = manifest.image_size
        batch = np.random.default_rng(0).normal(size=(1, 3, height, width)).astype(np.float32)
        backends = {name: OnnxRuntimeBackend(path, providers="cpu", threads=threads) for name, path in models.items()}
        candidates = {name: backends[name].run for name in (ORT_CLIP, ORT_SHORTCUT, ORT_FULL) if name in backends}
        parity = {}
        if loaded is not None:
            import torch

            from .eager import eager_runners, vv_parity

            torch.set_num_threads(threads)
            parity = vv_parity(loaded, batch, {f"ONNX {name[4:]}": backends[name].run(batch)[1]
                                               for name in (ORT_SHORTCUT, ORT_FULL) if name in backends})
            eager = eager_runners(loaded)
            candidates = {EAGER_VV: eager["vv"], EAGER_CLIP: eager["clip"], **candidates}
        timings = time_interleaved({k: (lambda fn=fn: fn(batch)) for k, fn in candidates.items()}, runs, warmup)
        rss = predict_peak_rss_mb(folder, (480, 640)) if measure_rss and manifest.prompts else None
    import onnxruntime

    median = {k: t.median for k, t in timings.items()}
    clip = median.get(ORT_CLIP)
    ratios = {}
    if clip:
        ratios.update({f"{name} / ORT CLIP": median[name] / clip for name in (ORT_SHORTCUT, ORT_FULL)
                       if name in median})
    if EAGER_VV in median:
        ratios["eager AnoCLIP / eager CLIP"] = median[EAGER_VV] / median[EAGER_CLIP]
        ratios.update({f"eager AnoCLIP / {name}": median[EAGER_VV] / median[name]
                       for name in (ORT_SHORTCUT, ORT_FULL) if name in median})
    return {
        "machine": machine_info(),
        "onnxruntime": onnxruntime.__version__,
        "backbone": manifest.backbone,
        "weights": manifest.pretrained,
        "input": [1, 3, height, width],
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "median_ms": {k: round(v, 2) for k, v in median.items()},
        "p90_ms": {k: round(t.percentile(90), 2) for k, t in timings.items()},
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "paper_anoclip_over_clip": round(paper.anoclip_over_clip(), 3),
        "paper": paper.LATENCY_SOURCE,
        "vv_max_abs_diff": parity,
        "note": note,
        "predict_peak_rss_mb": None if rss is None else round(rss, 1),
    }


def report_lines(result: dict) -> list[str]:
    m = result["machine"]
    lines = [f"{result['backbone']} ({result['weights']}), batch 1, {result['runs']} interleaved runs after "
             f"{result['warmup']} warm-up, {result['threads']} threads; {m['cpu']}, {m['cores']} cores, "
             f"onnxruntime {result['onnxruntime']} CPU"]
    if result["note"]:
        lines.append(result["note"])
    for name, diff in result["vv_max_abs_diff"].items():
        lines.append(f"  max abs diff, eager {name}: {diff:.2e}")
    lines.append(f"  {'row':<56} {'median':>9} {'p90':>9}  ms/img")
    for name, ms in result["median_ms"].items():
        lines.append(f"  {name:<56} {ms:9.2f} {result['p90_ms'][name]:9.2f}")
    for name, ratio in result["ratios"].items():
        lines.append(f"  {name:<56} {ratio:9.3f}x")
    lines.append(f"  {'paper AnoCLIP / CLIP (' + result['paper'] + ')':<56} {result['paper_anoclip_over_clip']:9.3f}x")
    if result["predict_peak_rss_mb"] is not None:
        lines.append(f"  {'peak RSS of `anoclip predict`':<56} {result['predict_peak_rss_mb']:9.1f} MB")
    return lines


# The child reads its own high-water mark: VmHWM belongs to the process image started by exec, so
# it does not include the memory of this (large) benchmark process it was forked from, which
# getrusage's ru_maxrss would.
_PEAK_RSS_CHILD = """
import atexit, sys
report_path = sys.argv.pop(1)
def report():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(report_path, "w") as out:
        out.write(peak)
atexit.register(report)
from anoclip.runtime.cli import main
main()
"""


def predict_peak_rss_mb(artifacts: Path, size: tuple[int, int]) -> float:
    """Peak resident memory (VmHWM) of a whole ``anoclip predict`` process scoring one image."""
    import cv2

    from anoclip.runtime.artifacts import load_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "frame.png"
        report = Path(tmp) / "peak_kb"
        cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
        cls = sorted(load_artifacts(artifacts, verify=False).prompts.classes)[0]
        cmd = [sys.executable, "-c", _PEAK_RSS_CHILD, str(report), "predict", "--artifacts", str(artifacts),
               "--class", cls, "--out", str(Path(tmp) / "out"), str(image)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"anoclip predict failed: {proc.stderr[-500:]}")
        return int(report.read_text()) / 1024.0



@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", type=click.Path(file_okay=False, exists=True), default=None,
              help="Artifact folder to time (models it lacks are exported from the same weights when PyTorch is "
                   "installed). Default: export --backbone with random weights into a temporary folder.")
@click.option("--backbone", default="ViT-B-16-plus-240", show_default=True, help="open_clip ViT without --artifacts.")
@click.option("--model-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="open_clip model config JSON to register first (a custom --backbone).")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=3))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Threads for onnxruntime and torch alike (default: the cores this process may use).")
@click.option("--rss/--no-rss", default=True, show_default=True, help="Measure the peak RSS of `anoclip predict`.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def main(artifacts, backbone, model_config, runs, warmup, threads, rss, as_json):
    """Median ms per image (batch 1) of the eager PyTorch baselines and the ONNX Runtime towers, side by side."""
    logging.basicConfig(level=logging.WARNING)
    result = run_visual_latency(artifacts, backbone, model_config, runs, warmup, threads, rss)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))


if __name__ == "__main__":
    main()
