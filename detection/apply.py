"""Apply a trained detector to image files: the library call behind ``tools/detect.py`` and
``tools/demo.py``.

:func:`collect_images` turns what a user names (files, folders, glob patterns) into a sorted list
of image files; :func:`detect_images` runs :meth:`SPPDetector.detect` on each, one image in
memory at a time, and writes into the output folder:

* ``detections.json``: a COCO results list, one entry per detection the model outputs (its own
  ``score_threshold`` and ``max_per_class``; drawing thresholds do not filter it):
  ``image_id``, ``category_id`` (class index + 1), ``bbox`` ``[x, y, w, h]`` in pixels of the
  stored image (internal 0-based continuous boxes, which is COCO's convention too), ``score``
  (the raw SVM score, what AP ranks) and ``probability`` (the calibrated probability that the
  box is right; null for a model without calibration). It loads with pycocotools'
  ``COCO.loadRes``.
* ``images.json``: ``images`` (``id``, ``file_name`` as given or found, ``width``, ``height``),
  ``categories`` (``id``, ``name``) and ``skipped`` (``file_name``, ``error``) for the images
  ``skip_bad`` left out. Image ids are positions (from 1) in the collected list, so they do not
  depend on how many processes ran.
* with ``draw``: ``drawn/<stem>_det.png`` per image (``<stem>_<id>_det.png`` where two images
  share a stem), the detections at or above the probability threshold drawn.

Every file is written atomically. Under ``torchrun`` each rank detects a contiguous share of the
images (and draws its own pictures); rank 0 gathers the detections and writes the two JSON files.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from . import comm
from .calibration import DEFAULT_PROBABILITY_THRESHOLD
from .data.images import read_image
from .detector import Detections, SPPDetector
from .errors import DatasetError, DetectionError, StorageError
from .io.files import atomic_path, atomic_write_text, make_dirs
from .io.paths import path_in_folder, safe_file_part
from .runtime import resolve_device
from .visualize import draw_detections, shown_detections

__all__ = ["IMAGE_SUFFIXES", "AppliedImage", "DetectSummary", "collect_images", "detect_images"]

log = logging.getLogger(__name__)

#: File suffixes a folder is searched for (any case); a file named explicitly may have any.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


@dataclasses.dataclass
class AppliedImage:
    """One image detected: its id and path, size, how many detections the model gave and how
    many were drawn (at or above the threshold), and the drawn picture (None without ``draw``)."""

    image_id: int
    path: Path
    width: int
    height: int
    detections: int
    shown: int
    caption: str
    drawn: Path | None


@dataclasses.dataclass
class DetectSummary:
    """What :func:`detect_images` did (rank 0): every image detected, the skipped ones
    ({path: error}) and the two JSON files."""

    images: list[AppliedImage]
    skipped: dict[str, str]
    detections_json: Path
    images_json: Path


def _folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def collect_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files ``paths`` name, in order, each once: a file as it is (whatever its
    suffix), a folder's image files (:data:`IMAGE_SUFFIXES`, not its subfolders; sorted), a glob
    pattern's matches (``**`` recurses; sorted; folders among them expanded as folders).

    Raises:
        DatasetError: a path that does not exist and matches nothing, or a folder without images.
    """
    found: list[Path] = []

    def add(path: Path, named: str) -> None:
        if path.is_dir():
            images = _folder_images(path)
            if not images:
                raise DatasetError(f"folder {path} (from {named!r}) holds no images "
                                   f"({' '.join(IMAGE_SUFFIXES)})")
            found.extend(images)
        else:
            found.append(path)       # a file; a FIFO or a broken link is named by read_image

    for p in paths:
        text = os.fspath(p)
        path = Path(text)
        if os.path.lexists(path):
            add(path, text)
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DatasetError(f"no file matches the pattern {text!r}")
            for m in matches:
                add(Path(m), text)
        else:
            raise DatasetError(f"image {path} does not exist (nor is it a folder or a glob pattern)")
    seen: set[str] = set()
    unique = []
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _drawn_names(images: Sequence[Path]) -> list[str]:
    """``<stem>_det.png`` per image; ``<stem>_<id>_det.png`` where stems repeat (ids from 1)."""
    stems = [safe_file_part(p.stem or "image", "image file name") for p in images]
    repeated = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{s}_{i + 1}_det.png" if s in repeated else f"{s}_det.png" for i, s in enumerate(stems)]


