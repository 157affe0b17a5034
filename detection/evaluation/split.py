"""Scoring a split end to end, what ``tools/eval_voc.py`` runs: optionally detect it with a model
file first (writing devkit result files), then score the result files with the VOC protocol (and
COCO's), draw the PR curves and write ``metrics.json``.

Not imported by the package ``__init__``: it needs the detector, and the evaluation modules stay
importable without it.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .. import comm
from ..data.voc import VOCDataset, report_images
from ..detector import SPPDetector
from ..errors import DetectionError
from ..io.jsonfile import write_json
from ..runtime import resolve_device
from . import evaluate_result_dir
from .detections import detections_by_class
from .inference import detect_dataset
from .plots import plot_pr_curves
from .result_files import write_result_files

__all__ = ["evaluate_split", "score_split", "load_detector", "metrics_table"]

log = logging.getLogger(__name__)


def load_detector(model: str | os.PathLike, device: str = "auto", svd: Sequence[int] | None = None) -> SPPDetector:
    """The model file's detector (its metadata validated: class names become file names), with
    fc6/fc7 truncated by SVD to the ranks ``svd`` (Fast R-CNN's speed-up) when given."""
    detector = SPPDetector.from_file(model, device=resolve_device(device))
    if svd and detector.settings.feature_layer == "pool5":
        raise DetectionError(f"--svd: the SVMs of {model} read pool5 features, so fc6/fc7 are not used")
    if svd:
        # Measure the mAP cost of the SVD-truncated fc6/fc7.
        detector.head.compress(*svd)
    return detector


def evaluate_split(data: str | os.PathLike, split: str, out: str | os.PathLike,
                   results: str | os.PathLike | None = None, model: str | os.PathLike | None = None, *,
                   device: str = "auto", svd: Sequence[int] | None = None, metric: str | None = None,
                   coco: bool = False, plots: str | os.PathLike | None = None, skip_bad: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Score a VOC-layout split and write the metrics JSON file ``out``.

    Args:
        data: VOC-layout folder; split: its image set.
        out: metrics JSON file to write.
        results: folder of ``comp4_det_<split>_<class>.txt`` files: read, and written first when
            ``model`` is given (default then: ``results/`` beside ``out``).
        model: a trained detector's file: detect the split first (proposals cached in
            ``proposals/`` beside ``results``, with the model's proposal settings).
        device: with ``model``: "auto", "cpu", "cuda" or "cuda:N".
        svd: with ``model``: (rank6, rank7) to truncate fc6/fc7 to first.
        metric: "voc07" / "voc10"; None: :func:`~detection.evaluation.result_files.default_metric`.
        coco: also compute COCO AP@[.5:.95] / AP50 / AP75 (pycocotools).
        plots: folder for per-class precision/recall PNGs.
        skip_bad: leave out undecodable images (see :class:`~detection.data.voc.VOCDataset`).
        progress: show progress bars.
    Returns:
        the metrics dict of :func:`~detection.evaluation.evaluate_result_dir`, plus
        ``results_dir``, ``untrained_classes`` (classes the model had no positives for) and
        ``svd`` when given.
    """
    if results is None:
        if not model:
            raise DetectionError("give --results RESULTS_DIR (devkit result files) or --model MODEL")
        results = Path(out).resolve().parent / "results"
    comm.init_distributed(resolve_device(device))    # under torchrun: each rank detects a share
    detector = load_detector(model, device, svd) if model else None
    dataset = VOCDataset(data, split, classes=detector.classes if detector else None, skip_bad=skip_bad)
    if detector is not None:
        per_image = detect_dataset(detector, dataset, proposals_dir=Path(results).parent / "proposals",
                                   progress=progress)
        if comm.is_main():
            write_result_files(results, dataset.split, dataset.classes,
                               detections_by_class([r.image_id for r in dataset.records], per_image,
                                                   len(dataset.classes)))
    if not comm.is_main():      # rank 0 scores the gathered detections once
        return comm.broadcast(None, "evaluation: waiting for rank 0's metrics")
    metrics = score_split(dataset, results, metric=metric, coco=coco, plots=plots, progress=progress)
    metrics["results_dir"] = str(results)
    # Classes the model could not train (no positives in its training images): AP 0 where the
    # split has them; marked so a reader does not take it for a detector that failed.
    metrics["untrained_classes"] = list(detector.svms.meta.get("untrained", [])) if detector else []
    if svd:
        metrics["svd"] = list(svd)
    write_json(out, metrics)
    report_images(dataset)
    return comm.broadcast(metrics, "evaluation: sending the metrics to every rank")


def score_split(dataset: VOCDataset, results: str | os.PathLike, *, metric: str | None = None, coco: bool = False,
                plots: str | os.PathLike | None = None, progress: bool = False) -> dict[str, Any]:
    """Score the devkit result files in ``results`` against ``dataset`` (the VOC protocol with
    ``metric``, None: :func:`~detection.evaluation.result_files.default_metric`; COCO's too with
    ``coco``) and draw the per-class precision/recall curves into ``plots`` when given (a
    drawing failure is a warning: the metrics are never lost over pictures). What
    :func:`evaluate_split` and the pipeline's evaluation stage run."""
    metrics = evaluate_result_dir(dataset, results, metric=metric, coco=coco, progress=progress)
    if plots:
        try:
            plot_pr_curves(metrics, plots)
        except Exception as e:  # noqa: BLE001 - pictures are a nicety
            log.warning("could not draw PR curves: %s", e)
    return metrics


def metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics as the text table the tools print: AP, ground truths and detections per class,
    the mAP, and COCO's summary when computed."""
    untrained = metrics.get("untrained_classes", [])
    width = max([len(c) for c in metrics["AP"]] + [5])
    lines = [f"{'class':<{width}}  {'AP':>6}  {'#gt':>6}  {'#det':>8}"]
    for name, ap in metrics["AP"].items():
        ap_text = f"{ap:6.4f}" if not math.isnan(ap) else "   n/a"
        mark = "  (untrained: no positives in the training images)" if name in untrained else ""
        lines.append(f"{name:<{width}}  {ap_text}  {metrics['num_positives'][name]:>6}  "
                     f"{metrics['num_detections'][name]:>8}{mark}")
    lines.append(f"{'mAP':<{width}}  {metrics['mAP']:6.4f}  ({metrics['metric']}, {metrics['num_images']} images)")
    if "coco" in metrics:
        c = metrics["coco"]
        lines.append(f"COCO: AP@[.5:.95] {c['AP']:.4f}  AP50 {c['AP50']:.4f}  AP75 {c['AP75']:.4f}")
    return "\n".join(lines)
