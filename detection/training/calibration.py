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
from ..evaluation.devkit import evaluate_class
from ..evaluation.reliability import label_detections
from ..errors import DetectionError
from ..linear import LinearSVMs
from .hard_negatives import train_svms
from .samples import FeatureSource, ImageSample, Ranks
from .svm import SVMConfig

__all__ = ["CalibrationConfig", "assign_folds", "fit_platt", "fit_calibration", "window_samples", "kept_detections",
           "labelled_windows", "held_out_map", "FoldSource", "BoxesFn"]

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
    #: NMS thresholds to choose from on the held-out folds: the one whose detections of the
    #: held-out images score the best mAP (VOC07, IoU 0.5; ties: the lowest) becomes the model's
    #: ``nms_iou`` in place of ``test.nms_iou``, and the probabilities are fitted at it. Empty:
    #: ``test.nms_iou`` as written. Costs no SVM training beyond the calibration's own.
    nms_choices: tuple[float, ...] = ()

    def validate(self) -> None:
        if self.folds < 2:
            raise DetectionError(f"calibration: folds must be >= 2, got {self.folds}")
        if not 0.0 < self.iou <= 1.0:
            raise DetectionError(f"calibration: iou must be in (0, 1], got {self.iou}")
        if not (math.isfinite(self.C) and self.C > 0):
            raise DetectionError(f"calibration: C must be a positive number, got {self.C}")
        if not all(isinstance(t, (int, float)) and 0.0 < t <= 1.0 for t in self.nms_choices) \
                or len(set(self.nms_choices)) != len(self.nms_choices):
            raise DetectionError(f"calibration: nms_choices must be distinct IoU thresholds in (0, 1], "
                                 f"got {list(self.nms_choices)}")


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


