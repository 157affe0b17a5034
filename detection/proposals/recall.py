"""Proposal recall: how much of the ground truth the proposals cover."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..boxes import box_iou_numpy
from .proposal_set import ProposalSet

if TYPE_CHECKING:
    from ..data.voc import VOCDataset

__all__ = ["proposal_recall"]

logger = logging.getLogger(__name__)


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
