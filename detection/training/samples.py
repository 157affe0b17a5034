"""What the trainers read: the features of one training image (:class:`ImageSample`), the
:class:`FeatureSource` protocol that serves them one image at a time, and the steps every
trainer shares (sample checks, the norm-20 feature scale).

The trainers do not care where features come from (conv-map cache + SPP + fc layers, an
in-memory list, a synthetic generator): they read them through a :class:`FeatureSource`, one
image at a time, so memory is bounded by one image's windows, never by the dataset.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np
from tqdm import tqdm

from .. import comm
from ..errors import DetectionError

__all__ = ["ImageSample", "FeatureSource", "ListFeatureSource", "Ranks", "check_sample", "compute_feature_scale",
           "candidate_boxes"]

T = TypeVar("T")


def _alone(value: Any, what: str) -> list[Any]:
    return [value]


@dataclasses.dataclass(frozen=True)
class Ranks:
    """The processes that share the reading of a training set: this one's ``rank``, their number
    ``world``, and ``all_gather(value, what)``, every rank's value in rank order on every rank.

    The default is one process alone; :meth:`of_comm` is the torchrun process group
    (:mod:`detection.comm`). Work is shared out by :meth:`bounds` (contiguous pieces), so a
    result put back together in rank order is in the order of the items.
    """

    rank: int = 0
    world: int = 1
    all_gather: Callable[[Any, str], list[Any]] = _alone

    @classmethod
    def of_comm(cls) -> "Ranks":
        return cls(comm.rank(), comm.world_size(), comm.all_gather if comm.world_size() > 1 else _alone)

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's share of ``n`` items."""
        return comm.shard_bounds(n, self.rank, self.world)

    def exchange(self, compute: Callable[[], T], what: str) -> list[T]:
        """Every rank's ``compute()`` in rank order. A :class:`DetectionError` of one rank (bad
        features of an image it read) is raised on every rank, the first in rank order, so all
        stop with the message one process would give instead of waiting for it."""
        try:
            mine: tuple[Any, str | None] = (compute(), None)
        except DetectionError as e:
            mine = (None, str(e))
        parts = self.all_gather(mine, what)
        for _, error in parts:
            if error is not None:
                raise DetectionError(error)
        return [value for value, _ in parts]


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
    rows only; :func:`compute_feature_scale` then uses it. And ``candidate_boxes(i)``, the boxes
    without features, which :func:`candidate_boxes` (box-regression planning) then uses.
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
                          seed: int, progress: bool = False, ranks: Ranks = Ranks()) -> tuple[float, float]:
    """The scalar that brings the mean L2 norm of training features to ``target_norm``.

    As SPP-net's ``spp_feature_stats.m``: a random sample of up to ``num_images`` images, and up to
    ``boxes_per_image`` random candidates (GT + proposals) of each. With several ``ranks`` each
    computes the features of its share of the sampled images (the rows are drawn first, from the
    boxes alone, so every number of ranks samples the same rows and gives the same scale).

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
    picks = [int(i) for i in np.sort(rng.choice(n, size=min(n, num_images), replace=False))]

    def draw(m: int) -> np.ndarray:
        return rng.choice(m, size=min(m, boxes_per_image), replace=False)

    # Alone, the rows of each image are drawn as it is read. Shared out, every rank first draws
    # the rows of every sampled image, in image order from the one generator (from the number of
    # candidates, which needs no features), then reads its share.
    drawn: list[Callable[[int], np.ndarray]] = [draw] * len(picks)
    if ranks.world > 1:
        drawn = []
        for i in picks:
            _, gt, _, _, props = candidate_boxes(source, i)
            m = len(gt) + len(props)
            rows = draw(m) if m else np.zeros(0, np.int64)
            drawn.append(lambda _, rows=rows: rows)
    start, stop = ranks.bounds(len(picks))
    # A source that can pool chosen rows only (``sample_candidates``) saves pooling the rest:
    # the rows drawn, and so the result, are the same.
    sample = getattr(source, "sample_candidates", None)

    def norms_here() -> list[np.ndarray]:
        out = []
        for i, choose in tqdm(list(zip(picks, drawn))[start:stop], desc="feature norm", disable=not progress):
            if sample is not None:
                key, feats = sample(i, choose)
            else:
                s = source.image(i)
                key, feats = s.key, s.candidate_features()
                if len(feats):
                    feats = feats[choose(len(feats))]
            if len(feats) == 0:
                continue
            if not np.isfinite(feats).all():
                raise DetectionError(f"image {key} (index {i}): features contain NaN or inf")
            out.append(np.linalg.norm(feats.astype(np.float64), axis=1))
        return out

    norms = [x for part in ranks.exchange(norms_here, "feature scale: gathering the sampled norms") for x in part]
    if not norms:
        raise DetectionError("the feature source returned no features (no GT boxes and no proposals)")
    mean_norm = float(np.concatenate(norms).mean())
    if not mean_norm > 0.0:
        raise DetectionError(f"the mean L2 norm of the sampled features is {mean_norm}: all-zero features "
                             "cannot be rescaled (is the feature extractor producing zeros?)")
    return target_norm / mean_norm, mean_norm


def candidate_boxes(source: FeatureSource, i: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(key, gt_boxes, gt_labels, gt_difficult, proposals) of image ``i``, without features when
    the source can (``candidate_boxes``)."""
    fast = getattr(source, "candidate_boxes", None)
    if fast is not None:
        return fast(i)
    s = source.image(i)
    return s.key, s.gt_boxes, s.gt_labels, s.gt_difficult, s.boxes
