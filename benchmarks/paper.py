"""The paper's published figures, in one place: every benchmark table reads them from here.

Tables 1 and 2 are MVTec AD / VisA accuracies in percent; Table 7 is ms per image on an RTX 3090,
MVTec AD, batch 1. Table 7's AnoCLIP row runs the authors' code, whose last block computes every
token (no class-token-only shortcut).
"""

from __future__ import annotations

#: Table 1 (localisation): pixel AUROC, F1-max, PRO (authors' definition), in percent.
LOCALISATION: dict[str, dict[str, tuple[float, float, float]]] = {
    "mvtec": {"CLIP (QKV patch tokens)": (19.5, 6.2, 1.6), "AnoCLIP": (86.6, 30.1, 70.4),
              "AnoCLIP+": (90.6, 36.5, 77.8)},
    "visa": {"CLIP (QKV patch tokens)": (22.3, 1.4, 0.8), "AnoCLIP": (85.9, 14.7, 65.1),
             "AnoCLIP+": (91.4, 17.4, 75.0)},
}
LOCALISATION_COLUMNS = ("pixel_auroc", "pixel_f1_max", "pro_authors")

#: Table 2 (detection): image AUROC, F1-max, AUPR, in percent (AnoCLIP+ scores as AnoCLIP).
DETECTION: dict[str, dict[str, tuple[float, float, float]]] = {
    "mvtec": {"CLIP": (74.0, 88.5, 89.1), "AnoCLIP": (92.5, 93.2, 96.7)},
    "visa": {"CLIP": (59.3, 74.4, 67.0), "AnoCLIP": (79.2, 79.7, 81.7)},
}
DETECTION_COLUMNS = ("image_auroc", "image_f1_max", "image_aupr")

#: Table 7: ms per image on an RTX 3090, MVTec AD.
LATENCY_SOURCE = "Table 7, RTX 3090, MVTec AD"
LATENCY_MS: dict[str, float] = {"WinCLIP": 41.3, "CLIP (QKV patch tokens)": 6.2, "AnoCLIP": 7.6, "AnoCLIP+": 20.1}
CLIP_MS = LATENCY_MS["CLIP (QKV patch tokens)"]
ANOCLIP_MS = LATENCY_MS["AnoCLIP"]
ANOCLIP_PLUS_MS = LATENCY_MS["AnoCLIP+"]
#: What test-time adaptation adds per image in Table 7 (AnoCLIP+ minus AnoCLIP).
TTA_MS = ANOCLIP_PLUS_MS - ANOCLIP_MS


def anoclip_over_clip() -> float:
    """Table 7's AnoCLIP / CLIP latency ratio."""
    return ANOCLIP_MS / CLIP_MS
