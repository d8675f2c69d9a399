"""Building the TensorRT engine of an artifact folder's visual model, on the machine that will run it
(``anoclip build-engine``; the file format is the runtime's ``anoclip.runtime.engine``).

TensorRT's Python API only (no PyTorch): parse the ONNX file, set an optimisation profile on the
image input, build, then run the new plan and onnxruntime's CPU fp32 session on the same few images
and record how close they came (the sidecar's ``parity``).

Which network is built (:func:`network_plan`):

* fp32: the ``visual`` model, strongly typed (every tensor fp32; TF32 math switched off).
* fp16: the ``visual_fp16`` model, strongly typed (its types decide: LayerNorm and Softmax stay in
  whatever type the fp16 conversion left them). Without that file TensorRT 10.x can still build a
  weakly typed network from ``visual`` with the FP16 builder flag, LayerNormalization and Softmax
  layers pinned to fp32 (layer precision + OBEY_PRECISION_CONSTRAINTS); TensorRT 11 removed weak
  typing, so there the fp16 model file is required.
* int8: the Q/DQ ``visual_int8`` model, strongly typed (explicit quantization: no INT8 flag, no
  calibrator, both of which TensorRT 11 removed).

Nothing reaches the folder before the build and the parity run are over; then, under the folder
lock, the plan and its sidecar are written under content-addressed names (each through a temporary
file and one rename) and the manifest, which names and hashes both, is replaced: the commit point.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from anoclip.runtime.artifacts import MAKE_MODEL, content_addressed, load_artifacts, read_manifest
from anoclip.runtime.engine import (GPU, BatchProfile, EngineSidecar, engine_base_name, engine_candidates,
                                    load_engine_sidecars, sidecar_name)
from anoclip.runtime.errors import AnoclipError, BackendError
from anoclip.runtime.fidelity import agreement
from anoclip.runtime.folder import transaction
from anoclip.runtime.gpu import probe_gpu, release
from anoclip.runtime.plumbing import atomic_write_bytes
from anoclip.runtime.vocabulary import PRECISION_MODELS, PRECISIONS, VISUAL, VISUAL_FP16

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_PROFILE = BatchProfile(1, 1, 8)
LOCK_WAIT_S = 5.0
INSTALL_TENSORRT = ("`anoclip build-engine` needs TensorRT's Python package: `pip install tensorrt` on a desktop GPU "
                    "(TensorRT 10.x or 11.x), or JetPack's `sudo apt install python3-libnvinfer` on a Jetson")


# ----------------------------------------------------------------------------------------------
# Options


def parse_batch_spec(text: str) -> BatchProfile:
    """``"N"`` -> 1:N:N (any batch up to N, tuned for N); ``"MIN:OPT:MAX"`` as given."""
    parts = str(text).strip().split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--batch takes N or MIN:OPT:MAX (whole numbers), got {text!r}") from None
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3:
        raise ValueError(f"--batch takes N or MIN:OPT:MAX, got {text!r}")
    return BatchProfile(*values)


def workspace_bytes(gib: float | None) -> int:
    """GiB -> bytes; None or 0 -> 0 (TensorRT's own limit: the GPU's memory)."""
    if gib is None or gib == 0:
        return 0
    if not (isinstance(gib, (int, float)) and math.isfinite(gib) and gib > 0):
        raise ValueError(f"--workspace must be a positive number of GiB, got {gib!r}")
    return int(gib * (1 << 30))


def profile_for(input_shape: list[int], spec: BatchProfile | None, folder: str | os.PathLike = "DIR") -> BatchProfile:
    """The batch profile of the build: the model's fixed batch, or ``spec`` (default 1:1:8) for a
    model exported with a dynamic batch axis."""
    batch = input_shape[0]
    if batch > 0:
        fixed = BatchProfile(batch, batch, batch)
        if spec is not None and spec != fixed:
            raise AnoclipError(f"the visual model of {folder} was exported with a fixed batch of {batch}, so "
                               f"--batch {spec} cannot be built; re-export it with `anoclip-export --dynamic-batch "
                               f"--out {folder}` or leave out --batch")
        return fixed
    return spec or DEFAULT_DYNAMIC_PROFILE


@dataclass(frozen=True)
class NetworkPlan:
    """How the network of a build is made: from which manifest model, strongly typed or not."""

    source_model: str
    strongly_typed: bool
    fp16_flag: bool = False  # weakly typed fp16 (TensorRT 10.x only)
    pin_fp32: bool = False  # LayerNormalization and Softmax layers kept in fp32
    clear_tf32: bool = False  # fp32 means fp32 math too


def network_plan(tensorrt_version: str, precision: str, models: Iterable[str], folder: str | os.PathLike) -> NetworkPlan:
    """The network for ``precision`` with this TensorRT release and the folder's models; an
    AnoclipError naming the command that makes a missing model file."""
    if precision not in PRECISIONS:
        raise AnoclipError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    major = release(tensorrt_version)[0]
    if major < 10:
        raise AnoclipError(f"TensorRT {tensorrt_version} is too old: engines are built with TensorRT 10.x or 11.x; "
                           "upgrade it (JetPack 6 ships 10.3)")
    models = set(models)
    wanted = PRECISION_MODELS[precision]
    if precision == "fp32":
        return NetworkPlan(VISUAL, strongly_typed=True, clear_tf32=True)
    if wanted in models:
        return NetworkPlan(wanted, strongly_typed=True)
    make = MAKE_MODEL[wanted].format(folder=folder)
    if precision == "fp16" and major == 10:
        return NetworkPlan(VISUAL, strongly_typed=False, fp16_flag=True, pin_fp32=True)
    if precision == "fp16":
        raise AnoclipError(f"{folder} has no fp16 model and TensorRT {tensorrt_version} builds only strongly typed "
                           f"networks (no fp16 builder flag since 11.0); make the fp16 model with `{make}`")
    raise AnoclipError(f"{folder} has no int8 (Q/DQ) model; make it with `{make}`")


# ----------------------------------------------------------------------------------------------
# Building


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the package is there, its libraries are not
        raise AnoclipError(f"{INSTALL_TENSORRT} ({exc})") from None
    return tensorrt


def parser_error_lines(parser) -> list[str]:
    """Every error the ONNX parser recorded, one line each."""
    lines = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = ""
        try:
            node, name, op = error.node(), error.node_name(), error.node_operator()
            if node >= 0 or name:
                where = f" (node {node} {name or ''} {op or ''})".replace("  ", " ").replace(" )", ")")
        except AttributeError:  # older parsers report the node index only
            pass
        lines.append(f"{error.code()}: {error.desc()}{where}")
    return lines


def _require(value, what: str):
    if value is None:
        raise AnoclipError(f"TensorRT could not {what} (its log above says why)")
    return value


def pin_fp32_layers(trt, network) -> int:
    """Keep LayerNormalization and Softmax layers in fp32 in a weakly typed fp16 network (10.x)."""
    pinned = 0
    kinds = (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in kinds:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def compile_plan(trt, onnx_path: Path, plan: NetworkPlan, input_name: str, input_shape: list[int],
                 profile: BatchProfile, workspace: int, timing_cache: Path | None) -> tuple[bytes, int]:
    """Build the serialised plan; (plan bytes, layers pinned to fp32)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = _require(trt.Builder(logger), "create a builder")
    flags = 0
    if plan.strongly_typed and release(trt.__version__)[0] < 11:  # 11.x: always strongly typed, the flag deprecated
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = _require(builder.create_network(flags), "create a network")
    parser = _require(trt.OnnxParser(network, logger), "create an ONNX parser")
    if not parser.parse_from_file(str(onnx_path)):
        lines = parser_error_lines(parser)
        for line in lines:
            log.error("ONNX parser: %s", line)
        first = lines[0] if lines else "no error recorded"
        raise AnoclipError(f"TensorRT's ONNX parser rejected {onnx_path.name} ({len(lines)} error(s), all logged above; "
                           f"first: {first})")
    config = _require(builder.create_builder_config(), "create a builder configuration")
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if plan.clear_tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if plan.fp16_flag:  # the weakly typed fallback: TensorRT 10.x only (never reached on 11.x)
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = pin_fp32_layers(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if network.num_inputs != 1 or network.get_input(0).name != input_name:
        raise AnoclipError(f"{onnx_path.name} does not have the one input '{input_name}' the manifest lists; re-export it")
    if input_shape[0] < 0:
        shapes = [(b, *input_shape[1:]) for b in (profile.min, profile.opt, profile.max)]
        optimisation = _require(builder.create_optimization_profile(), "create an optimisation profile")
        optimisation.set_shape(input_name, *shapes)
        if config.add_optimization_profile(optimisation) < 0:
            raise AnoclipError(f"TensorRT refused the batch profile {profile} (its log above says why)")
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = _require(config.create_timing_cache(data), f"read the timing cache {timing_cache}")
        if not config.set_timing_cache(cache, False):
            raise AnoclipError(f"TensorRT refused the timing cache {timing_cache} (made by another TensorRT or GPU?); "
                               "delete it or pass another --timing-cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AnoclipError("TensorRT could not build the engine (its log above says why)")
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), pinned


# ----------------------------------------------------------------------------------------------
# Parity with onnxruntime's CPU fp32 session


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output: largest absolute difference, largest difference relative to the reference's
    largest magnitude, and smallest cosine similarity over the embedding vectors (last axis)."""
    figures = {}
    for name in ("image_embeds", "patch_embeds"):
        try:
            one = agreement(reference[name], got[name], f"the engine's {name}")
        except ValueError as exc:
            raise AnoclipError(str(exc).replace("the reference", "onnxruntime's")) from None
        figures[f"{name}_max_abs"] = one.max_abs
        figures[f"{name}_max_rel"] = one.max_rel
        figures[f"{name}_min_cosine"] = float(np.min(one.cosines)) if one.cosines.size else 1.0
    return figures


def parity_images(count: int, size: tuple[int, int], mean, std, seed: int = 0) -> np.ndarray:
    """``count`` random RGB images, normalised as the model expects, NCHW float32."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, size[0], size[1], 3)).astype(np.float32) / 255.0
    normed = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normed.transpose(0, 3, 1, 2))


