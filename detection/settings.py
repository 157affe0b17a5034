"""The detector's settings, stored flat in the model file: how an image becomes window features
(:class:`~detection.features.FeatureSettings`), the method and layer the SVMs read, the proposals,
and the post-processing (:class:`DetectionSettings`, the pipeline's ``test.*``); the bounds a
model file's settings must keep (:func:`check_settings`) and the upgrade of older files' settings.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .features.featurizer import METHODS, FeatureSettings
from .features.pooling import PROJECTION_RULES
from .features.scales import SCALE_RULES
from .heads import FEATURE_LAYERS
from .proposals import SelectiveSearchConfig

__all__ = ["DetectionSettings", "DetectorSettings", "DETECTION_ONLY_SETTINGS", "SETTINGS_LIMITS", "check_settings",
           "upgraded_settings"]


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
    """What acts only after the SVMs have scored the windows: the one home of each (the
    pipeline's ``test.*``). Training never reads them, but the score calibration is fitted
    through :func:`postprocess` with them, so they key the train stage when it is fitted."""

    nms_iou: float = 0.3                      # per-class NMS threshold of the paper's code
    max_per_class: int = 100                  # detections kept per class per image
    score_threshold: float = -1.5             # the code drops windows scoring below -1.5
    #: Box voting (Gidaris & Komodakis, 2015; beyond the paper): each detection's box becomes the
    #: mean of its class's windows that overlap it by at least this IoU, weighted by their scores
    #: above 0 (its score is kept). None: off, the detection keeps its window's box (the paper).
    box_vote_iou: float | None = None

    def detection_settings(self) -> DetectionSettings:
        """Only these settings (of a subclass's instance: a detector's)."""
        return DetectionSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DetectionSettings)})


@dataclasses.dataclass(frozen=True)
class DetectorSettings(FeatureSettings, DetectionSettings):
    """Everything the detector needs, stored flat in the model file: how an image becomes window
    features (:class:`FeatureSettings`), which method and layer the SVMs read, the proposals, and
    the post-processing (:class:`DetectionSettings`)."""

    method: str = "spp"                       # "spp" or "rcnn" (crop and warp every window)
    feature_layer: str = "fc7"                # SVM input: "pool5", "fc6" or "fc7"
    # Selective search when no proposals are given: every setting of the training windows.
    proposals: SelectiveSearchConfig = SelectiveSearchConfig()


# Settings that act only when detecting: changing them needs no new SVMs or box regressors.
DETECTION_ONLY_SETTINGS = tuple(f.name for f in dataclasses.fields(DetectionSettings))


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
            raise ValueError(f"setting {name} = {value} is outside [{lo}, {hi}] (detection.settings.SETTINGS_LIMITS)")
    if not (0.0 <= s.nms_iou <= 1.0 and math.isfinite(s.score_threshold)):
        raise ValueError(f"nms_iou {s.nms_iou} must be in [0, 1] and score_threshold {s.score_threshold} finite")
    if s.box_vote_iou is not None and not 0.0 < s.box_vote_iou <= 1.0:
        raise ValueError(f"box_vote_iou {s.box_vote_iou} must be in (0, 1], or None (no box voting)")


#: Settings of model files written before ``DetectorSettings.proposals`` held every selective-search
#: setting, and their new homes; the other settings of such a file are the defaults it was used with.
_OLD_PROPOSAL_SETTINGS = {"proposal_mode": "mode", "max_proposals": "max_boxes"}


def upgraded_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A model file's settings with the old proposal settings moved into ``proposals``."""
    old = {key: settings[key] for key in _OLD_PROPOSAL_SETTINGS if key in settings}
    if not old:
        return settings
    if "proposals" in settings:
        raise ValueError(f"settings {', '.join(old)} (older model files) and proposals cannot both be given")
    rest = {k: v for k, v in settings.items() if k not in _OLD_PROPOSAL_SETTINGS}
    return {**rest, "proposals": {_OLD_PROPOSAL_SETTINGS[k]: v for k, v in old.items()}}
