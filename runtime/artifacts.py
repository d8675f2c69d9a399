"""The artifact folder: its manifest, the checks that its files belong together, and loading it
(the prompt weights file itself is ``prompt_weights``).

The runtime owns these formats; every writer (export, calibrations, build-engine, fuse) commits
through the folder's one transaction (``folder``), built on this module, so that the reader and
the writers cannot drift apart.

Layout of one artifact folder (file names carry the first 12 hex digits of their sha256, so a
new export never overwrites a file that the current manifest names)::

    manifest.json                  what was exported, how, the name and sha256 of every file;
                                   written last: replacing it is the one commit point of every writer
    visual.<sha>.onnx              image [B,3,H,W] -> image_embeds [B,D], patch_embeds [B,M,D]
    visual_qkv.<sha>.onnx          optional plain-CLIP baseline (patch_embeds are the QKV tokens)
    tta.<sha>.onnx                 optional AnoCLIP+ adapter loop as one graph (class-independent)
    visual_int8.<sha>.onnx         optional Q/DQ int8 model of ``visual``, from `anoclip calibrate int8`
    visual_fp16.<sha>.onnx         optional fp16 model of ``visual``, from `anoclip calibrate fp16`; both
                                   record the sha256 of the visual model they were made from and their
                                   provenance (frames, method, quantizer, fidelity figures)
    anoclip.<sha>.onnx             optional, from `anoclip fuse` (model ``fused``): image [B,3,H,W] ->
                                   scores [B,K], maps [B,K,H,W], patch_scores [B,K,M] for K classes baked
                                   in (their order: the entry's provenance ``classes``); made from the
                                   visual model (``source_sha256``) and the classes' text features
    prompts.<sha>.safetensors      text_features/<class> [2,D] (t+, t-), prompt_features/<class> [2N,D]
    text.<sha>.onnx                optional text tower from `anoclip-export --text-tower` (model ``text``):
                                   token_ids [B,L] int64 -> text_embeds [B,D], open_clip's unnormalised
                                   ``encode_text``; its provenance ``text_weights_sha256`` equals the prompt
                                   weights' metadata of the same name when both come from one text tower
    vocab.<sha>.txt.gz             with it: the tokenizer's BPE vocabulary (manifest ``text_vocabulary``)
    text_recipe.<sha>.json         with it: templates, state words, domains, the ensemble and the tokenizer
                                   settings (context length, kind) the prompts were made with (``text_recipe``)
    thresholds.<sha>.json          optional, from `anoclip calibrate threshold`: per class image and
                                   pixel thresholds and their provenance (``thresholds``)
    memory.<sha>.safetensors       optional, from `anoclip calibrate memory`: per class the V-V patch
                                   tokens of normal frames (``memory``); dropped with the visual model
    visual_<prec>.<sha>.engine     optional TensorRT plan bytes from `anoclip build-engine`, with its
                                   ``.engine.json`` sidecar (TensorRT, GPU, profile, the model file it
                                   was built from)

Folders of format version 1 (``visual.onnx``, ``prompts.safetensors``) still load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .integrity import VerificationRecord, onnx_external_files, resolve_inside, verify_file
from .plumbing import atomic_write_bytes
from .prompt_weights import PromptBank, read_prompts
from .strict_json import (build, choice, either, flag, integer, integers, list_of, mapping, need, null, numbers, parse,
                          plain_object, sha256, text)
from .memory import MemoryBank, read_memory
from .thresholds import ThresholdTable, read_thresholds
from .vocabulary import (DERIVED_MODELS, FUSED, KINDS, PRECISION_MODELS, PRECISIONS, TEXT, TTA_GRAPH,  # noqa: F401
                         VISUAL, VISUAL_FP16, VISUAL_INT8, VISUAL_QKV, precision_model)

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the manifest names the prompt weights file; content-addressed file names
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
PROMPTS = "prompts.safetensors"
FUSED_FILE = "anoclip.onnx"  # the fused model's file: anoclip.<sha>.onnx
MAKE_MODEL = {name: KINDS[name].remake for name in DERIVED_MODELS}  # the command that makes each derived model


# ----------------------------------------------------------------------------------------------
# Manifest


def content_addressed(name: str, sha256: str) -> str:
    """``visual.onnx`` -> ``visual.<first 12 hex of sha256>.onnx``: a new content never takes the
    name of a file that a manifest already refers to."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{sha256[:12]}{dot}{suffix}"


