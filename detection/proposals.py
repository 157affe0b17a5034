"""Region proposals: selective search (OpenCV), R-CNN's published boxes, and the proposal cache.

Every box here is in the library's convention (:mod:`detection.boxes`): float32
``(x1, y1, x2, y2)``, 0-based, continuous, in ORIGINAL image pixels.

Selective search (Uijlings et al., IJCV 2013) is OpenCV's implementation
(``cv2.ximgproc.segmentation``). Choices, and why:

* **Canonical size.** Selective search is not scale invariant: the graph segmentation's ``k`` is
  in pixel units, so the same photo at two sizes gives different boxes, and cost grows with the
  pixel count. R-CNN's later code resized every image to a fixed *width* of 500 px
  (``selective_search_boxes(im, fast_mode, im_width)``: "resize image to canonical dimensions
  since proposals aren't scale invariant"); its published VOC 2007 boxes were computed on the
  original images, whose LONGER side is 500 px for almost every VOC image. We resize so the
  longer side is ``resize_to`` (default 500, up or down): it reproduces VOC's native scale for
  both landscape and portrait images (a fixed width would upscale portrait VOC images 1.5x) and
  bounds the cost of multi-megapixel photos. ``resize_to=None`` segments at full resolution.
  Boxes are mapped back by the exact per-axis scale (continuous coordinates scale exactly).
* **Order and determinism.** OpenCV returns boxes sorted by a randomised hierarchy rank
  (``rand() * level``, as in the paper), with exact duplicates already removed. It draws from
  the C library's global ``rand()``, so the order depends on whatever ran before in the process.
  We call ``srand(seed)`` before every image, which makes the output a pure function of
  (image, settings): a resumed run and a run with any number of worker processes give identical
  boxes. If the C library cannot be found (non-glibc platforms) a warning is logged and the
  order is not reproducible.
* **Filtering.** Boxes are clipped to the image, rounded to whole pixels (they come from pixel
  masks; scaling back makes them fractional), boxes narrower or shorter than ``min_size``
  original pixels are dropped (R-CNN's ``FilterBoxesWidth`` with ``minBoxWidth = 20``), exact
  duplicates after rounding are removed keeping the first (highest priority), and the first
  ``max_boxes`` are kept (R-CNN / SPP-net use about 2,000).
* **Empty result.** If nothing survives (e.g. an image smaller than ``min_size``), the whole
  image box is returned and a warning is logged: downstream stages then still have a window to
  score, and an empty array never passes silently.
* **Fast vs quality.** OpenCV's "fast" mode uses HSV and Lab, k in {150, 300, 450} and two
  similarity strategies; "quality" adds three colour spaces and two strategies, k up to 750.
  (The MATLAB code used k in {50, 100} for fast mode; OpenCV's ``base_k``/``inc_k``/``sigma``
  are exposed for those who want to match it more closely.)

The cache (:func:`compute_proposals`) is resumable: one shard file per image, written
atomically, in a folder named by a key of every setting that changes the boxes; the final
``proposals_<key>.npz`` is assembled from the shards in dataset order.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Sequence

import cv2
import numpy as np

from .boxes import box_iou_numpy, flip_boxes
from .errors import CacheError, DatasetError, DetectionError
from .io import atomic_path, atomic_save_npz, load_npz, make_dirs, parse_json, settings_key
from .workers import init_worker_process

if TYPE_CHECKING:
    from .data.records import ImageRecord
    from .data.voc import VOCDataset

__all__ = [
    "SelectiveSearchConfig",
    "selective_search",
    "xywh_to_internal",
    "ProposalSet",
    "compute_proposals",
    "proposal_cache_key",
    "load_rcnn_mat",
    "proposal_recall",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

#: Version of the ``proposals_<key>.npz`` layout; bump when it changes (old caches then miss).
FORMAT_VERSION = 1

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


@dataclasses.dataclass(frozen=True)
class SelectiveSearchConfig:
    """Every setting that changes selective-search output (all of it goes into the cache key).

    Attributes:
        mode: ``"fast"`` (SPP-net / R-CNN) or ``"quality"`` (about 3-5x slower, more boxes).
        max_boxes: keep at most this many boxes, in OpenCV's priority order (R-CNN: ~2,000).
        resize_to: segment an image resized so its longer side has this many pixels (None: as is).
        min_size: drop boxes narrower or shorter than this many ORIGINAL-image pixels (R-CNN: 20).
        base_k, inc_k, sigma: OpenCV's graph-segmentation settings (its defaults: 150, 150, 0.8).
        seed: seed of the C ``rand()`` that OpenCV uses to randomise the box order.
    """

    mode: Literal["fast", "quality"] = "fast"
    max_boxes: int = 2000
    resize_to: int | None = 500
    min_size: int = 20
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("fast", "quality"):
            raise DetectionError(f"selective search mode must be 'fast' or 'quality', got {self.mode!r}")
        if self.max_boxes < 1:
            raise DetectionError(f"max_boxes must be >= 1, got {self.max_boxes}")
        if self.resize_to is not None and self.resize_to < 16:
            # Below ~16 px the segmentation has nothing left to group.
            raise DetectionError(f"resize_to must be >= 16 or None, got {self.resize_to}")
        if self.min_size < 0:
            raise DetectionError(f"min_size must be >= 0, got {self.min_size}")
        if self.base_k <= 0 or self.inc_k <= 0 or self.sigma < 0:
            raise DetectionError(f"bad segmentation settings: base_k={self.base_k}, inc_k={self.inc_k}, sigma={self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# selective search on one image


def _c_rand_seeder() -> Any | None:
    """``srand`` of the C library OpenCV's ``rand()`` draws from, or None if it cannot be found."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).srand
    except OSError:
        return None


