"""Image preprocessing (SPEC section 1).

The reference pipeline resizes the RGB image straight to the model's input size with PIL's
bilinear filter (antialiased when shrinking), scales to [0, 1] and normalises with the model's
mean and std. The resize is Pillow's own, so it is the reference's to the bit.

Frames far from square are cut into overlapping square tiles after resizing the short side
(``tile_layout``); the maps of the tiles are merged back by ``merge_tiles``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import ImageError

def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 [H, W] or [H, W, C] image to ``size`` = (height, width) with Pillow's
    BILINEAR filter (antialiased when shrinking): the resize of the reference pipeline itself."""
    from PIL import Image

    height, width = size
    if image.shape[:2] == (height, width):
        return image
    squeeze = image.ndim == 3 and image.shape[2] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out[..., None] if squeeze else out


def normalise(image: np.ndarray, mean, std) -> np.ndarray:
    """[H, W, 3] uint8 (or float in [0, 1]) -> [3, H, W] float32 normalised."""
    x = image.astype(np.float32)
    if image.dtype == np.uint8:
        x /= 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept grey, RGB or RGBA arrays and return [H, W, 3] uint8 RGB."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image has shape {image.shape}; expected [H, W], [H, W, 3] or [H, W, 4]")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        else:
            raise ImageError(f"image dtype {image.dtype} is not supported; pass uint8 or float in [0, 1]")
    return image


# Decoded frames above this many pixels are refused before they are decoded: a small compressed
# file can claim a huge size (a 1.2 MB PNG of 20000 x 20000 decodes to 1.2 GB). 8192 x 8192 covers
# every area camera we know of; line-scan frames beyond it need --max-pixels.
DEFAULT_MAX_PIXELS = 8192 * 8192


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, without decoding its pixels; None when
    the header cannot be read. Sizes beyond Pillow's own bomb limit come back as (-1, -1)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                return image.size
    except Image.DecompressionBombError:
        return (-1, -1)
    except Exception:  # Pillow raises many types for damaged headers
        return None


def read_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as [H, W, 3] uint8 RGB.

    ``max_pixels``: the largest width x height decoded (None: no limit); the size is read from the
    file's header first, so a file that claims more is refused without decoding it.
    """
    return decode_image(read_file(path), max_pixels, str(path))


def read_file(path) -> bytes:
    """The bytes of an image file as stored (encoded); an ImageError naming it when it cannot be read."""
    if not os.path.isfile(path):
        raise ImageError(f"cannot read {path}: no such file")
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def decode_image(raw: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, shown: str = "the image bytes",
                 limit_hint: str = "raise the limit with --max-pixels") -> np.ndarray:
    """Encoded image bytes (a file's, or a request's) -> [H, W, 3] uint8 RGB; bytes whose header
    claims more than ``max_pixels`` are refused without decoding. ``shown`` names them in errors."""
    import cv2
    from PIL import Image

    size = image_header_size(raw) if raw else None
    if size is None:
        raise ImageError(f"cannot decode {shown}: not an image OpenCV can read (png, jpg, bmp, tiff, webp)")
    if max_pixels is not None:
        too_big = size == (-1, -1) and max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0)
        if too_big or size[0] * size[1] > max_pixels:
            claimed = "more than Pillow's limit" if size == (-1, -1) else f"{size[0]} x {size[1]} pixels"
            raise ImageError(f"{shown} is {claimed}, above the limit of {max_pixels} pixels; it was not decoded "
                             f"({limit_hint} if the frame is genuine)")
    data = np.frombuffer(raw, dtype=np.uint8)  # a view: the bytes are held once
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"cannot decode {shown}: not an image OpenCV can read (png, jpg, bmp, tiff, webp)")
    return image[:, :, ::-1].copy()


@dataclass(frozen=True)
class TileLayout:
    """How a frame is cut: resized size and the left/top offsets of each square tile."""

    resized: tuple[int, int]  # (height, width) after resizing the short side to the tile size
    offsets: tuple[tuple[int, int], ...]  # (top, left) of each tile
    tile: tuple[int, int]

    @property
    def single(self) -> bool:
        """The whole frame went into one tile (squashed to the model's input size)."""
        return len(self.offsets) == 1 and self.resized == self.tile


def tile_layout(height: int, width: int, tile: tuple[int, int], mode: str = "auto", max_aspect: float = 1.2) -> TileLayout:
    """Decide whether and how to tile a frame.

    ``mode``: ``"never"`` squashes the whole frame into one tile (SPEC default for MVTec);
    ``"always"`` resizes the short side to the tile and covers the long side with as many evenly
    spaced, overlapping tiles as needed; ``"auto"`` tiles when the aspect ratio exceeds
    ``max_aspect``.
    """
    th, tw = tile
    aspect = max(height, width) / min(height, width)
    if mode not in ("auto", "never", "always"):
        raise ValueError(f"tiling mode must be auto, never or always, got {mode!r}")
    if mode == "never" or (mode == "auto" and aspect <= max_aspect):
        return TileLayout((th, tw), ((0, 0),), tile)
    if width >= height:
        new_h, new_w = th, max(tw, int(round(width * th / height)))
        count = math.ceil(new_w / tw)
        lefts = np.linspace(0, new_w - tw, count).round().astype(int) if count > 1 else np.array([0])
        offsets = tuple((0, int(x)) for x in lefts)
    else:
        new_w, new_h = tw, max(th, int(round(height * tw / width)))
        count = math.ceil(new_h / th)
        tops = np.linspace(0, new_h - th, count).round().astype(int) if count > 1 else np.array([0])
        offsets = tuple((int(y), 0) for y in tops)
    return TileLayout((new_h, new_w), offsets, tile)


def preprocess(image: np.ndarray, size: tuple[int, int], mean, std, tiling: str = "never") -> tuple[np.ndarray, TileLayout]:
    """Image -> ([tiles, 3, H, W] float32 batch, layout)."""
    rgb = as_rgb_uint8(image)
    layout = tile_layout(rgb.shape[0], rgb.shape[1], size, tiling)
    resized = resize_bilinear(rgb, layout.resized)
    th, tw = size
    tiles = [normalise(resized[y : y + th, x : x + tw], mean, std) for y, x in layout.offsets]
    return np.stack(tiles), layout


def merge_tiles(maps: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Merge per-tile maps [tiles, th, tw] into one map over the resized frame (overlaps averaged)."""
    if layout.single:
        return maps[0]
    total = np.zeros(layout.resized, dtype=np.float64)
    count = np.zeros(layout.resized, dtype=np.float64)
    th, tw = layout.tile
    for tile_map, (y, x) in zip(maps, layout.offsets):
        total[y : y + th, x : x + tw] += tile_map
        count[y : y + th, x : x + tw] += 1.0
    return (total / np.maximum(count, 1.0)).astype(maps.dtype)
