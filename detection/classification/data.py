"""Classification data: torchvision's ``ImageFolder`` layout (one label per image) and the VOC
layout (image-level multi-labels from the box annotations), read into one structure.

``ImageFolder``: ``DIR/<split>/<class>/<image>`` (splits ``train`` and ``test``); classes are the
sorted folder names of the training split, and every split must have exactly those folders.
VOC: ``DIR/Annotations``, ``DIR/JPEGImages``, ``DIR/ImageSets/Main/<split>.txt`` (``trainval``
and ``test``); an image is a positive of a class when it has a non-difficult box of it, ignored
for that class (label -1, VOC's "0") when its only boxes of it are difficult, else a negative.

Refused, with one line naming the folder or file: a missing split, an empty class folder, a class
missing from a split, an unreadable image header (decoding errors come when the pixels are read).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import cv2
import numpy as np

from ..data.images import inspect_image, read_image
from ..data.voc import VOCDataset
from ..errors import DatasetError
from ..io.paths import check_class_name

__all__ = ["ClassSample", "ClassificationSet", "IMAGE_SUFFIXES", "detect_layout", "train_split_name",
           "read_image_folder", "read_voc_labels", "read_split", "load_pixels", "resize_shorter"]

log = logging.getLogger(__name__)

#: Files an ImageFolder class folder may hold as images (torchvision's IMG_EXTENSIONS, lower case);
#: other files (a README, .DS_Store) are ignored, as torchvision does.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclasses.dataclass(frozen=True)
class ClassSample:
    """One image: its file, size from the header, and its label(s).

    Attributes:
        path: the image file.
        width, height: from the image header.
        label: class index (single-label data), or -1 for multi-label data.
        targets: int8 array[K] for multi-label data (1 positive, 0 negative, -1 ignored), else None.
    """

    path: Path
    width: int
    height: int
    label: int
    targets: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
    """One split: class names, samples, whether labels are multi-label (VOC) or single."""

    root: Path
    split: str
    classes: tuple[str, ...]
    samples: tuple[ClassSample, ...]
    multilabel: bool

    @property
    def layout(self) -> str:
        return "voc" if self.multilabel else "imagefolder"


def detect_layout(root: str | os.PathLike) -> str:
    """"voc" when ``root/Annotations`` exists, "imagefolder" when ``root/train`` or ``root/test``
    does; otherwise a DatasetError saying what is expected."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} {'is not a folder' if os.path.lexists(root) else 'does not exist'}")
    if (root / "Annotations").is_dir():
        return "voc"
    if (root / "train").is_dir() or (root / "test").is_dir():
        return "imagefolder"
    raise DatasetError(f"{root} is neither an ImageFolder (train/<class>/..., test/<class>/...) nor a VOC-layout "
                       f"folder (Annotations/, JPEGImages/, ImageSets/Main/)")


def train_split_name(root: str | os.PathLike) -> str:
    """The training split of a layout: ``train`` (ImageFolder) or ``trainval`` (VOC)."""
    return "trainval" if detect_layout(root) == "voc" else "train"


def _class_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_image_folder(root: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> ClassificationSet:
    """One split of an ImageFolder.

    Args:
        root: the folder holding ``<split>/<class>/``.
        split: "train", "test", ...
        classes: the classes the split must have (those of the training split, or of a model);
            None: the split's own folders.
    Raises:
        DatasetError: missing split folder, no class folders, an empty class folder, a class
            missing from or extra to ``classes``, an unreadable image header.
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"split folder {folder} does not exist: an ImageFolder holds {root}/{split}/<class>/<images>")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DatasetError(f"split folder {folder} has no class folders")
    for name in found:
        check_class_name(name)
    if classes is not None:
        missing = [c for c in classes if c not in found]
        if missing:
            raise DatasetError(f"class {missing[0]!r} is missing from split {folder} (it has {', '.join(found)}; "
                               f"expected {', '.join(classes)})")
        extra = [c for c in found if c not in classes]
        if extra:
            raise DatasetError(f"class folder {folder / extra[0]} is not one of the classes {', '.join(classes)}")
    else:
        classes = tuple(found)
    samples = []
    for k, name in enumerate(classes):
        files = _class_images(folder / name)
        if not files:
            raise DatasetError(f"class folder {folder / name} has no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            (w, h), problems = inspect_image(path)
            if problems:
                log.debug("%s: %s", path, "; ".join(problems))
            samples.append(ClassSample(path, int(w), int(h), k))
    return ClassificationSet(root, split, tuple(classes), tuple(samples), multilabel=False)


def read_voc_labels(root: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> ClassificationSet:
    """Image-level labels of one split of a VOC-layout dataset (see the module docstring)."""
    ds = VOCDataset(root, split, classes=classes)
    k = len(ds.classes)
    samples = []
    for r in ds.records:
        targets = np.zeros(k, np.int8)
        for label, difficult in zip(r.labels.tolist(), r.difficult.tolist()):
            if not difficult:
                targets[label] = 1
            elif targets[label] == 0:
                targets[label] = -1
        samples.append(ClassSample(Path(r.path), int(r.width), int(r.height), -1, targets))
    if not samples:
        raise DatasetError(f"split {split} of {root} has no images")
    return ClassificationSet(Path(root), split, tuple(ds.classes), tuple(samples), multilabel=True)


def read_split(root: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> ClassificationSet:
    """One split of either layout (:func:`detect_layout`)."""
    if detect_layout(root) == "voc":
        return read_voc_labels(root, split, classes)
    return read_image_folder(root, split, classes)


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
    """Resize uint8 array[H, W, 3] so that min(H, W) == side (own aspect; bilinear; area when
    shrinking, so that large photos do not alias)."""
    h, w = image.shape[:2]
    f = side / min(h, w)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))
    if size == (w, h):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def load_pixels(sample: ClassSample) -> np.ndarray:
    """uint8 array[H, W, 3] RGB of a sample (:func:`detection.data.images.read_image`)."""
    return read_image(sample.path)
