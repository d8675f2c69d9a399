"""One graph from image to scores and anomaly maps for K classes: ``anoclip.onnx``.

The folder's visual model with the scoring of the method appended as plain ONNX operators, so that
any ONNX consumer (trtexec, DeepStream, Triton, OpenVINO, onnxruntime) runs the whole thing::

    image        [B, 3, H, W]  normalised as visual.onnx takes it (mean/std in the metadata)
    scores       [B, K]        image-level p_abnormal of the global token, per class
    maps         [B, K, H, W]  p_abnormal per patch -> 3x3 mean filter (replicate) -> bilinear
                               upsampling with align_corners to H x W
    patch_scores [B, K, M]     p_abnormal per patch, before the filter (row-major over the grid)
    zero_shot_scores [B, K]    only with a memory baked in: each branch's image score (memory_scores:
    memory_scores    [B, K]    max_i s_i; 0 for a class without a memory)
    memory_maps  [B, K, H, W]  only with ``--branch-maps``: each branch's map (memory_maps: 0 for a
    zero_shot_maps             class without a memory)
    patch_embeds [B, M, D]     only when asked: the unnormalised V-V tokens (for test-time adaptation)
    anomalous    [B, K] bool   only with ``--thresholds``: scores > the class's calibrated image threshold
    mask         [B, K, H, W]  only with ``--thresholds``: maps > the class's calibrated pixel threshold
                 bool          (the decision of ``runtime/decision.py``, at the model's input size)

p_abnormal(x) = softmax([cos(x, t+), cos(x, t-)])[1] = sigmoid(x/|x| . (t- - t+)): one MatMul with a
[D, K] constant for all K classes. The filter and the upsampling are linear and separable, so the map
is ``rows @ P @ cols`` with the two constant matrices of ``scoring.map_matrices`` (exact, not an
approximation of the runtime's steps).

The memory of normal frames (``runtime/memory.py``): each fused class with a memory in the folder
(``--memory auto``; ``on`` insists on one for every class, ``only`` uses the memory branch alone,
``off`` bakes none) gets one MatMul of the unit patch tokens [B,M,D] (the zero-shot branch's own)
with its rows [D, N_c] and a ReduceMax over them; a one-hot [K_m, K] MatMul places the K_m maxima
among the K classes, s = 1/2 - 1/2 max on the classes with a memory (0 elsewhere). Then, with the
weight w a constant ([K]: w for a class with a memory, 1 with ``only``, 0 without one)::

    patch values = w * s + (1 - w) * p_abnormal      -> patch_scores, and maps as above
    scores       = w * max_i s_i + (1 - w) * zero-shot score

so ``scores``, ``maps`` and ``patch_scores`` are the combined ones, a class without a memory keeps its
zero-shot values exactly. The manifest entry's provenance records ``memory`` ({class: {sha256, rows}}),
``memory_weight`` and ``memory_mode`` (``combined`` or ``only``), as does the metadata key
``anoclip.memory``; ``--model fused`` holds the graph to them (``runtime/fused.py``). s is not clipped
to [0, 1] (the runtime clips the cosine; it differs by float32 rounding only).

Every operator is one TensorRT's ONNX parser takes (10.3 and 11.1: ReduceL2, Max, Div, MatMul,
Sigmoid, Transpose, Reshape, and for the memory ReduceMax, Concat, Mul, Sub, Add).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import click
import numpy as np

from anoclip.runtime.artifacts import FUSED, FUSED_FILE, VISUAL, ModelEntry, load_artifacts
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.folder import store_derived_model
from anoclip.runtime.workspace import owned_workspace
from anoclip.runtime.fused import BRANCH_MAP_OUTPUTS, DECISION_OUTPUTS, MEMORY_OUTPUTS, METHOD_VERSION, OUTPUTS
from anoclip.runtime.memory import DEFAULT_WEIGHT, check_weight
from anoclip.runtime.scoring import l2_normalise, map_matrices
from anoclip.runtime.thresholds import memory_setting, text_features_sha256
from anoclip.runtime.vocabulary import remake_command

log = logging.getLogger(__name__)

EPS = 1e-12  # as the runtime's l2_normalise (torch.nn.functional.normalize)
PREFIX = "anoclip_scoring/"  # names of the appended nodes and constants
FUSE_MEMORY_MODES = ("auto", "on", "off", "only")  # `anoclip fuse --memory`


def class_directions(text_features: Sequence[np.ndarray]) -> np.ndarray:
    """[D, K]: per class, normalised t- minus normalised t+ (float32, as the runtime computes it)."""
    rows = [l2_normalise(np.asarray(t, dtype=np.float32)) for t in text_features]
    return np.stack([t[1] - t[0] for t in rows], axis=1).astype(np.float32)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _unit_rows(nodes: list, graph_input: str, name: str, opset: int) -> str:
    """Nodes for x / max(|x|, eps) along the last axis; the output's name."""
    from onnx import helper

    norm = f"{PREFIX}{name}_norm"
    if opset >= 18:  # ReduceL2 takes its axes as an input from opset 18 on
        nodes.append(helper.make_node("ReduceL2", [graph_input, f"{PREFIX}last_axis"], [norm], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceL2", [graph_input], [norm], axes=[-1], keepdims=1))
    nodes.append(helper.make_node("Max", [norm, f"{PREFIX}eps"], [f"{norm}_safe"]))
    nodes.append(helper.make_node("Div", [graph_input, f"{norm}_safe"], [f"{PREFIX}{name}_unit"]))
    return f"{PREFIX}{name}_unit"


def fuse_graph(visual, classes: Sequence[str], text_features: Sequence[np.ndarray], grid: tuple[int, int],
               image_size: tuple[int, int], metadata: dict[str, str], *, patch_embeds: bool = False,
               batch: int | None = None, thresholds: tuple[np.ndarray, np.ndarray] | None = None,
               memory: dict[str, np.ndarray] | None = None, memory_weight: float = DEFAULT_WEIGHT,
               memory_only: bool = False, branch_maps: bool = False):
    """The fused ModelProto: ``visual`` (an onnx ModelProto with outputs image_embeds [B,D] and
    patch_embeds [B,M,D]) with the scoring of ``classes`` appended. ``batch`` fixes the batch axis
    of a dynamic-batch model (None: as the visual model has it). ``thresholds``: per class (image
    [K], pixel [K]) thresholds, which add the outputs ``anomalous`` (scores > image) and ``mask``
    (maps > pixel). ``memory``: class -> its memory of normal frames (unit rows [N, D]), combined
    with the zero-shot branch with ``memory_weight`` (``memory_only``: the memory branch alone) for
    those classes; adds the outputs ``zero_shot_scores`` and ``memory_scores`` [B,K], and with
    ``branch_maps`` ``memory_maps`` and ``zero_shot_maps`` [B,K,H,W]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(visual)
    graph = model.graph
    names = [o.name for o in graph.output]
    for required in ("image_embeds", "patch_embeds"):
        if required not in names:
            raise AnoclipError(f"the visual model has no output '{required}' (has {names}); re-export it")
    if not classes:
        raise AnoclipError("no classes to fuse")
    memory = {c: m for c, m in (memory or {}).items() if c in classes}
    if branch_maps and not memory:
        raise AnoclipError("--branch-maps needs a class with a memory of normal frames in the graph")
    opset = _opset(model)
    batch_dim = graph.input[0].type.tensor_type.shape.dim[0]
    dynamic = not batch_dim.HasField("dim_value")
    if batch is not None and not dynamic and batch_dim.dim_value != batch:
        raise AnoclipError(f"the visual model has a fixed batch of {batch_dim.dim_value}; re-export it with "
                           "`anoclip-export --dynamic-batch` to make a fused model of batch {batch}")
    b: int | str = batch if batch is not None else (batch_dim.dim_param or "batch") if dynamic else batch_dim.dim_value
    count, (gh, gw), (height, width) = len(classes), grid, image_size
    rows, cols = map_matrices(grid, image_size)
    constants = {
        "directions": class_directions(text_features), "eps": np.array(EPS, dtype=np.float32),
        "grid_shape": np.array([0, count, gh, gw], dtype=np.int64),  # 0: keep the batch axis
        "map_rows": rows, "map_cols": cols, "last_axis": np.array([-1], dtype=np.int64),
    }
    if thresholds is not None:
        constants["image_thresholds"] = np.asarray(thresholds[0], dtype=np.float32).reshape(count)
        constants["pixel_thresholds"] = np.asarray(thresholds[1], dtype=np.float32).reshape(1, count, 1, 1)
    if memory:
        constants.update(_memory_constants(classes, memory, memory_weight, memory_only))
    graph.initializer.extend(numpy_helper.from_array(v, PREFIX + k) for k, v in constants.items()
                             if k not in ("last_axis", "patch_axis") or opset >= 18)
    nodes: list = []
    zero_shot = ("zero_shot_scores", f"{PREFIX}zero_shot_probs") if memory else ("scores", f"{PREFIX}patch_probs")
    for stream, out in (("image_embeds", "scores"), ("patch_embeds", "patch_logits")):
        unit = _unit_rows(nodes, stream, stream, opset)
        nodes.append(helper.make_node("MatMul", [unit, PREFIX + "directions"], [f"{PREFIX}{out}_cos"]))
        nodes.append(helper.make_node("Sigmoid", [f"{PREFIX}{out}_cos"], [zero_shot[0] if out == "scores" else zero_shot[1]]))
    if memory:
        nodes += _memory_nodes(classes, memory, f"{PREFIX}patch_embeds_unit", zero_shot[1], branch_maps, opset)
    nodes += _map_nodes(f"{PREFIX}patch_probs", "patch_scores", "maps")
    if thresholds is not None:
        nodes += [helper.make_node("Greater", ["scores", PREFIX + "image_thresholds"], ["anomalous"]),
                  helper.make_node("Greater", ["maps", PREFIX + "pixel_thresholds"], ["mask"])]
    for node in nodes:
        node.name = node.output[0] if node.output[0].startswith(PREFIX) else PREFIX + node.output[0]
    graph.node.extend(nodes)
    kept = [o for o in graph.output if patch_embeds and o.name == "patch_embeds"]
    del graph.output[:]
    shapes = {"scores": [b, count], "maps": [b, count, height, width], "patch_scores": [b, count, gh * gw],
              "zero_shot_scores": [b, count], "memory_scores": [b, count],
              "memory_maps": [b, count, height, width], "zero_shot_maps": [b, count, height, width]}
    names = list(OUTPUTS) + (list(MEMORY_OUTPUTS) if memory else []) + (list(BRANCH_MAP_OUTPUTS) if branch_maps else [])
    graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]) for name in names)
    if thresholds is not None:
        shapes.update(anomalous=[b, count], mask=[b, count, height, width])
        graph.output.extend(helper.make_tensor_value_info(name, TensorProto.BOOL, shapes[name])
                            for name in DECISION_OUTPUTS)
    graph.output.extend(kept)
    if batch is not None:
        for value in list(graph.input) + list(graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = batch
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "anoclip-fuse"
    onnx.checker.check_model(model)
    return model


def _memory_constants(classes: Sequence[str], memory: dict[str, np.ndarray], weight: float,
                      only: bool) -> dict[str, np.ndarray]:
    """The memories (transposed, [D, N_c]), the selection of the memory classes' columns among the K
    ([K_m, K], one-hot), which classes have a memory ([K], 1/0), and the per-class weights of the
    memory branch (w, or 1 with ``only``; 0 without a memory) and of the zero-shot branch (1 - w)."""
    weight = 1.0 if only else float(weight)
    have = [c for c in classes if c in memory]
    select = np.zeros((len(have), len(classes)), dtype=np.float32)
    for i, cls in enumerate(have):
        select[i, list(classes).index(cls)] = 1.0
    has = np.array([1.0 if c in memory else 0.0 for c in classes], dtype=np.float32)
    out = {f"memory_{i}": np.ascontiguousarray(np.asarray(memory[c], dtype=np.float32).T) for i, c in enumerate(have)}
    out.update(memory_select=select, memory_has=has, half=np.array(0.5, dtype=np.float32),
               memory_weight=np.array([weight if c in memory else 0.0 for c in classes], dtype=np.float32),
               zero_shot_weight=np.array([1.0 - weight if c in memory else 1.0 for c in classes], dtype=np.float32),
               patch_axis=np.array([1], dtype=np.int64))
    return out


def _reduce_max(source: str, target: str, axis: str, keepdims: int, opset: int):
    """ReduceMax over one axis (``last_axis`` or ``patch_axis``): its axes are an input from opset 18 on."""
    from onnx import helper

    if opset >= 18:
        return helper.make_node("ReduceMax", [source, PREFIX + axis], [target], keepdims=keepdims)
    return helper.make_node("ReduceMax", [source], [target], axes=[-1 if axis == "last_axis" else 1], keepdims=keepdims)


def _memory_nodes(classes: Sequence[str], memory: dict[str, np.ndarray], unit: str, zero_shot_probs: str,
                  branch_maps: bool, opset: int) -> list:
    """Nodes of the memory branch on the unit patch tokens ``unit`` [B,M,D]: per memory class the
    largest cosine to its rows (MatMul with [D, N_c], ReduceMax), placed among the K classes (MatMul
    with the one-hot selection), s = (1/2 - 1/2 max) on the classes with a memory (0 elsewhere),
    the image's memory score max_i s_i, and the combinations ``scores`` and ``patch_probs`` [B,M,K]."""
    from onnx import helper

    have = [c for c in classes if c in memory]
    nodes, best = [], []
    for i, _ in enumerate(have):
        nodes.append(helper.make_node("MatMul", [unit, f"{PREFIX}memory_{i}"], [f"{PREFIX}memory_{i}_cos"]))
        nodes.append(_reduce_max(f"{PREFIX}memory_{i}_cos", f"{PREFIX}memory_{i}_best", "last_axis", 1, opset))
        best.append(f"{PREFIX}memory_{i}_best")
    p = PREFIX
    if len(best) > 1:
        nodes.append(helper.make_node("Concat", best, [f"{p}memory_best"], axis=-1))
    nodes += [
        helper.make_node("MatMul", [f"{p}memory_best" if len(best) > 1 else best[0], f"{p}memory_select"],
                         [f"{p}memory_best_k"]),  # [B,M,K]
        helper.make_node("Mul", [f"{p}memory_best_k", f"{p}half"], [f"{p}memory_half_best"]),
        helper.make_node("Sub", [f"{p}half", f"{p}memory_half_best"], [f"{p}memory_s_all"]),
        helper.make_node("Mul", [f"{p}memory_s_all", f"{p}memory_has"], [f"{p}memory_s"]),  # 0 without a memory
        _reduce_max(f"{p}memory_s", "memory_scores", "patch_axis", 0, opset),
        helper.make_node("Mul", [f"{p}memory_s", f"{p}memory_weight"], [f"{p}memory_s_w"]),
        helper.make_node("Mul", [zero_shot_probs, f"{p}zero_shot_weight"], [f"{p}zero_shot_probs_w"]),
        helper.make_node("Add", [f"{p}memory_s_w", f"{p}zero_shot_probs_w"], [f"{p}patch_probs"]),
        helper.make_node("Mul", ["memory_scores", f"{p}memory_weight"], [f"{p}memory_scores_w"]),
        helper.make_node("Mul", ["zero_shot_scores", f"{p}zero_shot_weight"], [f"{p}zero_shot_scores_w"]),
        helper.make_node("Add", [f"{p}memory_scores_w", f"{p}zero_shot_scores_w"], ["scores"]),
    ]
    if branch_maps:
        nodes += _map_nodes(f"{p}memory_s", f"{p}memory_patch_scores", "memory_maps")
        nodes += _map_nodes(zero_shot_probs, f"{p}zero_shot_patch_scores", "zero_shot_maps")
    return nodes


def _map_nodes(probs: str, patch_scores: str, maps: str) -> list:
    """Per-patch values [B,M,K] -> ``patch_scores`` [B,K,M] -> ``maps`` [B,K,H,W] (``rows @ P @ cols``)."""
    from onnx import helper

    return [
        helper.make_node("Transpose", [probs], [patch_scores], perm=[0, 2, 1]),
        helper.make_node("Reshape", [patch_scores, PREFIX + "grid_shape"], [f"{PREFIX}{maps}_grid"]),
        helper.make_node("MatMul", [PREFIX + "map_rows", f"{PREFIX}{maps}_grid"], [f"{PREFIX}{maps}_rows_done"]),
        helper.make_node("MatMul", [f"{PREFIX}{maps}_rows_done", PREFIX + "map_cols"], [maps]),
    ]


def calibrated_thresholds(artifacts, classes: Sequence[str], features: Sequence[np.ndarray],
                          memory: dict[str, tuple] | None = None) -> dict:
    """The folder's calibrated (image, pixel) thresholds of ``classes``, for baking into the fused
    graph: ``{"file": thresholds file, "classes": {class: {"image": x, "pixel": y}}}``. Each class's
    record must hold for the graph's maps: calibrated on the folder's visual model (or its current
    fused model), on these text features, without TTA and without map smoothing, and with the memory
    branch the graph bakes for the class (``memory``: class -> ``thresholds.memory_setting``; none
    without); one line naming `anoclip calibrate threshold` otherwise."""

    folder, table = artifacts.folder, artifacts.thresholds
    models = {VISUAL: artifacts.model_sha256(VISUAL)}
    if FUSED in artifacts.manifest.models:
        models[FUSED] = artifacts.model_sha256(FUSED)
    baked = {}
    for cls, text in zip(classes, features):
        record = table.classes.get(cls) if table is not None else None
        calibrate = remake_command("thresholds", folder, cls=cls)
        if record is None:
            raise AnoclipError(f"class {cls} has no calibrated thresholds in {folder}: run `{calibrate}` first, or "
                               "fuse without --thresholds")
        model = record.model if record.model in models else VISUAL
        tiling = record.tiling if record.tiling in ("auto", "never") else "never"  # the graph never tiles
        setting = (memory or {}).get(cls, memory_setting("off", 0.0, ""))
        reasons = record.mismatches(model, models[model], text_features_sha256(text), None, tiling, 0.0, setting)
        if reasons:
            branch = "" if setting[0] == "off" else f" --memory {setting[0]}" + (
                f" --memory-weight {setting[1]:g}" if setting[1] is not None else "")
            raise AnoclipError(f"the thresholds of class {cls} do not hold for the fused graph ({'; '.join(reasons)}); "
                               f"run `{calibrate}{branch}` (no --tta, no --smoothing-sigma)")
        baked[cls] = {"image": record.image, "pixel": record.pixel}
    return {"file": artifacts.manifest.thresholds, "classes": baked}


def fuse_folder(folder: str | Path, classes: Sequence[str] | None = None, *, patch_embeds: bool = False,
                batch: int | None = None, thresholds: bool = False, memory: str = "auto",
                memory_weight: float = DEFAULT_WEIGHT, branch_maps: bool = False, command: str = "anoclip fuse",
                report=log.info) -> tuple[str, ModelEntry]:
    """Write the fused model of ``classes`` (default: every class of the prompt weights, sorted) into
    an artifact folder as model ``fused`` (file ``anoclip.<sha>.onnx``); the file name and its entry.
    ``thresholds``: bake the classes' calibrated thresholds in (outputs ``anomalous`` and ``mask``).
    ``memory``: ``auto`` bakes the memory of normal frames of every class that has one (combined
    with ``memory_weight``), ``on`` likewise but every class must have one, ``only`` the memory
    branch alone (every class must have one), ``off`` none; ``branch_maps`` adds each branch's map."""
    import onnx

    folder = Path(folder)
    if memory not in FUSE_MEMORY_MODES:
        raise AnoclipError(f"--memory must be one of {', '.join(FUSE_MEMORY_MODES)}, got {memory!r}")
    try:
        memory_weight = check_weight(memory_weight)
    except ValueError as exc:
        raise AnoclipError(str(exc)) from None
    artifacts = load_artifacts(folder, models=[VISUAL], load_thresholds=thresholds, load_memory=memory != "off")
    manifest, bank = artifacts.manifest, artifacts.prompts
    chosen = list(dict.fromkeys(classes)) if classes else sorted(bank.classes)
    missing = [c for c in chosen if c not in bank.classes]
    if missing:
        raise AnoclipError(f"class {missing[0]!r} is not in the prompt weights of {folder} (has: "
                           f"{', '.join(sorted(bank.classes))}); add it with `anoclip-export --out {folder} "
                           f"--classes {missing[0]}`")
    features = [bank.get(c).text_features for c in chosen]
    source_sha = artifacts.model_sha256(VISUAL)
    memories = {} if memory == "off" or artifacts.memory is None else {
        c: artifacts.memory.classes[c] for c in chosen if c in artifacts.memory.classes}
    lacking = [c for c in chosen if c not in memories]
    if memory in ("on", "only") and lacking:
        raise AnoclipError(f"class {lacking[0]} has no memory of normal frames in {folder} (--memory {memory} needs one "
                           f"for every fused class); make it with `anoclip calibrate memory --artifacts {folder} --class "
                           f"{lacking[0]} --normal <normal frames>`, or fuse with --memory auto")
    if branch_maps and not memories:
        raise AnoclipError(f"--branch-maps needs a class with a memory of normal frames, and no fused class has one in "
                           f"{folder}; make one with `anoclip calibrate memory --artifacts {folder} --class ... --normal ...`")
    baked_memory = {c: {"sha256": m.sha256, "rows": int(m.patches.shape[0])} for c, m in memories.items()}
    settings = {c: memory_setting("only" if memory == "only" else "on", memory_weight, r["sha256"])
                for c, r in baked_memory.items()}
    baked = calibrated_thresholds(artifacts, chosen, features, settings) if thresholds else None
    metadata = {
        "anoclip.classes": json.dumps(chosen), "anoclip.mean": json.dumps(list(manifest.mean)),
        "anoclip.std": json.dumps(list(manifest.std)), "anoclip.image_size": json.dumps(list(manifest.image_size)),
        "anoclip.grid": json.dumps(list(manifest.grid)), "anoclip.method_version": METHOD_VERSION,
        "anoclip.backbone": manifest.backbone, "anoclip.pretrained": manifest.pretrained,
        "anoclip.visual_sha256": source_sha, "anoclip.input": "RGB, resized to image_size, scaled to [0,1], "
                                                              "(x - mean) / std per channel, NCHW float32",
    }
    if baked is not None:
        metadata["anoclip.thresholds"] = json.dumps(baked)
    memory_record = {}
    if baked_memory:
        memory_record = {"memory": baked_memory, "memory_weight": memory_weight,
                         "memory_mode": "only" if memory == "only" else "combined"}
        metadata["anoclip.memory"] = json.dumps(memory_record)
        rows = ", ".join(f"{c} ({r['rows']} rows)" for c, r in baked_memory.items())
        how = " alone" if memory == "only" else f", weight {memory_weight:g}"
        report(f"with the memory of normal frames of {rows}{how}")
    report(f"fusing {len(chosen)} class(es) into the visual model: {', '.join(chosen)}")
    started = time.perf_counter()
    visual = onnx.load(str(artifacts.model_path(VISUAL)))
    model = fuse_graph(visual, chosen, features, tuple(manifest.grid), tuple(manifest.image_size), metadata,
                       patch_embeds=patch_embeds, batch=batch, thresholds=None if baked is None else (
                           [baked["classes"][c]["image"] for c in chosen], [baked["classes"][c]["pixel"] for c in chosen]),
                       memory={c: m.patches for c, m in memories.items()}, memory_weight=memory_weight,
                       memory_only=memory == "only", branch_maps=branch_maps)
    del visual
    visual_entry = manifest.models[VISUAL]
    b = batch if batch is not None else visual_entry.inputs["image"][0]
    count, (height, width), m = len(chosen), manifest.image_size, manifest.num_patches
    outputs = {"scores": [b, count], "maps": [b, count, height, width], "patch_scores": [b, count, m]}
    if baked_memory:
        outputs.update(zero_shot_scores=[b, count], memory_scores=[b, count])
    if branch_maps:
        outputs.update(memory_maps=[b, count, height, width], zero_shot_maps=[b, count, height, width])
    if baked is not None:
        outputs.update(anomalous=[b, count], mask=[b, count, height, width])
    if patch_embeds:
        outputs["patch_embeds"] = [b, m, manifest.embed_dim]
    entry = ModelEntry(
        file="", inputs={"image": [b, *visual_entry.inputs["image"][1:]]}, outputs=outputs,
        patch_tokens=visual_entry.patch_tokens if patch_embeds else "", vv_blocks=visual_entry.vv_blocks,
        opset=_opset(model), source_sha256=source_sha,
        provenance={"classes": chosen, "text_sha256": {c: text_features_sha256(f) for c, f in zip(chosen, features)},
                    "method_version": METHOD_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": command, **({"thresholds": baked} if baked is not None else {}), **memory_record})
    with owned_workspace("anoclip-fuse-") as tmp:  # a killed run's file goes with the next run's sweep
        staged = Path(tmp) / FUSED_FILE
        onnx.save(model, str(staged))
        del model
        file = store_derived_model(folder, FUSED, staged, entry, command, base_name=FUSED_FILE, report=report)
    report(f"wrote {folder / file} in {time.perf_counter() - started:.1f} s")
    return file, entry


def parse_class_list(value: str | None) -> list[str] | None:
    """``a,b,c`` -> [a, b, c]; None or empty -> None (every class)."""
    names = [c.strip() for c in (value or "").split(",") if c.strip()]
    return names or None


def _fuse_options(command):
    for option in reversed([
        click.option("--classes", default=None, metavar="A,B,...",
                     help="Classes baked into the graph, in this order (default: every class of the prompt weights, "
                          "sorted). The order is stored in the manifest and in the model's metadata."),
        click.option("--patch-embeds", is_flag=True,
                     help="Keep the V-V patch tokens as an output too (needed for test-time adaptation with "
                          "--model fused)."),
        click.option("--batch", default=None, type=click.IntRange(min=1),
                     help="Fix the batch axis of a dynamic-batch visual model to this size (default: as the visual "
                          "model has it)."),
        click.option("--memory", "memory", default="auto", show_default=True, type=click.Choice(FUSE_MEMORY_MODES),
                     help="The memory of normal frames (`anoclip calibrate memory`): auto bakes the memory of every "
                          "fused class that has one, combined with the zero-shot branch (classes without one stay "
                          "zero-shot); on: the same, every class must have one; only: the memory branch alone; off: "
                          "zero-shot only. Predict with the same --memory and --memory-weight."),
        click.option("--memory-weight", default=DEFAULT_WEIGHT, show_default=True, type=click.FloatRange(0.0, 1.0),
                     help="Weight w of the memory branch: w * memory + (1 - w) * zero-shot, baked into the graph."),
        click.option("--branch-maps", is_flag=True,
                     help="Also output each branch's map: memory_maps and zero_shot_maps [B,K,H,W] (memory_maps is 0 "
                          "for a class without a memory); needs a class with a memory."),
        click.option("--thresholds", is_flag=True,
                     help="Bake the classes' calibrated thresholds (`anoclip calibrate threshold`, without --tta and "
                          "smoothing) into the graph: outputs anomalous [B,K] (score > image threshold) and mask "
                          "[B,K,H,W] (map > pixel threshold), bool, so plain ONNX consumers get the decision too."),
    ]):
        command = option(command)
    return command


@click.command("fuse", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--artifacts", "artifacts_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder written by anoclip-export.")
@_fuse_options
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def fuse_command(artifacts_dir, classes, patch_embeds, batch, memory, memory_weight, branch_maps, thresholds, verbose):
    """Write anoclip.onnx: one graph from the normalised image to scores [B,K] and anomaly maps
    [B,K,H,W] of K classes (and patch_scores [B,K,M]), for any ONNX consumer: trtexec, Triton,
    DeepStream, OpenVINO, onnxruntime. Runs `anoclip predict --model fused` too.

    The folder's visual model with the scoring appended (cosine to t+/t-, softmax, the 3x3 mean
    filter and the align-corners upsampling as two constant matrix products): the same numbers as
    the runtime, to float32 rounding. Made again when the visual model or a class's prompts change.
    With --thresholds it also decides (anomalous, mask), as `anoclip predict` does with the same
    thresholds; recalibrating afterwards makes it stale until fused again. With a memory of normal
    frames in the folder (`anoclip calibrate memory`) its scores and maps are those of `anoclip
    predict --memory auto --memory-weight W` (see --memory); a new memory makes it stale likewise.
    """
    from anoclip.runtime.plumbing import configure_logging, given_command

    configure_logging(verbose)
    fuse_folder(artifacts_dir, parse_class_list(classes), patch_embeds=patch_embeds, batch=batch, thresholds=thresholds,
                memory=memory, memory_weight=memory_weight, branch_maps=branch_maps, command=given_command(click.get_current_context(), "anoclip", "fuse"), report=click.echo)
