"""``anoclip-export``: V-V visual tower to ONNX, prompt embeddings to safetensors, one artifact folder."""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from anoclip.runtime.artifacts import (
    FORMAT_VERSION, PROMPTS, TTA_GRAPH, VISUAL, VISUAL_QKV, ClassPrompts, Manifest, ModelEntry, PromptBank,
    check_prompts_belong, read_manifest, read_prompts, verify_files, write_manifest, write_prompts,
)
from anoclip.runtime.errors import AnoclipError, ArtifactError
from anoclip.runtime.integrity import resolve_inside
from anoclip.runtime.plumbing import configure_logging, ensure_writable_folder, run_guarded

from .folder import folder_lock, has_manifest, place, remove_unreferenced, staging_folder, sync_folder
from .model import DEFAULT_BACKBONE, LoadedModel, load_model, register_model_config, resolve_pretrained
from .prompts import DOMAINS, PromptRecipe, class_embeddings, encode_sentences

log = logging.getLogger(__name__)

TEXT_WEIGHTS_KEY = "text_weights_sha256"  # prompt weights metadata: the text tower they were encoded with


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


def parse_classes(classes: str | None, classes_file: str | None) -> tuple[list[str], dict[str, str]]:
    """Class names from ``a,b,c`` and from a file of ``name`` or ``name = domain`` lines."""
    names: list[str] = []
    domains: dict[str, str] = {}
    if classes:
        names += [c.strip() for c in classes.split(",") if c.strip()]
    if classes_file:
        path = Path(classes_file)
        if not path.is_file():
            raise AnoclipError(f"classes file {path} does not exist")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, domain = (part.strip() for part in line.partition("="))
            if not name:
                raise AnoclipError(f"{path}:{number}: empty class name; write `name` or `name = object|texture|phrases`")
            names.append(name)
            if domain:
                domains[name] = domain
    seen = set()
    unique = [n for n in names if not (n in seen or seen.add(n))]
    return unique, domains


def parse_domains(values: tuple[str, ...]) -> dict[str, str]:
    domains = {}
    for value in values:
        name, sep, domain = value.partition("=")
        if not sep or not name.strip() or not domain.strip():
            raise AnoclipError(f"--domain '{value}': write CLASS=object, CLASS=texture or CLASS='phrase one|phrase two'")
        domains[name.strip()] = domain.strip()
    return domains


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
        verify_files(opts.out, manifest, [manifest.models[n].file for n in wanted])
    except ArtifactError:
        return False
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
        return PromptRecipe(name, str(meta["class_phrase"]), str(meta["domain"]), tuple(meta["domain_phrases"]))
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
        recipe = PromptRecipe.for_class(name, opts.domains.get(name))
        stored = _recipe_from_metadata(name, kept[name].recipe) if name in kept else None
        if stored is not None and (stored.phrase, stored.domain_phrases) == (recipe.phrase, recipe.domain_phrases):
            continue  # baked already with the same sentences
        kept.pop(name, None)
        encode[name] = recipe
    return kept, encode, dropped


def _encode_classes(loaded: LoadedModel, recipes: dict[str, PromptRecipe], text_batch: int) -> dict[str, ClassPrompts]:
    from tqdm import tqdm

    encoded = {}
    for name, recipe in recipes.items():
        normal, abnormal = recipe.sentences()
        with tqdm(total=len(normal) + len(abnormal), desc=f"prompts {name}", unit="sent", file=sys.stderr,
                  disable=None) as bar:
            raw_normal = encode_sentences(loaded.encode_text, normal, text_batch, bar)
            raw_abnormal = encode_sentences(loaded.encode_text, abnormal, text_batch, bar)
        text, prompts = class_embeddings(raw_normal, raw_abnormal)
        meta = recipe.as_metadata()
        meta["sentences_per_state"] = len(normal)
        encoded[name] = ClassPrompts(name, text, prompts, meta)
    return encoded


def _read_old(folder: Path) -> tuple[Manifest | None, PromptBank | None]:
    """The folder's manifest and prompt weights, if it holds a loadable export."""
    if not has_manifest(folder):
        return None, None
    manifest = read_manifest(folder)
    prompts = resolve_inside(folder, manifest.prompts)
    bank = read_prompts(prompts) if prompts.is_file() else None
    if bank is not None:
        check_prompts_belong(manifest, bank, str(folder))
    return manifest, bank


def run_export(opts: ExportOptions, argv: list[str]) -> Manifest:
    """Export into ``opts.out`` as two idempotent steps, visual models and prompt weights.

    The visual models are kept when they match the options; the prompt weights keep every class
    already baked (re-encoded from their recipes when the weights changed) unless
    ``--drop-classes``/``--replace-classes`` say otherwise. Files are placed under new names and
    the manifest is replaced last, so a folder that loaded before loads after any interruption.
    """
    def progress(message: str) -> None:
        click.echo(f"[anoclip-export] {message}", err=True)

    if not has_manifest(opts.out) and not opts.classes:
        raise AnoclipError("no classes given; pass --classes a,b,c or --classes-file FILE")
    created = ensure_writable_folder(opts.out)
    try:
        with folder_lock(opts.out):
            remove_unreferenced(opts.out, _still_named(opts.out))
            return _export_locked(opts, argv, progress)
    except BaseException:
        if created and not has_manifest(opts.out):
            shutil.rmtree(opts.out, ignore_errors=True)
        raise


