"""The detector: image (+ proposals) -> per-class scored boxes. The public API.

    from detection.detector import SPPDetector
    detector = SPPDetector.from_file("model.pt")
    dets = detector.detect(image)            # uint8 RGB [H, W, 3]; proposals computed if not given
    dets.boxes, dets.labels, dets.scores     # internal boxes, 0-based class indices, SVM scores

Steps (sppnet-reference.md, section 9): conv maps at the model's scales (SPP-net) or warped crops
(R-CNN), pooled window features, fc6/fc7, SVM scores of every class, per-class box regression,
per-class NMS at IoU 0.3 (``torchvision.ops.batched_nms``), at most 100 detections per class.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, clip_boxes_to_image
from tqdm.auto import tqdm

from . import comm
from .backbones import Backbone, build_backbone
from .calibration import ScoreCalibration
from .config import from_dict
from .data.records import ImageRecord
from .data.images import load_image
from .errors import DetectionError, ModelError
from .features.featurizer import METHODS, FeatureSettings, WindowFeaturizer, layer_features, make_featurizer
from .features.pooling import PROJECTION_RULES
from .features.scales import SCALE_RULES
from .heads import FEATURE_LAYERS, FCHead
from .linear import BoxRegressors, LinearSVMs
from .model import check_class_names, load_model, prefixed, save_model, unprefixed
from .proposals import SelectiveSearchConfig, compute_proposals, selective_search
from .timer import NO_TIMER, Timer

__all__ = ["DetectorSettings", "Detections", "SPPDetector", "iter_detections", "detect_records", "detect_dataset", "check_settings"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DetectorSettings(FeatureSettings):
    """How the detector turns an image into window features (the :class:`FeatureSettings` it
    extends, stored flat in the model file) and detections."""

    method: str = "spp"                       # "spp" or "rcnn" (crop and warp every window)
    feature_layer: str = "fc7"                # SVM input: "pool5", "fc6" or "fc7"
    nms_iou: float = 0.3                      # per-class NMS threshold of the paper's code
    max_per_class: int = 100                  # detections kept per class per image
    score_threshold: float = -1.5             # the code drops windows scoring below -1.5
    # Selective search when no proposals are given: every setting of the training windows.
    proposals: SelectiveSearchConfig = SelectiveSearchConfig()


# Settings that act only when detecting (never in training): changing them needs no retraining.
DETECTION_ONLY_SETTINGS = ("nms_iou", "max_per_class", "score_threshold")


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
        """Write the one model file (see :mod:`detection.model`)."""
        tensors = {**prefixed("trunk", self.backbone.trunk.state_dict()),
                   **prefixed("head", self.head.state_dict()),
                   **prefixed("svm", self.svms.tensors())}
        if self.regressors is not None:
            tensors.update(prefixed("bbox", self.regressors.tensors()))
        meta = {**self.meta, **(extra_meta or {}),
                "classes": list(self.classes),
                "settings": _plain(dataclasses.asdict(self.settings)),
                "backbone": {"name": self.backbone.name, "weights_id": self.backbone.weights_id},
                "head": {"in_dim": self.head.in_dim, "hidden": list(self.head.hidden),
                         "svd_ranks": dict(self.head.svd_ranks)},
                "svm": self.svms.to_meta(),
                "bbox": self.regressors.to_meta() if self.regressors is not None else None,
                "calibration": self.calibration.to_meta() if self.calibration is not None else None}
        save_model(path, tensors, meta)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "SPPDetector":
        """Load a model file written by :meth:`save` (``weights_only`` loading, no pickles)."""
        tensors, meta = load_model(path)
        try:
            if not isinstance(meta.get("settings"), dict):
                raise TypeError("no settings mapping")
            # Fix (tests/test_fuzz.py): type-check the settings (a list where ints belong made
            # detect() fail later with a traceback).
            settings = from_dict(DetectorSettings, _upgraded_settings(meta["settings"]), "settings")
            classes = check_class_names(meta["classes"])
            backbone = build_backbone(meta["backbone"]["name"], weights=None)
            backbone.trunk.load_state_dict(unprefixed("trunk", tensors), strict=True)
            backbone.weights_id = meta["backbone"]["weights_id"]
            # Fix (tests/test_fuzz.py): build the head on the meta device and take the file's
            # tensors (shape-checked by load_state_dict): sizes in the metadata (in_dim, hidden,
            # SVD ranks) never allocate memory, so a hostile file cannot ask for terabytes.
            with torch.device("meta"):
                head = FCHead(int(meta["head"]["in_dim"]), tuple(meta["head"]["hidden"]), num_classes=None,
                              dropout=0.0)
                for name, rank in (meta["head"].get("svd_ranks") or {}).items():
                    head.factorize(name, int(rank))     # the saved SVD-truncated layers' shapes
            head_state = {k: v.float() for k, v in unprefixed("head", tensors).items() if not k.startswith("fc8.")}
            head.load_state_dict(head_state, strict=True, assign=True)
            svms = LinearSVMs.from_state(unprefixed("svm", tensors), meta["svm"])
            regressors = (BoxRegressors.from_state(unprefixed("bbox", tensors), meta["bbox"])
                          if meta.get("bbox") else None)
            _check_consistent(backbone, head, svms, regressors, settings)
            untrained = svms.meta.get("untrained", [])
            if not isinstance(untrained, list) or not set(untrained) <= set(classes):
                raise ValueError(f"svm.untrained must list class names, got {str(untrained)[:80]!r}")
            # Model files from before calibration have none: their detections carry scores only.
            calibration = (ScoreCalibration.from_meta(meta["calibration"], len(classes))
                           if meta.get("calibration") is not None else None)
            detector = cls(backbone, head, svms, regressors, classes, settings, device, meta, calibration)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError, DetectionError) as e:
            if isinstance(e, ModelError) and str(path) in str(e):
                raise
            reason = " ".join(str(e).split())[:300]   # torch's state-dict errors span lines
            raise ModelError(f"model file {path} does not describe a detector: {reason}") from None
        return detector

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
            k = scores.shape[1]
            if self.regressors is not None:
                refined = self.regressors.apply(pool5.cpu().numpy(), proposals)     # [N, K, 4]
                per_class = torch.as_tensor(refined, dtype=torch.float32, device=self.device)
            else:
                per_class = torch.as_tensor(proposals, device=self.device)[:, None, :].expand(-1, k, -1)
            per_class = clip_boxes_to_image(per_class.reshape(-1, 4), (h, w)).reshape(-1, k, 4)
        with timer.stage("nms"):
            return self._postprocess(per_class, scores)

    def _postprocess(self, per_class_boxes: torch.Tensor, scores: torch.Tensor) -> Detections:
        s = self.settings
        n, k = scores.shape
        labels = torch.arange(k, device=scores.device).expand(n, k)
        keep = scores > s.score_threshold
        boxes, flat_scores, flat_labels = per_class_boxes[keep], scores[keep], labels[keep]
        # Windows that collapsed to zero area after clipping cannot be detections.
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, flat_scores, flat_labels = boxes[ok], flat_scores[ok], flat_labels[ok]
        order = batched_nms(boxes, flat_scores, flat_labels, s.nms_iou)  # sorted by score
        boxes, flat_scores, flat_labels = boxes[order], flat_scores[order], flat_labels[order]
        # Cap per class: rank of each detection within its class (input is score-sorted).
        by_class = torch.argsort(flat_labels, stable=True)
        counts = torch.bincount(flat_labels, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(by_class)
        rank[by_class] = torch.arange(len(by_class), device=by_class.device) - starts[flat_labels[by_class]]
        cap = rank < s.max_per_class
        dets = Detections(boxes[cap].cpu().numpy().astype(np.float32),
                          flat_scores[cap].cpu().numpy().astype(np.float32),
                          flat_labels[cap].cpu().numpy().astype(np.int64))
        if self.calibration is not None:
            dets.probabilities = self.calibration.probabilities(dets.scores, dets.labels)
        return dets


def _check_consistent(backbone: Backbone, head: FCHead, svms: LinearSVMs, regressors: BoxRegressors | None,
                      s: DetectorSettings) -> None:
    """Raise ValueError unless the parts of a loaded model fit each other and its settings."""
    check_settings(s)
    pool5 = backbone.out_channels * sum(n * n for n in s.levels)
    dims = {"pool5": pool5, "fc6": head.hidden[0], "fc7": head.hidden[1]}
    if head.in_dim != pool5 or svms.dim != dims[s.feature_layer] or (regressors is not None and regressors.dim != pool5):
        raise ValueError(f"dimensions do not fit: pool5 {pool5} (trunk x levels), fc input {head.in_dim}, "
                         f"SVMs on {s.feature_layer} {svms.dim}"
                         + (f", box regressors {regressors.dim}" if regressors is not None else ""))


#: Bounds on the settings a model file may carry. The settings size allocations at detection
#: time (an image resized to ``max(scales)``, up to ``max_size`` px; ``proposals.max_boxes`` windows;
#: ``rcnn_batch_size`` warped crops), so a hostile file could ask for terabytes: each bound is
#: several times what SPP-net uses (scales <= 1200, max_size 2000, 2000 proposals, 6x6 pyramid).
SETTINGS_LIMITS = {"scales": (1, 4000), "num_scales": (1, 16), "max_size": (1, 8000), "levels": (1, 32),
                   "num_levels": (1, 8), "max_per_class": (0, 100_000), "proposals.max_boxes": (1, 100_000),
                   "proposals.resize_to": (16, 8000), "proposals.sigma": (0.0, 100.0), "rcnn_batch_size": (1, 4096)}


def check_settings(s: DetectorSettings) -> None:
    """ValueError naming the first setting that is unknown (a method, rule or layer), outside
    :data:`SETTINGS_LIMITS` or not a finite number."""
    if s.method not in METHODS or s.feature_layer not in FEATURE_LAYERS:
        raise ValueError(f"unknown method {s.method!r} or feature layer {s.feature_layer!r}")
    if s.projection_rule not in PROJECTION_RULES or s.scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown projection rule {s.projection_rule!r} (paper, code) or scale rule "
                         f"{s.scale_rule!r} (area, code)")
    if not (s.scales and s.levels and min(s.scales) > 0 and min(s.levels) > 0 and s.max_size > 0):
        raise ValueError(f"scales {s.scales}, levels {s.levels} and max_size {s.max_size} must be positive")
    values = {"scales": max(s.scales), "num_scales": len(s.scales), "max_size": s.max_size, "levels": max(s.levels),
              "num_levels": len(s.levels), "max_per_class": s.max_per_class,
              "proposals.max_boxes": s.proposals.max_boxes, "rcnn_batch_size": s.rcnn_batch_size,
              # None segments at the image's own size, which MAX_IMAGE_PIXELS bounds.
              "proposals.resize_to": s.proposals.resize_to or 16,
              "proposals.sigma": s.proposals.sigma}     # OpenCV sizes its smoothing kernel by it
    for name, value in values.items():
        lo, hi = SETTINGS_LIMITS[name]
        if not lo <= value <= hi:
            raise ValueError(f"setting {name} = {value} is outside [{lo}, {hi}] (detection.detector.SETTINGS_LIMITS)")
    if not (0.0 <= s.nms_iou <= 1.0 and math.isfinite(s.score_threshold)):
        raise ValueError(f"nms_iou {s.nms_iou} must be in [0, 1] and score_threshold {s.score_threshold} finite")


#: Settings of model files written before ``DetectorSettings.proposals`` held every selective-search
#: setting, and their new homes; the other settings of such a file are the defaults it was used with.
_OLD_PROPOSAL_SETTINGS = {"proposal_mode": "mode", "max_proposals": "max_boxes"}


def _upgraded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A model file's settings with the old proposal settings moved into ``proposals``."""
    old = {key: settings[key] for key in _OLD_PROPOSAL_SETTINGS if key in settings}
    if not old:
        return settings
    if "proposals" in settings:
        raise ValueError(f"settings {', '.join(old)} (older model files) and proposals cannot both be given")
    rest = {k: v for k, v in settings.items() if k not in _OLD_PROPOSAL_SETTINGS}
    return {**rest, "proposals": {_OLD_PROPOSAL_SETTINGS[k]: v for k, v in old.items()}}


