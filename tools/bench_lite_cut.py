#!/usr/bin/env python
"""Where to cut EfficientNet-Lite at stride 16: after stage 4 (``blocks.4``, 112 channels, the
built-in trunk) or one 1x1 expansion conv further (672 channels, as MobileNetV2 is cut). A linear
probe of SPP window features, cheaper than two detection runs: for every image of a split, the
ground-truth boxes and 4 random background windows (IoU < 0.3 with every object, seeded) are pooled
from one scale (shorter side 600, pyramid {4, 2, 1}); a LinearSVC (standardised features) is trained
on trainval and scored on test: accuracy over all windows and over the objects alone.

Example:
    python tools/bench_lite_cut.py --data DATA/raccoon --backbone efficientnet_lite0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from detection.backbones import build_backbone
from detection.backbones.efficientnet import LITE_NAMES, imagenet_classifier, lite_trunk
from detection.backbones.layers import freeze_batchnorm
from detection.boxes import box_iou_numpy
from detection.cli import run_tool
from detection.data.images import load_image
from detection.data.voc import VOCDataset
from detection.features.extract import conv_maps_for_image
from detection.features.pooling import window_features

LEVELS = (4, 2, 1)


def window_set(backbone, dataset, rng: np.random.Generator, background: int = 4):
    xs, ys = [], []
    for rec in dataset:
        image = load_image(rec)
        maps = conv_maps_for_image(backbone, image, (600,), 1000)
        gt = rec.boxes.astype(np.float32)
        bg = []
        while len(bg) < background:
            bw, bh = rng.uniform(0.1, 0.7) * rec.width, rng.uniform(0.1, 0.7) * rec.height
            x1, y1 = rng.uniform(0, rec.width - bw), rng.uniform(0, rec.height - bh)
            box = np.array([[x1, y1, x1 + bw, y1 + bh]], np.float32)
            if box_iou_numpy(box, gt).max() < 0.3:
                bg.append(box[0])
        boxes = np.concatenate([gt, np.stack(bg)])
        with torch.inference_mode():
            f = window_features(maps.maps[0], torch.from_numpy(boxes * maps.factors[0]), maps.stride, LEVELS,
                                first_cell_center=maps.first_cell_center)
        xs.append(f.numpy())
        ys.append(np.concatenate([rec.labels + 1, np.zeros(background, np.int64)]))
    return np.concatenate(xs), np.concatenate(ys)


def main(args: argparse.Namespace) -> int:
    train, test = VOCDataset(args.data, "trainval"), VOCDataset(args.data, "test")
    rows = []
    for expansion in (False, True):
        backbone = build_backbone(args.backbone, weights="imagenet")
        if expansion:
            trunk, channels = lite_trunk(imagenet_classifier(args.backbone), expansion=True)
            backbone.trunk, backbone.out_channels = freeze_batchnorm(trunk).eval(), channels
        xtr, ytr = window_set(backbone, train, np.random.default_rng(0))
        xte, yte = window_set(backbone, test, np.random.default_rng(1))
        scaler = StandardScaler().fit(xtr)
        for c in (1e-3, 1e-2):
            pred = LinearSVC(C=c, max_iter=5000).fit(scaler.transform(xtr), ytr).predict(scaler.transform(xte))
            obj = yte > 0
            rows.append({"channels": backbone.out_channels, "dim": int(xtr.shape[1]), "C": c,
                         "accuracy": round(float(np.mean(pred == yte)), 3),
                         "object_accuracy": round(float(np.mean(pred[obj] == yte[obj])), 3),
                         "train_windows": len(ytr), "test_windows": len(yte)})
            print(json.dumps({"data": str(args.data), "backbone": args.backbone, **rows[-1]}), flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="VOC-layout dataset with trainval and test splits")
    p.add_argument("--backbone", choices=LITE_NAMES, default="efficientnet_lite0")
    sys.exit(run_tool(main, p))