@dataclass
class ModelEntry:
    """One ONNX graph of the folder: file, I/O names and shapes (``-1`` marks a dynamic axis)."""

    file: str
    inputs: dict[str, list[int]]
    outputs: dict[str, list[int]]
    patch_tokens: str  # "vv" or "qkv": what the patch_embeds output holds; "" for the TTA graph
    vv_blocks: int | None = None
    opset: int = 17
    # Reduced-precision models (visual_int8, visual_fp16) are made from the fp32 visual model:
    precision: str = "fp32"
    source_sha256: str = ""  # the sha256 of the visual model file it was made from ("" for exported models)
    provenance: dict[str, Any] = field(default_factory=dict)  # how: frames, method, quantizer, fidelity


DERIVED_FIELDS = {"precision": "fp32", "source_sha256": "", "provenance": {}}  # left out of the JSON at these values


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
    prompts: str = PROMPTS  # the prompt weights file
    thresholds: str = ""  # the thresholds file written by the calibration ("" for none)
    memory: str = ""  # the memory of normal frames written by `calibrate memory` ("" for none)
    text_vocabulary: str = ""  # the text tower's tokenizer vocabulary (`anoclip-export --text-tower`; "" for none)
    text_recipe: str = ""  # the prompt recipe and tokenizer settings of the text tower ("" for none)
    checkpoint_sha256: str = ""  # of the checkpoint the weights were loaded from ("" for random weights)
    visual_weights_sha256: str = ""  # of the visual tower's weights themselves (names, shapes, values)
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
        data = asdict(self)
        for optional in ("thresholds", "memory", "text_vocabulary", "text_recipe"):  # never made: readable by runtimes that predate the field too
            if not data[optional]:
                del data[optional]
        for entry in data["models"].values():  # exported models: readable by runtimes that predate the fields
            for key, default in DERIVED_FIELDS.items():
                if entry.get(key) == default:
                    del entry[key]
        return json.dumps(data, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Build a manifest from parsed JSON, checking the type of every field."""
        if not isinstance(data, dict):
            raise ArtifactError(f"manifest is a JSON {type(data).__name__}, not an object; re-export with `anoclip-export`")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ArtifactError(
                f"manifest format version {version} is not one this runtime reads "
                f"({', '.join(map(str, READABLE_VERSIONS))}); re-export with this release's `anoclip-export`"
            )
        try:
            return build(cls, data, _FIELD_CHECKS)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest is malformed ({exc}); re-export with `anoclip-export`") from None


def _models(key: str, value: Any) -> dict[str, ModelEntry]:
    need(isinstance(value, dict) and value, f"{key} must be a non-empty object")
    entries = {}
    for name, entry in value.items():
        need(isinstance(entry, dict), f"{key}.{name} must be an object")
        entries[name] = build(ModelEntry, entry, _MODEL_CHECKS)
    return entries


_shapes = mapping(list_of(integer(), "integers"), "lists of integers")
_MODEL_CHECKS = {
    "file": text(), "inputs": _shapes, "outputs": _shapes, "patch_tokens": text(),
    "vv_blocks": either(null, integer()), "opset": integer(), "precision": choice(PRECISIONS),
    "source_sha256": either(choice([""]), sha256), "provenance": plain_object,
}
_FIELD_CHECKS = {
    "backbone": text(), "pretrained": text(), "random_weights": flag,
    "image_size": integers(2), "grid": integers(2), "mean": numbers(3), "std": numbers(3, positive=True),
    "embed_dim": integer(1), "width": integer(1), "layers": integer(1), "heads": integer(1),
    "models": _models, "files": mapping(sha256, "sha256 digests"), "prompts": text(), "thresholds": text(),
    "memory": text(), "text_vocabulary": text(), "text_recipe": text(),
    "checkpoint_sha256": text(), "visual_weights_sha256": text(),
    "resize": text(), "versions": mapping(text(), "strings"), "command": text(), "created": text(),
    "history": list_of(text(), "strings"), "format_version": integer(),
}


def read_manifest(folder: str | os.PathLike) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; create it with `anoclip-export --out {folder}`")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; {folder} is not a complete export, re-run `anoclip-export --out {folder}`")
    resolve_inside(folder, MANIFEST, "the folder")
    try:
        data = parse(path.read_bytes())
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text; re-run `anoclip-export --out {folder}`") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-run `anoclip-export --out {folder}`") from None
    return Manifest.from_dict(data)


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, manifest.to_json().encode())


def verify_files(folder: str | os.PathLike, manifest: Manifest, names: list[str] | None = None,
                 record: VerificationRecord | None = None, hashes: bool = True) -> None:
    """Check that each named file lies inside the folder, is listed in the manifest, exists and
    (with ``hashes``) has the sha256 the manifest records.

    ``record``: hashes remembered from earlier checks; an unchanged file is not hashed again.
    """
    folder = Path(folder)
    for name in names if names is not None else list(manifest.files):
        path = resolve_inside(folder, name)
        if name not in manifest.files:
            raise ArtifactError(f"{name} is not listed in {folder / MANIFEST}; re-run `anoclip-export --out {folder}`")
        if not path.is_file():
            raise ArtifactError(f"{folder / name} is missing; re-run `anoclip-export --out {folder}` to write it")
        if hashes:
            verify_file(path, manifest.files[name], record, str(folder / name))


# ----------------------------------------------------------------------------------------------
# Loading a folder


@dataclass
class Artifacts:
    folder: Path
    manifest: Manifest
    prompts: PromptBank
    thresholds: ThresholdTable | None = None  # None: the folder has no thresholds file (or it was not loaded)
    memory: MemoryBank | None = None  # None: the folder has no memory of normal frames (or it was not loaded)
    verify: bool = True  # files read later (engines) are hashed against the manifest, as load_artifacts' were
    _engines: list | None = field(default=None, repr=False, compare=False)

    def model_sha256(self, model: str = VISUAL) -> str:
        """The sha256 the manifest records for a graph's file ("" when it records none)."""
        entry = self.manifest.models.get(model)
        return self.manifest.files.get(entry.file, "") if entry is not None else ""

    def model_path(self, model: str = VISUAL) -> Path:
        """The real path of a graph of the folder (always inside it)."""
        try:
            entry = self.manifest.models[model]
        except KeyError:
            known = ", ".join(self.manifest.models)
            hint = {VISUAL_QKV: " (export it with `anoclip-export --qkv-tokens model`)",
                    TTA_GRAPH: " (export it with `anoclip-export --tta`)"}.get(model, "")
            if model in MAKE_MODEL:
                hint = f"; make it with `{MAKE_MODEL[model].format(folder=self.folder)}`"
            raise ArtifactError(f"model '{model}' is not in {self.folder} (has: {known}){hint}") from None
        return resolve_inside(self.folder, entry.file)

    def check_source(self, model: str) -> None:
        """Raise when a reduced-precision model was made from another visual model than the folder's."""
        entry = self.manifest.models.get(model)
        if entry is None or not entry.source_sha256:
            return
        current = self.model_sha256(VISUAL)
        if entry.source_sha256 != current:
            make = MAKE_MODEL.get(model, "anoclip calibrate ...").format(folder=self.folder)
            raise ArtifactError(f"{model} in {self.folder} was made from another visual model (sha256 "
                                f"{entry.source_sha256[:12]}, the folder's is {current[:12]}); "
                                f"make it anew with `{make}`")

    def model_files(self, model: str = VISUAL) -> list[str]:
        """Names (relative to the folder) of a graph's file and of every external-data file it reads."""
        path = self.model_path(model)
        shown = self.folder / self.manifest.models[model].file
        if not path.is_file():
            raise ArtifactError(f"{shown} is missing; re-run `anoclip-export --out {self.folder}` to write it")
        root = self.folder.resolve()
        names = [self.manifest.models[model].file]
        for location in onnx_external_files(path):
            # ONNX Runtime reads external data relative to the graph's folder, which is inside ours
            name = resolve_inside(path.parent, location, str(shown)).relative_to(root).as_posix()
            if name not in self.manifest.files:
                raise ArtifactError(
                    f"{path} reads external data from {name}, which {self.folder / MANIFEST} does not list; "
                    f"re-export with `anoclip-export --out {self.folder}`"
                )
            names.append(name)
        return names


    # ------------------------------------------------------------------------------------------
    # TensorRT engines (their sidecar format: ``engine``)

    def engines(self) -> list:
        """The engines the manifest names, as their sidecars (``engine.EngineSidecar``), read once:
        each sidecar checked against the manifest (hashed unless ``verify`` is off); one that fails
        is left out with a warning, so that another device's damaged engine never stops this one."""
        if self._engines is None:
            from .engine import load_engine_sidecars

            record = VerificationRecord() if self.verify else None
            self._engines = load_engine_sidecars(self.folder, self.manifest, record, self.verify, skip_damaged=True)
            if record is not None:
                record.save()
        return self._engines

    def engine_plan(self, sidecar) -> bytes:
        """The plan bytes of an engine of :meth:`engines`, checked against the manifest (hashed
        unless ``verify`` is off)."""
        record = VerificationRecord() if self.verify else None
        verify_files(self.folder, self.manifest, [sidecar.engine], record, hashes=self.verify)
        if record is not None:
            record.save()
        return resolve_inside(self.folder, sidecar.engine).read_bytes()


TEXT_WEIGHTS_KEY = "text_weights_sha256"  # the text tower's weights: prompt weights metadata, text model provenance


@dataclass(frozen=True)
class TextTowerFiles:
    """The text tower of a folder (``anoclip-export --text-tower``): verified paths inside it."""

    model: Path  # token_ids [B,L] int64 -> text_embeds [B,D]
    vocabulary: Path  # the tokenizer's BPE vocabulary (gzip)
    recipe: Path  # templates, states, ensemble, tokenizer settings (JSON)
    context_length: int


def text_tower_files(folder: str | os.PathLike, manifest: Manifest, bank: PromptBank | None = None,
                     verify: bool = True) -> TextTowerFiles:
    """The folder's text tower, vocabulary and recipe, each listed and (with ``verify``) hashed; with
    ``bank``, the text model must come from the text tower the prompt weights were encoded with."""
    folder = Path(folder)
    remake = KINDS[TEXT].remake.format(folder=folder)
    entry = manifest.models.get(TEXT)
    if entry is None or not manifest.text_vocabulary or not manifest.text_recipe:
        raise ArtifactError(f"{folder} holds no text tower; export it with `{remake}`")
    names = [entry.file, manifest.text_vocabulary, manifest.text_recipe]
    record = VerificationRecord() if verify else None
    try:
        verify_files(folder, manifest, names, record, hashes=verify)
    except ArtifactError as exc:
        raise ArtifactError(f"{str(exc).split('; ')[0]}; export the text tower anew with `{remake}`") from None
    if record is not None:
        record.save()
    made_from = str(entry.provenance.get(TEXT_WEIGHTS_KEY, ""))
    baked = str(bank.metadata.get(TEXT_WEIGHTS_KEY, "")) if bank is not None else ""
    if made_from and baked and made_from != baked:
        raise ArtifactError(f"{folder}: the text model comes from other text-tower weights (sha256 {made_from[:12]}) "
                            f"than the prompt weights ({baked[:12]}); export it anew with `{remake}`")
    return TextTowerFiles(*(resolve_inside(folder, name) for name in names), context_length=entry.inputs["token_ids"][1])


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


def load_artifacts(folder: str | os.PathLike, verify: bool = True, models: list[str] | None = None,
                   load_thresholds: bool = True, load_memory: bool = True) -> Artifacts:
    """Read and cross-check an artifact folder.

    Every file that will be read must lie inside ``folder``, be listed in the manifest and (with
    ``verify``) have the sha256 recorded there; a file verified before and unchanged since is not
    hashed again (see ``integrity.VerificationRecord``).

    Args:
        folder: the folder written by ``anoclip-export``.
        verify: check the sha256 of the files that will be used against the manifest.
        models: the graphs that will be used (default: the V-V visual model).
        load_thresholds: read (and verify) the thresholds file the manifest names, if any.
        load_memory: read (and verify) the memory of normal frames the manifest names, if any.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    artifacts = Artifacts(folder, manifest, PromptBank({}, "", "", 0), verify=verify)
    models = models or [VISUAL]
    for model in models:
        artifacts.check_source(model)
    made = [m for m in models if m in MAKE_MODEL]  # by a calibration: its fix is that calibration
    needed = [manifest.prompts] + [name for model in models if model not in made
                                   for name in artifacts.model_files(model)]
    record = VerificationRecord() if verify else None
    verify_files(folder, manifest, needed, record, hashes=verify)
    for model in made:
        files = artifacts.model_files(model)  # not in the folder: that error names the command already
        try:
            verify_files(folder, manifest, files, record, hashes=verify)
        except ArtifactError as exc:
            cause = str(exc).split("; ")[0]
            raise ArtifactError(f"{cause}; make it anew with `{MAKE_MODEL[model].format(folder=folder)}`") from None
    if load_thresholds and manifest.thresholds:
        verify_thresholds(folder, manifest, record, hashes=verify)
    if load_memory and manifest.memory:
        try:
            verify_files(folder, manifest, [manifest.memory], record, hashes=verify)
        except ArtifactError as exc:
            raise ArtifactError(f"{str(exc).split('; ')[0]}; make it anew with `anoclip calibrate memory --artifacts "
                                f"{folder} --class ... --normal ...`") from None
    if record is not None:
        record.save()
    artifacts.prompts = read_prompts(resolve_inside(folder, manifest.prompts))
    check_prompts_belong(manifest, artifacts.prompts, str(folder))
    if load_thresholds and manifest.thresholds:
        artifacts.thresholds = read_thresholds(resolve_inside(folder, manifest.thresholds))
    if load_memory and manifest.memory:
        artifacts.memory = read_memory(resolve_inside(folder, manifest.memory))
        if artifacts.memory.visual_sha256 != artifacts.model_sha256(VISUAL):
            log.warning("the memory of normal frames in %s was made with another visual model; it is not used "
                        "(make it anew with `anoclip calibrate memory`)", folder)
            artifacts.memory = None
    return artifacts


def verify_thresholds(folder: str | os.PathLike, manifest: Manifest, record: VerificationRecord | None = None,
                      hashes: bool = True) -> None:
    """:func:`verify_files` for the thresholds file, whose fix is a calibration, not an export."""
    try:
        verify_files(folder, manifest, [manifest.thresholds], record, hashes)
    except ArtifactError as exc:
        cause = str(exc).split("; ")[0]
        raise ArtifactError(
            f"{cause}; calibrate anew with `anoclip calibrate threshold --artifacts {folder} --class ... --normal ... "
            "--replace-file` (then once more for each other class)"
        ) from None
