#!/usr/bin/env python
"""Train an SPP (or, with --no-spp, the fixed-224 baseline) image classifier and test it.

    python tools/train_classifier.py --data CROPS --out runs/spp --backbone squeezenet1_1 --weights W.pth
    python tools/train_classifier.py --data CROPS --out runs/nospp --backbone squeezenet1_1 --weights W.pth --no-spp
    torchrun --nproc_per_node 2 tools/train_classifier.py --data CROPS --out runs/any --backbone ... --regime any

DIR is an ImageFolder (train/<class>/*, test/<class>/*: top-1/top-5) or a VOC-layout folder
(trainval and test image sets: image-level labels, per-class AP and mAP). Writes
OUT/classifier.pt and OUT/metrics.json (the test split, centre view). docs/classification.md.
"""
import argparse
import sys

from detection.classification import resolve_config, run_training, score_text
from detection.classification.config import HEADS, REGIMES
from detection.cli import add_set_arg, run_tool


def main(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.config, args.set, backbone=args.backbone, weights=args.weights, regime=args.regime,
                         head=args.head, no_spp=args.no_spp)
    result = run_training(args.data, args.out, cfg, device=args.device)
    if result is not None:
        test = result["test"]
        print(f"{args.out}/classifier.pt written; test ({test['view']} view): {score_text(test)}; "
              f"training {result['training']['images_per_second']:.1f} images/s")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder or VOC-layout folder")
    p.add_argument("--out", required=True, help="output folder (classifier.pt, metrics.json)")
    p.add_argument("--backbone", required=True, help="conv trunk, e.g. squeezenet1_1, mobilenet_v2_tf, zf5, vgg16")
    p.add_argument("--weights", default=None, help="state-dict file of the full torchvision model, or 'imagenet'")
    p.add_argument("--regime", choices=REGIMES, default=None, help="training sizes (default single)")
    p.add_argument("--head", choices=HEADS, default=None, help="fc layers or linear SVMs (default fc)")
    p.add_argument("--no-spp", action="store_true", help="the baseline: fixed 224 input and a fixed pool5")
    p.add_argument("--config", default=None, help="YAML file of settings (model/train/test)")
    add_set_arg(p, "train.epochs=5")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sys.exit(run_tool(main, p))
