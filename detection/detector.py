"""The detector: image (+ proposals) -> per-class scored boxes. The public API.

    from detection.detector import SPPDetector
    detector = SPPDetector.from_file("model.pt")
    dets = detector.detect(image)            # uint8 RGB [H, W, 3]; proposals computed if not given
    dets.boxes, dets.labels, dets.scores     # internal boxes, 0-based class indices, SVM scores

Steps (the paper, section 4.1; docs/spp.md): conv maps at the model's scales (SPP-net) or warped crops
(R-CNN), pooled window features, fc6/fc7, SVM scores of every class, per-class box regression,
per-class NMS at IoU 0.3 (``torchvision.ops.batched_nms``), at most 100 detections per class
(:func:`class_boxes` and :func:`postprocess`, which the score calibration is fitted through too).

Its settings are :mod:`detection.settings`; reading and writing the model file,
:mod:`detection.model_file`; the loop over a dataset, :mod:`detection.evaluation.inference`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from .backbones import Backbone
from .calibration import ScoreCalibration
from .errors import ModelError
from .features.featurizer import WindowFeaturizer, layer_features, make_featurizer
from .heads import FCHead
from .linear import BoxRegressors, LinearSVMs
from .model_file import read_detector, save_detector
from .proposals import selective_search
from .settings import DETECTION_ONLY_SETTINGS, DetectionSettings, DetectorSettings, check_settings
from .timer import NO_TIMER, Timer

# The settings live in detection.settings; they are named here too, beside the detector they set up.
__all__ = ["DetectionSettings", "DetectorSettings", "DETECTION_ONLY_SETTINGS", "Detections", "SPPDetector",
           "check_settings", "class_boxes", "postprocess", "vote_boxes"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Detections:
    """Detections of one image: boxes float32 [M, 4] (internal convention), scores float32 [M]
    (raw SVM scores: AP ranks these), labels int64 [M] (0-based class indices), probabilities
    float32 [M] (calibrated, :mod:`detection.calibration`; None for a model without calibration)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    probabilities: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


class SPPDetector:
    """Backbone + fc head + linear SVMs + box regressors, with the settings they were trained with.

    Args:
        backbone: conv trunk (its weights are part of the model).
        head: fc6/fc7 (unused when the SVMs read pool5 features).
        svms: one linear SVM per class on ``settings.feature_layer`` features.
        regressors: per-class box regressors on pool5 features, or None.
        classes: class names, in label order.
        settings: see :class:`DetectorSettings`.
        device: where to run.
        calibration: maps each class's SVM score to a probability (None: scores only).
    """

    def __init__(self, backbone: Backbone, head: FCHead, svms: LinearSVMs, regressors: BoxRegressors | None,
                 classes: Sequence[str], settings: DetectorSettings = DetectorSettings(),
                 device: str | torch.device = "cpu", meta: dict[str, Any] | None = None,
                 calibration: ScoreCalibration | None = None) -> None:
        if svms.num_classes != len(classes):
            raise ModelError(f"{svms.num_classes} SVMs for {len(classes)} classes")
        if calibration is not None and calibration.num_classes != len(classes):
            raise ModelError(f"a score calibration of {calibration.num_classes} classes for {len(classes)} classes")
        self.calibration = calibration
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.head = head.to(self.device).eval()
        self.svms = svms
        self.regressors = regressors
        self.classes = tuple(classes)
        self.settings = settings
        self.meta = dict(meta or {})

    # ---- model file ---------------------------------------------------------------------------

    def save(self, path: str | Path, extra_meta: dict[str, Any] | None = None) -> None:
        """Write the one model file (:mod:`detection.model_file`, :mod:`detection.model`)."""
        save_detector(path, self.backbone, self.head, self.svms, self.regressors, self.classes, self.settings,
                      {**self.meta, **(extra_meta or {})}, self.calibration)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "SPPDetector":
        """Load a model file written by :meth:`save` (``weights_only`` loading, no pickles; every
        field validated, :func:`detection.model_file.read_detector`)."""
        p = read_detector(path)
        return cls(p.backbone, p.head, p.svms, p.regressors, p.classes, p.settings, device, p.meta, p.calibration)

    # ---- features -------------------------------------------------------------------------------

    @property
    def featurizer(self) -> WindowFeaturizer:
        """Window features as this detector's settings make them (built on each use, so that
        replaced settings take effect)."""
        return make_featurizer(self.settings.method, self.settings, backbone=self.backbone, device=self.device)

    @torch.inference_mode()
    def pool5_features(self, image: np.ndarray, boxes: np.ndarray, timer: Timer = NO_TIMER) -> torch.Tensor:
        """Pooled (pool5 / SPP) features Tensor[N, D] of internal boxes in image pixels.

        ``timer`` (see :mod:`detection.timer`) bills the trunk to stage "conv" and the window
        pooling (SPP-net) or warping and pooling (R-CNN) to "pool".
        """
        return self.featurizer.pool5(image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), timer=timer)

    @torch.inference_mode()
    def score_windows(self, pool5: torch.Tensor) -> torch.Tensor:
        """SVM scores Tensor[N, K] of pooled window features."""
        return self.svms.scores(self.head.features(pool5, self.settings.feature_layer))

    # ---- detection ------------------------------------------------------------------------------

    def proposals(self, image: np.ndarray) -> np.ndarray:
        return selective_search(image, self.settings.proposals)

    @torch.inference_mode()
    def detect(self, image: np.ndarray, proposals: np.ndarray | None = None, timer: Timer = NO_TIMER) -> Detections:
        """Detect objects in one image.

        Args:
            image: uint8 RGB array[H, W, 3].
            proposals: float array[N, 4] internal boxes; selective search runs when None.
            timer: receives the stages "conv", "pool", "fc", "svm" (scores, box regression,
                clipping) and "nms" (:class:`detection.timer.StageTimer` for the timing
                comparison); proposals computed here are not timed.
        Returns:
            Detections after per-class NMS, at most ``max_per_class`` per class.
        """
        if proposals is None:
            proposals = self.proposals(image)
        proposals = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
        h, w = image.shape[:2]
        if len(proposals) == 0:
            return _empty(self.calibration is not None)
        pool5 = self.pool5_features(image, proposals, timer)
        features = layer_features(pool5, self.head, self.settings.feature_layer, timer)
        with timer.stage("svm"):
            scores = self.svms.scores(features)
            per_class = class_boxes(proposals, pool5, self.regressors, (h, w), scores.shape[1])
        with timer.stage("nms"):
            boxes, kept_scores, labels = postprocess(per_class, scores, self.settings)
            dets = Detections(boxes.cpu().numpy().astype(np.float32), kept_scores.cpu().numpy().astype(np.float32),
                              labels.cpu().numpy().astype(np.int64))
            if self.calibration is not None:
                dets.probabilities = self.calibration.probabilities(dets.scores, dets.labels)
            return dets