def xywh_to_internal(rects: np.ndarray) -> np.ndarray:
    """OpenCV ``Rect`` rows ``(x, y, w, h)`` -> internal ``(x1, y1, x2, y2)``.

    A ``Rect`` covers pixel columns ``x .. x + w - 1``, i.e. the continuous interval
    ``[x, x + w)``, so ``x2 = x + w`` (no -1: internal boxes are continuous, see boxes.py).

    Args:
        rects: array[N, 4] ``(x, y, w, h)``.
    Returns:
        float32 array[N, 4].
    """
    r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(r)
    out[:, :2] = r[:, :2]
    out[:, 2:] = r[:, :2] + r[:, 2:]
    return out.astype(np.float32)


def _resize_longer_side(image: np.ndarray, target: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if target is None or max(h, w) == target:
        return image
    scale = target / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # INTER_AREA averages when shrinking (no aliasing); INTER_LINEAR when enlarging.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def _dedup_keep_first(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicate rows, keeping the first occurrence and the original order."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def selective_search(
    image_rgb: np.ndarray,
    mode: Literal["fast", "quality"] = "fast",
    max_boxes: int = 2000,
    resize_to: int | None = 500,
    min_size: int = 20,
    *,
    base_k: int = 150,
    inc_k: int = 150,
    sigma: float = 0.8,
    seed: int = 0,
) -> np.ndarray:
    """Selective-search proposals for one image (see the module docstring for every choice).

    Runs in the calling thread; OpenCV's own threading is left as the caller set it (the worker
    processes of :func:`compute_proposals` set ``cv2.setNumThreads(1)``). Seeds the C library's
    global ``rand()`` (OpenCV randomises the order with it).

    Args:
        image_rgb: uint8 array[H, W, 3], RGB (as :func:`detection.data.voc.load_image` returns).
        mode, max_boxes, resize_to, min_size, base_k, inc_k, sigma, seed: see
            :class:`SelectiveSearchConfig`.
    Returns:
        float32 array[N, 4], 1 <= N <= max_boxes: internal ``(x1, y1, x2, y2)`` in original
        image pixels, integer-valued, inside ``[0, W] x [0, H]``, unique rows, in OpenCV's
        priority order. The whole-image box when nothing else survives (logged).
    """
    cfg = SelectiveSearchConfig(mode=mode, max_boxes=max_boxes, resize_to=resize_to, min_size=min_size,
                                base_k=base_k, inc_k=inc_k, sigma=sigma, seed=seed)
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise DetectionError(f"selective_search expects a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]

    small = _resize_longer_side(image, cfg.resize_to)
    # OpenCV's colour conversions (HSV, Lab) assume BGR channel order.
    bgr = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if cfg.mode == "fast":
        ss.switchToSelectiveSearchFast(cfg.base_k, cfg.inc_k, cfg.sigma)
    else:
        ss.switchToSelectiveSearchQuality(cfg.base_k, cfg.inc_k, cfg.sigma)
    srand = _c_rand_seeder()
    if srand is None:
        logger.warning("C library not found: selective-search box order is not reproducible")
    else:
        srand(ctypes.c_uint(cfg.seed))
    rects = ss.process()

    boxes = xywh_to_internal(np.asarray(rects).reshape(-1, 4)).astype(np.float64)
    # Back to original pixels: each axis by its own exact ratio (rounding of the resized size
    # makes the two ratios differ slightly).
    boxes[:, [0, 2]] *= width / bgr.shape[1]
    boxes[:, [1, 3]] *= height / bgr.shape[0]
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    boxes = np.round(boxes)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= max(cfg.min_size, 1)) & ((boxes[:, 3] - boxes[:, 1]) >= max(cfg.min_size, 1))
    boxes = _dedup_keep_first(boxes[keep])[: cfg.max_boxes]
    if len(boxes) == 0:
        logger.warning("selective search found no box of at least %d px in a %dx%d image; "
                       "using the whole image box", cfg.min_size, width, height)
        boxes = np.array([[0.0, 0.0, width, height]])
    return boxes.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the proposal set and its file


