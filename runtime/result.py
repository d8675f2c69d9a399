"""What ``Detector.predict`` returns (``Result``), and how per-patch values become its maps (at
the model's resolution and at the image's): one place, which the remote client uses too."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decision import ClassThreshold
from .preprocess import TileLayout, merge_tiles
from .scoring import gaussian_smooth, patch_grid, upsample_bilinear


@dataclass
class Result:
    """What ``Detector.predict`` returns for one image.

    score: image-level p_abnormal of the global token (mean over tiles).
    anomaly_map: per-pixel p_abnormal at model resolution ([H, W] of the model input; for a tiled
        frame, the resized frame the tiles were cut from).
    anomaly_map_full: the same map at the image's own resolution.
    patch_probabilities: per-patch p_abnormal before smoothing, [tiles, M].
    timings: milliseconds per stage (preprocess, model, scoring, tta when used); in a batched call
        the model time is the batch's time divided by the number of images.
    per_class: for a call with several classes, class -> its Result (in the order asked); the fields
        above are then those of the first class. None for a single class (see :attr:`by_class`).
    threshold: the class's thresholds in force (:meth:`Detector.threshold_for`), None without any.
    anomalous: ``score > threshold.image``; None without an image threshold.
    regions: the connected regions of ``anomaly_map_full`` above ``threshold.pixel``, as
        ``{"box": [x, y, width, height], "area": pixels}`` in image pixels, largest first ([]
        without a pixel threshold). For a class with defect types (``--defect-types``) each also
        holds ``type`` (the type whose text embedding is closest by cosine to the mean raw patch
        token of the grid cells the region covers, through the tile layout for tiled frames) and
        ``type_similarity`` (that cosine); not when the model returned no patch tokens (a fused
        model made without ``--patch-embeds``).
    branches: the branches that made score and maps: ``("zero_shot",)``, ``("zero_shot", "memory")``
        (combined with the memory's weight, see ``memory.py``) or ``("memory",)``.
    zero_shot_score, memory_score: each branch's image score when the memory ran (None otherwise).
    patch_tokens, layout: with ``predict_batch(..., keep_tokens=True)``, the raw patch tokens of the
        image's tiles [tiles, M, D] and how the tiles were cut (:meth:`Detector.score_tokens` scores
        them again, against another memory); ``zero_shot_score`` is then set too.
    """

    score: float
    anomaly_map: np.ndarray
    anomaly_map_full: np.ndarray
    patch_probabilities: np.ndarray
    cls: str
    image_size: tuple[int, int]
    tiles: int
    timings: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, "Result"] | None = None
    threshold: ClassThreshold | None = None
    anomalous: bool | None = None
    regions: list[dict] = field(default_factory=list)
    branches: tuple[str, ...] = ("zero_shot",)
    zero_shot_score: float | None = None
    memory_score: float | None = None
    patch_tokens: np.ndarray | None = None
    layout: TileLayout | None = None

    @property
    def by_class(self) -> dict[str, "Result"]:
        """class -> Result, for a call with one class or several."""
        return self.per_class if self.per_class is not None else {self.cls: self}


def anomaly_maps(probs: np.ndarray, grid: tuple[int, int], layout: TileLayout, size: tuple[int, int],
                 smoothing_sigma: float = 0.0, tile_maps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(map at model resolution, map at the image's ``size``) of per-patch probabilities [tiles, M]
    of an image cut as ``layout`` (``tile_maps``: the tiles' maps at model resolution, when the
    model made them). The one place the full-resolution map is made (the remote client too)."""
    grids = patch_grid(probs, grid)
    if tile_maps is None:
        tile_maps = upsample_bilinear(grids, layout.tile)
    model_map = merge_tiles(tile_maps, layout)
    # Two resamplers on purpose. A single tile's map is the patch grid itself, so it is upsampled
    # straight to the image size with align_corners, as the method does to the model size
    # (docs/method.md): one interpolation, not two. A tiled frame's map exists only as pixels of
    # the resized frame (tiles merged), so it is resized back like an image, pixel centres
    # aligned (OpenCV's INTER_LINEAR), the inverse of the resize that made the tiles.
    if layout.single:
        full = upsample_bilinear(grids[0], size)
    else:
        import cv2

        full = cv2.resize(model_map, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if smoothing_sigma > 0:
        model_map = gaussian_smooth(model_map, smoothing_sigma)
        scale = size[0] / model_map.shape[0]
        full = gaussian_smooth(full, smoothing_sigma * scale)
    return model_map, full
