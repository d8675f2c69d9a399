"""Visual tower latency: PyTorch eager V-V reference vs ONNX Runtime plain CLIP vs ONNX Runtime AnoCLIP.

    python -m anoclip.benchmarks.visual_latency [--artifacts DIR] [--runs 20] [--json]

Without ``--artifacts`` it exports ``--backbone`` with random weights into a temporary folder
(latency does not depend on the weights' values). All candidates run round-robin in one process,
batch 1, so the ratios compare like with like; it also measures the peak resident memory of an
``anoclip predict`` process on one image.
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

from .timing import machine_info, time_interleaved

log = logging.getLogger(__name__)

PAPER_MS = {"clip": 6.2, "anoclip": 7.6}  # Table 7, RTX 3090


def export_random(backbone: str, folder: Path) -> Path:
    """Export ``backbone`` with random weights, with the plain-CLIP model beside the V-V one."""
    from anoclip.export.cli import ExportOptions, run_export

    opts = ExportOptions(backbone, "none", folder, ["bottle"], {}, 17, False, None, "model", False, True, 1e-4, 128, 0)
    run_export(opts, ["anoclip-export", "--backbone", backbone, "--pretrained", "none", "--classes", "bottle",
                      "--qkv-tokens", "model", "--out", str(folder)])
    return folder


def torch_reference(backbone: str):
    """The PyTorch eager V-V module on random weights, or None when the export extra is missing."""
    try:
        import torch

        from anoclip.export.model import load_model
        from anoclip.export.vv import VVVisual
    except ImportError:
        return None
    torch.manual_seed(0)
    module = VVVisual(load_model(backbone, "none").model.visual)

    def run(batch: np.ndarray):
        with torch.no_grad():
            return module(torch.from_numpy(batch))

    return run


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
              help="Artifact folder with visual.onnx and visual_qkv.onnx (export with --qkv-tokens model). "
                   "Default: export --backbone with random weights into a temporary folder.")
@click.option("--backbone", default="ViT-B-16-plus-240", show_default=True)
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=3))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def main(artifacts, backbone, runs, warmup, as_json):
    """Median ms per image (batch 1) of the three visual towers, measured side by side."""
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(artifacts) if artifacts else export_random(backbone, Path(tmp) / "artifacts")
        manifest = read_manifest(folder)
        models = {name: folder / entry.file for name, entry in manifest.models.items()}
        if VISUAL_QKV not in models:
            raise click.ClickException(f"{folder} has no visual_qkv.onnx; export with --qkv-tokens model")
        height, width = manifest.image_size
        batch = np.random.default_rng(0).normal(size=(1, 3, height, width)).astype(np.float32)
        candidates = {
            "ORT plain CLIP (QKV tokens)": OnnxRuntimeBackend(models[VISUAL_QKV], providers="cpu").run,
            "ORT AnoCLIP (V-V tokens)": OnnxRuntimeBackend(models[VISUAL], providers="cpu").run,
        }
        reference = torch_reference(manifest.backbone)
        if reference is not None:
            candidates["PyTorch eager V-V reference"] = reference
        timings = time_interleaved({k: (lambda fn=fn: fn(batch)) for k, fn in candidates.items()}, runs, warmup)
        rss = predict_peak_rss_mb(folder, (480, 640))
    import onnxruntime

    clip = timings["ORT plain CLIP (QKV tokens)"].median
    anoclip = timings["ORT AnoCLIP (V-V tokens)"].median
    result = {
        "machine": machine_info(),
        "onnxruntime": onnxruntime.__version__,
        "backbone": manifest.backbone,
        "input": [1, 3, height, width],
        "runs": runs,
        "warmup": warmup,
        "median_ms": {k: round(t.median, 2) for k, t in timings.items()},
        "anoclip_over_clip": round(anoclip / clip, 3),
        "paper_anoclip_over_clip_rtx3090": round(PAPER_MS["anoclip"] / PAPER_MS["clip"], 3),
        "predict_peak_rss_mb": round(rss, 1),
    }
    if reference is not None:
        result["pytorch_over_anoclip"] = round(timings["PyTorch eager V-V reference"].median / anoclip, 3)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    m = result["machine"]
    click.echo(f"{manifest.backbone}, batch 1, {runs} interleaved runs after {warmup} warm-up; "
               f"{m['cpu']}, {m['cores']} cores, onnxruntime {onnxruntime.__version__} CPU")
    for name, ms in result["median_ms"].items():
        click.echo(f"  {name:<32} {ms:9.2f} ms/img (median)")
    click.echo(f"  AnoCLIP / plain CLIP (ORT)       {result['anoclip_over_clip']:9.3f}x "
               f"(paper, RTX 3090: {result['paper_anoclip_over_clip_rtx3090']:.3f}x)")
    if "pytorch_over_anoclip" in result:
        click.echo(f"  PyTorch eager / ORT AnoCLIP      {result['pytorch_over_anoclip']:9.3f}x")
    click.echo(f"  peak RSS of `anoclip predict`    {result['predict_peak_rss_mb']:9.1f} MB")


if __name__ == "__main__":
    main()
