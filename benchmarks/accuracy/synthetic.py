"""License-clean synthetic sets in the MVTec AD and VisA layouts, drawn procedurally from a seed.

Textures (carpet-, wood-, grid-, tile-, leather-like noise patterns) and simple objects (disc,
rounded board, capsule) with pasted scratches, spots and holes whose masks are exactly the changed
pixels. They exist for tests, demos and the README quickstart, not for accuracy claims.
"""

from __future__ import annotations

import csv
import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from anoclip.runtime.classes import MVTEC_TEXTURES

from .layouts import VISA_COLUMNS, VISA_CSV, _as_wh

logger = logging.getLogger(__name__)

__all__ = ["DEFECT_KINDS", "make_mvtec_like", "make_plain_scene", "make_visa_like"]

DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "hole")


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    words = [int(seed)] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(words)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Value noise in about [-1, 1]: a random grid, bicubically enlarged."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _colorize(v: np.ndarray, c0: Sequence[float], c1: Sequence[float]) -> np.ndarray:
    t = np.clip(v, 0.0, 1.0)[..., None]
    return (1.0 - t) * np.asarray(c0, np.float32) + t * np.asarray(c1, np.float32)


def _tex_carpet(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5.0, 8.0)
    weave = 0.5 + 0.25 * np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)
    v = weave + 0.15 * _smooth_noise(rng, h, w, h / 6) + 0.08 * rng.standard_normal((h, w))
    hue = rng.uniform(0.0, 1.0)
    return _colorize(v, (0.25 + 0.2 * hue, 0.2, 0.3 - 0.1 * hue), (0.8, 0.65 + 0.2 * hue, 0.5))


