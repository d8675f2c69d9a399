"""Heat-map overlays of anomaly maps on images, and the outlines of thresholded regions."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def colourise(amap: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map values to an RGB jet heat map. Default range: the map's own min and max (display only)."""
    import cv2

    lo, hi = value_range if value_range is not None else (float(np.min(amap)), float(np.max(amap)))
    scale = 255.0 / max(hi - lo, 1e-12)
    grey = cv2.convertScaleAbs(amap.astype(np.float32, copy=False), alpha=scale, beta=-lo * scale)
    return cv2.applyColorMap(grey, cv2.COLORMAP_JET)[:, :, ::-1]


def overlay(image_rgb: np.ndarray, amap: np.ndarray, alpha: float = 0.5,
            value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Blend the heat map of ``amap`` (resized to the image when needed) over the RGB image."""
    import cv2

    if amap.shape != image_rgb.shape[:2]:
        amap = cv2.resize(amap.astype(np.float32), (image_rgb.shape[1], image_rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = np.ascontiguousarray(colourise(amap, value_range))
    return cv2.addWeighted(np.ascontiguousarray(image_rgb), 1.0 - alpha, heat, alpha, 0.0)


def encode_png(image_rgb: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


REGION_RGB = (255, 0, 255)  # magenta: not a colour of the jet heat map


def draw_regions(image_rgb: np.ndarray, anomaly_map: np.ndarray, pixel: float,
                 colour: tuple[int, int, int] = REGION_RGB, regions: Sequence[dict] | None = None,
                 regions_size: tuple[int, int] | None = None) -> np.ndarray:
    """A copy of the RGB image with the outlines of the regions where ``anomaly_map > pixel``
    (the map is resized to the image when needed), and next to each of ``regions`` (a Result's:
    boxes in pixels of an image of ``regions_size`` (height, width), default the image's own)
    that was typed, its defect type's name."""
    import cv2

    height, width = image_rgb.shape[:2]
    if anomaly_map.shape != (height, width):
        anomaly_map = cv2.resize(anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    mask = (anomaly_map > pixel).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(image_rgb).copy()
    cv2.drawContours(out, contours, -1, colour, max(1, round(min(height, width) / 200)))
    typed = [r for r in regions or () if r.get("type")]
    if typed:
        label_regions(out, typed, regions_size or (height, width), colour)
    return out


def label_regions(image_rgb: np.ndarray, regions: Sequence[dict], regions_size: tuple[int, int],
                  colour: tuple[int, int, int] = REGION_RGB) -> None:
    """Write each region's ``type`` in place just above its box (below it when the box touches the
    top), in ``colour`` outlined in black so that it reads on any heat map; kept inside the image."""
    import cv2

    height, width = image_rgb.shape[:2]
    sy, sx = height / max(1, regions_size[0]), width / max(1, regions_size[1])
    scale = max(0.35, min(height, width) / 640)
    thickness = max(1, round(scale * 1.5))
    for region in regions:
        x, y, w, h = region["box"]
        text = str(region["type"])
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        left = int(min(max(0, round(x * sx)), max(0, width - tw - 1)))
        top = round(y * sy) - 3
        baseline = top if top - th >= 0 else min(height - base - 1, round((y + h) * sy) + th + 3)
        for ink, stroke in (((0, 0, 0), thickness + 2), (colour, thickness)):
            cv2.putText(image_rgb, text, (left, int(baseline)), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, stroke,
                        cv2.LINE_AA)
