"""The one record of a scored image: what predict's results.jsonl lines, stream events (events
file, MQTT payloads, the live view's ``/stats.json``) and the remote client's results carry.

Made from a :class:`~anoclip.runtime.detector.Result` by :func:`make_record` and nowhere else, so the
field names cannot drift apart; documented field by field in ``docs/records.md`` and checked
against ``docs/record.schema.json``. ``schema`` names the version: a field is only ever added
within a version; renaming or removing one makes the next version. A frame that could not be
scored is a record too (:func:`make_error_record`): its ``error`` says why, its scores are null.
"""

from __future__ import annotations

from typing import Any

SCHEMA = "anoclip.record/2"


def make_record(result: Any, source: str, *, frame: int = 0, captured: float | None = None, run: str | None = None,
                timings_ms: dict[str, float] | None = None, files: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of one class's ``result`` (a ``Result``; not its ``per_class``) for one frame.

    source: the image file as given, or the stream source's name.
    frame: the frame's index in its source (0 for an image file).
    captured: when the frame was read (UNIX time, seconds).
    run: the id of the run that scored it.
    timings_ms: milliseconds per stage (default: the Result's own timings).
    files: what was written for it (``overlay``, ``map``, ``map_shape``), when something was.
    """
    threshold = result.threshold
    amap = result.anomaly_map_full
    timings = result.timings if timings_ms is None else timings_ms
    record = {
        "schema": SCHEMA, "source": str(source), "frame": int(frame),
        "captured": None if captured is None else round(float(captured), 6), "run": run,
        "class": result.cls, "score": float(result.score),
        "severity": None if threshold is None else _rounded(threshold.severity(result.score)),
        "anomalous": result.anomalous,
        "threshold": None if threshold is None else threshold.image,
        "pixel_threshold": None if threshold is None else threshold.pixel,
        "threshold_origin": None if threshold is None else threshold.origin,
        "regions": [region_record(r) for r in result.regions],
        "map_max": float(amap.max()), "map_mean": float(amap.mean()),
        "map_severity": None if threshold is None else _rounded(threshold.pixel_severity(float(amap.max()))),
        "image_size": [int(v) for v in result.image_size], "tiles": int(result.tiles),
        "timings_ms": {k: round(float(v), 3) for k, v in timings.items()},
        "error": None,
    }
    branches = getattr(result, "branches", None)
    if branches:
        record["branches"] = list(branches)
    if getattr(result, "memory_score", None) is not None:
        record["branch_scores"] = {"zero_shot": float(result.zero_shot_score), "memory": float(result.memory_score)}
    if files:
        record.update(files)
    return record


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def region_record(region: dict[str, Any]) -> dict[str, Any]:
    """A region as records carry it: box and area, and its defect type with its cosine when it was typed."""
    out = {"box": [int(v) for v in region["box"]], "area": int(region["area"])}
    if "type" in region:
        out["type"], out["type_similarity"] = str(region["type"]), round(float(region["type_similarity"]), 6)
    return out


def make_error_record(cls: str, source: str, error: str, *, frame: int = 0, captured: float | None = None,
                      run: str | None = None, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The record of a frame that could not be scored for ``cls``: ``error`` says why (one line);
    score, decision and map fields are null (``regions`` empty), so a reader counting lines misses
    no frame."""
    return {
        "schema": SCHEMA, "source": str(source), "frame": int(frame),
        "captured": None if captured is None else round(float(captured), 6), "run": run,
        "class": cls, "score": None, "severity": None, "anomalous": None, "threshold": None, "pixel_threshold": None,
        "threshold_origin": None, "regions": [], "map_max": None, "map_mean": None,
        "map_severity": None,
        "image_size": None if image_size is None else [int(v) for v in image_size], "tiles": None,
        "timings_ms": {}, "error": str(error),
    }
