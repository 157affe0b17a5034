"""Linear SVMs, one per class, trained with hard-negative mining (R-CNN / SPP-net recipe).

The trainer reads features through a :class:`~detection.training.samples.FeatureSource`, one
image at a time. Every class's positives and cached hard negatives are kept on disk
(:class:`_ClassStore`: ``.npy`` files with their CRC-32, in a folder of the run or a temporary
one), so memory holds one class being retrained and one block of images being mined, whatever
the number of classes (:func:`~detection.training.svm.svm_memory_bytes`).

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
   cache. The model starts at zero, so every negative of the first block scores 0 and is hard,
   which is how the reference seeds its caches. Beyond ``max_negatives`` (not in the reference)
   a cache keeps the hardest, those scoring highest under the current model.
4. The images are mined in blocks of ``mining_block`` (the one departure from the reference,
   which is a block of 1): every image of a block is scored with the model as it stood at the
   start of the block, then the block's hard negatives are added in image order. A class is
   retrained (on all its positives and cached negatives) after the first block, and after a
   block that brought its new hard negatives since its last retraining above 2,000. After each
   retraining, cached negatives scoring below -1.2 are evicted. After the pass, every class
   that gained negatives since its last retraining is retrained once more.
5. Each retraining is liblinear's L2-regularised L1-loss (hinge) dual SVM, ``-s 3 -c 1e-3 -w1 2
   -B 10``, through :class:`sklearn.svm.LinearSVC` (:func:`~detection.training.svm.fit_linear_svm`).

Several processes (:class:`~detection.training.samples.Ranks`, torchrun) share every step that
reads features by image: each reads its contiguous share of the feature sample, of each block of
positives and of each mining block; what it found is exchanged in image order, so each class's
owner (a contiguous share of the classes) adds exactly what one process would, retrains its
classes, and the new weights are exchanged after every block. A pass then costs each process
1/N of the reads (N up to ``mining_block``), and the SVMs are those of one process.

Example::

    source = ListFeatureSource(samples, dim=4096)
    svms = train_svms(source, num_classes=20, cfg=SVMConfig(), class_names=VOC_CLASSES)
    scores = svms.scores(fc7_features)          # [N, 20]
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .. import comm
from ..boxes import box_iou_numpy
from ..errors import CacheError, DetectionError
from ..io.files import (RunningChecksum, atomic_path, atomic_write_text, checksum_sidecar, make_dirs,
                        verify_checksum)
from ..linear import UNTRAINED_BIAS, LinearSVMs
from .samples import FeatureSource, Ranks, check_sample, compute_feature_scale
from .svm import SVMConfig, fit_linear_svm_rows, svm_objective

__all__ = ["SVMTrainer", "train_svms"]

logger = logging.getLogger(__name__)

#: Bits used to pack (image index, candidate index) into one int64 cache key.
_KEY_SHIFT = 32
#: Rows copied at a time between a cache file and memory.
_CHUNK_ROWS = 1024


def _write_rows(path: Path, parts: Iterable[np.ndarray], num_rows: int, dim: int) -> str:
    """Write the float32 rows of ``parts`` (arrays [n_i, D], ``num_rows`` in all) to ``path`` as
    one ``.npy`` [num_rows, D], a part at a time and atomically, and its checksum beside it
    (``<path>.crc32``); return the checksum, which the writer keeps to verify every read."""
    checksum_sidecar(path).unlink(missing_ok=True)
    checksum, rows = RunningChecksum(), 0
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                     "fortran_order": False, "shape": (num_rows, dim)})
            for part in parts:
                part = np.ascontiguousarray(part, dtype=np.float32)
                if part.ndim != 2 or part.shape[1] != dim:
                    raise ValueError(f"{path}: rows of shape {part.shape}, expected [n, {dim}]")
                checksum.update(part)
                f.write(memoryview(part.reshape(-1).view(np.uint8)) if part.size else b"")
                rows += len(part)
            if rows != num_rows:
                raise ValueError(f"{path}: {rows} rows written, {num_rows} announced")
    atomic_write_text(checksum_sidecar(path), checksum.value() + "\n")
    return checksum.value()


def _read_rows(path: Path, num_rows: int, dim: int, checksum: str) -> np.ndarray:
    """The memory-mapped rows of a cache file, its shape and bytes checked against what the
    writer recorded (CacheError naming the file: truncated, torn, a flipped byte, another run's)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CacheError(f"{path}: SVM cache file is missing") from None
    except Exception as e:  # noqa: BLE001 - a damaged header (numpy's tokenizer errors): no code ran
        raise CacheError(f"{path}: corrupt SVM cache file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
                         ) from None
    if arr.dtype != np.float32 or arr.shape != (num_rows, dim):
        raise CacheError(f"{path}: SVM cache file holds {arr.dtype} {tuple(arr.shape)}, expected float32 "
                         f"{(num_rows, dim)} (torn or another run's)")
    verify_checksum(path, arr, checksum, "SVM cache file")
    return arr


@dataclasses.dataclass
class _ClassStore:
    """Positives and the hard-negative cache of one class, kept on disk in ``folder``.

    The features (already scaled) are in ``.npy`` files: ``pos.npy``, and the negatives in the
    files of ``files`` (the cache as consolidated at the last retraining, then one file per
    block that added to it). In memory: each cached row's key, its score under the current model
    (what trimming ranks by) and whether it is still cached (trimmed and evicted rows stay in
    their file until they are the majority at a retraining, which then rewrites the cache).
    """

    folder: Path
    dim: int
    num_pos: int = 0
    pos_checksum: str = ""
    files: list[tuple[Path, int, str]] = dataclasses.field(default_factory=list)   # (path, rows, checksum)
    keys: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float64))
    alive: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))
    key_set: set[int] = dataclasses.field(default_factory=set)
    #: This block's additions, not yet written: (image of the block, its rows, first cache row).
    pending: list[tuple[int, np.ndarray, int]] = dataclasses.field(default_factory=list)
    next_file: int = 0
    weight: np.ndarray | None = None                     # the model of the last retraining
    bias: np.float32 = np.float32(0.0)
    num_added: int = 0                                   # since the last retraining
    retrains: int = 0
    peak_cached: int = 0
    evicted: int = 0
    dropped: int = 0                                     # trimmed by max_negatives
    last: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def num_neg(self) -> int:
        return len(self.key_set)

    def set_positives(self, rows: np.ndarray) -> None:
        self.num_pos = len(rows)
        self.pos_checksum = _write_rows(self.folder / "pos.npy", [rows], len(rows), self.dim)

    def _new_file(self, parts: Iterable[np.ndarray], num_rows: int) -> None:
        path = self.folder / f"neg_{self.next_file:06d}.npy"
        self.next_file += 1
        self.files.append((path, num_rows, _write_rows(path, parts, num_rows, self.dim)))

    def add(self, keys: np.ndarray, scores: np.ndarray, found: int, rows: np.ndarray) -> None:
        """Cache new hard negatives (keys not cached yet) with their scores under the current
        model: the rows ``rows`` of the block's ``found``-th image, written by :meth:`flush`."""
        self.pending.append((found, rows, len(self.keys)))
        self.keys = np.concatenate([self.keys, keys])
        self.scores = np.concatenate([self.scores, scores.astype(np.float64)])
        self.alive = np.concatenate([self.alive, np.ones(len(keys), bool)])
        self.key_set.update(keys.tolist())
        self.num_added += len(keys)

    def flush(self, found: Sequence["_Found"]) -> None:
        """Write the block's additions still cached (rows of the block's images ``found``; those
        trimmed within the block are never written) as one file."""
        if not self.pending:
            return
        base = self.pending[0][2]
        keep = self.alive[base:]
        parts = [(j, rows[self.alive[at: at + len(rows)]]) for j, rows, at in self.pending]
        self.keys = np.concatenate([self.keys[:base], self.keys[base:][keep]])
        self.scores = np.concatenate([self.scores[:base], self.scores[base:][keep]])
        self.alive = np.concatenate([self.alive[:base], np.ones(int(keep.sum()), bool)])
        self.pending = []
        if keep.any():
            self._new_file((found[j].feats[rows] for j, rows in parts if len(rows)), int(keep.sum()))

    def trim(self, cap: int) -> None:
        """Keep the ``cap`` cached negatives scoring highest under the current model (ties: the earlier)."""
        rows = np.flatnonzero(self.alive)
        if len(rows) <= cap:
            return
        drop = rows[np.argsort(-self.scores[rows], kind="stable")[cap:]]
        self.alive[drop] = False
        self.key_set.difference_update(self.keys[drop].tolist())
        self.dropped += len(drop)

    def training_rows(self) -> np.ndarray:
        """float64 array[P + N, D]: the positives, then the cached negatives in the order they
        were cached, read from disk in chunks (each file verified) into the array liblinear uses."""
        x = np.empty((self.num_pos + int(self.alive.sum()), self.dim), dtype=np.float64)
        _copy_rows(_read_rows(self.folder / "pos.npy", self.num_pos, self.dim, self.pos_checksum), None, x, 0)
        at, offset = self.num_pos, 0
        for path, n, checksum in self.files:
            keep = self.alive[offset: offset + n]
            if keep.any():
                at = _copy_rows(_read_rows(path, n, self.dim, checksum), keep, x, at)
            offset += n
        return x

    def replace_negatives(self, x_neg: np.ndarray, keep: np.ndarray, scores: np.ndarray) -> None:
        """After a retraining on ``x_neg`` (the cached rows, in order): only the rows ``keep``
        stay cached, scored ``scores``. Evicted rows stay in their files until they are the
        majority; then the cache is rewritten as one file of the rows kept (from ``x_neg``)."""
        rows = np.flatnonzero(self.alive)
        self.key_set.difference_update(self.keys[rows[~keep]].tolist())
        self.evicted += int((~keep).sum())
        self.alive[rows[~keep]] = False
        self.scores[rows] = scores
        if len(self.alive) <= 2 * len(self.key_set):
            return
        old, kept = self.files, np.flatnonzero(keep)
        self.files = []
        self.keys, self.scores = self.keys[rows[kept]], self.scores[rows[kept]]
        self.alive = np.ones(len(kept), bool)
        self._new_file((x_neg[kept[i: i + _CHUNK_ROWS]] for i in range(0, len(kept), _CHUNK_ROWS)), len(kept))
        for path, _, _ in old:
            path.unlink(missing_ok=True)
            checksum_sidecar(path).unlink(missing_ok=True)


