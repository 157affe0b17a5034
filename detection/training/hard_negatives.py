"""Linear SVMs, one per class, trained with hard-negative mining (R-CNN / SPP-net recipe).

The trainer reads features through a :class:`~detection.training.samples.FeatureSource`, one
image at a time. Memory is bounded by the settings: at most ``max_positives`` positives and
``max_negatives`` cached hard negatives per class (:func:`~detection.training.svm.svm_memory_bytes`);
the features of one image are dropped as soon as it has been mined.

The recipe (R-CNN ``rcnn_train.m``, SPP-net ``spp_train.m``; He et al. 2014, Sec. 4.1):

1. Feature scale: a single scalar ``s`` so that the mean L2 norm of a random sample of training
   features (200 boxes from each of up to 200 images) becomes 20. Every feature the SVMs see,
   at training and at test time, is multiplied by ``s``.
2. Positives: the ground-truth boxes of the class (all of them, including flipped copies when the
   source has flipped images); difficult objects only with ``use_difficult``. Beyond
   ``max_positives`` a seeded random subset (crowded scenes: thousands per class).
3. One pass over the images (configurable). Candidates of an image are its ground-truth boxes
   followed by its proposals (as in the reference, whose ``roidb`` puts GT rows first, so a GT box
   of one class is a candidate negative for every other class). A candidate is a negative for
   class ``c`` when its IoU with every GT box of class ``c`` is below 0.3. It is *hard* when the
   current model scores it above -1.0001; hard negatives not yet cached are added to the class's
   cache. The model starts at zero, so every negative of the first image scores 0 and is hard,
   which is how the reference seeds its caches. Beyond ``max_negatives`` (not in the reference)
   a cache keeps the hardest, those scoring highest under the current model.
4. A class is retrained (on all its positives and cached negatives) after the first image, and
   whenever more than 2,000 new hard negatives have been added since its last retraining. After
   each retraining, cached negatives scoring below -1.2 are evicted. After the pass, every class
   that gained negatives since its last retraining is retrained once more.
5. Each retraining is liblinear's L2-regularised L1-loss (hinge) dual SVM, ``-s 3 -c 1e-3 -w1 2
   -B 10``, through :class:`sklearn.svm.LinearSVC` (:func:`~detection.training.svm.fit_linear_svm`).

Example::

    source = ListFeatureSource(samples, dim=4096)
    svms = train_svms(source, num_classes=20, cfg=SVMConfig(), class_names=VOC_CLASSES)
    scores = svms.scores(fc7_features)          # [N, 20]
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from ..boxes import box_iou_numpy
from ..errors import DetectionError
from ..linear import UNTRAINED_BIAS, LinearSVMs
from .samples import FeatureSource, check_sample, compute_feature_scale
from .svm import SVMConfig, fit_linear_svm, svm_objective

__all__ = ["SVMTrainer", "train_svms", "merge_class_svms"]

logger = logging.getLogger(__name__)

#: Bits used to pack (image index, candidate index) into one int64 cache key.
_KEY_SHIFT = 32


@dataclasses.dataclass
class _ClassCache:
    """Positives and the hard-negative cache of one class (features already scaled)."""

    pos: np.ndarray                                      # float32 [Npos, D]
    neg: np.ndarray                                      # float32 [Nneg, D], consolidated part
    neg_keys: np.ndarray                                 # int64 [Nneg], packed (image, candidate)
    pending: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    key_set: set[int] = dataclasses.field(default_factory=set)
    num_added: int = 0                                   # since the last retraining
    retrains: int = 0
    peak_cached: int = 0
    evicted: int = 0
    dropped: int = 0                                     # trimmed by max_negatives
    last: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def num_neg(self) -> int:
        return len(self.key_set)

    def add(self, keys: np.ndarray, feats: np.ndarray) -> None:
        self.pending.append((keys, feats))
        self.key_set.update(keys.tolist())
        self.num_added += len(keys)

    def trim(self, cap: int, w: np.ndarray, b: float) -> None:
        """Keep the ``cap`` negatives scoring highest under ``(w, b)`` (ties: the earlier)."""
        self.consolidate()
        if len(self.neg) <= cap:
            return
        z = self.neg @ w + np.float32(b)
        keep = np.zeros(len(z), bool)
        keep[np.argsort(-z, kind="stable")[:cap]] = True
        self.key_set.difference_update(self.neg_keys[~keep].tolist())
        self.dropped += int((~keep).sum())
        self.neg = self.neg[keep]
        self.neg_keys = self.neg_keys[keep]

    def consolidate(self) -> None:
        if self.pending:
            self.neg = np.concatenate([self.neg] + [f for _, f in self.pending], axis=0)
            self.neg_keys = np.concatenate([self.neg_keys] + [k for k, _ in self.pending])
            self.pending = []

    def evict(self, mask: np.ndarray) -> None:
        if mask.any():
            self.key_set.difference_update(self.neg_keys[mask].tolist())
            self.neg = self.neg[~mask]
            self.neg_keys = self.neg_keys[~mask]
            self.evicted += int(mask.sum())


class _Reservoir:
    """A seeded uniform random subset of at most ``cap`` rows of a stream (reservoir sampling,
    Algorithm R), returned in stream order; every row while there are at most ``cap``. Memory:
    ``cap`` rows, whatever the length of the stream."""

    def __init__(self, cap: int | None, dim: int, rng: np.random.Generator) -> None:
        self.cap, self.dim, self.rng = cap, dim, rng
        self.parts: list[np.ndarray] = []          # below the cap: the rows as they came
        self.buf: np.ndarray | None = None         # at the cap: [cap, D] and each slot's stream index
        self.index: np.ndarray | None = None
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        for row in rows:
            t = self.seen
            self.seen += 1
            if self.cap is None or t < self.cap:
                self.parts.append(row[None])
                continue
            if self.buf is None:
                self.buf, self.index = np.concatenate(self.parts), np.arange(self.cap)
                self.parts = []
            j = int(self.rng.integers(0, t + 1))
            if j < self.cap:
                self.buf[j], self.index[j] = row, t

    def rows(self) -> np.ndarray:
        if self.buf is None:
            return np.concatenate(self.parts) if self.parts else np.zeros((0, self.dim), np.float32)
        return self.buf[np.argsort(self.index)]


class SVMTrainer:
    """Hard-negative mining + liblinear retraining for all classes in one pass over the images.

    Use :func:`train_svms` unless you need to inspect the caches afterwards
    (:meth:`cached_negative_keys`).
    """

    def __init__(self, source: FeatureSource, num_classes: int, cfg: SVMConfig = SVMConfig(),
                 class_names: Sequence[str] | None = None, feature_scale: float | None = None,
                 progress: bool = False, classes: Sequence[int] | None = None,
                 count_sum: Callable[[int], int] | None = None) -> None:
        """
        Args:
            source: the training images' features.
            num_classes: K, the number of object classes (labels 0..K-1; no background class).
            cfg: training settings.
            class_names: K names for messages and the model's metadata (default ``class_<k>``).
            feature_scale: use this scale instead of estimating it (e.g. one computed before).
            progress: show tqdm bars.
            classes: the classes to train here (default all); the others keep a zero model. Every
                class is trained on its own, so processes can share the classes out
                (:func:`merge_class_svms` puts their results together).
            count_sum: sums a pass's count of new hard negatives over those processes, so that
                all stop after the same pass, as one process training every class would.
        """
        cfg.validate()
        if num_classes < 1:
            raise DetectionError(f"svm: num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise DetectionError(f"svm: {len(class_names)} class names for {num_classes} classes")
        if feature_scale is not None and not (math.isfinite(feature_scale) and feature_scale > 0):
            raise DetectionError(f"svm: feature_scale must be a positive number, got {feature_scale}")
        self.source = source
        self.num_classes = num_classes
        self.cfg = cfg
        self.class_names = tuple(class_names) if class_names is not None else tuple(
            f"class_{k}" for k in range(num_classes))
        self.progress = progress
        self._given_scale = feature_scale
        self._caches: list[_ClassCache] = []
        self._active: list[int] = list(range(num_classes))   # classes with positives, set by train()
        self._owned = sorted(set(range(num_classes) if classes is None else (int(c) for c in classes)))
        if any(not 0 <= c < num_classes for c in self._owned):
            raise DetectionError(f"svm: classes {self._owned} outside 0..{num_classes - 1}")
        self._count_sum = count_sum if count_sum is not None else (lambda n: n)
        self.converged = False
        self.passes_done = 0

    # -- public ---------------------------------------------------------------------------------
    def train(self) -> LinearSVMs:
        """Run the whole recipe and return the SVMs (see the module docstring)."""
        cfg, k_cls, dim = self.cfg, self.num_classes, int(self.source.dim)
        n = self.source.num_images()
        if n == 0:
            raise DetectionError("svm: the feature source has no images")
        logger.info("training %d linear SVMs on %d images, %d-d features: %s", k_cls, n, dim, cfg)
        if self._given_scale is not None:
            scale, mean_norm = float(self._given_scale), None
        else:
            scale, mean_norm = compute_feature_scale(self.source, cfg.target_norm, cfg.norm_images,
                                                     cfg.norm_boxes_per_image, cfg.seed, self.progress)
            logger.info("mean feature norm %.4g -> feature scale %.6g (target norm %g)", mean_norm, scale,
                        cfg.target_norm)
        self.feature_scale = scale

        self._caches = self._collect_positives(n, dim, scale)
        weights = np.zeros((k_cls, dim), dtype=np.float32)   # the zero model: every negative is hard
        biases = np.zeros(k_cls, dtype=np.float32)
        trained = np.zeros(k_cls, dtype=bool)
        untrained = [c for c, cache in enumerate(self._caches) if len(cache.pos) == 0]
        biases[untrained] = UNTRAINED_BIAS
        self._active = [c for c in self._owned if c not in untrained]

        self.converged = False
        for p in range(cfg.passes):
            added_in_pass = 0
            # A process left without classes reads no features, but still counts (zero) each pass.
            for i in tqdm(range(n if self._active else 0), desc=f"hard negatives {p + 1}/{cfg.passes}",
                          disable=not self.progress):
                added_in_pass += self._mine_image(i, dim, scale, weights, biases)
                first_image = p == 0 and i == 0
                for c in self._active:
                    cache = self._caches[c]
                    if cache.num_neg and (first_image or cache.num_added > cfg.retrain_every):
                        self._retrain(c, weights, biases)
                        trained[c] = True
            self.passes_done = p + 1
            # End of a pass: bring every class up to date with what it gained.
            for c in self._active:
                cache = self._caches[c]
                if cache.num_neg and (cache.num_added > 0 or not trained[c]):
                    self._retrain(c, weights, biases)
                    trained[c] = True
            logger.info("pass %d: %d new hard negatives", p + 1, added_in_pass)
            added_in_pass = int(self._count_sum(added_in_pass))
            if p > 0 and added_in_pass == 0:
                # The model that mined this pass found nothing new and was not changed: converged.
                self.converged = True
                break
        missing = [self.class_names[c] for c in self._active if not trained[c]]
        if missing:
            raise DetectionError(f"svm: no negatives (IoU < {cfg.neg_iou} with its GT) for class(es) "
                                 f"{', '.join(missing)}; every candidate window overlaps them")

        stats = {name: dict(cache.last, num_pos=len(cache.pos), num_neg_cached=cache.num_neg,
                            peak_cached=cache.peak_cached, evicted=cache.evicted, dropped=cache.dropped,
                            retrains=cache.retrains)
                 for name, cache in zip(self.class_names, self._caches)}
        meta = {
            "classes": list(self.class_names),
            "mean_norm": mean_norm,
            "config": dataclasses.asdict(cfg),
            "passes_done": self.passes_done,
            "converged": self.converged,
            "num_images": n,
            "stats": stats,
            "untrained": [self.class_names[c] for c in untrained],
        }
        if len(self._owned) < k_cls:
            meta["trained_here"] = list(self._owned)
        return LinearSVMs(weights=weights, biases=biases, feature_scale=scale, meta=meta)

    def cached_negative_keys(self, c: int) -> np.ndarray:
        """int64 array[N, 2] of ``(image index, candidate index)`` cached for class ``c`` after
        :meth:`train`; the candidate index counts GT boxes first, then proposals."""
        cache = self._caches[c]
        keys = np.array(sorted(cache.key_set), dtype=np.int64)
        return np.stack([keys >> _KEY_SHIFT, keys & ((1 << _KEY_SHIFT) - 1)], axis=1)

    def peak_cached(self, c: int) -> int:
        """The most negatives class ``c``'s cache held at any time."""
        return self._caches[c].peak_cached

    # -- steps ----------------------------------------------------------------------------------
    def _collect_positives(self, n: int, dim: int, scale: float) -> list[_ClassCache]:
        pos = [_Reservoir(self.cfg.max_positives, dim, np.random.default_rng([self.cfg.seed, c]))
               for c in range(self.num_classes)]
        for i in tqdm(range(n), desc="positives", disable=not self.progress):
            s = self.source.image(i, with_proposals=False)
            check_sample(s, i, dim, self.num_classes)
            keep = np.ones(len(s.gt_labels), bool) if self.cfg.use_difficult else ~s.gt_difficult
            for c in np.unique(s.gt_labels[keep]):
                pos[c].add(s.gt_features[keep & (s.gt_labels == c)] * np.float32(scale))
        empty = [self.class_names[c] for c in range(self.num_classes) if not pos[c].seen]
        if empty and (self.cfg.classes_without_positives == "error" or len(empty) == self.num_classes):
            raise DetectionError(f"svm: no positive (non-difficult GT) examples for class(es) {', '.join(empty)} "
                                 f"in the {n} training images; cannot train their SVMs")
        if empty:
            logger.warning("svm: no positive (non-difficult GT) examples for class(es) %s in the %d training "
                           "images: they stay untrained and never detect (svm.classes_without_positives=error "
                           "makes this an error)", ", ".join(empty), n)
        caches = []
        for c in range(self.num_classes):
            x = pos[c].rows()
            logger.info("%s: %d positives%s", self.class_names[c], len(x),
                        f" (a seeded subset of {pos[c].seen}: svm.max_positives)" if pos[c].seen > len(x) else "")
            caches.append(_ClassCache(pos=x, neg=np.zeros((0, dim), np.float32), neg_keys=np.zeros(0, np.int64)))
        return caches

    def _mine_image(self, i: int, dim: int, scale: float, weights: np.ndarray, biases: np.ndarray) -> int:
        """Add the hard negatives of image ``i`` to every class's cache; return how many."""
        cfg = self.cfg
        s = self.source.image(i)
        check_sample(s, i, dim, self.num_classes)
        if s.num_candidates == 0:
            return 0
        feats = s.candidate_features()                               # [M, D], a fresh array
        feats *= np.float32(scale)
        boxes = s.candidate_boxes()
        # Max IoU of each candidate with the GT of each class (difficult GT included: a window on
        # a difficult object is not a clean negative).
        overlap = np.zeros((len(boxes), self.num_classes))
        if len(s.gt_boxes):
            iou = box_iou_numpy(boxes, s.gt_boxes)                   # [M, G]
            for c in np.unique(s.gt_labels):
                overlap[:, c] = iou[:, s.gt_labels == c].max(axis=1)
        scores = feats @ weights.T + biases                          # [M, K]
        hard = (overlap < cfg.neg_iou) & (scores > cfg.hard_threshold)
        added = 0
        for c in self._active:            # an untrained class mines nothing (its zero model finds all hard)
            cache = self._caches[c]
            idx = np.flatnonzero(hard[:, c])
            if len(idx) == 0:
                continue
            keys = (np.int64(i) << _KEY_SHIFT) | idx.astype(np.int64)
            fresh = np.array([k not in cache.key_set for k in keys.tolist()], dtype=bool)
            if fresh.any():
                cache.add(keys[fresh], feats[idx[fresh]])
                added += int(fresh.sum())
                if cfg.max_negatives is not None and cache.num_neg > cfg.max_negatives:
                    cache.trim(cfg.max_negatives, weights[c], biases[c])
                cache.peak_cached = max(cache.peak_cached, cache.num_neg)
        return added

    def _retrain(self, c: int, weights: np.ndarray, biases: np.ndarray) -> None:
        """Fit class ``c`` on its positives + cached negatives, then evict easy negatives."""
        cfg, cache, name = self.cfg, self._caches[c], self.class_names[c]
        cache.consolidate()
        w, b, z_pos, z_neg = fit_linear_svm(cache.pos, cache.neg, cfg, name)
        weights[c], biases[c] = w, b
        cache.num_added = 0
        cache.retrains += 1
        cache.last = svm_objective(w, b, z_pos, z_neg, cfg)
        cached_before = len(cache.neg)
        cache.evict(z_neg < cfg.evict_threshold)
        last = cache.last
        logger.info("%s: retrained on %d pos + %d neg: objective %.4g (pos %.4g, neg %.4g, reg %.4g), "
                    "train accuracy %.4f; evicted %d easy negatives, %d cached",
                    name, len(z_pos), cached_before, last["objective"], last["pos_loss"], last["neg_loss"],
                    last["reg_loss"], last["train_accuracy"], cached_before - len(cache.neg), len(cache.neg))


