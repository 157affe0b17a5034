"""The :class:`~detection.training.samples.FeatureSource` of a training split
(:class:`WindowFeatureSource`): the features of each image's ground truth and proposals, from a
pool5 function (a :class:`detection.features.WindowFeaturizer`) and, for fc6/fc7, the head.
The train stage itself is :mod:`detection.training.detector_training`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..data.records import ImageRecord
from ..heads import FCHead
from .samples import ImageSample

__all__ = ["Pool5Fn", "WindowFeatureSource"]

#: pool5_fn(record, boxes Tensor[N, 4] internal, original pixels) -> Tensor[N, D]; a
#: :class:`detection.features.WindowFeaturizer` is one.
Pool5Fn = Callable[[ImageRecord, torch.Tensor], torch.Tensor]


class WindowFeatureSource:
    """The :class:`detection.training.samples.FeatureSource` of a training split: for image ``i``, the
    features (at ``layer``) of its ground truth and its proposals."""

    def __init__(self, records: Sequence[ImageRecord], proposals: Callable[[ImageRecord], np.ndarray],
                 pool5_fn: Pool5Fn, head: FCHead | None, layer: str, dim: int,
                 max_windows: int | None = None,
                 keep_proposals: Callable[[ImageRecord, np.ndarray], np.ndarray] | None = None) -> None:
        self.records = list(records)
        # Optional filter (record, boxes) -> boxes, applied before any feature is computed: the
        # box regressors only need proposals that overlap a ground truth.
        self.keep_proposals = keep_proposals
        self.proposals = proposals
        self.pool5_fn = pool5_fn
        self.head = head
        self.layer = layer
        self.dim = dim
        self.max_windows = max_windows

    def num_images(self) -> int:
        return len(self.records)

    def _boxes(self, record: ImageRecord) -> np.ndarray:
        boxes = np.asarray(self.proposals(record), dtype=np.float32).reshape(-1, 4)
        if self.max_windows is not None and len(boxes) > self.max_windows:
            # Selective search returns boxes in its priority order: keep the first ones.
            boxes = boxes[: self.max_windows]
        if self.keep_proposals is not None:
            boxes = np.asarray(self.keep_proposals(record, boxes), dtype=np.float32).reshape(-1, 4)
        return boxes

    def candidate_boxes(self, index: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(key, gt_boxes, gt_labels, gt_difficult, proposals) of image ``index``: no features."""
        r = self.records[index]
        return r.key, r.boxes, r.labels, r.difficult, self._boxes(r)

    @torch.inference_mode()
    def sample_candidates(self, index: int, choose: Callable[[int], np.ndarray]) -> tuple[str, np.ndarray]:
        """Features of the candidates (GT, then proposals) at rows ``choose(num_candidates)``,
        computing only those rows (for the feature-norm statistics)."""
        r = self.records[index]
        all_boxes = np.concatenate([r.boxes, self._boxes(r)]).astype(np.float32)
        if len(all_boxes) == 0:
            return r.key, np.zeros((0, self.dim), np.float32)
        rows = np.asarray(choose(len(all_boxes)))
        feats = self.pool5_fn(r, torch.from_numpy(all_boxes[rows]))
        if self.head is not None and self.layer != "pool5":
            feats = self.head.features(feats, self.layer)
        return r.key, feats.float().cpu().numpy()

    @torch.inference_mode()
    def image(self, index: int, *, with_proposals: bool = True) -> ImageSample:
        r = self.records[index]
        boxes = self._boxes(r) if with_proposals else np.zeros((0, 4), np.float32)
        all_boxes = np.concatenate([r.boxes, boxes]).astype(np.float32)
        feats = self.pool5_fn(r, torch.from_numpy(all_boxes)) if len(all_boxes) else torch.zeros((0, self.dim))
        if self.head is not None and self.layer != "pool5":
            feats = self.head.features(feats, self.layer)
        feats = feats.float().cpu().numpy()
        g = len(r.boxes)
        return ImageSample(key=r.key, gt_boxes=r.boxes, gt_labels=r.labels, gt_features=feats[:g],
                           boxes=boxes, features=feats[g:], gt_difficult=r.difficult)
