"""Fitting the score calibration of :mod:`detection.calibration` at training time: cross-fitted
Platt scaling (see that module's docstring for the method). The held-out windows go through the
detector's own post-processing (:func:`detection.detector.postprocess`, after the box regression
and clipping of :func:`detection.detector.class_boxes`), so the fit sees the detections a user
gets; its settings (the pipeline's ``test.*``) therefore key the train stage."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ..calibration import ScoreCalibration
from ..detector import DetectionSettings, postprocess
from ..evaluation.reliability import label_detections
from ..errors import DetectionError
from ..linear import LinearSVMs
from .hard_negatives import train_svms
from .samples import FeatureSource, ImageSample, Ranks
from .svm import SVMConfig

__all__ = ["CalibrationConfig", "assign_folds", "fit_platt", "fit_calibration", "window_samples", "FoldSource",
           "BoxesFn"]

#: boxes_fn(image index, its sample) -> Tensor[P, K, 4]: each proposal's box for each class as the
#: detector makes it (:func:`detection.detector.class_boxes`: box regression, clipping).
BoxesFn = Callable[[int, ImageSample], torch.Tensor]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """How the SVM scores are calibrated at training time."""

    #: Fit the calibration (costs one more SVM training, on (folds-1)/folds of the images, per fold).
    enabled: bool = True
    #: Cross-fitting folds over the training images (>= 2).
    folds: int = 2
    #: A window is a positive of class c at this IoU with an object of c (VOC's 0.5).
    iou: float = 0.5
    #: L2 regularisation of the logistic regression (scikit-learn's C): guards the slope when a
    #: class's held-out scores separate perfectly.
    C: float = 1.0

    def validate(self) -> None:
        if self.folds < 2:
            raise DetectionError(f"calibration: folds must be >= 2, got {self.folds}")
        if not 0.0 < self.iou <= 1.0:
            raise DetectionError(f"calibration: iou must be in (0, 1], got {self.iou}")
        if not (math.isfinite(self.C) and self.C > 0):
            raise DetectionError(f"calibration: C must be a positive number, got {self.C}")


def fit_platt(scores: np.ndarray, labels: np.ndarray, C: float = 1.0) -> tuple[float, float] | None:
    """``(slope, intercept)`` of a logistic regression of ``labels`` (0/1) on ``scores``, or None
    when it cannot give a monotonic map (one label value only, or a slope <= 0)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1, 1)
    labels = np.asarray(labels).astype(bool).reshape(-1)
    if labels.all() or not labels.any():
        return None
    model = LogisticRegression(C=C).fit(scores, labels)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if not (slope > 0 and math.isfinite(slope) and math.isfinite(intercept)):
        return None
    return slope, intercept


class FoldSource:
    """The images ``indices`` of a :class:`detection.training.samples.FeatureSource`, as a source of their own."""

    def __init__(self, source: FeatureSource, indices: Sequence[int]) -> None:
        self.source = source
        self.indices = list(indices)
        self.dim = source.dim

    def num_images(self) -> int:
        return len(self.indices)

    def image(self, index: int, *, with_proposals: bool = True) -> ImageSample:
        return self.source.image(self.indices[index], with_proposals=with_proposals)


