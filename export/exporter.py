"""Exporting into an artifact folder as two idempotent steps, the visual models and the prompt
weights, through the folder's one transaction (``anoclip.runtime.folder``)."""

from __future__ import annotations

import copy
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from anoclip.runtime.artifacts import (
    FORMAT_VERSION, MANIFEST, PROMPTS, TEXT, TEXT_WEIGHTS_KEY, TTA_GRAPH, VISUAL, VISUAL_QKV, Manifest, ModelEntry,
    check_prompts_belong, read_manifest, verify_files,
)
from anoclip.runtime.errors import AnoclipError, ArtifactError
from anoclip.runtime.folder import FolderTransaction, transaction
from anoclip.runtime.integrity import VerificationRecord, resolve_inside
from anoclip.runtime.plumbing import ensure_writable_folder
from anoclip.runtime.prompt_weights import ClassPrompts, PromptBank, read_prompts, write_prompts
from anoclip.runtime.vocabulary import remake_command

from .model import LoadedModel, Outliers, add_outlier_channels, load_model, resolve_pretrained
from anoclip.runtime.prompts import PromptRecipe, class_embeddings, encode_sentences, type_embeddings

log = logging.getLogger(__name__)

# TEXT_WEIGHTS_KEY: prompt weights metadata and text model provenance, the text tower they come from
TEXT_CHECK_SENTENCES = 32  # sentences of each class's ensemble the text model is checked on (spread over it)


@dataclass
class ExportOptions:
    backbone: str
    pretrained: str | None
    out: Path
    classes: list[str]
    domains: dict[str, str]
    opset: int
    dynamic_batch: bool
    vv_blocks: int | None
    qkv_tokens: str
    force: bool
    check: bool
    atol: float
    text_batch: int
    seed: int
    tta: bool = False
    tta_steps: int = 5
    tta_adapter: str = "text"
    drop_classes: tuple[str, ...] = ()
    replace_classes: bool = False
    reencode_prompts: bool = False
    outliers: Outliers | None = None  # the stress variant of random weights (--outlier-channels)
    text_tower: bool = False  # also write the text tower, its vocabulary and the prompt recipe (--text-tower)
    defect_types: dict[str, tuple[str, ...]] | None = None  # class -> its defect type names (--defect-types)


def _visual_reusable(opts: ExportOptions, loaded: LoadedModel, manifest: Manifest | None) -> bool:
    """True when the folder's visual models are the ones these options would export."""
    if manifest is None or opts.force or not _same_weights(manifest, loaded):
        return False
    wanted = _wanted_models(opts)
    for name, (patch_outputs, vv_blocks) in wanted.items():
        entry = manifest.models.get(name)
        if entry is None or entry.opset != opts.opset or (entry.inputs["image"][0] == -1) != opts.dynamic_batch:
            return False
        if name == VISUAL and (entry.vv_blocks != (vv_blocks or manifest.layers)
                               or ("qkv_patch_embeds" in entry.outputs) != (patch_outputs == "both")):
            return False
    try:
        record = VerificationRecord()  # the runtime's record: an unchanged model is not hashed again
        verify_files(opts.out, manifest, [manifest.models[n].file for n in wanted], record)
    except ArtifactError:
        return False
    record.save()
    return True


def _same_weights(manifest: Manifest, loaded: LoadedModel) -> bool:
    """The folder's visual models come from the same backbone and weights (by their hash where the
    manifest records it, else by the backbone and pretrained labels)."""
    if (manifest.backbone, manifest.pretrained) != (loaded.backbone, loaded.pretrained):
        return False
    return not manifest.visual_weights_sha256 or manifest.visual_weights_sha256 == loaded.weights_sha256("visual")


def _text_changed(old: Manifest | None, bank: PromptBank | None, loaded: LoadedModel) -> bool:
    """The classes baked in ``bank`` came from another text tower than ``loaded``'s."""
    if bank is None:
        return False
    recorded = bank.metadata.get(TEXT_WEIGHTS_KEY)
    if recorded:
        return recorded != loaded.weights_sha256("text")
    return (bank.backbone, bank.pretrained) != (loaded.backbone, loaded.pretrained)


