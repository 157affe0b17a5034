"""The one detection loop over a dataset (detectron2's ``inference_on_dataset``): the detect
stage of the pipeline, ``eval_voc.py --model`` (:mod:`.split`) and the report detect through it.
Under ``torchrun`` each rank detects a contiguous share of the images and rank 0 gathers them.

Not imported by the package ``__init__``: it needs the detector, and the evaluation modules stay
importable without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import comm
from ..data.images import load_image
from ..data.records import ImageRecord
from ..detector import Detections, SPPDetector
from ..errors import ModelError
from ..proposals import compute_proposals

__all__ = ["iter_detections", "detect_records", "detect_dataset"]


def iter_detections(detector: SPPDetector, records: Sequence[ImageRecord],
                    proposals_fn: Callable[[ImageRecord], np.ndarray] | None = None,
                    progress: bool = False) -> Iterator[tuple[ImageRecord, np.ndarray, Detections]]:
    """The one detection loop over images of a split (the detect stage, ``eval_voc.py --model``,
    the report): each original image (flipped records are skipped) decoded once and detected with
    its proposals from ``proposals_fn`` (selective search with the model's settings when None).

    Yields:
        (record, uint8 RGB image, detections) in record order.
    """
    kept = [r for r in records if not r.flipped]
    for record in tqdm(kept, desc="detect", unit="img", disable=not progress):
        image = load_image(record)
        yield record, image, detector.detect(image, proposals_fn(record) if proposals_fn is not None else None)


def detect_records(detector: SPPDetector, records: Sequence[ImageRecord],
                   proposals_fn: Callable[[ImageRecord], np.ndarray] | None = None,
                   progress: bool = False) -> list[Detections] | None:
    """Detections of every original record (flipped ones skipped), in record order, through
    :func:`iter_detections`. Under ``torchrun`` each rank detects a contiguous share of the
    images and rank 0 receives them all.

    Returns:
        the detections on rank 0 (the only process without a launcher); None on the other ranks.
    """
    kept = [r for r in records if not r.flipped]
    mine = [dets for _, _, dets in iter_detections(detector, comm.shard(kept), proposals_fn, progress)]
    parts = comm.gather(mine, "detection: gathering every rank's detections on rank 0")
    return None if parts is None else [dets for part in parts for dets in part]


def detect_dataset(model: str | Path | SPPDetector, dataset: Any, proposals_dir: str | Path | None = None,
                   device: str | torch.device = "cpu", progress: bool = True) -> list[Detections] | None:
    """Detections of every record of ``dataset`` (original images only), in record order
    (:func:`detect_records`: sharded under ``torchrun``, None on ranks other than 0).

    Proposals come from the selective-search cache in ``proposals_dir`` (computed and cached
    there when missing, with the model's settings), or are computed per image when it is None.
    """
    detector = model if isinstance(model, SPPDetector) else SPPDetector.from_file(model, device=device)
    if tuple(dataset.classes) != detector.classes:
        raise ModelError(f"the model was trained for classes {list(detector.classes)}, the dataset "
                         f"{dataset.root} has {list(dataset.classes)}")
    proposals_fn = None
    if proposals_dir is not None:
        props = compute_proposals(dataset, proposals_dir, detector.settings.proposals, progress=progress)
        proposals_fn = props.proposals_for_record
    return detect_records(detector, dataset.records, proposals_fn, progress)