def kept_detections(sample: ImageSample, scores: np.ndarray, settings: DetectionSettings, skip: Sequence[int] = (),
                    per_class_boxes: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, scores, labels) the detector keeps from one image's proposals:
    :func:`detection.detector.postprocess` with ``settings`` on ``scores`` [P, K] and
    ``per_class_boxes`` Tensor[P, K, 4] (None: every class's box is the proposal); no detection
    of the classes in ``skip``."""
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float32).clone()
    k = scores.shape[1]
    if per_class_boxes is None:
        per_class_boxes = torch.as_tensor(sample.boxes, dtype=torch.float32)[:, None, :].expand(-1, k, -1)
    scores[:, list(skip)] = -torch.inf            # no detection of a class without an SVM
    boxes, kept, labels = (t.cpu().numpy() for t in postprocess(per_class_boxes.float().cpu(), scores, settings))
    return boxes, kept, labels


def window_samples(sample: ImageSample, scores: np.ndarray, settings: DetectionSettings, iou: float,
                   skip: Sequence[int] = (), per_class_boxes: torch.Tensor | None = None
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, (scores, 0/1 labels) of the detections the detector keeps from one image's
    proposals (:func:`kept_detections`), each labelled against the image's objects
    (:func:`labelled_windows`); classes in ``skip`` empty."""
    truth = (sample.gt_boxes, sample.gt_labels, sample.gt_difficult)
    kept = kept_detections(sample, scores, settings, skip, per_class_boxes)
    return labelled_windows(*truth, kept, np.asarray(scores).shape[1], iou)


def labelled_windows(gt_boxes: np.ndarray, gt_labels: np.ndarray, gt_difficult: np.ndarray | None,
                     kept: tuple[np.ndarray, np.ndarray, np.ndarray], num_classes: int, iou: float
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, (scores, 0/1 labels) of one image's kept detections ``(boxes, scores, labels)``
    against its objects (:func:`label_detections`, difficult-only hits left out)."""
    boxes, scores, labels = kept
    lab = label_detections(boxes, labels, gt_boxes, gt_labels, gt_difficult, iou)
    return [(scores[(labels == c) & (lab >= 0)].astype(np.float64), lab[(labels == c) & (lab >= 0)])
            for c in range(num_classes)]


def held_out_map(images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                        tuple[np.ndarray, np.ndarray, np.ndarray]]], num_classes: int) -> float:
    """VOC07 mAP (IoU 0.5, devkit matching: a second detection of an object is a false positive)
    of held-out images, each ``(gt_boxes, gt_labels, gt_difficult, (boxes, scores, labels))``:
    its objects (``gt_difficult`` None: none is difficult) and the detections kept from it, over
    the classes with a non-difficult object among them (NaN when none has)."""
    truth = [(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(labels),
              np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool))
             for boxes, labels, difficult, _ in images]
    aps = []
    for c in range(num_classes):
        gt_boxes = [boxes[labels == c] for boxes, labels, _ in truth]
        gt_difficult = [difficult[labels == c] for _, labels, difficult in truth]
        if not sum(int((~d).sum()) for d in gt_difficult):
            continue
        dets = [(d[0][d[2] == c], d[1][d[2] == c]) for _, _, _, d in images]
        det_image = np.repeat(np.arange(len(dets)), [len(s) for _, s in dets])
        det_scores = np.concatenate([s for _, s in dets] + [np.zeros(0)])
        det_boxes = np.concatenate([b.reshape(-1, 4) for b, _ in dets] + [np.zeros((0, 4))])
        aps.append(evaluate_class(gt_boxes, gt_difficult, det_image, det_scores, det_boxes, 0.5, "voc07").ap)
    return float(np.mean(aps)) if aps else float("nan")


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
    # One post-processing per NMS candidate (just test.nms_iou without candidates); the held-out
    # detections of each are kept until the best is known.
    choices = tuple(cfg.nms_choices) or (settings.nms_iou,)
    per_choice = {t: dataclasses.replace(settings, nms_iou=t) for t in choices}
    held_out: dict[float, list] = {t: [] for t in choices}
    for f in range(cfg.folds):
        train_idx = np.flatnonzero(fold != f)
        held_idx = np.flatnonzero(fold == f)
        log.info("calibration fold %d/%d: SVMs on %d images, scoring %d", f + 1, cfg.folds, len(train_idx), len(held_idx))
        fold_cfg = dataclasses.replace(svm_cfg, classes_without_positives="warn")
        svms: LinearSVMs = train_svms(FoldSource(source, train_idx), num_classes, fold_cfg, class_names=names,
                                      feature_scale=feature_scale, progress=progress, ranks=ranks)
        skip = [names.index(n) for n in svms.meta.get("untrained", [])]
        start, stop = ranks.bounds(len(held_idx))

        def score_share() -> list[tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None], dict]]:
            out = []
            for i in held_idx[start:stop]:
                sample = source.image(int(i))
                if not len(sample.boxes):
                    continue
                scores = np.asarray(svms.scores(sample.features), dtype=np.float64)
                boxes = boxes_fn(int(i), sample) if boxes_fn is not None else None
                # Only the objects and the kept detections travel between ranks: no features.
                out.append(((sample.gt_boxes, sample.gt_labels, sample.gt_difficult),
                            {t: kept_detections(sample, scores, s, skip, boxes) for t, s in per_choice.items()}))
            return out
        # Each rank scores its share of the held-out images; put together in image order.
        for part in ranks.exchange(score_share, "calibration: gathering the held-out windows"):
            for truth, by_choice in part:
                for t, kept in by_choice.items():
                    held_out[t].append((*truth, kept))
    nms = None
    if cfg.nms_choices:
        maps = {t: held_out_map(held_out[t], num_classes) for t in choices}
        finite = {t: m for t, m in maps.items() if math.isfinite(m)}
        # No held-out object of any class: no choice (and no calibration: no positive window).
        chosen = max(sorted(finite), key=lambda t: finite[t]) if finite else None
        log.info("NMS threshold chosen on the held-out folds: %s (held-out mAP %s)", chosen,
                 ", ".join(f"{t}: {m:.4f}" for t, m in maps.items()))
        nms = {"choices": list(choices), "chosen": chosen,
               "held_out_map": {str(t): round(m, 6) if math.isfinite(m) else None for t, m in maps.items()}}
    pick = nms["chosen"] if nms is not None and nms["chosen"] is not None else choices[0]
    settings = per_choice[pick]
    # The probabilities are fitted on the windows kept at the threshold the detector will use.
    per_class: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in range(num_classes)]
    for gt_boxes, gt_labels, gt_difficult, kept in held_out[pick]:
        for c, (s, y) in enumerate(labelled_windows(gt_boxes, gt_labels, gt_difficult, kept, num_classes, cfg.iou)):
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
    meta = {"folds": cfg.folds, "iou": cfg.iou, "C": cfg.C, "pooled": fallback, **({"nms": nms} if nms else {}),
            "detection_settings": dataclasses.asdict(settings.detection_settings()),
            "windows": {names[c]: int(len(labels[c])) for c in range(num_classes)},
            "positives": {names[c]: int(labels[c].sum()) for c in range(num_classes)}}
    return ScoreCalibration(np.array(slopes), np.array(intercepts), meta)