class ProposalSet:
    """Proposals of a set of images, stored flat: ``boxes[offsets[i]:offsets[i + 1]]`` belong to
    ``image_ids[i]``.

    Args:
        image_ids: N unique ids.
        boxes: float32 array[M, 4], internal convention, original (unflipped) image pixels.
        offsets: int64 array[N + 1], ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == M``.
        metadata: JSON-able dict (settings, source, format version) saved with the arrays.
    """

    def __init__(self, image_ids: Sequence[str], boxes: np.ndarray, offsets: np.ndarray,
                 metadata: dict[str, Any] | None = None) -> None:
        self.image_ids: tuple[str, ...] = tuple(str(i) for i in image_ids)
        self.boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1)
        self.metadata: dict[str, Any] = dict(metadata or {})
        problem = self._check()
        if problem:
            raise CacheError(f"inconsistent proposal set: {problem}")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def _check(self) -> str | None:
        n = len(self.image_ids)
        if len(set(self.image_ids)) != n:
            return "duplicate image ids"
        if self.offsets.shape != (n + 1,):
            return f"offsets has shape {self.offsets.shape}, expected ({n + 1},)"
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.boxes) or (np.diff(self.offsets) < 0).any():
            return "offsets do not partition the boxes"
        if not np.isfinite(self.boxes).all():
            return "non-finite box coordinates"
        return None

    @classmethod
    def from_lists(cls, image_ids: Sequence[str], boxes: Sequence[np.ndarray],
                   metadata: dict[str, Any] | None = None) -> "ProposalSet":
        """Build from one array[N_i, 4] per image."""
        arrays = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        if len(arrays) != len(image_ids):
            raise CacheError(f"{len(image_ids)} image ids but {len(arrays)} box arrays")
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        flat = np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32)
        return cls(image_ids, flat, offsets, metadata)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __repr__(self) -> str:
        return f"ProposalSet({len(self)} images, {len(self.boxes)} boxes)"

    def boxes_for(self, image_id: str) -> np.ndarray:
        """float32 array[N, 4] of the (unflipped) image ``image_id`` (a view: do not modify)."""
        try:
            i = self._index[image_id]
        except KeyError:
            raise CacheError(f"no proposals for image {image_id!r}") from None
        return self.boxes[self.offsets[i]:self.offsets[i + 1]]

    def proposals_for_record(self, record: "ImageRecord") -> np.ndarray:
        """Proposals in the frame of ``record``: mirrored when ``record.flipped``. array[N, 4]."""
        boxes = self.boxes_for(record.image_id)
        if record.flipped:
            return flip_boxes(boxes, record.width)
        return boxes.copy()

    def num_boxes(self) -> np.ndarray:
        """int64 array[N]: boxes per image."""
        return np.diff(self.offsets)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (.npz) atomically: image_ids (unicode), boxes, offsets, metadata (JSON text)."""
        meta = dict(self.metadata, format_version=FORMAT_VERSION)
        ids = np.array(self.image_ids, dtype=str) if self.image_ids else np.zeros(0, dtype="<U1")
        atomic_save_npz(path, image_ids=ids, boxes=self.boxes, offsets=self.offsets,
                        metadata=np.array(json.dumps(meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProposalSet":
        """Read and validate a file written by :meth:`save`.

        Raises:
            CacheError: missing, unreadable or inconsistent file, or another format version.
        """
        path = Path(path)
        try:
            data = load_npz(path)
        except FileNotFoundError:
            raise CacheError(f"{path}: proposal cache does not exist") from None
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
            raise CacheError(f"{path}: unreadable proposal cache ({type(e).__name__}: {e})") from None
        missing = {"image_ids", "boxes", "offsets", "metadata"} - set(data)
        if missing:
            raise CacheError(f"{path}: not a proposal cache (missing {sorted(missing)})")
        try:
            text = str(data["metadata"][()])
        except (ValueError, IndexError) as e:
            raise CacheError(f"{path}: bad metadata ({e})") from None
        meta = parse_json(text, f"{path}: metadata")   # size and depth limits; CacheError
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: proposal cache format {meta.get('format_version') if isinstance(meta, dict) else '?'}"
                             f" != {FORMAT_VERSION}; recompute it")
        if data["image_ids"].dtype.kind != "U" or data["boxes"].dtype != np.float32 \
                or data["boxes"].ndim != 2 or data["boxes"].shape[1:] != (4,) or data["offsets"].dtype != np.int64:
            raise CacheError(f"{path}: arrays have unexpected dtypes or shapes")
        try:
            return cls(data["image_ids"].tolist(), data["boxes"], data["offsets"], meta)
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# computing a dataset's proposals: a resumable, parallel cache


def proposal_cache_key(dataset: "VOCDataset", config: SelectiveSearchConfig) -> str:
    """Key of everything that changes the cached boxes: dataset content (fingerprint: root,
    split, image ids, annotation files), split, every selective-search setting, the OpenCV
    version (its segmentation may change) and the cache format."""
    return settings_key({
        "what": "selective_search_proposals",
        "format_version": FORMAT_VERSION,
        "dataset": dataset.fingerprint(),
        "split": dataset.split,
        "opencv": cv2.__version__,
        **config.to_dict(),
    })


def _shard_name(image_id: str) -> str:
    """A file name for an image id: the id itself when it is a plain name, else its hash."""
    if _SAFE_ID.match(image_id):
        return f"{image_id}.npy"
    return "id-" + hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:32] + ".npy"


def _read_shard(path: Path) -> np.ndarray | None:
    """The boxes in a shard, or None (with a warning) when it is missing or damaged."""
    if not path.exists():
        return None
    try:
        boxes = np.load(path, allow_pickle=False)
    except Exception as e:  # a damaged file is recomputed, never trusted
        logger.warning("%s: unreadable proposal shard (%s); recomputing it", path, e)
        return None
    if boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0 \
            or not np.isfinite(boxes).all():
        logger.warning("%s: malformed proposal shard %s %s; recomputing it", path, boxes.dtype, boxes.shape)
        return None
    return boxes


def _worker_init() -> None:
    # One OpenCV thread per process: we parallelise across processes, and nested thread pools
    # on a few cores only add contention.
    cv2.setNumThreads(1)
    init_worker_process()


def _proposals_worker(record: "ImageRecord", config: SelectiveSearchConfig, shard: Path) -> tuple[str, int]:
    """Compute one image's proposals and write its shard atomically. Runs in a worker process.

    Every failure comes back as a DatasetError that names the image file.
    """
    from .data.voc import load_image  # imported here: the worker process starts bare (spawn)

    try:
        image = load_image(record)
        boxes = selective_search(image, **config.to_dict())
    except DatasetError:
        raise
    except Exception as e:  # cv2.error, MemoryError, ... -> a readable message naming the file
        raise DatasetError(f"{record.path}: selective search failed ({type(e).__name__}: {e})") from None
    with atomic_path(shard, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, boxes, allow_pickle=False)
    return record.image_id, len(boxes)


@contextlib.contextmanager
def _opencv_threads(n: int) -> Iterator[None]:
    """Temporarily set OpenCV's thread count in this process (restored afterwards)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _run_jobs(jobs: list[tuple["ImageRecord", Path]], config: SelectiveSearchConfig, num_workers: int,
              progress: bool) -> None:
    """Compute the shards of ``jobs``: in this process when ``num_workers <= 1``, else in a
    process pool. Raises the first DatasetError, naming the image, without a pool traceback."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="selective search", unit="img", disable=not progress)
    try:
        if num_workers <= 1:
            with _opencv_threads(1):
                for record, shard in jobs:
                    _proposals_worker(record, config, shard)
                    bar.update(1)
            return
        # 'spawn' starts clean interpreters: forking a parent that already runs torch/OpenMP
        # or OpenCV thread pools can deadlock the child on a lock held by another thread.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx,
                                                    initializer=_worker_init) as pool:
            futures = {pool.submit(_proposals_worker, record, config, shard): record for record, shard in jobs}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    try:
                        fut.result()
                    except DetectionError as e:
                        raise type(e)(str(e)) from None  # drop the remote traceback
                    except BrokenProcessPool:
                        raise DetectionError(
                            f"a selective-search worker died (out of memory? killed?) while working on "
                            f"{futures[fut].path}; finished images are kept, rerun to resume") from None
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def compute_proposals(
    dataset: "VOCDataset",
    out_dir: str | os.PathLike,
    mode: Literal["fast", "quality"] = "fast",
    max_boxes: int = 2000,
    resize_to: int | None = 500,
    min_size: int = 20,
    *,
    base_k: int = 150,
    inc_k: int = 150,
    sigma: float = 0.8,
    seed: int = 0,
    num_workers: int | None = None,
    progress: bool = True,
) -> ProposalSet:
    """Selective-search proposals of every original image of ``dataset``, cached in ``out_dir``.

    Layout of ``out_dir`` (``<key>`` = :func:`proposal_cache_key`):

    * ``proposals_<key>.npz``: the result (:meth:`ProposalSet.save`), metadata = settings.
    * ``proposals_<key>.shards/<image_id>.npy``: one float32 array[N, 4] per finished image,
      written atomically. An interrupted run loses only the images in flight; a rerun computes
      the missing shards and assembles the same arrays as an uninterrupted run (boxes are a pure
      function of image and settings). The shards are kept after assembly (they are the same
      size as the cache); delete the folder to reclaim the space.

    A cache with other settings or another dataset content has another key and is never reused.
    A damaged cache file is rebuilt from the shards with a warning (:meth:`ProposalSet.load`
    alone raises :class:`CacheError`). Flipped records share their original's proposals
    (:meth:`ProposalSet.proposals_for_record` mirrors them).

    Args:
        dataset: a :class:`detection.data.voc.VOCDataset`.
        out_dir: folder of the cache (created).
        mode, max_boxes, resize_to, min_size, base_k, inc_k, sigma, seed: see
            :class:`SelectiveSearchConfig`.
        num_workers: worker processes (default ``os.cpu_count()``); 0 or 1 runs in this process.
            Workers are started with 'spawn', so a script that calls this with workers must do
            so under ``if __name__ == "__main__":`` (as for any spawn pool). Each worker imports
            the package (torch included) once: seconds of start-up on a small machine.
        progress: show a tqdm progress bar.
    Returns:
        the :class:`ProposalSet`, image ids in dataset order.
    Raises:
        DatasetError: an image cannot be read or segmented (the message names its file).
    """
    config = SelectiveSearchConfig(mode=mode, max_boxes=max_boxes, resize_to=resize_to, min_size=min_size,
                                   base_k=base_k, inc_k=inc_k, sigma=sigma, seed=seed)
    out_dir = Path(out_dir)
    key = proposal_cache_key(dataset, config)
    cache_path = out_dir / f"proposals_{key}.npz"
    shard_dir = out_dir / f"proposals_{key}.shards"
    records = [r for r in dataset.records if not r.flipped]
    image_ids = [r.image_id for r in records]
    metadata = {
        "source": "selective_search",
        "cache_key": key,
        "dataset_fingerprint": dataset.fingerprint(),
        "dataset_root": str(dataset.root),
        "split": dataset.split,
        "opencv": cv2.__version__,
        "settings": config.to_dict(),
    }

    if cache_path.exists():
        try:
            cached = ProposalSet.load(cache_path)
            if cached.image_ids == tuple(image_ids) and cached.metadata.get("cache_key") == key:
                logger.info("proposals: reusing %s", cache_path)
                return cached
            logger.warning("%s does not match the dataset; rebuilding it", cache_path)
        except CacheError as e:
            logger.warning("%s; rebuilding it from the shards", e)

    make_dirs(shard_dir)  # a StorageError naming the folder when it cannot be made
    shards = [shard_dir / _shard_name(i) for i in image_ids]
    todo = [(r, s) for r, s in zip(records, shards) if _read_shard(s) is None]
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    workers = max(0, min(workers, len(todo)))
    logger.info("proposals: %d images, %d done, %d to compute with %d worker(s); settings %s; cache %s",
                len(records), len(records) - len(todo), len(todo), max(workers, 1), config.to_dict(), cache_path)
    if todo:
        _run_jobs(todo, config, workers, progress)

    boxes = []
    for image_id, shard in zip(image_ids, shards):
        b = _read_shard(shard)
        if b is None:  # only if a shard was deleted or damaged while we ran
            raise CacheError(f"{shard}: proposal shard of {image_id!r} vanished or is damaged; rerun")
        boxes.append(b)
    result = ProposalSet.from_lists(image_ids, boxes, metadata)
    result.save(cache_path)
    logger.info("proposals: wrote %s (%d boxes)", cache_path, len(result.boxes))
    return ProposalSet.load(cache_path)


# ---------------------------------------------------------------------------------------------
# R-CNN's published boxes


def _mat_strings(arr: np.ndarray) -> list[str]:
    """Strings from a loadmat'ed cell array of char rows, or a char matrix."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":  # char matrix: one row per string
        return [str(s).strip() for s in arr.ravel()]
    out = []
    for el in arr.ravel():
        el = np.asarray(el)
        if el.dtype.kind != "U" or el.size != 1:
            raise ValueError(f"expected a string in 'images', got {el.dtype} {el.shape}")
        out.append(str(el.ravel()[0]).strip())
    return out


