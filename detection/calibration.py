"""Calibrated scores: each class's SVM score mapped to the probability that the window is an object.

SVM margins are not probabilities: on the embedded default's test images correct detections
score -0.19, -0.46 and -0.93 (the SVMs push training negatives below -1 and positives above +1,
and held-out windows score lower), so no fixed score threshold shows "the objects the detector
found". Platt scaling (Platt, 1999) fits ``p = sigmoid(a * score + b)`` per class, ``a > 0``,
so the map is monotonic and the ranking (and AP, computed on raw scores) is unchanged.

The fit needs scores the SVMs did not train on. As scikit-learn's
``CalibratedClassifierCV(ensemble=False)`` does, the training images are split into folds
(an image and its mirror always in the same fold); SVMs trained on the other folds score each
fold's windows, and the final SVMs are the ones trained on every image. The windows scored are
the ones a user would see: each held-out image's proposals, scored, kept above the detector's
score threshold and reduced by per-class NMS at its IoU. A window is positive for class ``c``
when it overlaps an object of ``c`` with IoU >= 0.5 (the VOC criterion without the duplicate
rule); windows on *difficult* objects only are left out, as the evaluation ignores them. The
logistic regression is scikit-learn's (L2, C = 1, intercept unpenalised).

:func:`expected_calibration_error` and :func:`reliability_bins` measure the result on a test split.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from .boxes import box_iou_numpy
from .errors import DetectionError, ModelError

__all__ = ["DEFAULT_PROBABILITY_THRESHOLD", "ScoreCalibration", "label_detections", "expected_calibration_error",
           "reliability_bins", "calibration_report"]

#: Probability drawn by the demo and the report: more likely an object than not.
DEFAULT_PROBABILITY_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreCalibration:
    """Per-class Platt scaling: ``probability = sigmoid(slopes[c] * score + intercepts[c])``.

    Attributes:
        slopes: float64 array[K], every one > 0 (monotonic).
        intercepts: float64 array[K].
        meta: JSON-able record of the fit (windows and positives per class, folds, fallbacks).
    """

    slopes: np.ndarray
    intercepts: np.ndarray
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        a = np.asarray(self.slopes, dtype=np.float64).reshape(-1)
        b = np.asarray(self.intercepts, dtype=np.float64).reshape(-1)
        if a.shape != b.shape or not len(a):
            raise ModelError(f"calibration: {a.size} slopes and {b.size} intercepts")
        if not (np.isfinite(a).all() and np.isfinite(b).all() and (a > 0).all()):
            raise ModelError("calibration: slopes must be finite and > 0 and intercepts finite")
        object.__setattr__(self, "slopes", a)
        object.__setattr__(self, "intercepts", b)

    @property
    def num_classes(self) -> int:
        return len(self.slopes)

    def probabilities(self, scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None
                      ) -> np.ndarray | torch.Tensor:
        """Probabilities of raw SVM scores: ``scores`` [N, K], or [M] with the class ``labels`` [M]."""
        if isinstance(scores, torch.Tensor):
            a = torch.as_tensor(self.slopes, dtype=torch.float64, device=scores.device)
            b = torch.as_tensor(self.intercepts, dtype=torch.float64, device=scores.device)
            if labels is not None:
                a, b = a[labels], b[labels]
            return torch.sigmoid(scores.double() * a + b).float()
        s = np.asarray(scores, dtype=np.float64)
        a, b = (self.slopes, self.intercepts) if labels is None else (self.slopes[labels], self.intercepts[labels])
        return (0.5 * (1.0 + np.tanh(0.5 * (s * a + b)))).astype(np.float32)   # a sigmoid without overflow

    def to_meta(self) -> dict[str, Any]:
        return {"method": "platt", "slopes": self.slopes.tolist(), "intercepts": self.intercepts.tolist(), **self.meta}

    @classmethod
    def from_meta(cls, meta: Any, num_classes: int) -> "ScoreCalibration":
        """Inverse of :meth:`to_meta` (untrusted input: every field checked).

        Raises:
            ModelError: not a mapping, another method, lists of the wrong length or type.
        """
        if not isinstance(meta, dict) or meta.get("method") != "platt":
            raise ModelError("calibration: expected a mapping with method 'platt'")
        lists = [meta.get("slopes"), meta.get("intercepts")]
        if not all(isinstance(v, list) and len(v) == num_classes
                   and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) for v in lists):
            raise ModelError(f"calibration: slopes and intercepts must be {num_classes} numbers each")
        rest = {k: v for k, v in meta.items() if k not in ("method", "slopes", "intercepts")}
        return cls(np.array(lists[0], np.float64), np.array(lists[1], np.float64), rest)


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
