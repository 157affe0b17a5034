"""Benchmark datasets as ImageFolders, made by a function a user can rerun:

- :func:`make_crop_folder`: the annotated boxes of VOC-layout datasets cropped out, one class
  folder per object class (``trainval`` boxes -> ``train``, ``test`` boxes -> ``test``);
- :func:`make_scale_folder`: synthetic images of one shape each (the four classes of
  :mod:`detection.data.synthetic`), whose object's longer side varies by 4x (log-uniform), at
  varied aspects: a set where the object scale and the image aspect both vary.

Both write into a temporary folder beside ``out`` and rename it into place when complete, with a
``dataset.json`` of their settings; an existing folder made with the same settings is reused,
any other existing ``out`` is refused.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ..data.images import load_image
from ..data.synthetic import SYNTHETIC_CLASSES, render_object_image
from ..data.voc import VOCDataset
from ..errors import DatasetError
from ..io.jsonfile import read_json, write_json

__all__ = ["make_crop_folder", "make_scale_folder", "DATASET_VERSION"]

log = logging.getLogger(__name__)

#: Bump when what the makers write changes, so old folders are not reused.
DATASET_VERSION = 1
_SETTINGS = "dataset.json"


def _reuse_or_refuse(out: Path, settings: dict[str, Any]) -> bool:
    if not os.path.lexists(out):
        return False
    marker = out / _SETTINGS
    if marker.is_file():
        try:
            if read_json(marker) == settings:
                log.info("reusing %s (made with the same settings)", out)
                return True
        except Exception:  # noqa: BLE001 - an unreadable marker: refuse below like any other folder
            pass
    raise DatasetError(f"{out} exists and was not made with these settings ({_SETTINGS}); remove it or choose "
                       "another --out")


def _finish(tmp: Path, out: Path, settings: dict[str, Any]) -> Path:
    write_json(tmp / _SETTINGS, settings)
    os.replace(tmp, out)
    return out


def _save(image: np.ndarray | Image.Image, path: Path) -> None:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95, subsampling=0)   # 4:4:4: small crops keep their colour edges


def make_crop_folder(voc_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, max_side: int = 320,
                     min_side: int = 16, splits: Sequence[tuple[str, str]] = (("trainval", "train"), ("test", "test"))
                     ) -> Path:
    """Crop every non-difficult box of VOC-layout datasets into an ImageFolder.

    Args:
        voc_dirs: VOC-layout folders; their classes are merged by name.
        out: the ImageFolder to write (``out/<split>/<class>/<dataset>_<image id>_<k>.jpg``).
        max_side: crops whose longer side is larger are shrunk to it (area interpolation): the
            originals reach 4,600 px, which no test view needs.
        min_side: boxes with a shorter side below this many pixels are left out.
        splits: (VOC split, ImageFolder split) pairs.
    Returns:
        ``out``.
    """
    out = Path(out)
    roots = [Path(d).resolve() for d in voc_dirs]
    settings = {"maker": "make_crop_folder", "version": DATASET_VERSION, "sources": [r.name for r in roots],
                "max_side": max_side, "min_side": min_side, "splits": [list(s) for s in splits]}
    if _reuse_or_refuse(out, settings):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts: dict[str, int] = {}
        for root in roots:
            for voc_split, folder_split in splits:
                ds = VOCDataset(root, voc_split)
                for rec in ds.records:
                    image = load_image(rec)
                    for k, (box, label, difficult) in enumerate(zip(rec.boxes, rec.labels, rec.difficult)):
                        x1, y1 = int(math.floor(box[0])), int(math.floor(box[1]))
                        x2, y2 = int(math.ceil(box[2])), int(math.ceil(box[3]))
                        if difficult or min(x2 - x1, y2 - y1) < min_side:
                            continue
                        crop = image[y1:y2, x1:x2]
                        f = max_side / max(crop.shape[:2])
                        if f < 1:
                            size = (max(1, round(crop.shape[1] * f)), max(1, round(crop.shape[0] * f)))
                            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
                        name = ds.classes[int(label)]
                        _save(crop, tmp / folder_split / name / f"{root.name}_{rec.image_id}_{k}.jpg")
                        key = f"{folder_split}/{name}"
                        counts[key] = counts.get(key, 0) + 1
        log.info("crops: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        settings_out = dict(settings)
        return _finish(tmp, out, settings_out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_scale_folder(out: str | os.PathLike, train_per_class: int = 40, test_per_class: int = 20, height: int = 160,
                      object_range: tuple[float, float] = (36.0, 144.0), aspect_range: tuple[float, float] = (0.75, 1.5),
                      seed: int = 0) -> Path:
    """The synthetic ImageFolder whose object sizes vary by ``object_range`` (4x by default).

    Args:
        out: folder to write (``train/`` and ``test/``, four class folders each).
        train_per_class, test_per_class: images per class and split.
        height: image height; the width is ``height`` times an aspect drawn log-uniformly from
            ``aspect_range``.
        object_range: the object's longer side, log-uniform (36..144 px: 4x).
        seed: the one seed of everything.
    """
    out = Path(out)
    settings = {"maker": "make_scale_folder", "version": DATASET_VERSION, "train_per_class": train_per_class,
                "test_per_class": test_per_class, "height": height, "object_range": list(object_range),
                "aspect_range": list(aspect_range), "seed": seed}
    if object_range[1] > height or object_range[0] <= 0 or object_range[0] > object_range[1]:
        raise DatasetError(f"object sizes {object_range} must be positive, increasing and fit the height {height}")
    if _reuse_or_refuse(out, settings):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    rng = np.random.default_rng(seed)
    lo, hi = (math.log(v) for v in object_range)
    alo, ahi = (math.log(v) for v in aspect_range)
    try:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            for name in SYNTHETIC_CLASSES:
                for i in range(n):
                    width = int(round(height * math.exp(rng.uniform(alo, ahi))))
                    img = render_object_image(rng, width, height, name, math.exp(rng.uniform(lo, hi)))
                    _save(img, tmp / split / name / f"{name}_{i:04d}.jpg")
        return _finish(tmp, out, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
