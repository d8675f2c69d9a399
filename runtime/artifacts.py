"""Artifact formats: the manifest, the prompt weights file, atomic writes and consistency checks.

The runtime owns these formats; the exporter writes them through this module so that the reader
and the writer cannot drift apart.

Layout of one artifact folder::

    manifest.json          what was exported, how, and the sha256 of every file
    visual.onnx            image [B,3,H,W] -> image_embeds [B,D], patch_embeds [B,M,D]
    visual_qkv.onnx        optional plain-CLIP baseline (patch_embeds are the QKV tokens)
    tta.onnx               optional AnoCLIP+ adapter loop as one graph (class-independent)
    prompts.safetensors    text_features/<class> [2,D] (t+, t-), prompt_features/<class> [2N,D]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ArtifactError, UnknownClassError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROMPTS = "prompts.safetensors"
VISUAL = "visual"
VISUAL_QKV = "visual_qkv"
TTA_GRAPH = "tta"
PROMPTS_FORMAT = "anoclip-prompts"


# ----------------------------------------------------------------------------------------------
# Atomic writes and hashes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception (including KeyboardInterrupt) the temporary file is removed, so an
    interrupted write never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ModelEntry:
    """One ONNX graph of the folder: file, I/O names and shapes (``-1`` marks a dynamic axis)."""

    file: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    patch_tokens: str  # "vv" or "qkv": what the patch_embeds output holds; "" for the TTA graph
    vv_blocks: int | None = None
    opset: int = 17


@dataclass
class Manifest:
    backbone: str
    pretrained: str
    random_weights: bool
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: tuple[int, int]
    embed_dim: int
    width: int
    layers: int
    heads: int
    models: dict[str, ModelEntry]
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    resize: str = "squash-bilinear-antialias"
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""  # the command that exported the visual model
    created: str = ""
    history: list[str] = field(default_factory=list)  # every export run on this folder, with its time
    format_version: int = FORMAT_VERSION

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(
                f"manifest format version {version} is not {FORMAT_VERSION}, the one this runtime reads; "
                "re-export with this release's `anoclip-export`"
            )
        try:
            data["models"] = {k: ModelEntry(**v) for k, v in data["models"].items()}
            for key in ("image_size", "grid"):
                data[key] = tuple(int(v) for v in data[key])
            for key in ("mean", "std"):
                data[key] = tuple(float(v) for v in data[key])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest is malformed ({exc}); re-export with `anoclip-export`") from exc


def read_manifest(folder: str | os.PathLike) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; create it with `anoclip-export --out {folder}`")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {folder} is not a complete export, re-run `anoclip-export --out {folder}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run `anoclip-export --out {folder}`") from exc
    return Manifest.from_dict(data)


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, manifest.to_json().encode())


def verify_files(folder: str | os.PathLike, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that each listed file exists and has the sha256 recorded in the manifest."""
    folder = Path(folder)
    for name in names if names is not None else list(manifest.files):
        path = folder / name
        if name not in manifest.files:
            raise ArtifactError(f"{name} is not listed in {folder / MANIFEST}; re-run `anoclip-export --out {folder}`")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; re-run `anoclip-export --out {folder}` to write it")
        actual = sha256_file(path)
        if actual != manifest.files[name]:
            raise ArtifactError(
                f"{path} does not match the sha256 in the manifest (it was changed or belongs to another export); "
                f"re-run `anoclip-export --out {folder}`"
            )


# ----------------------------------------------------------------------------------------------
# Prompt weights file


@dataclass
class ClassPrompts:
    """Baked prompt embeddings of one class."""

    name: str
    text_features: np.ndarray  # [2, D]: rows t+ (normal), t- (abnormal), each unit norm
    prompt_features: np.ndarray  # [2N, D]: T, normal rows first, each unit norm
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptBank:
    """All classes of a prompts.safetensors file plus what they belong to."""

    classes: dict[str, ClassPrompts]
    backbone: str
    pretrained: str
    embed_dim: int
    metadata: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> ClassPrompts:
        try:
            return self.classes[name]
        except KeyError:
            known = ", ".join(sorted(self.classes)) or "none"
            raise UnknownClassError(
                f"class '{name}' is not in the prompt weights (known: {known}); add it with "
                f"`anoclip-export --out <artifacts> --classes {name}` (the visual model is not re-exported)"
            ) from None


