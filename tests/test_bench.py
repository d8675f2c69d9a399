"""`anoclip bench` on the tiny artifacts: every row runs, ratios are measured, outputs are written."""

from __future__ import annotations

import json

from click.testing import CliRunner

from anoclip.benchmarks.bench import README_END, README_START
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
