"""Heat-map overlays of anomaly maps on images, and the outlines of thresholded regions."""

from __future__ import annotations

from typing import Sequence

import numpy as np


# The fixed colour scale: (pixel severity, RGB) anchors, linear in between. Pixel severity is
# (value - normal centre) / (pixel threshold - normal centre): 0 at the centre, 1 at the threshold.
THRESHOLD_RGB = (255, 200, 0)  # amber: the pixel threshold
SCALE_TOP = 2.0  # pixel severity of the warmest colour (twice the threshold's distance from the centre)
SCALE_ANCHORS = ((0.0, (0, 0, 110)), (0.6, (0, 90, 255)), (0.9, (0, 200, 230)), (1.0, THRESHOLD_RGB),
                 (1.5, (255, 110, 0)), (SCALE_TOP, (200, 0, 0)))
SCALE_STEPS = 128  # colour-table entries per unit of pixel severity: the threshold falls on one exactly
COLOUR_SCALES = ("fixed", "frame")


def _scale_table() -> np.ndarray:
    at = np.arange(round(SCALE_TOP * SCALE_STEPS) + 1) / SCALE_STEPS
    stops = [a for a, _ in SCALE_ANCHORS]
    table = np.stack([np.interp(at, stops, [rgb[c] for _, rgb in SCALE_ANCHORS]) for c in range(3)], axis=1)
    return np.round(table).astype(np.uint8)


SCALE_TABLE = _scale_table()  # [SCALE_TOP * SCALE_STEPS + 1, 3] RGB, entry k for pixel severity k / SCALE_STEPS


def heat_colours(amap: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """The fixed colour scale: RGB uint8 [H, W, 3] of the map values by their pixel severity against
    ``scale`` = (normal centre, pixel threshold), a pure function of each value and the scale (the
    same value gets the same colour on every frame, camera and run): at or below the centre
    ``SCALE_TABLE[0]`` (the coolest), at the threshold ``THRESHOLD_RGB``, at or above ``SCALE_TOP``
    times the threshold's distance ``SCALE_TABLE[-1]`` (red)."""
    centre, threshold = scale
    severity = (np.asarray(amap, dtype=np.float64) - centre) / (threshold - centre)
    index = np.rint(np.clip(severity, 0.0, SCALE_TOP) * SCALE_STEPS).astype(np.intp)
    return SCALE_TABLE[index]


def colourise(amap: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map values to an RGB jet heat map. Default range: the map's own min and max (display only)."""
    import cv2

    lo, hi = value_range if value_range is not None else (float(np.min(amap)), float(np.max(amap)))
    scale = 255.0 / max(hi - lo, 1e-12)
    grey = cv2.convertScaleAbs(amap.astype(np.float32, copy=False), alpha=scale, beta=-lo * scale)
    return cv2.applyColorMap(grey, cv2.COLORMAP_JET)[:, :, ::-1]


def overlay(image_rgb: np.ndarray, amap: np.ndarray, alpha: float = 0.5,
            value_range: tuple[float, float] | None = None, scale: tuple[float, float] | None = None,
            legend: bool = False, legend_note: str = "") -> np.ndarray:
    """Blend the heat map of ``amap`` (resized to the image when needed) over the RGB image: the
    fixed colour scale (:func:`heat_colours`) with ``scale`` = (normal centre, pixel threshold),
    else jet over ``value_range`` (default the map's own min..max). ``legend``: draw the colour bar
    (:func:`draw_legend`) with ``legend_note`` above it."""
    import cv2

    if amap.shape != image_rgb.shape[:2]:
        amap = cv2.resize(amap.astype(np.float32), (image_rgb.shape[1], image_rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = np.ascontiguousarray(heat_colours(amap, scale) if scale is not None else colourise(amap, value_range))
    out = cv2.addWeighted(np.ascontiguousarray(image_rgb), 1.0 - alpha, heat, alpha, 0.0)
    if legend:
        draw_legend(out, scale is not None, legend_note)
    return out


def legend_note(threshold) -> str:
    """What the colour bar says when no calibrated pixel threshold fixes the scale ("" when one does)."""
    return "" if threshold is not None and threshold.pixel_scale is not None else "no thresholds"


def colour_scale_for(threshold, choice: str = "fixed") -> tuple[float, float] | None:
    """The (normal centre, pixel threshold) an overlay is coloured with: with ``choice`` "fixed",
    the class's ``ClassThreshold.pixel_scale`` (None without a calibrated pixel threshold: then the
    map's own range, as with "frame", since nothing fixes the scale)."""
    if choice not in COLOUR_SCALES:
        raise ValueError(f"colour scale {choice!r}, not one of {', '.join(COLOUR_SCALES)}")
    return None if choice == "frame" or threshold is None else threshold.pixel_scale


def draw_legend(image_rgb: np.ndarray, fixed: bool = True, note: str = "") -> None:
    """Draw the colour bar, in place, in the bottom-right corner: the fixed scale with its
    "normal" (left end) and "threshold" marks, or (``fixed`` False) jet from "frame min" to
    "frame max"; ``note`` above it (e.g. "no thresholds": why the scale is the frame's own)."""
    import cv2

    height, width = image_rgb.shape[:2]
    bar_w, bar_h = max(40, width // 4), max(6, height // 40)
    if bar_w + 8 > width or bar_h * 4 + 8 > height:
        return  # too small an image for a legend
    font = max(0.3, min(height, width) / 900)
    thickness = max(1, round(font * 1.5))
    x0, y0 = width - bar_w - 6, height - bar_h - 6 - int(22 * font) - 4
    if fixed:
        ramp = heat_colours(np.linspace(0.0, SCALE_TOP, bar_w)[None, :], (0.0, 1.0))[0]
        marks = ((0, "normal"), (round((bar_w - 1) / SCALE_TOP), "threshold"))
    else:
        ramp = colourise(np.linspace(0.0, 1.0, bar_w, dtype=np.float32)[None, :], (0.0, 1.0))[0]
        marks = ((0, "frame min"), (bar_w - 1, "frame max"))
    image_rgb[y0:y0 + bar_h, x0:x0 + bar_w] = ramp[None, :, :]
    cv2.rectangle(image_rgb, (x0 - 1, y0 - 1), (x0 + bar_w, y0 + bar_h), (0, 0, 0), 1)

    def text(label, x, y):
        for ink, stroke in (((0, 0, 0), thickness + 2), ((255, 255, 255), thickness)):
            cv2.putText(image_rgb, label, (int(x), int(y)), cv2.FONT_HERSHEY_SIMPLEX, font, ink, stroke, cv2.LINE_AA)

    for at, label in marks:
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, thickness)
        cv2.line(image_rgb, (x0 + at, y0 - 2), (x0 + at, y0 + bar_h + 2), (255, 255, 255), 1)
        text(label, min(max(0, x0 + at - tw // 2), width - tw - 1), y0 + bar_h + th + 4)
    if note:
        text(note, x0, y0 - 4)


def encode_png(image_rgb: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.ascontiguousarray(image_rgb[:, :, ::-1]))
    if not ok:
        raise ValueError("PNG encoding failed")
    return data.tobytes()


REGION_RGB = (255, 0, 255)  # magenta: not a colour of the jet heat map nor of the fixed scale


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
