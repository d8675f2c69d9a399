"""`anoclip bench` on the tiny artifacts: one table of every backend x precision, rows that cannot
run here skipped with the reason, fidelity from the stored parity figures, ratios measured, outputs
written, and a row that fails makes the command fail after the table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from anoclip.benchmarks.latency.bench import backend_unavailable, fidelity
from anoclip.benchmarks.latency.bench_report import README_END, README_START, method_lines
from anoclip.runtime.cli import cli
from anoclip.runtime.vocabulary import DEPLOYMENTS, remake_command

METHOD_ROWS = {"CLIP (QKV patch tokens)", "AnoCLIP", "AnoCLIP+ (TTA numpy)", "AnoCLIP+ (TTA onnx)"}


def test_bench_rows_json_markdown_and_readme(tiny_artifacts, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold table\n{README_END}\n\ntail\n")
    md = tmp_path / "bench.md"
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--warmup", "1",
                                      "--image-size", "64", "--backends", "cpu", "--json", "--markdown", str(md),
                                      "--readme", str(readme)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    rows = {r["name"]: r for r in data["rows"]}
    assert {name for name, r in rows.items() if r["status"] == "ok"} == METHOD_ROWS | {"AnoCLIP + memory (4096 rows)"}
    assert rows["AnoCLIP (int8)"]["status"] == (
        f"skipped: no visual_int8 (make it with `{remake_command('visual_int8', tiny_artifacts)}`)")
    assert rows["AnoCLIP (fp16)"]["status"] == (
        f"skipped: no visual_fp16 (make it with `anoclip calibrate fp16 --artifacts {tiny_artifacts}`)")
    assert rows["AnoCLIP (fused graph)"]["status"] == (
        f"skipped: no fused (make it with `anoclip fuse --artifacts {tiny_artifacts}`)")
    for name in METHOD_ROWS:
        row = rows[name]
        assert row["ms"]["p50"] > 0 and row["vs_clip"] > 0 and row["size_mb"] > 0
        assert row["fidelity"] == ("-" if name.startswith("CLIP") else "reference")
        assert set(row["stages_ms"]) == {"preprocess", "model", "scoring", "tta", "postprocess"}
    assert rows["CLIP (QKV patch tokens)"]["vs_clip"] == 1.0
    assert rows["AnoCLIP+ (TTA numpy)"]["stages_ms"]["tta"] > 0 and rows["AnoCLIP"]["stages_ms"]["tta"] == 0
    assert rows["AnoCLIP"]["paper_ms"] == 7.6
    assert data["method"]["runs"] == 3 and data["method"]["machine"]["cores"] >= 1
    text = readme.read_text()
    assert "old table" not in text and "| AnoCLIP |" in text and text.endswith("tail\n")
    assert md.read_text() in text


def test_bench_reports_rows_that_were_not_exported(tmp_path, export_cli):
    from conftest import TINY_CONFIG

    folder = tmp_path / "a"
    assert export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                       "--out", str(folder)]).exit_code == 0
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(folder), "--runs", "3", "--warmup", "0",
                                      "--image-size", "32", "--backends", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"skipped: no visual_qkv (make it with `anoclip-export --qkv-tokens model --out {folder}`)" in result.output
    assert f"skipped: no tta (make it with `anoclip-export --tta --out {folder}`)" in result.output


def test_bench_unknown_backend_is_refused(tiny_artifacts):
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--backends", "quantum"])
    assert result.exit_code != 0 and "unknown backend 'quantum'" in str(result.exception)


def _store_fp16_stand_in(folder, data: bytes | None = None, parity: dict | None = None) -> None:
    """A visual_fp16 entry committed through the folder's transaction: a copy of the fp32 model (or
    ``data``) with parity figures in its provenance, as `anoclip calibrate fp16` stores them."""
    import dataclasses

    from anoclip.runtime.artifacts import read_manifest
    from anoclip.runtime.folder import store_derived_model

    manifest = read_manifest(folder)
    visual = manifest.models["visual"]
    staged = folder.parent / "staged.onnx"
    staged.write_bytes(data if data is not None else (folder / visual.file).read_bytes())
    entry = dataclasses.replace(visual, file="", precision="fp16", source_sha256=manifest.files[visual.file],
                                provenance={"parity": parity or {}})
    store_derived_model(folder, "visual_fp16", staged, entry, "anoclip calibrate fp16")


def test_bench_is_one_table_of_every_backend_and_precision(tiny_artifacts, tmp_path):
    from conftest import copy_artifacts

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    parity = {"patch_cos_min": 0.99871, "map_r_min": 0.99512, "score_max_abs_diff": 0.0004, "patch_cos_mean": 0.9995}
    _store_fp16_stand_in(folder, parity=parity)
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(folder), "--runs", "3", "--warmup", "0",
                                      "--image-size", "32", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    table = {(r["backend"], r["precision"], r["name"]): r for r in rows}
    labels = {"cpu": "onnxruntime CPU", "cuda": "onnxruntime CUDA", "tensorrt": "onnxruntime TensorRT",
              "openvino": "OpenVINO CPU", "tensorrt-native": "TensorRT (native)"}
    for d in DEPLOYMENTS:  # every backend x precision of the vocabulary has its row
        row = next(r for (backend, precision, name), r in table.items()
                   if backend == labels[d.backend] and precision == d.precision and name.startswith(d.row[:-1]))
        why = backend_unavailable(d.backend)
        if why:
            assert row["status"] == f"skipped: {why}" and not row["ms"] and row["fidelity"] == "-"
    fp16 = table[("onnxruntime CPU", "fp16", "AnoCLIP (fp16)")]
    assert fp16["status"] == "ok" and fp16["ms"]["p50"] > 0
    assert fp16["fidelity"] == "patch cos min 0.9987, map r min 0.9951, score diff 0.0004"
    assert table[("onnxruntime CPU", "fp32", "AnoCLIP")]["fidelity"] == "reference"
    if backend_unavailable("tensorrt-native"):
        assert any("TensorRT" in r["status"] or "GPU" in r["status"] for r in rows if r["backend"] == "TensorRT (native)")

    text = CliRunner().invoke(cli, ["bench", "--artifacts", str(folder), "--runs", "3", "--warmup", "0",
                                    "--image-size", "32", "--backends", "cpu,tensorrt-native"])
    assert text.exit_code == 0, text.output
    assert "fidelity vs fp32" in text.output and "patch cos min 0.9987" in text.output


def test_bench_row_that_fails_fails_the_command_after_the_table(tiny_artifacts, tmp_path):
    from conftest import copy_artifacts

    folder = copy_artifacts(tiny_artifacts, tmp_path / "a")
    _store_fp16_stand_in(folder, data=b"not an onnx model")
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(folder), "--runs", "3", "--warmup", "0",
                                      "--image-size", "32", "--backends", "cpu"])
    assert result.exit_code == 1
    line = next(line for line in result.output.splitlines() if line.startswith("AnoCLIP (fp16)"))
    assert "failed:" in line
    assert "AnoCLIP+ (TTA onnx)" in result.output  # the table was printed in full
    assert result.output.rstrip().endswith("1 row(s) failed: AnoCLIP (fp16) on onnxruntime CPU")


def test_fidelity_reads_model_and_engine_parity_figures():
    assert fidelity({"patch_cos_min": 0.5, "map_r_min": 0.25, "score_max_abs_diff": 0.01}) == (
        "patch cos min 0.5000, map r min 0.2500, score diff 0.01")
    assert fidelity({"patch_embeds_min_cosine": 0.999, "patch_embeds_max_abs": 0.0125, "image_embeds_max_abs": 1}) == (
        "patch cos min 0.9990, max abs diff 0.013")
    assert fidelity({}) == "not measured" and fidelity({"not_measured": "no GPU"}) == "not measured: no GPU"


def test_bench_discloses_the_shortcut_and_adds_a_full_last_block_row(tiny_artifacts, tmp_path, export_cli):
    from conftest import TINY_CONFIG

    full = tmp_path / "full"
    assert export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle",
                       "--qkv-tokens", "add", "--out", str(full)]).exit_code == 0
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--full-last-block", str(full),
                                      "--runs", "3", "--warmup", "0", "--image-size", "32", "--backends", "cpu",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output[result.output.index("{"):])
    rows = {r["name"]: r for r in data["rows"]}
    assert rows["AnoCLIP (full last block)"]["status"] == "ok" and rows["AnoCLIP (full last block)"]["vs_clip"] > 0
    assert rows["AnoCLIP (full last block)"]["paper_ms"] == 7.6
    assert "AnoCLIP, AnoCLIP+ rows use the last-block shortcut" in data["method"]["last_block"]
    assert any(line.startswith("last block: ") for line in method_lines(data["method"]))

    alone = CliRunner().invoke(cli, ["bench", "--artifacts", str(full), "--runs", "3", "--warmup", "0",
                                     "--image-size", "32", "--backends", "cpu", "--json"])
    assert alone.exit_code == 0, alone.output
    data = json.loads(alone.output[alone.output.index("{"):])
    names = {r["name"] for r in data["rows"]}
    assert {"CLIP (QKV patch tokens)", "AnoCLIP (full last block)", "AnoCLIP+ (TTA numpy, full last block)",
            "AnoCLIP+ (TTA onnx, full last block)"} <= names
    assert all(name.endswith("full last block)") for name in names if name.startswith("AnoCLIP"))
    assert data["method"]["last_block"].startswith("no row takes the last-block shortcut")


def test_bench_refuses_a_shortcut_folder_as_full_last_block(tiny_artifacts):
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--full-last-block",
                                      str(tiny_artifacts), "--runs", "3", "--backends", "cpu"])
    assert result.exit_code != 0 and "--qkv-tokens add" in str(result.exception)


def test_paper_figures_have_one_home():
    from anoclip.benchmarks import paper
    from anoclip.benchmarks.accuracy import report, results
    from anoclip.benchmarks.latency import bench, visual_latency
    from anoclip.benchmarks.latency.tta_latency import PAPER_NOTE

    assert all(module.paper is paper for module in (report, results, bench, visual_latency))

    assert paper.LATENCY_MS["AnoCLIP"] == 7.6 and round(paper.anoclip_over_clip(), 3) == 1.226
    assert paper.LOCALISATION["mvtec"]["AnoCLIP"] == (86.6, 30.1, 70.4)
    assert paper.DETECTION["visa"]["AnoCLIP"] == (79.2, 79.7, 81.7)
    assert "20.1 ms" in PAPER_NOTE and "12.5 ms" in PAPER_NOTE


def test_visual_latency_eager_vv_matches_the_exported_tokens_and_every_row_runs(tiny_artifacts):
    pytest.importorskip("torch")
    from conftest import TINY_CONFIG

    from anoclip.benchmarks.latency.visual_latency import ROWS, report_lines, run_visual_latency

    result = run_visual_latency(str(tiny_artifacts), "unused", str(TINY_CONFIG), runs=3, warmup=1, threads=1,
                                measure_rss=False)
    assert result["note"] is None
    diffs = result["vv_max_abs_diff"]
    assert set(diffs) == {"V-V tokens vs VVVisual (PyTorch)", "V-V tokens vs ONNX AnoCLIP, last-block shortcut",
                          "V-V tokens vs ONNX AnoCLIP, full last block", "image token vs encode_image"}
    assert max(diffs.values()) < 1e-4, diffs
    assert set(result["median_ms"]) == set(ROWS) and min(result["median_ms"].values()) > 0
    assert set(result["ratios"]) == {"ORT AnoCLIP, last-block shortcut / ORT CLIP",
                                     "ORT AnoCLIP, full last block / ORT CLIP", "eager AnoCLIP / eager CLIP",
                                     "eager AnoCLIP / ORT AnoCLIP, last-block shortcut",
                                     "eager AnoCLIP / ORT AnoCLIP, full last block"}
    text = "\n".join(report_lines(result))
    assert all(row in text for row in ROWS) and "max abs diff" in text


def test_module_entry_points_run_under_their_new_paths(tmp_path):
    import subprocess
    import sys

    for module in ("accuracy.datasets", "latency.visual_latency", "latency.tta_latency", "latency.metrics_timing"):
        proc = subprocess.run([sys.executable, "-m", f"anoclip.benchmarks.{module}", "--help"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "Usage" in proc.stdout, (module, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "anoclip.benchmarks.accuracy.datasets", "make", "--layout", "mvtec",
                           "--out", str(tmp_path / "m"), "--classes", "bottle", "--size", "32", "--n-normal", "1",
                           "--n-anomalous", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "m" / "bottle" / "ground_truth").is_dir(), proc.stderr


def test_bench_memory_rows_time_anoclip_with_a_memory_beside_without(tiny_artifacts):
    from anoclip.benchmarks.latency.bench import bench_memory
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.memory import DEFAULT_MAX_PATCHES, memory_bytes

    before = {p.name: p.stat().st_mtime_ns for p in tiny_artifacts.iterdir()}
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--warmup", "0",
                                      "--image-size", "32", "--backends", "cpu", "--memory-patches", "64,256",
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["name"]: r for r in data["rows"]}
    artifacts = load_artifacts(tiny_artifacts, verify=False)
    for size in (64, 256):
        row = rows[f"AnoCLIP + memory ({size} rows)"]
        assert row["status"] == "ok" and row["precision"] == "fp32" and row["ms"]["p50"] > 0
        assert row["memory_rows"] == size
        assert row["memory_bytes"] == len(memory_bytes(bench_memory(artifacts, "bottle", size)))
        assert row["vs_without_memory"] == pytest.approx(row["ms"]["p50"] / rows["AnoCLIP"]["ms"]["p50"])
        assert row["size_mb"] == pytest.approx(rows["AnoCLIP"]["size_mb"] + row["memory_bytes"] / 1e6)
        int8 = rows[f"AnoCLIP (int8) + memory ({size} rows)"]
        assert int8["status"].startswith("skipped: no visual_int8") and not int8["ms"]
    assert rows["AnoCLIP"]["memory_rows"] is None
    names = [r["name"] for r in data["rows"]]
    assert names.index("AnoCLIP + memory (64 rows)") == names.index("AnoCLIP") + 1
    note = data["method"]["memory"]["note"]
    assert f"not checked ({DEFAULT_MAX_PATCHES} rows not timed)" in note and "64 rows" in note
    assert data["method"]["memory"]["file_bytes"]["256"] == rows["AnoCLIP + memory (256 rows)"]["memory_bytes"]
    assert {p.name: p.stat().st_mtime_ns for p in tiny_artifacts.iterdir()} == before  # nothing written

    text = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--warmup", "0",
                                    "--image-size", "32", "--backends", "cpu"])  # the default size
    assert text.exit_code == 0, text.output
    line = next(line for line in text.output.splitlines() if line.startswith("memory: "))
    assert f"target <= 1.10x per image at the default {DEFAULT_MAX_PATCHES} rows: " in line
    assert ": met (" in line or ": NOT met (" in line
    assert f"AnoCLIP + memory ({DEFAULT_MAX_PATCHES} rows)" in text.output
    header = next(line for line in text.output.splitlines() if line.startswith("row "))
    assert header.split() == ["row", "backend", "prec", "status", "MB", "fidelity", "vs", "fp32", "mean", "p50",
                              "p90", "p99", "preprocess", "model", "scoring", "tta", "postprocess", "x", "CLIP",
                              "paper", "ms", "paper", "x", "CLIP"]

    none = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--runs", "3", "--warmup", "0",
                                    "--image-size", "32", "--backends", "cpu", "--memory-patches", "none", "--json"])
    assert not any("memory" in r["name"] for r in json.loads(none.stdout)["rows"])
    bad = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--memory-patches", "4k"])
    assert bad.exit_code != 0 and "--memory-patches 4k" in (bad.output + str(bad.exception))