def class_boxes(proposals: np.ndarray, pool5: torch.Tensor | None, regressors: BoxRegressors | None,
                image_size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """Each window's box for each class, Tensor[N, K, 4] on ``pool5``'s device (the CPU without
    it): the proposals float[N, 4] moved by each class's box regressor on the windows' raw pool5
    features Tensor[N, D] (no regressors: as they are, and ``pool5`` may be None), clipped to the
    image ``(height, width)``."""
    device = pool5.device if pool5 is not None else torch.device("cpu")
    if regressors is not None:
        refined = regressors.apply(pool5.cpu().numpy(), proposals)     # [N, K, 4]
        per_class = torch.as_tensor(refined, dtype=torch.float32, device=device)
    else:
        per_class = torch.as_tensor(np.asarray(proposals, np.float32), device=device)[:, None, :]
        per_class = per_class.expand(-1, num_classes, -1)
    return clip_boxes_to_image(per_class.reshape(-1, 4), image_size).reshape(-1, num_classes, 4)


def postprocess(per_class_boxes: torch.Tensor, scores: torch.Tensor, settings: DetectionSettings
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The detector's post-processing, the one implementation (detection and the score
    calibration's fit use it): windows scoring above ``score_threshold``, boxes of zero area
    dropped, per-class NMS at ``nms_iou`` (``torchvision.ops.batched_nms``), box voting when
    ``box_vote_iou`` is set (:func:`vote_boxes`), at most ``max_per_class`` per class.

    Args:
        per_class_boxes: Tensor[N, K, 4], each window's box for each class (:func:`class_boxes`).
        scores: Tensor[N, K] SVM scores.
    Returns:
        (boxes Tensor[M, 4], scores Tensor[M], labels int64 Tensor[M]) sorted by score.
    """
    s = settings
    n, k = scores.shape
    labels = torch.arange(k, device=scores.device).expand(n, k)
    keep = scores > s.score_threshold
    boxes, flat_scores, flat_labels = per_class_boxes[keep], scores[keep], labels[keep]
    # Windows that collapsed to zero area after clipping cannot be detections.
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, flat_scores, flat_labels = boxes[ok], flat_scores[ok], flat_labels[ok]
    order = batched_nms(boxes, flat_scores, flat_labels, s.nms_iou)  # sorted by score
    kept = boxes[order]
    if s.box_vote_iou is not None:
        kept = vote_boxes(kept, flat_labels[order], boxes, flat_scores, flat_labels, s.box_vote_iou)
    boxes, flat_scores, flat_labels = kept, flat_scores[order], flat_labels[order]
    # Cap per class: rank of each detection within its class (input is score-sorted).
    by_class = torch.argsort(flat_labels, stable=True)
    counts = torch.bincount(flat_labels, minlength=k)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(by_class)
    rank[by_class] = torch.arange(len(by_class), device=by_class.device) - starts[flat_labels[by_class]]
    cap = rank < s.max_per_class
    return boxes[cap], flat_scores[cap], flat_labels[cap]


def vote_boxes(kept_boxes: torch.Tensor, kept_labels: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
               labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Box voting: each kept box Tensor[M, 4] (of class ``kept_labels``) replaced by the mean of the
    windows ``boxes`` Tensor[P, 4] of its class that overlap it by IoU >= ``iou``, weighted by
    their ``scores`` clipped at 0 (the SVM margin: windows on the negative side do not vote). A box
    whose voters all score <= 0 is kept as it is. The windows are those NMS chose from, so each kept
    box votes for itself."""
    voted = kept_boxes.clone()
    weights = scores.clamp(min=0)
    for c in torch.unique(kept_labels).tolist():   # one class at a time bounds the IoU matrix
        mine, theirs = kept_labels == c, labels == c
        w = (box_iou(kept_boxes[mine], boxes[theirs]) >= iou) * weights[theirs][None, :]   # [Mc, Pc]
        total = w.sum(dim=1, keepdim=True)
        mean = (w @ boxes[theirs]) / total.clamp(min=torch.finfo(total.dtype).tiny)
        voted[mine] = torch.where(total > 0, mean, kept_boxes[mine])
    return voted


def _empty(calibrated: bool) -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                      np.zeros(0, np.float32) if calibrated else None)


