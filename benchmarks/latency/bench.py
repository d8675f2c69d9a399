"""``anoclip bench``: one table of every way to run the folder's models on this machine, with
status, file size, fidelity against fp32 and ms per image per stage, beside the paper's Table 7.

Rows come from the runtime's vocabulary (``runtime.vocabulary.DEPLOYMENTS``: backend x precision
-> the file it loads, the backend class that runs it, its row): for every backend asked for (the
onnxruntime providers cpu, cuda and tensorrt, OpenVINO, and tensorrt-native: the folder's engine of
each precision) the plain-CLIP baseline (QKV patch tokens, ``visual_qkv.onnx``), AnoCLIP (V-V
tokens) at fp32 and as "AnoCLIP (int8)" / "AnoCLIP (fp16)" (`anoclip calibrate int8|fp16`), the
fused graph (``anoclip fuse``: scores and maps of its K classes in one pass) and AnoCLIP+ (V-V
tokens + test-time adaptation, with the numpy loop and ``tta.onnx``). A row this machine cannot run
(no GPU, no TensorRT, no OpenVINO, a model the folder lacks) says "skipped:" and why, naming the
command that makes what is missing; a row that could run and failed says "failed:" and makes the
command exit 1. Fidelity is the parity figures measured when the reduced-precision model was made
(its manifest entry's provenance) or the engine built (its sidecar); fp32 rows are the reference.
All rows of one backend run round-robin in one process on the same frame, so the ratio to the
CLIP row is measured side by side. Needs only the runtime (no PyTorch).

A default export's ``visual.onnx`` takes a last-block shortcut: after the last block only the class
token of the standard stream is read, so that block runs its query and MLP on that token alone
(same outputs, less work). The authors' code timed in the paper's Table 7 runs the full last block,
so the shortcut's "x CLIP" is smaller than Table 7's. An export with ``--qkv-tokens add`` computes
every token in the last block; its AnoCLIP rows are labelled "full last block", and
``--full-last-block DIR`` adds such a row beside the others. The header says which rows take the
shortcut and what the full last block cost where it was measured.

Memory rows (``--memory-patches N[,N...]``, default ``runtime.memory.DEFAULT_MAX_PATCHES``): AnoCLIP
at fp32 and int8 with a memory of normal frames of N rows for the benchmarked class (random unit
rows of the model's width, seed 0: the memory branch costs the same whatever the rows hold), held
in memory (the folder is not written), timed round-robin with the rows without memory. Their "MB"
adds the memory file (``runtime.memory.memory_bytes``) to the model; the memory line under the
method says each memory row's per-image time over the same precision's row without memory, and
whether the target (at most 1.10x at the default size) was met.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from anoclip.runtime.artifacts import load_artifacts
from anoclip.runtime.backends import PROVIDER_ALIASES
from anoclip.runtime.detector import Detector
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.memory import DEFAULT_MAX_PATCHES, DEFAULT_WEIGHT, ClassMemory, MemoryBank, memory_bytes
from anoclip.runtime.overlay import overlay
from anoclip.runtime.vocabulary import (ENGINE, FUSED, ONNXRUNTIME_BACKENDS, PRECISION_MODELS, PRECISIONS,
                                        RUNTIME_CLASSES, TTA_GRAPH, VISUAL, VISUAL_QKV, bench_row, deployments,
                                        remake_command)

from .. import paper
from .bench_report import FULL, MEMORY_TARGET, STAGES, memory_note, shortcut_note
from .timing import machine_info

log = logging.getLogger(__name__)

BACKENDS = tuple(RUNTIME_CLASSES)  # what --backends names: every backend of the runtime vocabulary
BACKEND_LABELS = {"cpu": "onnxruntime CPU", "cuda": "onnxruntime CUDA", "tensorrt": "onnxruntime TensorRT",
                  "openvino": "OpenVINO CPU", "tensorrt-native": "TensorRT (native)"}


@dataclass
class Row:
    name: str
    backend: str
    precision: str
    status: str = "ok"
    size_mb: float = 0.0
    fidelity: str = "reference"  # against fp32: "reference" for fp32 rows, else the stored parity figures
    ms: dict[str, float] = field(default_factory=dict)  # mean, p50, p90, p99 of the whole call
    stages_ms: dict[str, float] = field(default_factory=dict)  # median per stage
    vs_clip: float | None = None
    paper_ms: float | None = None
    paper_vs_clip: float | None = None
    memory_rows: int | None = None  # rows of the memory of normal frames (memory rows only)
    memory_bytes: int | None = None  # bytes of its file (runtime.memory.memory_bytes)
    vs_without_memory: float | None = None  # median / median of the same precision's row without memory


@dataclass
class Variant:
    name: str
    model: str
    tta: bool
    tta_backend: str = "numpy"
    paper: str = "AnoCLIP"  # its row in the paper's Table 7
    folder: str = "main"  # "main": --artifacts; "full": --full-last-block
    precision: str = "fp32"  # of the visual model (int8, fp16: the calibrated models)
    memory: int = 0  # rows of a memory of normal frames (0: none)
    base: str = ""  # a memory row: the row of the same model without memory


VARIANTS = (
    Variant("CLIP (QKV patch tokens)", VISUAL_QKV, False, paper="CLIP (QKV patch tokens)"),
    Variant("AnoCLIP", VISUAL, False),
    Variant("AnoCLIP+ (TTA numpy)", VISUAL, True, "numpy", paper="AnoCLIP+"),
    Variant("AnoCLIP+ (TTA onnx)", VISUAL, True, "onnx", paper="AnoCLIP+"),
)


def full_last_block(manifest) -> bool:
    """True when the folder's visual.onnx computes every token in the last block (``--qkv-tokens add``)."""
    return "qkv_patch_embeds" in manifest.models[VISUAL].outputs