def _tex_wood(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(h / 12, h / 7)
    warp = 10.0 * _smooth_noise(rng, h, w, h / 3)
    v = 0.5 + 0.35 * np.sin(2 * np.pi * (xx + warp + 0.05 * yy) / period)
    v += 0.05 * rng.standard_normal((h, w))
    return _colorize(v, (0.45, 0.28, 0.14), (0.78, 0.58, 0.36))


def _tex_grid(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pitch = rng.uniform(h / 14, h / 9)
    wobble = 2.0 * _smooth_noise(rng, h, w, h / 4)
    gx = np.abs(((xx + wobble) % pitch) - pitch / 2) < pitch * 0.12
    gy = np.abs(((yy - wobble) % pitch) - pitch / 2) < pitch * 0.12
    v = 0.2 + 0.6 * (gx | gy) + 0.05 * rng.standard_normal((h, w))
    return _colorize(v, (0.1, 0.1, 0.1), (0.75, 0.75, 0.72))


def _tex_tile(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    blobs = _smooth_noise(rng, h, w, h / 20) > 0.35
    v = 0.55 + 0.1 * _smooth_noise(rng, h, w, h / 5) - 0.3 * blobs
    v += 0.04 * rng.standard_normal((h, w))
    return _colorize(v, (0.3, 0.3, 0.35), (0.85, 0.85, 0.88))


def _tex_leather(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    v = 0.5 + 0.2 * _smooth_noise(rng, h, w, h / 10) + 0.1 * _smooth_noise(rng, h, w, h / 40)
    creases = np.abs(_smooth_noise(rng, h, w, h / 16)) < 0.04
    v = v - 0.15 * creases + 0.03 * rng.standard_normal((h, w))
    return _colorize(v, (0.25, 0.12, 0.07), (0.6, 0.35, 0.2))


_TEXTURES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "carpet": _tex_carpet, "wood": _tex_wood, "grid": _tex_grid, "tile": _tex_tile,
    "leather": _tex_leather,
}


def _object_image(rng: np.random.Generator, kind: int, h: int, w: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """An object on a plain background; returns (rgb float [0,1], object mask uint8)."""
    bg = _colorize(0.5 + 0.1 * _smooth_noise(rng, h, w, min(h, w) / 3), (0.05, 0.05, 0.06),
                   (0.3, 0.3, 0.32))
    obj: np.ndarray = np.zeros((h, w), np.uint8)
    s = min(h, w)
    cx = int(w / 2 + rng.uniform(-0.04, 0.04) * s)
    cy = int(h / 2 + rng.uniform(-0.04, 0.04) * s)
    angle = float(rng.uniform(0, 180))
    if kind == 0:  # disc with rings, a bottle seen from above
        radius = int(s * rng.uniform(0.33, 0.37))
        cv2.circle(obj, (cx, cy), radius, 255, -1)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot(xx - cx, yy - cy) / max(radius, 1)
        v = 0.55 + 0.25 * np.cos(r * 9.0) * (r < 0.8)
        body = _colorize(v, (0.15, 0.3, 0.2), (0.55, 0.75, 0.6))
    elif kind == 1:  # rounded board, a circuit board
        half = (int(s * 0.38), int(s * 0.28))
        box = cv2.boxPoints(((cx, cy), (2 * half[0], 2 * half[1]), angle)).astype(np.int32)
        cv2.fillConvexPoly(obj, box, 255)
        obj = cv2.dilate(obj, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
        v = 0.5 + 0.1 * _smooth_noise(rng, h, w, s / 8)
        body = _colorize(v, (0.05, 0.3, 0.12), (0.2, 0.55, 0.3))
        for _ in range(6):  # pads
            px = int(cx + rng.uniform(-0.25, 0.25) * s)
            py = int(cy + rng.uniform(-0.15, 0.15) * s)
            cv2.rectangle(body, (px - 4, py - 3), (px + 4, py + 3), (0.85, 0.75, 0.3), -1)
    else:  # capsule / candle: an ellipse with a highlight
        axes = (int(s * 0.38), int(s * 0.2))
        cv2.ellipse(obj, (cx, cy), axes, angle, 0, 360, 255, -1)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        v = 0.7 - 0.3 * np.hypot(xx - cx, yy - cy) / s + 0.05 * _smooth_noise(rng, h, w, s / 6)
        body = _colorize(v, (0.6, 0.5, 0.35), (0.98, 0.95, 0.88))
    inside = (obj > 0)[..., None]
    rgb = np.where(inside, body, bg) + 0.015 * rng.standard_normal((h, w, 3)).astype(np.float32)
    return rgb, obj


# Object shape per known class name (0 disc, 1 board, 2 capsule); other names by hash.
_OBJECT_KINDS: dict[str, int] = {
    "bottle": 0, "hazelnut": 0, "metal_nut": 0, "cashew": 0, "fryum": 0, "pipe_fryum": 0,
    "cable": 0, "transistor": 1, "pcb1": 1, "pcb2": 1, "pcb3": 1, "pcb4": 1, "chewinggum": 1,
    "capsule": 2, "capsules": 2, "pill": 2, "candle": 2, "screw": 2, "toothbrush": 2,
    "zipper": 2, "macaroni1": 2, "macaroni2": 2,
}


def _normal_image(cls: str, rng: np.random.Generator, h: int, w: int,
                  texture: bool) -> tuple[np.ndarray, np.ndarray]:
    if texture:
        names = list(_TEXTURES)
        gen = _TEXTURES.get(cls, _TEXTURES[names[zlib.crc32(cls.encode()) % len(names)]])
        return gen(rng, h, w), np.full((h, w), 255, np.uint8)
    kind = _OBJECT_KINDS.get(cls, zlib.crc32(cls.encode()) % 3)
    return _object_image(rng, kind, h, w)


def _draw_defect(rng: np.random.Generator, rgb: np.ndarray, region: np.ndarray,
                 kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect inside ``region``; returns (image, mask) with mask = changed pixels."""
    h, w = region.shape
    s = min(h, w)
    ys, xs = np.nonzero(cv2.erode(region, np.ones((9, 9), np.uint8)))
    if ys.size == 0:
        ys, xs = np.nonzero(region)
    for _ in range(20):
        mask = np.zeros((h, w), np.uint8)
        i = int(rng.integers(ys.size))
        cx, cy = int(xs[i]), int(ys[i])
        if kind == "scratch":
            pts = [(cx, cy)]
            heading = rng.uniform(0, 2 * np.pi)
            for _ in range(int(rng.integers(2, 5))):
                heading += rng.uniform(-0.6, 0.6)
                step = rng.uniform(0.06, 0.14) * s
                pts.append((int(pts[-1][0] + step * np.cos(heading)),
                            int(pts[-1][1] + step * np.sin(heading))))
            cv2.polylines(mask, [np.array(pts, np.int32)], False, 255,
                          thickness=int(rng.integers(2, 5)), lineType=cv2.LINE_8)
            color = np.array((0.95, 0.95, 0.92) if rng.random() < 0.5 else (0.05, 0.04, 0.04),
                             np.float32)
            alpha = 0.85
        elif kind == "spot":
            axes = (max(2, int(rng.uniform(0.03, 0.08) * s)),
                    max(2, int(rng.uniform(0.03, 0.08) * s)))
            cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1,
                        lineType=cv2.LINE_8)
            color = np.array((0.55, 0.25, 0.05), np.float32) + rng.uniform(-0.1, 0.1, 3).astype(
                np.float32)
            alpha = 0.75
        elif kind == "hole":
            cv2.circle(mask, (cx, cy), max(2, int(rng.uniform(0.025, 0.06) * s)), 255, -1,
                       lineType=cv2.LINE_8)
            color = np.array((0.02, 0.02, 0.02), np.float32)
            alpha = 0.95
        else:
            raise ValueError(f"unknown defect kind {kind!r}: use one of {', '.join(DEFECT_KINDS)}")
        if mask.any():
            break
    m = (mask > 0)[..., None]
    out = np.where(m, (1 - alpha) * rgb + alpha * color, rgb)
    return out, np.where(mask > 0, np.uint8(255), np.uint8(0))


def _to_uint8_bgr(rgb: np.ndarray) -> np.ndarray:
    u8 = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(u8, cv2.COLOR_RGB2BGR)


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write {path}: check the output folder is writable")


def _is_texture(cls: str) -> bool:
    return cls in MVTEC_TEXTURES


def _synth_sample(cls: str, seed: int, split: str, index: int, h: int, w: int,
                  defect: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(clean BGR image, image with the defect, mask 0/255) - the same image when defect is None."""
    rng = _rng(seed, cls, split, index, defect or "good")
    rgb, region = _normal_image(cls, rng, h, w, _is_texture(cls))
    clean = _to_uint8_bgr(rgb)
    if defect is None:
        return clean, clean, None
    rgb, mask = _draw_defect(rng, rgb, region, defect)
    return clean, _to_uint8_bgr(rgb), mask


def _synth_normal(cls: str, seed: int, split: str, index: int, h: int, w: int) -> np.ndarray:
    return _synth_sample(cls, seed, split, index, h, w, None)[1]


def _synth_defect(cls: str, seed: int, index: int, h: int, w: int,
                  defect: str) -> tuple[np.ndarray, np.ndarray]:
    _, image, mask = _synth_sample(cls, seed, "test", index, h, w, defect)
    assert mask is not None
    return image, mask


def make_mvtec_like(root: str | Path, classes: Sequence[str] = ("carpet", "bottle"),
                    n_good: int = 3, n_defect: int = 3, size: int = 256, seed: int = 0) -> Path:
    """Write a synthetic set in the MVTec AD layout and return its root.

    Per class: ``n_good`` images in train/good and again in test/good, and ``n_defect`` defect
    images spread over the folders scratch, spot, hole (in turn), each with its
    ground_truth/<defect>/<name>_mask.png (0/255). MVTec texture names get textures, every other
    name an object. The same arguments always give the same files.
    """
    root = Path(root)
    for cls in classes:
        base = root / cls
        for i in range(n_good):
            _write(base / "train" / "good" / f"{i:03d}.png",
                   _synth_normal(cls, seed, "train", i, size, size))
            _write(base / "test" / "good" / f"{i:03d}.png",
                   _synth_normal(cls, seed, "test", i, size, size))
        counts = dict.fromkeys(DEFECT_KINDS, 0)
        for i in range(n_defect):
            kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
            j = counts[kind]
            counts[kind] += 1
            img, mask = _synth_defect(cls, seed, i, size, size, kind)
            _write(base / "test" / kind / f"{j:03d}.png", img)
            _write(base / "ground_truth" / kind / f"{j:03d}_mask.png", mask)
    logger.info("wrote an MVTec-like set with %d classes to %s", len(classes), root)
    return root


def make_visa_like(root: str | Path, classes: Sequence[str] = ("candle", "pcb1"),
                   n_normal: int = 3, n_anomaly: int = 3, size: tuple[int, int] = (320, 240),
                   seed: int = 0) -> Path:
    """Write a synthetic set in the VisA layout (``size`` = (width, height)) and return its root.

    Per class: 2 * ``n_normal`` normal JPGs (the first half listed as train, the second as test)
    and ``n_anomaly`` anomalous JPGs with masks (0/255 PNG), plus ``split_csv/1cls.csv``.
    """
    root = Path(root)
    width, height = _as_wh(size)
    rows: list[dict[str, str]] = []
    for cls in classes:
        data = root / cls / "Data"
        for i in range(2 * n_normal):
            split = "train" if i < n_normal else "test"
            rel = Path(cls) / "Data" / "Images" / "Normal" / f"{i:04d}.JPG"
            _write(root / rel, _synth_normal(cls, seed, split, i, height, width))
            rows.append({"object": cls, "split": split, "label": "normal",
                         "image": rel.as_posix(), "mask": ""})
        for i in range(n_anomaly):
            kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
            img, mask = _synth_defect(cls, seed, i, height, width, kind)
            rel = Path(cls) / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG"
            rel_mask = Path(cls) / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png"
            _write(root / rel, img)
            _write(root / rel_mask, mask)
            rows.append({"object": cls, "split": "test", "label": "anomaly",
                         "image": rel.as_posix(), "mask": rel_mask.as_posix()})
        logger.debug("wrote %s", data)
    csv_path = root / VISA_CSV
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(VISA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote a VisA-like set with %d classes to %s", len(classes), root)
    return root


CLIP_FOURCC = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "MJPG"}


def make_clip(path: str | Path, cls: str = "bottle", frames: int = 150, defect_from: int | None = 100,
              size: tuple[int, int] = (320, 240), fps: float = 25.0, seed: int = 0, defect: str = "scratch",
              variation_seed: int | None = None) -> Path:
    """A short video of one synthetic part passing under a camera: the same normal image sliding
    a few pixels a frame, then, from frame ``defect_from`` on, the same image with a defect.

    ``variation_seed``: every frame also gets its own lighting gain (+-4 %) and sensor noise (2 grey
    levels) drawn with this seed, so that two clips of the same part (``seed``) with different
    variation seeds share no frame (None: every frame exactly as the slide makes it).
    ``size`` is (width, height); ``.avi`` is written as MJPEG, ``.mp4`` as MPEG-4 part 2.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CLIP_FOURCC:
        raise ValueError(f"{path}: write the clip as one of {', '.join(CLIP_FOURCC)}")
    if defect is not None and defect not in DEFECT_KINDS:
        raise ValueError(f"unknown defect {defect!r}; one of {', '.join(DEFECT_KINDS)}")
    width, height = size
    clean, damaged, _ = _synth_sample(cls, seed, "test", 0, height, width, defect)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*CLIP_FOURCC[suffix]), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"could not write {path}: check the output folder is writable")
    try:
        variation = np.random.default_rng(variation_seed) if variation_seed is not None else None
        for i in range(frames):
            image = damaged if defect_from is not None and i >= defect_from else clean
            shift = int(round(3 * np.sin(i / 8.0)))  # the part jitters on the belt
            frame = np.roll(image, shift, axis=1)
            if variation is not None:
                varied = frame.astype(np.float32) * variation.uniform(0.96, 1.04)
                varied += variation.normal(0.0, 2.0, frame.shape).astype(np.float32)
                frame = np.clip(varied, 0, 255).astype(np.uint8)
            writer.write(frame)
    finally:
        writer.release()
    return path


def make_plain_scene(folder: str | Path, frames: int = 32, size: tuple[int, int] = (320, 240), seed: int = 0,
                     noise: float = 3.0) -> list[Path]:
    """Normal frames of a plain scene, the hard case for int8: a uniform background with one part
    (a rounded grey block with a bore) whose position and angle vary by a few pixels and degrees,
    lighting by +-10 % with a soft gradient, and Gaussian sensor noise of ``noise`` grey levels.
    Most of every frame is flat, so anomaly maps of normal frames are nearly flat too.

    Writes ``frame_000.png`` ... into ``folder`` (``size`` is (width, height)); returns the paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    rng = _rng(seed, "plain-scene")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for index in range(frames):
        gain = rng.uniform(0.9, 1.1)
        slope = rng.uniform(-0.08, 0.08)
        light = gain * (1.0 + slope * (xx / width - 0.5))
        image = np.full((height, width, 3), (120.0, 124.0, 118.0), np.float32)  # belt grey-green
        cx = width / 2 + rng.uniform(-6, 6)
        cy = height / 2 + rng.uniform(-5, 5)
        angle = rng.uniform(-4, 4)
        part = np.zeros((height, width), np.uint8)
        box = ((cx, cy), (0.42 * width, 0.36 * height), angle)
        cv2.fillPoly(part, [np.round(cv2.boxPoints(box)).astype(np.int32)], 255)
        part = cv2.GaussianBlur(part, (0, 0), 1.5).astype(np.float32) / 255.0
        image = image * (1 - part[..., None]) + np.float32((178.0, 180.0, 184.0)) * part[..., None]
        bore = ((xx - cx) ** 2 + (yy - cy) ** 2) < (0.07 * width) ** 2
        image[bore] = (60.0, 62.0, 66.0)
        image = image * light[..., None] + rng.normal(0.0, noise, image.shape).astype(np.float32)
        path = folder / f"frame_{index:03d}.png"
        _write(path, _to_uint8_bgr(np.clip(image, 0, 255) / 255.0))
        paths.append(path)
    return paths
