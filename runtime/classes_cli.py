"""``anoclip classes``: add, list and remove the classes of an artifact folder on the device, with
the exported text tower (no PyTorch, no open_clip)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .options import threads_option, verbose_option
from .plumbing import configure_logging, given_command

MAX_NAME = 64  # characters: longer is not a part name (and its sentences would not fit the context)


def _store(folder: Path, bank, command: str) -> str:
    """Commit ``bank`` as the folder's prompt weights (the transaction says what became stale); the file's name."""
    from .artifacts import PROMPTS
    from .folder import transaction
    from .prompt_weights import write_prompts

    with transaction(folder, wait=5.0) as tx:
        with tx.staging() as staging:
            path = staging / PROMPTS
            write_prompts(path, bank)
            tx.manifest.prompts = tx.add_file(PROMPTS, path, move=True)
        tx.commit(command)
    return tx.manifest.prompts


def _check_name(name: str, encoder) -> None:
    from .errors import AnoclipError

    if not name.strip() or name != name.strip():
        raise AnoclipError(f"class name {name!r} is empty or starts or ends with spaces; give the part's name")
    if len(name) > MAX_NAME:
        raise AnoclipError(f"class name {name[:20]!r}... has {len(name)} characters, more than {MAX_NAME}; give the "
                           "part's name, and --phrase for a longer description")
    if "/" in name:
        raise AnoclipError(f"class name {name!r} holds '/', which names tensors in the prompt weights; use another")


@click.group("classes", context_settings={"help_option_names": ["-h", "--help"]})
def classes_group():
    """Add, list and remove classes on the device (no PyTorch).

    The folder needs the text tower (`anoclip-export --text-tower`): `add` tokenizes the class's
    prompt ensemble (the templates and state words the export recorded) and encodes it with the
    text model, as the export would; the other classes and every derived file that stays valid are
    kept, and what becomes stale is said with the command that remakes it.
    """


@classes_group.command("add")
@click.argument("name")
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder exported with --text-tower.")
@click.option("--domain", default=None,
              help="object, texture, or your own phrases separated by '|' (e.g. 'x-ray image|radiograph'): what "
                   "replaces 'photo' in the templates. Default: texture for MVTec's textures, object otherwise.")
@click.option("--phrase", default=None, help="The words the sentences use for the part (default: NAME).")
@click.option("--defect-types", default=None, metavar="A,B,C",
              help="Kinds of defect (e.g. scratch,dent,stain): each is encoded as 'a photo of a NAME with TYPE' through "
                   "the class's templates, and every region above the pixel threshold is named after the closest one.")
@click.option("--replace", is_flag=True, help="Encode a class the folder has again (its thresholds become stale).")
@click.option("--backend", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "tensorrt", "openvino"]),
              help="What runs the text model: onnxruntime's CPU, CUDA or TensorRT provider, or OpenVINO on the CPU.")
@threads_option()
@verbose_option
def add_command(name, artifacts_dir, domain, phrase, defect_types, replace, backend, threads, verbose):
    """Encode a new class NAME into the folder's prompt weights."""
    from .errors import AnoclipError
    from .plumbing import ensure_writable_folder
    from .prompts import parse_defect_types
    from .text_encoder import TextEncoder, with_class

    configure_logging(verbose)
    folder = Path(artifacts_dir)
    try:
        parse_defect_types(defect_types)
    except ValueError as exc:
        raise AnoclipError(f"--defect-types: {exc}") from None
    encoder = TextEncoder(folder, backend=backend, threads=threads)
    _check_name(name, encoder)
    if name in encoder.bank.classes and not replace:
        raise AnoclipError(f"class {name} is in {folder} already; --replace encodes it again")
    ensure_writable_folder(folder, "--artifacts")
    started = time.perf_counter()
    try:
        prompts = encoder.class_prompts(name, domain, phrase, parse_defect_types(defect_types))
    except ValueError as exc:  # the tokenizer refuses text it cannot match open_clip on
        raise AnoclipError(f"class {name!r}: {exc}") from None
    file = _store(folder, with_class(encoder.bank, prompts), given_command(click.get_current_context(), "anoclip",
                                                                         "classes", "add"))
    sentences = 2 * int(prompts.recipe["sentences_per_state"])
    types = f" and {len(prompts.defect_types)} defect types ({', '.join(prompts.defect_types)})" \
        if prompts.defect_types else ""
    click.echo(f"{name}: {sentences} sentences{types} encoded in {time.perf_counter() - started:.1f} s; stored in "
               f"{folder / file}", err=True)


