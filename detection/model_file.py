"""A detector's parts to and from the one model file (:mod:`detection.model` holds the file's
container format): the metadata each part writes, and the reading of an untrusted file, every field
validated (settings type-checked and bounded, class names, tensor shapes, dimensions that fit each
other), with older files' settings upgraded (:func:`detection.settings.upgraded_settings`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from .backbones import Backbone, build_backbone
from .calibration import ScoreCalibration
from .config import from_dict
from .errors import DetectionError, ModelError
from .heads import FCHead
from .linear import BoxRegressors, LinearSVMs
from .features.pooling import pool5_dim
from .model import check_class_names, load_model, prefixed, save_model, unprefixed
from .settings import DetectorSettings, check_settings, upgraded_settings

__all__ = ["DetectorParts", "read_detector", "save_detector"]


@dataclasses.dataclass
class DetectorParts:
    """What a model file describes (the arguments of :class:`detection.detector.SPPDetector`)."""

    backbone: Backbone
    head: FCHead
    svms: LinearSVMs
    regressors: BoxRegressors | None
    classes: tuple[str, ...]
    settings: DetectorSettings
    meta: dict[str, Any]
    calibration: ScoreCalibration | None


def save_detector(path: str | Path, backbone: Backbone, head: FCHead, svms: LinearSVMs,
                  regressors: BoxRegressors | None, classes: Sequence[str], settings: DetectorSettings,
                  meta: dict[str, Any], calibration: ScoreCalibration | None) -> None:
    """Write a detector's parts as the one model file (atomically); ``meta``: extra JSON-able
    metadata (the training config, the dataset)."""
    tensors = {**prefixed("trunk", backbone.trunk.state_dict()),
               **prefixed("head", head.state_dict()),
               **prefixed("svm", svms.tensors())}
    if regressors is not None:
        tensors.update(prefixed("bbox", regressors.tensors()))
    meta = {**meta,
            "classes": list(classes),
            "settings": _plain(dataclasses.asdict(settings)),
            "backbone": {"name": backbone.name, "weights_id": backbone.weights_id},
            "head": {"in_dim": head.in_dim, "hidden": list(head.hidden), "svd_ranks": dict(head.svd_ranks)},
            "svm": svms.to_meta(),
            "bbox": regressors.to_meta() if regressors is not None else None,
            "calibration": calibration.to_meta() if calibration is not None else None}
    save_model(path, tensors, meta)


def read_detector(path: str | Path) -> DetectorParts:
    """The parts of the model file ``path`` (``weights_only`` loading, no pickles).

    Raises:
        ModelError: naming the file and the first field that is missing, malformed, out of
            bounds or does not fit the others.
    """
    tensors, meta = load_model(path)
    try:
        if not isinstance(meta.get("settings"), dict):
            raise TypeError("no settings mapping")
        # Type-checked: a list where ints belong would make detect() fail later with a traceback.
        settings = from_dict(DetectorSettings, upgraded_settings(meta["settings"]), "settings")
        classes = check_class_names(meta["classes"])
        backbone = build_backbone(meta["backbone"]["name"], weights=None)
        backbone.trunk.load_state_dict(unprefixed("trunk", tensors), strict=True)
        backbone.weights_id = meta["backbone"]["weights_id"]
        # The head is built on the meta device and takes the file's tensors (shape-checked by
        # load_state_dict): sizes in the metadata (in_dim, hidden, SVD ranks) never allocate
        # memory, so a hostile file cannot ask for terabytes.
        with torch.device("meta"):
            head = FCHead(int(meta["head"]["in_dim"]), tuple(meta["head"]["hidden"]), num_classes=None, dropout=0.0)
            for name, rank in (meta["head"].get("svd_ranks") or {}).items():
                head.factorize(name, int(rank))     # the saved SVD-truncated layers' shapes
        head_state = {k: v.float() for k, v in unprefixed("head", tensors).items() if not k.startswith("fc8.")}
        head.load_state_dict(head_state, strict=True, assign=True)
        svms = LinearSVMs.from_state(unprefixed("svm", tensors), meta["svm"])
        regressors = (BoxRegressors.from_state(unprefixed("bbox", tensors), meta["bbox"]) if meta.get("bbox") else None)
        _check_consistent(backbone, head, svms, regressors, settings)
        untrained = svms.meta.get("untrained", [])
        if not isinstance(untrained, list) or not set(untrained) <= set(classes):
            raise ValueError(f"svm.untrained must list class names, got {str(untrained)[:80]!r}")
        # Model files from before calibration have none: their detections carry scores only.
        calibration = (ScoreCalibration.from_meta(meta["calibration"], len(classes))
                       if meta.get("calibration") is not None else None)
        if len(classes) != svms.num_classes:
            raise ValueError(f"{svms.num_classes} SVMs for {len(classes)} classes")
        if calibration is not None and calibration.num_classes != len(classes):
            raise ValueError(f"a score calibration of {calibration.num_classes} classes for {len(classes)} classes")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError, DetectionError) as e:
        if isinstance(e, ModelError) and str(path) in str(e):
            raise
        reason = " ".join(str(e).split())[:300]   # torch's state-dict errors span lines
        raise ModelError(f"model file {path} does not describe a detector: {reason}") from None
    return DetectorParts(backbone, head, svms, regressors, classes, settings, meta, calibration)


def _check_consistent(backbone: Backbone, head: FCHead, svms: LinearSVMs, regressors: BoxRegressors | None,
                      s: DetectorSettings) -> None:
    """Raise ValueError unless the parts of a loaded model fit each other and its settings."""
    check_settings(s)
    pool5 = pool5_dim(backbone.out_channels, s.levels)
    dims = {"pool5": pool5, "fc6": head.hidden[0], "fc7": head.hidden[1]}
    if head.in_dim != pool5 or svms.dim != dims[s.feature_layer] or (regressors is not None and regressors.dim != pool5):
        raise ValueError(f"dimensions do not fit: pool5 {pool5} (trunk x levels), fc input {head.in_dim}, "
                         f"SVMs on {s.feature_layer} {svms.dim}"
                         + (f", box regressors {regressors.dim}" if regressors is not None else ""))


def _plain(v: Any) -> Any:
    """Tuples as lists, nested: the settings as JSON writes them."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


