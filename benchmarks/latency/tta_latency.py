"""Latency of the AnoCLIP+ test-time adaptation loop per image.

    python -m anoclip.benchmarks.latency.tta_latency [--json] [--runs 30] [--warmup 3]

Rows: the numpy loop (explicit parameters and noise, and with the seeded draws included), the
ONNX graph through onnxruntime's CPU provider (built in a temporary folder when
``anoclip.export`` is importable), and a plain float32 matrix multiply of the loop's own GEMM shape
as the machine's reference speed. FLOPs are counted analytically from the matrix products, which
dominate: per step four products of (2M x C) by (C x K) (forward: Pn w^T, A T; backward: dPhi T^T,
dZ^T Pn), plus two M-row products for the final adapted tokens; K = 2N (text adapter) or C (linear).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click
import numpy as np

from anoclip.runtime.tta import OnnxTTARunner, TTAAdapter, TTAConfig, draw_noise

from .. import paper
from .timing import machine_info

PAPER_NOTE = (f"paper {paper.LATENCY_SOURCE}: AnoCLIP+ {paper.ANOCLIP_PLUS_MS} ms vs AnoCLIP {paper.ANOCLIP_MS} ms "
              f"per image (TTA ~{paper.TTA_MS:.1f} ms)")


@dataclass
class Row:
    name: str
    status: str
    ms_median: float | None = None
    ms_p90: float | None = None
    gflop: float | None = None
    gflops_per_s: float | None = None
    pct_of_matmul: float | None = None
    note: str = ""


def tta_flops(M: int, C: int, K: int, steps: int) -> float:
    """Matrix-product FLOPs of one adapted image (multiply-add = 2 FLOPs)."""
    per_step = 4 * 2.0 * (2 * M) * C * K
    final = 2 * 2.0 * M * C * K
    return steps * per_step + final


def _inputs(M: int, C: int, N2: int, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((N2, C)).astype(np.float32)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    tf = rng.standard_normal((2, C)).astype(np.float32)
    tf /= np.linalg.norm(tf, axis=1, keepdims=True)
    P = (0.5 * rng.standard_normal((M, C))).astype(np.float32)
    bound = 1.0 / np.sqrt(C)
    w = rng.uniform(-bound, bound, (N2, C)).astype(np.float32)
    b = rng.uniform(-bound, bound, N2).astype(np.float32)
    noise = draw_noise(rng, steps, M, C, 0.055, dtype=np.float32)
    return {"T": T, "tf": tf, "P": P, "w": w, "b": b, "noise": noise}


def _time_interleaved(
    fns: dict[str, Callable[[], Any]], runs: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """Median and p90 ms of each callable, timed round-robin so that load from other processes
    hits every row alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, v in samples.items():
        v.sort()
        out[name] = (statistics.median(v), v[min(len(v) - 1, round(0.9 * (len(v) - 1)))])
    return out