def _wanted_models(opts: ExportOptions) -> dict[str, tuple[str, int | None]]:
    vv_blocks = opts.vv_blocks
    wanted = {VISUAL: ("both" if opts.qkv_tokens == "add" else "vv", vv_blocks)}
    if opts.qkv_tokens == "model":
        wanted[VISUAL_QKV] = ("qkv", None)
    return wanted


def _export_visual(opts: ExportOptions, loaded: LoadedModel, staging: Path, progress) -> dict:
    from .onnx_export import check_parity, export_onnx
    from .vv import VVVisual

    entries = {}
    for name, (patch_outputs, vv_blocks) in _wanted_models(opts).items():
        module = VVVisual(loaded.model.visual, vv_blocks=vv_blocks, patch_outputs=patch_outputs)
        progress(f"tracing {name}.onnx (opset {opts.opset}, {'dynamic' if opts.dynamic_batch else 'static'} batch)")
        t0 = time.perf_counter()
        entry = export_onnx(module, staging / f"{name}.onnx", opset=opts.opset, dynamic_batch=opts.dynamic_batch)
        log.info("traced %s.onnx in %.1f s", name, time.perf_counter() - t0)
        if opts.check:
            progress(f"checking {name}.onnx against PyTorch")
            report = check_parity(module, staging / entry.file, atol=opts.atol)
            for line in report.lines():
                click.echo(f"  {name} {line}")
            if not report.ok:
                raise AnoclipError(
                    f"{name}.onnx differs from the PyTorch reference by more than {opts.atol:g}; nothing was written "
                    "(try another --opset, or report the backbone and versions)"
                )
        entries[name] = (entry, module.geometry)
    return entries


def _write_tta_graph(opts: ExportOptions, staging: Path) -> ModelEntry:
    """The AnoCLIP+ loop as one ONNX graph; it takes T and t± as inputs, so it serves every class."""
    import onnx

    from anoclip.runtime.tta import TTAConfig

    from .tta_graph import write_tta_graph

    path = write_tta_graph(staging / f"{TTA_GRAPH}.onnx", config=TTAConfig(steps=opts.tta_steps, adapter=opts.tta_adapter))
    model = onnx.load(str(path))

    def shapes(values) -> dict[str, list[int]]:
        return {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                for v in values}

    opset = {o.domain: o.version for o in model.opset_import}.get("", 17)
    return ModelEntry(file=path.name, inputs=shapes(model.graph.input), outputs=shapes(model.graph.output),
                      patch_tokens="", vv_blocks=None, opset=opset)


def _recipe_from_metadata(name: str, meta: dict) -> PromptRecipe | None:
    """The recipe a class was baked with, from the prompt weights' metadata (None if incomplete)."""
    try:
        return PromptRecipe(name, str(meta["class_phrase"]), str(meta["domain"]), tuple(meta["domain_phrases"]),
                            tuple(str(t) for t in meta.get("defect_types", ())))
    except (KeyError, TypeError):
        return None


def _plan_classes(opts: ExportOptions, old: PromptBank | None, text_changed: bool) -> tuple[dict, dict, list[str]]:
    """(classes kept as they are, recipes to encode, classes dropped) for the new prompt weights."""
    kept = {} if old is None or opts.replace_classes else dict(old.classes)
    unknown = [n for n in opts.drop_classes if n not in kept]
    if unknown:
        have = ", ".join(sorted(kept)) or "none"
        raise AnoclipError(f"--drop-classes {unknown[0]}: no such class in {opts.out} (has: {have})")
    dropped = [n for n in kept if n in opts.drop_classes]
    if old is not None and opts.replace_classes:
        dropped = sorted(set(old.classes) - set(opts.classes))
    for name in dropped:
        kept.pop(name, None)
    encode: dict[str, PromptRecipe] = {}
    for name in list(kept):
        if text_changed or opts.reencode_prompts:
            recipe = _recipe_from_metadata(name, kept[name].recipe)
            if recipe is None:
                raise AnoclipError(f"class {name} in {opts.out} has no recipe to re-encode it from; "
                                   f"pass it again with --classes {name} (and its --domain)")
            encode[name] = recipe
            del kept[name]
    for name in opts.classes:
        recipe = PromptRecipe.for_class(name, opts.domains.get(name), defect_types=(opts.defect_types or {}).get(name, ()))
        stored = _recipe_from_metadata(name, kept[name].recipe) if name in kept else None
        if stored is not None and (stored.phrase, stored.domain_phrases, stored.defect_types) == \
                (recipe.phrase, recipe.domain_phrases, recipe.defect_types):
            continue  # baked already with the same sentences
        kept.pop(name, None)
        encode[name] = recipe
    return kept, encode, dropped