def _still_named(folder: Path) -> set[str]:
    """The files the folder's manifest names (all owned files when it cannot be read)."""
    try:
        manifest, _ = _read_old(folder)
    except ArtifactError:
        return {p.name for p in folder.iterdir()}
    return set(manifest.files) | {manifest.prompts} if manifest else set()


def _export_locked(opts: ExportOptions, argv: list[str], progress) -> Manifest:
    import open_clip
    import torch

    try:
        old, old_bank = _read_old(opts.out)
    except ArtifactError as exc:
        if not opts.force:
            raise ArtifactError(f"{exc}; or pass --force to export into it anew") from None
        log.warning("%s cannot be read (%s); exporting into it anew", opts.out, exc)
        old, old_bank = None, None
    progress(f"creating {opts.backbone} with weights '{resolve_pretrained(opts.backbone, opts.pretrained)}'")
    torch.manual_seed(opts.seed)  # random weights (`--pretrained none`) repeat from run to run
    loaded = load_model(opts.backbone, opts.pretrained)
    if old is not None and not _same_weights(old, loaded) and not opts.force:
        other = f"{old.backbone} / {old.pretrained}"
        raise ArtifactError(
            f"{opts.out} holds an export of {other if other != f'{loaded.backbone} / {loaded.pretrained}' else 'other weights'}, "
            f"not of {loaded.backbone} / {loaded.pretrained} as loaded now; choose another --out, or pass --force to "
            "replace the visual model (its classes are kept and re-encoded)"
        )
    reuse_visual = _visual_reusable(opts, loaded, old)
    kept, to_encode, dropped = _plan_classes(opts, old_bank, _text_changed(old, old_bank, loaded))
    if reuse_visual and not to_encode and not dropped and not opts.tta:
        progress(f"{opts.out} is up to date (classes: {', '.join(sorted(kept)) or 'none'}); nothing to do")
        return old
    if not kept and not to_encode:
        raise AnoclipError(f"the export would leave {opts.out} without classes; pass --classes")
    with staging_folder(opts.out) as staging:
        if reuse_visual:
            progress(f"visual model in {opts.out} is up to date; writing prompts only")
            manifest = old
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
        placed = place(staging, opts.out)
    import onnx
    import onnxruntime

    for entry in manifest.models.values():
        if entry.file in placed:
            entry.file = placed[entry.file][0]
    manifest.prompts = placed[PROMPTS][0]
    old_files = old.files if old else {}
    manifest.files = {entry.file: _sha_of(entry.file, placed, old_files) for entry in manifest.models.values()}
    manifest.files[manifest.prompts] = placed[PROMPTS][1]
    manifest.format_version = FORMAT_VERSION
    manifest.versions = {"anoclip": _version(), "open_clip": open_clip.__version__, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    command = " ".join(shlex.quote(a) for a in argv)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if not reuse_visual or not manifest.command:  # the run that exported the visual model
        manifest.command, manifest.created = command, now
    manifest.history.append(f"{now} {command}")
    write_manifest(opts.out, manifest)  # the commit point
    sync_folder(opts.out)
    remove_unreferenced(opts.out, set(manifest.files) | {manifest.prompts})
    return manifest


def _sha_of(name: str, placed: dict[str, tuple[str, str]], old_files: dict[str, str]) -> str:
    for final, sha in placed.values():
        if final == name:
            return sha
    return old_files[name]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anoclip")
    except PackageNotFoundError:
        return "unknown"


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="open_clip ViT model name (every dimension is read from the model).")
@click.option("--pretrained", default=None,
              help="open_clip pretrained tag (default: laion400m_e32 for ViT-B-16-plus-240, else the first tag), "
                   "a local checkpoint file (state dict .pt/.pth/.bin or .safetensors), or 'none' for random weights.")
@click.option("--model-config", type=click.Path(dir_okay=False), default=None,
              help="Register an open_clip JSON model config; use its file stem as --backbone.")
@click.option("--classes", default=None, help="Comma-separated class names or phrases, e.g. bottle,metal_nut,carpet.")
@click.option("--classes-file", type=click.Path(dir_okay=False), default=None,
              help="File with one class per line: `name` or `name = object|texture|phrase one|phrase two`.")
@click.option("--domain", "domain_opts", multiple=True, metavar="CLASS=DOMAIN",
              help="Per-class domain: object, texture, or your own '|'-separated phrases replacing 'photo'. "
                   "Default: texture for carpet, grid, leather, tile, wood; object otherwise. Repeatable.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Artifact folder (default: artifacts/<backbone>-<pretrained>). Adding classes to an existing "
                   "folder keeps its visual model.")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17, 21), help="ONNX opset.")
