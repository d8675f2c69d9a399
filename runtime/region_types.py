"""Naming the regions of a map after the class's defect types (``anoclip classes add NAME
--defect-types scratch,dent``): each region's mean raw patch token against the types' text
embeddings, the closest by cosine. Pure numpy (and OpenCV's connected components, as the regions)."""

from __future__ import annotations

import numpy as np

from .preprocess import TileLayout


def region_cells(region_mask: np.ndarray, grid: tuple[int, int], layout: TileLayout) -> list[tuple[int, int]]:
    """The (tile, patch index) pairs whose grid cells the True pixels of ``region_mask`` (in image
    pixels) fall in: each pixel's centre is taken to the resized frame the tiles were cut from, then
    into every tile holding it (overlapping tiles both count), then to that tile's patch grid."""
    height, width = region_mask.shape
    ys, xs = np.nonzero(region_mask)
    resized_h, resized_w = layout.resized
    ry = np.minimum(((ys + 0.5) * resized_h / height).astype(np.int64), resized_h - 1)
    rx = np.minimum(((xs + 0.5) * resized_w / width).astype(np.int64), resized_w - 1)
    th, tw = layout.tile
    gh, gw = grid
    cells: set[tuple[int, int]] = set()
    for tile, (top, left) in enumerate(layout.offsets):
        inside = (ry >= top) & (ry < top + th) & (rx >= left) & (rx < left + tw)
        if not inside.any():
            continue
        rows = (ry[inside] - top) * gh // th
        cols = (rx[inside] - left) * gw // tw
        cells.update((tile, int(m)) for m in np.unique(rows * gw + cols))
    return sorted(cells)


def type_regions(regions: list[dict], anomaly_map: np.ndarray, pixel: float, patch_tokens: np.ndarray,
                 grid: tuple[int, int], layout: TileLayout, names: tuple[str, ...], type_features: np.ndarray) -> None:
    """Set ``type`` and ``type_similarity`` of every region of ``decision.find_regions(anomaly_map,
    pixel)``: the name of the row of ``type_features`` [K, D] (unit rows) closest by cosine to the
    mean of the raw patch tokens [tiles, M, D] of the grid cells the region's pixels fall in."""
    import cv2

    if not regions:
        return
    mask = (np.asarray(anomaly_map) > pixel).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)  # as find_regions makes them
    by_stats = {(int(x), int(y), int(w), int(h), int(a)): k for k, (x, y, w, h, a) in
                enumerate(stats.tolist()) if k > 0}
    features = np.asarray(type_features, np.float64)
    for region in regions:
        label = by_stats.get((*region["box"], region["area"]))
        if label is None:  # not a region of this map (nothing to name it from)
            continue
        cells = region_cells(labels == label, grid, layout)
        if not cells:
            continue
        tokens = np.stack([patch_tokens[tile, m] for tile, m in cells]).astype(np.float64)
        mean = tokens.mean(axis=0)
        norm = np.linalg.norm(mean)
        if not np.isfinite(norm) or norm == 0.0:
            continue
        similarity = features @ (mean / norm) / np.maximum(np.linalg.norm(features, axis=1), 1e-12)
        best = int(np.argmax(similarity))
        region["type"], region["type_similarity"] = names[best], float(similarity[best])
