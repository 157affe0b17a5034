#!/usr/bin/env python
"""Train a detector on a conv-map cache: (fc fine-tuning) -> one linear SVM per class with
hard-negative mining -> per-class box regressors; writes the one model file.

    python tools/extract_features.py --data DIR --split trainval --out FEAT --backbone squeezenet1_0 --weights W.pth
    python tools/train_svm.py --data DIR --split trainval --features FEAT --out model.pt
    python tools/eval_voc.py --data DIR --split test --model model.pt --out metrics.json
"""
import argparse
import sys

from detection.cli import add_set_arg, add_skip_bad_arg, run_tool
from detection.training.from_features import train_from_features


def main(args: argparse.Namespace) -> int:
    train_from_features(args.data, args.split, args.features, args.out, weights=args.weights, seed=args.seed,
                        layer=args.layer, finetune_iterations=args.finetune, bbox_regression=not args.no_bbox,
                        scale_rule=args.scale_rule, workers=args.workers, overrides=args.set, skip_bad=args.skip_bad,
                        progress=not args.quiet)
    print(f"model written to {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--features", required=True, help="the --out folder of tools/extract_features.py")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--weights", default=None,
                   help="default: the weights extract_features.py recorded in FEAT/features_summary.json")
    p.add_argument("--seed", type=int, default=None, help="default: the seed extract_features.py recorded")
    p.add_argument("--layer", default=None, choices=["pool5", "fc6", "fc7"],
                   help="SVM features (default fc7 with --finetune, else pool5)")
    p.add_argument("--finetune", type=int, default=0, metavar="ITERATIONS",
                   help="fine-tune fc6/fc7/fc8 for this many mini-batches first (0: no fine-tuning)")
    p.add_argument("--no-bbox", action="store_true", help="no box regression")
    p.add_argument("--scale-rule", choices=["area", "code"], default="area",
                   help="multi-scale: each window's scale by area nearest 224^2 (paper) or side nearest 208 "
                        "(official code); stored in the model (docs/spp.md)")
    p.add_argument("--workers", type=int, default=None, help="selective-search processes if proposals are missing")
    add_set_arg(p, "svm.C=0.001 finetune.lr=0.0001")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
