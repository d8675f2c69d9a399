"""Reduced-precision models made from the folder's fp32 visual model (int8, fp16): the frames they
are calibrated and checked on, the parity gate, and storing them in the artifact folder.

The work runs outside the folder: the model, every intermediate file and onnxruntime's own
temporary files (its shape-inferred copy of the source, the augmented calibration model) live in a
workspace ``anoclip-calibrate-<pid>-*`` in the system's temporary folder, removed on every way out
(errors, Ctrl-C); one left by a killed run is removed by the next calibration, once no live process
holds its lock. Only the commit goes
through the folder's transaction (``anoclip.runtime.folder.store_derived_model``): the visual model
must still be the one the new model was made from, the file is written under its content-addressed
name (``visual_int8.<sha12>.onnx``) and the manifest entry (``visual_int8`` / ``visual_fp16``) with
its provenance is committed. Any failure, the parity gate included, leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from anoclip.runtime.artifacts import PRECISION_MODELS, VISUAL, Manifest, ModelEntry, load_artifacts
from anoclip.runtime.errors import AnoclipError
from anoclip.runtime.folder import store_derived_model
from anoclip.runtime.preprocess import DEFAULT_MAX_PIXELS, as_rgb_uint8, normalise, preprocess, resize_bilinear
from anoclip.runtime.workspace import OWNER_FILE, owned_workspace, sweep_owned  # noqa: F401


def sweep_workspaces(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the calibration workspaces under ``root`` (the temporary folder) that no live process
    owns, left by killed runs; returns them."""
    return sweep_owned(WORKSPACE_PREFIX, root)


def workspace():
    """A locked temporary folder for a calibration's files, onnxruntime's temporary files included
    (``tempfile.tempdir`` points into it meanwhile), removed on every way out; orphaned workspaces
    of killed runs are swept first."""
    return owned_workspace(WORKSPACE_PREFIX, redirect_tempfiles=True)

from .parity import Gate, Parity, check_gate, compare, run_model

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 64
DEFAULT_PARITY_FRAMES = 16
LOCK_WAIT_S = 5.0  # the commit takes milliseconds: another calibration finishing is waited for
WORKSPACE_PREFIX = "anoclip-calibrate-"


@dataclass
class FrameSplit:
    """Preprocessed model inputs ([1, 3, H, W] float32): some to calibrate on, others to check on."""

    calibration: list[np.ndarray] = field(default_factory=list)
    parity: list[np.ndarray] = field(default_factory=list)
    read: int = 0  # frames read from the inputs
    held_out: int = 0  # parity inputs that are frames not used for calibration
    augmented: int = 0  # parity inputs that are altered views of calibration frames
    synthetic: int = 0  # parity inputs drawn procedurally (no frames given)
    skipped: list[str] = field(default_factory=list)  # inputs that could not be read: "path: reason"

    def note(self) -> str:
        held = "held-out frames" if self.calibration else "frames"
        parts = [f"{n} {what}" for n, what in ((self.held_out, held),
                                               (self.augmented, "augmented views of calibration frames"),
                                               (self.synthetic, "synthetic textures")) if n]
        return " + ".join(parts) or "none"


