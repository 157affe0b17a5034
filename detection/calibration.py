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

:mod:`detection.evaluation.reliability` measures the result on a test split (the expected
calibration error and the reliability table).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from .errors import ModelError

__all__ = ["DEFAULT_PROBABILITY_THRESHOLD", "ScoreCalibration"]

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
