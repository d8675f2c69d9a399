"""The 22 augmented views whose mean image score the authors report on MVTec AD (SPEC section 4).

Views, in this order (``VIEW_NAMES``):

* 0: the image itself (the anomaly map is always taken from this view);
* 1-8: rotations by +-pi/16, +-pi/8, +-3pi/16, +-pi/4 about the image centre;
* 9-16: translations by (a, b) in (+-0.2, +-0.2) and (+-0.1, +-0.1), all four sign pairs each;
* 17: a horizontal flip;
* 18: a grey version (ITU-R 601 luma 0.2989 R + 0.587 G + 0.114 B in all three channels, the
  weights of torchvision's ``rgb_to_grayscale``);
* 19-21: rotations by 90, 180 and 270 degrees (counter-clockwise, as ``torch.rot90`` on the
  height and width axes).

Interpretation of the rotations and translations: they are the sampling grids of
``F.affine_grid(theta, size)`` followed by ``F.grid_sample(x, grid, padding_mode="reflection")``,
both with PyTorch's default ``align_corners=False``. ``theta`` maps an output point to the input
point it samples, in normalised coordinates where [-1, 1] spans the image edge to edge (the
"half-size grid": one unit is half the image size). So a rotation is ``theta = [[cos, -sin, 0],
[sin, cos, 0]]`` and a translation by (a, b) is ``theta = [[1, 0, a], [0, 1, b]]``: a shift of
a x width / 2 pixels, i.e. 0.2 moves the content by a tenth of the image size. On square images
the rotation is a true rotation; on other sizes it happens in normalised coordinates, as
``grid_sample`` does it.

The grids are applied with ``cv2.warpAffine`` (bilinear). Reflection padding with
``align_corners=False`` reflects about the outer pixel edges, so the border pixel is repeated
(``...cba|abc...``): that is OpenCV's ``BORDER_REFLECT``, not ``BORDER_REFLECT_101``. Warping
is done in float32, where it agrees with ``grid_sample`` to float rounding (tested against
PyTorch).

Views are made on uint8 RGB images (the evaluation feeds them to ``Detector.predict_batch``, which
normalises them), so each warped view is rounded back to uint8 once. Geometric views commute with
the per-channel normalisation apart from that rounding; the grey view is computed on RGB values
rather than on normalised tensors.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["NUM_VIEWS", "ROTATIONS", "TRANSLATIONS", "VIEW_NAMES", "affine_view", "augment_views"]

#: Rotation angles in radians of views 1-8.
ROTATIONS: tuple[float, ...] = tuple(sign * k * math.pi / 16 for k in (1, 2, 3, 4) for sign in (1, -1))
#: Translations (a, b) in normalised coordinates of views 9-16.
TRANSLATIONS: tuple[tuple[float, float], ...] = tuple(
    (sa * t, sb * t) for t in (0.2, 0.1) for sa, sb in ((1, 1), (-1, 1), (-1, -1), (1, -1))
)
#: Grey weights of torchvision's rgb_to_grayscale.
GREY_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

VIEW_NAMES: tuple[str, ...] = (
    ("original",)
    + tuple(f"rotate {math.degrees(a):+.2f} deg" for a in ROTATIONS)
    + tuple(f"translate ({a:+.1f}, {b:+.1f})" for a, b in TRANSLATIONS)
    + ("horizontal flip", "grey", "rotate 90", "rotate 180", "rotate 270")
)
NUM_VIEWS = len(VIEW_NAMES)
assert NUM_VIEWS == 22


def _normalised_to_pixel(height: int, width: int) -> np.ndarray:
    """3x3 matrix taking align_corners=False normalised (u, v) to pixel (x, y) coordinates."""
    return np.array([[width / 2.0, 0.0, width / 2.0 - 0.5],
                     [0.0, height / 2.0, height / 2.0 - 0.5],
                     [0.0, 0.0, 1.0]])


def affine_view(image: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Resample ``image`` ([H, W, C] or [H, W]) through the affine grid ``theta`` (2x3, normalised
    output -> input coordinates) with bilinear sampling and reflection padding, as
    ``grid_sample(..., padding_mode="reflection", align_corners=False)``.

    uint8 in gives uint8 out (rounded); float in gives float32 out.
    """
    height, width = image.shape[:2]
    to_pixel = _normalised_to_pixel(height, width)
    theta3 = np.vstack([np.asarray(theta, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    # destination pixel -> normalised -> theta -> source pixel
    matrix = to_pixel @ theta3 @ np.linalg.inv(to_pixel)
    source = image.astype(np.float32)
    warped = cv2.warpAffine(source, matrix[:2], (width, height),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
    if warped.ndim < image.ndim:  # OpenCV drops a single channel axis
        warped = warped[..., None]
    if image.dtype == np.uint8:
        return np.clip(np.rint(warped), 0, 255).astype(np.uint8)
    return warped


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0]])


def _translation(a: float, b: float) -> np.ndarray:
    return np.array([[1.0, 0.0, a], [0.0, 1.0, b]])


def _grey(image: np.ndarray) -> np.ndarray:
    luma = image.astype(np.float32) @ np.asarray(GREY_WEIGHTS, np.float32)
    if image.dtype == np.uint8:
        luma = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=2)


def augment_views(image: np.ndarray) -> list[np.ndarray]:
    """The 22 views of an RGB image [H, W, 3] (uint8 or float), view 0 being the image itself.

    Rotations by 90 and 270 degrees swap height and width; every other view keeps the size.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"augment_views needs an RGB image [H, W, 3], got shape {image.shape}")
    views = [image]
    views += [affine_view(image, _rotation(a)) for a in ROTATIONS]
    views += [affine_view(image, _translation(a, b)) for a, b in TRANSLATIONS]
    views.append(np.ascontiguousarray(image[:, ::-1]))
    views.append(_grey(image))
    views += [np.ascontiguousarray(np.rot90(image, k, axes=(0, 1))) for k in (1, 2, 3)]
    return views
