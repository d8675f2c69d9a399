"""CPU runtimes side by side: onnxruntime and OpenVINO on the fp32 and int8 visual models, batch 1.

    python -m anoclip.benchmarks.latency.cpu_runtimes --artifacts DIR [--int8-model FILE] [--runs 30] [--json]

Rows, timed round-robin in one process with the same thread count, through the runtime's own
backends (:class:`OnnxRuntimeBackend` on the CPU provider, :class:`OpenVinoBackend` on ``CPU``):

* ORT fp32 and OpenVINO fp32 (precision hint f32, so that neither runs in reduced precision);
* OpenVINO bf16: the fp32 model in bf16, only on CPUs that OpenVINO says run bf16 natively
  (AVX512-BF16, AMX), where it is OpenVINO's own default for fp32 models;
* ORT int8 and OpenVINO int8: the Q/DQ model of ``--int8-model`` or of the folder's ``visual_int8``
  entry, when there is one.

The OpenVINO rows appear when openvino is installed (``pip install 'anoclip[openvino]'``). Every row
is compared with ORT fp32 on a few preprocessed random frames first: the largest absolute difference
of ``patch_embeds`` and the smallest cosine between matching patch tokens. Timings are reported
as mean and p50 per row, the ratio of each p50 to ORT fp32's, and the spread (p25-p75) of the
ratios of runs taken in the same round, which shows how much of a difference is noise.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import click
import numpy as np

from anoclip.runtime.artifacts import VISUAL, read_manifest
from anoclip.runtime.backends import OnnxRuntimeBackend
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.preprocess import preprocess

from .timing import machine_info, time_interleaved

log = logging.getLogger(__name__)

VISUAL_INT8 = "visual_int8"  # the manifest entry `anoclip calibrate int8` writes
ORT_FP32 = "ORT fp32"
OV_FP32 = "OpenVINO fp32"
OV_BF16 = "OpenVINO bf16"
ORT_INT8 = "ORT int8"
OV_INT8 = "OpenVINO int8"


def openvino_status() -> tuple[str | None, bool]:
    """(OpenVINO's version or None when it is not installed, whether its CPU plugin runs bf16)."""
    try:
        import openvino as ov
    except (ImportError, OSError):
        return None, False
    try:
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no CPU plugin: the OpenVINO rows fail on their own
        capabilities = []
    return ov.get_version().split("-", 1)[0], "BF16" in capabilities


def int8_model_of(folder: Path, int8_model: str | None) -> Path | None:
    if int8_model:
        return Path(int8_model)
    from anoclip.runtime.artifacts import load_artifacts

    artifacts = load_artifacts(folder, verify=False, models=[], load_thresholds=False)
    return artifacts.model_path(VISUAL_INT8) if VISUAL_INT8 in artifacts.manifest.models else None


def frames(folder: Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random 480x640 RGB frames preprocessed as the Detector does, one [1,3,H,W] batch each."""
    manifest = read_manifest(folder)
    rng = np.random.default_rng(seed)
    return [preprocess(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), manifest.image_size, manifest.mean,
                       manifest.std, tiling="never")[0] for _ in range(count)]


def agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
    """Largest absolute difference and smallest per-token cosine of ``patch_embeds`` against the reference."""
    max_abs, min_cos = 0.0, 1.0
    for ref, out in zip(reference, candidate):
        max_abs = max(max_abs, float(np.abs(out - ref).max()))
        a = out.reshape(-1, out.shape[-1]).astype(np.float64)
        b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
        min_cos = min(min_cos, float(cos.min()))
    return {"max_abs_diff": max_abs, "min_cosine": min_cos}


def build_rows(folder: Path, int8_path: Path | None, threads: int, bf16: bool) -> tuple[dict[str, object], list[str]]:
    """The backends to time, by row name, and notes on the rows left out."""
    from anoclip.runtime.artifacts import load_artifacts

    fp32_path = load_artifacts(folder, verify=False, models=[VISUAL], load_thresholds=False).model_path(VISUAL)
    rows: dict[str, object] = {ORT_FP32: OnnxRuntimeBackend(fp32_path, providers="cpu", threads=threads)}
    notes = []
    version, has_bf16 = openvino_status()
    if version is not None:
        from anoclip.runtime.backends.openvino import OpenVinoBackend

        rows[OV_FP32] = OpenVinoBackend(fp32_path, threads=threads, precision="f32")
        if bf16 and has_bf16:
            rows[OV_BF16] = OpenVinoBackend(fp32_path, threads=threads, precision="bf16")
        elif bf16:
            notes.append(f"{OV_BF16} left out: OpenVINO reports no native bf16 on this CPU")
    else:
        notes.append("OpenVINO rows left out: openvino is not installed (pip install 'anoclip[openvino]')")
    if int8_path is not None:
        rows[ORT_INT8] = OnnxRuntimeBackend(int8_path, providers="cpu", threads=threads)
        if version is not None:
            rows[OV_INT8] = OpenVinoBackend(int8_path, threads=threads, precision="f32")
    else:
        notes.append(f"int8 rows left out: no --int8-model and no {VISUAL_INT8} entry in the manifest "
                     "(make one with `anoclip calibrate int8`)")
    return rows, notes


def run_cpu_runtimes(artifacts: str | Path, int8_model: str | None = None, runs: int = 30, warmup: int = 3,
                     threads: int | None = None, bf16: bool = True, samples: int = 4,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Check every row against ORT fp32, then time them all interleaved; return the result."""
    folder = Path(artifacts)
    threads = threads or int(machine_info()["cores"])
    manifest = read_manifest(folder)
    rows, notes = build_rows(folder, int8_model_of(folder, int8_model), threads, bf16)
    inputs = frames(folder, samples)
    outputs = {name: [backend.run(x)[1] for x in inputs] for name, backend in rows.items()}
    agree = {name: agreement(outputs[ORT_FP32], out) for name, out in outputs.items()}
    batch = inputs[0]
    timings = time_interleaved({name: (lambda b=backend: b.run(batch)) for name, backend in rows.items()},
                               runs, warmup, progress)
    base = timings[ORT_FP32]
    table = []
    for name, timing in timings.items():
        paired = np.asarray(timing.ms) / np.asarray(base.ms)
        table.append({
            "row": name,
            "backend": rows[name].describe(),
            "mean_ms": round(timing.mean, 2),
            "p50_ms": round(timing.median, 2),
            "p90_ms": round(timing.percentile(90), 2),
            "vs_ort_fp32": round(timing.median / base.median, 3),
            "paired_ratio_p25": round(float(np.percentile(paired, 25)), 3),
            "paired_ratio_p75": round(float(np.percentile(paired, 75)), 3),
            "max_abs_diff": agree[name]["max_abs_diff"],
            "min_cosine": agree[name]["min_cosine"],
        })
    pairs = []
    for ov_row, ort_row in ((OV_FP32, ORT_FP32), (OV_INT8, ORT_INT8)):
        if ov_row in timings and ort_row in timings:
            paired = np.asarray(timings[ov_row].ms) / np.asarray(timings[ort_row].ms)
            pairs.append({"rows": f"{ov_row} / {ort_row}",
                          "p50_ratio": round(timings[ov_row].median / timings[ort_row].median, 3),
                          "paired_ratio_p25": round(float(np.percentile(paired, 25)), 3),
                          "paired_ratio_p75": round(float(np.percentile(paired, 75)), 3),
                          **agreement(outputs[ort_row], outputs[ov_row])})
    version, has_bf16 = openvino_status()
    machine = machine_info()
    machine["openvino"] = version or "not installed"
    machine["cpu_bf16"] = has_bf16
    return {
        "machine": machine,
        "backbone": manifest.backbone,
        "weights": manifest.pretrained,
        "input": list(batch.shape),
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "patch_scale": float(max(np.abs(o).max() for o in outputs[ORT_FP32])),
        "rows": table,
        "openvino_vs_onnxruntime": pairs,
        "notes": notes,
    }


def report_lines(result: dict) -> list[str]:
    m = result["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores, load {m['load_average_1min']}; onnxruntime {m['onnxruntime']}, "
             f"openvino {m['openvino']}{', bf16 CPU' if m['cpu_bf16'] else ''}",
             f"{result['backbone']} ({result['weights']}), batch 1, {result['runs']} interleaved runs after "
             f"{result['warmup']} warm-up, {result['threads']} thread{'' if result['threads'] == 1 else 's'}; "
             f"patch_embeds max |x| {result['patch_scale']:.3g}"]
    lines += [f"  {note}" for note in result["notes"]]
    lines.append(f"  {'row':<15} {'mean':>8} {'p50':>8} {'p90':>8}  {'x ORT fp32':>10} {'paired p25-p75':>15}"
                 f" {'max|diff|':>10} {'min cos':>9}  backend")
    for row in result["rows"]:
        spread = f"{row['paired_ratio_p25']:.3f}-{row['paired_ratio_p75']:.3f}"
        lines.append(f"  {row['row']:<15} {row['mean_ms']:8.1f} {row['p50_ms']:8.1f} {row['p90_ms']:8.1f}  "
                     f"{row['vs_ort_fp32']:10.3f} {spread:>15} {row['max_abs_diff']:10.2e} {row['min_cosine']:9.6f}  "
                     f"{row['backend']}")
    for pair in result["openvino_vs_onnxruntime"]:
        lines.append(f"  {pair['rows']:<28} p50 ratio {pair['p50_ratio']:.3f}, paired p25-p75 "
                     f"{pair['paired_ratio_p25']:.3f}-{pair['paired_ratio_p75']:.3f}; patch_embeds max|diff| "
                     f"{pair['max_abs_diff']:.2e}, min cos {pair['min_cosine']:.6f}")
    lines.append("  (ms per image; x ORT fp32: ratio of p50s; paired: ratios of runs in the same round; "
                 "max|diff|, min cos: patch_embeds against ORT fp32)")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", required=True, type=click.Path(file_okay=False, exists=True),
              help="Artifact folder whose fp32 visual model is timed.")
@click.option("--int8-model", type=click.Path(dir_okay=False, exists=True), default=None,
              help="int8 Q/DQ ONNX model of the same tower (default: the folder's visual_int8 entry, if any).")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=3), help="Timed rounds.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed rounds first.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="Threads for every row (default: the cores this process may use).")
@click.option("--bf16/--no-bf16", default=True, show_default=True,
              help="Add the OpenVINO bf16 row on CPUs with native bf16.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def main(artifacts, int8_model, runs, warmup, threads, bf16, as_json):
    """Milliseconds per image (batch 1) of onnxruntime and OpenVINO on the CPU, fp32 and int8, interleaved."""
    logging.basicConfig(level=logging.WARNING)
    try:
        with click.progressbar(length=runs, label="timing", file=sys.stderr) as bar:
            result = run_cpu_runtimes(artifacts, int8_model, runs, warmup, threads, bf16,
                                      progress=lambda done: bar.update(done - bar.pos))
    except AnoclipError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result)))


if __name__ == "__main__":
    main()