def _encode_classes(loaded: LoadedModel, recipes: dict[str, PromptRecipe], text_batch: int) -> dict[str, ClassPrompts]:
    from tqdm import tqdm

    encoded = {}
    for name, recipe in recipes.items():
        normal, abnormal = recipe.sentences()
        typed = recipe.type_sentences()
        with tqdm(total=len(normal) + len(abnormal) + sum(map(len, typed)), desc=f"prompts {name}", unit="sent",
                  file=sys.stderr, disable=None) as bar:
            raw_normal = encode_sentences(loaded.encode_text, normal, text_batch, bar)
            raw_abnormal = encode_sentences(loaded.encode_text, abnormal, text_batch, bar)
            raw_types = [encode_sentences(loaded.encode_text, sentences, text_batch, bar) for sentences in typed]
        text, prompts = class_embeddings(raw_normal, raw_abnormal)
        meta = recipe.as_metadata()
        meta["sentences_per_state"] = len(normal)
        meta["encoded_by"] = "anoclip-export (PyTorch)"
        encoded[name] = ClassPrompts(name, text, prompts, meta, recipe.defect_types,
                                     type_embeddings(raw_types) if raw_types else None)
    return encoded


def _text_plan(opts: ExportOptions, loaded: LoadedModel, old: Manifest | None) -> str:
    """What becomes of the text tower: "export", "keep" (the folder's, same weights), "drop" (the
    folder's, other weights) or "none" (neither asked for nor there)."""
    entry = old.models.get(TEXT) if old is not None else None
    same = (entry is not None and bool(old.text_vocabulary) and bool(old.text_recipe)
            and entry.provenance.get(TEXT_WEIGHTS_KEY) == loaded.weights_sha256("text"))
    if not opts.text_tower:
        return "keep" if same else ("drop" if entry is not None else "none")
    if not same or opts.force or entry.opset != opts.opset:
        return "export"
    try:
        record = VerificationRecord()
        verify_files(opts.out, old, [entry.file, old.text_vocabulary, old.text_recipe], record)
    except ArtifactError:
        return "export"
    record.save()
    return "keep"


