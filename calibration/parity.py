"""Fidelity of a reduced-precision visual model against the fp32 one it was made from, and the gate
that a calibration must pass before its model is written.

Both graphs run on the same inputs (onnxruntime, CPU); the figures are:

* cosine similarity of ``image_embeds`` and of every patch token of ``patch_embeds`` (mean, min);
* the largest absolute difference of either output;
* Pearson r of the anomaly maps (the runtime's own scoring: p_abnormal of each patch with a class's
  t+/t-, 3x3 mean filter, bilinear upsampling to the model input), per input and class (mean, min);
* the largest difference of the image score (p_abnormal of the global token).

The gate compares the mean map r and the mean patch cosine with the thresholds of the precision
(``DEFAULT_GATES``). The defaults were chosen from measurements on ViT-B-16-plus-240 (random
weights, and the same weights with outlier channels added to the residual stream, which is what
makes CLIP hard to quantize): README "Reduced precision" gives the figures.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from anoclip.runtime.backends import OnnxRuntimeBackend
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.fidelity import agreement
from anoclip.runtime.plumbing import quiet_loggers
from anoclip.runtime.prompt_weights import PromptBank
from anoclip.runtime.scoring import abnormal_probability, patch_grid, upsample_bilinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    """The least fidelity a reduced-precision model must show to be written."""

    min_map_r: float  # mean over inputs and classes of the maps' Pearson r
    min_patch_cosine: float  # mean cosine of the patch tokens

    def failures(self, parity: "Parity") -> list[str]:
        out = []
        if not parity.map_r_mean >= self.min_map_r:  # NaN fails too
            out.append(f"map r {parity.map_r_mean:.6g} < {self.min_map_r:g}")
        if not parity.patch_cos_mean >= self.min_patch_cosine:
            out.append(f"patch cosine {parity.patch_cos_mean:.6g} < {self.min_patch_cosine:g}")
        return out


# Measured on ViT-B-16-plus-240 (AMD EPYC CPU, onnxruntime 1.32), 64 calibration frames, 16 held out:
# int8 map r mean 0.9957 (min 0.983), patch cosine 0.998 on random weights; 0.987 (min 0.943) and 0.998
# on the outlier ("stress") variant, which is what makes CLIP hard to quantize. A placement that
# quantizes the residual stream and the LayerNorm inputs (ModelOpt's) measured map r 0.961 / 0.964:
# the int8 gate (0.97) sits between, so that such a model is refused while ours keeps a margin
# (lower it knowingly for real weights that measure below). fp16 gave map r >= 0.999999 on both;
# 0.999 fails only a real fault (an overflow, a wrong cast).
DEFAULT_GATES = {
    "int8": Gate(min_map_r=0.97, min_patch_cosine=0.98),
    "fp16": Gate(min_map_r=0.999, min_patch_cosine=0.999),
}


@dataclass
class Parity:
    """Fidelity figures of one reduced-precision model against the fp32 one."""

    inputs: int
    classes: list[str]
    image_cos_mean: float
    image_cos_min: float
    patch_cos_mean: float
    patch_cos_min: float
    max_abs_diff: float  # over image_embeds and patch_embeds
    map_r_mean: float
    map_r_min: float
    score_max_abs_diff: float
    inputs_note: str = ""  # where the inputs came from (held-out frames, augmented views)
    gate: dict[str, float] = field(default_factory=dict)
    passed: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    def table_lines(self, label: str) -> list[str]:
        rows = [
            ("image_embeds cosine mean / min", f"{self.image_cos_mean:.6f} / {self.image_cos_min:.6f}"),
            ("patch_embeds cosine mean / min", f"{self.patch_cos_mean:.6f} / {self.patch_cos_min:.6f}"),
            ("max abs diff (embeds)", f"{self.max_abs_diff:.4g}"),
            ("anomaly map Pearson r mean / min", f"{self.map_r_mean:.6f} / {self.map_r_min:.6f}"),
            ("image score max abs diff", f"{self.score_max_abs_diff:.3g}"),
        ]
        gate = ", ".join(f"{k} >= {v:g}" for k, v in self.gate.items())
        head = (f"{label} vs fp32 on {self.inputs} inputs ({self.inputs_note or 'given'}), "
                f"classes {', '.join(self.classes)}")
        width = max(len(r[0]) for r in rows)
        lines = [head] + [f"  {name.ljust(width)}  {value}" for name, value in rows]
        return lines + [f"  gate ({gate}): {'passed' if self.passed else 'FAILED'}"]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two maps; 1 when both are constant and equal, 0 when only one is constant."""
    a = a.astype(np.float64).ravel() - a.mean(dtype=np.float64)
    b = b.astype(np.float64).ravel() - b.mean(dtype=np.float64)
    sa, sb = np.sqrt(a @ a), np.sqrt(b @ b)
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float((a @ b) / (sa * sb))


