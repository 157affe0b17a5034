"""The classifier: a conv trunk (:mod:`detection.backbones`), the SPP layer (or the no-SPP
baseline's fixed pool5), and fc layers or linear SVMs; and its one file, ``classifier.pt``.

``classifier.pt`` is a :func:`detection.model.save_model` file (tensors + JSON metadata, read with
``weights_only=True``): the whole network's tensors (trunk included, so no weights file is needed
to run it again) and ``meta = {"kind": "classifier", "config": <ClassifierConfig>, "classes":
[...], "multilabel": bool, "weights_id": ...}``. Reading it validates everything: the config key
by key, the class names, every tensor's name, shape and finiteness against the network the
config builds.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone, build_backbone
from ..config import ConfigError
from ..errors import DetectionError, ModelError
from ..features.pooling import SpatialPyramidPooling
from ..model import check_class_names, load_model, save_model
from .config import ClassifierConfig, ModelConfig, as_dict, config_from_dict

__all__ = ["SPPClassifier", "build_classifier", "save_classifier", "load_classifier", "CLASSIFIER_KIND",
           "images_to_batch"]

log = logging.getLogger(__name__)

CLASSIFIER_KIND = "classifier"


class SPPClassifier(nn.Module):
    """trunk -> SPP (or fixed pool5) -> fc layers / linear SVMs.

    Args:
        backbone: a built :class:`~detection.backbones.Backbone`; its own fc6/fc7 (if any) are
            dropped: the classifier's fc layers take their place.
        classes: class names (K).
        multilabel: sigmoid scores per class (VOC image labels) instead of a softmax.
        cfg: the model settings.

    ``forward``: Tensor[N, 3, H, W] normalised images -> Tensor[N, K] scores (logits, or SVM
    scores). With SPP any ``H, W`` whose conv map has at least ``max(levels)`` cells per side
    gives the same length; the baseline accepts only ``fixed_input`` squares.
    """

    def __init__(self, backbone: Backbone, classes: tuple[str, ...], multilabel: bool, cfg: ModelConfig) -> None:
        super().__init__()
        backbone.head, backbone.head_dim = None, None
        self.backbone = backbone
        self.classes = tuple(classes)
        self.multilabel = bool(multilabel)
        self.cfg = cfg
        channels = backbone.out_channels
        finest = max(cfg.levels)
        if cfg.spp:
            self.pool: nn.Module = SpatialPyramidPooling(cfg.levels, "paper")
            self.dim = self.pool.output_size(channels)
            self.fixed_map: tuple[int, int] | None = None
        else:
            ah, aw = backbone.map_size(cfg.fixed_input, cfg.fixed_input)
            if min(ah, aw) < finest:
                raise DetectionError(f"model.fixed_input {cfg.fixed_input} gives a {ah}x{aw} conv map, smaller than the "
                                     f"{finest}x{finest} pool5")
            # Fixed window and stride: the paper's bins for exactly this map, frozen into a layer.
            kernel, stride = (math.ceil(ah / finest), math.ceil(aw / finest)), (ah // finest, aw // finest)
            self.pool = nn.MaxPool2d(kernel, stride)
            oh, ow = (ah - kernel[0]) // stride[0] + 1, (aw - kernel[1]) // stride[1] + 1
            self.dim = channels * oh * ow
            self.fixed_map = (ah, aw)
        k = len(self.classes)
        if cfg.head == "fc":
            layers: list[nn.Module] = []
            width = self.dim
            for h in cfg.hidden:
                layers += [nn.Dropout(cfg.dropout), nn.Linear(width, h), nn.ReLU(inplace=True)]
                width = h
            layers.append(nn.Linear(width, k))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.fc: nn.Module | None = nn.Sequential(*layers)
                # The class layer: the paper's Gaussian init of a new fc8 (std 0.01). The hidden
                # layers keep torch's default (Kaiming-uniform) init: two stacked std-0.01 layers
                # start with gradients too small for SGD to leave the uniform prediction.
                nn.init.normal_(layers[-1].weight, std=0.01)
                nn.init.zeros_(layers[-1].bias)
        else:
            self.fc = None
        self.register_buffer("svm_weight", torch.zeros(k, self.dim) if cfg.head == "svm" else torch.zeros(0))
        self.register_buffer("svm_bias", torch.zeros(k) if cfg.head == "svm" else torch.zeros(0))
        for p in self.backbone.parameters():
            p.requires_grad_(cfg.train_trunk)

    @property
    def min_input_side(self) -> int:
        """Smallest input side whose conv map fits the finest pyramid level."""
        finest = max(self.cfg.levels)
        side = self.backbone.min_input_size
        while min(self.backbone.map_size(side, side)) < finest:
            side += 1
        return side

    def conv_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def pool_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """Conv map Tensor[N, C, H', W'] -> pooled Tensor[N, dim]."""
        if self.fixed_map is not None and tuple(fmap.shape[-2:]) != self.fixed_map:
            raise DetectionError(f"the no-SPP classifier takes only {self.cfg.fixed_input}x{self.cfg.fixed_input} "
                                 f"inputs (a {self.fixed_map[0]}x{self.fixed_map[1]} conv map), got a "
                                 f"{fmap.shape[-2]}x{fmap.shape[-1]} map")
        if self.fixed_map is None and min(fmap.shape[-2:]) < max(self.cfg.levels):
            raise DetectionError(f"input too small for the SPP layer: a {fmap.shape[-2]}x{fmap.shape[-1]} conv map has "
                                 f"fewer cells than the {max(self.cfg.levels)}x{max(self.cfg.levels)} level (inputs "
                                 f"of at least {self.min_input_side} px per side)")
        return self.pool(fmap).flatten(1)

    def scores_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled Tensor[N, dim] -> scores Tensor[N, K]."""
        if self.fc is not None:
            return self.fc(pooled)
        return F.normalize(pooled, dim=1) @ self.svm_weight.t() + self.svm_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores_from_pooled(self.pool_map(self.conv_map(x)))

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores -> what views average: softmax (single-label fc), sigmoid (multi-label fc),
        the raw scores (SVMs)."""
        if self.fc is None:
            return scores
        return torch.sigmoid(scores) if self.multilabel else torch.softmax(scores, dim=1)

    def train(self, mode: bool = True) -> "SPPClassifier":
        super().train(mode)
        if not self.cfg.train_trunk:
            self.backbone.eval()          # a frozen trunk keeps eval-mode layers
        return self


def images_to_batch(backbone: Backbone, images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB arrays of one size -> normalised Tensor[N, 3, H, W] (``Backbone.preprocess``)."""
    return torch.cat([backbone.preprocess(img, 1.0) for img in images])