def window_samples(sample: ImageSample, scores: np.ndarray, settings: DetectionSettings, iou: float,
                   skip: Sequence[int] = (), per_class_boxes: torch.Tensor | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, (scores, 0/1 labels) of the detections the detector keeps from one image's
    proposals: :func:`detection.detector.postprocess` with ``settings`` on ``scores`` [P, K]
    and ``per_class_boxes`` Tensor[P, K, 4] (None: every class's box is the proposal), each
    labelled against the image's objects (:func:`label_detections`, difficult-only hits left out);
    classes in ``skip`` empty."""
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float32).clone()
    k = scores.shape[1]
    if per_class_boxes is None:
        per_class_boxes = torch.as_tensor(sample.boxes, dtype=torch.float32)[:, None, :].expand(-1, k, -1)
    scores[:, list(skip)] = -torch.inf            # no detection of a class without an SVM
    boxes, kept, labels = (t.cpu().numpy() for t in postprocess(per_class_boxes.float().cpu(), scores, settings))
    lab = label_detections(boxes, labels, sample.gt_boxes, sample.gt_labels, sample.gt_difficult, iou)
    return [(kept[(labels == c) & (lab >= 0)].astype(np.float64), lab[(labels == c) & (lab >= 0)]) for c in range(k)]


def assign_folds(groups: Sequence[str], folds: int) -> np.ndarray:
    """Fold index per image: the distinct groups in sorted order dealt round-robin, so every
    image of a group is in one fold and the folds differ in size by at most one group."""
    order = {g: i % folds for i, g in enumerate(sorted(set(groups)))}
    return np.array([order[g] for g in groups], dtype=np.int64)


def fit_calibration(source: FeatureSource, groups: Sequence[str], num_classes: int, svm_cfg: SVMConfig,
                    cfg: CalibrationConfig, feature_scale: float, *, settings: DetectionSettings,
                    boxes_fn: BoxesFn | None = None, class_names: Sequence[str] | None = None,
                    progress: bool = False, ranks: Ranks = Ranks()) -> ScoreCalibration | None:
    """Cross-fitted Platt scaling of SVMs trained on ``source`` (see the module docstring).

    Args:
        source: the SVMs' training features (the same layer the detector scores).
        groups: per image of ``source``, a group name (the image id): a group stays in one fold,
            so an image and its mirror never score each other.
        feature_scale: the final SVMs' feature scale (the fold SVMs use the same).
        settings: the detector's post-processing settings, so the windows are the ones it keeps.
        boxes_fn: each held-out proposal's box per class as the detector makes it (the final box
            regressors, clipping); None: the proposals as they are.
        ranks: the processes sharing the work (default: this one alone): the fold SVMs' reading
            and each fold's held-out images are shared out; every rank gets the calibration.
    Returns:
        the calibration; a class whose held-out windows cannot be fitted (no positive or no
        negative, or a slope <= 0) takes the fit of every class's windows pooled, listed in
        ``meta["pooled"]``. None, with a warning, when there are fewer images than folds or no
        held-out window can be fitted at all (the model then gives scores only).
    """
    cfg.validate()
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    unique = sorted(set(groups))
    if len(unique) < cfg.folds:
        log.warning("calibration skipped: %d training images for %d folds; the model gives scores only",
                    len(unique), cfg.folds)
        return None
    fold = assign_folds(groups, cfg.folds)
    per_class: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in range(num_classes)]
    for f in range(cfg.folds):
        train_idx = np.flatnonzero(fold != f)
        held_idx = np.flatnonzero(fold == f)
        log.info("calibration fold %d/%d: SVMs on %d images, scoring %d", f + 1, cfg.folds, len(train_idx), len(held_idx))
        fold_cfg = dataclasses.replace(svm_cfg, classes_without_positives="warn")
        svms: LinearSVMs = train_svms(FoldSource(source, train_idx), num_classes, fold_cfg, class_names=names,
                                      feature_scale=feature_scale, progress=progress, ranks=ranks)
        skip = [names.index(n) for n in svms.meta.get("untrained", [])]
        start, stop = ranks.bounds(len(held_idx))

        def score_share() -> list[list[tuple[np.ndarray, np.ndarray]]]:
            out = []
            for i in held_idx[start:stop]:
                sample = source.image(int(i))
                if not len(sample.boxes):
                    continue
                scores = np.asarray(svms.scores(sample.features), dtype=np.float64)
                boxes = boxes_fn(int(i), sample) if boxes_fn is not None else None
                out.append(window_samples(sample, scores, settings, cfg.iou, skip, boxes))
            return out
        # Each rank scores its share of the held-out images; put together in image order.
        for part in ranks.exchange(score_share, "calibration: gathering the held-out windows"):
            for image in part:
                for c, (s, y) in enumerate(image):
                    per_class[c][0].append(s)
                    per_class[c][1].append(y)
    scores = [np.concatenate(s) if s else np.zeros(0) for s, _ in per_class]
    labels = [np.concatenate(y) if y else np.zeros(0, np.int64) for _, y in per_class]
    pooled = fit_platt(np.concatenate(scores), np.concatenate(labels), cfg.C)
    if pooled is None:
        log.warning("calibration skipped: no held-out window can be fitted (no positive, no negative, or scores "
                    "that do not rise with the labels); the model gives scores only")
        return None
    slopes, intercepts, fallback = [], [], []
    for c in range(num_classes):
        fit = fit_platt(scores[c], labels[c], cfg.C)
        if fit is None:
            fallback.append(names[c])
            fit = pooled
        slopes.append(fit[0])
        intercepts.append(fit[1])
    if fallback:
        log.warning("calibration: %d class(es) fitted with every class's windows pooled (too few held-out "
                    "positives or negatives): %s", len(fallback), ", ".join(fallback))
    meta = {"folds": cfg.folds, "iou": cfg.iou, "C": cfg.C, "pooled": fallback,
            "detection_settings": dataclasses.asdict(settings.detection_settings()),
            "windows": {names[c]: int(len(labels[c])) for c in range(num_classes)},
            "positives": {names[c]: int(labels[c].sum()) for c in range(num_classes)}}
    return ScoreCalibration(np.array(slopes), np.array(intercepts), meta)


