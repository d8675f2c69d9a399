"""Model-only speed of int8 variants of one visual model against fp32, in one interleaved run:
onnxruntime on the CPU, batch 1, what ``anoclip calibrate int8`` made (full int8, the
accuracy-aware model with some MatMuls kept in float, weights-only).

    python -m anoclip.benchmarks.latency.int8_variants --fp32 A/visual.<sha>.onnx \\
        --int8 "accuracy-aware=B/visual_int8.<sha>.onnx" --int8 "weights-only=C/visual_int8.<sha>.onnx"

Each model runs on the same random input, round-robin after warm-up runs; the table gives the
median and 90th percentile in ms per image, the speed-up over fp32, and the CPU model.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from anoclip.runtime.backends import OnnxRuntimeBackend

from .timing import machine_info, table_lines, time_interleaved


def run_int8_variants(fp32: Path, int8: dict[str, Path], runs: int = 20, warmup: int = 3,
                      threads: int | None = None) -> dict:
    """{"machine": ..., "rows": [{"model", "file", "ms_p50", "ms_p90", "speedup"}]}; int8 models run as
    the runtime runs them (its onnxruntime options for int8)."""
    backends = {"fp32": OnnxRuntimeBackend(fp32, providers="cpu", threads=threads, precision="fp32")}
    for label, path in int8.items():
        backends[label] = OnnxRuntimeBackend(path, providers="cpu", threads=threads, precision="int8")
    import onnx  # benchmarks may need more than the runtime

    dims = onnx.load(str(fp32), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value or 1 for d in dims]  # a dynamic batch axis: batch 1
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    timings = time_interleaved({name: (lambda b=backend: b.run(batch)) for name, backend in backends.items()},
                               runs=runs, warmup=warmup, rotate=True)
    base = timings["fp32"].median
    rows = [{"model": name, "file": str(fp32 if name == "fp32" else int8[name]), "ms_p50": round(t.median, 1),
             "ms_p90": round(t.percentile(90), 1), "speedup": round(base / t.median, 2)} for name, t in timings.items()]
    return {"machine": machine_info(), "runs": runs, "batch": 1, "rows": rows}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--fp32", "fp32", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The fp32 visual model (visual.<sha>.onnx of an artifact folder).")
@click.option("--int8", "int8", multiple=True, required=True,
              help="LABEL=PATH of an int8 model (visual_int8.<sha>.onnx); repeat for more.")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1), help="Timed runs per model.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def main(fp32, int8, runs, warmup, threads, as_json):
    """Model-only speed of int8 variants against fp32 (onnxruntime CPU, batch 1)."""
    variants = {}
    for item in int8:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise click.BadParameter(f"{item!r}: give LABEL=PATH of an existing model", param_hint="--int8")
        variants[label] = Path(path)
    result = run_int8_variants(fp32, variants, runs, warmup, threads)
    click.echo(json.dumps(result, indent=2) if as_json else "\n".join(report_lines(result, runs)))


def report_lines(result: dict, runs: int) -> list[str]:
    machine = result["machine"]
    title = (f"{machine['cpu']}, {machine['cores']} cores, onnxruntime {machine['onnxruntime']}, batch 1, "
             f"median of {runs} interleaved runs (vs fp32: times as fast)")
    return table_lines(title, [("model", "model", "<22"), ("ms_p50", "ms/img p50", ">10.1f"), ("ms_p90", "p90", ">8.1f"),
                               ("speedup", "vs fp32", ">8.2f")], result["rows"])


if __name__ == "__main__":
    main()
