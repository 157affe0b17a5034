"""Classification metrics: top-1 / top-5 accuracy (single-label), per-class AP and mAP over the
images ranked by score (multi-label, the paper's VOC 2007 classification, with the devkit's AP
of :func:`detection.evaluation.devkit.voc_ap`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..evaluation.devkit import voc_ap
from .data import ClassificationSet

__all__ = ["topk_accuracy", "image_ap", "classification_metrics"]


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` highest scores (ties: lower index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((order == labels[:, None]).any(axis=1).mean())


def image_ap(scores: np.ndarray, targets: np.ndarray, metric: str = "voc07") -> float:
    """AP of one class over images: ``targets`` 1 (positive), 0 (negative), -1 (ignored).
    NaN without positives."""
    keep = targets >= 0
    s, t = scores[keep], targets[keep]
    npos = int((t == 1).sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(t[order] == 1)
    fp = np.cumsum(t[order] == 0)
    return voc_ap(tp / npos, tp / np.maximum(tp + fp, 1), metric)


def classification_metrics(scores: np.ndarray, data: ClassificationSet) -> dict[str, Any]:
    """Metrics of scores array[N, K] on ``data``: ``top1`` (and ``top5`` when K >= 5) and
    per-class accuracy, or per-class ``ap`` and ``map``."""
    n, k = scores.shape
    if n != len(data.samples) or k != len(data.classes):
        raise ValueError(f"scores of shape {scores.shape} for {len(data.samples)} images of {len(data.classes)} classes")
    out: dict[str, Any] = {"images": n, "classes": list(data.classes)}
    if data.multilabel:
        targets = np.stack([s.targets for s in data.samples])
        ap = {c: image_ap(scores[:, j], targets[:, j]) for j, c in enumerate(data.classes)}
        out["ap"] = ap
        valid = [v for v in ap.values() if not np.isnan(v)]
        out["map"] = float(np.mean(valid)) if valid else float("nan")
        return out
    labels = np.array([s.label for s in data.samples])
    out["top1"] = topk_accuracy(scores, labels, 1)
    if k >= 5:
        out["top5"] = topk_accuracy(scores, labels, 5)
    pred = scores.argmax(1)
    out["class_accuracy"] = {c: float((pred[labels == j] == j).mean()) if (labels == j).any() else float("nan")
                             for j, c in enumerate(data.classes)}
    return out