@classes_group.command("remove")
@click.argument("name")
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder.")
@verbose_option
def remove_command(name, artifacts_dir, verbose):
    """Take class NAME out of the folder's prompt weights (its thresholds are then stale)."""
    from .artifacts import read_manifest, verify_files
    from .integrity import resolve_inside
    from .plumbing import ensure_writable_folder
    from .prompt_weights import read_prompts
    from .text_encoder import with_class

    configure_logging(verbose)
    folder = Path(artifacts_dir)
    manifest = read_manifest(folder)
    verify_files(folder, manifest, [manifest.prompts])
    bank = read_prompts(resolve_inside(folder, manifest.prompts))
    bank.get(name)  # an unknown class is one line naming those there are
    if len(bank.classes) == 1:
        from .errors import AnoclipError

        raise AnoclipError(f"{name} is the only class of {folder}; add another first")
    ensure_writable_folder(folder, "--artifacts")
    _store(folder, with_class(bank, None, remove=name), given_command(click.get_current_context(), "anoclip",
                                                                      "classes", "remove"))
    click.echo(f"removed {name} from {folder}", err=True)


@classes_group.command("list")
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def list_command(artifacts_dir, as_json):
    """The folder's classes: recipe, and what exists for each (thresholds, memory, fused graph)."""
    from .artifacts import FUSED, load_artifacts
    from .thresholds import text_features_sha256

    artifacts = load_artifacts(artifacts_dir, verify=True)
    fused = artifacts.manifest.models.get(FUSED)
    baked = fused.provenance.get("text_sha256", {}) if fused is not None else {}
    rows = []
    for name, cls in sorted(artifacts.prompts.classes.items()):
        sha = text_features_sha256(cls.text_features)
        record = artifacts.thresholds.classes.get(name) if artifacts.thresholds is not None else None
        memory = artifacts.memory.classes.get(name) if artifacts.memory is not None else None
        rows.append({
            "class": name, "phrase": cls.recipe.get("class_phrase", name), "domain": cls.recipe.get("domain", ""),
            "sentences": 2 * int(cls.recipe.get("sentences_per_state", 0)),
            "encoded_by": cls.recipe.get("encoded_by", "anoclip-export"), "created": cls.recipe.get("created"), "defect_types": list(cls.defect_types),
            "thresholds": None if record is None else ("stale" if record.text_features_sha256 != sha else "calibrated"),
            "memory_rows": None if memory is None else int(memory.patches.shape[0]),
            "fused": None if fused is None else ("in the graph" if baked.get(name) == sha else
                                                 ("stale" if name in baked else "not in the graph")),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        types = f", defect types {', '.join(row['defect_types'])}" if row["defect_types"] else ""
        made = f" by {row['encoded_by']}" + (f" at {row['created']}" if row["created"] else "")
        click.echo(f"{row['class']}: phrase {row['phrase']!r}, domain {row['domain']}, {row['sentences']} sentences{types}"
                   f" (encoded{made}); "
                   f"thresholds {row['thresholds'] or 'none'}, memory "
                   f"{str(row['memory_rows']) + ' rows' if row['memory_rows'] else 'none'}, fused graph "
                   f"{row['fused'] or 'none'}")
