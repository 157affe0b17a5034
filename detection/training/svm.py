"""One linear SVM: its settings (:class:`SVMConfig`, the R-CNN / SPP-net values), one liblinear
fit (:func:`fit_linear_svm`), the primal objective it reports (:func:`svm_objective`) and the
memory one process of the training holds at most (:func:`svm_memory_bytes`).

Each fit is liblinear's L2-regularised L1-loss (hinge) dual SVM, ``-s 3 -c 1e-3 -w1 2 -B 10``,
through :class:`sklearn.svm.LinearSVC`. The hard-negative mining that decides what each class is
fitted on is :mod:`detection.training.hard_negatives`.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from ..errors import DetectionError

__all__ = ["SVMConfig", "fit_linear_svm", "fit_linear_svm_rows", "svm_objective", "svm_memory_bytes"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SVMConfig:
    """SVM training settings; defaults are the R-CNN / SPP-net values (R-CNN ``rcnn_train.m``, SPP-net ``spp_train.m``)."""

    #: liblinear -c: weight of the hinge loss against 0.5 ||w||^2. Small because the features are
    #: large (norm 20) and there are tens of thousands of negatives.
    C: float = 1e-3
    #: liblinear -B: the bias is the weight of a constant feature of this value, so it is
    #: regularised like the other weights but 10x less strongly (sklearn: intercept_scaling).
    bias_multiplier: float = 10.0
    #: liblinear -w1: positives' hinge loss counts twice; there are ~100x fewer of them.
    pos_weight: float = 2.0
    #: A candidate is a negative for class c when its IoU with every GT of c is below this (R-CNN
    #: chose 0.3 by a grid search over {0, 0.1, ..., 0.5} on validation mAP).
    neg_iou: float = 0.3
    #: A negative is hard (a margin violator or support vector) when it scores above -1; the 1e-4
    #: slack keeps vectors exactly on the margin (liblinear stops at a tolerance) from counting.
    hard_threshold: float = -1.0001
    #: Cached negatives scoring below this after a retraining are evicted: comfortably outside
    #: the margin (-1), so they are not support vectors and dropping them does not change the model.
    evict_threshold: float = -1.2
    #: Retrain a class once more than this many new hard negatives were added since its last
    #: retraining: trades retraining time against working with a stale model.
    retrain_every: int = 2000
    #: Features are multiplied by one scalar so their mean L2 norm is this (R-CNN's
    #: feat_norm_mean); it makes C meaningful across layers (pool5, fc6, fc7) and networks.
    target_norm: float = 20.0
    #: Images and boxes per image sampled to estimate the mean norm (SPP-net: 200 x 200).
    norm_images: int = 200
    norm_boxes_per_image: int = 200
    #: Mining passes over the images. The reference does one ("one pass over the data is
    #: enough"); with more, training stops early after a pass that found no new hard negative.
    passes: int = 1
    #: Use difficult GT objects as positives. SPP-net's roidb drops them (its default), R-CNN keeps
    #: them. Here windows overlapping a difficult object are never negatives either way, because
    #: the evaluation ignores detections on difficult objects.
    use_difficult: bool = False
    #: liblinear -e: stopping tolerance of the dual coordinate descent (max KKT violation).
    #: 0.1 is liblinear's default for -s 3, which the reference used.
    tol: float = 0.1
    #: Cap on coordinate-descent epochs per retraining (liblinear's own cap is 1000).
    max_iter: int = 1000
    #: Seed of liblinear's coordinate order, of the feature-norm sample and of the positives' subset.
    seed: int = 0
    #: A class without positives in the training images (e.g. it appears only in the test split):
    #: "warn" trains the others and leaves it untrained (it never detects; listed in the model's
    #: ``svm.untrained`` and in the metrics), "error" stops training naming it.
    classes_without_positives: str = "warn"
    #: At most this many positives per class: a seeded random subset (in image order) when a
    #: class has more. Crowded scenes have thousands of boxes of one class (6,700 with flips),
    #: and every positive is in memory and in every retraining. None: every GT box.
    max_positives: int | None = 2000
    #: At most this many cached hard negatives per class: beyond it the cache keeps the hardest
    #: (highest-scoring under the current model). Bounds the cache and each retraining (liblinear
    #: copies its rows to float64 and to its own sparse format: up to 24 bytes per element). The
    #: reference has no cap; crowded scenes cached 13,000 for one class. None: no cap.
    max_negatives: int | None = 5000
    #: Images mined together: every image of a block is scored with the model as it stood at the
    #: start of the block, then the block's hard negatives are added in image order and the
    #: classes that gained more than ``retrain_every`` are retrained. The reference checks after
    #: every image (a block of 1); blocks let the processes of a torchrun share the images of
    #: each block out, with the result of one process whatever their number (a process beyond
    #: the block size has no image to mine). Part of what is trained, so part of the stage key.
    mining_block: int = 8

    def validate(self) -> None:
        if self.classes_without_positives not in ("warn", "error"):
            raise DetectionError(f"svm: classes_without_positives must be 'warn' or 'error', "
                                 f"got {self.classes_without_positives!r}")
        if not (self.C > 0 and self.bias_multiplier > 0 and self.pos_weight > 0 and self.target_norm > 0):
            raise DetectionError(f"svm: C, bias_multiplier, pos_weight and target_norm must be > 0: {self}")
        if not 0.0 < self.neg_iou <= 1.0:
            raise DetectionError(f"svm: neg_iou must be in (0, 1], got {self.neg_iou}")
        if self.evict_threshold >= self.hard_threshold:
            raise DetectionError(f"svm: evict_threshold ({self.evict_threshold}) must be below hard_threshold "
                                 f"({self.hard_threshold}), or freshly mined negatives would be evicted at once")
        if self.retrain_every < 1 or self.passes < 1 or self.max_iter < 1 or self.mining_block < 1:
            raise DetectionError("svm: retrain_every, passes, max_iter and mining_block must be >= 1")
        if self.norm_images < 1 or self.norm_boxes_per_image < 1:
            raise DetectionError("svm: norm_images and norm_boxes_per_image must be >= 1")
        for name in ("max_positives", "max_negatives"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DetectionError(f"svm: {name} must be >= 1 or null, got {getattr(self, name)}")


def fit_linear_svm(x_pos: np.ndarray, x_neg: np.ndarray, cfg: SVMConfig, name: str = "svm"
                   ) -> tuple[np.ndarray, np.float32, np.ndarray, np.ndarray]:
    """One liblinear ``-s 3 -c C -w1 pos_weight -B bias_multiplier`` fit (through LinearSVC).

    Args:
        x_pos: array[P, D] positive features (already scaled), label +1.
        x_neg: array[N, D] negative features, label -1.
        cfg: C, pos_weight, bias_multiplier, tol, max_iter, seed.
        name: class name for messages.
    Returns:
        ``(w float32 [D], b float32, z_pos float64 [P], z_neg float64 [N])``: the model as it will
        be saved and its scores on the training rows, checked against the solver's
        ``decision_function``.
    """
    # float64 C-contiguous, as liblinear wants it: sklearn then uses it without another copy.
    return fit_linear_svm_rows(np.concatenate([x_pos, x_neg], axis=0, dtype=np.float64), len(x_pos), cfg, name)


def fit_linear_svm_rows(x: np.ndarray, num_pos: int, cfg: SVMConfig, name: str = "svm"
                        ) -> tuple[np.ndarray, np.float32, np.ndarray, np.ndarray]:
    """:func:`fit_linear_svm` of ``x[:num_pos]`` (positives) against ``x[num_pos:]``, with ``x``
    already one float64 C-contiguous array[P + N, D] (used as it is: no copy)."""
    if x.dtype != np.float64 or not x.flags.c_contiguous:
        raise ValueError("fit_linear_svm_rows: x must be a float64 C-contiguous array")
    y = -np.ones(len(x))
    y[:num_pos] = 1.0
    svm = LinearSVC(penalty="l2", loss="hinge", dual=True, C=cfg.C, fit_intercept=True,
                    intercept_scaling=cfg.bias_multiplier, class_weight={1: cfg.pos_weight, -1: 1.0},
                    tol=cfg.tol, max_iter=cfg.max_iter, random_state=cfg.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.warning("%s: liblinear did not converge in %d iterations (tol %g)", name, cfg.max_iter, cfg.tol)
    # coef_ is the weight of classes_[1] = +1. intercept_ already includes the intercept_scaling
    # factor: sklearn returns intercept_scaling * (liblinear's weight of the constant feature),
    # exactly R-CNN's ``b = llm.w(end) * bias_mult``.
    w = svm.coef_[0].astype(np.float32)
    b = np.float32(svm.intercept_[0])
    z = x @ w.astype(np.float64) + np.float64(b)                  # what the saved model will say
    ref = svm.decision_function(x)
    if not np.allclose(z, ref, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"svm {name}: scores from the saved model do not match the solver's "
                           f"decision function (max difference {np.abs(z - ref).max():.3g})")
    return w, b, z[:num_pos], z[num_pos:]


def svm_objective(w: np.ndarray, b: float, z_pos: np.ndarray, z_neg: np.ndarray, cfg: SVMConfig) -> dict[str, float]:
    """R-CNN's training log: the primal objective of the fit and its parts, accuracy, support vectors.

    ``objective = C * pos_weight * sum(hinge(z_pos)) + C * sum(hinge(-z_neg)) + 0.5 |w|^2
    + 0.5 (b / bias_multiplier)^2`` (the bias is the weight of a constant ``bias_multiplier``).
    """
    w64 = np.asarray(w, dtype=np.float64)
    pos_loss = cfg.C * cfg.pos_weight * float(np.maximum(0.0, 1.0 - z_pos).sum())
    neg_loss = cfg.C * float(np.maximum(0.0, 1.0 + z_neg).sum())
    reg_loss = 0.5 * float(w64 @ w64) + 0.5 * (float(b) / cfg.bias_multiplier) ** 2
    n = len(z_pos) + len(z_neg)
    return {
        "objective": pos_loss + neg_loss + reg_loss,
        "pos_loss": pos_loss, "neg_loss": neg_loss, "reg_loss": reg_loss,
        "train_accuracy": float(((z_pos > 0).sum() + (z_neg < 0).sum()) / max(n, 1)),
        # 1e-6: "on the margin" up to float noise, as R-CNN's eps.
        "pos_support_vectors": int((z_pos < 1 + 1e-6).sum()),
        "neg_support_vectors": int((z_neg > -1 - 1e-6).sum()),
    }


def svm_memory_bytes(cfg: SVMConfig, num_classes: int, dim: int, max_candidates: int, world: int = 1) -> int | None:
    """Bytes one process of the SVM training holds at most (None: unbounded, a cap is null), in
    the layout of :mod:`detection.training.hard_negatives`: every class's positives and hard
    negatives are on disk, so this is the larger of two phases, plus the model:

    * a retraining, one class at a time: its ``max_positives + max_negatives`` rows as one
      float64 array (8 bytes per element) and liblinear's own sparse copy of it (a 16-byte
      index/value node per non-zero element, counted as if every element were non-zero, plus
      the bias node and the row's end); the file pages of the rows read are fewer than liblinear's copy;
    * mining a block of ``cfg.mining_block`` images shared out over ``world`` processes: this
      process's share of the block's candidate features (``ceil(block / world)`` images of at
      most ``max_candidates`` windows, float32), one image being read (three float32 copies of
      its candidates: the source's, the scaled one, the rows kept) and, with more than one
      process, the exchange of the block (this share pickled, and the whole block received
      twice: as bytes and as arrays);
    * the model: weights and biases of every class, twice (the current one and one exchanged).
    """
    if cfg.max_positives is None or cfg.max_negatives is None:
        return None
    rows = cfg.max_positives + cfg.max_negatives
    retrain = rows * dim * 8 + rows * (dim + 2) * 16
    image = max_candidates * dim * 4
    share = -(-cfg.mining_block // world)
    mining = (3 + share) * image
    if world > 1:
        mining += share * image + 2 * share * world * image
    model = 2 * num_classes * (dim + 1) * 4
    return max(retrain, mining) + model
