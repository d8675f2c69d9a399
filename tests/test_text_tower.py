"""`anoclip-export --text-tower`: text.onnx equals open_clip's ``encode_text`` (tiny model and the
real ViT-B-16-plus-240 architecture, random weights), its vocabulary and recipe are named and
verified in the manifest, a later export keeps them while the text weights are unchanged and drops
them, with the command that remakes them, when they change."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_CONFIG

SENTENCES = ["a photo of a bottle", "a cropped industrial photo of the damaged carpet with flaw",
             "a close-up surface picture of a flawless leather", "x", "a photo of a screw for anomaly detection " * 3]


def _max_diff(onnx_path: Path, model, tokens) -> float:
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["text_embeds"], {"token_ids": tokens.numpy().astype(np.int64)})[0]
    with torch.no_grad():
        ref = model.encode_text(tokens).float().numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    return float(np.max(np.abs(got.astype(np.float64) - ref)))


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory, export_cli) -> Path:
    out = tmp_path_factory.mktemp("text") / "a"
    result = export_cli(["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--classes", "bottle,carpet",
                         "--text-tower", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "text text_embeds: max abs diff" in result.output
    return out


def test_tiny_text_model_equals_open_clip_encode_text(text_folder, tiny_model):
    from anoclip.runtime.prompts import PromptRecipe
    from anoclip.runtime.artifacts import load_artifacts, read_manifest, text_tower_files

    manifest = read_manifest(text_folder)
    artifacts = load_artifacts(text_folder)
    files = text_tower_files(text_folder, manifest, artifacts.prompts)
    assert files.context_length == 77
    normal, abnormal = PromptRecipe.for_class("bottle").sentences()
    for batch in (SENTENCES[:1], SENTENCES, normal[:40] + abnormal[-40:]):
        diff = _max_diff(files.model, tiny_model.model, tiny_model.tokenizer(batch))
        print(f"tiny text_embeds, batch {len(batch)}: max abs diff {diff:.3e}")
        assert diff <= 1e-5
    # the prompt weights were encoded by the same tower: t+ from the ONNX embeddings equals the baked one
    import onnxruntime

    session = onnxruntime.InferenceSession(str(files.model), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"token_ids": tiny_model.tokenizer(normal).numpy()})[0].astype(np.float64).mean(axis=0)
    baked = artifacts.prompts.get("bottle").text_features[0]
    assert np.max(np.abs(raw / np.linalg.norm(raw) - baked)) < 1e-5


def test_text_files_are_named_with_their_sha256_and_verify(text_folder):
    import hashlib

    import open_clip

    from anoclip.runtime.artifacts import TEXT_WEIGHTS_KEY, read_manifest
    from anoclip.runtime.prompt_weights import read_prompts
    from anoclip.runtime.vocabulary import file_kind

    manifest = read_manifest(text_folder)
    entry = manifest.models["text"]
    assert entry.inputs == {"token_ids": [-1, 77]} and entry.outputs == {"text_embeds": [-1, 32]}
    names = {"text": entry.file, "text_vocabulary": manifest.text_vocabulary, "text_recipe": manifest.text_recipe}
    for kind, name in names.items():
        sha = hashlib.sha256((text_folder / name).read_bytes()).hexdigest()
        assert manifest.files[name] == sha and sha[:12] in name and file_kind(name).name == kind
    assert entry.provenance[TEXT_WEIGHTS_KEY] == read_prompts(text_folder / manifest.prompts).metadata[TEXT_WEIGHTS_KEY]
    vocab = Path(open_clip.tokenizer.default_bpe()).read_bytes()
    assert (text_folder / manifest.text_vocabulary).read_bytes() == vocab
    assert gzip.decompress(vocab)[:20]
    recipe = json.loads((text_folder / manifest.text_recipe).read_text())
    assert recipe["tokenizer"]["context_length"] == 77 and recipe["tokenizer"]["kind"] == "open_clip.SimpleTokenizer"
    assert recipe["normal_states"][0] == "normal {}" and "ensemble" in recipe
    saved = json.loads((text_folder / "manifest.json").read_text())
    assert saved["text_vocabulary"] == manifest.text_vocabulary


def test_a_damaged_text_file_fails_verification_with_the_remake_line(text_folder, tmp_path):
    from conftest import copy_artifacts

    from anoclip.runtime.artifacts import read_manifest, text_tower_files
    from anoclip.runtime.errors import ArtifactError

    folder = copy_artifacts(text_folder, tmp_path / "a")
    manifest = read_manifest(folder)
    (folder / manifest.text_recipe).write_text("{}")
    with pytest.raises(ArtifactError, match="--text-tower"):
        text_tower_files(folder, manifest)


def test_a_manifest_without_text_leaves_the_fields_out(tiny_artifacts):
    saved = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert "text_vocabulary" not in saved and "text_recipe" not in saved and "text" not in saved["models"]


def test_later_exports_keep_the_text_tower_until_its_weights_change(text_folder, tmp_path, export_cli):
    from conftest import copy_artifacts

    from anoclip.runtime.artifacts import load_artifacts, read_manifest

    folder = copy_artifacts(text_folder, tmp_path / "a")
    before = read_manifest(folder)
    base = ["--model-config", str(TINY_CONFIG), "--pretrained", "none", "--out", str(folder)]
    result = export_cli(base + ["--text-tower"])  # the same command again: nothing to do
    assert result.exit_code == 0 and "up to date" in result.output, result.output
    assert read_manifest(folder) == before
    for args in (["--classes", "screw"], ["--vv-blocks", "1"]):  # prompts only; a new visual model
        result = export_cli(base + args)
        assert result.exit_code == 0, result.output
        after = read_manifest(folder)
        assert after.models["text"] == before.models["text"]
        assert (after.text_vocabulary, after.text_recipe) == (before.text_vocabulary, before.text_recipe)
        assert {before.models["text"].file, before.text_vocabulary, before.text_recipe} <= set(after.files)
        load_artifacts(folder, models=["visual", "text"])
    result = export_cli(base + ["--seed", "1", "--force"])
    assert result.exit_code == 0, result.output
    after = read_manifest(folder)
    assert "text" not in after.models and not after.text_vocabulary and not after.text_recipe
    lines = [line for line in result.output.splitlines() if "dropping text" in line]
    assert len(lines) == 1 and f"anoclip-export --text-tower --out {folder}" in lines[0], result.output
    assert {p.name for p in folder.iterdir()} - {"manifest.json"} == set(after.files)
    result = export_cli(base + ["--seed", "1", "--text-tower"])  # the remake line's command brings it back
    assert result.exit_code == 0, result.output
    assert read_manifest(folder).models["text"].provenance["text_weights_sha256"] != \
        before.models["text"].provenance["text_weights_sha256"]


def test_vit_b_16_plus_240_text_tower_equals_open_clip_encode_text(tmp_path):
    """The real architecture (random weights): the text tower alone is exported and checked."""
    torch = pytest.importorskip("torch")
    from anoclip.export.model import load_model
    from anoclip.runtime.prompts import PromptRecipe
    from anoclip.export.text_tower import TextTower, check_text_parity, export_text_onnx, token_ids

    torch.manual_seed(0)
    loaded = load_model("ViT-B-16-plus-240", "none")
    tower = TextTower(loaded.model).eval()
    assert tower.context_length == 77 and tower.embed_dim == 640
    t0 = time.perf_counter()
    entry = export_text_onnx(tower, tmp_path / "text.onnx")
    seconds = time.perf_counter() - t0
    size = (tmp_path / "text.onnx").stat().st_size
    normal, abnormal = PromptRecipe.for_class("carpet").sentences()
    sentences = SENTENCES + normal[::60] + abnormal[::60]
    report = check_text_parity(tower, tmp_path / "text.onnx", token_ids(loaded.tokenizer, sentences), batch=8)
    diff = _max_diff(tmp_path / "text.onnx", loaded.model, token_ids(loaded.tokenizer, SENTENCES[:2]))
    print(f"ViT-B-16-plus-240 text.onnx: exported in {seconds:.1f} s, {size / 2**20:.1f} MiB; "
          f"max abs diff {report.max_abs_diff['text_embeds']:.3e} over {len(sentences)} sentences, "
          f"{diff:.3e} at batch 2")
    assert entry.inputs == {"token_ids": [-1, 77]} and entry.outputs == {"text_embeds": [-1, 640]}
    assert report.ok and diff <= 1e-5
