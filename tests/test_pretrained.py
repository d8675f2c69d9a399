"""``--pretrained``: local checkpoints load strictly through open_clip's loader; tags download from
the source that holds the checkpoint the tag names."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from anoclip.runtime.errors import AnoclipError

from conftest import TINY_BACKBONE, TINY_CONFIG

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from anoclip.export.model import choose_source, load_model, register_model_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny_state() -> dict:
    """The state dict of a seeded tiny model (seed 1, unlike the suite's seed-0 fixture)."""
    register_model_config(TINY_CONFIG)
    torch.manual_seed(1)
    return {k: v.clone() for k, v in load_model(TINY_BACKBONE, "none").model.state_dict().items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_weights(model: torch.nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _without(state: dict, key: str) -> dict:
    assert key in state
    return {k: v for k, v in state.items() if k != key}


def test_full_pt_checkpoint_loads_identical_weights(tmp_path, tiny_state):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    loaded = load_model(TINY_BACKBONE, str(path))
    _assert_same_weights(loaded.model, tiny_state)
    assert loaded.checkpoint_sha256 == _sha256(path)
    assert loaded.pretrained == f"file:tiny.pt@{_sha256(path)[:12]}"
    assert not loaded.random_weights


def test_full_safetensors_checkpoint_loads_identical_weights(tmp_path, tiny_state):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(path))
    loaded = load_model(TINY_BACKBONE, str(path))
    _assert_same_weights(loaded.model, tiny_state)
    assert loaded.checkpoint_sha256 == _sha256(path)
    assert loaded.pretrained == f"file:tiny.safetensors@{_sha256(path)[:12]}"


def test_random_weights_have_no_checkpoint_sha256(tiny_state):
    loaded = load_model(TINY_BACKBONE, "none")
    assert loaded.checkpoint_sha256 == "" and loaded.pretrained == "none" and loaded.random_weights


@pytest.mark.parametrize("key", ["ln_final.weight", "text_projection", "positional_embedding"])
def test_checkpoint_missing_text_key_is_an_error_naming_it(tmp_path, tiny_state, key):
    path = tmp_path / "partial.pt"
    torch.save(_without(tiny_state, key), path)
    with pytest.raises(AnoclipError, match=rf"1 weights missing \(first: {key}\)") as info:
        load_model(TINY_BACKBONE, str(path))
    message = str(info.value)
    assert "\n" not in message and "--backbone" in message and "complete open_clip checkpoint" in message


def test_checkpoint_missing_visual_tower_counts_every_missing_key(tmp_path, tiny_state):
    path = tmp_path / "text-only.pt"
    text_only = {k: v for k, v in tiny_state.items() if not k.startswith("visual.")}
    torch.save(text_only, path)
    missing = len(tiny_state) - len(text_only)
    with pytest.raises(AnoclipError, match=rf"{missing} weights missing \(first: visual\.class_embedding\)"):
        load_model(TINY_BACKBONE, str(path))


def test_checkpoint_missing_key_through_cli_is_one_error_line(tmp_path, tiny_state):
    path = tmp_path / "partial.pt"
    torch.save(_without(tiny_state, "ln_final.weight"), path)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", "from anoclip.export.cli import main; main()", "--model-config", str(TINY_CONFIG),
         "--backbone", TINY_BACKBONE, "--pretrained", str(path), "--classes", "bottle", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "ln_final.weight" in errors[0] and "1 weights missing" in errors[0]
    assert not (out / "manifest.json").exists()


def test_checkpoint_with_unexpected_key_is_an_error_naming_it(tmp_path, tiny_state):
    path = tmp_path / "extra.pt"
    torch.save({**tiny_state, "visual.extra_head.weight": torch.zeros(3)}, path)
    with pytest.raises(AnoclipError, match=r"1 unexpected weights \(first: visual\.extra_head\.weight\)"):
        load_model(TINY_BACKBONE, str(path))


def test_checkpoint_with_wrong_shape_is_an_error(tmp_path, tiny_state):
    path = tmp_path / "wrong.pt"
    torch.save({**tiny_state, "ln_final.weight": torch.zeros(7)}, path)
    with pytest.raises(AnoclipError, match=r"does not fit anoclip-tiny-vit \(shape mismatch: .*ln_final\.weight"):
        load_model(TINY_BACKBONE, str(path))


def test_training_checkpoint_with_state_dict_wrapper_and_module_prefix_loads(tmp_path, tiny_state):
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, path)
    loaded = load_model(TINY_BACKBONE, str(path))
    _assert_same_weights(loaded.model, tiny_state)
    assert loaded.checkpoint_sha256 == _sha256(path)


def test_clip_layout_checkpoint_loads_into_custom_text_model(tmp_path, tiny_state):
    config = tmp_path / "anoclip-tiny-vit-custom-text.json"
    config.write_text(json.dumps({**json.loads(TINY_CONFIG.read_text()), "custom_text": True}))
    backbone = register_model_config(config)
    path = tmp_path / "tiny.pt"
    torch.save(tiny_state, path)
    loaded = load_model(backbone, str(path))
    assert type(loaded.model).__name__ == "CustomTextCLIP"
    converted = loaded.model.state_dict()
    assert torch.equal(converted["text.ln_final.weight"], tiny_state["ln_final.weight"])
    assert torch.equal(converted["text.positional_embedding"], tiny_state["positional_embedding"])
    assert torch.equal(converted["visual.proj"], tiny_state["visual.proj"])


def test_source_rule_picks_e32_url_for_vit_b_16_plus_240_laion400m_e32():
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e32")
    source = choose_source("ViT-B-16-plus-240", "laion400m_e32", cfg)
    assert source.kind == "url" and source.location == cfg["url"]
    assert Path(source.location).name == "vit_b_16_plus_240-laion400m_e32-699c4b84.pt"


def test_source_rule_keeps_hub_for_vit_b_32_laion2b_s34b_b79k():
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")
    assert choose_source("ViT-B-32", "laion2b_s34b_b79k", cfg) == ("hf_hub", cfg["hf_hub"])


def test_source_rule_keeps_hub_for_vit_b_16_plus_240_laion400m_e31():
    cfg = open_clip.get_pretrained_cfg("ViT-B-16-plus-240", "laion400m_e31")
    assert choose_source("ViT-B-16-plus-240", "laion400m_e31", cfg) == ("hf_hub", cfg["hf_hub"])


def test_source_rule_without_a_source_of_the_epoch_is_an_error():
    cfg = {"url": "https://example.org/tiny-laion_e31-0000.pt", "hf_hub": "org/tiny.laion_e31/"}
    with pytest.raises(AnoclipError, match="names no source that holds the e32 checkpoint"):
        choose_source("tiny", "laion_e32", cfg)


def test_tag_download_loads_from_url_not_mismatched_hub(tmp_path, tiny_state, monkeypatch):
    # open_clip checks the sha256 prefix in the file name of URLs under "mlfoundations"
    served = tmp_path / "mlfoundations"
    served.mkdir()
    staged = served / "staged.pt"
    torch.save(tiny_state, staged)
    digest = _sha256(staged)
    checkpoint = staged.rename(served / f"tiny-laion_e32-{digest[:8]}.pt")
    mean, std = (0.25, 0.5, 0.75), (0.1, 0.2, 0.3)
    entry = open_clip.pretrained._pcfg(url=checkpoint.as_uri(), hf_hub="nowhere/anoclip_tiny.laion_e31/",
                                       mean=mean, std=std)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_BACKBONE, {"laion_e32": entry})
    cache = tmp_path / "cache"

    loaded = load_model(TINY_BACKBONE, "laion_e32", cache_dir=str(cache))

    assert loaded.pretrained == "laion_e32" and not loaded.random_weights
    assert loaded.checkpoint_sha256 == digest
    assert (cache / checkpoint.name).is_file()
    _assert_same_weights(loaded.model, tiny_state)
    assert loaded.mean == mean and loaded.std == std
    assert loaded.model.visual.preprocess_cfg["size"] == loaded.model.visual.image_size


def test_tag_download_with_wrong_sha256_prefix_is_an_error(tmp_path, tiny_state, monkeypatch):
    served = tmp_path / "mlfoundations"
    served.mkdir()
    checkpoint = served / "tiny-laion_e32-00000000.pt"
    torch.save(tiny_state, checkpoint)
    entry = open_clip.pretrained._pcfg(url=checkpoint.as_uri(), hf_hub="nowhere/anoclip_tiny.laion_e31/")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_BACKBONE, {"laion_e32": entry})
    with pytest.raises(AnoclipError, match="SHA256 checksum"):
        load_model(TINY_BACKBONE, "laion_e32", cache_dir=str(tmp_path / "cache"))
