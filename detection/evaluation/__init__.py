"""Evaluation: detections per class (:mod:`.detections`), the PASCAL VOC devkit protocol (its
matching and AP, :mod:`.devkit`; its result files, :mod:`.result_files`; a ``reset / process /
evaluate`` evaluator, :mod:`.evaluator`), COCO-style metrics through pycocotools (:mod:`.coco`;
COCO and the VOC modules never import each other), precision/recall plots (:mod:`.plots`) and
how well calibrated probabilities match how often detections are right (:mod:`.reliability`).
The one detection loop over a split is :mod:`.inference`; scoring a split end to end, a model's
detections included, is :mod:`.split` (both need the detector, so this ``__init__`` does not
import them)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .coco import evaluate_coco
from .detections import ClassDetections, detections_by_class, eval_records
from .devkit import METRICS, ClassEvaluation, evaluate_class, evaluate_class_flat, evaluate_detections, voc_ap
from .evaluator import VOCEvaluator
from .result_files import (DEFAULT_PREFIX, default_metric, read_result_dir, read_result_file, result_file_name,
                           write_result_files)

__all__ = ["METRICS", "ClassDetections", "ClassEvaluation", "VOCEvaluator", "default_metric", "detections_by_class",
           "evaluate_class", "evaluate_class_flat", "evaluate_coco", "evaluate_detections", "evaluate_result_dir",
           "read_result_dir", "read_result_file", "result_file_name", "voc_ap", "write_result_files"]


def evaluate_result_dir(dataset: Any, results_dir: str | Path, metric: str | None = None, iou_threshold: float = 0.5,
                        coco: bool = False, prefix: str = DEFAULT_PREFIX, progress: bool = False) -> dict[str, Any]:
    """Score a folder of devkit result files against a dataset split (read once for both metrics).

    Args:
        dataset: a :class:`detection.data.voc.VOCDataset` (anything with ``root``, ``split``,
            ``classes`` and ``records``).
        results_dir: folder with ``comp4_det_<split>_<class>.txt`` files.
        metric: "voc07", "voc10" or None (:func:`default_metric` of the dataset root).
        iou_threshold: IoU a match must exceed.
        coco: also run pycocotools' COCOeval (adds ``metrics["coco"]``).
        prefix: result file-name prefix.
        progress: show a tqdm bar while reading.
    Returns:
        the dict of :func:`evaluate_detections` plus ``split`` (and ``coco``).
    """
    metric = metric or default_metric(dataset.root)
    records = eval_records(dataset.records)
    dets = read_result_dir(results_dir, dataset.split, dataset.classes, [r.image_id for r in records], prefix, progress)
    metrics = evaluate_detections(records, dataset.classes, dets, metric, iou_threshold)
    metrics["split"] = dataset.split
    if coco:
        metrics["coco"] = evaluate_coco(records, dataset.classes, dets)
    return metrics