def build_classifier(cfg: ClassifierConfig, classes: tuple[str, ...], multilabel: bool,
                     weights: str | Path | None = None) -> SPPClassifier:
    """A new classifier: the backbone with ``weights`` (default ``cfg.model.weights``), new heads."""
    m = cfg.model
    backbone = build_backbone(m.backbone, weights=weights if weights is not None else m.weights, seed=m.seed)
    return SPPClassifier(backbone, classes, multilabel, m)


def save_classifier(path: str | Path, model: SPPClassifier, cfg: ClassifierConfig, extra: dict[str, Any] | None = None) -> None:
    """Write ``classifier.pt`` atomically (see the module docstring)."""
    meta = {"kind": CLASSIFIER_KIND, "config": as_dict(cfg), "classes": list(model.classes),
            "multilabel": model.multilabel, "weights_id": model.backbone.weights_id}
    if extra:
        meta["training"] = extra
    save_model(path, model.state_dict(), meta)


def load_classifier(path: str | Path) -> tuple[SPPClassifier, ClassifierConfig, dict[str, Any]]:
    """Read and validate ``classifier.pt`` (untrusted).

    Returns:
        (the classifier in eval mode, its config, its metadata).
    Raises:
        ModelError: not a classifier file, or any field / tensor that does not fit.
    """
    tensors, meta = load_model(path)
    if meta.get("kind") != CLASSIFIER_KIND:
        raise ModelError(f"{path} is not a classifier file (kind {str(meta.get('kind'))[:40]!r}); "
                         "detector models are read by tools/eval_voc.py")
    try:
        cfg = config_from_dict(meta.get("config"))
        classes = check_class_names(meta.get("classes"))
        multilabel = meta.get("multilabel")
        if not isinstance(multilabel, bool):
            raise ValueError("multilabel must be true or false")
    except (ConfigError, ValueError) as e:
        raise ModelError(f"classifier file {path} is damaged: {e}") from None
    try:
        backbone = build_backbone(cfg.model.backbone, weights=None, seed=cfg.model.seed)
        model = SPPClassifier(backbone, classes, multilabel, cfg.model)
    except DetectionError as e:
        raise ModelError(f"classifier file {path}: its config does not build a network: {e}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{shapes[0]} has shape {tuple(tensors[shapes[0]].shape)}, expected {tuple(expected[shapes[0]].shape)}")
        raise ModelError(f"classifier file {path} is damaged: its tensors do not fit its config ({detail})")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"classifier file {path} is damaged: tensor {bad[0]} has non-finite values")
    model.load_state_dict({k: tensors[k].to(expected[k].dtype) for k in expected}, strict=True)
    return model.eval(), cfg, meta
