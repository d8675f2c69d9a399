"""Defect types: a class's type embeddings in the prompt weights (checked on reading, absent in
older files), each region named after the type closest to its mean patch token (single tile and
tiled frames), in the record and on the overlay; nothing of it for a class without types."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import artifact_file
from fakes import defect_frame, red_defect_detector

from anoclip.runtime.errors import ArtifactError
from anoclip.runtime.overlay import draw_regions
from anoclip.runtime.prompt_weights import ClassPrompts, PromptBank, read_prompts, write_prompts
from anoclip.runtime.records import make_record

NAMES = ("scratch", "dent", "stain")
RECORD_SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "record.schema.json").read_text())


def orthogonal_types(backend, count: int = len(NAMES)) -> np.ndarray:
    """``count`` unit vectors orthogonal to each other and to the fake backend's scoring direction
    and fixed component: adding one to the defect's tokens names its type and leaves scores as they
    were (but for the tokens' norm)."""
    basis = [backend.abnormal.astype(np.float64), backend.side.astype(np.float64)]
    rng = np.random.default_rng(1)
    rows = []
    while len(rows) < count:
        v = rng.standard_normal(basis[0].shape)
        for b in basis + rows:
            v -= (v @ b) / (b @ b) * b
        rows.append(v / np.linalg.norm(v))
    return np.stack(rows).astype(np.float32)


@pytest.fixture
def typed(tiny_artifacts, tmp_path):
    """A red-defect detector whose class bottle has the types NAMES; the defect's tokens point towards 'dent'."""
    folder = Path(shutil.copytree(tiny_artifacts, tmp_path / "a"))

    def make(**options):
        detector = red_defect_detector(folder, "bottle", **options)
        types = orthogonal_types(detector.backend)
        bottle = detector.artifacts.prompts.classes["bottle"]
        detector.artifacts.prompts.classes["bottle"] = dataclasses.replace(bottle, defect_types=NAMES,
                                                                         type_features=types)
        detector.backend.type_token = types[1]
        return detector

    return make


def pixel_threshold(detector, frame, cls="bottle") -> float:
    """Between the map under the square and elsewhere."""
    amap = detector.predict(frame, cls).anomaly_map_full
    return float((amap.max() + np.median(amap)) / 2)


def test_regions_are_named_after_the_closest_type(typed):
    detector = typed()
    frame = defect_frame(0, (96, 96), box=(40, 32, 28, 28))[:, :, ::-1]
    detector.threshold_override = (0.5, pixel_threshold(detector, frame))
    result = detector.predict(frame, "bottle")
    assert result.regions, "the square should make a region"
    top = result.regions[0]
    assert top["type"] == "dent" and 0.0 < top["type_similarity"] <= 1.0, top
    record = make_record(result, "frame.png")
    jsonschema.Draft202012Validator(RECORD_SCHEMA).validate(json.loads(json.dumps(record)))
    assert record["regions"][0]["type"] == "dent"
    assert record["regions"][0]["type_similarity"] == pytest.approx(top["type_similarity"], abs=1e-6)
    # the token of a type closest to 'stain' names it 'stain'
    detector.backend.type_token = detector.artifacts.prompts.classes["bottle"].type_features[2]
    assert detector.predict(frame, "bottle").regions[0]["type"] == "stain"


def test_tiled_frames_are_typed_through_the_tile_layout(typed):
    detector = typed()
    frame = defect_frame(0, (96, 256), box=(180, 30, 30, 30))[:, :, ::-1]  # aspect 2.7: tiles
    detector.threshold_override = (0.5, pixel_threshold(detector, frame))
    result = detector.predict(frame, "bottle")
    assert result.tiles > 1 and result.regions
    x, y, w, h = result.regions[0]["box"]
    assert x <= 195 <= x + w and y <= 45 <= y + h  # the region is the square's
    assert result.regions[0]["type"] == "dent"


def test_a_class_without_types_has_no_type_fields(typed):
    detector = typed()
    frame = defect_frame(0, (96, 96), box=(40, 32, 28, 28))[:, :, ::-1]
    detector.threshold_override = (0.5, pixel_threshold(detector, frame, "carpet"))
    result = detector.predict(frame, "carpet")
    assert result.regions and all(set(r) == {"box", "area"} for r in result.regions)
    assert all(set(r) == {"box", "area"} for r in make_record(result, "f")["regions"])


def test_the_overlay_writes_the_type_next_to_the_region(typed):
    detector = typed()
    frame = defect_frame(0, (192, 192), box=(80, 80, 60, 60))[:, :, ::-1]
    detector.threshold_override = (0.5, pixel_threshold(detector, frame))
    result = detector.predict(frame, "bottle")
    image = np.ascontiguousarray(frame)
    pixel = result.threshold.pixel
    plain = draw_regions(image, result.anomaly_map_full, pixel)
    labelled = draw_regions(image, result.anomaly_map_full, pixel, regions=result.regions)
    changed = np.argwhere(np.any(plain != labelled, axis=2))
    assert len(changed) > 20, "the label should be drawn"
    x, y, _, _ = result.regions[0]["box"]
    assert changed[:, 0].max() < y and changed[:, 1].min() >= x - 1  # just above the box, from its left edge
    # the same regions of an image at half the size: the label follows the box
    half = np.ascontiguousarray(image[::2, ::2])
    small = draw_regions(half, result.anomaly_map_full, pixel, regions=result.regions,
                         regions_size=result.anomaly_map_full.shape)
    moved = np.argwhere(np.any(small != draw_regions(half, result.anomaly_map_full, pixel), axis=2))
    assert len(moved) and moved[:, 0].max() < y / 2 and moved[:, 1].min() >= x / 2 - 1
    # untyped regions: nothing but the outlines
    untyped = [{"box": r["box"], "area": r["area"]} for r in result.regions]
    assert np.array_equal(draw_regions(image, result.anomaly_map_full, pixel, regions=untyped), plain)


def test_type_embeddings_round_trip_and_are_checked(tmp_path, tiny_artifacts):
    bank = read_prompts(artifact_file(tiny_artifacts))
    assert all(c.defect_types == () and c.type_features is None for c in bank.classes.values())  # older files
    bottle = bank.classes["bottle"]
    rng = np.random.default_rng(0)
    types = rng.standard_normal((2, bank.embed_dim))
    types = (types / np.linalg.norm(types, axis=1, keepdims=True)).astype(np.float32)
    bank.classes["bottle"] = dataclasses.replace(bottle, defect_types=("scratch", "dent"), type_features=types)
    path = tmp_path / "p.safetensors"
    write_prompts(path, bank)
    again = read_prompts(path)
    assert again.classes["bottle"].defect_types == ("scratch", "dent")
    assert np.array_equal(again.classes["bottle"].type_features, types)
    assert again.classes["bottle"].recipe["defect_types"] == ["scratch", "dent"]
    assert again.classes["carpet"].type_features is None
    for bad, said in ((dataclasses.replace(bottle, defect_types=("scratch",), type_features=types), "2 rows"),
                      (dataclasses.replace(bottle, defect_types=("a", "b"), type_features=2 * types), "unit"),
                      (dataclasses.replace(bottle, defect_types=("a", "b"), type_features=types[:, :8]), "shape"),
                      (dataclasses.replace(bottle, defect_types=("a", "a"), type_features=types), "names")):
        with pytest.raises(ArtifactError, match=said):
            write_prompts(tmp_path / "bad.safetensors", PromptBank({"bottle": bad}, bank.backbone, bank.pretrained,
                                                                   bank.embed_dim))
    # a file whose tensor lost its names (or the reverse) is refused on reading
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    recipes = json.loads(metadata["classes"])
    recipes["bottle"].pop("defect_types")
    save_file(tensors, str(tmp_path / "nameless.safetensors"), metadata={**metadata, "classes": json.dumps(recipes)})
    with pytest.raises(ArtifactError, match="defect_types/bottle"):
        read_prompts(tmp_path / "nameless.safetensors")
    tensors.pop("defect_types/bottle")
    save_file(tensors, str(tmp_path / "typeless.safetensors"), metadata=metadata)
    with pytest.raises(ArtifactError, match="defect_types/bottle"):
        read_prompts(tmp_path / "typeless.safetensors")
    assert isinstance(again.classes["bottle"], ClassPrompts)
