"""MVTec AD / VisA folder layouts: the test-split loaders and mask reading (SPEC section 6).

* MVTec AD: ``<root>/<class>/test/<defect>/*.png``, ``<root>/<class>/test/good/*.png``,
  ``<root>/<class>/ground_truth/<defect>/<name>_mask.png``.
* VisA: ``<root>/split_csv/1cls.csv`` with columns object, split, label, image, mask (label
  ``normal`` / ``anomaly``; paths relative to ``<root>``; mask empty for normal images).

The normal training images (the few-shot protocol draws its shots from them): MVTec AD
``<root>/<class>/train/good/``; VisA the rows of ``1cls.csv`` with split ``train`` and label
``normal`` (:func:`load_normal_train`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from anoclip.runtime.classes import MVTEC_CLASSES, MVTEC_TEXTURES, VISA_CLASSES
from anoclip.runtime.inputs import IMAGE_SUFFIXES
from anoclip.runtime.preprocess import resize_bilinear

logger = logging.getLogger(__name__)

__all__ = [
    "DATASETS",
    "DATASET_TITLES",
    "MVTEC_CLASSES",
    "MVTEC_TEXTURES",
    "VISA_CLASSES",
    "VISA_COLUMNS",
    "VISA_CSV",
    "Sample",
    "list_classes",
    "load_mvtec",
    "load_normal_train",
    "load_visa",
    "read_mask",
]

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
DATASETS = ("mvtec", "visa")
DATASET_TITLES = {"mvtec": "MVTec AD", "visa": "VisA"}


@dataclass(frozen=True)
class Sample:
    """One test image: label 0 normal / 1 anomalous; mask_path None for normal images."""

    image_path: Path
    mask_path: Path | None
    label: int
    defect: str
    cls: str


# --------------------------------------------------------------------------------------------
# Reading images and masks
# --------------------------------------------------------------------------------------------

def _as_wh(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    width, height = size
    return int(width), int(height)


def read_mask(path: str | Path | None, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Ground-truth mask as a bool array of shape (height, width).

    Any nonzero pixel is anomalous (VisA masks are not 0/255). With ``size`` (an int for a square,
    or (width, height) as PIL and OpenCV take it) the 0/255 mask is resized bilinearly exactly as
    Pillow does, scaled to [0, 1] and thresholded at > 0.5 (SPEC section 6). ``path`` None gives
    an all-False mask of ``size``.
    """
    if path is None:
        if size is None:
            raise ValueError("read_mask(None) needs a size for the all-normal mask")
        width, height = _as_wh(size)
        return np.zeros((height, width), dtype=bool)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} not found: check the dataset folder is complete")
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if raw is None:
        raise ValueError(f"mask file {path} could not be decoded: replace it with a valid PNG")
    binary = np.where(raw > 0, np.uint8(255), np.uint8(0))
    if size is None:
        return binary > 0
    width, height = _as_wh(size)
    # The runtime's resize reproduces Pillow's BILINEAR resize bit for bit on uint8 images, which
    # is what torchvision's Resize does to the authors' PIL masks.
    resized = resize_bilinear(binary[..., None], (height, width))[..., 0]
    return resized.astype(np.float32) / 255.0 > 0.5


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _check_root(root: str | Path, dataset: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        hint = ("the folder holding bottle/, cable/, ..." if dataset == "mvtec"
                else "the folder holding split_csv/1cls.csv and candle/, pcb1/, ...")
        raise FileNotFoundError(f"{dataset} root {root} does not exist: pass {hint}")
    return root


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mvtec_classes(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())


def load_mvtec(root: str | Path, cls: str) -> list[Sample]:
    """Test samples of one MVTec AD class: good images first, then each defect folder in name
    order, images in name order."""
    root = _check_root(root, "mvtec")
    test_dir = root / cls / "test"
    if not test_dir.is_dir():
        available = ", ".join(_mvtec_classes(root)) or "none"
        raise FileNotFoundError(f"class {cls!r} has no test folder {test_dir} (classes found: "
                                f"{available}): pass one of these or point the root elsewhere")
    defects = sorted(p.name for p in test_dir.iterdir() if p.is_dir())
    defects.sort(key=lambda d: d != "good")
    samples: list[Sample] = []
    for defect in defects:
        for image in _images_in(test_dir / defect):
            if defect == "good":
                samples.append(Sample(image, None, 0, defect, cls))
                continue
            mask = root / cls / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"mask {mask} for {image} is missing: restore the "
                                        f"ground_truth folder of {cls!r} from the dataset archive")
            samples.append(Sample(image, mask, 1, defect, cls))
    if not samples:
        raise FileNotFoundError(f"no test images under {test_dir}: the class folder is empty or "
                                f"incomplete; re-extract it")
    return samples


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    path = root / VISA_CSV
    if not path.is_file():
        raise FileNotFoundError(f"VisA split file {path} not found: use the VisA root that holds "
                                f"split_csv/1cls.csv (VisA's 1cls split)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"malformed {path}: missing column(s) {', '.join(missing)}; expected "
                             f"header {','.join(VISA_COLUMNS)}")
        rows = []
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if row["label"] not in ("normal", "anomaly"):
                raise ValueError(f"malformed {path} line {line}: label {row['label']!r} is neither "
                                 f"'normal' nor 'anomaly'; fix that row")
            if not row["object"] or not row["image"]:
                raise ValueError(f"malformed {path} line {line}: empty object or image; fix that "
                                 f"row")
            if row["label"] == "anomaly" and row["split"] == "test" and not row["mask"]:
                raise ValueError(f"malformed {path} line {line}: anomaly without a mask path; "
                                 f"fix that row")
            rows.append(row)
    return rows