def load_rcnn_mat(path: str | os.PathLike, dataset: "VOCDataset") -> ProposalSet:
    """Read R-CNN's published selective-search boxes (``selective_search_data/voc_2007_*.mat``).

    The file holds ``images`` (cell array of image ids) and ``boxes`` (cell array of
    double array[N_i, 4]) with rows ``[y1 x1 y2 x2]`` in 1-based inclusive pixels. Internal:
    ``(x1 - 1, y1 - 1, x2, y2)``. (py-faster-rcnn's ``_load_selective_search_roidb`` does
    ``raw[:, (1, 0, 3, 2)] - 1`` on all four because its boxes are 0-based *inclusive*; ours are
    continuous, so the max corner keeps its value, as in :func:`detection.boxes.voc_to_internal`.)
    Boxes are clipped to the image; the file's order is kept.

    Args:
        path: the .mat file (MATLAB v5/v7; v7.3 HDF5 files are not supported by scipy).
        dataset: images to take, in dataset order (extra images in the file are ignored).
    Returns:
        a :class:`ProposalSet` of the dataset's original images.
    Raises:
        DatasetError: the file is unreadable, malformed, or lacks an image of the dataset.
    """
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except NotImplementedError:
        raise DatasetError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save with -v7") from None
    except Exception as e:
        raise DatasetError(f"{path}: unreadable .mat file ({type(e).__name__}: {e})") from None
    if "boxes" not in mat or "images" not in mat:
        raise DatasetError(f"{path}: expected variables 'boxes' and 'images', found {sorted(k for k in mat if not k.startswith('__'))}")
    try:
        ids = _mat_strings(mat["images"])
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from None
    cells = np.asarray(mat["boxes"]).ravel()
    if len(cells) != len(ids):
        raise DatasetError(f"{path}: {len(ids)} images but {len(cells)} box arrays")
    index = {image_id: i for i, image_id in enumerate(ids)}

    records = [r for r in dataset.records if not r.flipped]
    all_boxes = []
    for record in records:
        if record.image_id not in index:
            raise DatasetError(f"{path}: no boxes for image {record.image_id!r} of {dataset.root} ({dataset.split})")
        try:
            raw = np.asarray(cells[index[record.image_id]], dtype=np.float64)
        except (ValueError, TypeError):  # text, a struct or a nested cell (tests/test_fuzz.py)
            raise DatasetError(f"{path}: boxes of {record.image_id!r} are not a numeric array") from None
        if raw.size == 0:
            all_boxes.append(np.zeros((0, 4), np.float32))
            continue
        if raw.ndim != 2 or raw.shape[1] != 4 or not np.isfinite(raw).all():
            raise DatasetError(f"{path}: boxes of {record.image_id!r} have shape {raw.shape}, expected [N, 4] finite")
        # [y1 x1 y2 x2] 1-based inclusive -> [x1 y1 x2 y2] 0-based continuous.
        b = raw[:, (1, 0, 3, 2)]
        b[:, :2] -= 1.0
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, record.width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, record.height)
        all_boxes.append(b.astype(np.float32))
    meta = {"source": "rcnn_mat", "file": str(path), "split": dataset.split,
            "dataset_fingerprint": dataset.fingerprint()}
    return ProposalSet.from_lists([r.image_id for r in records], all_boxes, meta)