def read_frames(inputs: Sequence[str], manifest: Manifest, count: int, parity: int, stride: int = 1,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, option: str = "--images") -> FrameSplit:
    """Up to ``count`` calibration frames and ``parity`` parity inputs from ``inputs`` (images,
    folders, videos), preprocessed as the Detector does (squashed to the model size, no tiles).

    Parity inputs are frames held out of the calibration, spread over the inputs, as long as at
    least three quarters of the frames remain to calibrate on; the rest are augmented views
    (mirrored, cropped, brighter or darker) of calibration frames.
    """
    from tqdm import tqdm

    from anoclip.runtime.inputs import FrameReader, plan_inputs

    reader = FrameReader(plan_inputs(inputs, stride, option), stride, max_pixels)
    size = tuple(manifest.image_size)
    expected = reader.expected
    wanted = count + parity
    small: list[np.ndarray] = []
    with tqdm(total=min(expected, wanted) if expected else wanted, desc="read frames", unit="frame",
              file=sys.stderr, disable=None) as bar:
        for frame in itertools.islice(reader.frames(), wanted):
            small.append(resize_bilinear(as_rgb_uint8(frame), size))  # what preprocess squashes it to
            bar.update(1)
    skipped = [f"{path}: {reason}" for path, reason in reader.skipped]
    if skipped:
        log.warning("%d input(s) could not be read and were skipped (listed above); calibrating on the %d frame(s) read",
                    len(skipped), len(small))
    if not small:
        raise AnoclipError(f"no frames were read; give images, folders of images or videos of the scene with {option}")
    held = min(parity, len(small) // 4 if count else len(small))  # count 0: every frame checks (fp16)
    held_idx = {int((i + 0.5) * len(small) / held) for i in range(held)} if held else set()
    split = FrameSplit(read=len(small), held_out=len(held_idx), skipped=skipped)
    for index, image in enumerate(small):
        batch = preprocess(image, size, manifest.mean, manifest.std, "never")[0]
        if index in held_idx:
            split.parity.append(batch)
        elif len(split.calibration) < count:
            split.calibration.append(batch)
    pool = [im for i, im in enumerate(small) if i not in held_idx][:count] or small
    for k in range(parity - split.held_out):
        view = augment(pool[k % len(pool)], k)
        split.parity.append(normalise(view, manifest.mean, manifest.std)[None])
        split.augmented += 1
    if count and len(split.calibration) < 16:
        log.warning("only %d calibration frame(s): activation ranges from so few frames may not cover the scene; "
                    "give at least 16 (the default uses %d)", len(split.calibration), DEFAULT_FRAMES)
    return split


def augment(image: np.ndarray, seed: int) -> np.ndarray:
    """An altered view of a frame at model size: mirrored, a crop of 85-95 % resized back, and
    brightness scaled by 0.85-1.15, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    height, width = image.shape[:2]
    view = image[:, ::-1] if seed % 2 == 0 else image
    scale = rng.uniform(0.85, 0.95)
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    view = resize_bilinear(np.ascontiguousarray(view[y:y + h, x:x + w]), (height, width))
    return np.clip(view.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)


def synthetic_frames(manifest: Manifest, count: int, seed: int = 0) -> list[np.ndarray]:
    """Preprocessed procedural textures (smooth colour fields with fine grain): parity inputs with
    image-like statistics when no frames are given."""
    rng = np.random.default_rng(seed)
    size = tuple(manifest.image_size)
    out = []
    for _ in range(count):
        image = np.zeros((*size, 3), np.float32)
        for cells, weight in ((4, 0.6), (16, 0.3), (size[0] // 2, 0.1)):
            field_ = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
            image += weight * resize_bilinear(field_, size).astype(np.float32)
        out.append(normalise(np.clip(image, 0, 255).astype(np.uint8), manifest.mean, manifest.std)[None])
    return out


def folder_thresholds(folder: Path, manifest: Manifest) -> dict[str, tuple[float, float]]:
    """class -> (image, pixel) thresholds of the folder, whose decisions the parity gate compares;
    empty when it has none (or none that can be read)."""
    from anoclip.runtime.integrity import resolve_inside
    from anoclip.runtime.thresholds import read_thresholds

    if not manifest.thresholds:
        return {}
    try:
        table = read_thresholds(resolve_inside(folder, manifest.thresholds))
    except (AnoclipError, OSError, ValueError) as exc:
        log.warning("the folder's thresholds cannot be read (%s); decisions are not compared", exc)
        return {}
    return {name: (record.image, record.pixel) for name, record in table.classes.items()}


Measure = Callable[[Path], Parity]


def make_model(folder: str | Path, precision: str, build: Callable[[Path, Path, Measure], dict],
               parity_inputs: FrameSplit, gate: Gate, provenance: dict, command: str, threads: int | None = None,
               report: Callable[[str], None] = print) -> tuple[str, ModelEntry, Parity]:
    """Build the ``precision`` model of the folder's visual model with ``build(source, target, measure)``
    (which returns a description of what it made; ``measure(path)`` gives the parity figures of a
    candidate model, the gate recorded in them, so that a build can search), check it against the
    fp32 model on the parity inputs, and store it; (the file name, the manifest entry, the figures).

    The figures are reported (``report``, one line at a time) before the gate decides; below it,
    AnoclipError and nothing is written.
    """
    folder = Path(folder)
    name = PRECISION_MODELS[precision]
    artifacts = load_artifacts(folder, verify=True, models=[VISUAL], load_thresholds=False)
    manifest = artifacts.manifest
    source_sha = artifacts.model_sha256(VISUAL)
    thresholds = folder_thresholds(folder, manifest)
    with workspace() as work:
        # onnxruntime writes beside the model it is given (a shape-inferred copy): give it a link
        source = work / "visual.onnx"
        source.symlink_to(artifacts.model_path(VISUAL).resolve())
        target = work / f"{name}.onnx"
        reference = run_model(source, parity_inputs.parity, "parity fp32", threads)

        def measure(path: Path) -> Parity:
            candidate = run_model(path, parity_inputs.parity, f"parity {precision}", threads)
            figures = compare(reference, candidate, artifacts.prompts, tuple(manifest.grid),
                              tuple(manifest.image_size), parity_inputs.note(), thresholds)
            with contextlib.suppress(AnoclipError):
                check_gate(figures, gate, precision)
            return figures

        started = time.perf_counter()
        structure = build(source, target, measure)
        seconds = time.perf_counter() - started
        parity = measure(target)
        for line in parity.table_lines(precision):
            report(line)
        check_gate(parity, gate, precision)
        visual = manifest.models[VISUAL]
        entry = ModelEntry(
            file="", inputs=dict(visual.inputs), outputs=dict(visual.outputs), patch_tokens=visual.patch_tokens,
            vv_blocks=visual.vv_blocks, opset=_opset(target), precision=precision, source_sha256=source_sha,
            provenance={**provenance, "structure": structure, "parity": parity.as_dict(),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
                        "seconds": round(seconds, 1)})
        file = store_derived_model(folder, name, target, entry, command, wait=LOCK_WAIT_S, report=report)
    return file, entry, parity


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
