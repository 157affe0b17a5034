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
import sys
from pathlib import Path

from detection.cli import add_skip_bad_arg, run_tool
from detection.evaluation.split import evaluate_split, metrics_table


def main(args: argparse.Namespace) -> int:
    metrics = evaluate_split(args.data, args.split, args.out, args.results, args.model, device=args.device,
                             svd=args.svd, metric=args.metric, coco=args.coco, plots=args.plots,
                             skip_bad=args.skip_bad, progress=not args.quiet)
    print(metrics_table(metrics))
    print(f"metrics: {args.out}")
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