def _copy_rows(src: np.ndarray, keep: np.ndarray | None, dst: np.ndarray, at: int) -> int:
    """Copy the rows of ``src`` (where ``keep``) into ``dst`` from row ``at`` on, a chunk at a
    time; return the next free row of ``dst``."""
    for start in range(0, len(src), _CHUNK_ROWS):
        chunk = src[start: start + _CHUNK_ROWS]
        if keep is not None:
            chunk = chunk[keep[start: start + _CHUNK_ROWS]]
        dst[at: at + len(chunk)] = chunk
        at += len(chunk)
    return at


class _Reservoir:
    """A seeded uniform random subset of at most ``cap`` rows of a stream (reservoir sampling,
    Algorithm R), returned in stream order; every row while there are at most ``cap``. The rows
    are kept in a scratch file (``path``), so memory holds their stream positions only."""

    def __init__(self, cap: int | None, dim: int, rng: np.random.Generator, path: Path) -> None:
        self.cap, self.dim, self.rng, self.path = cap, dim, rng, path
        self.index: list[int] = []                 # stream position of each slot
        self.seen = 0
        path.write_bytes(b"")

    def add(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        with open(self.path, "r+b") as f:
            for row in rows:
                t = self.seen
                self.seen += 1
                if self.cap is None or t < self.cap:
                    f.seek(len(self.index) * self.dim * 4)
                    f.write(row.tobytes())
                    self.index.append(t)
                    continue
                j = int(self.rng.integers(0, t + 1))
                if j < self.cap:
                    f.seek(j * self.dim * 4)
                    f.write(row.tobytes())
                    self.index[j] = t

    def rows(self) -> np.ndarray:
        """float32 array[min(seen, cap), D] in stream order; the scratch file is deleted."""
        x = np.fromfile(self.path, dtype=np.float32).reshape(-1, self.dim)
        if len(x) != len(self.index):
            raise CacheError(f"{self.path}: positives scratch file holds {len(x)} rows, {len(self.index)} written")
        self.path.unlink()
        return x[np.argsort(self.index, kind="stable")]


@dataclasses.dataclass
class _Found:
    """What one image gave the mining: its hard candidates for any class (``rows``, candidate
    indices), their scaled features, which class each is hard for, and their scores."""

    image: int
    rows: np.ndarray          # int64 [R]
    feats: np.ndarray         # float32 [R, D]
    hard: np.ndarray          # bool [R, K]
    scores: np.ndarray        # float32 [R, K]


class SVMTrainer:
    """Hard-negative mining + liblinear retraining for all classes in passes over the images.

    Use :func:`train_svms` unless you need to inspect the caches afterwards
    (:meth:`cached_negative_keys`).
    """

    def __init__(self, source: FeatureSource, num_classes: int, cfg: SVMConfig = SVMConfig(),
                 class_names: Sequence[str] | None = None, feature_scale: float | None = None,
                 progress: bool = False, ranks: Ranks = Ranks(), cache_dir: str | Path | None = None) -> None:
        """
        Args:
            source: the training images' features.
            num_classes: K, the number of object classes (labels 0..K-1; no background class).
            cfg: training settings.
            class_names: K names for messages and the model's metadata (default ``class_<k>``).
            feature_scale: use this scale instead of estimating it (e.g. one computed before).
            progress: show tqdm bars.
            ranks: the processes sharing the work (default: this one alone); every one of them
                must call :meth:`train` with the same arguments, and every one gets all the SVMs.
            cache_dir: where the classes' caches go (``class_<k>/``, cleared first by the class's
                owner, removed at the end); default: a temporary folder.
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
        self.ranks = ranks
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._given_scale = feature_scale
        self._stores: dict[int, _ClassStore] = {}
        lo, hi = comm.shard_bounds(num_classes, ranks.rank, ranks.world)
        self._owned = list(range(lo, hi))
        self.converged = False
        self.passes_done = 0

    # -- public ---------------------------------------------------------------------------------
    def train(self) -> LinearSVMs:
        """Run the whole recipe and return the SVMs (see the module docstring)."""
        if self.cache_dir is not None:
            return self._train(self.cache_dir)
        with tempfile.TemporaryDirectory(prefix="svm_cache_") as tmp:
            return self._train(Path(tmp))

    def _train(self, cache_dir: Path) -> LinearSVMs:
        cfg, k_cls, dim = self.cfg, self.num_classes, int(self.source.dim)
        n = self.source.num_images()
        if n == 0:
            raise DetectionError("svm: the feature source has no images")
        logger.info("training %d linear SVMs on %d images, %d-d features: %s", k_cls, n, dim, cfg)
        if self._given_scale is not None:
            scale, mean_norm = float(self._given_scale), None
        else:
            scale, mean_norm = compute_feature_scale(self.source, cfg.target_norm, cfg.norm_images,
                                                     cfg.norm_boxes_per_image, cfg.seed, self.progress, self.ranks)
            logger.info("mean feature norm %.4g -> feature scale %.6g (target norm %g)", mean_norm, scale,
                        cfg.target_norm)
        self.feature_scale = scale
        # A rerun never reads a file of an earlier run: every owner starts its classes' folders
        # empty (and every read is checked against the checksum this run recorded).
        for c in self._owned:
            folder = cache_dir / f"class_{c}"
            if folder.exists():
                shutil.rmtree(folder)
            self._stores[c] = _ClassStore(make_dirs(folder), dim)
        try:
            return self._mine(n, dim, scale, mean_norm)
        finally:
            for c in self._owned:
                shutil.rmtree(cache_dir / f"class_{c}", ignore_errors=True)
            with contextlib.suppress(OSError):          # the last rank to finish removes the folder
                cache_dir.rmdir()

    def _mine(self, n: int, dim: int, scale: float, mean_norm: float | None) -> LinearSVMs:
        cfg, k_cls = self.cfg, self.num_classes
        untrained = self._collect_positives(n, dim, scale)
        weights = np.zeros((k_cls, dim), dtype=np.float32)   # the zero model: every negative is hard
        biases = np.zeros(k_cls, dtype=np.float32)
        biases[untrained] = UNTRAINED_BIAS
        active = [c for c in range(k_cls) if c not in untrained]
        mine = [c for c in self._owned if c not in untrained]
        trained = {c: False for c in mine}
        block = cfg.mining_block

        self.converged = False
        for p in range(cfg.passes):
            added_here = 0
            for start in tqdm(range(0, n, block), desc=f"hard negatives {p + 1}/{cfg.passes}",
                              disable=not self.progress):
                images = range(start, min(n, start + block))
                lo, hi = self.ranks.bounds(len(images))
                found = self.ranks.exchange(
                    lambda: [self._mine_image(i, dim, scale, weights, biases, active) for i in images[lo:hi]],
                    "svm: exchanging a block's hard negatives")
                found = [f for part in found for f in part]             # the block's images in order
                for j in range(len(found)):
                    added_here += self._add_found(found, j, mine)
                for c in mine:
                    self._stores[c].flush(found)
                del found
                first_block = p == 0 and start == 0
                due = [c for c in mine if self._stores[c].num_neg and
                       (first_block or self._stores[c].num_added > cfg.retrain_every)]
                self._retrain_and_share(due, weights, biases, trained)
            self.passes_done = p + 1
            # End of a pass: bring every class up to date with what it gained.
            due = [c for c in mine if self._stores[c].num_neg and
                   (self._stores[c].num_added > 0 or not trained[c])]
            added_in_pass = self._retrain_and_share(due, weights, biases, trained, added_here)
            logger.info("pass %d: %d new hard negatives", p + 1, added_in_pass)
            if p > 0 and added_in_pass == 0:
                # The model that mined this pass found nothing new and was not changed: converged.
                self.converged = True
                break

        here = {c: dict(self._stores[c].last, num_pos=self._stores[c].num_pos, num_neg_cached=self._stores[c].num_neg,
                        peak_cached=self._stores[c].peak_cached, evicted=self._stores[c].evicted,
                        dropped=self._stores[c].dropped, retrains=self._stores[c].retrains) for c in self._owned}
        missing = [c for c in mine if not trained[c]]
        everywhere = self.ranks.all_gather((here, missing), "svm: gathering every class's statistics")
        missing = sorted(c for _, m in everywhere for c in m)
        if missing:
            raise DetectionError(f"svm: no negatives (IoU < {cfg.neg_iou} with its GT) for class(es) "
                                 f"{', '.join(self.class_names[c] for c in missing)}; every candidate window "
                                 "overlaps them")
        per_class = {c: st for h, _ in everywhere for c, st in h.items()}
        stats = {self.class_names[c]: per_class[c] for c in range(k_cls)}
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
        """int64 array[N, 2] of ``(image index, candidate index)`` cached for class ``c`` (one of
        this process's classes) after :meth:`train`; the candidate index counts GT boxes first,
        then proposals."""
        keys = np.array(sorted(self._stores[c].key_set), dtype=np.int64)
        return np.stack([keys >> _KEY_SHIFT, keys & ((1 << _KEY_SHIFT) - 1)], axis=1)

    def peak_cached(self, c: int) -> int:
        """The most negatives class ``c``'s cache held at any time."""
        return self._stores[c].peak_cached

    # -- steps ----------------------------------------------------------------------------------
    def _collect_positives(self, n: int, dim: int, scale: float) -> list[int]:
        """Fill each owned class's positives; return the classes without any (every process
        sees every class's count)."""
        cfg = self.cfg
        reservoirs = {c: _Reservoir(cfg.max_positives, dim, np.random.default_rng([cfg.seed, c]),
                                    self._stores[c].folder / "pos.scratch") for c in self._owned}
        seen = np.zeros(self.num_classes, np.int64)

        def read(images: range) -> list[tuple[np.ndarray, np.ndarray]]:
            out = []
            for i in images:
                s = self.source.image(i, with_proposals=False)
                check_sample(s, i, dim, self.num_classes)
                keep = np.ones(len(s.gt_labels), bool) if cfg.use_difficult else ~s.gt_difficult
                out.append((s.gt_labels[keep], s.gt_features[keep] * np.float32(scale)))
            return out

        block = cfg.mining_block
        for start in tqdm(range(0, n, block), desc="positives", disable=not self.progress):
            images = range(start, min(n, start + block))
            lo, hi = self.ranks.bounds(len(images))
            for part in self.ranks.exchange(lambda: read(images[lo:hi]), "svm: exchanging a block's positives"):
                for labels, feats in part:
                    seen += np.bincount(labels, minlength=self.num_classes)
                    for c in np.unique(labels):
                        if int(c) in reservoirs:
                            reservoirs[int(c)].add(feats[labels == c])
        empty = [self.class_names[c] for c in range(self.num_classes) if not seen[c]]
        if empty and (cfg.classes_without_positives == "error" or len(empty) == self.num_classes):
            raise DetectionError(f"svm: no positive (non-difficult GT) examples for class(es) {', '.join(empty)} "
                                 f"in the {n} training images; cannot train their SVMs")
        if empty:
            logger.warning("svm: no positive (non-difficult GT) examples for class(es) %s in the %d training "
                           "images: they stay untrained and never detect (svm.classes_without_positives=error "
                           "makes this an error)", ", ".join(empty), n)
        for c, reservoir in reservoirs.items():
            x = reservoir.rows()
            logger.info("%s: %d positives%s", self.class_names[c], len(x),
                        f" (a seeded subset of {reservoir.seen}: svm.max_positives)" if reservoir.seen > len(x) else "")
            self._stores[c].set_positives(x)
        return [c for c in range(self.num_classes) if not seen[c]]

    def _mine_image(self, i: int, dim: int, scale: float, weights: np.ndarray, biases: np.ndarray,
                    active: Sequence[int]) -> _Found:
        """Image ``i``'s hard negatives for every class under the model ``(weights, biases)``."""
        cfg = self.cfg
        s = self.source.image(i)
        check_sample(s, i, dim, self.num_classes)
        k = self.num_classes
        if s.num_candidates == 0 or not active:
            return _Found(i, np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros((0, k), bool),
                          np.zeros((0, k), np.float32))
        feats = s.candidate_features()                               # [M, D], a fresh array
        feats *= np.float32(scale)
        boxes = s.candidate_boxes()
        # Max IoU of each candidate with the GT of each class (difficult GT included: a window on
        # a difficult object is not a clean negative).
        overlap = np.zeros((len(boxes), k))
        if len(s.gt_boxes):
            iou = box_iou_numpy(boxes, s.gt_boxes)                   # [M, G]
            for c in np.unique(s.gt_labels):
                overlap[:, c] = iou[:, s.gt_labels == c].max(axis=1)
        scores = feats @ weights.T + biases                          # [M, K], one image at a time on any rank
        hard = (overlap < cfg.neg_iou) & (scores > cfg.hard_threshold)
        # An untrained class mines nothing (its zero model would find everything hard).
        inactive = np.ones(k, bool)
        inactive[list(active)] = False
        hard[:, inactive] = False
        rows = np.flatnonzero(hard.any(axis=1))
        return _Found(i, rows.astype(np.int64), feats[rows], hard[rows], scores[rows].astype(np.float32))

    def _add_found(self, found: Sequence[_Found], j: int, classes: Sequence[int]) -> int:
        """Add the hard negatives of the block's ``j``-th image for ``classes`` (owned here) to
        their caches; return how many."""
        cfg, f, added = self.cfg, found[j], 0
        for c in classes:
            store = self._stores[c]
            pos = np.flatnonzero(f.hard[:, c])
            if len(pos) == 0:
                continue
            keys = (np.int64(f.image) << _KEY_SHIFT) | f.rows[pos]
            fresh = np.array([key not in store.key_set for key in keys.tolist()], dtype=bool)
            if fresh.any():
                store.add(keys[fresh], f.scores[pos[fresh], c], j, pos[fresh])
                added += int(fresh.sum())
                if cfg.max_negatives is not None and store.num_neg > cfg.max_negatives:
                    store.trim(cfg.max_negatives)
                store.peak_cached = max(store.peak_cached, store.num_neg)
        return added

    def _retrain_and_share(self, due: Sequence[int], weights: np.ndarray, biases: np.ndarray,
                           trained: dict[int, bool], count: int = 0) -> int:
        """Retrain the classes ``due`` (owned here), then give every process every new model;
        return ``count`` summed over the processes."""
        for c in due:
            self._retrain(c)
            trained[c] = True
        new = {c: (self._stores[c].weight, self._stores[c].bias) for c in due}
        total = 0
        for part, n in self.ranks.all_gather((new, count), "svm: exchanging the retrained classes"):
            for c, (w, b) in part.items():
                weights[c], biases[c] = w, b
            total += n
        return total

    def _retrain(self, c: int) -> None:
        """Fit class ``c`` on its positives + cached negatives, then evict easy negatives."""
        cfg, store, name = self.cfg, self._stores[c], self.class_names[c]
        x = store.training_rows()
        w, b, z_pos, z_neg = fit_linear_svm_rows(x, store.num_pos, cfg, name)
        store.weight, store.bias = w, b
        store.num_added = 0
        store.retrains += 1
        store.last = svm_objective(w, b, z_pos, z_neg, cfg)
        cached_before = len(z_neg)
        store.replace_negatives(x[store.num_pos:], z_neg >= cfg.evict_threshold, z_neg)
        del x
        last = store.last
        logger.info("%s: retrained on %d pos + %d neg: objective %.4g (pos %.4g, neg %.4g, reg %.4g), "
                    "train accuracy %.4f; evicted %d easy negatives, %d cached",
                    name, len(z_pos), cached_before, last["objective"], last["pos_loss"], last["neg_loss"],
                    last["reg_loss"], last["train_accuracy"], cached_before - store.num_neg, store.num_neg)


def train_svms(source: FeatureSource, num_classes: int, cfg: SVMConfig = SVMConfig(), *,
               class_names: Sequence[str] | None = None, feature_scale: float | None = None,
               progress: bool = False, ranks: Ranks = Ranks(), cache_dir: str | Path | None = None) -> LinearSVMs:
    """Train one linear SVM per class with hard-negative mining (see the module docstring).

    Args:
        source: training features, one image at a time.
        num_classes: K (labels are 0..K-1; there is no background class).
        cfg: settings (defaults: the paper's).
        class_names: K names for messages and metadata.
        feature_scale: skip the norm estimate and use this scale.
        progress: tqdm bars.
        ranks: the processes sharing the work (default: this one alone; see :class:`SVMTrainer`).
        cache_dir: the folder of the classes' on-disk caches (default: a temporary one).
    Returns:
        The SVMs: weights [K, D], biases [K], feature_scale, and per-class statistics in ``meta``.
    Raises:
        DetectionError: a class without positives or negatives, NaN/inf or all-zero features,
            inconsistent samples, an invalid config.
    """
    return SVMTrainer(source, num_classes, cfg, class_names, feature_scale, progress, ranks, cache_dir).train()
