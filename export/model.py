"""Creating the open_clip model: backbone names, pretrained tags, local checkpoints, random weights."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.integrity import sha256_file
from anoclip.runtime.plumbing import quiet_loggers

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
    checkpoint_sha256: str = ""  # sha256 hex of the checkpoint file loaded ("" for random weights)

    _short_context_checked: bool | None = None
    _weights_sha256: dict | None = None

    @torch.no_grad()
    def weights_sha256(self, tower: str) -> str:
        """sha256 over the names, dtypes, shapes and values of one tower's weights: ``visual``, or
        ``text`` (every weight outside the visual tower). Tells two sets of weights apart where
        their labels cannot (two seeds of random weights, a checkpoint changed in place)."""
        import hashlib

        if self._weights_sha256 is None:
            self._weights_sha256 = {}
        if tower not in self._weights_sha256:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                if name.startswith("visual.") != (tower == "visual"):
                    continue
                array = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
                digest.update(array.view(torch.uint8).numpy().tobytes())
            self._weights_sha256[tower] = digest.hexdigest()
        return self._weights_sha256[tower]

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


@dataclass(frozen=True)
class Outliers:
    """A stress variant of random weights: ``channels`` residual-stream channels of the visual tower
    carry activations about ``scale`` times the others, as trained CLIP towers do (|x| in the
    hundreds in a few channels). Random weights lack them, and so flatter reduced precision: int8
    calibrated on them looks better than it will on real weights. For testing only."""

    channels: int
    scale: float
    seed: int = 0

    def label(self) -> str:
        """The pretrained tag of the stress weights; it says they are random."""
        return f"{RANDOM}+outliers-k{self.channels}-s{self.scale:g}"


@torch.no_grad()
def add_outlier_channels(loaded: LoadedModel, outliers: Outliers) -> tuple[list[int], float]:
    """Turn ``loaded`` (random weights) into the stress variant, in place; (the channels, the largest
    |x| of the residual stream measured on a forward pass of a random image).

    ln_pre's gain is multiplied by ``scale`` on the chosen channels (the stream starts with them
    large), and in every block the MLP's output bias adds ``scale`` on them (they stay large, with
    a constant sign, like the massive activations of trained CLIP towers). The standard and V-V
    streams both carry them; the LayerNorms in front of each matrix product then give
    their outputs a few outlier channels that a per-tensor int8 scale must cover.
    """
    if not loaded.random_weights:
        raise AnoclipError("--outlier-channels makes a stress variant of random weights; use it with --pretrained none")
    visual = loaded.model.visual
    width = int(visual.ln_pre.weight.shape[0])
    if not 0 < outliers.channels <= width:
        raise AnoclipError(f"--outlier-channels {outliers.channels}: choose 1..{width} (the tower's width)")
    generator = torch.Generator().manual_seed(outliers.seed)
    channels = sorted(torch.randperm(width, generator=generator)[: outliers.channels].tolist())
    visual.ln_pre.weight[channels] *= outliers.scale
    for block in visual.transformer.resblocks:
        block.mlp.c_proj.bias[channels] += outliers.scale
    loaded.pretrained = outliers.label()
    loaded._weights_sha256 = None  # the visual weights changed
    return channels, _residual_peak(visual)


@torch.no_grad()
def _residual_peak(visual: torch.nn.Module) -> float:
    """The largest |x| of the residual stream (ln_pre and every block's output) on a random image."""
    peak = [0.0]

    def record(module, args, output):
        peak[0] = max(peak[0], float(output.abs().max()))

    hooks = [visual.ln_pre.register_forward_hook(record)]
    hooks += [block.register_forward_hook(record) for block in visual.transformer.resblocks]
    size = visual.image_size if isinstance(visual.image_size, (tuple, list)) else (visual.image_size,) * 2
    try:
        visual(torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)))
    finally:
        for hook in hooks:
            hook.remove()
    return peak[0]


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

    ``pretrained``: an open_clip tag (downloaded through open_clip from the source that
    :func:`choose_source` picks), a local checkpoint file (``.pt``/``.pth``/``.bin`` state dict or
    ``.safetensors``, read without unpickling arbitrary objects), or ``none`` for random weights.
    A checkpoint must hold exactly the weights of the backbone (see :func:`_load_checkpoint`).
    """
    import open_clip

    _check_backbone(backbone)
    pretrained = resolve_pretrained(backbone, pretrained)
    random_weights = pretrained.lower() == RANDOM
    # open_clip reports on the root logger and the hub client logs each retry; what matters is
    # said once, below, by the error or the random-weights warning.
    with quiet_loggers("", "huggingface_hub", level=logging.CRITICAL):
        model, checkpoint = _create(backbone, pretrained, random_weights, cache_dir)
    digest = sha256_file(checkpoint) if checkpoint else ""
    label = RANDOM if random_weights else (
        f"file:{Path(pretrained).name}@{digest[:12]}" if os.path.isfile(pretrained) else pretrained)
    if random_weights:
        log.warning("RANDOM WEIGHTS (--pretrained none): %s is initialised at random; maps and scores carry no "
                    "meaning, use this only to test the pipeline", backbone)
    model.eval()
    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in (cfg.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in (cfg.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD))
    tokenizer = open_clip.get_tokenizer(backbone)
    return LoadedModel(model, backbone, label, random_weights, tokenizer, mean, std, digest)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _create(backbone: str, pretrained: str, random_weights: bool,
            cache_dir: str | None) -> tuple[torch.nn.Module, str | None]:
    """The model and the path of the checkpoint file loaded into it (None for random weights)."""
    import open_clip

    try:
        if random_weights:
            return open_clip.create_model(backbone, pretrained=None), None
        if os.path.isfile(pretrained):
            model = open_clip.create_model(backbone, pretrained=None)
            _load_checkpoint(model, pretrained, backbone)
            return model, pretrained
        tags = open_clip.list_pretrained_tags_by_model(backbone)
        if pretrained not in tags:
            looks_like_path = any(ch in pretrained for ch in "/\\.")
            what = "no such checkpoint file" if looks_like_path else "not a pretrained tag of this backbone"
            raise AnoclipError(
                f"--pretrained '{pretrained}': {what}; tags for {backbone}: {', '.join(tags) or 'none'}; "
                "or pass a local checkpoint file, or `none` for random weights"
            )
        cfg = open_clip.get_pretrained_cfg(backbone, pretrained)
        path = _download(backbone, pretrained, cfg, cache_dir)
        model = open_clip.create_model(backbone, pretrained=None)
        _load_checkpoint(model, path, backbone)
        _apply_preprocess_cfg(model, backbone, pretrained, cfg)
        return model, path
    except AnoclipError:
        raise
    except Exception as exc:
        if _is_offline_error(exc):
            raise AnoclipError(
                f"cannot download the '{pretrained}' weights of {backbone} (no network?); download them where "
                "there is a network and pass the file with --pretrained /path/to/checkpoint, or run the pipeline on "
                "random weights with --pretrained none"
            ) from exc
        raise AnoclipError(f"cannot create {backbone} with weights '{pretrained}': {_first_line(exc)}") from exc


class Source(NamedTuple):
    """Where the checkpoint of a pretrained tag comes from: ``kind`` is "hf_hub", "url" or "file"."""

    kind: str
    location: str


_EPOCH = re.compile(r"^e\d+$")


def _epochs(text: str) -> set[str]:
    """Epoch markers (``e31``, ``e32``) among the words of a tag, hub id or file name."""
    return {word for word in re.split(r"[^A-Za-z0-9]+", text.lower()) if _EPOCH.match(word)}


def choose_source(backbone: str, tag: str, cfg: dict, hub_available: bool = True) -> Source:
    """The source to download ``backbone``/``tag`` from, given open_clip's pretrained cfg of the tag.

    open_clip downloads from the Hugging Face hub whenever an entry names one, but an entry's hub
    repository is not always the checkpoint its tag names: in open_clip 3.3.0,
    ViT-B-16-plus-240/laion400m_e32 points at the ``laion400m_e31`` repository while its URL is the
    e32 file. Rule: where the tag names an epoch (``e32``), a source that names another epoch and
    not that one does not hold the checkpoint. The hub is used where it holds it (or the tag names
    no epoch), else the URL where it holds it; an entry with neither is an error.
    """
    if cfg.get("file"):
        return Source("file", cfg["file"])
    url, hub = cfg.get("url", ""), cfg.get("hf_hub", "")
    wanted = _epochs(tag)

    def holds(location: str) -> bool:
        named = _epochs(location)
        return bool(location) and (not wanted or not named or bool(wanted & named))

    if hub and hub_available and holds(hub):
        return Source("hf_hub", hub)
    if url and holds(url):
        if hub and hub_available:
            log.info("%s/%s: open_clip's hub entry %s names another epoch; downloading %s", backbone, tag, hub, url)
        return Source("url", url)
    if hub and holds(hub):
        return Source("hf_hub", hub)  # needs huggingface_hub; open_clip says so when it is missing
    raise AnoclipError(
        f"open_clip's entry for {backbone}/{tag} names no source that holds the {'/'.join(sorted(wanted)) or tag} "
        f"checkpoint (url: {url or 'none'}, hub: {hub or 'none'}); download it yourself and pass the file "
        "with --pretrained /path/to/checkpoint"
    )


def _download(backbone: str, tag: str, cfg: dict, cache_dir: str | None) -> str:
    """Download the tag's checkpoint through open_clip from the source :func:`choose_source` picks."""
    from open_clip import pretrained as oc_pretrained

    source = choose_source(backbone, tag, cfg, hub_available=oc_pretrained.has_hf_hub())
    log.debug("%s/%s: downloading from %s %s", backbone, tag, source.kind, source.location)
    picked = {key: value for key, value in cfg.items() if key not in ("url", "hf_hub", "file")}
    picked[source.kind] = source.location
    path = oc_pretrained.download_pretrained(picked, prefer_hf_hub=True, cache_dir=cache_dir)
    if not path or not os.path.isfile(path):
        raise AnoclipError(f"open_clip did not download the '{tag}' weights of {backbone} from {source.location}")
    return path


