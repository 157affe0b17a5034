"""COCO-style metrics (AP@[.5:.95], AP50, AP75, ...) through pycocotools' ``COCOeval``.

Ground truth and detections become COCO JSON structures:

* images: ``id`` = record index + 1 (COCO ids start at 1: pycocotools uses 0 for "unmatched"),
  ``file_name`` = the image id, ``width``, ``height``;
* categories: ``id`` = class index + 1, ``name`` = class name;
* boxes: ``bbox = [x1, y1, x2 - x1, y2 - y1]`` from internal boxes (0-based continuous, which is
  COCO's convention too, so pycocotools' IoU equals our IoU and the devkit's);
* VOC *difficult* objects become ``iscrowd: 1``. pycocotools ignores a ground truth only through
  ``iscrowd`` (it overwrites any ``ignore`` field with it), so this is the one way to make it
  neither reward nor punish detections of difficult objects. Unlike the devkit, a crowd region
  is matched with intersection-over-detection-area and may absorb several detections.

pycocotools prints its progress and summary; the prints are captured and the summary logged.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.records import ImageRecord
from ..errors import DetectionError
from .detections import ClassDetections, IdIndex, class_list, eval_records

__all__ = ["COCO_STATS", "coco_ground_truth", "coco_detections", "evaluate_coco"]

log = logging.getLogger(__name__)

#: Names of ``COCOeval.stats`` for bounding boxes, in order.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_ground_truth(records: Sequence[ImageRecord], classes: Sequence[str]) -> dict[str, Any]:
    """The split's ground truth as a COCO dataset dict (``images``, ``annotations``,
    ``categories``). Flipped records are left out; difficult objects get ``iscrowd: 1``."""
    records = eval_records(records)
    images, annotations = [], []
    for i, r in enumerate(records):
        images.append({"id": i + 1, "file_name": r.image_id, "width": int(r.width), "height": int(r.height)})
        boxes = np.asarray(r.boxes, np.float64).reshape(-1, 4)
        for box, label, diff in zip(boxes.tolist(), np.asarray(r.labels).tolist(), np.asarray(r.difficult).tolist()):
            if not 0 <= label < len(classes):
                continue
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(bool(diff))})
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(records: Sequence[ImageRecord], classes: Sequence[str],
                    detections: Sequence[ClassDetections] | Mapping[str, ClassDetections]) -> list[dict[str, Any]]:
    """Detections as a COCO results list (``image_id``, ``category_id``, ``bbox``, ``score``),
    with the image and category ids of :func:`coco_ground_truth`."""
    records = eval_records(records)
    index = IdIndex([r.image_id for r in records])
    out: list[dict[str, Any]] = []
    for c, (name, d) in enumerate(zip(classes, class_list(classes, detections))):
        img = index(d.image_ids, f"detections of class {name!r}") + 1
        b = d.boxes
        xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
        out.extend({"image_id": i, "category_id": c + 1, "bbox": box, "score": s}
                   for i, box, s in zip(img.tolist(), xywh.tolist(), d.scores.tolist()))
    return out


def evaluate_coco(records: Sequence[ImageRecord], classes: Sequence[str],
                  detections: Sequence[ClassDetections] | Mapping[str, ClassDetections]) -> dict[str, float]:
    """pycocotools ``COCOeval`` (bbox) of the detections.

    Args:
        records: the split's image records.
        classes: class names in label order.
        detections: per class, as for :func:`detection.evaluation.devkit.evaluate_detections`.
    Returns:
        {name: value} for :data:`COCO_STATS` (AP@[.5:.95], AP50, AP75, small/medium/large, AR at
        1/10/100 detections per image and class, ...), fractions in [0, 1]; NaN where COCOeval
        has nothing to measure (it reports -1, e.g. no ground truth of that size); all 0 when
        there are no detections at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict = coco_ground_truth(records, classes)
    dets = coco_detections(records, classes, detections)
    if not dets:
        # loadRes cannot take an empty list; nothing detected means every AP/AR is 0.
        log.warning("COCO evaluation: no detections, every AP/AR is 0")
        return {k: 0.0 for k in COCO_STATS}
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            gt = COCO()
            gt.dataset = gt_dict
            gt.createIndex()
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    except Exception as e:  # pycocotools raises bare AssertionErrors on inconsistent input
        raise DetectionError(f"COCO evaluation failed: {e!r}") from e
    summary = "\n".join(line for line in captured.getvalue().splitlines() if "Average" in line)
    log.info("COCOeval summary:\n%s", summary)
    return {k: (float(v) if v >= 0 else math.nan) for k, v in zip(COCO_STATS, ev.stats)}