def merge_class_svms(parts: Sequence[LinearSVMs]) -> LinearSVMs:
    """The SVMs of processes that each trained some of the classes (``classes=`` of
    :class:`SVMTrainer`, recorded in ``meta["trained_here"]``), as one: each class's row and
    statistics from the process that trained it. Every class must be trained by exactly one."""
    first = parts[0]
    k = len(first.biases)
    owner: dict[int, LinearSVMs] = {}
    for part in parts:
        for c in part.meta.get("trained_here", range(k)):
            if c in owner:
                raise DetectionError(f"svm: class {c} was trained by two processes")
            owner[c] = part
    if sorted(owner) != list(range(k)):
        raise DetectionError(f"svm: classes {sorted(set(range(k)) - set(owner))} were trained by no process")
    weights = np.stack([owner[c].weights[c] for c in range(k)])
    biases = np.array([owner[c].biases[c] for c in range(k)], dtype=first.biases.dtype)
    names = first.meta["classes"]
    meta = {key: value for key, value in first.meta.items() if key != "trained_here"}
    meta["stats"] = {names[c]: owner[c].meta["stats"][names[c]] for c in range(k)}
    meta["passes_done"] = max(p.meta["passes_done"] for p in parts)
    meta["converged"] = all(p.meta["converged"] for p in parts)
    return LinearSVMs(weights=weights, biases=biases, feature_scale=first.feature_scale, meta=meta)


def train_svms(source: FeatureSource, num_classes: int, cfg: SVMConfig = SVMConfig(), *,
               class_names: Sequence[str] | None = None, feature_scale: float | None = None,
               progress: bool = False, classes: Sequence[int] | None = None,
               count_sum: Callable[[int], int] | None = None) -> LinearSVMs:
    """Train one linear SVM per class with hard-negative mining (see the module docstring).

    Args:
        source: training features, one image at a time.
        num_classes: K (labels are 0..K-1; there is no background class).
        cfg: settings (defaults: the paper's).
        class_names: K names for messages and metadata.
        feature_scale: skip the norm estimate and use this scale.
        progress: tqdm bars.
        classes, count_sum: train only these classes, summing the pass counts over the
            processes that train the others (see :class:`SVMTrainer`).
    Returns:
        The SVMs: weights [K, D], biases [K], feature_scale, and per-class statistics in ``meta``.
    Raises:
        DetectionError: a class without positives or negatives, NaN/inf or all-zero features,
            inconsistent samples, an invalid config.
    """
    return SVMTrainer(source, num_classes, cfg, class_names, feature_scale, progress, classes, count_sum).train()
