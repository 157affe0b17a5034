#!/usr/bin/env python
"""Convert a Caffe .caffemodel (no Caffe needed) into a state dict for --backbone zf5 or vgg16.

    python tools/convert_caffe.py --caffemodel Zeiler_conv5.caffemodel --target zf5 --out zf5_imagenet.pth
    python tools/convert_caffe.py --caffemodel vgg16_fast_rcnn_iter_40000.caffemodel --target vgg16 --out vgg16_frcn.pth

Layers are taken by name: conv1..conv5 for zf5 (SPP_net's release), conv1_1..conv5_3, fc6, fc7 (and
fc8 when present) for vgg16. conv1 is folded so the trunk takes this project's normalised RGB
input; --pixel-means gives the BGR mean the Caffe model subtracted (default Fast R-CNN's).
docs/voc2007.md says where the official files are and how to reproduce the paper with them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.caffe import CAFFE_LAYER_MAPS, FAST_RCNN_PIXEL_MEANS, convert_caffemodel
from detection.cli import run_tool


def main(args: argparse.Namespace) -> int:
    weights_id = convert_caffemodel(args.caffemodel, args.target, args.out, tuple(args.pixel_means))
    print(f"{args.target} weights ({weights_id}) -> {args.out}; use --backbone {args.target} --weights {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caffemodel", required=True, type=Path, help="the .caffemodel file (binary NetParameter)")
    p.add_argument("--target", required=True, choices=sorted(CAFFE_LAYER_MAPS), help="network to convert into")
    p.add_argument("--out", required=True, type=Path, help="state-dict file to write (.pth)")
    p.add_argument("--pixel-means", type=float, nargs=3, default=list(FAST_RCNN_PIXEL_MEANS), metavar=("B", "G", "R"),
                   help="mean pixel the Caffe model subtracts, BGR 0..255 (default: Fast R-CNN's %(default)s)")
    sys.exit(run_tool(main, p))
