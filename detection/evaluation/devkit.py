"""PASCAL VOC detection evaluation: the devkit's matching and AP, vectorised.

The protocol is the widely used Python port of the devkit (py-faster-rcnn
``lib/datasets/voc_eval.py``; docs/voc2007.md):

* per class, ``npos`` = the non-difficult ground truths of the class;
* detections are sorted by descending score. Ties keep their input order (a *stable* sort;
  the port's ``np.argsort(-confidence)`` leaves the order of equal scores to the sort
  algorithm), so a result is reproducible;
* each detection is matched to the ground truth of its class in its image with the highest
  IoU (first one on equal IoU, difficult ones included); with the devkit's "+1" areas on 1-based
  inclusive pixels, which in our internal convention (``x1 = xmin - 1``, ``x2 = xmax``) is the
  plain continuous IoU;
* IoU > 0.5 strictly (the Python port; the MATLAB devkit uses >=): matched to a difficult
  ground truth -> ignored (neither TP nor FP); to an unclaimed one -> TP, which claims it; to a
  claimed one -> FP (duplicate); otherwise FP;
* precision = tp / max(tp + fp, eps): the later py-faster-rcnn fix for the first detections
  being ignored ones (0 / 0); they sit at recall 0, so AP is unchanged by it;
* AP: ``voc07`` 11-point (thresholds ``np.arange(0, 1.1, 0.1)`` exactly as the port, so
  0.3 is 0.30000000000000004; the 11 maxima are summed exactly and divided once, where the port
  adds ``p / 11`` term by term -- equal up to float rounding, but a perfect curve gives exactly
  1.0) or ``voc10`` area under the monotone precision envelope.

Classes without a non-difficult ground truth get AP = NaN (the devkit divides 0 by 0) and are
left out of the mAP, with a warning. A class with ground truth and no detections has AP 0.
Flipped records (training augmentation; they share their image id) are not evaluated.

The matching is vectorised: since a detection is assigned to its max-IoU ground truth whatever
was claimed before, a detection is a TP exactly when it is the first detection (in score order)
assigned to that non-difficult ground truth with IoU > threshold. That is an argmax per
(detection, ground truths of its image) block plus a first-occurrence test (``np.unique``
``return_index``) -- no Python loop over detections.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..data.records import ImageRecord
from ..errors import DetectionError
from .detections import ClassDetections, IdIndex, class_list, eval_records

__all__ = ["METRICS", "ClassEvaluation", "evaluate_class", "evaluate_class_flat", "evaluate_detections", "voc_ap"]

log = logging.getLogger(__name__)

#: AP definitions: "voc07" 11-point interpolation (VOC2007 and before), "voc10" area under the
#: monotone precision envelope (VOC2010 and later).
METRICS = ("voc07", "voc10")


# ------------------------------------------------------------------------------------------------
# AP
# ------------------------------------------------------------------------------------------------
def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """Average precision of a precision/recall curve, exactly as the devkit port's ``voc_ap``.

    Args:
        recall, precision: float arrays[D], the curve at each detection in score order.
        metric: "voc07": mean over t in ``np.arange(0., 1.1, 0.1)`` of the max precision at
            recall >= t (0 when none); "voc10": area under the monotone (non-increasing)
            envelope of precision, summed where recall changes.
    Returns:
        AP in [0, 1] (0 for an empty curve).
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if metric == "voc07":
        # np.arange, not np.linspace: the port's thresholds, 0.30000000000000004 included.
        maxima = []
        for t in np.arange(0.0, 1.1, 0.1):
            above = rec >= t
            maxima.append(float(np.max(prec[above])) if above.any() else 0.0)
        # The port adds p / 11 term by term, which gives 1.0000000000000002 for a perfect curve;
        # an exactly rounded sum divided once stays in [0, 1] (same value up to rounding).
        return math.fsum(maxima) / 11.0
    if metric == "voc10":
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        # Envelope: each precision becomes the max of itself and everything to its right.
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.where(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise DetectionError(f"unknown AP metric {metric!r}: use one of {', '.join(METRICS)}")


@dataclasses.dataclass(frozen=True, eq=False)
class ClassEvaluation:
    """The evaluation of one class.

    Attributes:
        ap: average precision (NaN when ``npos == 0``).
        precision, recall: float64 arrays[D] at each detection in score order (recall is NaN
            when ``npos == 0``).
        order: int64 array[D], the detections' input indices in score order.
        tp, fp: bool arrays[D] in score order; a detection matched to a difficult ground truth
            is neither.
        npos: number of non-difficult ground truths.
    """

    ap: float
    precision: np.ndarray
    recall: np.ndarray
    order: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    npos: int

    @property
    def num_detections(self) -> int:
        return len(self.order)

    def curve_corners(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at each true positive: the corners of the PR curve. Every point
        between two corners has lower precision at the same recall, so both AP definitions
        computed from the corners alone equal :attr:`ap`."""
        return self.recall[self.tp], self.precision[self.tp]


def evaluate_class_flat(gt_image: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray, num_images: int,
                        det_image: np.ndarray, det_scores: np.ndarray, det_boxes: np.ndarray,
                        iou_threshold: float = 0.5, metric: str = "voc07") -> ClassEvaluation:
    """Devkit matching and AP of one class, on flat arrays (the fast core).

    Args:
        gt_image: int array[G], image index of each ground truth, non-decreasing (ground truths
            of one image are contiguous, in annotation order: the argmax takes the first one on
            equal IoU, as the devkit does).
        gt_boxes: float array[G, 4], internal convention.
        gt_difficult: bool array[G].
        num_images: number of images (indices are in ``[0, num_images)``).
        det_image: int array[D], image index of each detection.
        det_scores: float array[D].
        det_boxes: float array[D, 4], internal convention.
        iou_threshold: a match needs IoU strictly greater than this.
        metric: "voc07" or "voc10" (see :func:`voc_ap`).
    Returns:
        :class:`ClassEvaluation`.
    """
    if metric not in METRICS:
        raise DetectionError(f"unknown AP metric {metric!r}: use one of {', '.join(METRICS)}")
    gt_image = np.asarray(gt_image, dtype=np.int64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_difficult = np.asarray(gt_difficult, dtype=bool).reshape(-1)
    det_image = np.asarray(det_image, dtype=np.int64).reshape(-1)
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    if not (len(gt_image) == len(gt_boxes) == len(gt_difficult)):
        raise ValueError("ground truth arrays differ in length")
    if not (len(det_image) == len(det_scores) == len(det_boxes)):
        raise ValueError("detection arrays differ in length")
    if len(gt_image) and (np.any(np.diff(gt_image) < 0) or gt_image[0] < 0 or gt_image[-1] >= num_images):
        raise ValueError("gt_image must be non-decreasing and in [0, num_images)")
    if len(det_image) and (det_image.min() < 0 or det_image.max() >= num_images):
        raise ValueError("det_image must be in [0, num_images)")

    npos = int(np.count_nonzero(~gt_difficult))
    num_det = len(det_scores)
    # Descending score; equal scores keep their input order (stable sort, documented above).
    order = np.argsort(-det_scores, kind="stable")
    d_img = det_image[order]
    d_box = det_boxes[order]

    # Ground truths of image i are gt[starts[i] : starts[i] + counts[i]].
    counts = np.bincount(gt_image, minlength=num_images)
    starts = np.cumsum(counts) - counts
    cnt = counts[d_img]                                   # [D] ground truths facing each detection
    seg_start = np.cumsum(cnt) - cnt                      # [D] first pair of each detection
    num_pairs = int(cnt.sum())
    pair_det = np.repeat(np.arange(num_det), cnt)         # [P]
    local = np.arange(num_pairs) - seg_start[pair_det]    # [P] index of the gt within its image
    pair_gt = starts[d_img][pair_det] + local             # [P] global gt index

    # IoU per pair, the devkit's formula (areas not clipped) in internal coordinates.
    b = d_box[pair_det]
    g = gt_boxes[pair_gt]
    iw = np.maximum(np.minimum(b[:, 2], g[:, 2]) - np.maximum(b[:, 0], g[:, 0]), 0.0)
    ih = np.maximum(np.minimum(b[:, 3], g[:, 3]) - np.maximum(b[:, 1], g[:, 1]), 0.0)
    inter = iw * ih
    union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union

    has = cnt > 0
    ovmax = np.full(num_det, -np.inf)
    jmax = np.zeros(num_det, dtype=np.int64)
    if num_pairs:
        seg = seg_start[has]
        # np.maximum propagates NaN like the port's np.max; NaN > threshold is False -> FP.
        ovmax[has] = np.maximum.reduceat(iou, seg)
        # First gt reaching the max (np.argmax semantics).
        first_local = np.where(iou == ovmax[pair_det], local, np.iinfo(np.int64).max)
        jloc = np.minimum.reduceat(first_local, seg)
        jloc[jloc == np.iinfo(np.int64).max] = 0          # NaN segments: unused (not valid)
        jmax[has] = starts[d_img[has]] + jloc

    valid = ovmax > iou_threshold
    ignored = valid & gt_difficult[jmax] if len(gt_difficult) else np.zeros(num_det, bool)
    candidate = valid & ~ignored
    tp = np.zeros(num_det, dtype=bool)
    if candidate.any():
        cand_idx = np.flatnonzero(candidate)
        # return_index gives the first occurrence: the highest-scoring claim of each gt.
        _, first = np.unique(jmax[cand_idx], return_index=True)
        tp[cand_idx[first]] = True
    fp = ~(tp | ignored)

    tp_cum = np.cumsum(tp, dtype=np.float64)
    fp_cum = np.cumsum(fp, dtype=np.float64)
    # eps instead of 0 / 0 when the first detections are all ignored (precision 0 at recall 0).
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    if npos == 0:
        recall = np.full(num_det, np.nan)
        ap = math.nan
    else:
        recall = tp_cum / float(npos)
        ap = voc_ap(recall, precision, metric)
    return ClassEvaluation(ap=ap, precision=precision, recall=recall, order=order, tp=tp, fp=fp, npos=npos)


def evaluate_class(gt_boxes: Sequence[np.ndarray], gt_difficult: Sequence[np.ndarray], det_image: np.ndarray,
                   det_scores: np.ndarray, det_boxes: np.ndarray, iou_threshold: float = 0.5,
                   metric: str = "voc07") -> ClassEvaluation:
    """Devkit matching and AP of one class, ground truth given per image.

    Args:
        gt_boxes: one float array[G_i, 4] per image: the ground truths *of this class*, internal
            convention.
        gt_difficult: one bool array[G_i] per image.
        det_image: int array[D], index into the per-image lists of each detection.
        det_scores: float array[D].
        det_boxes: float array[D, 4], internal convention.
        iou_threshold, metric: see :func:`evaluate_class_flat`.
    Returns:
        :class:`ClassEvaluation` (``.ap``, ``.precision``, ``.recall``, ...).
    """
    if len(gt_boxes) != len(gt_difficult):
        raise ValueError(f"{len(gt_boxes)} ground-truth box arrays but {len(gt_difficult)} difficult arrays")
    sizes = [len(np.asarray(b).reshape(-1, 4)) for b in gt_boxes]
    gt_image = np.repeat(np.arange(len(gt_boxes)), sizes)
    flat_boxes = (np.concatenate([np.asarray(b, np.float64).reshape(-1, 4) for b in gt_boxes])
                  if gt_boxes else np.zeros((0, 4)))
    flat_diff = (np.concatenate([np.asarray(d, bool).reshape(-1) for d in gt_difficult])
                 if gt_difficult else np.zeros(0, bool))
    return evaluate_class_flat(gt_image, flat_boxes, flat_diff, len(gt_boxes), det_image, det_scores, det_boxes,
                               iou_threshold, metric)


# ------------------------------------------------------------------------------------------------
# A split's ground truth + detections -> metrics
# ------------------------------------------------------------------------------------------------
def _round_list(a: np.ndarray, decimals: int = 6) -> list[float]:
    return [float(x) for x in np.round(a, decimals)]


def evaluate_detections(records: Sequence[ImageRecord], classes: Sequence[str],
                        detections: Sequence[ClassDetections] | Mapping[str, ClassDetections],
                        metric: str = "voc07", iou_threshold: float = 0.5) -> dict[str, Any]:
    """Devkit AP of every class and the mAP.

    Args:
        records: the split's image records (ground truth; labels index ``classes``). Flipped
            records are ignored.
        classes: class names in label order.
        detections: one :class:`ClassDetections` per class (list in class order, or a mapping
            class name -> detections; a missing class has no detections).
        metric: "voc07" or "voc10".
        iou_threshold: IoU a match must exceed.
    Returns:
        JSON-able dict: ``metric``, ``iou_threshold``, ``mAP`` (mean over classes with ground
        truth; NaN when none has), ``AP`` {class: AP, NaN without ground truth}, ``num_images``,
        ``num_positives`` {class: non-difficult ground truths}, ``num_detections`` {class: n},
        ``classes_without_ground_truth`` [names], ``pr_curves`` {class: {"recall": [...],
        "precision": [...]}} at each true positive, rounded to 1e-6 (enough to redraw the
        curve and recompute AP). All fractions are in [0, 1].
    """
    if metric not in METRICS:
        raise DetectionError(f"unknown AP metric {metric!r}: use one of {', '.join(METRICS)}")
    records = eval_records(records)
    classes = list(classes)
    dets = class_list(classes, detections)
    index = IdIndex([r.image_id for r in records])
    num_images = len(records)

    # All ground truth once, flat and in record order; per class a boolean selection keeps
    # each image's ground truths contiguous and in annotation order.
    sizes = [len(r.labels) for r in records]
    gt_image = np.repeat(np.arange(num_images), sizes)
    gt_boxes = np.concatenate([np.asarray(r.boxes, np.float64).reshape(-1, 4) for r in records]) if records else np.zeros((0, 4))
    gt_labels = np.concatenate([np.asarray(r.labels, np.int64).reshape(-1) for r in records]) if records else np.zeros(0, np.int64)
    gt_diff = np.concatenate([np.asarray(r.difficult, bool).reshape(-1) for r in records]) if records else np.zeros(0, bool)

    ap: dict[str, float] = {}
    npos: dict[str, int] = {}
    ndet: dict[str, int] = {}
    curves: dict[str, dict[str, list[float]]] = {}
    for c, (name, d) in enumerate(zip(classes, dets)):
        sel = gt_labels == c
        det_image = index(d.image_ids, f"detections of class {name!r}")
        res = evaluate_class_flat(gt_image[sel], gt_boxes[sel], gt_diff[sel], num_images,
                                  det_image, d.scores, d.boxes, iou_threshold, metric)
        ap[name], npos[name], ndet[name] = res.ap, res.npos, res.num_detections
        r, p = res.curve_corners()
        curves[name] = {"recall": _round_list(r), "precision": _round_list(p)}

    no_gt = [n for n in classes if npos[n] == 0]
    if no_gt:
        log.warning("classes without (non-difficult) ground truth, AP = NaN, left out of the mAP: %s", ", ".join(no_gt))
    scored = [ap[n] for n in classes if npos[n] > 0]
    mean_ap = float(np.mean(scored)) if scored else math.nan
    log.info("mAP (%s, IoU > %g) = %.4f over %d classes, %d images", metric, iou_threshold, mean_ap, len(scored), num_images)
    return {
        "metric": metric,
        "iou_threshold": iou_threshold,
        "mAP": mean_ap,
        "AP": ap,
        "num_images": num_images,
        "num_positives": npos,
        "num_detections": ndet,
        "classes_without_ground_truth": no_gt,
        "pr_curves": curves,
    }
