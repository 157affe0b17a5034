"""Bounding-box regression (R-CNN style), trained by ridge regression on SPP (pool5) features.

The deltas a regressor predicts and the model the detector applies are in :mod:`detection.linear`
(:func:`~detection.linear.encode`, :class:`~detection.linear.BoxRegressors`); the ridge solver is
:mod:`detection.training.ridge`.

Training (SPP-net ``spp_train_bbox_regressor.m``; R-CNN, Girshick et al. 2014, appendix C):

* samples: every candidate (GT boxes, then proposals) whose best IoU with a non-difficult GT box
  is above ``min_iou`` (0.5 in SPP-net, 0.6 in R-CNN); the target is that GT box, and the sample
  trains the regressor of that GT box's class;
* features: pool5 (SPP) features multiplied by one scalar so that their mean L2 norm is 20, the
  same rule as the SVMs (:func:`detection.training.samples.compute_feature_scale`) but estimated on these
  features;
* targets: centred and whitened per class (``T = S^-1/2`` of their covariance ``S``, plus 1e-3 on
  its eigenvalues) as the reference does. Note that with one lambda shared by the four outputs,
  ridge regression is equivariant under any invertible linear map of the targets, so the
  whitening (or a per-coordinate division by the standard deviation) does not change the
  predictions; the centring does, because the bias is penalised;
* per class ridge regression ``min ||X b - Y||^2 + lambda ||b||^2``, lambda = 4,000 (SPP-net;
  R-CNN: 1,000). As in the reference the bias is a constant-1 feature and is regularised with
  the rest; ``regularize_bias=False`` fits an unpenalised intercept instead.

Memory: the samples are planned from the boxes before any feature is read
(:func:`plan_regression_samples`), at most ``max_gt_samples`` GT and ``max_samples`` proposal
samples per class (seeded random subsets beyond that), and each class's arrays are allocated once
at their final size after checking them against the memory budget
(:func:`check_regression_memory`), so no native call (BLAS, LAPACK) is ever handed more than the
budget allows. The solve is primal (D x D) or dual (N x N), whichever is smaller. Given one
feature source per class, only one class's samples are in memory at a time
(:func:`train_box_regressors`), and a callback can save each class's regressor as it is done.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from .. import comm
from ..boxes import box_iou_numpy
from ..errors import DetectionError
from ..linear import BoxRegressors, encode
from .ridge import fit_class_regressor, regression_memory_bytes
from .samples import FeatureSource, candidate_boxes, check_sample, compute_feature_scale

__all__ = ["BBoxRegressionConfig", "train_box_regressors", "fit_box_regressors", "assemble_box_regressors", "collect_regression_samples", "plan_regression_samples",
           "proposal_subset", "gt_subset", "ImageSamples", "ClassRegressor", "check_regression_memory"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BBoxRegressionConfig:
    """Box-regression settings; defaults are SPP-net's code (``spp_train_bbox_regressor.m``)."""

    #: Train per-class box regressors (the detector moves each window by its class's regressor).
    enabled: bool = True
    #: Ridge penalty. SPP-net 4,000; R-CNN 1,000 (on pool5 features scaled to norm 20 in both).
    lam: float = 4000.0
    #: A candidate is a training sample when its best IoU with a GT box is above this.
    #: SPP-net 0.5; R-CNN 0.6 (farther proposals make the linear model's job harder).
    min_iou: float = 0.5
    #: The reference's bias is a constant-1 feature penalised by ``lam`` like the weights.
    regularize_bias: bool = True
    #: The GT boxes themselves are samples too (targets 0), as in the reference's roidb.
    include_gt: bool = True
    #: Difficult objects as regression targets (SPP-net drops them from its roidb).
    use_difficult: bool = False
    #: Scale features to this mean L2 norm (the same rule as the SVMs).
    target_norm: float = 20.0
    norm_images: int = 200
    norm_boxes_per_image: int = 200
    #: Seed of the feature-norm sample and of the ``max_samples`` subset.
    seed: int = 0
    #: At most this many proposal samples per class (GT boxes always count); a seeded random
    #: subset when a class has more. With 25,600-d pool5 features 10,000 samples are 1 GB and
    #: their kernel 0.8 GB; fruit with quality-mode proposals had ~25,000 per class and the
    #: unbounded solve went past 19 GB. None: every sample.
    max_samples: int | None = 10000
    #: At most this many GT samples per class, a seeded random subset beyond that. Crowded scenes
    #: have thousands of boxes of one class (6,700 with flips in a 300-image cell dataset): GT
    #: rows were uncapped and, added to the 10,000 proposals, made a 16,700-row fit. None: every GT.
    max_gt_samples: int | None = 3000

    def validate(self) -> None:
        if not (self.lam >= 0 and self.target_norm > 0):
            raise DetectionError(f"bbox_regression: lam must be >= 0 and target_norm > 0: {self}")
        if not 0.0 <= self.min_iou < 1.0:
            raise DetectionError(f"bbox_regression: min_iou must be in [0, 1), got {self.min_iou}")
        if self.norm_images < 1 or self.norm_boxes_per_image < 1:
            raise DetectionError("bbox_regression: norm_images and norm_boxes_per_image must be >= 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise DetectionError(f"bbox_regression: max_samples must be >= 1 or null, got {self.max_samples}")
        if self.max_gt_samples is not None and self.max_gt_samples < 1:
            raise DetectionError(f"bbox_regression: max_gt_samples must be >= 1 or null, got {self.max_gt_samples}")


def _subset(num: int, cap: int | None, seed: Sequence[int]) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of ``cap`` of ``num`` rows, or None (keep all)."""
    if cap is None or num <= cap:
        return None
    return np.sort(np.random.default_rng(list(seed)).choice(num, cap, replace=False))


def proposal_subset(num: int, class_index: int, cfg: BBoxRegressionConfig) -> np.ndarray | None:
    """Sorted indices of the proposal samples a class keeps when it has ``num`` of them (in
    image order, then proposal order), or None when it keeps them all (``cfg.max_samples``)."""
    return _subset(num, cfg.max_samples, (cfg.seed, class_index))


def gt_subset(num: int, class_index: int, cfg: BBoxRegressionConfig) -> np.ndarray | None:
    """As :func:`proposal_subset` for the ground-truth samples (``cfg.max_gt_samples``); its own
    random stream, so capping one kind does not move the other's subset."""
    return _subset(num, cfg.max_gt_samples, (cfg.seed, class_index, 1))


@dataclasses.dataclass(frozen=True)
class ImageSamples:
    """The box-regression samples of one class in one image, boxes only.

    Attributes:
        image: index of the image in its source.
        gt_rows: int array[g], rows of the image's GT boxes that are samples (GT candidates).
        gt_targets: int array[g], the GT row each of them regresses to (itself, bar duplicates).
        proposal_rows: int array[p], rows of the image's proposals that are samples.
        proposal_targets: int array[p], the GT row each regresses to.
    """

    image: int
    gt_rows: np.ndarray
    gt_targets: np.ndarray
    proposal_rows: np.ndarray
    proposal_targets: np.ndarray


def plan_regression_samples(source: FeatureSource, num_classes: int, cfg: BBoxRegressionConfig,
                            classes: Sequence[int] | None = None, *,
                            share_images: bool = False) -> list[list[ImageSamples]]:
    """Per class, the samples to train on (boxes only, before any feature is read), capped.

    A candidate (GT boxes first, then proposals) is a sample when its best IoU with a
    non-difficult GT box is above ``cfg.min_iou``; it regresses to that GT box and trains that
    box's class. A class with more than ``cfg.max_gt_samples`` GT samples or ``cfg.max_samples``
    proposal samples keeps a seeded random subset of each (counted in image order, then row
    order), so its memory is bounded by the settings whatever the number of objects.

    With ``share_images`` (every rank must call it then), each rank plans a contiguous share of
    the images under ``torchrun`` and the plans are gathered in image order: the same plan on
    every rank for 1/N of the work.

    Returns:
        For each class (empty lists for the classes not in ``classes``), the images with a
        sample of it, in image order.
    """
    wanted = set(range(num_classes) if classes is None else classes)
    lo, hi = comm.shard_bounds(source.num_images()) if share_images else (0, source.num_images())
    found: list[list[ImageSamples]] = [[] for _ in range(num_classes)]
    for i in range(lo, hi):
        _, gt_all, labels_all, difficult, boxes = candidate_boxes(source, i)
        gt_all = np.asarray(gt_all, np.float64).reshape(-1, 4)
        labels_all = np.asarray(labels_all, np.int64).reshape(-1)
        keep = np.ones(len(gt_all), bool) if cfg.use_difficult or difficult is None else ~np.asarray(difficult, bool)
        kept = np.flatnonzero(keep)
        if len(kept) == 0:
            continue
        gt = gt_all[kept]
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        parts = []
        for cand, is_gt in ((gt, True), (boxes, False)):
            if (is_gt and not cfg.include_gt) or len(cand) == 0:
                parts.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
                continue
            iou = box_iou_numpy(cand, gt)                           # [M, G]
            best = iou.argmax(axis=1)
            near = np.flatnonzero(iou[np.arange(len(cand)), best] > cfg.min_iou)
            rows = kept[near] if is_gt else near                    # GT rows index the full GT array
            parts.append((rows, kept[best[near]]))
        for c in wanted:
            (gr, gtg), (pr, ptg) = parts
            gm, pm = labels_all[gtg] == c, labels_all[ptg] == c
            if gm.any() or pm.any():
                found[c].append(ImageSamples(i, gr[gm], gtg[gm], pr[pm], ptg[pm]))
    if share_images:      # contiguous shards in rank order: image order
        parts = comm.all_gather(found, "box regression: gathering every rank's share of the sample plan")
        found = [[s for part in parts for s in part[c]] for c in range(num_classes)]
    for c in wanted:
        found[c] = _cap(found[c], gt_subset(sum(len(s.gt_rows) for s in found[c]), c, cfg),
                        proposal_subset(sum(len(s.proposal_rows) for s in found[c]), c, cfg))
    return found


def _cap(images: list[ImageSamples], gt_keep: np.ndarray | None, prop_keep: np.ndarray | None) -> list[ImageSamples]:
    """Keep the rows whose running index (over ``images``) is in ``gt_keep`` / ``prop_keep``."""
    if gt_keep is None and prop_keep is None:
        return images
    out, g0, p0 = [], 0, 0
    for s in images:
        g = np.ones(len(s.gt_rows), bool) if gt_keep is None else np.isin(np.arange(g0, g0 + len(s.gt_rows)), gt_keep)
        p = np.ones(len(s.proposal_rows), bool) if prop_keep is None else \
            np.isin(np.arange(p0, p0 + len(s.proposal_rows)), prop_keep)
        g0, p0 = g0 + len(s.gt_rows), p0 + len(s.proposal_rows)
        if g.any() or p.any():
            out.append(ImageSamples(s.image, s.gt_rows[g], s.gt_targets[g], s.proposal_rows[p], s.proposal_targets[p]))
    return out


def check_regression_memory(num_samples: int, dim: int, budget_bytes: int | None, what: str) -> None:
    """Raise :class:`DetectionError` before allocating when a fit would exceed the budget."""
    need = regression_memory_bytes(num_samples, dim)
    if budget_bytes is not None and need > budget_bytes:
        raise DetectionError(
            f"train stage, box regression ({what}): {num_samples:,} samples of {dim:,}-d features need "
            f"~{need / 2**30:.2f} GB, above memory_gb={budget_bytes / 2**30:g}; lower bbox.max_samples / "
            "bbox.max_gt_samples or raise memory_gb")


def collect_regression_samples(source: FeatureSource, num_classes: int, cfg: BBoxRegressionConfig,
                               feature_scale: float, progress: bool = False,
                               classes: Sequence[int] | None = None,
                               memory_budget: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per class, the scaled features float32 [N_k, D] and targets float64 [N_k, 4] of its samples
    (:func:`plan_regression_samples`: GT and proposal rows in image order, each kind capped).
    Only the classes in ``classes`` (default: all) are collected; the others come back empty.
    The samples are planned from the boxes first, so each class's arrays are allocated once at
    their final size, after checking them against ``memory_budget`` (bytes, per class)."""
    dim = int(source.dim)
    plan = plan_regression_samples(source, num_classes, cfg, classes)
    counts = [sum(len(s.gt_rows) + len(s.proposal_rows) for s in p) for p in plan]
    for c in range(num_classes):
        check_regression_memory(counts[c], dim, memory_budget, f"class {c}")
    xs = [np.empty((n, dim), np.float32) for n in counts]
    ys = [np.empty((n, 4)) for n in counts]
    fill = [0] * num_classes
    by_image: dict[int, list[tuple[int, ImageSamples]]] = {}
    for c, p in enumerate(plan):
        for s in p:
            by_image.setdefault(s.image, []).append((c, s))
    for i in tqdm(sorted(by_image), desc="bbox samples", disable=not progress):
        s = source.image(i)
        check_sample(s, i, dim, num_classes)
        for c, rows in by_image[i]:
            feats = np.concatenate([s.gt_features[rows.gt_rows], s.features[rows.proposal_rows]])
            cand = np.concatenate([s.gt_boxes[rows.gt_rows], s.boxes[rows.proposal_rows]])
            target = s.gt_boxes[np.concatenate([rows.gt_targets, rows.proposal_targets])]
            n = len(feats)
            xs[c][fill[c]:fill[c] + n] = feats * np.float32(feature_scale)
            ys[c][fill[c]:fill[c] + n] = encode(cand, target)
            fill[c] += n
    return list(zip(xs, ys))


@dataclasses.dataclass(frozen=True, eq=False)
class ClassRegressor:
    """One class's fitted regressor (a row of :class:`BoxRegressors`), what a checkpoint holds.

    Attributes: weight float64 [D, 4], bias [4], target_mean [4], target_unwhiten [4, 4], and
    ``stats`` (JSON-able: num_samples, train_mse, target_std).
    """

    weight: np.ndarray
    bias: np.ndarray
    target_mean: np.ndarray
    target_unwhiten: np.ndarray
    stats: dict[str, Any]


def train_box_regressors(source: FeatureSource | Sequence[FeatureSource], num_classes: int,
                         cfg: BBoxRegressionConfig = BBoxRegressionConfig(),
                         *, class_names: Sequence[str] | None = None, feature_scale: float | None = None,
                         progress: bool = False, untrained: Sequence[str] = (), memory_budget: int | None = None,
                         done: dict[int, ClassRegressor] | None = None,
                         on_class: Callable[[int, ClassRegressor], None] | None = None) -> BoxRegressors:
    """Train one box regressor per class (see the module docstring).

    Args:
        source: pool5 (SPP) features of GT boxes and proposals of the training images; or one
            source per class, class k's samples read from ``source[k]`` only (then only one
            class's samples are in memory at a time; needs ``feature_scale``).
        num_classes: K.
        cfg: settings (defaults: SPP-net's).
        class_names: K names for messages and metadata.
        feature_scale: use this instead of estimating the norm-20 scale.
        progress: tqdm bars.
        untrained: names of classes whose SVMs could not be trained (no positives): without
            samples they get the identity regressor (boxes unchanged) instead of an error.
        memory_budget: bytes one class's fit may hold (:func:`regression_memory_bytes`); a class
            that would need more is refused before its features are read. None: no limit.
        done: classes already trained (a resumed run): used as they are, not refitted.
        on_class: called with each newly fitted class (to checkpoint it).
    Raises:
        DetectionError: a class without samples (no non-difficult GT) not in ``untrained``,
            NaN/inf or all-zero features, degenerate boxes, an invalid config, a class above the
            memory budget.
    """
    cfg.validate()
    names = tuple(class_names) if class_names is not None else tuple(f"class_{k}" for k in range(num_classes))
    if len(names) != num_classes or num_classes < 1:
        raise DetectionError(f"bbox_regression: {len(names)} class names for {num_classes} classes")
    if isinstance(source, (list, tuple)) and len(source) != num_classes:
        raise DetectionError(f"bbox_regression: {len(source)} feature sources for {num_classes} classes")
    if feature_scale is not None and not (math.isfinite(feature_scale) and feature_scale > 0):
        raise DetectionError(f"bbox_regression: feature_scale must be a positive number, got {feature_scale}")
    mean_norm: float | None = None
    if feature_scale is None:
        if isinstance(source, (list, tuple)):
            raise DetectionError("bbox_regression: per-class feature sources need feature_scale")
        feature_scale, mean_norm = compute_feature_scale(source, cfg.target_norm, cfg.norm_images,
                                                         cfg.norm_boxes_per_image, cfg.seed, progress)
        logger.info("mean feature norm %.4g -> feature scale %.6g", mean_norm, feature_scale)
    done = dict(done or {})
    fitted = fit_box_regressors(source, num_classes, cfg, [c for c in range(num_classes) if c not in done],
                                class_names=names, feature_scale=feature_scale, progress=progress,
                                untrained=untrained, memory_budget=memory_budget, on_class=on_class)
    for c in done:
        logger.info("%s: box regressor from the checkpoint", names[c])
    return assemble_box_regressors({**done, **fitted}, names, cfg, feature_scale, mean_norm)


def fit_box_regressors(source: FeatureSource | Sequence[FeatureSource], num_classes: int,
                       cfg: BBoxRegressionConfig, classes: Sequence[int], *, class_names: Sequence[str],
                       feature_scale: float, progress: bool = False, untrained: Sequence[str] = (),
                       memory_budget: int | None = None,
                       on_class: Callable[[int, ClassRegressor], None] | None = None) -> dict[int, ClassRegressor]:
    """Fit the box regressors of ``classes`` only (each class is fitted on its own, so processes
    can share the classes out); the arguments are :func:`train_box_regressors`'. Returns
    {class: regressor}."""
    cfg.validate()
    names = tuple(class_names)
    if len(names) != num_classes or num_classes < 1:
        raise DetectionError(f"bbox_regression: {len(names)} class names for {num_classes} classes")
    if not (math.isfinite(feature_scale) and feature_scale > 0):
        raise DetectionError(f"bbox_regression: feature_scale must be a positive number, got {feature_scale}")
    per_class = isinstance(source, (list, tuple))
    if per_class and len(source) != num_classes:
        raise DetectionError(f"bbox_regression: {len(source)} feature sources for {num_classes} classes")
    todo = [int(c) for c in classes]
    if not todo:
        return {}
    if per_class:
        logger.info("training %d box regressors, one class at a time on %s images: %s", len(todo),
                    "/".join(str(source[c].num_images()) for c in todo), cfg)
    else:
        logger.info("training %d box regressors on %d images: %s", len(todo), source.num_images(), cfg)
    samples = None if per_class else \
        collect_regression_samples(source, num_classes, cfg, feature_scale, progress, classes=todo,
                                   memory_budget=memory_budget)
    dim = int((source[0] if per_class else source).dim)
    fitted: dict[int, ClassRegressor] = {}
    for c in todo:
        if per_class:        # read this class's samples now, after the previous class's are freed
            x, y = collect_regression_samples(source[c], num_classes, cfg, feature_scale, progress, classes=[c],
                                              memory_budget=memory_budget)[c]
        else:
            x, y = samples[c]
        if len(x) == 0 and names[c] in untrained:
            # All zeros: the regressor leaves the boxes unchanged.
            fitted[c] = ClassRegressor(np.zeros((dim, 4)), np.zeros(4), np.zeros(4), np.zeros((4, 4)),
                                       {"num_samples": 0, "untrained": True})
            continue
        if len(x) == 0:
            raise DetectionError(f"bbox_regression: no training samples (IoU > {cfg.min_iou} with a non-difficult "
                                 f"GT) for class {names[c]}")
        if samples is not None:
            samples[c] = (np.zeros((0, dim), np.float32), y)     # free the features as we go
        logger.info("%s: fitting %d samples x %d features (%s form)", names[c], len(x), dim,
                    "primal D x D" if len(x) > dim else "dual N x N")
        weight, bias, mean, unwhiten, mse = fit_class_regressor(x, y, cfg.lam, cfg.regularize_bias)
        del x                                                     # before the next class's samples
        fitted[c] = ClassRegressor(weight, bias, mean, unwhiten,
                                   {"num_samples": len(y), "train_mse": mse.tolist(),
                                    "target_std": y.std(axis=0).tolist()})
        logger.info("%s: %d samples, train MSE %s (target variance %s)", names[c], len(y),
                    np.round(mse, 5).tolist(), np.round(y.var(axis=0), 5).tolist())
        if on_class is not None:
            on_class(c, fitted[c])
    return fitted


def assemble_box_regressors(fitted: dict[int, ClassRegressor], class_names: Sequence[str],
                            cfg: BBoxRegressionConfig, feature_scale: float,
                            mean_norm: float | None = None) -> BoxRegressors:
    """One :class:`BoxRegressors` from every class's fitted regressor."""
    names = tuple(class_names)
    missing = [names[c] for c in range(len(names)) if c not in fitted]
    if missing:
        raise DetectionError(f"bbox_regression: no regressor was fitted for class(es) {', '.join(missing)}")
    k = len(names)
    meta = {"classes": list(names), "mean_norm": mean_norm, "config": dataclasses.asdict(cfg),
            "stats": {names[c]: fitted[c].stats for c in range(k)}}
    return BoxRegressors(weights=np.stack([fitted[c].weight for c in range(k)]),
                         biases=np.stack([fitted[c].bias for c in range(k)]),
                         target_mean=np.stack([fitted[c].target_mean for c in range(k)]),
                         target_unwhiten=np.stack([fitted[c].target_unwhiten for c in range(k)]),
                         feature_scale=feature_scale, meta=meta)