def _empty(calibrated: bool) -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                      np.zeros(0, np.float32) if calibrated else None)


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def iter_detections(detector: SPPDetector, records: Sequence[ImageRecord],
                    proposals_fn: Callable[[ImageRecord], np.ndarray] | None = None,
                    progress: bool = False) -> Iterator[tuple[ImageRecord, np.ndarray, Detections]]:
    """The one detection loop over images of a split (the detect stage, ``eval_voc.py --model``,
    the report): each original image (flipped records are skipped) decoded once and detected with
    its proposals from ``proposals_fn`` (selective search with the model's settings when None).

    Yields:
        (record, uint8 RGB image, detections) in record order.
    """
    kept = [r for r in records if not r.flipped]
    for record in tqdm(kept, desc="detect", unit="img", disable=not progress):
        image = load_image(record)
        yield record, image, detector.detect(image, proposals_fn(record) if proposals_fn is not None else None)


def detect_records(detector: SPPDetector, records: Sequence[ImageRecord],
                   proposals_fn: Callable[[ImageRecord], np.ndarray] | None = None,
                   progress: bool = False) -> list[Detections] | None:
    """Detections of every original record (flipped ones skipped), in record order, through
    :func:`iter_detections`. Under ``torchrun`` each rank detects a contiguous share of the
    images and rank 0 receives them all.

    Returns:
        the detections on rank 0 (the only process without a launcher); None on the other ranks.
    """
    kept = [r for r in records if not r.flipped]
    mine = [dets for _, _, dets in iter_detections(detector, comm.shard(kept), proposals_fn, progress)]
    parts = comm.gather(mine, "detection: gathering every rank's detections on rank 0")
    return None if parts is None else [dets for part in parts for dets in part]


def detect_dataset(model: str | Path | SPPDetector, dataset: Any, proposals_dir: str | Path | None = None,
                   device: str | torch.device = "cpu", progress: bool = True) -> list[Detections] | None:
    """Detections of every record of ``dataset`` (original images only), in record order
    (:func:`detect_records`: sharded under ``torchrun``, None on ranks other than 0).

    Proposals come from the selective-search cache in ``proposals_dir`` (computed and cached
    there when missing, with the model's settings), or are computed per image when it is None.
    """
    detector = model if isinstance(model, SPPDetector) else SPPDetector.from_file(model, device=device)
    if tuple(dataset.classes) != detector.classes:
        raise ModelError(f"the model was trained for classes {list(detector.classes)}, the dataset "
                         f"{dataset.root} has {list(dataset.classes)}")
    proposals_fn = None
    if proposals_dir is not None:
        props = compute_proposals(dataset, proposals_dir, detector.settings.proposals, progress=progress)
        proposals_fn = props.proposals_for_record
    return detect_records(detector, dataset.records, proposals_fn, progress)
