"""The public API: ``Detector.load(artifacts)`` then ``predict(image, cls)``."""

from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import numpy as np

from .artifacts import FUSED, TTA_GRAPH, VISUAL, Artifacts, load_artifacts
from .backends import Backend, backend_model, create_backend
from .errors import ArtifactError
from .fused import OUTPUTS as FUSED_OUTPUTS, baked_memory, check_fused_holds, fused_classes
from .memory import DEFAULT_WEIGHT, MEMORY_MODES, ClassMemory, check_weight, combine, memory_scores
from .preprocess import DEFAULT_MAX_PIXELS, TileLayout, as_rgb_uint8, preprocess, read_image
from .prompt_weights import ClassPrompts
from .scoring import abnormal_probability
from .decision import ClassThreshold, decide
from .thresholds import ClassCalibration, ThresholdTable, memory_setting, text_features_sha256, tta_settings
from .result import Result, anomaly_maps
from .tta import OnnxTTARunner, TTAAdapter, TTAConfig
from .tta.config import array_module, as_tta_config
from .vocabulary import TTA_BACKENDS, model_precision

log = logging.getLogger(__name__)


class Detector:
    """Zero-shot anomaly detector over an exported artifact folder (no PyTorch needed).

    Build it with :meth:`load`. ``predict`` takes an RGB image ([H, W, 3] uint8, or a path) and a
    class name present in the prompt weights; the Result carries the decision of the thresholds in
    force (:meth:`threshold_for`: calibrated, or :attr:`threshold_override`).

    ``model``: the graph ``backend`` runs (``visual``, ``visual_qkv``, a reduced-precision model of
    the visual one: ``visual_int8``, ``visual_fp16``, or ``fused``: image to scores and maps of its
    classes in one graph), which calibrated thresholds are checked against; ``thresholds``: those of
    the artifacts when None.

    ``memory``: the memory branch (normal frames' patch tokens, `anoclip calibrate memory`): ``auto``
    (on for the classes that have a memory), ``on`` (a class without one is an error), ``off`` or
    ``only`` (the memory branch alone); ``memory_weight``: its weight w in the combined score and map.
    """

    def __init__(self, artifacts: Artifacts, backend: Backend, tiling: str = "auto",
                 smoothing_sigma: float = 0.0, tta: TTAConfig | None = None, tta_backend: str = "numpy",
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, *, model: str = VISUAL,
                 thresholds: ThresholdTable | None = None, memory: str = "auto", memory_weight: float = DEFAULT_WEIGHT):
        if tta_backend not in TTA_BACKENDS:
            raise ValueError(f"tta_backend must be one of {', '.join(TTA_BACKENDS)}, got {tta_backend!r}")
        if memory not in MEMORY_MODES:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        self.memory = memory
        self.memory_weight = check_weight(memory_weight)
        self.enrolling: set[str] = set()  # classes whose memory is being made (the stream's --enrol): none yet is no error
        self.artifacts = artifacts
        self.backend = backend
        self.tiling = tiling
        self.smoothing_sigma = smoothing_sigma
        self.tta = tta  # the TTA configuration predict uses by default (None: AnoCLIP without TTA)
        self.tta_backend = tta_backend
        if tta is not None:
            array_module(tta_backend)  # a missing CuPy is one line at load, not at the first image
        self.max_pixels = max_pixels  # largest image file decoded, in pixels (None: no limit)
        # One adapter per (class, configuration, state key): with the default "persistent" policy
        # its AdamW state carries over from image to image of that class, as in the authors' code.
        # The state key keeps independent streams apart (a camera's adapter sees only its frames).
        self._adapters: dict[tuple[str, TTAConfig, str], TTAAdapter | OnnxTTARunner] = {}
        self.model = model
        self.thresholds = thresholds if thresholds is not None else artifacts.thresholds
        self._calibrations: dict[tuple[str, TTAConfig | None], ClassCalibration | None] = {}
        self._told_no_threshold: set[str] = set()
        # (image, pixel): the user's thresholds, each in place of the calibrated one when not None
        self.threshold_override: tuple[float | None, float | None] = (None, None)
        manifest = artifacts.manifest
        self.input_size = tuple(manifest.image_size)
        self.grid = tuple(manifest.grid)
        self.mean, self.std = manifest.mean, manifest.std
        # The fused model scores its own classes in the graph: class -> its index there.
        self._fused_index = {c: k for k, c in enumerate(fused_classes(artifacts))} if model == FUSED else None
        self._fused_memory: dict[str, bool] = {}  # class -> the fused graph's outputs hold its memory branch

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8: the precision of the model the backend runs (of the engine, natively)."""
        if getattr(self.backend, "name", "") == "tensorrt-native":
            return self.backend.precision
        return model_precision(self.model)

    @classmethod
    def load(cls, artifacts_dir: str | os.PathLike, backend: str = "auto", tta=False, *, model: str = VISUAL,
             precision: str = "fp32", tiling: str = "auto", smoothing_sigma: float = 0.0, verify: bool = True,
             threads: int | None = None, tta_backend: str = "numpy",
             max_pixels: int | None = DEFAULT_MAX_PIXELS, load_thresholds: bool = True, memory: str = "auto",
             memory_weight: float = DEFAULT_WEIGHT) -> "Detector":
        """Load an artifact folder.

        Args:
            artifacts_dir: folder written by ``anoclip-export``.
            backend: ``auto`` (TensorRT -> CUDA -> CPU execution providers), ``cpu``, ``cuda``, ``tensorrt``,
                ``tensorrt-native`` (the folder's engine, `anoclip build-engine`) or ``openvino``.
            tta: False, True (default TTA settings) or a ``TTAConfig``: AnoCLIP+ maps (the image
                score does not change).
            model: ``visual`` (V-V tokens), ``visual_qkv`` (the plain-CLIP baseline, when exported) or
                ``fused`` (``anoclip fuse``: scores and maps come out of the graph; TTA needs it made
                with ``--patch-embeds``).
            precision: ``fp32`` (the exported model), ``int8`` (the Q/DQ model of `anoclip calibrate
                int8`) or ``fp16`` (`anoclip calibrate fp16`); reduced precision exists for ``visual``.
                With ``tensorrt-native`` it picks the engine of that precision (`anoclip build-engine
                --precision`), whatever model it was built from.
            tiling: ``auto`` (tile frames whose aspect ratio exceeds 1.2), ``never`` or ``always``.
            smoothing_sigma: optional Gaussian smoothing of the map in model pixels (0 = off, as published).
            verify: check file hashes against the manifest (engine files too).
            threads: CPU threads for onnxruntime (default: its own choice).
            tta_backend: ``numpy`` (the array code on the CPU), ``cupy`` (the same code on CuPy arrays,
                on the GPU) or ``onnx`` (the exported ``tta.onnx`` through onnxruntime with the same
                providers).
            max_pixels: image files claiming more pixels than this are refused before decoding.
            load_thresholds: read the folder's calibrated thresholds (see :meth:`threshold_for`).
            memory, memory_weight: the memory branch (see the class docstring).
        """
        model = backend_model(backend, model, precision)
        models = [model] + ([TTA_GRAPH] if tta_backend == "onnx" and tta else [])  # only TTA runs it
        artifacts = load_artifacts(artifacts_dir, verify=verify, models=models, load_thresholds=load_thresholds,
                                   load_memory=memory != "off")
        options = {"outputs": FUSED_OUTPUTS} if model == FUSED else {}
        engine = create_backend(artifacts, model, backend, precision=precision, threads=threads, **options)
        if backend == "tensorrt-native":  # thresholds are checked against the model the engine was built from
            model = engine.sidecar.source_model
        return cls(artifacts, engine, tiling=tiling, smoothing_sigma=smoothing_sigma, tta=as_tta_config(tta),
                   tta_backend=tta_backend, max_pixels=max_pixels, model=model, memory=memory,
                   memory_weight=memory_weight)

    @property
    def classes(self) -> list[str]:
        """The classes this detector scores: those of the prompt weights (sorted), or of the fused
        model in its order."""
        if self._fused_index is not None:
            return list(self._fused_index)
        return sorted(self.artifacts.prompts.classes)

    def class_memory(self, cls: str) -> ClassMemory | None:
        """The memory the memory branch compares ``cls``'s patches with (None: the branch is off for it)."""
        bank = self.artifacts.memory
        missing = bank is None or cls not in bank.classes
        if self.memory == "off" or (missing and (self.memory == "auto" or cls in self.enrolling)):
            return None
        if bank is None:
            from .memory import MemoryBank

            bank = MemoryBank({}, "", 0)
        return bank.get(cls, self.artifacts.folder)

    def memory_setting(self, cls: str) -> tuple[str, float | None, str]:
        """The memory branch in force for ``cls`` as a thresholds record states it (mode, weight, sha256)."""
        memory = self.class_memory(cls)
        if memory is None:
            return memory_setting("off", self.memory_weight, "")
        return memory_setting("only" if self.memory == "only" else "on", self.memory_weight, memory.sha256)

    def class_prompts(self, cls: str) -> ClassPrompts:
        if self._fused_index is not None:
            check_fused_holds(self.artifacts, list(self._fused_index), [cls])
        return self.artifacts.prompts.get(cls)

    def resolve_classes(self, cls: str | Sequence[str]) -> list[str]:
        """The classes a call asks for: one name, a list of names, or ``"all"`` (:attr:`classes`;
        unless a class has that name); each checked to exist."""
        if isinstance(cls, str):
            every = cls == "all" and "all" not in self.classes
            if every and self._fused_index is not None:  # the folder's every class: a partial fused model is refused
                check_fused_holds(self.artifacts, list(self._fused_index), None)
            names = self.classes if every else [cls]
        else:
            names = list(dict.fromkeys(cls))
        if not names:
            raise ValueError("no class given")
        for name in names:
            self.class_prompts(name)
            self.class_memory(name)  # --memory on|only: a class without a memory fails before any image is read
            self.memory_in_graph(name)  # so does a fused model that baked another memory than these settings ask
        return names

    def threshold_for(self, cls: str, image: float | None = None, pixel: float | None = None) -> ClassThreshold | None:
        """The thresholds for ``cls``: the calibrated ones (when they hold for this model, these
        prompts and this TTA setting), each replaced by ``image`` / ``pixel`` when given (by those
        of :attr:`threshold_override` when not).

        None when there are neither; that is said once per class (info level): scores only.
        """
        image = self.threshold_override[0] if image is None else image
        pixel = self.threshold_override[1] if pixel is None else pixel
        calibrated = self.calibration(cls)
        threshold = ClassThreshold.in_force(None if calibrated is None else (calibrated.image, calibrated.pixel),
                                            image, pixel,
                                            None if calibrated is None else (calibrated.centre, calibrated.pixel_centre))
        if threshold is None and cls not in self._told_no_threshold:
            self._told_no_threshold.add(cls)
            log.info("no threshold set for class %s: reporting scores only; run `%s`", cls, self._calibrate_hint(cls))
        return threshold

    def calibration(self, cls: str) -> ClassCalibration | None:
        """The calibrated record of ``cls``, if any and if it was made on these artifacts and
        settings (the same model file, text embeddings of the class, TTA, tiling and smoothing); a
        stale one is warned about once and ignored."""
        key = (cls, self.tta)
        if key not in self._calibrations:
            record = self.thresholds.classes.get(cls) if self.thresholds is not None else None
            text = text_features_sha256(self.class_prompts(cls).text_features)
            reasons = record.mismatches(self.model, self.artifacts.model_sha256(self.model), text, tta_settings(self.tta),
                                        self.tiling, self.smoothing_sigma,
                                        self.memory_setting(cls)) if record is not None else []
            if reasons:
                log.warning("threshold of class %s not applied: it was calibrated on other artifacts or settings (%s); "
                            "re-run `%s`", cls, "; ".join(reasons), self._calibrate_hint(cls))
                self._told_no_threshold.add(cls)  # the warning said it
                record = None
            self._calibrations[key] = record
        return self._calibrations[key]

    def _calibrate_hint(self, cls: str) -> str:
        model = f" --precision {self.precision}" if self.precision != "fp32" else f" --model {self.model}"
        flags = (model if self.model != VISUAL else "") + (" --tta" if self.tta else "")
        return f"anoclip calibrate threshold --artifacts {self.artifacts.folder} --class {cls}{flags} --normal ..."

    # ------------------------------------------------------------------------------------------

    def predict(self, image, cls: str | Sequence[str], tta=None) -> Result:
        """Score one image (array or path) for class ``cls``, or for several classes (a list, or
        ``"all"``) from one run of the visual model: then ``Result.per_class`` holds each."""
        return self.predict_batch([image], cls, tta=tta)[0]

    def predict_batch(self, images: Sequence, cls: str | Sequence[str], tta=None,
                      tta_keys: Sequence[str] | None = None, keep_tokens: bool = False) -> list[Result]:
        """Score several images, running all their tiles through the model together, for one class
        or several (see :meth:`predict`); TTA adapts the same tokens once per class.

        ``tta_keys``: per image, the name of the TTA state it adapts (default: one state per class);
        images of different camera streams pass their stream's name so that each keeps its own.
        ``keep_tokens``: each Result keeps its raw patch tokens (``Result.patch_tokens``).
        """
        classes = self.resolve_classes(cls)
        tta_config = self.tta if tta is None else as_tta_config(tta)
        if not images:
            return []
        if tta_keys is not None and len(tta_keys) != len(images):
            raise ValueError(f"tta_keys has {len(tta_keys)} entries for {len(images)} images")
        t0 = time.perf_counter()
        batches, layouts, sizes = [], [], []
        for image in images:
            rgb = read_image(image, self.max_pixels) if isinstance(image, (str, os.PathLike)) else as_rgb_uint8(image)
            batch, layout = preprocess(rgb, self.input_size, self.mean, self.std, self.tiling)
            batches.append(batch)
            layouts.append(layout)
            sizes.append(rgb.shape[:2])
        t1 = time.perf_counter()
        memory = any(self.class_memory(name) is not None and not self.memory_in_graph(name) for name in classes)
        outputs = self._run(np.concatenate(batches), tta_config is not None or memory or keep_tokens)
        t2 = time.perf_counter()
        n = len(images)
        results, start = [], 0
        for i, (layout, size) in enumerate(zip(layouts, sizes)):
            tiles = slice(start, start + len(layout.offsets))
            per_class = {}
            for name in classes:
                result = self._class_result(outputs, tiles, name, layout, size, tta_config,
                                            "" if tta_keys is None else tta_keys[i])
                result.timings = {"preprocess": (t1 - t0) * 1e3 / n, "model": (t2 - t1) * 1e3 / n, **result.timings}
                if keep_tokens:
                    result.patch_tokens, result.layout = outputs["patch_embeds"][tiles].copy(), layout
                    if result.zero_shot_score is None:
                        result.zero_shot_score = result.score
                self.decide(result, outputs.get("patch_embeds", None), tiles, layout)
                per_class[name] = result
            first = per_class[classes[0]]
            if len(classes) > 1:
                first.per_class = per_class
            results.append(first)
            start = tiles.stop
        return results

    def decide(self, result: Result, patch_tokens: np.ndarray | None = None, tiles: slice = slice(None),
               layout: TileLayout | None = None) -> None:
        """Set ``result``'s threshold, anomalous and regions: the decision of the thresholds in force
        for its class (nothing to decide, and nothing said, without a thresholds file or override).

        With the raw patch tokens the map was made from (``patch_tokens[tiles]``, [tiles, M, D]) and
        the tiles' ``layout``, each region of a class with defect types gets ``type`` and
        ``type_similarity`` (``region_types.py``). Without tokens (a fused model's run that returns
        none: made without ``--patch-embeds``) regions are not typed.
        """
        if self.thresholds is None and self.threshold_override == (None, None):
            return
        result.threshold = self.threshold_for(result.cls)
        result.anomalous, result.regions = decide(result.score, result.anomaly_map_full, result.threshold)
        if not result.regions or patch_tokens is None or layout is None:
            return
        prompts = self.artifacts.prompts.classes.get(result.cls)
        if prompts is None or prompts.type_features is None:
            return
        from .region_types import type_regions

        type_regions(result.regions, result.anomaly_map_full, result.threshold.pixel, patch_tokens[tiles], self.grid,
                     layout, prompts.defect_types, prompts.type_features)

    def memory_in_graph(self, cls: str) -> bool:
        """Whether the fused model baked ``cls``'s memory of normal frames as this detector's memory
        settings ask (its scores and maps are then the combined ones); an ArtifactError naming
        `anoclip fuse` when it baked one they do not match (see ``fused.baked_memory``)."""
        if self._fused_index is None:
            return False
        if cls not in self._fused_memory:
            self._fused_memory[cls] = baked_memory(self.artifacts, cls, self.memory, self.memory_weight,
                                                   self.class_memory(cls))
        return self._fused_memory[cls]

    def _run(self, batch: np.ndarray, tokens: bool) -> dict[str, np.ndarray]:
        """The model's outputs by name (``tokens``: the patch tokens are needed, for TTA or the memory)."""
        if self._fused_index is None:
            return dict(zip(("image_embeds", "patch_embeds"), self.backend.run(batch)))
        outputs = self.backend.run_all(batch)
        if tokens and "patch_embeds" not in outputs:
            raise ArtifactError(f"the fused model of {self.artifacts.folder} has no patch tokens for test-time "
                                f"adaptation and no memory of normal frames of the classes asked; make it with "
                                f"`anoclip fuse --artifacts {self.artifacts.folder}` (bakes the folder's memory; add "
                                "--patch-embeds for test-time adaptation), or use --model visual")
        return outputs

    def _class_result(self, outputs: dict[str, np.ndarray], tiles: slice, cls: str, layout: TileLayout,
                      size: tuple[int, int], tta_config: TTAConfig | None, state: str) -> Result:
        """One class's Result from the model outputs of one image's tiles."""
        started = time.perf_counter()
        text = self.class_prompts(cls).text_features
        k = self._fused_index[cls] if self._fused_index is not None else None
        in_graph = self.memory_in_graph(cls)  # scores, maps and patch_scores of the graph are the combined ones
        tile_maps = None
        timings = {}
        if tta_config is not None:
            patches = self._adapt(cls, outputs["patch_embeds"][tiles], tta_config, state)
            timings["tta"] = (time.perf_counter() - started) * 1e3
            probs = abnormal_probability(patches, text)
        elif k is not None:  # the graph scored the patches and made the maps
            probs, tile_maps = outputs["patch_scores"][tiles, k], outputs["maps"][tiles, k]
        else:
            probs = abnormal_probability(outputs["patch_embeds"][tiles], text)  # [tiles, M]
        score = (outputs["zero_shot_scores" if in_graph else "scores"][tiles, k] if k is not None
                 else abnormal_probability(outputs["image_embeds"][tiles], text))
        score = float(np.mean(score))
        memory = self.class_memory(cls)
        if memory is None:
            result = self._maps(score, probs, tile_maps, layout, size, cls)
        elif in_graph and tta_config is None:  # per tile each branch's score: the mean of one, the max of the other
            memory_score = float(np.max(outputs["memory_scores"][tiles, k]))
            only = self.memory == "only"
            result = self._maps(memory_score if only else float(combine(score, memory_score, self.memory_weight)),
                                probs, tile_maps, layout, size, cls)
            result.branches = ("memory",) if only else ("zero_shot", "memory")
            result.zero_shot_score, result.memory_score = score, memory_score
        else:  # the raw V-V tokens against the memory (which holds raw tokens; TTA adapts the zero-shot branch only)
            result = self._with_memory(score, probs, memory_scores(outputs["patch_embeds"][tiles], memory.patches),
                                       layout, size, cls)
        timings["scoring"] = (time.perf_counter() - started) * 1e3 - timings.get("tta", 0.0)
        result.timings = timings
        return result

    def _with_memory(self, score: float, probs: np.ndarray, s: np.ndarray, layout: TileLayout, size: tuple[int, int],
                     cls: str) -> Result:
        """The Result of the zero-shot image score and per-patch values [tiles, M] with the memory
        scores ``s`` [tiles, M] (combined, or alone with memory ``only``)."""
        memory_score = float(np.max(s))
        if self.memory == "only":
            result = self._maps(memory_score, s, None, layout, size, cls)
            result.branches = ("memory",)
        else:
            result = self._maps(float(combine(score, memory_score, self.memory_weight)),
                                combine(probs, s, self.memory_weight), None, layout, size, cls)
            result.branches = ("zero_shot", "memory")
        result.zero_shot_score, result.memory_score = score, memory_score
        return result

    def score_tokens(self, cls: str, patch_tokens: np.ndarray, zero_shot_score: float, layout: TileLayout,
                     size: tuple[int, int], memory_rows: np.ndarray | None) -> Result:
        """The Result (decided by the thresholds in force) of raw patch tokens [tiles, M, D] kept by
        ``predict_batch(..., keep_tokens=True)`` against ``memory_rows`` (unit rows [N, D]; None:
        zero-shot alone), as ``predict`` would have made it with that memory (no TTA)."""
        probs = abnormal_probability(patch_tokens, self.class_prompts(cls).text_features)
        if memory_rows is None:
            result = self._maps(zero_shot_score, probs, None, layout, size, cls)
        else:
            result = self._with_memory(zero_shot_score, probs, memory_scores(patch_tokens, memory_rows), layout, size,
                                       cls)
        self.decide(result, patch_tokens, slice(None), layout)
        return result

    def use_calibration(self, memory=None, thresholds: ThresholdTable | None = None) -> None:
        """Put a new memory bank and thresholds table in force (the folder's, after a commit)."""
        if memory is not None:
            self.artifacts.memory = memory
        if thresholds is not None:
            self.thresholds = thresholds
        self._calibrations.clear()
        self._told_no_threshold.clear()

    def _maps(self, score: float, probs: np.ndarray, tile_maps: np.ndarray | None, layout: TileLayout,
              size: tuple[int, int], cls: str) -> Result:
        """The Result of per-patch probabilities [tiles, M] (and the tiles' maps at model resolution,
        when the model made them)."""
        model_map, full = anomaly_maps(probs, self.grid, layout, size, self.smoothing_sigma, tile_maps)
        return Result(score=score, anomaly_map=model_map, anomaly_map_full=full, patch_probabilities=probs,
                      cls=cls, image_size=(int(size[0]), int(size[1])), tiles=len(layout.offsets))

    def tta_adapter(self, cls: str, config: TTAConfig | None = None, state: str = "") -> TTAAdapter | OnnxTTARunner:
        """The adapter (and its optimiser state) that TTA uses for ``cls`` (and the state key ``state``)."""
        config = config or self.tta or TTAConfig()
        key = (cls, config, state)
        if key not in self._adapters:
            prompts = self.class_prompts(cls)
            if self.tta_backend == "onnx":
                path = self.artifacts.model_path(TTA_GRAPH)
                try:
                    self._adapters[key] = OnnxTTARunner(
                        str(path), getattr(self.backend, "providers", None),
                        T=prompts.prompt_features, text_features=prompts.text_features, config=config)
                except ValueError as exc:  # the graph bakes steps, adapter and optimiser constants
                    raise ArtifactError(
                        f"{str(exc).split(';')[0]}; re-export it with `anoclip-export --out {self.artifacts.folder} --tta "
                        f"--tta-steps {config.steps} --tta-adapter {config.adapter}`, or use --tta-backend numpy"
                    ) from None
            else:
                xp = array_module(self.tta_backend)
                self._adapters[key] = TTAAdapter(xp.asarray(prompts.prompt_features), xp.asarray(prompts.text_features),
                                                 config)
        return self._adapters[key]

    def reset_tta(self, cls: str | None = None, state: str | None = None) -> None:
        """Forget the TTA optimiser state of ``cls`` (all classes when None) under the state key
        ``state`` (all keys when None), e.g. when a camera stream reconnects."""
        for key in [k for k in self._adapters if (cls is None or k[0] == cls) and (state is None or k[2] == state)]:
            del self._adapters[key]

    def _adapt(self, cls: str, patches: np.ndarray, config: TTAConfig, state: str = "") -> np.ndarray:
        """Adapt the patch tokens of every tile (each tile is one image for the adapter)."""
        adapter = self.tta_adapter(cls, config, state)
        if self.tta_backend != "cupy":
            return np.stack([np.asarray(adapter.adapt(tile)) for tile in patches])
        xp = array_module("cupy")
        return np.stack([xp.asnumpy(adapter.adapt(xp.asarray(tile))) for tile in patches])
