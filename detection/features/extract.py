"""Filling a :class:`ConvMapCache`: the conv maps of every record of a split, resumable and shared
out over ``torchrun`` ranks (images decoded by :mod:`.loader`, the trunk run by :mod:`.conv_pass`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import comm
from ..data.records import ImageRecord
from ..runtime import rank_share
from .conv_pass import forward_scales, image_name
from .convmap_cache import ConvMapCache, cache_records, convmap_settings
from .loader import resized_images
from .scales import DEFAULT_MAX_SIZE, DEFAULT_SCALES_1

__all__ = ["extract_conv_maps"]

log = logging.getLogger(__name__)


def extract_conv_maps(dataset: Any, backbone: torch.nn.Module, out_dir: str | Path,
                      scales: Sequence[int] | None = None, max_size: int | None = None, fp16: bool = False,
                      include_flipped: bool | None = None, device: torch.device | str = "cpu",
                      num_workers: int | None = None, progress: bool = True, rebuild: bool = False) -> ConvMapCache:
    """Compute (or resume computing) the conv maps of every record of ``dataset`` into a cache.

    Images are decoded and resized by ``num_workers`` DataLoader workers (batch size 1: sizes
    differ); the trunk runs in eval mode under ``torch.inference_mode`` on ``device``. Records
    already complete in the cache are skipped, so an interrupted run resumes where it stopped.
    A flipped record gets its own conv pass on the mirrored image (a conv trunk is not
    flip-equivariant), as the SPP code does. Under ``torchrun`` each rank computes a contiguous
    share of the records (on its own GPU with ``device`` ``cuda:LOCAL_RANK``) and rank 0 writes
    the index; a rerun resumes with any number of ranks.

    Args:
        dataset: a VOCDataset (``records``, ``split``, ``fingerprint()``).
        backbone: a ``detection.backbones.Backbone``; it is moved to ``device``.
        out_dir: parent folder; the cache is ``out_dir/convmaps_<key>``.
        scales: shorter sides (default ``scales.DEFAULT_SCALES_1`` = (688,)).
        max_size: cap on the longer side (default ``scales.DEFAULT_MAX_SIZE`` = 2000).
        fp16: store maps as float16 (half the bytes; computed in float32 and rounded).
        include_flipped: see :func:`cache_records` (default: as the dataset's records).
        device: where the trunk runs ("cpu" or "cuda").
        num_workers: DataLoader worker processes for decoding + resizing (0: in this process;
            None: this rank's share of the machine's cores, :func:`detection.runtime.rank_share`).
        progress: show a tqdm bar.
        rebuild: delete an existing cache folder of these settings first.
    Returns:
        The filled ConvMapCache.
    Raises:
        DetectionError: an image cannot be read or is too small for the trunk (named).
        CacheError: the cache folder holds other settings / another format version.
    """
    scales = tuple(DEFAULT_SCALES_1 if scales is None else scales)
    if max_size is None:
        max_size = DEFAULT_MAX_SIZE
    num_workers = rank_share(num_workers, "DataLoader workers", minimum=0 if num_workers == 0 else 1)
    records = cache_records(dataset, include_flipped)
    settings = convmap_settings(dataset, backbone, scales, max_size, fp16, records)
    # Rank 0 makes (or checks, or rebuilds) the folder; then each rank fills a contiguous share
    # of the records, and rank 0 writes the index once all are done.
    if comm.is_main():
        ConvMapCache.create(out_dir, settings, rebuild=rebuild)
    comm.barrier("conv maps: waiting for rank 0 to make the cache folder")
    cache = ConvMapCache.create(out_dir, settings)
    mine = comm.shard(records)
    todo = [r for r in mine if not cache.is_complete(r.key)]
    log.info("conv-map cache %s: %d of %d records to compute%s (%s, scales %s, %s)", cache.root, len(todo),
             len(mine), "" if comm.world_size() == 1 else f" on rank {comm.rank()} ({len(records)} in all)",
             settings["backbone"], list(scales), settings["dtype"])
    if todo:
        _run_extraction(cache, todo, backbone, scales, max_size, device, num_workers, progress)
    comm.barrier("conv maps: waiting for every rank's records")
    if comm.is_main():
        cache.write_index([r.key for r in records])
    comm.barrier("conv maps: waiting for rank 0 to write the index")
    return ConvMapCache.open(cache.root) if comm.world_size() > 1 else cache


def _run_extraction(cache: ConvMapCache, records: list[ImageRecord], backbone: torch.nn.Module,
                    scales: Sequence[int], max_size: int, device: torch.device | str, num_workers: int,
                    progress: bool) -> None:
    device = torch.device(device)
    loader = resized_images(records, backbone.preprocess, scales, max_size, num_workers,
                            pin_memory=device.type == "cuda")
    was_training = backbone.training
    backbone.to(device).eval()
    t0, done = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for i, inputs, factors, (h, w), error in tqdm(loader, total=len(records), disable=not progress,
                                                          desc="conv maps", unit="img"):
                if error is not None:
                    raise error
                record = records[i]
                maps = forward_scales(backbone, inputs, device, image_name(record))
                arrays = [m.cpu().numpy() for m in maps]
                info = {
                    "factors": factors,
                    "map_shapes": [list(a.shape) for a in arrays],
                    "input_shapes": [list(x.shape[-2:]) for x in inputs],
                    "image_size": [int(h), int(w)],
                }
                cache.write_record(record.key, arrays, info, name=image_name(record))
                done += 1
    finally:
        backbone.train(was_training)
        if done:
            dt = time.perf_counter() - t0
            log.info("computed conv maps of %d records in %.1f s (%.3f s/record)", done, dt, dt / done)
