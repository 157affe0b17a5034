"""A dataset's selective-search proposals, computed in parallel into a resumable cache.

The cache (:func:`compute_proposals`) is resumable: one shard file per image, written
atomically, in a folder named by a key of every setting that changes the boxes; the final
``proposals_<key>.npz`` (:class:`~detection.proposals.proposal_set.ProposalSet`) is assembled
from the shards in dataset order.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import cv2
import numpy as np
from tqdm.auto import tqdm

from .. import comm
from ..data.images import load_image
from ..errors import CacheError, DatasetError, DetectionError
from ..io.files import atomic_path, make_dirs, read_verified_bytes, write_checksum_sidecar
from ..io.jsonfile import settings_key
from ..io.paths import safe_file_part
from ..runtime import rank_share
from ..workers import init_worker_process
from .proposal_set import FORMAT_VERSION, ProposalSet
from .search import SelectiveSearchConfig, selective_search

if TYPE_CHECKING:
    from ..data.records import ImageRecord
    from ..data.voc import VOCDataset

__all__ = ["compute_proposals", "proposal_cache_key"]

logger = logging.getLogger(__name__)

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
    """The shard file of an image id (:func:`detection.io.paths.safe_file_part`: a plain id as is)."""
    return safe_file_part(image_id, "image id") + ".npy"


def _read_shard(path: Path) -> np.ndarray | None:
    """The boxes in a shard, or None (with a warning naming the file) when it is missing,
    damaged, or its bytes do not match the checksum written with it (``<shard>.crc32``)."""
    if not path.exists():
        return None
    try:
        boxes = np.load(io.BytesIO(read_verified_bytes(path, "proposal shard")), allow_pickle=False)
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
    try:
        image = load_image(record)
        boxes = selective_search(image, config)
    except DatasetError:
        raise
    except Exception as e:  # cv2.error, MemoryError, ... -> a readable message naming the file
        raise DatasetError(f"{record.path}: selective search failed ({type(e).__name__}: {e})") from None
    buf = io.BytesIO()
    np.save(buf, boxes, allow_pickle=False)
    # The checksum goes first: a shard that exists always has one beside it (a crash in between
    # leaves only the checksum, and the shard is computed again).
    write_checksum_sidecar(shard, buf.getvalue())
    with atomic_path(shard, suffix=".npy") as tmp:
        tmp.write_bytes(buf.getvalue())
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


def compute_proposals(dataset: "VOCDataset", out_dir: str | os.PathLike, config: SelectiveSearchConfig | None = None,
                      *, num_workers: int | None = None, progress: bool = True, **settings: Any) -> ProposalSet:
    """Selective-search proposals of every original image of ``dataset``, cached in ``out_dir``.

    Layout of ``out_dir`` (``<key>`` = :func:`proposal_cache_key`):

    * ``proposals_<key>.npz``: the result (:meth:`ProposalSet.save`), metadata = settings.
    * ``proposals_<key>.shards/<image_id>.npy``: one float32 array[N, 4] per finished image,
      written atomically. An interrupted run loses only the images in flight; a rerun computes
      the missing shards and assembles the same arrays as an uninterrupted run (boxes are a pure
      function of image and settings). The shards are kept after assembly (they are the same
      size as the cache); delete the folder to reclaim the space.

    Under ``torchrun`` each rank computes a contiguous share of the images (:mod:`detection.comm`)
    and rank 0 assembles the cache once every rank is done; a rerun resumes with any number of
    ranks (the shards are per image).

    A cache with other settings or another dataset content has another key and is never reused.
    A damaged cache file is rebuilt from the shards with a warning (:meth:`ProposalSet.load`
    alone raises :class:`CacheError`). Flipped records share their original's proposals
    (:meth:`ProposalSet.proposals_for_record` mirrors them).

    Args:
        dataset: a :class:`detection.data.voc.VOCDataset`.
        out_dir: folder of the cache (created).
        config: every selective-search setting (default: :class:`SelectiveSearchConfig`'s).
        **settings: fields of :class:`SelectiveSearchConfig` that replace those of ``config``.
        num_workers: worker processes (default: this rank's share of the machine's cores,
            :func:`detection.runtime.rank_share`); 0 or 1 runs in this process.
            Workers are started with 'spawn', so a script that calls this with workers must do
            so under ``if __name__ == "__main__":`` (as for any spawn pool). Each worker imports
            the package (torch included) once: seconds of start-up on a small machine.
        progress: show a tqdm progress bar.
    Returns:
        the :class:`ProposalSet`, image ids in dataset order.
    Raises:
        DatasetError: an image cannot be read or segmented (the message names its file).
    """
    config = dataclasses.replace(config or SelectiveSearchConfig(), **settings)
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

    # Rank 0 decides whether the cache is reusable, so that every rank takes the same path.
    cached = _matching_cache(cache_path, image_ids, key) if comm.is_main() else None
    if comm.broadcast(cached is not None, "proposals: checking the cache"):
        logger.info("proposals: reusing %s", cache_path)
        return cached if cached is not None else ProposalSet.load(cache_path)

    make_dirs(shard_dir)  # a StorageError naming the folder when it cannot be made
    shards = [shard_dir / _shard_name(i) for i in image_ids]
    # Each rank computes a contiguous share of the images (all of them in one process).
    mine = comm.shard(list(zip(records, shards)))
    todo = [(r, s) for r, s in mine if _read_shard(s) is None]
    # The machine's cores are shared by the ranks on it.
    workers = rank_share(num_workers, "proposal workers")
    workers = max(0, min(workers, len(todo)))
    start, stop = comm.shard_bounds(len(records))
    logger.info("proposals: %d images%s, %d done, %d to compute with %d worker(s); settings %s; cache %s",
                len(records), "" if comm.world_size() == 1 else f" (rank {comm.rank()}: images {start}-{stop - 1})",
                len(mine) - len(todo), len(todo), max(workers, 1), config.to_dict(), cache_path)
    if todo:
        _run_jobs(todo, config, workers, progress)
    comm.barrier("proposals: waiting for every rank's images")

    if comm.is_main():      # one writer of the assembled cache
        boxes = []
        for image_id, shard in zip(image_ids, shards):
            b = _read_shard(shard)
            if b is None:  # only if a shard was deleted or damaged while we ran
                raise CacheError(f"{shard}: proposal shard of {image_id!r} vanished or is damaged; rerun")
            boxes.append(b)
        result = ProposalSet.from_lists(image_ids, boxes, metadata)
        result.save(cache_path)
        logger.info("proposals: wrote %s (%d boxes)", cache_path, len(result.boxes))
    comm.barrier("proposals: waiting for rank 0 to write the cache")
    return ProposalSet.load(cache_path)


def _matching_cache(cache_path: Path, image_ids: list[str], key: str) -> ProposalSet | None:
    """The cache at ``cache_path`` when it holds these images with this key, else None (a damaged
    or foreign one is rebuilt from the shards, with a warning)."""
    if not cache_path.exists():
        return None
    try:
        cached = ProposalSet.load(cache_path)
    except CacheError as e:
        logger.warning("%s; rebuilding it from the shards", e)
        return None
    if cached.image_ids == tuple(image_ids) and cached.metadata.get("cache_key") == key:
        return cached
    logger.warning("%s does not match the dataset; rebuilding it", cache_path)
    return None
