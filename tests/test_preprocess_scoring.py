"""Preprocessing against PIL/torchvision, scoring against PyTorch, tiling."""

from __future__ import annotations

import numpy as np
import pytest

from anoclip.runtime import preprocess, scoring

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("shape", [(97, 131), (900, 900), (37, 500), (1080, 1920)])
def test_preprocess_matches_torchvision_at_many_sizes(shape):
    pytest.importorskip("torchvision")
    from torch_reference import torchvision_preprocess

    image = np.random.default_rng(shape[0]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    batch, _ = preprocess.preprocess(image, (240, 240), MEAN, STD, tiling="never")
    assert np.max(np.abs(batch - torchvision_preprocess(image, 240, MEAN, STD).numpy())) <= 1e-6


def test_preprocess_matches_torchvision(rgb_image):
    pytest.importorskip("torchvision")
    from torch_reference import torchvision_preprocess

    batch, layout = preprocess.preprocess(rgb_image, (240, 240), MEAN, STD, tiling="never")
    ref = torchvision_preprocess(rgb_image, 240, MEAN, STD).numpy()
    assert batch.shape == ref.shape == (1, 3, 240, 240) and batch.dtype == np.float32
    assert np.max(np.abs(batch - ref)) <= 1e-6
    assert layout.offsets == ((0, 0),)


def test_grey_and_rgba_inputs():
    grey = np.full((10, 12), 128, np.uint8)
    assert preprocess.as_rgb_uint8(grey).shape == (10, 12, 3)
    rgba = np.zeros((10, 12, 4), np.uint8)
    assert preprocess.as_rgb_uint8(rgba).shape == (10, 12, 3)


def test_scoring_matches_torch():
    torch = pytest.importorskip("torch")
    from torch_reference import torch_abnormal_probability, torch_anomaly_map

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 225, 64)).astype(np.float32) * 5
    text = rng.normal(size=(2, 64)).astype(np.float32)
    ours = scoring.anomaly_map(tokens, text, (15, 15), (240, 240))
    ref = torch_anomaly_map(torch.from_numpy(tokens), torch.from_numpy(text), (15, 15), (240, 240)).numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-6
    probs = scoring.abnormal_probability(tokens, text)
    ref_probs = torch_abnormal_probability(torch.from_numpy(tokens), torch.from_numpy(text)).numpy()
    assert np.max(np.abs(probs - ref_probs)) <= 1e-6
    # non-square grid and output
    ours = scoring.anomaly_map(tokens[:, :224], text, (14, 16), (100, 333))
    ref = torch_anomaly_map(torch.from_numpy(tokens[:, :224]), torch.from_numpy(text), (14, 16), (100, 333)).numpy()
    assert np.max(np.abs(ours - ref)) <= 1e-6


def test_probability_of_zero_tokens_is_one_half():
    assert np.allclose(scoring.abnormal_probability(np.zeros((3, 8), np.float32), np.eye(2, 8)), 0.5)


def test_tiling_covers_wide_and_tall_frames():
    layout = preprocess.tile_layout(240, 600, (240, 240), "auto")
    assert layout.resized == (240, 600) and len(layout.offsets) == 3
    assert layout.offsets[0] == (0, 0) and layout.offsets[-1] == (0, 360)
    tall = preprocess.tile_layout(500, 200, (240, 240), "always")
    assert tall.resized == (600, 240) and [o[1] for o in tall.offsets] == [0, 0, 0]
    assert preprocess.tile_layout(240, 260, (240, 240), "auto").offsets == ((0, 0),)
    assert len(preprocess.tile_layout(240, 260, (240, 240), "always").offsets) == 2


def test_merge_tiles_averages_overlaps():
    layout = preprocess.tile_layout(240, 400, (240, 240), "always")
    maps = np.stack([np.full((240, 240), 1.0, np.float32), np.full((240, 240), 3.0, np.float32)])
    merged = preprocess.merge_tiles(maps, layout)
    assert merged.shape == (240, 400)
    assert merged[0, 0] == 1.0 and merged[0, 399] == 3.0 and merged[0, 200] == 2.0


def test_overlay_blends_the_heat_map():
    from anoclip.runtime.overlay import colourise, overlay

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    amap = rng.random((20, 25)).astype(np.float32)  # resized to the image
    assert np.array_equal(overlay(image, amap, alpha=0.0), image)
    full = overlay(image, np.ones((40, 50), np.float32) * np.linspace(0, 1, 50, dtype=np.float32), alpha=1.0)
    assert tuple(full[0, 0]) == (0, 0, 128) and tuple(full[0, -1]) == (128, 0, 0)  # jet: dark blue .. dark red
    assert colourise(np.zeros((3, 3), np.float32)).shape == (3, 3, 3)
