"""Detections of a split, per class, and the bookkeeping every evaluator shares (which records
are evaluated, image id -> record index). The VOC and COCO evaluators both build on this module
and never import each other."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.records import ImageRecord
from ..errors import DatasetError, DetectionError

__all__ = ["ClassDetections", "detections_by_class", "eval_records", "class_list", "IdIndex"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Detections of one class over a split
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ClassDetections:
    """Every detection of one class over a split.

    Attributes:
        image_ids: str array[D], the image id (``ImageRecord.image_id``) of each detection.
        scores: float64 array[D].
        boxes: float64 array[D, 4], internal convention (0-based continuous x1, y1, x2, y2).
    """

    image_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.image_ids, dtype=np.str_).reshape(-1)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if not (len(ids) == len(scores) == len(boxes)):
            raise ValueError(f"ClassDetections: {len(ids)} image ids, {len(scores)} scores, {len(boxes)} boxes")
        object.__setattr__(self, "image_ids", ids)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "boxes", boxes)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "ClassDetections":
        return cls(np.zeros(0, np.str_), np.zeros(0), np.zeros((0, 4)))


def detections_by_class(image_ids: Sequence[str], per_image: Sequence[Any], num_classes: int) -> list[ClassDetections]:
    """Per-image detector outputs -> one :class:`ClassDetections` per class.

    Args:
        image_ids: the image id of each entry of ``per_image``.
        per_image: objects with ``boxes`` [K, 4] (internal), ``scores`` [K] and ``labels`` [K]
            (0-based class indices), e.g. :class:`detection.detector.Detections`.
        num_classes: number of classes (labels must be in ``[0, num_classes)``).
    Returns:
        list of ``num_classes`` ClassDetections, detections in image order.
    """
    if len(image_ids) != len(per_image):
        raise ValueError(f"{len(image_ids)} image ids for {len(per_image)} detection sets")
    counts = np.array([len(np.asarray(d.scores).reshape(-1)) for d in per_image], dtype=np.int64)
    if counts.sum() == 0:
        return [ClassDetections.empty() for _ in range(num_classes)]
    labels = np.concatenate([np.asarray(d.labels, dtype=np.int64).reshape(-1) for d in per_image])
    scores = np.concatenate([np.asarray(d.scores, dtype=np.float64).reshape(-1) for d in per_image])
    boxes = np.concatenate([np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4) for d in per_image])
    if len(labels) != len(scores) or len(boxes) != len(scores):
        raise ValueError("detections: boxes, scores and labels differ in length")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"detection labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    ids = np.repeat(np.asarray(list(image_ids), dtype=np.str_), counts)
    return [ClassDetections(ids[labels == c], scores[labels == c], boxes[labels == c]) for c in range(num_classes)]


def eval_records(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The records evaluated: the original images (flipped copies are training augmentation and
    share their image id)."""
    out = [r for r in records if not r.flipped]
    if len(out) != len(records):
        log.info("evaluation: ignoring %d flipped records", len(records) - len(out))
    ids = [r.image_id for r in out]
    if len(set(ids)) != len(ids):
        raise DatasetError("evaluation: the split lists an image id more than once")
    return out


def class_list(classes: Sequence[str], detections: Sequence[ClassDetections] | Mapping[str, ClassDetections]
               ) -> list[ClassDetections]:
    """Detections per class in the order of ``classes`` (a mapping may leave classes out)."""
    if isinstance(detections, Mapping):
        unknown = set(detections) - set(classes)
        if unknown:
            raise DetectionError(f"detections for unknown classes: {sorted(unknown)}")
        return [detections.get(c, ClassDetections.empty()) for c in classes]
    if len(detections) != len(classes):
        raise DetectionError(f"{len(detections)} detection sets for {len(classes)} classes")
    return list(detections)


class IdIndex:
    """Image id -> record index for whole arrays at once (a sorted-array search in numpy: a
    Python dict lookup per detection costs ~0.5 s for a VOC2007-sized result set)."""

    def __init__(self, image_ids: Sequence[str]) -> None:
        ids = np.asarray(list(image_ids), dtype=np.str_)
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]

    def __call__(self, ids: np.ndarray, what: str) -> np.ndarray:
        """int64 array[D] of record indices; DetectionError naming the first unknown id."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.int64)
        if len(self._sorted) == 0:
            raise DetectionError(f"{what}: image id {ids[0]!r} is not in the evaluated split")
        pos = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        known = self._sorted[pos] == ids
        if not known.all():
            bad = ids[np.flatnonzero(~known)[0]]
            raise DetectionError(f"{what}: image id {str(bad)!r} is not in the evaluated split")
        return self._order[pos].astype(np.int64)
