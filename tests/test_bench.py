"""`anoclip bench` on the tiny artifacts: every row runs, ratios are measured, outputs are written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from anoclip.benchmarks.latency.bench import README_END, README_START, method_lines
from anoclip.runtime.cli import cli


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
    assert set(rows) == {"CLIP (QKV patch tokens)", "AnoCLIP", "AnoCLIP+ (TTA numpy)", "AnoCLIP+ (TTA onnx)"}
    for row in rows.values():
        assert row["status"] == "ok" and row["ms"]["p50"] > 0 and row["vs_clip"] > 0
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
    assert "not exported (anoclip-export --qkv-tokens model)" in result.output
    assert "not exported (anoclip-export --tta)" in result.output


def test_bench_unknown_backend_is_refused(tiny_artifacts):
    result = CliRunner().invoke(cli, ["bench", "--artifacts", str(tiny_artifacts), "--backends", "quantum"])
    assert result.exit_code != 0 and "unknown backend 'quantum'" in str(result.exception)


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
    assert {r["name"] for r in data["rows"]} == {"CLIP (QKV patch tokens)", "AnoCLIP (full last block)",
                                                 "AnoCLIP+ (TTA numpy, full last block)",
                                                 "AnoCLIP+ (TTA onnx, full last block)"}
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
