"""Synthetic MVTec AD / VisA sets, their loaders, mask reading and the clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from anoclip.benchmarks.accuracy import datasets as D
from anoclip.benchmarks.accuracy import synthetic as S
from anoclip.runtime.preprocess import read_image


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return D.make_mvtec_like(tmp_path_factory.mktemp("mvtec"), classes=("carpet", "bottle"),
                             n_good=2, n_defect=4, size=64, seed=3)


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return D.make_visa_like(tmp_path_factory.mktemp("visa"), classes=("candle", "pcb1"),
                            n_normal=2, n_anomaly=3, size=(96, 64), seed=3)


def test_mvtec_like_layout_loads(mvtec_root: Path) -> None:
    assert D.list_classes(mvtec_root, "mvtec") == ["bottle", "carpet"]
    assert len(list((mvtec_root / "carpet" / "train" / "good").glob("*.png"))) == 2
    samples = D.load_mvtec(mvtec_root, "carpet")
    assert [s.label for s in samples] == [0, 0, 1, 1, 1, 1]
    assert samples[0].defect == "good" and samples[0].mask_path is None
    assert {s.defect for s in samples if s.label} == {"scratch", "spot", "hole"}
    for s in samples:
        assert s.cls == "carpet" and s.image_path.is_file()
        assert read_image(s.image_path).shape == (64, 64, 3)
        if s.label:
            assert s.mask_path is not None and s.mask_path.name == f"{s.image_path.stem}_mask.png"
            raw = cv2.imread(str(s.mask_path), cv2.IMREAD_GRAYSCALE)
            assert set(np.unique(raw)) == {0, 255}
            assert D.read_mask(s.mask_path).any()
            assert D.read_mask(s.mask_path, 32).shape == (32, 32)
        else:
            assert not D.read_mask(s.mask_path, 64).any()


def test_synthetic_sets_are_deterministic(tmp_path: Path) -> None:
    a = D.make_mvtec_like(tmp_path / "a", classes=("wood",), n_good=1, n_defect=1, size=48)
    b = D.make_mvtec_like(tmp_path / "b", classes=("wood",), n_good=1, n_defect=1, size=48)
    c = D.make_mvtec_like(tmp_path / "c", classes=("wood",), n_good=1, n_defect=1, size=48, seed=1)
    rel = Path("wood/test/scratch/000.png")
    assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (a / rel).read_bytes() != (c / rel).read_bytes()


@pytest.mark.parametrize("cls", ["tile", "bottle", "pcb1", "candle"])
def test_defect_mask_is_where_the_image_changed(cls: str) -> None:
    for i, kind in enumerate(D.DEFECT_KINDS):
        clean, image, mask = S._synth_sample(cls, 0, "test", i, 96, 128, kind)
        assert mask is not None and set(np.unique(mask)) == {0, 255}
        changed = (clean != image).any(axis=-1)
        inside = mask > 0
        assert not (changed & ~inside).any()  # nothing changes outside the mask
        assert changed[inside].mean() > 0.5  # and most of the mask is visibly changed
        assert 0 < inside.mean() < 0.2


def test_visa_like_layout_loads(visa_root: Path) -> None:
    assert D.list_classes(visa_root, "visa") == ["candle", "pcb1"]
    with (visa_root / "split_csv" / "1cls.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    assert {r["split"] for r in rows} == {"train", "test"}
    assert all(r["mask"] == "" for r in rows if r["label"] == "normal")
    samples = D.load_visa(visa_root, "pcb1")
    assert [s.label for s in samples] == [0, 0, 1, 1, 1]  # test split only
    for s in samples:
        assert s.image_path.suffix == ".JPG"
        assert read_image(s.image_path).shape == (64, 96, 3)
        mask = D.read_mask(s.mask_path, (96, 64))
        assert mask.shape == (64, 96)
        assert mask.any() == bool(s.label)
        assert s.defect == ("anomaly" if s.label else "normal")


def test_read_mask_any_nonzero_is_anomalous(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:12] = 1  # VisA masks are not 0/255
    path = tmp_path / "m.png"
    cv2.imwrite(str(path), mask)
    np.testing.assert_array_equal(D.read_mask(path), mask > 0)
    assert D.read_mask(path, (30, 20)).sum() == 35
    with pytest.raises(ValueError, match="needs a size"):
        D.read_mask(None)
    assert D.read_mask(None, (7, 5)).shape == (5, 7)


@pytest.mark.parametrize("src,dst", [((700, 700), (240, 240)), ((1500, 1000), (360, 240)),
                                     ((50, 40), (240, 240)), ((300, 200), (240, 240)),
                                     ((17, 5), (3, 9))])
def test_read_mask_matches_the_pillow_pipeline(tmp_path: Path, src: tuple[int, int],
                                               dst: tuple[int, int]) -> None:
    """Binarise, 0/255, Pillow BILINEAR resize, / 255, > 0.5: the authors' mask path."""
    image_mod = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    w, h = src
    canvas = np.zeros((h, w), np.uint8)
    for _ in range(6):
        center = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.integers(1, max(2, w // 4))), int(rng.integers(1, max(2, h // 4))))
        cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 7, -1)
    canvas[rng.random((h, w)) < 0.02] = 3  # speckles: many pixels near the 0.5 cut
    path = tmp_path / "mask.png"
    cv2.imwrite(str(path), canvas)
    pil = image_mod.fromarray(np.where(canvas > 0, 255, 0).astype(np.uint8), "L")
    ref = np.asarray(pil.resize(dst, image_mod.BILINEAR)).astype(np.float32) / 255.0 > 0.5
    np.testing.assert_array_equal(D.read_mask(path, dst), ref)


def test_missing_root_and_class_errors(mvtec_root: Path, visa_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_mvtec(tmp_path / "nope", "bottle")
    with pytest.raises(FileNotFoundError, match="classes found: bottle, carpet"):
        D.load_mvtec(mvtec_root, "cable")
    with pytest.raises(ValueError, match="classes: candle, pcb1"):
        D.load_visa(visa_root, "cable")
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        D.load_visa(mvtec_root, "bottle")
    with pytest.raises(ValueError, match="unknown dataset"):
        D.list_classes(mvtec_root, "coco")


def test_missing_mask_error(tmp_path: Path) -> None:
    root = D.make_mvtec_like(tmp_path, classes=("grid",), n_good=1, n_defect=1, size=32)
    (root / "grid" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="000_mask.png"):
        D.load_mvtec(root, "grid")


def _write_csv(root: Path, text: str) -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text(text)


def test_malformed_csv_errors(tmp_path: Path) -> None:
    _write_csv(tmp_path, "object,split,image,mask\ncandle,test,a.JPG,\n")
    with pytest.raises(ValueError, match="missing column"):
        D.load_visa(tmp_path, "candle")
    _write_csv(tmp_path, "object,split,label,image,mask\ncandle,test,bad,a.JPG,\n")
    with pytest.raises(ValueError, match="line 2"):
        D.load_visa(tmp_path, "candle")
    _write_csv(tmp_path, "object,split,label,image,mask\ncandle,test,anomaly,a.JPG,\n")
    with pytest.raises(ValueError, match="without a mask"):
        D.load_visa(tmp_path, "candle")
    _write_csv(tmp_path, "object,split,label,image,mask\ncandle,test,normal,a.JPG,\n")
    with pytest.raises(FileNotFoundError, match="a.JPG"):
        D.load_visa(tmp_path, "candle")


def test_cli_make(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "visa"
    result = runner.invoke(D.main, ["make", "--layout", "visa", "--out", str(out), "--classes",
                                    "fryum", "--n-normal", "1", "--n-anomalous", "1", "--size",
                                    "80x60"])
    assert result.exit_code == 0, result.output
    assert "fryum" in result.output
    assert read_image(D.load_visa(out, "fryum")[0].image_path).shape == (60, 80, 3)
    bad = runner.invoke(D.main, ["make", "--layout", "mvtec", "--out", str(tmp_path / "m"),
                                 "--size", "big"])
    assert bad.exit_code == 2 and "--size" in bad.output


def _clip_frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame.astype(np.int16))


def test_clip_shows_the_defect_from_its_frame(tmp_path: Path) -> None:
    out = tmp_path / "line.avi"
    result = CliRunner().invoke(D.main, ["clip", "--out", str(out), "--frames", "12", "--defect-from", "8",
                                         "--size", "96x64"])
    assert result.exit_code == 0, result.output
    assert "from frame 8" in result.output
    clean = S.make_clip(tmp_path / "clean.avi", frames=12, defect_from=None, size=(96, 64))
    frames, reference = _clip_frames(out), _clip_frames(clean)
    assert len(frames) == len(reference) == 12 and frames[0].shape == (64, 96, 3)
    changed = [int(np.abs(a - b).max() > 60) for a, b in zip(frames, reference)]
    assert changed == [0] * 8 + [1] * 4
    bad = CliRunner().invoke(D.main, ["clip", "--out", str(tmp_path / "line.gif")])
    assert bad.exit_code != 0 and "write the clip as one of" in bad.output


def test_clips_with_other_variation_seeds_share_no_frame(tmp_path: Path) -> None:
    """A normal clip to calibrate on and a clip to inspect: the same part, no frame in common."""
    def clip(name, *args):
        result = CliRunner().invoke(D.main, ["clip", "--out", str(tmp_path / name), "--frames", "10", "--size",
                                             "96x64", *args])
        assert result.exit_code == 0, result.output
        return result.output, _clip_frames(tmp_path / name)

    said, normal = clip("normal.avi", "--no-defect", "--variation-seed", "1")
    assert "in no frame" in said
    _, again = clip("again.avi", "--no-defect", "--variation-seed", "1")
    _, other = clip("other.avi", "--defect-from", "99", "--variation-seed", "2")
    assert all(np.array_equal(a, b) for a, b in zip(normal, again))  # the same seeds write the same clip
    assert min(float(np.abs(a - b).mean()) for a, b in zip(normal, other)) > 1.0  # no frame shared
    assert max(float(np.abs(a - b).mean()) for a, b in zip(normal, other)) < 10.0  # the same part
