"""``anoclip-export``: V-V visual tower to ONNX, prompt embeddings to safetensors, one artifact folder."""

from __future__ import annotations

from pathlib import Path

import click

from anoclip.runtime.artifacts import read_manifest
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.integrity import resolve_inside
from anoclip.runtime.plumbing import configure_logging, given_command, run_guarded
from anoclip.runtime.prompt_weights import read_prompts

from .exporter import ExportOptions, run_export
from .model import DEFAULT_BACKBONE, Outliers, register_model_config, resolve_pretrained
from anoclip.runtime.prompts import DOMAINS


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


def parse_defect_type_options(values: tuple[str, ...], classes: list[str]) -> dict[str, tuple[str, ...]]:
    """``CLASS=scratch,dent`` options -> class -> its defect type names (each class one of --classes)."""
    from anoclip.runtime.prompts import parse_defect_types

    types = {}
    for value in values:
        name, sep, names = value.partition("=")
        name = name.strip()
        if not sep or not name or not names.strip():
            raise AnoclipError(f"--defect-types '{value}': write CLASS=scratch,dent,stain")
        if name not in classes:
            raise AnoclipError(f"--defect-types '{value}': {name} is not one of --classes ({', '.join(classes) or 'none'})")
        try:
            types[name] = parse_defect_types(names)
        except ValueError as exc:
            raise AnoclipError(f"--defect-types '{value}': {exc}") from None
    return types


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
@click.option("--defect-types", "type_opts", multiple=True, metavar="CLASS=A,B",
              help="Per-class kinds of defect, e.g. bottle=scratch,dent: each is encoded as 'a photo of a CLASS with "
                   "TYPE' through the class's templates, and regions above the pixel threshold are named after the "
                   "closest. The class must be in --classes. Repeatable.")
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
@click.option("--text-tower", is_flag=True,
              help="Also write text.onnx (token_ids [B,L], L the context length, 77 for CLIP -> text_embeds [B,D]: "
                   "open_clip's encode_text), the tokenizer's vocabulary and the prompt recipe, so a device can encode "
                   "classes of its own. Kept by later exports while the text tower's weights are unchanged.")
@click.option("--fused", is_flag=True,
              help="Also write anoclip.onnx: image -> scores and maps of every class of the folder (sorted) in one "
                   "graph, for trtexec, Triton, DeepStream or `anoclip predict --model fused` (see `anoclip fuse`).")
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
@click.option("--outlier-channels", default=0, show_default=True, type=click.IntRange(min=0),
              help="With --pretrained none: a stress model whose K residual-stream channels carry activations "
                   "--outlier-scale times larger, as trained CLIP towers do (|x| ~1000). Random weights lack them and "
                   "flatter int8; use this to test reduced precision. Tagged none+outliers-k<K>-s<S> in the manifest.")
@click.option("--outlier-scale", default=100.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Scale of the --outlier-channels (ln_pre gain, and the bias every MLP adds on them).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON when done.")
def export_command(backbone, pretrained, model_config, classes, classes_file, domain_opts, type_opts, out, opset, dynamic_batch,
                   vv_blocks, qkv_tokens, tta, tta_steps, tta_adapter, text_tower, fused, force, drop_classes, replace_classes,
                   reencode_prompts, check, atol, text_batch, seed, outlier_channels, outlier_scale, as_json):
    """Export an open_clip ViT with the V-V path to ONNX and bake the prompt embeddings of CLASSES.

    Writes OUT/manifest.json, OUT/visual.<sha>.onnx and OUT/prompts.<sha>.safetensors (names carry
    the start of their sha256); with --text-tower also OUT/text.<sha>.onnx, OUT/vocab.<sha>.txt.gz
    and OUT/text_recipe.<sha>.json. Run it again to add classes: the visual model is kept when it is
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
    defect_types = parse_defect_type_options(type_opts, names)
    outliers = Outliers(outlier_channels, outlier_scale, seed) if outlier_channels else None
    if outliers is not None and (pretrained or "").lower() != "none":
        raise AnoclipError("--outlier-channels makes a stress variant of random weights; use it with --pretrained none")
    if out:
        folder = Path(out)
    else:
        tag = outliers.label() if outliers is not None else resolve_pretrained(backbone, pretrained)
        folder = Path("artifacts") / f"{backbone}-{tag if outliers is not None else Path(tag).stem}"
    drop, _ = parse_classes(drop_classes, None)
    opts = ExportOptions(backbone, pretrained, folder, names, domains, opset, dynamic_batch, vv_blocks,
                         qkv_tokens, force, check, atol, text_batch, seed, tta, tta_steps, tta_adapter,
                         tuple(drop), replace_classes, reencode_prompts, outliers, text_tower, defect_types)
    manifest = run_export(opts, given_command(click.get_current_context(), "anoclip-export"))
    if fused:
        from .fused import fuse_folder

        fuse_folder(folder, command=given_command(click.get_current_context(), "anoclip-export"), report=click.echo)
        manifest = read_manifest(folder)
    bank = read_prompts(resolve_inside(folder, manifest.prompts))
    if as_json:
        click.echo(manifest.to_json())
    else:
        click.echo(f"{folder} holds: {', '.join(sorted(manifest.files))}")
        click.echo(f"classes: {', '.join(sorted(bank.classes))}")


def main() -> None:
    run_guarded(export_command)
