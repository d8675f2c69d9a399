"""How `anoclip bench` reports its rows: the plain and markdown tables, the method lines, and the
README block it can rewrite (``--markdown``)."""

from __future__ import annotations

from pathlib import Path

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.plumbing import atomic_write_bytes

FULL = "full last block"  # rows that compute every token of the last block
STAGES = ("preprocess", "model", "scoring", "tta", "postprocess")
README_START = "<!-- anoclip bench: start -->"
README_END = "<!-- anoclip bench: end -->"
MEMORY_TARGET = 1.10  # a memory row's per-image time over its row without memory, at the default size


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table_lines(rows: list, markdown: bool) -> list[str]:
    header = ["row", "backend", "prec", "status", "MB", "fidelity vs fp32", "mean", "p50", "p90", "p99", *STAGES,
              "x CLIP",
              "paper ms", "paper x CLIP"]
    body = []
    for r in rows:
        ms = r.ms or {}
        body.append([r.name, r.backend, r.precision, r.status, _fmt(r.size_mb or None, ".1f"), r.fidelity,
                     _fmt(ms.get("mean")), _fmt(ms.get("p50")), _fmt(ms.get("p90")), _fmt(ms.get("p99")),
                     *[_fmt(r.stages_ms.get(s)) if r.stages_ms else "-" for s in STAGES],
                     _fmt(r.vs_clip, ".2f"), _fmt(r.paper_ms), _fmt(r.paper_vs_clip, ".2f")])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(row) + " |" for row in body]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(row) for row in body]]


def method_lines(method: dict) -> list[str]:
    m = method["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return [
        f"{method['date']}; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB{gpu}; onnxruntime "
        f"{method['onnxruntime']}; backends {', '.join(method['backends'])}; threads: {method['threads']}",
        f"{method['backbone']}, weights {method['weights']}; {method['input']}; class {method['class']}; "
        f"{method['runs']} runs after {method['warmup']} warm-up",
        f"timing: {method['timing']}. {method['ratio']}. Paper: {method['paper']}.",
        f"fidelity: {method['fidelity']}; fp32 rows are the reference.",
        f"last block: {method['last_block']}",
        *([f"memory: {method['memory']['note']}"] if method.get("memory", {}).get("note") else []),
        "Stage columns are medians in ms; mean/p50/p90/p99 cover the whole call.",
    ]


def markdown(rows: list, method: dict) -> str:
    return "\n".join(["Produced by `anoclip bench`: " + method_lines(method)[0], "",
                      *[f"- {line}" for line in method_lines(method)[1:]], "", *table_lines(rows, True)]) + "\n"


def update_readme(path: Path, text: str) -> None:
    content = path.read_text()
    if README_START not in content or README_END not in content:
        raise AnoclipError(f"{path} has no `{README_START}` ... `{README_END}` block to replace")
    head, rest = content.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    atomic_write_bytes(path, (head + README_START + "\n" + text + README_END + tail).encode())


def memory_note(rows: list, sizes: tuple[int, ...], file_bytes: dict[int, int]) -> str:
    """The memory rows against the rows without memory, and the target at the default size."""
    from anoclip.runtime.memory import DEFAULT_MAX_PATCHES

    if not sizes:
        return ""
    parts = []
    verdicts = []
    for row in (r for r in rows if r.memory_rows):
        where = f"{row.backend} {row.precision} {row.memory_rows} rows"
        if row.vs_without_memory is None:
            parts.append(f"{where}: {row.status if row.status != 'ok' else 'not timed'}")
            continue
        parts.append(f"{where}: {row.vs_without_memory:.3f}x")
        if row.memory_rows == DEFAULT_MAX_PATCHES:
            verdicts.append(row.vs_without_memory <= MEMORY_TARGET)
    target = f"target <= {MEMORY_TARGET:.2f}x per image at the default {DEFAULT_MAX_PATCHES} rows"
    if DEFAULT_MAX_PATCHES not in sizes:
        verdict = f"{target}: not checked ({DEFAULT_MAX_PATCHES} rows not timed)"
    elif not verdicts:
        verdict = f"{target}: not checked (no {DEFAULT_MAX_PATCHES}-row memory row ran)"
    else:
        verdict = f"{target}: {'met' if all(verdicts) else 'NOT met'} ({sum(verdicts)} of {len(verdicts)} rows within it)"
    files = ", ".join(f"{n} rows {file_bytes[n]:,} bytes" for n in sizes)
    return (f"p50 with memory / p50 without, same backend and precision: {'; '.join(parts)}. {verdict}. "
            f"Memory file: {files}.")


def shortcut_note(rows: list) -> str:
    """Which rows take the last-block shortcut, and how to time the full last block beside them."""
    anoclip = [r.name for r in rows if r.name.startswith("AnoCLIP") and FULL not in r.name]
    if not anoclip:
        return "no row takes the last-block shortcut: every visual model computes all tokens in its last block, as Table 7 does"
    measured = "" if any(FULL in r.name for r in rows) else (
        " This run has no such row: pass --full-last-block DIR, or run python -m "
        "anoclip.benchmarks.latency.visual_latency, to measure it")
    return (f"{', '.join(dict.fromkeys(r.split(' (')[0].split(' + memory')[0] for r in anoclip))} rows use the last-block shortcut (the last "
            "block runs its query and MLP on the class token only: same outputs, less work); the authors' code timed "
            "in Table 7 runs the full last block, so these rows' x CLIP is below Table 7's. Rows marked 'full last "
            "block' compute every token (export with --qkv-tokens add; bench --full-last-block DIR)." + measured)