def _apply_preprocess_cfg(model: torch.nn.Module, backbone: str, tag: str, cfg: dict) -> None:
    """Set the tag's preprocessing on the model, as ``open_clip.create_model(backbone, pretrained=tag)`` does."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    preprocess = merge_preprocess_dict(PreprocessCfg(), cfg)
    preprocess["size"] = getattr(model.visual, "image_size", preprocess["size"])
    open_clip.set_model_preprocess_cfg(model, preprocess)
    model_quick_gelu = bool((open_clip.get_model_config(backbone) or {}).get("quick_gelu", False))
    if bool(cfg.get("quick_gelu", False)) != model_quick_gelu:
        log.warning("%s/%s was trained with quick_gelu=%s but the model config has quick_gelu=%s",
                    backbone, tag, cfg.get("quick_gelu", False), model_quick_gelu)


def _load_checkpoint(model: torch.nn.Module, path: str, backbone: str) -> None:
    """Load ``path`` through open_clip's checkpoint loader (``weights_only``, its layout conversions,
    positional-embedding resizing), then require exactly the model's keys: any missing or unexpected
    weight is an error. Non-persistent buffers are not part of a state dict and are not required."""
    import open_clip

    try:
        incompatible = open_clip.load_checkpoint(model, path, strict=False, weights_only=True)
    except Exception as exc:
        if "Error(s) in loading state_dict" in str(exc):
            raise AnoclipError(
                f"checkpoint {path} does not fit {backbone} (shape mismatch: {str(exc).splitlines()[-1].strip()}); "
                "pass the --backbone it was trained with"
            ) from exc
        reason = "it holds no state dict" if isinstance(exc, (StopIteration, AttributeError)) else _first_line(exc)
        raise AnoclipError(f"cannot read checkpoint {path}: {reason}; pass an open_clip state dict "
                           "(.pt/.pth/.bin or .safetensors)") from exc
    missing = list(getattr(incompatible, "missing_keys", []))
    unexpected = list(getattr(incompatible, "unexpected_keys", []))
    problems = [f"{len(keys)} {what} (first: {keys[0]})"
                for keys, what in ((missing, "weights missing"), (unexpected, "unexpected weights"))
                if keys]
    if problems:
        raise AnoclipError(
            f"checkpoint {path} does not match {backbone}: {', '.join(problems)}; pass the --backbone it was "
            "trained with and a complete open_clip checkpoint of that model"
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