def run_benchmark(
    M: int = 225, C: int = 640, N2: int = 924, steps: int = 5, runs: int = 30, warmup: int = 3
) -> dict[str, Any]:
    x = _inputs(M, C, N2, steps)
    flops = tta_flops(M, C, N2, steps)
    fns: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}
    skipped: list[Row] = []

    # the machine's reference: float32 products of the loop's GEMM shape, as many as give the
    # loop's FLOPs, so its time is what the loop would take if it were all matrix products
    a = np.random.default_rng(1).standard_normal((2 * M, C)).astype(np.float32)
    bmat = np.random.default_rng(2).standard_normal((N2, C)).astype(np.float32)
    mm_flops = 2.0 * (2 * M) * C * N2
    reps = max(1, round(flops / mm_flops))
    mm_name = f"matmul f32 {2 * M}x{C}@{C}x{N2} x{reps}"

    def matmuls() -> None:
        for _ in range(reps):
            a @ bmat.T

    fns[mm_name] = matmuls
    notes[mm_name] = "reference: same FLOPs as pure products"

    cfg = TTAConfig(steps=steps, seed=0)
    adapter = TTAAdapter(x["T"], x["tf"], cfg)
    fns["numpy f32 TTA"] = lambda: adapter.run(x["P"], init=(x["w"], x["b"]), noise=x["noise"])
    notes["numpy f32 TTA"] = "explicit init + noise"
    fns["numpy f32 TTA + RNG"] = lambda: adapter.run(x["P"])
    notes["numpy f32 TTA + RNG"] = "seeded draws of w, b, noise included"

    tmp = tempfile.TemporaryDirectory()
    try:
        try:
            from anoclip.export.tta_graph import write_tta_graph
        except ImportError as exc:
            skipped.append(Row("onnxruntime CPU TTA graph", "skipped",
                               note=f"anoclip.export unavailable: {exc}"))
        else:
            path = write_tta_graph(os.path.join(tmp.name, "tta.onnx"), steps=steps, config=cfg)
            runner = OnnxTTARunner(str(path), ["CPUExecutionProvider"], T=x["T"],
                                   text_features=x["tf"], config=cfg)
            fns["onnxruntime CPU TTA graph"] = lambda: runner.run(
                x["P"], init=(x["w"], x["b"]), noise=x["noise"]
            )
            notes["onnxruntime CPU TTA graph"] = "explicit init + noise"
        timings = _time_interleaved(fns, runs, warmup)
    finally:
        tmp.cleanup()

    mm_med = timings[mm_name][0]
    mm_flops_total = reps * mm_flops
    mm_rate = mm_flops_total / (mm_med * 1e-3) / 1e9
    rows: list[Row] = []
    for name, (med, p90) in timings.items():
        f = mm_flops_total if name == mm_name else flops
        rate = f / (med * 1e-3) / 1e9
        rows.append(Row(name, "ok", med, p90, f / 1e9, rate, 100.0 * rate / mm_rate, notes[name]))
    rows += skipped
    info = machine_info()
    return {
        "machine": info,
        "shape": {"M": M, "C": C, "2N": N2, "steps": steps},
        "tta_gflop_per_image": flops / 1e9,
        "runs": runs,
        "rows": [asdict(r) for r in rows],
        "paper": PAPER_NOTE,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["shape"]
    machine = (
        f"machine: {m['cpu']}; {m['cores']} usable cores of {m['logical_cores']}; "
        f"numpy {m['numpy']}; BLAS {m['blas']}; onnxruntime {m['onnxruntime']}; "
        f"load average {m.get('load_average_1min', '?')}"
    )
    shape = (
        f"TTA: M={s['M']} C={s['C']} 2N={s['2N']} steps={s['steps']}; "
        f"{result['tta_gflop_per_image']:.2f} GFLOP per image (matrix products); "
        f"median of {result['runs']} runs, rows timed round-robin"
    )
    header = (
        f"{'backend':<36} {'status':<8} {'ms med':>8} {'ms p90':>8} {'GFLOP':>7} {'GFLOP/s':>8} "
        f"{'% mm':>6}  note"
    )
    lines = [machine, shape, "", header]
    for r in result["rows"]:
        lines.append(
            f"{r['name']:<36} {r['status']:<8} {_fmt(r['ms_median'], '8.2f')} "
            f"{_fmt(r['ms_p90'], '8.2f')} {_fmt(r['gflop'], '7.2f')} "
            f"{_fmt(r['gflops_per_s'], '8.1f')} {_fmt(r['pct_of_matmul'], '6.1f')}  {r['note']}"
        )
    lines += ["", result["paper"]]
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a table.")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(1),
              help="Timed runs per row; the median and 90th percentile are reported.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0),
              help="Untimed runs before timing each row.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(1),
              help="TTA optimisation steps per image (the authors use 5).")
@click.option("--patches", "M", default=225, show_default=True, type=click.IntRange(1),
              help="Patch tokens per image M (15x15 for ViT-B-16-plus-240).")
@click.option("--dim", "C", default=640, show_default=True, type=click.IntRange(1),
              help="Embedding dimension C.")
@click.option("--prompts", "N2", default=924, show_default=True, type=click.IntRange(1),
              help="Prompt embeddings per class 2N (rows of T).")
def main(as_json: bool, runs: int, warmup: int, steps: int, M: int, C: int, N2: int) -> None:
    """Milliseconds per image of the AnoCLIP+ TTA loop on this CPU, numpy and ONNX Runtime."""
    result = run_benchmark(M=M, C=C, N2=N2, steps=steps, runs=runs, warmup=warmup)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


if __name__ == "__main__":
    main()