# ---------------------------------------------------------------------------------------------
# recall


def proposal_recall(dataset: "VOCDataset", proposals: ProposalSet,
                    thresholds: Iterable[float] = (0.5, 0.7)) -> dict[str, float]:
    """Recall of the non-difficult ground truth by the best proposal of its image.

    A ground-truth box counts as recalled at threshold ``t`` when some proposal of its image has
    IoU >= t with it (the usual proposal-recall definition, Hosang et al. 2015). Flipped records
    are skipped (they repeat their originals).

    Returns:
        ``{f"{t:g}": recall}`` for each threshold, e.g. ``{"0.5": 0.97, "0.7": 0.81}``;
        NaN when the dataset has no non-difficult ground truth.
    """
    thresholds = tuple(float(t) for t in thresholds)
    best = []
    for record in dataset.records:
        if record.flipped:
            continue
        gt = record.boxes[~np.asarray(record.difficult, dtype=bool)]
        if len(gt) == 0:
            continue
        props = proposals.proposals_for_record(record)
        if len(props) == 0:
            best.append(np.zeros(len(gt)))
        else:
            best.append(box_iou_numpy(gt, props).max(axis=1))
    if not best:
        logger.warning("proposal recall: no non-difficult ground truth in %s (%s)", dataset.root, dataset.split)
        return {f"{t:g}": float("nan") for t in thresholds}
    best_iou = np.concatenate(best)
    return {f"{t:g}": float((best_iou >= t).mean()) for t in thresholds}
