"""The paper's published figures, in one place: every benchmark table reads them from here.

Tables 1 and 2 are MVTec AD / VisA accuracies in percent; Table 7 is ms per image on an RTX 3090,
MVTec AD, batch 1. Table 7's AnoCLIP row runs the authors' code, whose last block computes every
token (no class-token-only shortcut).

Beside them, the published figures of WinCLIP (zero-shot) and WinCLIP+ (few-shot: K normal
images per class), the references of ``anoclip eval --memory-shots`` (published, not measured here).
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

ANOCLIP_SOURCE = "AnoCLIP paper, Tables 1 and 2"

#: WinCLIP / WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
#: Segmentation", CVPR 2023, Tables 1 and 2): shots -> (image AUROC, pixel AUROC) in percent, mean over
#: classes; 0 shots is WinCLIP (zero-shot), 1, 2 and 4 shots are WinCLIP+.
WINCLIP_SOURCE = "Jeong et al., WinCLIP, CVPR 2023, Tables 1-2"
WINCLIP: dict[str, dict[int, tuple[float, float]]] = {
    "mvtec": {0: (91.8, 85.1), 1: (93.1, 95.2), 2: (94.4, 96.0), 4: (95.2, 96.2)},
    "visa": {0: (78.1, 79.6), 1: (83.8, 96.4), 2: (84.6, 96.8), 4: (87.3, 97.2)},
}

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
