"""How well a detector's probabilities (:class:`detection.calibration.ScoreCalibration`) match
how often its detections are right, on a labelled split: each detection labelled right or wrong
(:func:`label_detections`, also what the calibration is fitted on), the reliability table
(:func:`reliability_bins`) and the expected calibration error (:func:`expected_calibration_error`),
together in :func:`calibration_report` (``OUT/calibration.json``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..boxes import box_iou_numpy
from ..calibration import DEFAULT_PROBABILITY_THRESHOLD
from ..errors import DetectionError

__all__ = ["label_detections", "reliability_bins", "expected_calibration_error", "calibration_report"]


def label_detections(boxes: np.ndarray, labels: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                     gt_difficult: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Per detection: 1 if it overlaps an object of its class with IoU >= ``iou``, 0 if not,
    -1 if it overlaps only difficult objects of its class that well (left out of the statistics)."""
    out = np.zeros(len(boxes), dtype=np.int64)
    if not len(boxes) or not len(gt_boxes):
        return out
    overlap = box_iou_numpy(np.asarray(boxes, np.float64), np.asarray(gt_boxes, np.float64)) >= iou
    same = np.asarray(labels)[:, None] == np.asarray(gt_labels)[None, :]
    hit = overlap & same
    easy = hit & ~np.asarray(gt_difficult, bool)[None, :]
    out[hit.any(1)] = -1
    out[easy.any(1)] = 1
    return out


def reliability_bins(probabilities: np.ndarray, correct: np.ndarray, num_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width probability bins: per non-empty bin its range, count, mean probability and
    fraction correct (a reliability diagram as a table)."""
    p = np.asarray(probabilities, np.float64).reshape(-1)
    y = np.asarray(correct, np.float64).reshape(-1)
    # Bin b holds [b/n, (b+1)/n); probability 1.0 goes to the last bin.
    which = np.minimum((p * num_bins).astype(np.int64), num_bins - 1)
    rows = []
    for b in range(num_bins):
        m = which == b
        if m.any():
            rows.append({"low": b / num_bins, "high": (b + 1) / num_bins, "count": int(m.sum()),
                         "mean_probability": float(p[m].mean()), "fraction_correct": float(y[m].mean())})
    return rows


def expected_calibration_error(probabilities: np.ndarray, correct: np.ndarray, num_bins: int = 10) -> float:
    """ECE: the count-weighted mean |fraction correct - mean probability| over equal-width bins."""
    rows = reliability_bins(probabilities, correct, num_bins)
    total = sum(r["count"] for r in rows)
    if not total:
        return float("nan")
    return float(sum(r["count"] * abs(r["fraction_correct"] - r["mean_probability"]) for r in rows) / total)


def calibration_report(records: Sequence[Any], detections: Sequence[Any], iou: float = 0.5,
                       num_bins: int = 10, threshold: float = DEFAULT_PROBABILITY_THRESHOLD) -> dict[str, Any]:
    """How well the detections' probabilities match how often they are right, on a labelled split.

    Args:
        records: the images' ground truth (``boxes``, ``labels``, ``difficult``), in the order of
            ``detections``.
        detections: per image, :class:`detection.detector.Detections` with probabilities.
    Returns:
        ``{"ece", "bins" (reliability table), "num_detections", "above_threshold": {"threshold",
        "count", "fraction_correct"}}``; detections on difficult objects only are left out.
    """
    probs, correct = [], []
    for record, dets in zip(records, detections, strict=True):
        if dets.probabilities is None:
            raise DetectionError("calibration_report: the detections have no probabilities (an uncalibrated model)")
        lab = label_detections(dets.boxes, dets.labels, record.boxes, record.labels, record.difficult, iou)
        probs.append(dets.probabilities[lab >= 0])
        correct.append(lab[lab >= 0])
    p = np.concatenate(probs) if probs else np.zeros(0)
    y = np.concatenate(correct) if correct else np.zeros(0)
    above = p >= threshold
    return {"ece": expected_calibration_error(p, y, num_bins), "bins": reliability_bins(p, y, num_bins),
            "num_detections": int(len(p)), "iou": iou,
            "above_threshold": {"threshold": threshold, "count": int(above.sum()),
                                "fraction_correct": float(y[above].mean()) if above.any() else float("nan")}}