def maps(patch_embeds: np.ndarray, text_features: np.ndarray, grid: tuple[int, int],
         size: tuple[int, int]) -> np.ndarray:
    """Anomaly maps [N, H, W] at the model input size, as the Detector makes them for one tile."""
    return upsample_bilinear(patch_grid(abnormal_probability(patch_embeds, text_features), grid), size)


def run_model(path: str | Path, inputs: Sequence[np.ndarray], desc: str, threads: int | None = None):
    """(image_embeds [N, D], patch_embeds [N, M, D]) of a graph on the inputs ([1, 3, H, W] each)."""
    from tqdm import tqdm

    with quiet_loggers("anoclip.runtime.backends", level=logging.WARNING):  # "runs X on CPU": we know
        backend = OnnxRuntimeBackend(path, providers="cpu", threads=threads)  # a candidate file, not yet a folder's
    images, patches = [], []
    for batch in tqdm(inputs, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False):
        image, patch = backend.run(batch)
        images.append(image)
        patches.append(patch)
    return np.concatenate(images), np.concatenate(patches)


def compare(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray], bank: PromptBank,
            grid: tuple[int, int], size: tuple[int, int], inputs_note: str = "") -> Parity:
    """Fidelity figures of ``candidate`` outputs against ``reference`` (both (image_embeds, patch_embeds))."""
    (ref_img, ref_patch), (new_img, new_patch) = reference, candidate
    finite = all(np.all(np.isfinite(x)) for x in (new_img, new_patch))
    if not finite:
        log.warning("the reduced-precision model gives NaN or infinity")
    image, patch = agreement(ref_img, new_img, "image_embeds"), agreement(ref_patch, new_patch, "patch_embeds")
    image_cos, patch_cos, max_abs = image.cosines, patch.cosines, max(image.max_abs, patch.max_abs)
    rs, score_diff = [], 0.0
    classes = sorted(bank.classes)
    for cls in classes:
        text = bank.get(cls).text_features
        ref_maps, new_maps = maps(ref_patch, text, grid, size), maps(new_patch, text, grid, size)
        rs += [pearson(a, b) for a, b in zip(ref_maps, new_maps)]
        diff = np.abs(abnormal_probability(ref_img, text) - abnormal_probability(new_img, text))
        score_diff = max(score_diff, float(np.max(diff)))
    figures = {"image_cos_mean": image_cos.mean(), "image_cos_min": image_cos.min(),
               "patch_cos_mean": patch_cos.mean(), "patch_cos_min": patch_cos.min(), "max_abs_diff": max_abs,
               "map_r_mean": np.mean(rs), "map_r_min": np.min(rs), "score_max_abs_diff": score_diff}
    return Parity(inputs=int(ref_img.shape[0]), classes=classes, inputs_note=inputs_note,
                  **{k: float(v) if finite else float("nan") for k, v in figures.items()})


def check_gate(parity: Parity, gate: Gate, precision: str) -> None:
    """Record the gate in ``parity``; AnoclipError (nothing is written) when the figures fall below it."""
    parity.gate = {"map_r_mean": gate.min_map_r, "patch_cos_mean": gate.min_patch_cosine}
    failures = gate.failures(parity)
    parity.passed = not failures
    if failures:
        hint = ("calibrate on more frames of the scene (--n), try --method entropy or percentile, or lower "
                "--min-map-r / --min-cosine knowingly" if precision == "int8" else
                "the model overflows or was converted wrongly in fp16; keep fp32 or lower --min-map-r / --min-cosine "
                "knowingly")
        raise AnoclipError(f"the {precision} model fails the parity gate ({'; '.join(failures)}); nothing was written; "
                           f"{hint}")