def memory_name(name: str, size: int) -> str:
    """"AnoCLIP (int8)", 4096 -> "AnoCLIP (int8) + memory (4096 rows)" (a full-last-block folder's:
    "AnoCLIP (int8) + memory (4096 rows, full last block)")."""
    return f"{name} + memory ({size} rows)"


def variants(main_full: bool, with_full_folder: bool, precisions: tuple[str, ...] = (),
             fused_classes: int = 0, memory_sizes: tuple[int, ...] = ()) -> list[Variant]:
    """The rows to time: AnoCLIP rows of a full-last-block folder say so in their name; one AnoCLIP
    row per reduced precision in ``precisions`` follows the fp32 one; the fused row names the
    ``fused_classes`` of the folder's fused model (0: it has none); the fp32 and int8 AnoCLIP rows
    are followed by one row per memory size in ``memory_sizes``."""
    rows = [Variant(full_name(v.name) if main_full and v.model == VISUAL else v.name, v.model, v.tta, v.tta_backend,
                    v.paper) for v in VARIANTS]
    at = 2
    for size in memory_sizes:
        name = memory_name("AnoCLIP", size)
        rows.insert(at, Variant(full_name(name) if main_full else name, VISUAL, False, memory=size, base=rows[1].name))
        at += 1
    name = bench_row(FUSED, "fp32")
    name = f"{name[:-1]}, {fused_classes} class{'es' if fused_classes > 1 else ''})" if fused_classes else name
    rows.insert(at, Variant(full_name(name) if main_full else name, FUSED, False))
    at += 1
    for precision in (p for p in ("int8", "fp16") if p in precisions):
        name = bench_row(VISUAL, precision)
        rows.insert(at, Variant(full_name(name) if main_full else name, VISUAL, False, precision=precision))
        at += 1
        for size in memory_sizes if precision == "int8" else ():
            with_memory = memory_name(name, size)
            rows.insert(at, Variant(full_name(with_memory) if main_full else with_memory, VISUAL, False,
                                    precision=precision, memory=size, base=rows[at - 1].name))
            at += 1
    if with_full_folder:
        rows.insert(at, Variant(full_name("AnoCLIP"), VISUAL, False, folder="full"))
    return rows


def memory_sizes(requested: str) -> tuple[int, ...]:
    """``--memory-patches``: "4096,16384" -> (4096, 16384); "none" or "" -> ()."""
    if requested.strip().lower() in ("", "none", "0"):
        return ()
    sizes = []
    for part in (p.strip() for p in requested.split(",") if p.strip()):
        if not part.isdigit() or int(part) < 1:
            raise AnoclipError(f"--memory-patches {part}: give row counts >= 1, e.g. 4096,16384, or none")
        sizes.append(int(part))
    return tuple(dict.fromkeys(sizes))


