"""The text tower as an ONNX graph (token ids -> raw ``encode_text`` embeddings), the tokenizer's
vocabulary file and the prompt recipe, so that a device can encode classes of its own.

The graph computes exactly open_clip's ``model.encode_text(tokens)`` (unnormalised): token and
position embeddings, the causal transformer, the final LayerNorm, the features at the
end-of-text token (the largest id of each row) and the text projection.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anoclip.runtime.artifacts import ModelEntry
from anoclip.runtime.errors import AnoclipError

from anoclip.runtime.prompts import (ABNORMAL_STATES, BASE_TEMPLATES, CLASS_PHRASES, DOMAINS, NORMAL_STATES,
                                     PromptRecipe, domain_templates)

from .onnx_export import DEFAULT_OPSET, ParityReport, trace_to_onnx

log = logging.getLogger(__name__)

TEXT = "text"  # the manifest model of the text tower
TEXT_FILE = "text.onnx"  # text.<sha12>.onnx
VOCAB_FILE = "vocab.txt.gz"  # vocab.<sha12>.txt.gz
RECIPE_FILE = "text_recipe.json"  # text_recipe.<sha12>.json
RECIPE_FORMAT = 1
# float32 ONNX Runtime vs PyTorch on the same weights and tokens: summation order only.
TEXT_ATOL = 1e-5


class TextTower(torch.nn.Module):
    """token_ids [B, L] int64 -> text_embeds [B, D]: open_clip's ``encode_text`` of the model."""

    output_names = ["text_embeds"]

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "encode_text")
        missing = [name for name in needed if getattr(model, name, None) is None]
        if missing:
            raise AnoclipError(f"--text-tower: this model's text tower is not open_clip's CLIP text transformer "
                               f"(it lacks {', '.join(missing)}); export without --text-tower")
        self.model = model
        self.context_length = int(model.positional_embedding.shape[0])
        projection = model.text_projection
        self.embed_dim = int(projection.out_features if isinstance(projection, torch.nn.Linear)
                             else projection.shape[1]) if projection is not None else int(model.ln_final.weight.shape[0])

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(token_ids)


def export_text_onnx(tower: TextTower, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                     provenance: dict | None = None) -> ModelEntry:
    """Trace ``tower`` with a dynamic batch to ``path`` (written atomically); its manifest entry."""
    dummy = torch.zeros(2, tower.context_length, dtype=torch.int64)
    dummy[:, 0], dummy[:, 1] = 49406, 49407
    dynamic_shapes = {"token_ids": {0: torch.export.Dim("batch", min=1, max=4096)}}
    path = Path(path)
    trace_to_onnx(tower, (dummy,), path, ["token_ids"], tower.output_names, opset, dynamic_shapes, True)
    return ModelEntry(file=path.name, inputs={"token_ids": [-1, tower.context_length]},
                      outputs={"text_embeds": [-1, tower.embed_dim]}, patch_tokens="", vv_blocks=None, opset=opset,
                      provenance=dict(provenance or {}))


def check_text_parity(tower: TextTower, onnx_path: str | os.PathLike, tokens: torch.Tensor, *,
                      atol: float = TEXT_ATOL, batch: int = 64) -> ParityReport:
    """ONNX Runtime (CPU) vs ``model.encode_text`` on ``tokens`` [N, L], in batches."""
    import onnxruntime

    from anoclip.runtime.fidelity import agreement

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, cosine = 0.0, 1.0
    for start in range(0, len(tokens), batch):
        part = tokens[start : start + batch]
        with torch.no_grad():
            reference = tower(part).float().numpy()
        got = session.run(["text_embeds"], {"token_ids": part.numpy().astype(np.int64)})[0]
        one = agreement(reference, got, "text_embeds")
        worst, cosine = max(worst, one.max_abs), min(cosine, float(np.min(one.cosines)))
    return ParityReport({"text_embeds": worst}, {"text_embeds": cosine}, atol)


@dataclass(frozen=True)
class Tokenizer:
    """What a device needs to tokenize like the export: the vocabulary file and its settings."""

    kind: str
    vocabulary: Path
    context_length: int
    clean: str
    sot_token: int
    eot_token: int


def tokenizer_of(tokenizer: object, context_length: int) -> Tokenizer:
    """The vocabulary file and settings of open_clip's SimpleTokenizer (the BPE of OpenAI CLIP)."""
    from open_clip import tokenizer as oc_tokenizer

    if not isinstance(tokenizer, oc_tokenizer.SimpleTokenizer):
        raise AnoclipError(f"--text-tower: the model's tokenizer is {type(tokenizer).__name__}, not open_clip's "
                           "SimpleTokenizer; only BPE-vocabulary models can be exported with --text-tower")
    path = Path(getattr(tokenizer, "bpe_path", None) or oc_tokenizer.default_bpe())
    if not path.is_file():
        raise AnoclipError(f"--text-tower: the tokenizer's vocabulary {path} is missing; reinstall open_clip_torch")
    if getattr(tokenizer, "reduction_fn", None) is not None:
        raise AnoclipError("--text-tower: the model's tokenizer reduces long texts with a mask; only the plain "
                           "SimpleTokenizer can be exported with --text-tower")
    clean = {"_clean_lower": "lower", "_clean_whitespace": "whitespace", "_clean_canonicalize": "canonicalize"}.get(
        getattr(getattr(tokenizer, "clean_fn", None), "__name__", ""), "unknown")
    return Tokenizer("open_clip.SimpleTokenizer", path, int(context_length), clean,
                     int(tokenizer.sot_token_id), int(tokenizer.eot_token_id))


def recipe_json(tok: Tokenizer) -> bytes:
    """The prompt recipe of the export (class-independent): templates, state words, domains, how
    sentences are made and combined, and the tokenizer settings."""
    example = PromptRecipe.for_class("bottle")
    record = {
        "format": RECIPE_FORMAT,
        "tokenizer": {"kind": tok.kind, "context_length": tok.context_length, "clean": tok.clean,
                      "sot_token": tok.sot_token, "eot_token": tok.eot_token,
                      "vocabulary": "the manifest's text_vocabulary (gzip BPE merges of open_clip)"},
        "base_templates": list(BASE_TEMPLATES),
        "domains": {name: list(phrases) for name, phrases in DOMAINS.items()},
        "class_phrases": dict(CLASS_PHRASES),
        "normal_states": list(NORMAL_STATES),
        "abnormal_states": list(ABNORMAL_STATES),
        "templates": "each base template with the word 'photo' replaced by each domain phrase, phrase-major "
                     "('a' before the phrase becomes 'an' before a vowel)",
        "sentence": "template.format(state.format(class_phrase)), template-major, states in order, no period",
        "ensemble": {
            "text_features": "t+ = l2_normalise(mean of the raw text_embeds of the normal sentences), "
                             "t- = the same over the abnormal sentences",
            "prompt_features": "T = l2_normalise(each raw text_embeds row), normal sentences then abnormal",
        },
        "sentences_per_state": len(domain_templates(example.domain_phrases)) * len(NORMAL_STATES),
    }
    return (json.dumps(record, indent=2) + "\n").encode()


def token_ids(tokenizer: object, sentences: list[str]) -> torch.Tensor:
    """open_clip's tokens of ``sentences`` ([N, L] int64)."""
    return tokenizer(sentences).to(torch.int64)
