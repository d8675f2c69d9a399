"""``anoclip bench``: the command that runs the benchmark of ``bench.py`` and reports it through
``bench_report.py`` (a table, JSON, Markdown, the README block)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.memory import DEFAULT_MAX_PATCHES
from anoclip.runtime.plumbing import atomic_write_bytes, configure_logging, ensure_writable_folder

from .bench import BACKENDS, bench_frame, failed_rows, memory_sizes, run_bench
from .bench_report import MEMORY_TARGET, markdown, method_lines, table_lines, update_readme


def resolve_backends(backends: str) -> list[str]:
    """The backends named (``auto``: every one of the runtime's; those this machine lacks give
    skipped rows)."""
    if backends.strip() == "auto":
        return list(BACKENDS)
    names = list(dict.fromkeys(b.strip() for b in backends.split(",") if b.strip()))
    for name in names:
        if name not in BACKENDS:
            raise AnoclipError(f"unknown backend '{name}'; choose among {', '.join(BACKENDS)} or auto")
    return names


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder; export with --qkv-tokens model (CLIP row) and --tta (AnoCLIP+ onnx row).")
@click.option("--backends", default="auto", show_default=True,
              help="Comma-separated backends to time: cpu, cuda, tensorrt (onnxruntime's providers), openvino, "
                   "tensorrt-native (the folder's engines), or auto = every one; those this machine cannot run "
                   "are listed as skipped, with the reason.")
@click.option("--runs", default=30, show_default=True, type=click.IntRange(min=3), help="Timed calls per row.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(min=0), help="Untimed calls per row first.")
@click.option("--image", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Frame to time with (default: a random 1024x1024 RGB frame, MVTec-sized).")
@click.option("--image-size", default=1024, show_default=True, type=click.IntRange(min=16),
              help="Side of the random frame when no --image is given.")
@click.option("--class", "cls", default=None, help="Class to score (default: the first in the prompt weights).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="Print rows and method as JSON instead of the table.")
@click.option("--full-last-block", "full_dir", type=click.Path(file_okay=False), default=None,
              help="Second artifact folder, exported from the same weights with --qkv-tokens add: adds an "
                   "'AnoCLIP (full last block)' row without the last-block shortcut, as the paper's Table 7 timed it.")
@click.option("--precisions", default="auto", show_default=True,
              help="Reduced precisions of the visual model to time beside fp32, as 'AnoCLIP (int8)' / 'AnoCLIP "
                   "(fp16)' rows: a comma-separated list of int8, fp16, or auto = both (a row whose model or engine "
                   "the folder lacks is skipped, naming `anoclip calibrate int8|fp16` or `anoclip build-engine`).")
@click.option("--memory-patches", default=str(DEFAULT_MAX_PATCHES), show_default=True,
              help="Memory rows: AnoCLIP (fp32, and int8 when the folder has visual_int8) with a memory of normal "
                   "frames of each of these sizes (comma-separated rows, e.g. 4096,16384; none: no memory rows), "
                   "random unit rows for the class, held in memory (the folder is not written). A line under the "
                   f"method gives each one's time over the row without memory against the target (<= "
                   f"{MEMORY_TARGET:.2f}x at {DEFAULT_MAX_PATCHES} rows) and the memory file's bytes.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the table as Markdown to this file.")
@click.option("--readme", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Replace the block between the anoclip bench markers in this README with the Markdown table.")
def bench_command(artifacts_dir, backends, runs, warmup, image, image_size, cls, threads, as_json, full_dir,
                  precisions, memory_patches, markdown_path, readme):
    """One table: a row per backend x precision (and method: CLIP, AnoCLIP, the fused graph,
    AnoCLIP+) with status, file size, fidelity against fp32 and ms per image per stage, beside the
    paper's Table 7.

    Rows this machine cannot run (no GPU, no TensorRT, no OpenVINO, a model or engine the folder
    lacks) are "skipped: why"; a row that could run and failed is "failed: why" and makes the
    command exit 1 after the table is printed.
    """
    from tqdm import tqdm

    configure_logging()
    if markdown_path:  # fail now, not after the runs
        ensure_writable_folder(Path(markdown_path).parent, "--markdown folder")
    chosen = resolve_backends(backends)
    memory_sizes(memory_patches)  # a malformed list fails now
    frame = bench_frame(image, image_size)
    with tqdm(total=runs * len(chosen), desc="bench", unit="round", file=sys.stderr, disable=None) as bar:
        rows, method = run_bench(artifacts_dir, chosen, runs, warmup, frame, cls, threads, bar.update, full_dir,
                                 precisions, memory_patches)
    md = markdown(rows, method)
    if markdown_path:
        atomic_write_bytes(markdown_path, md.encode())
    if readme:
        update_readme(Path(readme), md)
    if as_json:
        click.echo(json.dumps({"method": method, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        for line in method_lines(method):
            click.echo(line)
        click.echo("")
        for line in table_lines(rows, markdown=False):
            click.echo(line)
    failed = failed_rows(rows)
    if failed:
        click.echo(f"{len(failed)} row(s) failed: {', '.join(f'{r.name} on {r.backend}' for r in failed)}", err=True)
        sys.exit(1)