def _write_png(dest: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise StorageError(f"cannot encode {dest} as PNG")
    with atomic_path(dest, ".png") as tmp:
        tmp.write_bytes(data.tobytes())


def _detection_lines(per_image: Sequence[tuple[int, Detections]]) -> Iterator[str]:
    """detections.json in pieces (one line per detection): a large run is never one string."""
    yield "["
    first = True
    for image_id, d in per_image:
        b = np.asarray(d.boxes, np.float64).reshape(-1, 4)
        probs = d.probabilities.tolist() if d.probabilities is not None else [None] * len(d)
        for box, score, label, prob in zip(b.tolist(), d.scores.tolist(), d.labels.tolist(), probs):
            entry = {"image_id": image_id, "category_id": int(label) + 1,
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score,
                     "probability": prob}
            yield ("\n" if first else ",\n") + json.dumps(entry, allow_nan=False)
            first = False
    yield "\n]\n"


def _detect_share(detector: SPPDetector, share: Sequence[tuple[int, Path, str]], drawn_dir: Path | None,
                  skip_bad: bool, threshold: float, score_threshold: float | None, progress: bool
                  ) -> tuple[list[tuple[AppliedImage, Detections]], dict[str, str]]:
    done: list[tuple[AppliedImage, Detections]] = []
    skipped: dict[str, str] = {}
    for image_id, path, drawn_name in tqdm(share, desc="detect", unit="img", disable=not progress):
        try:
            image = read_image(path)
        except DatasetError as e:
            if not skip_bad:
                raise
            log.warning("skipping %s (--skip-bad): %s", path, e)
            skipped[str(path)] = str(e)
            continue
        dets = detector.detect(image)
        keep, values, caption = shown_detections(dets, threshold, score_threshold)
        dest = None
        if drawn_dir is not None:
            dest = path_in_folder(drawn_dir, drawn_name)
            _write_png(dest, draw_detections(image, dets.boxes[keep], dets.labels[keep], values[keep],
                                             detector.classes, -float("inf")))
        h, w = image.shape[:2]
        done.append((AppliedImage(image_id, path, int(w), int(h), len(dets), int(keep.sum()), caption, dest),
                     dets))
    return done, skipped


def detect_images(model: str | os.PathLike | SPPDetector, images: Sequence[str | os.PathLike],
                  out_dir: str | os.PathLike, *, draw: bool = False, skip_bad: bool = False,
                  threshold: float = DEFAULT_PROBABILITY_THRESHOLD, score_threshold: float | None = None,
                  device: str | torch.device = "auto", progress: bool = True) -> DetectSummary | None:
    """Detect objects in image files and write ``detections.json``, ``images.json`` (and drawn
    pictures) into ``out_dir`` (see the module docstring).

    Args:
        model: a model file or a loaded detector.
        images: image files (:func:`collect_images` expands folders and patterns first).
        out_dir: output folder (created).
        draw: write ``drawn/<stem>_det.png`` per image.
        skip_bad: leave out images that cannot be decoded (a warning each, listed in
            ``images.json``); False: the first one stops the run, naming it.
        threshold: draw detections with a calibrated probability at or above this.
        score_threshold: draw by raw SVM score instead (the default, 0, for a model without
            calibration).
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: a progress bar.
    Returns:
        the summary on rank 0 (the only process without a launcher); None on the other ranks.
    Raises:
        DetectionError: a bad threshold, no images, an image that cannot be read (without
            ``skip_bad``), a bad model file.
    """
    if not 0.0 <= threshold <= 1.0:
        raise DetectionError(f"the probability threshold must be in [0, 1], got {threshold}")
    paths = [Path(p) for p in images]
    if not paths:
        raise DetectionError("no images to detect")
    dev = resolve_device(device)
    comm.init_distributed(dev)
    detector = model if isinstance(model, SPPDetector) else SPPDetector.from_file(model, device=dev)
    if detector.calibration is None and score_threshold is None and draw:
        log.warning("%s has no score calibration (trained before calibration existed, or with "
                    "train.calibration.enabled=false): drawing SVM scores >= 0", model)
    out = make_dirs(out_dir)
    drawn_dir = make_dirs(out / "drawn") if draw else None
    jobs = list(zip(range(1, len(paths) + 1), paths, _drawn_names(paths)))
    mine = _detect_share(detector, comm.shard(jobs), drawn_dir, skip_bad, threshold, score_threshold, progress)
    parts = comm.gather(mine, "detection: gathering every rank's detections on rank 0")
    if parts is None:
        return None
    done = [item for part_done, _ in parts for item in part_done]
    skipped = {k: v for _, part_skipped in parts for k, v in part_skipped.items()}
    paths_out = {"detections": out / "detections.json", "images": out / "images.json"}
    with atomic_path(paths_out["detections"], ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        for piece in _detection_lines([(a.image_id, d) for a, d in done]):
            f.write(piece)
    atomic_write_text(paths_out["images"], json.dumps({
        "images": [{"id": a.image_id, "file_name": str(a.path), "width": a.width, "height": a.height}
                   for a, _ in done],
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(detector.classes)],
        "skipped": [{"file_name": k, "error": v} for k, v in skipped.items()]}, indent=1))
    if skipped:
        log.warning("summary: %d image(s) skipped (--skip-bad): %s", len(skipped), " | ".join(skipped))
    return DetectSummary([a for a, _ in done], skipped, paths_out["detections"], paths_out["images"])