def write_prompts(path: str | os.PathLike, bank: PromptBank, extra_metadata: dict[str, str] | None = None) -> None:
    """Write ``bank`` to a safetensors file atomically."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    recipes: dict[str, Any] = {}
    for name, cls in bank.classes.items():
        if cls.text_features.shape != (2, bank.embed_dim) or cls.prompt_features.shape[1] != bank.embed_dim:
            raise ValueError(f"class {name}: embeddings do not have embed dim {bank.embed_dim}")
        tensors[f"text_features/{name}"] = np.ascontiguousarray(cls.text_features, dtype=np.float32)
        tensors[f"prompt_features/{name}"] = np.ascontiguousarray(cls.prompt_features, dtype=np.float32)
        recipes[name] = cls.recipe
    metadata = dict(bank.metadata)
    metadata.update(extra_metadata or {})
    metadata.update(
        {
            "format": PROMPTS_FORMAT,
            "format_version": str(FORMAT_VERSION),
            "backbone": bank.backbone,
            "pretrained": bank.pretrained,
            "embed_dim": str(bank.embed_dim),
            "classes": json.dumps(recipes, sort_keys=True),
        }
    )
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_prompts(path: str | os.PathLike) -> PromptBank:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; write it with `anoclip-export --out {path.parent} --classes ...`")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}); re-run `anoclip-export`") from exc
    if metadata.get("format") != PROMPTS_FORMAT:
        raise ArtifactError(f"{path} is not an anoclip prompt weights file; re-run `anoclip-export`")
    recipes = json.loads(metadata.get("classes", "{}"))
    classes = {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind != "text_features":
            continue
        prompt_key = f"prompt_features/{name}"
        if prompt_key not in tensors:
            raise ArtifactError(f"{path} has text_features/{name} but no {prompt_key}; re-run `anoclip-export`")
        classes[name] = ClassPrompts(name, value, tensors[prompt_key], recipes.get(name, {}))
    return PromptBank(
        classes=classes,
        backbone=metadata.get("backbone", ""),
        pretrained=metadata.get("pretrained", ""),
        embed_dim=int(metadata.get("embed_dim", "0")),
        metadata=metadata,
    )


# ----------------------------------------------------------------------------------------------
# Loading a folder


@dataclass
class Artifacts:
    folder: Path
    manifest: Manifest
    prompts: PromptBank

    def model_path(self, model: str = VISUAL) -> Path:
        try:
            return self.folder / self.manifest.models[model].file
        except KeyError:
            known = ", ".join(self.manifest.models)
            hint = {VISUAL_QKV: " (export it with `anoclip-export --qkv-tokens model`)",
                    TTA_GRAPH: " (export it with `anoclip-export --tta`)"}.get(model, "")
            raise ArtifactError(f"model '{model}' is not in {self.folder} (has: {known}){hint}") from None


def check_prompts_belong(manifest: Manifest, bank: PromptBank, where: str) -> None:
    """Raise unless the prompt weights were made with the same backbone, weights and embed dim."""
    mismatch = []
    if bank.backbone != manifest.backbone:
        mismatch.append(f"backbone {bank.backbone} vs {manifest.backbone}")
    if bank.pretrained != manifest.pretrained:
        mismatch.append(f"pretrained {bank.pretrained} vs {manifest.pretrained}")
    if bank.embed_dim != manifest.embed_dim:
        mismatch.append(f"embed dim {bank.embed_dim} vs {manifest.embed_dim}")
    if mismatch:
        raise ArtifactError(
            f"{where}: the prompt weights do not belong to the visual model ({'; '.join(mismatch)}); "
            f"re-export the prompts with `anoclip-export --backbone {manifest.backbone} "
            f"--pretrained {manifest.pretrained} --out {where}`"
        )


def load_artifacts(folder: str | os.PathLike, verify: bool = True, models: list[str] | None = None) -> Artifacts:
    """Read and cross-check an artifact folder.

    Args:
        folder: the folder written by ``anoclip-export``.
        verify: check the sha256 of the files that will be used against the manifest.
        models: the graphs that will be used (default: the V-V visual model).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    models = models or [VISUAL]
    artifacts = Artifacts(folder, manifest, PromptBank({}, "", "", 0))
    needed = [PROMPTS] + [artifacts.model_path(m).name for m in models]
    for name in needed:
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder / name} is missing; re-run `anoclip-export --out {folder}` to write it")
    if verify:
        verify_files(folder, manifest, needed)
    artifacts.prompts = read_prompts(folder / PROMPTS)
    check_prompts_belong(manifest, artifacts.prompts, str(folder))
    return artifacts