@click.option("--dynamic-batch", is_flag=True, help="Export with a dynamic batch axis (default: static batch 1).")
@click.option("--vv-blocks", type=click.IntRange(min=1), default=None,
              help="Rewrite only the last K blocks with V-V attention (default: all; 1 = the last-layer ablation).")
@click.option("--qkv-tokens", type=click.Choice(["none", "add", "model"]), default="none", show_default=True,
              help="Plain-CLIP QKV patch tokens (the Table 3/7 baseline): 'add' adds an output qkv_patch_embeds to "
                   "visual.onnx; 'model' also writes visual_qkv.onnx whose patch_embeds are the QKV tokens.")
@click.option("--tta", is_flag=True,
              help="Also write tta.onnx: the AnoCLIP+ adapter loop (steps, gradients, AdamW) as one ONNX graph "
                   "that onnxruntime or TensorRT can run next to the model (`anoclip predict --tta-backend onnx`).")
@click.option("--tta-steps", default=5, show_default=True, type=click.IntRange(min=1), help="Steps unrolled in tta.onnx.")
@click.option("--tta-adapter", default="text", show_default=True, type=click.Choice(["text", "linear"]),
              help="Adapter of tta.onnx: text (authors' MVTec code) or linear (their VisA script).")
@click.option("--force", is_flag=True,
              help="Re-export the visual model even when the folder's one is up to date, or replace one of another "
                   "backbone/weights; the classes already baked are kept (re-encoded when the weights change).")
@click.option("--drop-classes", default=None, metavar="A,B", help="Remove these classes from the prompt weights.")
@click.option("--replace-classes", is_flag=True,
              help="The folder's classes become exactly --classes (the others are dropped).")
@click.option("--reencode-prompts", is_flag=True,
              help="Encode the prompts of every class again from its recipe (the visual model is kept if up to date).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check ONNX Runtime (CPU) against the PyTorch reference after export.")
@click.option("--atol", default=1e-4, show_default=True, type=float, help="Largest allowed abs difference in the check.")
@click.option("--text-batch", default=128, show_default=True, type=click.IntRange(min=1),
              help="Sentences per text-encoder batch.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights (--pretrained none).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON when done.")
def export_command(backbone, pretrained, model_config, classes, classes_file, domain_opts, out, opset, dynamic_batch,
                   vv_blocks, qkv_tokens, tta, tta_steps, tta_adapter, force, drop_classes, replace_classes,
                   reencode_prompts, check, atol, text_batch, seed, as_json):
    """Export an open_clip ViT with the V-V path to ONNX and bake the prompt embeddings of CLASSES.

    Writes OUT/manifest.json, OUT/visual.<sha>.onnx and OUT/prompts.<sha>.safetensors (names carry
    the start of their sha256). Run it again to add classes: the visual model is kept when it is
    up to date and the classes already baked are never dropped unless --drop-classes or
    --replace-classes say so. The manifest is written last; an interrupted export leaves the folder
    as it was, and running the same command twice changes nothing.
    """
    configure_logging()
    if model_config:
        backbone = register_model_config(model_config)
    names, file_domains = parse_classes(classes, classes_file)
    domains = {**file_domains, **parse_domains(domain_opts)}
    for name, domain in domains.items():
        if domain not in DOMAINS and not domain.replace("|", "").strip():
            raise AnoclipError(f"domain for {name} is empty")
    if out:
        folder = Path(out)
    else:
        tag = resolve_pretrained(backbone, pretrained)
        folder = Path("artifacts") / f"{backbone}-{Path(tag).stem}"
    drop, _ = parse_classes(drop_classes, None)
    opts = ExportOptions(backbone, pretrained, folder, names, domains, opset, dynamic_batch, vv_blocks,
                         qkv_tokens, force, check, atol, text_batch, seed, tta, tta_steps, tta_adapter,
                         tuple(drop), replace_classes, reencode_prompts)
    manifest = run_export(opts, _command_line(click.get_current_context()))
    bank = read_prompts(resolve_inside(folder, manifest.prompts))
    if as_json:
        click.echo(manifest.to_json())
    else:
        click.echo(f"wrote {folder}: {', '.join(sorted(manifest.files))}")
        click.echo(f"classes: {', '.join(sorted(bank.classes))}")


def _command_line(ctx: click.Context) -> list[str]:
    """The export command as it was given (options that differ from their defaults)."""
    words = ["anoclip-export"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        given = ctx.get_parameter_source(param.name) not in (click.core.ParameterSource.DEFAULT, None)
        if not isinstance(param, click.Option) or not given or value in (None, ()):
            continue
        flag = param.opts[0]
        if param.is_flag:
            words.append(flag if value else param.secondary_opts[0])
            continue
        for item in value if param.multiple else (value,):
            words += [flag, str(item)]
    return words


def main() -> None:
    run_guarded(export_command)
