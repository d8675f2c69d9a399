"""A model repository for stock Triton Inference Server containers: ``anoclip export-triton``.

``tritonserver --model-repository REPO`` then serves the folder's graphs with no Python of ours::

    REPO/
      anoclip_fused/             the fused graph (image -> scores, maps, patch_scores of K classes, and
        config.pbtxt             every further output its manifest entry lists: the branch scores and
                                 maps of a baked memory, the decision of baked thresholds), or
                                 anoclip_visual/ (image -> embeddings) when the folder has none
        classes.txt              class order of the scores output (Triton's label file)
        1/model.onnx
      anoclip_visual_trt_<precision>/   per TensorRT engine of the folder (``anoclip build-engine``):
        config.pbtxt             its plan, whose outputs are those of the model it was built from
        1/model.plan

``config.pbtxt`` takes names, data types and dims from the manifest: a dynamic-batch model gets
``max_batch_size`` and dynamic batching (the batch axis leaves ``dims``); a fixed-batch one
``max_batch_size: 0`` with the full shape. Inputs are the normalised image the model takes (mean and
std in the ``parameters`` and, for the fused graph, in its ONNX metadata). The repository is written
in a staging folder beside REPO and renamed into place: a run that stops leaves no half repository.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import click

from anoclip.runtime.artifacts import FUSED, VISUAL, Artifacts, ModelEntry, load_artifacts, read_manifest, verify_files
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.fused import DECISION_OUTPUTS, fused_classes
from anoclip.runtime.integrity import resolve_inside
from anoclip.runtime.plumbing import configure_logging, sync_folder

log = logging.getLogger(__name__)

KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}


def _dims(shape: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor(name: str, shape: list[int], batched: bool, extra: str = "") -> str:
    dims = shape[1:] if batched else shape
    kind = "TYPE_BOOL" if name in DECISION_OUTPUTS else "TYPE_FP32"  # the fused graph's decision is bool
    return f'  {{ name: "{name}" data_type: {kind} dims: {_dims(dims)}{extra} }}'


def model_config(name: str, platform: str, entry: ModelEntry, *, max_batch: int, queue_delay_us: int,
                 instances: int, kind: str, parameters: dict[str, str], accelerator: str | None = None,
                 labels: bool = False) -> str:
    """The text of one ``config.pbtxt`` (Triton's ModelConfig in protobuf text format)."""
    batched = next(iter(entry.inputs.values()))[0] == -1
    if not batched and any(shape[0] == -1 for shape in entry.outputs.values()):
        raise AnoclipError(f"{name}: outputs with a dynamic batch behind a fixed-batch input; re-export the model")
    inputs = [_tensor(n, s, batched) for n, s in entry.inputs.items()]
    outputs = [_tensor(n, s, batched, ' label_filename: "classes.txt"' if labels and n == "scores" else "")
               for n, s in entry.outputs.items()]
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch if batched else 0}",
             "input [", ",\n".join(inputs), "]", "output [", ",\n".join(outputs), "]",
             f"instance_group [ {{ count: {instances} kind: {kind} }} ]"]
    if batched:
        preferred = sorted({b for b in (max_batch // 2, max_batch) if b > 1})
        lines.append(f"dynamic_batching {{ preferred_batch_size: {_dims(preferred)} "
                     f"max_queue_delay_microseconds: {queue_delay_us} }}")
    if accelerator is not None:
        lines.append('optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
                     f'parameters {{ key: "precision_mode" value: "{accelerator.upper()}" }} }} ] }} }}')
    for key, value in parameters.items():
        lines.append(f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


def _parameters(artifacts: Artifacts, model: str) -> dict[str, str]:
    manifest = artifacts.manifest
    values = {"anoclip.model": model, "anoclip.backbone": manifest.backbone, "anoclip.pretrained": manifest.pretrained,
              "anoclip.mean": json.dumps(list(manifest.mean)), "anoclip.std": json.dumps(list(manifest.std)),
              "anoclip.image_size": json.dumps(list(manifest.image_size)), "anoclip.grid": json.dumps(list(manifest.grid))}
    if model == FUSED:
        values["anoclip.classes"] = json.dumps(fused_classes(artifacts))
    return values


def _place(source: Path, target: Path) -> None:
    """A hard link when the repository is on the artifacts' file system, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_repository(artifacts_dir: str | os.PathLike, out: str | os.PathLike, *, model: str = "auto",
                     max_batch: int = 8, queue_delay_us: int = 2000, instances: int = 1, kind: str = "gpu",
                     accelerator: str | None = None, force: bool = False, report=log.info) -> list[str]:
    """Write the repository; the names of the Triton models in it."""
    folder, out = Path(artifacts_dir), Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise AnoclipError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    if model not in ("auto", FUSED, VISUAL):
        raise AnoclipError(f"--model {model}: a repository serves the fused graph or the visual model")
    if model == "auto":
        model = FUSED if FUSED in read_manifest(folder).models else VISUAL
    artifacts = load_artifacts(folder, models=[model], load_thresholds=False)
    manifest, entry = artifacts.manifest, artifacts.manifest.models[model]
    name = f"anoclip_{model}"
    parameters = _parameters(artifacts, model)
    if entry.inputs["image"][0] != -1:  # the exported input is always "image"
        report(f"{model} has a fixed batch of {entry.inputs['image'][0]}: no dynamic batching; re-export with "
               "`anoclip-export --dynamic-batch` (and `anoclip fuse`) to batch requests")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = []
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        staging = Path(tmp) / "repository"
        _place(artifacts.model_path(model), staging / name / "1" / "model.onnx")
        (staging / name / "config.pbtxt").write_text(model_config(
            name, "onnxruntime_onnx", entry, max_batch=max_batch, queue_delay_us=queue_delay_us, instances=instances,
            kind=KINDS[kind], parameters=parameters, accelerator=accelerator, labels=model == FUSED))
        if model == FUSED:
            (staging / name / "classes.txt").write_text("\n".join(json.loads(parameters["anoclip.classes"])) + "\n")
        names.append(name)
        for sidecar in artifacts.engines():
            source = manifest.models.get(sidecar.source_model)
            if source is None or manifest.files.get(source.file) != sidecar.source_sha256:
                continue  # built from a model file the folder no longer has
            verify_files(folder, manifest, [sidecar.engine])
            plan_name = f"anoclip_{sidecar.source_model}_trt_{sidecar.precision}"
            plan_entry = replace(source, inputs={sidecar.input_name: list(sidecar.input_shape)})
            _place(resolve_inside(folder, sidecar.engine), staging / plan_name / "1" / "model.plan")
            (staging / plan_name / "config.pbtxt").write_text(model_config(
                plan_name, "tensorrt_plan", plan_entry, max_batch=min(max_batch, sidecar.profile.max),
                queue_delay_us=queue_delay_us, instances=instances, kind="KIND_GPU",
                parameters={**_parameters(artifacts, VISUAL), "anoclip.model": sidecar.source_model,
                            "anoclip.tensorrt": sidecar.tensorrt_version, "anoclip.gpu": sidecar.gpu_name}))
            names.append(plan_name)
            report(f"{plan_name}: TensorRT {sidecar.tensorrt_version} plan for {sidecar.gpu_name} (runs only there)")
        sync_folder(staging)
        if out.exists():
            old = Path(tmp) / "old"
            os.replace(out, old)
        os.replace(staging, out)
        sync_folder(out.parent)
    for model_name in names:
        report(f"wrote {out / model_name}")
    return names


@click.command("export-triton", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export (with `anoclip fuse` for the maps graph).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model repository folder to write.")
@click.option("--model", default="auto", show_default=True, type=click.Choice(["auto", "fused", "visual"]),
              help="auto: the fused graph (scores and maps) when the folder has one, else the visual model.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="max_batch_size of a dynamic-batch model (Triton batches requests up to it).")
@click.option("--max-queue-delay-us", default=2000, show_default=True, type=click.IntRange(min=0),
              help="How long Triton holds a request to fill a batch.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="Model instances per device (instance_group count).")
@click.option("--kind", default="gpu", show_default=True, type=click.Choice(sorted(KINDS)),
              help="Where the onnxruntime model runs (instance_group kind).")
@click.option("--tensorrt-accelerator", "accelerator", default=None, type=click.Choice(["fp32", "fp16"]),
              help="Let Triton's onnxruntime backend run the graph through TensorRT at this precision.")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def export_triton_command(artifacts_dir, out, model, max_batch, max_queue_delay_us, instances, kind, accelerator,
                          force):
    """Write a Triton model repository from an artifact folder: `tritonserver --model-repository OUT`
    serves it in a stock Triton container, no anoclip needed there."""
    configure_logging()
    write_repository(artifacts_dir, out, model=model, max_batch=max_batch, queue_delay_us=max_queue_delay_us,
                     instances=instances, kind=kind, accelerator=accelerator, force=force, report=click.echo)
