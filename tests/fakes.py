"""A backend whose scores mean something on random-weight artifacts, and synthetic clips.

``RedDefectBackend`` stands in for the visual model of an artifact folder: each patch token is a
mix of the class's normal and abnormal text embeddings (t+, t-), weighted by the share of the
patch's pixels that are saturated red (the synthetic defect). Scores and maps then go through the
Detector's real scoring: a frame with a red square scores higher than a frame without, and its map
is high exactly under the square. A little texture-dependent noise keeps normal scores spread, as
real ones are, so that quantiles of normal frames are not all one number. ``type_token`` (a unit
vector, e.g. one defect type's text embedding made orthogonal to the scoring direction) is added
to each patch token in proportion to its red share: the defect's tokens then point towards it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFECT_BGR = (0, 0, 255)


class RedDefectBackend:
    providers = ["CPUExecutionProvider"]

    def __init__(self, text_features: np.ndarray, grid: tuple[int, int], mean, std, noise: float = 0.05):
        normal, abnormal = np.asarray(text_features[0], np.float64), np.asarray(text_features[1], np.float64)
        # score = sigmoid(cos(x, t-) - cos(x, t+)): tokens along +-(t- - t+) give the widest range;
        # a fixed component orthogonal to it keeps the mixed tokens away from zero.
        towards = (abnormal - normal) / np.linalg.norm(abnormal - normal)
        side = np.random.default_rng(0).standard_normal(towards.shape)
        side -= side @ towards * towards
        self.abnormal = towards.astype(np.float32)
        self.normal = (-towards).astype(np.float32)
        self.side = (0.5 * side / np.linalg.norm(side)).astype(np.float32)
        self.grid = grid
        self.mean = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        self.noise = noise
        self.type_token: np.ndarray | None = None

    def describe(self) -> str:
        return "red-defect test backend"

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rgb = batch * self.std + self.mean  # back to [0, 1] RGB
        red = ((rgb[:, 0] > 0.7) & (rgb[:, 1] < 0.3) & (rgb[:, 2] < 0.3)).astype(np.float32)  # [B, H, W]
        b, h, w = red.shape
        gh, gw = self.grid
        share = red[:, : h // gh * gh, : w // gw * gw].reshape(b, gh, h // gh, gw, w // gw).mean(axis=(2, 4))
        texture = rgb[:, 1][:, : h // gh * gh, : w // gw * gw].reshape(b, gh, h // gh, gw, w // gw).mean(axis=(2, 4))
        weight = np.clip(share + self.noise * texture, 0.0, 1.0).reshape(b, gh * gw, 1)
        patches = (1.0 - weight) * self.normal + weight * self.abnormal + self.side
        if self.type_token is not None:
            patches = patches + share.reshape(b, gh * gw, 1) * self.type_token.astype(np.float32)
        patches /= np.linalg.norm(patches, axis=-1, keepdims=True)
        image_weight = weight.max(axis=1)  # [B, 1]
        image = (1.0 - image_weight) * self.normal + image_weight * self.abnormal + self.side
        image /= np.linalg.norm(image, axis=-1, keepdims=True)
        return image.astype(np.float32), patches.astype(np.float32)


def red_defect_detector(artifacts_dir: Path, cls: str, size: int = 96, grid: int = 8, **options):
    """A Detector over the artifact folder whose visual model is :class:`RedDefectBackend`, seeing
    ``size`` pixels square in ``grid`` x ``grid`` patches (finer than the tiny model's 3 x 3, so that
    maps localise)."""
    from anoclip.runtime.artifacts import load_artifacts
    from anoclip.runtime.detector import Detector

    artifacts = load_artifacts(artifacts_dir)
    manifest = artifacts.manifest
    manifest.image_size, manifest.grid = (size, size), (grid, grid)
    backend = RedDefectBackend(artifacts.prompts.get(cls).text_features, tuple(manifest.grid), manifest.mean, manifest.std)
    return Detector(artifacts, backend, **options)


def normal_frame(index: int, size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """A grey conveyor-like BGR frame with a moving stripe pattern (no red anywhere)."""
    h, w = size
    x = np.arange(w)[None, :]
    y = np.arange(h)[:, None]
    grey = (110 + 40 * np.sin((x + 3 * index) / 9.0) + 20 * np.cos(y / 7.0)).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def defect_frame(index: int, size: tuple[int, int] = (128, 128), box=(48, 40, 40, 40)) -> np.ndarray:
    """:func:`normal_frame` with a saturated red square at ``box`` = (x, y, width, height)."""
    frame = normal_frame(index, size).copy()
    x, y, w, h = box
    frame[y:y + h, x:x + w] = DEFECT_BGR
    return frame


def write_clip(path: Path, frames: int, defect_from: int | None = None, size: tuple[int, int] = (128, 128),
               fps: float = 25.0, fourcc: str = "MJPG") -> Path:
    """Write a clip with OpenCV's VideoWriter; from frame ``defect_from`` on, the red square shows."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (size[1], size[0]))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(frames):
        writer.write(defect_frame(i, size) if defect_from is not None and i >= defect_from else normal_frame(i, size))
    writer.release()
    return path


def write_plain_clip(path: Path, frames: int, defect_from: int | None = None, size: tuple[int, int] = (96, 80),
                     seed: int = 0, drift: float = 0.0) -> Path:
    """A plain scene as MJPEG: a grey part on a belt whose position (+-3 px), angle (+-4 degrees) and
    lighting (+-5 %) vary at random from frame to frame, with Gaussian sensor noise (3 grey levels),
    so that normal frames are exchangeable; from ``defect_from`` on, a dark scratch across the part;
    ``drift``: the lighting gain rises by this much over the clip (1 + drift at the last frame).
    ``size`` is (width, height)."""
    import cv2

    width, height = size
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for i in range(frames):
        gain = rng.uniform(0.95, 1.05) * (1.0 + drift * i / max(1, frames - 1))
        image = np.full((height, width, 3), (120.0, 124.0, 118.0), np.float32)
        cx, cy = width / 2 + rng.uniform(-3, 3), height / 2 + rng.uniform(-3, 3)
        box = ((cx, cy), (0.45 * width, 0.4 * height), rng.uniform(-4, 4))
        part = np.zeros((height, width), np.uint8)
        cv2.fillPoly(part, [np.round(cv2.boxPoints(box)).astype(np.int32)], 255)
        part = cv2.GaussianBlur(part, (0, 0), 1.2).astype(np.float32)[..., None] / 255.0
        image = image * (1 - part) + np.float32((178, 180, 184)) * part
        if defect_from is not None and i >= defect_from:
            cv2.line(image, (int(cx - 0.15 * width), int(cy - 0.1 * height)),
                     (int(cx + 0.15 * width), int(cy + 0.12 * height)), (30, 30, 160), 3)
        image = image * gain + rng.normal(0, 3.0, image.shape).astype(np.float32)
        writer.write(np.clip(image, 0, 255).astype(np.uint8))
    writer.release()
    return path
