"""A detectron2-style evaluator of the PASCAL VOC protocol: ``reset / process / evaluate``."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..data.records import ImageRecord
from ..errors import DetectionError
from .detections import ClassDetections, detections_by_class, eval_records
from .devkit import METRICS, evaluate_detections

__all__ = ["VOCEvaluator"]


class VOCEvaluator:
    """Collects per-image detector outputs and evaluates them (``reset / process / evaluate``).

    Args:
        records: the split's image records.
        classes: class names in label order.
        metric: "voc07" or "voc10".
        iou_threshold: IoU a match must exceed.
    """

    def __init__(self, records: Sequence[ImageRecord], classes: Sequence[str], metric: str = "voc07",
                 iou_threshold: float = 0.5) -> None:
        if metric not in METRICS:
            raise DetectionError(f"unknown AP metric {metric!r}: use one of {', '.join(METRICS)}")
        self.records = eval_records(records)
        self.classes = tuple(classes)
        self.metric = metric
        self.iou_threshold = iou_threshold
        self._known = {r.image_id for r in self.records}
        self.reset()

    def reset(self) -> None:
        self._ids: list[str] = []
        self._dets: list[Any] = []

    def process(self, image_id: str, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Add one image's detections: boxes float [K, 4] (internal), scores [K], labels int [K]."""
        if image_id not in self._known:
            raise DetectionError(f"image id {image_id!r} is not in the evaluated split")
        self._ids.append(image_id)
        self._dets.append(_Dets(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64).reshape(-1),
                                np.asarray(labels, np.int64).reshape(-1)))

    def detections(self) -> list[ClassDetections]:
        """Everything processed so far, per class (for :func:`write_result_files`)."""
        return detections_by_class(self._ids, self._dets, len(self.classes))

    def evaluate(self) -> dict[str, Any]:
        """The metrics dict of :func:`evaluate_detections` (unprocessed images have no detections)."""
        return evaluate_detections(self.records, self.classes, self.detections(), self.metric, self.iou_threshold)


@dataclasses.dataclass(frozen=True)
class _Dets:
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
