"""A split's proposals with their summary: what ``tools/compute_proposals.py`` runs."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .. import comm
from ..data.voc import VOCDataset, report_images
from ..io.jsonfile import write_json
from ..runtime import rank_share
from .cache import compute_proposals
from .recall import proposal_recall
from .search import SelectiveSearchConfig

__all__ = ["compute_split_proposals"]

logger = logging.getLogger(__name__)


def compute_split_proposals(data: str | os.PathLike, split: str, out: str | os.PathLike,
                            config: SelectiveSearchConfig = SelectiveSearchConfig(), *,
                            num_workers: int | None = None, progress: bool = True,
                            skip_bad: bool = False) -> dict[str, Any]:
    """Compute (or resume, or reuse) the proposals of a VOC-layout split in ``out`` and write
    ``out/summary.json``: images, boxes per image, recall at IoU 0.5 / 0.7, settings, wall time.

    Args:
        data: VOC-layout dataset folder.
        split: image set name (``ImageSets/Main/<split>.txt``).
        out: folder of the cache (:func:`~detection.proposals.cache.compute_proposals`) and
            the summary.
        config: every selective-search setting.
        num_workers: worker processes (None: this rank's share of the cores,
            :func:`detection.runtime.rank_share`; 0 or 1: this process).
        progress: show a progress bar.
        skip_bad: leave out images that cannot be decoded (see
            :class:`~detection.data.voc.VOCDataset`).
    Returns:
        the summary dict (also written to ``out/summary.json``).
    """
    out = Path(out)
    comm.init_distributed("cpu")          # under torchrun: each rank takes a share of the images
    dataset = VOCDataset(data, split, skip_bad=skip_bad)
    start = time.perf_counter()
    proposals = compute_proposals(dataset, out, config, num_workers=num_workers, progress=progress)
    seconds = time.perf_counter() - start
    recall = proposal_recall(dataset, proposals, thresholds=(0.5, 0.7))
    n = len(proposals)
    summary = {
        "num_images": n,
        "num_boxes": int(len(proposals.boxes)),
        "boxes_per_image": float(len(proposals.boxes) / n) if n else 0.0,
        "recall": recall,
        "settings": proposals.metadata["settings"],
        "cache_key": proposals.metadata["cache_key"],
        "split": split,
        "data": str(data),
        "workers": num_workers if num_workers is not None else rank_share(None, "--workers"),
        "processes": comm.world_size(),
        # Includes reading shards of a resumed run; on a fresh run it is the compute time.
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
    }
    if not comm.is_main():
        return summary
    write_json(out / "summary.json", summary)
    logger.info("%d images, %.1f boxes/image, recall@0.5 %.3f, recall@0.7 %.3f, %.2f images/s -> %s",
                n, summary["boxes_per_image"], recall["0.5"], recall["0.7"], summary["images_per_second"] or 0,
                out / "summary.json")
    report_images(dataset)
    return summary
