#!/usr/bin/env python
"""Test a classifier file with one view, optionally at rescaled test sizes.

    python tools/eval_classifier.py --model runs/spp/classifier.pt --data CROPS --split test --view full --out m.json
    python tools/eval_classifier.py --model runs/spp/classifier.pt --data CROPS --split test --view multi \\
        --scales 224 256 300 --out m.json
    python tools/eval_classifier.py ... --view full --rescale 0.5 0.71 1 1.41 2 --out m.json   # + m_scales.png

Views: center (224 crop), ten (5 crops + flips), full (whole image, shorter side 256), multi
(windows pooled from one conv map per scale). docs/classification.md.
"""
import argparse
import sys

from detection.classification import run_evaluation, score_text
from detection.classification.config import VIEWS
from detection.cli import run_tool


def main(args: argparse.Namespace) -> int:
    result = run_evaluation(args.model, args.data, args.split, args.view, args.out, scales=args.scales,
                            rescale=args.rescale, device=args.device)
    if result is not None:
        print(f"{args.view} view on {args.split}: {score_text(result)} ({result['images_per_second']:.1f} images/s); "
              f"written to {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="classifier.pt of tools/train_classifier.py")
    p.add_argument("--data", required=True, help="ImageFolder or VOC-layout folder")
    p.add_argument("--split", default="test")
    p.add_argument("--view", choices=VIEWS, default="center")
    p.add_argument("--scales", type=int, nargs="+", default=None,
                   help="multi-view scales, shorter sides (default the file's: 224 256 300 360 448 560)")
    p.add_argument("--rescale", type=float, nargs="+", default=None,
                   help="scale robustness: also score the view with every side multiplied by each factor")
    p.add_argument("--out", required=True, help="metrics JSON file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sys.exit(run_tool(main, p))