def measure_parity(trt, plan_bytes: bytes, reference_model: Path, images: np.ndarray, device: int) -> dict:
    """Run the plan and onnxruntime's CPU fp32 session of ``reference_model`` on ``images``."""
    from anoclip.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from anoclip.runtime.backends.tensorrt import EngineRunner

    reference = OnnxRuntimeBackend(reference_model, providers="cpu").run_all(images)
    runner = EngineRunner(plan_bytes, trt, device=device, shown="the new engine")
    try:
        got = runner.run(images)
    finally:
        runner.close()
    return {"reference": f"onnxruntime CPU fp32, {reference_model.name}", "images": int(images.shape[0]),
            **compare_outputs(reference, got)}


# ----------------------------------------------------------------------------------------------
# The whole command


@dataclass
class BuildResult:
    folder: Path
    engine: str
    sidecar: EngineSidecar
    replaced: list[str]


def build_engine(folder: str | os.PathLike, precision: str, batch: BatchProfile | None = None,
                 workspace_gib: float | None = None, timing_cache: str | os.PathLike | None = None,
                 parity: int = 4, device: int = 0, command: str = "",
                 progress: Callable[[str], None] = lambda message: None) -> BuildResult:
    """Build, check and store the ``precision`` engine of the folder's visual model for this GPU."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    trt = import_tensorrt()
    gpu = probe_gpu(device)
    if gpu is None:
        raise AnoclipError(f"no CUDA GPU {device} found (no NVIDIA driver, or no such device); build engines on the "
                           "machine that will run them")
    plan = network_plan(trt.__version__, precision, manifest.models, folder)
    if plan.fp16_flag:
        log.warning("%s has no fp16 model: building a weakly typed fp16 network from the fp32 one (TensorRT %s), "
                    "LayerNormalization and Softmax kept in fp32; `%s` makes the fp16 model", folder, trt.__version__,
                    MAKE_MODEL[VISUAL_FP16].format(folder=folder))
    artifacts = load_artifacts(folder, models=list(dict.fromkeys([plan.source_model, VISUAL])), load_thresholds=False)
    manifest = artifacts.manifest
    entry = manifest.models[plan.source_model]
    if len(entry.inputs) != 1:
        raise AnoclipError(f"{entry.file} has inputs {list(entry.inputs)}, not one image input; re-export it")
    (input_name, input_shape), = entry.inputs.items()
    profile = profile_for(input_shape, batch, folder)
    source_path = artifacts.model_path(plan.source_model)
    progress(f"building the {precision} engine of {entry.file} with TensorRT {trt.__version__} on {gpu}, batch {profile}")
    started = time.monotonic()
    cache = Path(timing_cache) if timing_cache is not None else None
    plan_bytes, pinned = compile_plan(trt, source_path, plan, input_name, input_shape, profile,
                                      workspace_bytes(workspace_gib), cache)
    progress(f"built in {time.monotonic() - started:.0f} s ({len(plan_bytes) / 2**20:.1f} MiB)")
    figures: dict = {}
    if parity > 0:
        images = parity_images(parity, manifest.image_size, manifest.mean, manifest.std)
        try:
            figures = measure_parity(trt, plan_bytes, artifacts.model_path(VISUAL), images, device)
        except (BackendError, AnoclipError) as exc:
            log.warning("parity run skipped: %s", exc)
            figures = {"not_measured": str(exc)}
    engine_sha = hashlib.sha256(plan_bytes).hexdigest()
    name = content_addressed(engine_base_name(precision), engine_sha)
    sidecar = EngineSidecar(
        engine=name, engine_sha256=engine_sha, precision=precision, source_model=plan.source_model,
        source_file=entry.file, source_sha256=manifest.files[entry.file], tensorrt_version=trt.__version__,
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, strongly_typed=plan.strongly_typed,
        input_name=input_name, input_shape=list(input_shape), profile=profile,
        workspace_bytes=workspace_bytes(workspace_gib), built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        command=command, fp32_layers=pinned, timing_cache=str(cache) if cache else "",
        versions={"anoclip": _version()}, parity=figures)
    replaced = store_engine(folder, plan_bytes, sidecar, gpu, command or f"build-engine --precision {precision}")
    return BuildResult(folder, name, sidecar, replaced)


def superseded(sidecars: list[EngineSidecar], new: EngineSidecar, gpu: GPU, model_shas: set[str]) -> list[str]:
    """Engines the new one replaces: same precision for the same GPU and TensorRT release, and any
    built from a model file the folder no longer holds."""
    gone = []
    for s in sidecars:
        same_target = (s.precision == new.precision and GPU(s.gpu_name, s.compute_capability) == gpu
                       and release(s.tensorrt_version) == release(new.tensorrt_version))
        if (same_target or s.source_sha256 not in model_shas) and s.engine != new.engine:
            gone.append(s.engine)
    return gone


def store_engine(folder: Path, plan_bytes: bytes, sidecar: EngineSidecar, gpu: GPU, history: str) -> list[str]:
    """Commit the plan and its sidecar through the folder's transaction; the engines it replaced."""
    with transaction(folder, wait=LOCK_WAIT_S) as tx:
        manifest = tx.manifest
        if manifest.files.get(sidecar.source_file) != sidecar.source_sha256:
            raise AnoclipError(f"{folder} changed while the engine was being built ({sidecar.source_file} is no longer "
                               "the model it was built from); nothing was written, run build-engine again")
        if sidecar.engine in manifest.files:  # the very same plan is stored already: keep it and its sidecar
            log.info("%s is identical to the stored %s; kept", sidecar.precision, sidecar.engine)
            return []
        old, damaged = readable_sidecars(folder, manifest)
        model_shas = {manifest.files.get(e.file, "") for e in manifest.models.values()}
        gone = superseded(old, sidecar, gpu, model_shas) + damaged
        for name in gone:
            tx.remove_engine(name)
        tx.add_engine(plan_bytes, sidecar.to_json().encode(), sidecar.engine)
        tx.commit(history)
    return gone


def readable_sidecars(folder: Path, manifest) -> tuple[list[EngineSidecar], list[str]]:
    """The engines' sidecars that verify and parse, and the engines whose sidecar does not (those
    are dropped from the manifest with a warning: they could never be loaded)."""
    good, damaged = [], []
    for name in engine_candidates(manifest.files):
        partial = replace(manifest, files={n: manifest.files[n] for n in (name, sidecar_name(name))})
        try:
            good += load_engine_sidecars(folder, partial)
        except AnoclipError as exc:
            log.warning("dropping %s from the manifest: %s", name, exc)
            damaged.append(name)
    return good, damaged


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anoclip")
    except PackageNotFoundError:
        return "unknown"
