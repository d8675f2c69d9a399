"""Prompt sentences in SPEC order, and the baked embeddings against the text tower."""

from __future__ import annotations

import numpy as np
import pytest

from anoclip.runtime.prompts import (
    ABNORMAL_STATES, BASE_TEMPLATES, NORMAL_STATES, PromptRecipe, class_embeddings, domain_template,
)
from anoclip.runtime.prompt_weights import read_prompts

from conftest import artifact_file


def test_object_class_sentences_in_spec_order():
    normal, abnormal = PromptRecipe.for_class("bottle").sentences()
    assert len(normal) == len(abnormal) == 462 == 66 * 7
    assert normal[0] == "a cropped industrial photo of the normal bottle"
    assert normal[1] == "a cropped industrial photo of the flawless bottle"
    assert normal[6] == "a cropped industrial photo of the bottle without damage"
    assert abnormal[7] == "a cropped industrial photo of a damaged bottle"
    # template 13 of the first phrase: "a photo of a {}" -> "an industrial photo of a {}"
    assert normal[12 * 7] == "an industrial photo of a normal bottle"
    # second phrase starts at template 22, third at 44
    assert normal[22 * 7] == "a cropped industrial image of the normal bottle"
    assert normal[44 * 7 + 12 * 7 + 4] == "a manufacturing image of a bottle without flaw"
    assert abnormal[-1] == "a manufacturing image of a bottle with damage for anomaly detection"
    assert not any(s.endswith(".") for s in normal + abnormal)


def test_texture_class_uses_texture_phrases():
    recipe = PromptRecipe.for_class("carpet")
    assert recipe.domain == "texture"
    normal, abnormal = recipe.sentences()
    assert len(normal) == len(abnormal) == 462
    assert normal[22 * 7 + 12 * 7] == "a textural photo of a normal carpet"
    assert normal[44 * 7 + 12 * 7] == "a surface picture of a normal carpet"
    assert abnormal[44 * 7 + 13 * 7 + 1] == "a surface picture of the abnormal carpet"


def test_template_major_order():
    normal, _ = PromptRecipe.for_class("screw").sentences()
    first = domain_template(BASE_TEMPLATES[0], "industrial photo")
    assert normal[:7] == [first.format(s.format("screw")) for s in NORMAL_STATES]


def test_class_phrases_and_custom_domains():
    assert PromptRecipe.for_class("macaroni1").phrase == "macaroni"
    assert PromptRecipe.for_class("metal_nut").phrase == "metal_nut"
    custom = PromptRecipe.for_class("weld", "x-ray image|ultrasound scan")
    assert custom.domain == "custom" and len(custom.sentences()[0]) == 44 * 7
    assert custom.sentences()[0][12 * 7] == "a x-ray image of a normal weld"  # the rule looks at the letter
    assert custom.sentences()[0][22 * 7 + 12 * 7] == "an ultrasound scan of a normal weld"
    assert PromptRecipe.for_class("tile", "object").domain_phrases[1] == "industrial image"


def test_article_only_changes_before_the_phrase():
    assert domain_template("a photo of a {}", "industrial photo") == "an industrial photo of a {}"
    assert domain_template("a cropped photo of a {}", "industrial photo") == "a cropped industrial photo of a {}"
    assert domain_template("a photo of a {}", "surface picture") == "a surface picture of a {}"


def test_class_embeddings_are_normalised_means():
    rng = np.random.default_rng(0)
    raw_n, raw_a = rng.normal(size=(462, 16)) * 3, rng.normal(size=(462, 16)) + 1
    text, prompts = class_embeddings(raw_n, raw_a)
    mean_n = raw_n.mean(0)
    np.testing.assert_allclose(text[0], mean_n / np.linalg.norm(mean_n), atol=1e-6)
    assert not np.allclose(text[0], (raw_n / np.linalg.norm(raw_n, axis=1, keepdims=True)).mean(0), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(prompts, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(prompts[462], raw_a[0] / np.linalg.norm(raw_a[0]), atol=1e-6)


@pytest.mark.parametrize("cls", ["bottle", "carpet"])
def test_baked_embeddings_match_text_tower(tiny_artifacts, tiny_model, cls):
    bank = read_prompts(artifact_file(tiny_artifacts))
    baked = bank.get(cls)
    normal, abnormal = PromptRecipe.for_class(cls).sentences()
    raw_n = tiny_model.encode_text(normal).astype(np.float64)
    raw_a = tiny_model.encode_text(abnormal).astype(np.float64)
    for row, raw in zip(baked.text_features, (raw_n, raw_a)):
        mean = raw.mean(0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)
    expected_t = np.concatenate([raw_n, raw_a])
    expected_t /= np.linalg.norm(expected_t, axis=1, keepdims=True)
    assert baked.prompt_features.shape == (924, 32)
    np.testing.assert_allclose(baked.prompt_features, expected_t, atol=1e-5)
    assert baked.recipe["domain"] == ("texture" if cls == "carpet" else "object")
    assert baked.recipe["normal_states"] == list(NORMAL_STATES)
    assert baked.recipe["abnormal_states"] == list(ABNORMAL_STATES)
    assert bank.metadata["backbone"] == "anoclip-tiny-vit" and bank.metadata["pretrained"] == "none"
    assert "open_clip_version" in bank.metadata


def test_short_context_text_encoding_equals_encode_text(tiny_model):
    torch = pytest.importorskip("torch")
    from anoclip.export.model import _short_context_encode

    normal, abnormal = PromptRecipe.for_class("metal_nut").sentences()
    tokens = tiny_model.tokenizer(normal[:20] + abnormal[-20:])
    with torch.no_grad():
        full = tiny_model.model.encode_text(tokens)
        short = _short_context_encode(tiny_model.model, tokens)
    assert short is not None
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-6)
    assert np.allclose(tiny_model.encode_text(normal[:20]), full[:20].numpy(), atol=1e-6)
