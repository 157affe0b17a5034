"""Linear SVMs, one per class, trained with hard-negative mining (R-CNN / SPP-net recipe).

The trainer reads features through a small :class:`FeatureSource` protocol, one image at a time,
so it does not care where features come from (conv-map cache + SPP + fc layers, an in-memory
list, a synthetic generator). Memory is bounded by the settings: at most ``max_positives``
positives and ``max_negatives`` cached hard negatives per class (:func:`svm_memory_bytes`); the
features of one image are dropped as soon as it has been mined.

The recipe (R-CNN ``rcnn_train.m``, SPP-net ``spp_train.m``; reference doc section 7):

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
   -B 10``, through :class:`sklearn.svm.LinearSVC`.

Example::

    source = ListFeatureSource(samples, dim=4096)
    svms = train_svms(source, num_classes=20, cfg=SVMConfig(), class_names=VOC_CLASSES)
    scores = svms.scores(fc7_features)          # [N, 20]
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC
from tqdm import tqdm

from .boxes import box_iou_numpy
from .errors import DetectionError, ModelError

__all__ = [
    "ImageSample",
    "FeatureSource",
    "ListFeatureSource",
    "SVMConfig",
    "LinearSVMs",
    "SVMTrainer",
    "train_svms",
    "compute_feature_scale",
    "check_sample",
    "fit_linear_svm",
    "svm_objective",
    "svm_memory_bytes",
]

logger = logging.getLogger(__name__)

#: Bits used to pack (image index, candidate index) into one int64 cache key.
_KEY_SHIFT = 32

#: Bias of a class left untrained (no positives): with zero weights every window scores this,
#: far below any score threshold (the detector's is -1.5), so the class never detects.
UNTRAINED_BIAS = -1e4


# --------------------------------------------------------------------------------------------
# The feature source: what the trainers need from the rest of the pipeline
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ImageSample:
    """Ground truth, proposals and their features for one training image.

    All boxes use the library convention (0-based continuous ``x1, y1, x2, y2``).

    Attributes:
        key: the record's key (image id, ``_flip`` suffix for mirrored images); used in messages.
        gt_boxes: float array[G, 4], every ground-truth object, difficult ones included.
        gt_labels: int array[G], 0-based class indices.
        gt_features: float32 array[G, D], features of the ground-truth boxes.
        boxes: float array[P, 4], proposals (may be empty, see ``FeatureSource.image``).
        features: float32 array[P, D], features of the proposals (unscaled).
        gt_difficult: bool array[G]; ``None`` means no object is difficult.
    """

    key: str
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    gt_features: np.ndarray
    boxes: np.ndarray
    features: np.ndarray
    gt_difficult: np.ndarray | None = None

    def __post_init__(self) -> None:
        def arr(name: str, dtype: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
            a = np.asarray(getattr(self, name), dtype=dtype)
            if shape is not None:
                a = a.reshape(shape)
            object.__setattr__(self, name, a)
            return a

        gb = arr("gt_boxes", np.float64, (-1, 4))
        gl = arr("gt_labels", np.int64, (-1,))
        gf = arr("gt_features", np.float32)
        pb = arr("boxes", np.float64, (-1, 4))
        pf = arr("features", np.float32)
        if self.gt_difficult is None:
            object.__setattr__(self, "gt_difficult", np.zeros(len(gb), dtype=bool))
        gd = arr("gt_difficult", bool, (-1,))
        g, p = len(gb), len(pb)
        if gf.ndim != 2 or pf.ndim != 2:
            raise DetectionError(f"image {self.key}: features must be 2-D arrays [N, D], "
                                 f"got gt {gf.shape} and proposals {pf.shape}")
        if not (len(gl) == len(gd) == gf.shape[0] == g):
            raise DetectionError(f"image {self.key}: {g} GT boxes but {len(gl)} labels, {len(gd)} difficult "
                                 f"flags and {gf.shape[0]} GT feature rows")
        if pf.shape[0] != p:
            raise DetectionError(f"image {self.key}: {p} proposals but {pf.shape[0]} feature rows")
        if g and p and gf.shape[1] != pf.shape[1]:
            raise DetectionError(f"image {self.key}: GT features have {gf.shape[1]} dims, proposals {pf.shape[1]}")

    @property
    def num_candidates(self) -> int:
        """GT boxes + proposals: the rows of :meth:`candidate_features`."""
        return len(self.gt_boxes) + len(self.boxes)

    def candidate_boxes(self) -> np.ndarray:
        """float64 array[G + P, 4]: the GT boxes followed by the proposals."""
        return np.concatenate([self.gt_boxes, self.boxes], axis=0)

    def candidate_features(self) -> np.ndarray:
        """float32 array[G + P, D]: GT features followed by proposal features."""
        return np.concatenate([self.gt_features, self.features], axis=0)


@runtime_checkable
class FeatureSource(Protocol):
    """Where the trainers read features from, one image at a time.

    ``dim`` is the feature length D. ``image(i)`` must return the same features every time it is
    called for the same ``i`` (the trainers read an image more than once: for the feature
    statistics, for the positives, for mining). With ``with_proposals=False`` the caller only needs
    the ground truth, so the source may return empty ``boxes``/``features`` and skip the
    expensive proposal features. A source may also offer ``sample_candidates(i, choose)``,
    returning ``(key, features of candidate rows choose(num_candidates))`` computed for those
    rows only; :func:`compute_feature_scale` then uses it.
    """

    dim: int

    def num_images(self) -> int: ...

    def image(self, index: int, *, with_proposals: bool = True) -> ImageSample: ...


class ListFeatureSource:
    """A :class:`FeatureSource` over samples already in memory (tests, small datasets)."""

    def __init__(self, samples: Sequence[ImageSample], dim: int) -> None:
        self.samples = list(samples)
        self.dim = int(dim)

    def num_images(self) -> int:
        return len(self.samples)

    def image(self, index: int, *, with_proposals: bool = True) -> ImageSample:
        return self.samples[index]

    def __repr__(self) -> str:
        return f"ListFeatureSource(num_images={len(self.samples)}, dim={self.dim})"


def check_sample(sample: ImageSample, index: int, dim: int, num_classes: int) -> None:
    """Raise :class:`DetectionError` if a sample cannot be trained on (wrong D, bad labels, NaN/inf)."""
    where = f"image {sample.key} (index {index})"
    for name, f in (("GT", sample.gt_features), ("proposal", sample.features)):
        if f.shape[0] and f.shape[1] != dim:
            raise DetectionError(f"{where}: {name} features have {f.shape[1]} dims, the source says {dim}")
        if not np.isfinite(f).all():
            raise DetectionError(f"{where}: {name} features contain NaN or inf")
    if len(sample.gt_labels) and (sample.gt_labels.min() < 0 or sample.gt_labels.max() >= num_classes):
        raise DetectionError(f"{where}: GT label out of range [0, {num_classes}): {sample.gt_labels.tolist()}")
    if not (np.isfinite(sample.gt_boxes).all() and np.isfinite(sample.boxes).all()):
        raise DetectionError(f"{where}: boxes contain NaN or inf")


def compute_feature_scale(source: FeatureSource, target_norm: float, num_images: int, boxes_per_image: int,
                          seed: int, progress: bool = False) -> tuple[float, float]:
    """The scalar that brings the mean L2 norm of training features to ``target_norm``.

    As SPP-net's ``spp_feature_stats.m``: a random sample of up to ``num_images`` images, and up to
    ``boxes_per_image`` random candidates (GT + proposals) of each.

    Returns:
        ``(scale, mean_norm)`` with ``scale = target_norm / mean_norm``.
    Raises:
        DetectionError: no features at all, NaN/inf features, or a mean norm of 0 (all-zero
            features cannot be scaled to norm ``target_norm``).
    """
    rng = np.random.default_rng(seed)
    n = source.num_images()
    if n == 0:
        raise DetectionError("the feature source has no images")
    picks = np.sort(rng.choice(n, size=min(n, num_images), replace=False))
    norms: list[np.ndarray] = []
    # A source that can pool chosen rows only (``sample_candidates``) saves pooling the rest:
    # the rows drawn, and so the result, are the same.
    sample = getattr(source, "sample_candidates", None)
    for i in tqdm(picks, desc="feature norm", disable=not progress):
        if sample is not None:
            key, feats = sample(int(i), lambda n: rng.choice(n, size=min(n, boxes_per_image), replace=False))
        else:
            s = source.image(int(i))
            key, feats = s.key, s.candidate_features()
            if len(feats):
                feats = feats[rng.choice(len(feats), size=min(len(feats), boxes_per_image), replace=False)]
        if len(feats) == 0:
            continue
        if not np.isfinite(feats).all():
            raise DetectionError(f"image {key} (index {i}): features contain NaN or inf")
        norms.append(np.linalg.norm(feats.astype(np.float64), axis=1))
    if not norms:
        raise DetectionError("the feature source returned no features (no GT boxes and no proposals)")
    mean_norm = float(np.concatenate(norms).mean())
    if not mean_norm > 0.0:
        raise DetectionError(f"the mean L2 norm of the sampled features is {mean_norm}: all-zero features "
                             "cannot be rescaled (is the feature extractor producing zeros?)")
    return target_norm / mean_norm, mean_norm


# --------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SVMConfig:
    """SVM training settings; defaults are the R-CNN / SPP-net values (reference doc section 7)."""

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
        if self.retrain_every < 1 or self.passes < 1 or self.max_iter < 1:
            raise DetectionError("svm: retrain_every, passes and max_iter must be >= 1")
        if self.norm_images < 1 or self.norm_boxes_per_image < 1:
            raise DetectionError("svm: norm_images and norm_boxes_per_image must be >= 1")
        for name in ("max_positives", "max_negatives"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DetectionError(f"svm: {name} must be >= 1 or null, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True, eq=False)
class LinearSVMs:
    """One linear SVM per class, applied to features multiplied by ``feature_scale``.

    ``score[n, k] = feature_scale * features[n] . weights[k] + biases[k]``.

    Attributes:
        weights: float32 array[K, D].
        biases: float32 array[K].
        feature_scale: the scalar applied to raw features (``target_norm / mean_norm``).
        meta: JSON-able training record: config, class names, mean norm, per-class statistics.
    """

    weights: np.ndarray
    biases: np.ndarray
    feature_scale: float
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weights, dtype=np.float32)
        b = np.ascontiguousarray(self.biases, dtype=np.float32).reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ModelError(f"SVM weights [K, D] and biases [K] do not fit: {w.shape} and {b.shape}")
        if not (math.isfinite(self.feature_scale) and self.feature_scale > 0):
            raise ModelError(f"SVM feature_scale must be a positive number, got {self.feature_scale}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "biases", b)
        object.__setattr__(self, "feature_scale", float(self.feature_scale))

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.weights.shape[1]

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """SVM scores of raw (unscaled) features.

        Args:
            features: array or tensor [N, D] (a tensor stays on its device).
        Returns:
            float32 array / tensor [N, K].
        """
        if features.shape[-1] != self.dim:
            raise ModelError(f"features have {features.shape[-1]} dims, the SVMs expect {self.dim}")
        if isinstance(features, torch.Tensor):
            w = torch.from_numpy(self.weights).to(features.device, torch.float32)
            b = torch.from_numpy(self.biases).to(features.device, torch.float32)
            return (features.float() @ w.T) * self.feature_scale + b
        f = np.asarray(features, dtype=np.float32)
        return (f @ self.weights.T) * np.float32(self.feature_scale) + self.biases

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"weight": [K, D], "bias": [K]}`` for the model file (prefix them with ``svm.``)."""
        return {"weight": torch.from_numpy(self.weights.copy()), "bias": torch.from_numpy(self.biases.copy())}

    def to_meta(self) -> dict[str, Any]:
        """JSON-able metadata for the model file (feature scale + training record)."""
        return {"feature_scale": self.feature_scale, **self.meta}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "LinearSVMs":
        """Inverse of :meth:`tensors` + :meth:`to_meta`.

        Raises:
            ModelError: a tensor or the feature scale is missing or of the wrong shape.
        """
        try:
            w = tensors["weight"].detach().cpu().numpy()
            b = tensors["bias"].detach().cpu().numpy()
            scale = float(meta["feature_scale"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"SVM state is incomplete: {e!r}") from None
        rest = {k: v for k, v in meta.items() if k != "feature_scale"}
        return cls(weights=w, biases=b, feature_scale=scale, meta=rest)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
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
                 progress: bool = False) -> None:
        """
        Args:
            source: the training images' features.
            num_classes: K, the number of object classes (labels 0..K-1; no background class).
            cfg: training settings.
            class_names: K names for messages and the model's metadata (default ``class_<k>``).
            feature_scale: use this scale instead of estimating it (e.g. one computed before).
            progress: show tqdm bars.
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
        self._active = [c for c in range(k_cls) if c not in untrained]

        self.converged = False
        for p in range(cfg.passes):
            added_in_pass = 0
            for i in tqdm(range(n), desc=f"hard negatives {p + 1}/{cfg.passes}", disable=not self.progress):
                added_in_pass += self._mine_image(i, dim, scale, weights, biases)
                first_image = p == 0 and i == 0
                for c, cache in enumerate(self._caches):
                    if c in untrained:
                        continue
                    if cache.num_neg and (first_image or cache.num_added > cfg.retrain_every):
                        self._retrain(c, weights, biases)
                        trained[c] = True
            self.passes_done = p + 1
            # End of a pass: bring every class up to date with what it gained.
            for c, cache in enumerate(self._caches):
                if c in untrained:
                    continue
                if cache.num_neg and (cache.num_added > 0 or not trained[c]):
                    self._retrain(c, weights, biases)
                    trained[c] = True
            logger.info("pass %d: %d new hard negatives", p + 1, added_in_pass)
            if p > 0 and added_in_pass == 0:
                # The model that mined this pass found nothing new and was not changed: converged.
                self.converged = True
                break
        missing = [self.class_names[c] for c in range(k_cls) if not trained[c] and c not in untrained]
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
    x = np.concatenate([x_pos, x_neg], axis=0, dtype=np.float64)
    y = np.concatenate([np.ones(len(x_pos)), -np.ones(len(x_neg))])
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
    return w, b, z[:len(x_pos)], z[len(x_pos):]


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


def svm_memory_bytes(cfg: SVMConfig, num_classes: int, dim: int, max_candidates: int) -> int | None:
    """Bytes the SVM training holds at most (None: unbounded, a cap is null): every class's
    float32 positives and negatives, one image's candidate features (read and scaled) plus a
    cache being trimmed, and one retraining (liblinear takes a float64 copy, 8 bytes per element,
    and builds its own sparse copy, 16 bytes per non-zero: counted as if all were non-zero)."""
    if cfg.max_positives is None or cfg.max_negatives is None:
        return None
    rows = cfg.max_positives + cfg.max_negatives
    caches = num_classes * rows * dim * 4
    image = 2 * max_candidates * dim * 4 + (cfg.max_negatives + max_candidates) * dim * 4
    retrain = rows * dim * (8 + 16)
    return caches + image + retrain


def train_svms(source: FeatureSource, num_classes: int, cfg: SVMConfig = SVMConfig(), *,
               class_names: Sequence[str] | None = None, feature_scale: float | None = None,
               progress: bool = False) -> LinearSVMs:
    """Train one linear SVM per class with hard-negative mining (see the module docstring).

    Args:
        source: training features, one image at a time.
        num_classes: K (labels are 0..K-1; there is no background class).
        cfg: settings (defaults: the paper's).
        class_names: K names for messages and metadata.
        feature_scale: skip the norm estimate and use this scale.
        progress: tqdm bars.
    Returns:
        The SVMs: weights [K, D], biases [K], feature_scale, and per-class statistics in ``meta``.
    Raises:
        DetectionError: a class without positives or negatives, NaN/inf or all-zero features,
            inconsistent samples, an invalid config.
    """
    return SVMTrainer(source, num_classes, cfg, class_names, feature_scale, progress).train()
