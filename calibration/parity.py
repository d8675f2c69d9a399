"""Fidelity of a reduced-precision visual model against the fp32 one it was made from, and the gate
that a calibration must pass before its model is written.

Both graphs run on the same inputs (onnxruntime, CPU); the figures are:

* cosine similarity of ``image_embeds`` and of every patch token of ``patch_embeds`` (mean, min);
* the largest absolute difference of either output;
* patch score error: the RMS difference of the patch scores (p_abnormal of each patch token with a
  class's t+/t-) divided by the standard deviation of the fp32 patch scores over all parity inputs;
* map error: the same for the anomaly maps (3x3 mean filter, bilinear upsampling to the model
  input), the runtime's own scoring; both are the largest over the classes;
* decision agreement, where the folder has thresholds for a class: the share of parity inputs
  whose image decision (score >= image threshold) is the same, and of map pixels whose pixel
  decision is the same (the smallest over the classes);
* Pearson r of the anomaly maps per input and class (mean, min) and the largest difference of the
  image score: reported, not gated by default.

The gate is on what decisions depend on: the patch cosine, the patch score and map errors, and the
decision agreement. The errors are relative to the spread of the scores over the whole parity
set, so a scene whose maps are nearly flat frame by frame is judged by how far the scores move
against how much they vary, not by a per-frame correlation: Pearson r of a nearly flat map is
ill-conditioned (an int8 model measured r min 0.10 at patch cosine 0.99 on normal frames of a
plain scene) and is a reported figure (``--min-map-r`` gates on it when asked).
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

    min_patch_cosine: float  # mean cosine of the patch tokens
    max_patch_error: float  # RMS patch score difference / spread of the fp32 patch scores
    max_map_error: float  # RMS map difference / spread of the fp32 maps
    min_map_r: float = -1.0  # mean maps' Pearson r; -1: reported only
    min_decision_agreement: float = 1.0  # share of equal image decisions where thresholds exist

    def failures(self, parity: "Parity") -> list[str]:
        out = []
        if not parity.patch_cos_mean >= self.min_patch_cosine:  # NaN fails too
            out.append(f"patch cosine {parity.patch_cos_mean:.6g} < {self.min_patch_cosine:g}")
        if not parity.patch_error <= self.max_patch_error:
            out.append(f"patch score error {parity.patch_error:.4g} > {self.max_patch_error:g}")
        if not parity.map_error <= self.max_map_error:
            out.append(f"map error {parity.map_error:.4g} > {self.max_map_error:g}")
        if self.min_map_r > -1 and not parity.map_r_mean >= self.min_map_r:
            out.append(f"map r {parity.map_r_mean:.6g} < {self.min_map_r:g}")
        if parity.decision_agreement is not None and not parity.decision_agreement >= self.min_decision_agreement:
            out.append(f"decision agreement {parity.decision_agreement:.4g} < {self.min_decision_agreement:g}")
        return out

    def ratio(self, parity: "Parity") -> float:
        """How far the figures are from the gate as one number (at most 1 inside it; larger is worse):
        the largest of each error over its limit and the cosine's distance from 1 over the limit's."""
        parts = [parity.patch_error / max(self.max_patch_error, 1e-12), parity.map_error / max(self.max_map_error, 1e-12),
                 (1 - parity.patch_cos_mean) / max(1 - self.min_patch_cosine, 1e-12)]
        return float(max(parts)) if all(np.isfinite(parts)) else float("inf")

    def describe(self) -> dict[str, float]:
        gate = {"patch_cos_mean": self.min_patch_cosine, "patch_error": self.max_patch_error,
                "map_error": self.max_map_error, "decision_agreement": self.min_decision_agreement}
        if self.min_map_r > -1:
            gate["map_r_mean"] = self.min_map_r
        return gate


# An error e (RMS over the spread) of a candidate whose scores vary as much as the reference's is a
# correlation over the pooled set of about 1 - e^2/2: the int8 limits (0.2 for patch scores, 0.15 for
# the smoothed maps) are r 0.98 / 0.989 over the whole held-out set, stricter than the former gate of
# mean per-frame map r 0.97 (e about 0.24) where maps vary, and, unlike it, well-conditioned where they
# do not. On ViT-B-16-plus-240 (random weights, 8 held-out frames of a plain scene) full int8 measured
# map error 0.216 at map r 0.996 and failed; with the first block's attention in float 0.078 (README
# "Reduced precision"). fp16 measured errors of 0.0005 / 0.001 (tiny test model, plain scene): 0.02
# fails only a real fault (an overflow, a wrong cast).
DEFAULT_GATES = {
    "int8": Gate(min_patch_cosine=0.98, max_patch_error=0.2, max_map_error=0.15),
    "fp16": Gate(min_patch_cosine=0.999, max_patch_error=0.02, max_map_error=0.02),
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
    patch_error: float = 0.0  # RMS patch score difference / spread of the fp32 patch scores (worst class)
    map_error: float = 0.0  # RMS map difference / spread of the fp32 maps (worst class)
    decision_agreement: float | None = None  # share of equal image decisions (None: no thresholds)
    pixel_agreement: float | None = None  # share of equal pixel decisions (None: no thresholds)
    inputs_note: str = ""  # where the inputs came from (held-out frames, augmented views)
    gate: dict[str, float] = field(default_factory=dict)
    passed: bool = True
    failures: list[str] = field(default_factory=list)  # the gate's figures this model missed

    def as_dict(self) -> dict:
        return asdict(self)

    def table_lines(self, label: str) -> list[str]:
        rows = [
            ("image_embeds cosine mean / min", f"{self.image_cos_mean:.6f} / {self.image_cos_min:.6f}"),
            ("patch_embeds cosine mean / min", f"{self.patch_cos_mean:.6f} / {self.patch_cos_min:.6f}"),
            ("max abs diff (embeds)", f"{self.max_abs_diff:.4g}"),
            ("patch score error (RMS / spread)", f"{self.patch_error:.4g}"),
            ("anomaly map error (RMS / spread)", f"{self.map_error:.4g}"),
            ("anomaly map Pearson r mean / min", f"{self.map_r_mean:.6f} / {self.map_r_min:.6f}"),
            ("image score max abs diff", f"{self.score_max_abs_diff:.3g}"),
        ]
        if self.decision_agreement is not None:
            rows.append(("decisions at the thresholds: image / pixel",
                         f"{self.decision_agreement:.4g} / {self.pixel_agreement:.6g} agree"))
        gate = ", ".join(f"{k} {'<=' if k.endswith('error') else '>='} {v:g}" for k, v in self.gate.items())
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


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """RMS difference of ``candidate`` from ``reference`` over the standard deviation of ``reference``
    (all values pooled); 0 when both are equal, infinity when only the reference is constant."""
    ref = reference.astype(np.float64)
    rms = float(np.sqrt(np.mean((candidate.astype(np.float64) - ref) ** 2)))
    spread = float(np.std(ref))
    if spread == 0:
        return 0.0 if rms == 0 else float("inf")
    return rms / spread


def compare(reference: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray], bank: PromptBank,
            grid: tuple[int, int], size: tuple[int, int], inputs_note: str = "",
            thresholds: dict[str, tuple[float, float]] | None = None) -> Parity:
    """Fidelity figures of ``candidate`` outputs against ``reference`` (both (image_embeds, patch_embeds));
    ``thresholds``: class -> (image, pixel) thresholds whose decisions are compared."""
    (ref_img, ref_patch), (new_img, new_patch) = reference, candidate
    finite = all(np.all(np.isfinite(x)) for x in (new_img, new_patch))
    if not finite:
        log.warning("the reduced-precision model gives NaN or infinity")
    image, patch = agreement(ref_img, new_img, "image_embeds"), agreement(ref_patch, new_patch, "patch_embeds")
    image_cos, patch_cos, max_abs = image.cosines, patch.cosines, max(image.max_abs, patch.max_abs)
    rs, score_diff, patch_errors, map_errors, decisions, pixels = [], 0.0, [], [], [], []
    classes = sorted(bank.classes)
    for cls in classes:
        text = bank.get(cls).text_features
        ref_scores, new_scores = abnormal_probability(ref_patch, text), abnormal_probability(new_patch, text)
        ref_maps = upsample_bilinear(patch_grid(ref_scores, grid), size)
        new_maps = upsample_bilinear(patch_grid(new_scores, grid), size)
        rs += [pearson(a, b) for a, b in zip(ref_maps, new_maps)]
        patch_errors.append(relative_error(ref_scores, new_scores))
        map_errors.append(relative_error(ref_maps, new_maps))
        ref_image, new_image = abnormal_probability(ref_img, text), abnormal_probability(new_img, text)
        score_diff = max(score_diff, float(np.max(np.abs(ref_image - new_image))))
        if thresholds and cls in thresholds:
            image_t, pixel_t = thresholds[cls]
            decisions.append(float(np.mean((ref_image >= image_t) == (new_image >= image_t))))
            pixels.append(float(np.mean((ref_maps >= pixel_t) == (new_maps >= pixel_t))))
    figures = {"image_cos_mean": image_cos.mean(), "image_cos_min": image_cos.min(),
               "patch_cos_mean": patch_cos.mean(), "patch_cos_min": patch_cos.min(), "max_abs_diff": max_abs,
               "map_r_mean": np.mean(rs), "map_r_min": np.min(rs), "score_max_abs_diff": score_diff,
               "patch_error": max(patch_errors), "map_error": max(map_errors)}
    return Parity(inputs=int(ref_img.shape[0]), classes=classes, inputs_note=inputs_note,
                  decision_agreement=min(decisions) if decisions else None,
                  pixel_agreement=min(pixels) if pixels else None,
                  **{k: float(v) if finite else float("nan") for k, v in figures.items()})


def check_gate(parity: Parity, gate: Gate, precision: str) -> None:
    """Record the gate in ``parity``; AnoclipError (nothing is written) when the figures fall below it."""
    parity.gate = gate.describe()
    failures = gate.failures(parity)
    parity.passed, parity.failures = not failures, failures
    if failures:
        hint = ("calibrate on more frames of the scene (--n), or raise --max-map-error / --max-score-error or "
                "lower --min-cosine knowingly" if precision == "int8" else
                "the model overflows or was converted wrongly in fp16; keep fp32 or loosen --max-map-error / "
                "--max-score-error / --min-cosine knowingly")
        raise AnoclipError(f"the {precision} model fails the parity gate ({'; '.join(failures)}); nothing was written; "
                           f"{hint}")
