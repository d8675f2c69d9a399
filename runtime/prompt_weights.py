"""The prompt weights file (safetensors): per class t+/t- ``text_features/<class>`` [2, D] and the
prompt ensemble T ``prompt_features/<class>`` [2N, D], for a class with defect types their
embeddings ``defect_types/<class>`` [K, D] (names in its recipe's ``defect_types``), with the recipe
of each class and what the embeddings belong to in the metadata. Reading checks every tensor:
shapes, finite values, unit rows."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, UnknownClassError
from .plumbing import atomic_write_bytes

PROMPTS_FORMAT = "anoclip-prompts"
PROMPTS_FORMAT_VERSION = 1


@dataclass
class ClassPrompts:
    """Baked prompt embeddings of one class."""

    name: str
    text_features: np.ndarray  # [2, D]: rows t+ (normal), t- (abnormal), each unit norm
    prompt_features: np.ndarray  # [2N, D]: T, normal rows first, each unit norm
    recipe: dict[str, Any] = field(default_factory=dict)
    defect_types: tuple[str, ...] = ()  # names of the rows of type_features
    type_features: np.ndarray | None = None  # [K, D] unit rows, one per defect type; None without types


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
        check_class_prompts(cls, bank.embed_dim, "the prompts to write")
        tensors[f"text_features/{name}"] = np.ascontiguousarray(cls.text_features, dtype=np.float32)
        tensors[f"prompt_features/{name}"] = np.ascontiguousarray(cls.prompt_features, dtype=np.float32)
        recipes[name] = {k: v for k, v in cls.recipe.items() if k != "defect_types"}
        if cls.type_features is not None:
            tensors[f"defect_types/{name}"] = np.ascontiguousarray(cls.type_features, dtype=np.float32)
            recipes[name]["defect_types"] = list(cls.defect_types)
    metadata = dict(bank.metadata)
    metadata.update(extra_metadata or {})
    metadata.update(
        {
            "format": PROMPTS_FORMAT,
            "format_version": str(PROMPTS_FORMAT_VERSION),
            "backbone": bank.backbone,
            "pretrained": bank.pretrained,
            "embed_dim": str(bank.embed_dim),
            "classes": json.dumps(recipes, sort_keys=True),
        }
    )
    atomic_write_bytes(path, save(tensors, metadata=metadata))


# Baked rows are unit vectors written in float32: their norms are 1 within ~1e-7. 1e-3 accepts any
# honest rounding (even float16) and rejects rows that were never normalised or were edited.
UNIT_NORM_TOL = 1e-3


def check_class_prompts(cls: ClassPrompts, embed_dim: int, where: str) -> None:
    """Shapes [2, D], [2N, D] and [K, D] (K defect types, when there are), float, finite, rows of
    unit norm; an ArtifactError otherwise."""
    fix = "re-export the prompts with `anoclip-export`"
    arrays = [("text_features", cls.text_features, "2"), ("prompt_features", cls.prompt_features, "2N")]
    if cls.type_features is not None or cls.defect_types:
        names = cls.defect_types
        count = getattr(cls.type_features, "shape", (0,))[0]
        if cls.type_features is None or not names or not all(isinstance(n, str) and n.strip() for n in names) \
                or count != len(names) or len(set(names)) != len(names):
            raise ArtifactError(f"{where}: defect_types/{cls.name} holds {count} rows for the defect type names "
                                f"{list(names)}; {fix}")
        arrays.append(("defect_types", cls.type_features, "K"))
    for label, array, rows in arrays:
        shape = getattr(array, "shape", ())
        if len(shape) != 2 or shape[1] != embed_dim or shape[0] == 0 or (rows == "2" and shape[0] != 2) \
                or (rows == "2N" and shape[0] % 2):
            raise ArtifactError(f"{where}: {label}/{cls.name} has shape {tuple(shape)}, not [{rows}, {embed_dim}]; {fix}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ArtifactError(f"{where}: {label}/{cls.name} is {array.dtype}, not float; {fix}")
        if not np.all(np.isfinite(array)):
            raise ArtifactError(f"{where}: {label}/{cls.name} holds NaN or infinite values; {fix}")
        norms = np.linalg.norm(array.astype(np.float64), axis=1)
        if np.max(np.abs(norms - 1.0)) > UNIT_NORM_TOL:
            raise ArtifactError(f"{where}: rows of {label}/{cls.name} are not unit vectors (norms "
                                f"{norms.min():.4g}..{norms.max():.4g}); {fix}")


def read_prompts(path: str | os.PathLike) -> PromptBank:
    """Read and check a prompt weights file: metadata, class pairs, shapes, finite unit rows."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; write it with `anoclip-export --out {path.parent} --classes ...`")
    fix = f"re-run `anoclip-export --out {path.parent}`"
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}); {fix}") from None
    if metadata.get("format") != PROMPTS_FORMAT:
        raise ArtifactError(f"{path} is not an anoclip prompt weights file; {fix}")
    try:
        recipes = json.loads(metadata.get("classes", "{}"))
        embed_dim = int(metadata.get("embed_dim", ""))
        if not (isinstance(recipes, dict) and all(isinstance(v, dict) for v in recipes.values())):
            raise ValueError("classes is not an object of recipes")
        if embed_dim <= 0:
            raise ValueError("embed_dim is not positive")
    except ValueError as exc:
        raise ArtifactError(f"{path} has malformed metadata ({exc}); {fix}") from None
    classes = {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in ("text_features", "prompt_features", "defect_types") or not name:
            raise ArtifactError(f"{path} holds an unexpected tensor {key!r}; {fix}")
        if kind != "text_features":
            continue
        prompt_key = f"prompt_features/{name}"
        if prompt_key not in tensors:
            raise ArtifactError(f"{path} has text_features/{name} but no {prompt_key}; {fix}")
        recipe = recipes.get(name, {})
        names = recipe.get("defect_types", [])
        if not isinstance(names, list):
            raise ArtifactError(f"{path} has malformed defect_types of {name} in its metadata; {fix}")
        types = tensors.get(f"defect_types/{name}")
        classes[name] = ClassPrompts(name, value, tensors[prompt_key], recipe, tuple(names), types)
        check_class_prompts(classes[name], embed_dim, str(path))
    orphans = sorted(k for k in tensors if k.partition("/")[0] in ("prompt_features", "defect_types")
                     and f"text_features/{k.partition('/')[2]}" not in tensors)
    if orphans:
        raise ArtifactError(f"{path} has {orphans[0]} but no text_features for it; {fix}")
    return PromptBank(
        classes=classes,
        backbone=metadata.get("backbone", ""),
        pretrained=metadata.get("pretrained", ""),
        embed_dim=embed_dim,
        metadata=metadata,
    )
