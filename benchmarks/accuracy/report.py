"""The ``anoclip eval`` report: the per-class table, then the paper's Tables 1 and 2 beside this run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .. import paper
from .augment import NUM_VIEWS
from .layouts import DATASET_TITLES
from .results import SUMMARY, EvalSettings, EvalSummary

RANDOM_WEIGHTS_WARNING = ("WARNING: these artifacts were exported with RANDOM weights (--pretrained none): "
                          "the numbers below carry no meaning; they only show that the pipeline runs.")

def _pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value + 0.0:.1f}"  # + 0.0 prints -0.0 as 0.0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join([first] + [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]).rstrip()

    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _method(settings: EvalSettings) -> str:
    if settings.model != "visual":
        return "CLIP (QKV patch tokens)" + (" + TTA" if settings.tta else "")
    return "AnoCLIP+" if settings.tta else "AnoCLIP"


PRO_NOTE = ("PRO (authors, rescaled): the paper's PRO - 200 thresholds, FPR < 0.3 kept, the kept FPRs "
            "min-max rescaled to [0, 1]. AUPRO@0.3: standard area over FPR [0, 0.3] divided by 0.3.")


def format_report(summary: EvalSummary) -> str:
    """Per-class table, then the paper's Tables 1 and 2 with the published figures beside."""
    s = summary.settings
    title = DATASET_TITLES[s.dataset]
    method = _method(s)
    lines: list[str] = []
    if summary.random_weights:
        lines += [RANDOM_WEIGHTS_WARNING, ""]
    lines.append(f"{title}: {s.backbone} ({s.pretrained}), {method}, image score over {s.image_views} "
                 f"view{'s' if s.image_views > 1 else ''}, backend {summary.backend}")
    lines.append("")
    per_class = [[r.cls, str(r.images), str(r.anomalous), *(_pct(v) for v in (
        r.metrics.pixel_auroc, r.metrics.pixel_ap, r.metrics.pixel_f1_max, r.metrics.pro_authors,
        r.metrics.aupro_03, r.metrics.image_auroc, r.metrics.image_f1_max, r.metrics.image_aupr))]
        for r in summary.classes]
    m = summary.mean
    per_class.append([f"mean ({len(summary.classes)})", str(sum(r.images for r in summary.classes)),
                      str(sum(r.anomalous for r in summary.classes)),
                      *(_pct(v) for v in (m.pixel_auroc, m.pixel_ap, m.pixel_f1_max, m.pro_authors, m.aupro_03,
                                          m.image_auroc, m.image_f1_max, m.image_aupr))])
    lines += _table(["class", "images", "anomalous", "px AUROC", "px AP", "px F1-max", "PRO (authors, rescaled)",
                     "AUPRO@0.3", "img AUROC", "img F1-max", "img AUPR"], per_class)

    lines += ["", f"Table 1 - zero-shot anomaly localisation, {title} (mean over classes, %)"]
    rows = [[f"this run: {method}", _pct(m.pixel_auroc), _pct(m.pixel_f1_max), _pct(m.pro_authors),
             _pct(m.aupro_03), _pct(m.pixel_ap)]]
    for name, (auroc, f1, pro) in paper.LOCALISATION[s.dataset].items():
        if name.startswith("CLIP") and s.model == "visual":
            continue
        rows.append([f"paper: {name}", f"{auroc:.1f}", f"{f1:.1f}", f"{pro:.1f}", "-", "-"])
    lines += _table(["method", "pixel AUROC", "pixel F1-max", "PRO (authors, rescaled)", "AUPRO@0.3", "pixel AP"],
                    rows)

    lines += ["", f"Table 2 - zero-shot anomaly detection, {title} (mean over classes, %)"]
    rows = [[f"this run: {method}", _pct(m.image_auroc), _pct(m.image_f1_max), _pct(m.image_aupr)]]
    for name, (auroc, f1, aupr) in paper.DETECTION[s.dataset].items():
        if name == "CLIP" and s.model == "visual":
            continue
        rows.append([f"paper: {name}", f"{auroc:.1f}", f"{f1:.1f}", f"{aupr:.1f}"])
    lines += _table(["method", "image AUROC", "image F1-max", "image AUPR"], rows)

    lines += ["", PRO_NOTE]
    if s.dataset == "mvtec" and s.image_views == 1:
        lines.append(f"The paper's MVTec AD image scores average {NUM_VIEWS} augmented views; this run used one "
                     f"(--image-views {NUM_VIEWS} for the paper's protocol).")
    reused = [r.cls for r in summary.classes if r.reused]
    if reused:
        lines.append(f"Reused from earlier runs: {', '.join(reused)} (--no-resume to evaluate again).")
    lines.append(f"Results: {Path(summary.out_dir) / SUMMARY}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
