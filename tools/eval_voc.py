#!/usr/bin/env python
"""Score detections on a VOC-layout split with the PASCAL VOC devkit protocol (and optionally
pycocotools' COCO metrics), and write metrics.json.

Either score existing result files (``comp4_det_<split>_<class>.txt``, no model needed):

    python tools/eval_voc.py --data VOCdevkit/VOC2007 --split test --results runs/voc07/results --out metrics.json

or run a trained detector first (writes the result files into --results, then scores them):

    python tools/eval_voc.py --data VOCdevkit/VOC2007 --split test --model runs/voc07/model.pt \\
        --results runs/voc07/results --out metrics.json

The AP definition defaults to VOC2007's 11-point interpolation when the data folder or its
parent is named like a VOC year before 2010 (e.g. VOC2007), and to VOC2010's area under the
precision envelope for any other dataset; --metric overrides it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from detection.cli import add_skip_bad_arg, run_tool
from detection.errors import DetectionError
from detection.io import write_json


def _load_detector(args: argparse.Namespace):
    """The model file's detector (its metadata validated: class names become file names)."""
    try:
        from detection.detector import SPPDetector
    except ImportError as e:
        raise DetectionError(f"--model: detection.detector is not available ({e}); "
                             "score existing result files with --results instead") from None
    from detection.runtime import resolve_device

    detector = SPPDetector.from_file(args.model, device=resolve_device(args.device))
    if args.svd and detector.settings.feature_layer == "pool5":
        raise DetectionError(f"--svd: the SVMs of {args.model} read pool5 features, so fc6/fc7 are not used")
    if args.svd:
        # Measure the mAP cost of the SVD-truncated fc6/fc7 (Fast R-CNN's speed-up).
        detector.head.compress(*args.svd)
    return detector


def _detect(args: argparse.Namespace, detector, dataset) -> None:
    """Run the detector on the split and write its result files into --results."""
    from detection.detector import detect_dataset
    from detection.evaluation.voc import detections_by_class, write_result_files

    proposals_dir = Path(args.results).parent / "proposals"
    per_image = detect_dataset(detector, dataset, proposals_dir=proposals_dir, progress=not args.quiet)
    write_result_files(args.results, dataset.split, dataset.classes,
                       detections_by_class([r.image_id for r in dataset.records], per_image, len(dataset.classes)))


def main(args: argparse.Namespace) -> int:
    from detection.data.voc import VOCDataset, report_images
    from detection.evaluation import evaluate_result_dir

    if args.results is None:
        if not args.model:
            raise DetectionError("give --results RESULTS_DIR (devkit result files) or --model MODEL")
        args.results = Path(args.out).resolve().parent / "results"
    detector = _load_detector(args) if args.model else None
    dataset = VOCDataset(args.data, args.split, classes=detector.classes if detector else None,
                         skip_bad=args.skip_bad)
    if detector is not None:
        _detect(args, detector, dataset)
    metrics = evaluate_result_dir(dataset, args.results, metric=args.metric, coco=args.coco, progress=not args.quiet)
    metrics["results_dir"] = str(args.results)
    # Classes the model could not train (no positives in its training images): AP 0 where the
    # split has them; marked so a reader does not take it for a detector that failed.
    untrained = list(detector.svms.meta.get("untrained", [])) if detector else []
    metrics["untrained_classes"] = untrained
    if args.svd:
        metrics["svd"] = list(args.svd)
    if args.plots:
        from detection.evaluation.plots import plot_pr_curves
        plot_pr_curves(metrics, args.plots)
    write_json(args.out, metrics)

    width = max([len(c) for c in dataset.classes] + [5])
    print(f"{'class':<{width}}  {'AP':>6}  {'#gt':>6}  {'#det':>8}")
    for name, ap in metrics["AP"].items():
        ap_text = f"{ap:6.4f}" if not math.isnan(ap) else "   n/a"
        mark = "  (untrained: no positives in the training images)" if name in untrained else ""
        print(f"{name:<{width}}  {ap_text}  {metrics['num_positives'][name]:>6}  {metrics['num_detections'][name]:>8}"
              f"{mark}")
    print(f"{'mAP':<{width}}  {metrics['mAP']:6.4f}  ({metrics['metric']}, {metrics['num_images']} images)")
    if "coco" in metrics:
        c = metrics["coco"]
        print(f"COCO: AP@[.5:.95] {c['AP']:.4f}  AP50 {c['AP50']:.4f}  AP75 {c['AP75']:.4f}")
    print(f"metrics: {args.out}")
    report_images(dataset)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="VOC-layout folder (Annotations/, ImageSets/Main/, ...)")
    p.add_argument("--split", default="test", help="image set of ImageSets/Main (default: test)")
    p.add_argument("--results", type=Path, default=None,
                   help="folder of comp4_det_<split>_<class>.txt files (read; written first with --model; "
                        "default with --model: results/ beside --out)")
    p.add_argument("--model", type=Path, help="trained detector: detect the split first, then score")
    p.add_argument("--device", default="auto", help="with --model: auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--svd", type=int, nargs=2, metavar=("RANK6", "RANK7"),
                   help="with --model: truncate fc6/fc7 by SVD to these ranks first (e.g. 1024 256)")
    p.add_argument("--metric", choices=["voc07", "voc10"], default=None,
                   help="AP definition (default: voc07 for VOC2007-like folders, voc10 otherwise)")
    p.add_argument("--coco", action="store_true", help="also compute COCO AP@[.5:.95] / AP50 / AP75 (pycocotools)")
    p.add_argument("--plots", type=Path, help="folder for per-class precision/recall PNGs")
    p.add_argument("--out", required=True, type=Path, help="metrics JSON file to write")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
