"""`anoclip eval --memory-shots`: the few-shot protocol on the tiny model and synthetic layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from anoclip.benchmarks import paper
from anoclip.benchmarks.accuracy.datasets import make_mvtec_like, make_visa_like
from anoclip.benchmarks.accuracy.fewshot import draw_shots, parse_int_list
from anoclip.benchmarks.accuracy.layouts import load_normal_train
from anoclip.runtime.cli import cli
from anoclip.runtime.errors import AnoclipError
from click.testing import CliRunner


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return make_mvtec_like(tmp_path_factory.mktemp("mvtec-fewshot"), ("carpet", "bottle"), n_good=4, n_defect=3,
                           size=64)


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory) -> Path:
    return make_visa_like(tmp_path_factory.mktemp("visa-fewshot"), ("bottle", "carpet"), n_normal=3, n_anomaly=3,
                          size=(96, 64))


@pytest.fixture(scope="module")
def folder(tiny_artifacts, tmp_path_factory) -> Path:
    from conftest import copy_artifacts

    return copy_artifacts(tiny_artifacts, tmp_path_factory.mktemp("fewshot") / "a")


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def fewshot(folder: Path, root: Path, out: Path, *args: str, dataset: str = "mvtec") -> dict:
    result = CliRunner().invoke(cli, ["eval", "--artifacts", str(folder), "--dataset", dataset, "--root", str(root),
                                      "--out", str(out), "--json", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def by_key(record: dict) -> dict:
    return {(r["class"], r["mode"], r["shots"], r["seed"]): r for r in record["rows"]}


def test_three_modes_per_shot_repeatable_seeds_and_the_folder_unchanged(folder, mvtec_root, tmp_path):
    manifest = (folder / "manifest.json").read_bytes()
    before = snapshot(folder)
    args = ("--memory-shots", "1", "--memory-shots", "2", "--memory-seeds", "0,1,2", "--memory-weight", "0.4")
    first = fewshot(folder, mvtec_root, tmp_path / "a", *args)
    assert snapshot(folder) == before and (folder / "manifest.json").read_bytes() == manifest
    assert json.loads((tmp_path / "a" / "fewshot.json").read_text()) == first

    rows = by_key(first)
    for cls in ("bottle", "carpet"):
        assert (cls, "zero_shot", 0, None) in rows
        for k in (1, 2):
            for seed in (0, 1, 2):
                for mode in ("memory_only", "combined"):
                    row = rows[(cls, mode, k, seed)]
                    assert row["memory"]["frames"] == k and len(row["memory"]["normal"]) == k
                    assert 0.0 <= row["metrics"]["pixel_auroc"] <= 1.0
                    assert row["metrics"]["aupro_03"] is not None and row["metrics"]["image_auroc"] is not None
                assert rows[(cls, "combined", k, seed)]["weight"] == 0.4
    summary = {(s["mode"], s["shots"]): s for s in first["summary"]}
    assert set(summary) == {("zero_shot", 0), ("memory_only", 1), ("combined", 1), ("memory_only", 2),
                            ("combined", 2)}
    assert summary[("combined", 2)]["mean"]["pixel_auroc"]["n"] == 3  # over the three seeds
    assert summary[("combined", 2)]["mean"]["pixel_auroc"]["std"] is not None
    # every test image ran the visual model once; the shots once per distinct image
    drawn = {(r["class"], name) for r in first["rows"] if "memory" in r for name in r["memory"]["normal"]}
    assert first["model_inputs"] == first["test_images"] + len(drawn)  # 64x64 frames: one tile each

    again = fewshot(folder, mvtec_root, tmp_path / "b", *args)
    assert [r["metrics"] for r in again["rows"]] == [r["metrics"] for r in first["rows"]]
    assert [r.get("memory", {}).get("normal") for r in again["rows"]] == [
        r.get("memory", {}).get("normal") for r in first["rows"]]

    # seeds whose draws differ give other memories, hence other maps
    differ = [(cls, k, a, b) for cls in ("bottle", "carpet") for k in (1, 2) for a, b in ((0, 1), (0, 2), (1, 2))
              if rows[(cls, "memory_only", k, a)]["memory"]["normal"] != rows[(cls, "memory_only", k, b)]["memory"]["normal"]]
    assert differ
    assert any(rows[(cls, "memory_only", k, a)]["metrics"] != rows[(cls, "memory_only", k, b)]["metrics"]
               for cls, k, a, b in differ)
    assert snapshot(folder) == before and (folder / "manifest.json").read_bytes() == manifest


def test_table_shows_the_modes_and_the_published_references(folder, mvtec_root, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--artifacts", str(folder), "--dataset", "mvtec", "--root",
                                      str(mvtec_root), "--out", str(tmp_path), "--memory-shots", "1,2",
                                      "--memory-seeds", "3", "--classes", "bottle"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("zero-shot", "memory only", "combined (w=0.5)", "mean (1)", "not measured here", "WinCLIP+",
                 "93.1", "95.2", "Jeong et al., WinCLIP, CVPR 2023", "AnoCLIP (paper)", "92.5", "86.6"):
        assert text in out, text
    record = json.loads((tmp_path / "fewshot.json").read_text())
    refs = {(r["method"], r["shots"]): (r["image_auroc"], r["pixel_auroc"]) for r in record["references"]}
    assert refs[("WinCLIP+", 4)] == (95.2, 96.2) and refs[("WinCLIP", 0)] == (91.8, 85.1)
    assert refs[("AnoCLIP (paper)", 0)] == (paper.DETECTION["mvtec"]["AnoCLIP"][0],
                                            paper.LOCALISATION["mvtec"]["AnoCLIP"][0])


def test_visa_layout_draws_from_its_train_normal_rows(folder, visa_root, tmp_path):
    train = load_normal_train(visa_root, "visa", "bottle")
    assert len(train) == 3 and all("Normal" in p.parts for p in train)
    record = fewshot(folder, visa_root, tmp_path, "--memory-shots", "2", "--memory-seeds", "0", dataset="visa")
    for row in (r for r in record["rows"] if "memory" in r):
        assert all(name in {p.relative_to(visa_root).as_posix() for p in
                            load_normal_train(visa_root, "visa", row["class"])} for name in row["memory"]["normal"])
        assert row["memory"]["patches"] > 2 * 9  # tiled frames: more than one tile's tokens per shot
    drawn = {(r["class"], name) for r in record["rows"] if "memory" in r for name in r["memory"]["normal"]}
    assert record["model_inputs"] == 2 * (record["test_images"] + len(drawn))  # two tiles per frame, each run once
    refs = {(r["method"], r["shots"]): (r["image_auroc"], r["pixel_auroc"]) for r in record["references"]}
    assert refs[("WinCLIP+", 1)] == (83.8, 96.4) and refs[("WinCLIP", 0)] == (78.1, 79.6)


def test_draws_are_repeatable_and_nested():
    images = [Path(f"{i}.png") for i in range(10)]
    assert draw_shots(images, 4, 7) == draw_shots(images, 4, 7)
    assert draw_shots(images, 8, 7)[:4] == draw_shots(images, 4, 7)
    assert draw_shots(images, 4, 7) != draw_shots(images, 4, 8)
    with pytest.raises(AnoclipError, match="only 10 normal training images"):
        draw_shots(images, 11, 0)
    assert parse_int_list(("1,4", "8", "4"), "--memory-shots", 1) == [1, 4, 8]
    with pytest.raises(AnoclipError, match="--memory-shots must be >= 1"):
        parse_int_list("0", "--memory-shots", 1)


@pytest.mark.parametrize("args, message", [
    (("--memory-shots", "9"), "only 4 normal training images"),
    (("--memory-shots", "1", "--tta"), "drop --tta"),
    (("--memory-shots", "1", "--image-views", "22"), "drop --image-views"),
    (("--memory-shots", "x"), "whole numbers"),
])
def test_few_shot_errors_are_one_line_before_any_scoring(args, message, folder, mvtec_root, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--artifacts", str(folder), "--dataset", "mvtec", "--root",
                                      str(mvtec_root), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code != 0
    assert message in (result.output + str(result.exception))
    assert not (tmp_path / "o" / "fewshot.json").exists()