def bench_memory(artifacts, cls: str, size: int) -> MemoryBank:
    """A memory of ``size`` random unit rows (seed 0) of the model's width for ``cls``, held in memory:
    the memory branch's cost depends on the rows' count and width, not on what they hold."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((size, artifacts.manifest.embed_dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    provenance = {"frames": 0, "patches": size, "kept": size, "source": "anoclip bench: random unit rows, seed 0"}
    return MemoryBank({cls: ClassMemory(cls, rows, provenance)}, artifacts.model_sha256(VISUAL),
                      artifacts.manifest.embed_dim)


def bench_precisions(manifest, requested: str) -> tuple[str, ...]:
    """The reduced precisions to time beside fp32: those ``requested`` names (``auto``: every one; a
    row whose model the folder lacks says so)."""
    if requested == "auto":
        return tuple(p for p in PRECISIONS if p != "fp32")
    chosen = tuple(p.strip() for p in requested.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PRECISIONS]
    if unknown:
        raise AnoclipError(f"--precisions {unknown[0]}: choose among {', '.join(PRECISIONS)} or auto")
    return chosen


def full_name(name: str) -> str:
    """"AnoCLIP" -> "AnoCLIP (full last block)"; "AnoCLIP+ (TTA onnx)" -> "AnoCLIP+ (TTA onnx, full last block)"."""
    return f"{name[:-1]}, {FULL})" if name.endswith(")") else f"{name} ({FULL})"


def bench_frame(image: str | None, size: int) -> np.ndarray:
    if image:
        from anoclip.runtime.preprocess import read_image

        return read_image(image)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def _timed_predict(detector: Detector, frame: np.ndarray, cls: str) -> tuple[float, dict[str, float]]:
    """One predict() call plus the overlay: (total ms, ms per stage)."""
    start = time.perf_counter()
    result = detector.predict(frame, cls)
    t_post = time.perf_counter()
    overlay(frame, result.anomaly_map_full)
    end = time.perf_counter()
    return (end - start) * 1e3, dict(result.timings, postprocess=(end - t_post) * 1e3)


def _full_folder(full_dir: str, manifest):
    """The --full-last-block artifacts; refused unless they are a full-last-block export of the same
    weights as the --artifacts folder, which itself takes the shortcut."""
    if full_last_block(manifest):
        raise AnoclipError("the --artifacts folder already computes the full last block: drop --full-last-block")
    loaded = load_artifacts(full_dir, verify=True, models=[VISUAL])
    other = loaded.manifest
    if not full_last_block(other):
        raise AnoclipError(f"{full_dir}: its visual.onnx takes the last-block shortcut; export it with "
                           "`anoclip-export --qkv-tokens add` for --full-last-block")
    if (other.backbone, other.pretrained, other.visual_weights_sha256) != (
            manifest.backbone, manifest.pretrained, manifest.visual_weights_sha256):
        raise AnoclipError(f"{full_dir} was exported from other weights than the --artifacts folder "
                           f"({other.backbone} / {other.pretrained}); export both from the same backbone and weights")
    return loaded


def backend_unavailable(backend: str) -> str:
    """Why ``backend`` cannot run on this machine ("" when it can)."""
    from anoclip.runtime.errors import BackendError

    try:
        if backend in ONNXRUNTIME_BACKENDS:
            import onnxruntime as ort

            provider = PROVIDER_ALIASES[backend]
            if provider not in ort.get_available_providers():
                return (f"this onnxruntime has no {BACKEND_LABELS[backend].split()[-1]} execution provider (the GPU "
                        "build is onnxruntime-gpu)")
        elif backend == "openvino":
            from anoclip.runtime.backends.openvino import import_openvino

            import_openvino()
        elif backend == "tensorrt-native":
            from anoclip.runtime.backends.tensorrt import import_cudart, import_tensorrt
            from anoclip.runtime.gpu import probe_gpu

            import_tensorrt()
            import_cudart()
            if probe_gpu() is None:
                return "no CUDA GPU on this machine"
    except BackendError as exc:
        return str(exc)
    return ""


def fidelity(figures: dict | None) -> str:
    """The parity figures against fp32 stored with a model (calibrate int8|fp16) or an engine
    (build-engine's sidecar), in a few words."""
    if not figures:
        return "not measured"
    if "not_measured" in figures:
        return "not measured: " + str(figures["not_measured"])
    if "patch_cos_min" in figures:  # a reduced-precision model's provenance
        return (f"patch cos min {figures['patch_cos_min']:.4f}, map r min {figures['map_r_min']:.4f}, "
                f"score diff {figures['score_max_abs_diff']:.2g}")
    return (f"patch cos min {figures['patch_embeds_min_cosine']:.4f}, "  # an engine's sidecar
            f"max abs diff {figures['patch_embeds_max_abs']:.2g}")


def _engine_of(artifacts, precision: str):
    """(engine sidecar of ``precision`` that runs here or None, why there is none)."""
    from anoclip.runtime.gpu import installed_tensorrt_version, probe_gpu, runs_here

    built = [s for s in artifacts.engines() if s.precision == precision]
    remake = remake_command(ENGINE, artifacts.folder, precision=precision)
    if not built:
        return None, f"no {precision} engine (make it with `{remake}`)"
    version, gpu = installed_tensorrt_version(), probe_gpu()
    here = [s for s in built if runs_here(s, version, gpu)]
    if not here:
        return None, f"the {precision} engine was built for another GPU or TensorRT (make it anew with `{remake}`)"
    return here[0], ""


def group_variants(backend: str, main_full: bool, with_full_folder: bool, precisions: tuple[str, ...],
                   fused_classes: int, memory: tuple[int, ...] = ()) -> list[Variant]:
    """The rows of one backend: every method row (CLIP, AnoCLIP and its reduced precisions, the
    fused graph, AnoCLIP+) where the backend runs model files; the engine of each precision for
    tensorrt-native (see runtime.vocabulary.DEPLOYMENTS)."""
    if backend == "tensorrt-native":
        return [Variant(d.row, d.model, False, precision=d.precision) for d in deployments(backend)
                if d.precision == "fp32" or d.precision in precisions]
    return variants(main_full, with_full_folder, precisions, fused_classes, memory)


def run_bench(artifacts_dir: str, backends: list[str], runs: int, warmup: int, frame: np.ndarray, cls: str | None,
              threads: int | None, progress=None, full_dir: str | None = None,
              precisions: str = "auto", memory_patches: str = "none") -> tuple[list[Row], dict]:
    """Time every variant on every backend; return the rows and the method description. Rows that
    cannot run here are "skipped: why", rows that could and did not "failed: why"."""
    artifacts = load_artifacts(artifacts_dir, verify=True, models=[VISUAL])
    manifest = artifacts.manifest
    reduced = bench_precisions(manifest, precisions)
    sizes = memory_sizes(memory_patches)
    cls = cls or sorted(artifacts.prompts.classes)[0]
    banks = {size: bench_memory(artifacts, cls, size) for size in sizes}
    bank_bytes = {size: len(memory_bytes(bank)) for size, bank in banks.items()}
    fused = manifest.models.get(FUSED)
    fused_classes = fused.provenance.get("classes", []) if fused is not None else []
    folders = {"main": (artifacts_dir, manifest, artifacts.folder)}
    if full_dir:
        full = _full_folder(full_dir, manifest)
        folders["full"] = (full_dir, full.manifest, full.folder)
    rows: list[Row] = []
    for backend in backends:
        unavailable = backend_unavailable(backend)
        detectors: dict[str, Detector] = {}
        group: list[Row] = []
        bases: dict[str, str] = {}  # memory row -> its row without memory
        for variant in group_variants(backend, full_last_block(manifest), full_dir is not None, reduced,
                                      len(fused_classes), sizes):
            row = Row(variant.name, BACKEND_LABELS[backend], variant.precision,
                      paper_ms=None if variant.memory else paper.LATENCY_MS[variant.paper],
                      fidelity="-" if variant.model == VISUAL_QKV else "reference")
            if variant.memory:
                row.memory_rows, row.memory_bytes = variant.memory, bank_bytes[variant.memory]
                bases[row.name] = variant.base
            group.append(row)
            if unavailable:
                row.status = f"skipped: {unavailable}"
                continue
            source, source_manifest, source_folder = folders[variant.folder]
            if backend == "tensorrt-native":
                sidecar, why = _engine_of(artifacts, variant.precision)
                if sidecar is None:
                    row.status = f"skipped: {why}"
                    continue
                row.size_mb = (source_folder / sidecar.engine).stat().st_size / 1e6
                if variant.precision != "fp32":
                    row.fidelity = fidelity(sidecar.parity)
            else:
                model = PRECISION_MODELS[variant.precision] if variant.precision != "fp32" else variant.model
                needed = [model] + ([TTA_GRAPH] if variant.tta_backend == "onnx" and variant.tta else [])
                missing = [m for m in needed if m not in source_manifest.models]
                if missing:
                    row.status = f"skipped: no {missing[0]} (make it with `{remake_command(missing[0], source)}`)"
                    continue
                row.size_mb = sum((source_folder / source_manifest.models[m].file).stat().st_size
                                  for m in needed) / 1e6
                if variant.precision != "fp32":
                    row.fidelity = fidelity(source_manifest.models[model].provenance.get("parity"))
                row.size_mb += (row.memory_bytes or 0) / 1e6
            try:
                detector = Detector.load(source, backend=backend, model=variant.model, precision=variant.precision,
                                         tta=variant.tta, tta_backend=variant.tta_backend, verify=False,
                                         threads=threads, memory="on" if variant.memory else "off")
                if variant.memory:  # an in-memory copy of the artifacts holds the memory: the folder is not written
                    detector.artifacts = dataclasses.replace(detector.artifacts, memory=banks[variant.memory])
                detectors[variant.name] = detector
            except AnoclipError as exc:
                row.status = f"failed: {exc}"
        by_name = {row.name: row for row in group}
        for row in group:
            if row.status.startswith("skipped"):
                row.fidelity = "-"  # nothing measured here to compare
        # the fused graph scores all its classes in every call; its row reports the asked class, or its first
        row_class = {name: cls if FUSED != d.model or cls in fused_classes else fused_classes[0]
                     for name, d in detectors.items()}
        for name, detector in list(detectors.items()):  # one untimed call: a row that fails to run says so
            try:
                _timed_predict(detector, frame, row_class[name])
            except Exception as exc:  # noqa: BLE001 - any backend error is this row's failure, not the run's
                by_name[name].status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                del detectors[name]
        totals: dict[str, list[float]] = {name: [] for name in detectors}
        stages: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STAGES} for name in detectors}
        for _ in range(warmup):
            for name, detector in detectors.items():
                _timed_predict(detector, frame, row_class[name])
        for _ in range(runs):
            for name, detector in detectors.items():
                total, timings = _timed_predict(detector, frame, row_class[name])
                totals[name].append(total)
                for stage in STAGES:
                    stages[name][stage].append(timings.get(stage, 0.0))
            if progress is not None:
                progress(1)
        for row in group:
            if row.name in totals:
                row.ms = _summary(totals[row.name])
                row.stages_ms = {s: float(np.median(v)) for s, v in stages[row.name].items()}
        clip = next((r for r in group if r.name.startswith("CLIP") and r.ms), None)
        for row in group:
            if clip is not None and row.ms:
                row.vs_clip = row.ms["p50"] / clip.ms["p50"]
            base = by_name.get(bases.get(row.name, ""))
            if base is not None and base.ms and row.ms:
                row.vs_without_memory = row.ms["p50"] / base.ms["p50"]
            if row.paper_ms is not None:
                row.paper_vs_clip = row.paper_ms / paper.CLIP_MS
        rows += group
    import onnxruntime

    method = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "onnxruntime": onnxruntime.__version__,
        "backends": backends,
        "threads": threads or "onnxruntime default",
        "backbone": manifest.backbone,
        "weights": manifest.pretrained + (" (random: latency only)" if manifest.random_weights else ""),
        "input": f"one {frame.shape[1]}x{frame.shape[0]} RGB frame -> {manifest.image_size[1]}x{manifest.image_size[0]}, batch 1",
        "class": cls,
        "runs": runs,
        "warmup": warmup,
        "timing": "wall clock per predict() call incl. overlay; rows of one backend interleaved round-robin; every "
                  "backend returns host arrays, so GPU work is complete (synchronised) when each stage is timed",
        "ratio": "x CLIP = median of the row / median of the CLIP row of the same backend, same run",
        "fidelity": "against fp32: the parity figures measured when the model was made (anoclip calibrate int8|fp16: "
                    "patch-token cosine, anomaly-map Pearson r, score difference) or the engine built (its sidecar)",
        "paper": paper.LATENCY_SOURCE,
        "last_block": shortcut_note(rows),
        "full_last_block_artifacts": full_dir,
        "memory": {"rows": list(sizes), "file_bytes": {str(n): b for n, b in bank_bytes.items()},
                   "default_rows": DEFAULT_MAX_PATCHES, "target_ratio": MEMORY_TARGET, "weight": DEFAULT_WEIGHT,
                   "source": f"random unit rows (seed 0), {manifest.embed_dim} wide, class {cls}, held in memory",
                   "note": memory_note(rows, sizes, bank_bytes)},
    }
    return rows, method


def failed_rows(rows: list[Row]) -> list[Row]:
    """Rows that could run here and did not."""
    return [r for r in rows if r.status.startswith("failed")]