def load_visa(root: str | Path, cls: str) -> list[Sample]:
    """Test samples of one VisA class, in the order of ``split_csv/1cls.csv``. VisA names no
    defect types: ``defect`` is ``normal`` or ``anomaly``."""
    root = _check_root(root, "visa")
    rows = _read_visa_csv(root)
    objects = sorted({r["object"] for r in rows})
    if cls not in objects:
        raise ValueError(f"class {cls!r} is not in {root / VISA_CSV} (classes: "
                         f"{', '.join(objects) or 'none'}): pass one of these")
    samples: list[Sample] = []
    for row in rows:
        if row["object"] != cls or row["split"] != "test":
            continue
        image = root / row["image"]
        if not image.is_file():
            raise FileNotFoundError(f"image {image} listed in {root / VISA_CSV} is missing: "
                                    f"re-extract the {cls!r} folder")
        label = 1 if row["label"] == "anomaly" else 0
        mask = root / row["mask"] if label and row["mask"] else None
        samples.append(Sample(image, mask, label, row["label"], cls))
    if not samples:
        raise ValueError(f"class {cls!r} has no test rows in {root / VISA_CSV}: check the split")
    return samples


def load_normal_train(root: str | Path, dataset: str, cls: str) -> list[Path]:
    """The normal training images of one class, in name order (MVTec AD: ``<class>/train/good/``)
    or in the order of ``split_csv/1cls.csv`` (VisA: split ``train``, label ``normal``)."""
    root = _check_root(root, dataset)
    if dataset == "mvtec":
        folder = root / cls / "train" / "good"
        images = _images_in(folder) if folder.is_dir() else []
        if not images:
            raise FileNotFoundError(f"class {cls!r} has no normal training images in {folder}: the few-shot "
                                    f"protocol draws its shots there; restore the class's train/good folder")
        return images
    if dataset != "visa":
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    images = []
    for row in _read_visa_csv(root):
        if row["object"] == cls and row["split"] == "train" and row["label"] == "normal":
            image = root / row["image"]
            if not image.is_file():
                raise FileNotFoundError(f"image {image} listed in {root / VISA_CSV} is missing: "
                                        f"re-extract the {cls!r} folder")
            images.append(image)
    if not images:
        raise ValueError(f"class {cls!r} has no normal training rows (split train, label normal) in "
                         f"{root / VISA_CSV}: the few-shot protocol draws its shots there")
    return images


def list_classes(root: str | Path, dataset: str) -> list[str]:
    """Class names found under ``root`` for ``dataset`` ('mvtec' or 'visa'), sorted."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    root = _check_root(root, dataset)
    if dataset == "mvtec":
        classes = _mvtec_classes(root)
        if not classes:
            raise FileNotFoundError(f"no class folders with a test/ folder under {root}: pass the "
                                    f"MVTec AD root (the folder holding bottle/, cable/, ...)")
        return classes
    return sorted({r["object"] for r in _read_visa_csv(root)})