def _check_sentences(recipes: list[PromptRecipe], per_class: int) -> list[str]:
    """``per_class`` sentences of each class's ensemble, spread evenly over it, its longest among them."""
    chosen: list[str] = []
    for recipe in recipes or [PromptRecipe.for_class("object")]:
        normal, abnormal = recipe.sentences()
        every = normal + abnormal
        step = max(1, len(every) // max(1, per_class - 1))
        picked = every[::step][: per_class - 1] + [max(every, key=len)]
        chosen += [s for s in picked if s not in chosen]
    return chosen


def _export_text(opts: ExportOptions, loaded: LoadedModel, staging: Path, recipes: list[PromptRecipe],
                 progress) -> ModelEntry:
    """text.onnx, the vocabulary and the recipe into ``staging``; the text model checked against
    PyTorch on sentences of the classes' ensembles (atol 1e-5)."""
    from .text_tower import (RECIPE_FILE, TEXT_ATOL, TEXT_FILE, VOCAB_FILE, TextTower, check_text_parity,
                             export_text_onnx, recipe_json, token_ids, tokenizer_of)

    tower = TextTower(loaded.model).eval()
    tok = tokenizer_of(loaded.tokenizer, tower.context_length)
    progress(f"tracing {TEXT_FILE} (opset {opts.opset}, dynamic batch, context {tower.context_length})")
    t0 = time.perf_counter()
    entry = export_text_onnx(tower, staging / TEXT_FILE, opset=opts.opset, provenance={
        TEXT_WEIGHTS_KEY: loaded.weights_sha256("text"), "tokenizer": tok.kind})
    log.info("traced %s in %.1f s", TEXT_FILE, time.perf_counter() - t0)
    shutil.copyfile(tok.vocabulary, staging / VOCAB_FILE)
    (staging / RECIPE_FILE).write_bytes(recipe_json(tok))
    if opts.check:
        sentences = _check_sentences(recipes, TEXT_CHECK_SENTENCES)
        progress(f"checking {TEXT_FILE} against PyTorch on {len(sentences)} sentences of the prompt ensembles")
        report = check_text_parity(tower, staging / entry.file, token_ids(loaded.tokenizer, sentences), atol=TEXT_ATOL)
        for line in report.lines():
            click.echo(f"  text {line}")
        if not report.ok:
            raise AnoclipError(
                f"{TEXT_FILE} differs from the PyTorch reference by {report.max_abs_diff['text_embeds']:.2e} (more than "
                f"{TEXT_ATOL:g}); nothing was written (try another --opset, or report the backbone and versions)")
        entry.provenance["parity_max_abs_diff"] = report.max_abs_diff["text_embeds"]
        entry.provenance["parity_sentences"] = len(sentences)
    return entry


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _read_old(folder: Path, force: bool) -> tuple[Manifest | None, PromptBank | None]:
    """The folder's manifest and prompt weights, if it holds a loadable export; with ``force``, a
    folder that cannot be read counts as empty."""
    if not has_manifest(folder):
        return None, None
    try:
        manifest = read_manifest(folder)
        prompts = resolve_inside(folder, manifest.prompts)
        bank = read_prompts(prompts) if prompts.is_file() else None
        if bank is not None:
            check_prompts_belong(manifest, bank, str(folder))
    except ArtifactError as exc:
        if not force:
            raise ArtifactError(f"{exc}; or pass --force to export into it anew") from None
        log.warning("%s cannot be read (%s); exporting into it anew", folder, exc)
        return None, None
    return manifest, bank


def run_export(opts: ExportOptions, command: str) -> Manifest:
    """Export into ``opts.out`` as two idempotent steps, visual models and prompt weights.

    The visual models are kept when they match the options; the prompt weights keep every class
    already baked (re-encoded from their recipes when the weights changed) unless
    ``--drop-classes``/``--replace-classes`` say otherwise. Everything goes through the folder's one
    transaction (``anoclip.runtime.folder``): files under new names, derived files carried forward
    or dropped with a word, the manifest replaced last, so a folder that loaded before loads after
    any interruption.
    """
    def progress(message: str) -> None:
        click.echo(f"[anoclip-export] {message}", err=True)

    if not has_manifest(opts.out) and not opts.classes:
        raise AnoclipError("no classes given; pass --classes a,b,c or --classes-file FILE")
    created = ensure_writable_folder(opts.out)
    old_bank: list[PromptBank | None] = [None]

    def read(folder: Path) -> Manifest | None:
        manifest, old_bank[0] = _read_old(folder, opts.force)
        return manifest

    try:
        with transaction(opts.out, report=progress, read=read) as tx:
            return _export_locked(opts, command, progress, tx, old_bank[0])
    except BaseException:
        if created and not has_manifest(opts.out):
            shutil.rmtree(opts.out, ignore_errors=True)
        raise


def _export_locked(opts: ExportOptions, command: str, progress, tx: FolderTransaction,
                   old_bank: PromptBank | None) -> Manifest:
    import open_clip
    import torch

    old = tx.old
    progress(f"creating {opts.backbone} with weights '{resolve_pretrained(opts.backbone, opts.pretrained)}'")
    torch.manual_seed(opts.seed)  # random weights (`--pretrained none`) repeat from run to run
    loaded = load_model(opts.backbone, opts.pretrained)
    if opts.outliers is not None:
        channels, peak = add_outlier_channels(loaded, opts.outliers)
        progress(f"STRESS WEIGHTS '{loaded.pretrained}': random weights with residual-stream channels {channels} "
                 f"{opts.outliers.scale:g}x larger (largest |x| on a random image: {peak:.0f}); for testing reduced "
                 "precision only")
    if old is not None and not _same_weights(old, loaded) and not opts.force:
        other = f"{old.backbone} / {old.pretrained}"
        raise ArtifactError(
            f"{opts.out} holds an export of {other if other != f'{loaded.backbone} / {loaded.pretrained}' else 'other weights'}, "
            f"not of {loaded.backbone} / {loaded.pretrained} as loaded now; choose another --out, or pass --force to "
            "replace the visual model (its classes are kept and re-encoded)"
        )
    reuse_visual = _visual_reusable(opts, loaded, old)
    kept, to_encode, dropped = _plan_classes(opts, old_bank, _text_changed(old, old_bank, loaded))
    text_plan = _text_plan(opts, loaded, old)
    if reuse_visual and not to_encode and not dropped and not opts.tta and text_plan in ("keep", "none"):
        progress(f"{opts.out} is up to date (classes: {', '.join(sorted(kept)) or 'none'}); nothing to do")
        return old
    if not kept and not to_encode:
        raise AnoclipError(f"the export would leave {opts.out} without classes; pass --classes")
    with tx.staging() as staging:
        if reuse_visual:
            progress(f"visual model in {opts.out} is up to date; writing prompts only")
            manifest = tx.manifest
        else:
            entries = _export_visual(opts, loaded, staging, progress)
            geometry = next(iter(entries.values()))[1]
            manifest = Manifest(
                backbone=loaded.backbone, pretrained=loaded.pretrained, random_weights=loaded.random_weights,
                image_size=geometry.image_size, mean=loaded.mean, std=loaded.std, grid=geometry.grid,
                embed_dim=geometry.embed_dim, width=geometry.width, layers=geometry.layers, heads=geometry.heads,
                models={name: entry for name, (entry, _) in entries.items()},
                checkpoint_sha256=loaded.checkpoint_sha256, visual_weights_sha256=loaded.weights_sha256("visual"),
                history=list(old.history) if old else [],
            )
            if old is not None and TTA_GRAPH in old.models and not opts.tta:
                manifest.models[TTA_GRAPH] = old.models[TTA_GRAPH]  # class- and weight-independent
        if text_plan == "keep" and TEXT not in manifest.models:  # a new manifest: the text tower comes along
            manifest.models[TEXT] = copy.deepcopy(old.models[TEXT])
            manifest.text_vocabulary, manifest.text_recipe = old.text_vocabulary, old.text_recipe
        elif text_plan == "drop":
            made_from = str(old.models[TEXT].provenance.get(TEXT_WEIGHTS_KEY, ""))[:12] or "unknown"
            tx.remove_model(TEXT)
            manifest.models.pop(TEXT, None)
            manifest.text_vocabulary = manifest.text_recipe = ""
            tx.report(f"dropping text: it was made from other text-tower weights (sha256 {made_from}, now "
                      f"{loaded.weights_sha256('text')[:12]}); make it anew with "
                      f"`{remake_command(TEXT, opts.out)}`")
        elif text_plan == "export":
            recipes = [r for r in (_recipe_from_metadata(n, c.recipe) for n, c in sorted(kept.items())) if r]
            manifest.models[TEXT] = _export_text(opts, loaded, staging, recipes + list(to_encode.values()), progress)
        if opts.tta:
            progress(f"writing {TTA_GRAPH}.onnx ({opts.tta_steps} unrolled steps, {opts.tta_adapter} adapter)")
            manifest.models[TTA_GRAPH] = _write_tta_graph(opts, staging)
        if to_encode:
            progress(f"encoding prompts of {', '.join(to_encode)}"
                     + (f"; keeping {', '.join(sorted(kept))}" if kept else ""))
        if dropped:
            progress(f"dropping {', '.join(dropped)}")
        classes = {**kept, **_encode_classes(loaded, to_encode, opts.text_batch)}
        bank = PromptBank(dict(sorted(classes.items())), loaded.backbone, loaded.pretrained, manifest.embed_dim)
        write_prompts(staging / PROMPTS, bank, {"open_clip_version": open_clip.__version__,
                                                TEXT_WEIGHTS_KEY: loaded.weights_sha256("text")})
        placed = {path.name: tx.add_file(path.name, path, move=True) for path in sorted(staging.iterdir())}
    import onnx
    import onnxruntime

    for entry in manifest.models.values():
        entry.file = placed.get(entry.file, entry.file)
    manifest.prompts = placed[PROMPTS]
    if text_plan == "export":
        from .text_tower import RECIPE_FILE, VOCAB_FILE

        manifest.text_vocabulary, manifest.text_recipe = placed[VOCAB_FILE], placed[RECIPE_FILE]
    manifest.format_version = FORMAT_VERSION
    manifest.versions = {"anoclip": _version(), "open_clip": open_clip.__version__, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not reuse_visual or not manifest.command:  # the run that exported the visual model
        manifest.command, manifest.created = command, now
    tx.manifest = manifest
    tx.commit(command)
    return manifest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anoclip")
    except PackageNotFoundError:
        return "unknown"
