"""Creating the open_clip model: backbone names, pretrained tags, local checkpoints, random weights."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from anoclip.runtime.cli import quiet_loggers
from anoclip.runtime.errors import AnoclipError

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "ViT-B-16-plus-240"
DEFAULT_PRETRAINED = {DEFAULT_BACKBONE: "laion400m_e32"}
RANDOM = "none"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    backbone: str
    pretrained: str  # tag, "file:<name>@<sha256 prefix>" for a local checkpoint, or "none"
    random_weights: bool
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    _short_context_checked: bool | None = None

    @torch.no_grad()
    def encode_text(self, sentences: list[str]) -> np.ndarray:
        """Raw (unnormalised) ``encode_text`` embeddings of ``sentences``.

        With a causal text tower pooled at the end-of-text token, tokens after the longest
        sentence's end cannot change any output, so the batch runs on a context cut to that length.
        The first call checks this against the full-context ``encode_text`` and falls back to it
        when the two disagree (towers that do not fit that description).
        """
        tokens = self.tokenizer(sentences)
        if self._short_context_checked is None:
            full = self.model.encode_text(tokens[:8])
            short = _short_context_encode(self.model, tokens[:8])
            self._short_context_checked = short is not None and bool(torch.allclose(short, full, atol=1e-5, rtol=1e-4))
            log.debug("short-context text encoding %s", "on" if self._short_context_checked else "off")
        out = _short_context_encode(self.model, tokens) if self._short_context_checked else None
        if out is None:
            out = self.model.encode_text(tokens)
        return out.float().cpu().numpy()


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip JSON model config; its file stem becomes the backbone name."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise AnoclipError(f"model config {path} does not exist; pass an open_clip JSON model config file")
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AnoclipError(f"model config {path} is not valid JSON ({exc})") from exc
    open_clip.add_model_config(path)
    return path.stem


def _check_backbone(backbone: str) -> None:
    import open_clip

    names = open_clip.list_models()
    if backbone not in names:
        vits = [n for n in names if n.startswith("ViT-")][:12]
        raise AnoclipError(
            f"unknown backbone '{backbone}'; use an open_clip model name such as {', '.join(vits)} "
            "(`python -c \"import open_clip; print(open_clip.list_models())\"` lists all)"
        )


def resolve_pretrained(backbone: str, pretrained: str | None) -> str:
    """Default tag for the backbone when none is given."""
    import open_clip

    _check_backbone(backbone)
    if pretrained:
        return pretrained
    if backbone in DEFAULT_PRETRAINED:
        return DEFAULT_PRETRAINED[backbone]
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if not tags:
        raise AnoclipError(f"backbone '{backbone}' has no pretrained weights in open_clip; pass --pretrained FILE or none")
    return tags[0]


def _is_offline_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    needles = ("connection", "offline", "resolve", "network", "timed out", "timeout", "urlopen",
               "max retries", "name or service", "localentrynotfound", "cannot find the requested files")
    return any(n in text for n in needles)


def load_model(backbone: str = DEFAULT_BACKBONE, pretrained: str | None = None, cache_dir: str | None = None) -> LoadedModel:
    """Create the open_clip model in eval mode on the CPU.

    ``pretrained``: an open_clip tag (downloaded through open_clip), a local checkpoint file
    (``.pt``/``.pth``/``.bin`` state dict or ``.safetensors``, read without unpickling arbitrary
    objects), or ``none`` for random weights.
    """
    import open_clip

    _check_backbone(backbone)
    pretrained = resolve_pretrained(backbone, pretrained)
    random_weights = pretrained.lower() == RANDOM
    # open_clip reports on the root logger and the hub client logs each retry; what matters is
    # said once, below, by the error or the random-weights warning.
    with quiet_loggers("", "huggingface_hub", level=logging.CRITICAL):
        model = _create(backbone, pretrained, random_weights, cache_dir)
    label = RANDOM if random_weights else (
        f"file:{Path(pretrained).name}@{_sha256(pretrained)[:12]}" if os.path.isfile(pretrained) else pretrained)
    if random_weights:
        log.warning("RANDOM WEIGHTS (--pretrained none): %s is initialised at random; maps and scores carry no "
                    "meaning, use this only to test the pipeline", backbone)
    model.eval()
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in (cfg.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in (cfg.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    tokenizer = open_clip.get_tokenizer(backbone)
    return LoadedModel(model, backbone, label, random_weights, tokenizer, mean, std)


def _sha256(path: str) -> str:
    from anoclip.runtime.artifacts import sha256_file

    return sha256_file(path)


def _create(backbone: str, pretrained: str, random_weights: bool, cache_dir: str | None) -> torch.nn.Module:
    import open_clip

    try:
        if random_weights:
            model = open_clip.create_model(backbone, pretrained=None)
        elif os.path.isfile(pretrained):
            model = open_clip.create_model(backbone, pretrained=None)
            _load_checkpoint(model, pretrained)
        else:
            tags = open_clip.list_pretrained_tags_by_model(backbone)
            if pretrained not in tags:
                looks_like_path = any(ch in pretrained for ch in "/\\.")
                what = "no such checkpoint file" if looks_like_path else "not a pretrained tag of this backbone"
                raise AnoclipError(
                    f"--pretrained '{pretrained}': {what}; tags for {backbone}: {', '.join(tags) or 'none'}; "
                    "or pass a local checkpoint file, or `none` for random weights"
                )
            model = open_clip.create_model(backbone, pretrained=pretrained, cache_dir=cache_dir)
    except AnoclipError:
        raise
    except Exception as exc:
        if _is_offline_error(exc):
            raise AnoclipError(
                f"cannot download the '{pretrained}' weights of {backbone} (no network?); download them where "
                "there is a network and pass the file with --pretrained /path/to/checkpoint, or run the pipeline on "
                "random weights with --pretrained none"
            ) from exc
        raise AnoclipError(f"cannot create {backbone} with weights '{pretrained}': {exc}") from exc
    return model


def _load_checkpoint(model: torch.nn.Module, path: str) -> None:
    import open_clip

    try:
        state = open_clip.load_state_dict(path, weights_only=True) if hasattr(open_clip, "load_state_dict") \
            else open_clip.factory.load_state_dict(path, weights_only=True)
    except Exception as exc:
        raise AnoclipError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    try:
        incompatible = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise AnoclipError(
            f"checkpoint {path} does not fit the backbone (shape mismatch: {str(exc).splitlines()[-1].strip()}); "
            "pass the --backbone it was trained with"
        ) from exc
    missing = [k for k in incompatible.missing_keys if k.startswith(("visual.", "token_embedding", "transformer."))]
    if missing:
        raise AnoclipError(
            f"checkpoint {path} lacks {len(missing)} weights of the backbone (first: {missing[0]}); "
            "pass the --backbone it was trained with"
        )


def _short_context_encode(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
    """``encode_text`` on the context cut after the last end-of-text token; None where it does not apply."""
    needed = ("token_embedding", "positional_embedding", "transformer", "attn_mask", "ln_final", "text_projection")
    if not all(getattr(model, name, None) is not None for name in needed):
        return None
    if getattr(model, "text_pool_type", None) != "argmax":
        return None
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    projection = model.text_projection
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
