#!/usr/bin/env python
"""Seconds per image of one SVM hard-negative mining pass on real conv maps: the features read
(pooling an image's windows from the conv-map cache) and the trainer's whole per-image step
(read, IoU, scores of every class, hard rows) (:func:`detection.bench.bench_mining_cost`).

Example:
    python tools/bench_mining.py --data data/fruit --backbone zf5 --windows 2000 --images 8 --out mining.json
"""
from __future__ import annotations

import argparse
import json
import sys

from detection.bench import bench_mining_cost
from detection.cli import run_tool
from detection.io.jsonfile import write_json


def _bench(args: argparse.Namespace) -> int:
    result = bench_mining_cost(args.data, args.work, backbone=args.backbone, weights=args.weights,
                               scales=args.scales, windows=args.windows, images=args.images, num_classes=args.classes)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_each")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a VOC-layout dataset")
    p.add_argument("--work", required=True, help="folder for the conv-map cache of the images measured")
    p.add_argument("--backbone", default="zf5")
    p.add_argument("--weights", default=None, help="weights of the backbone (default: seeded random)")
    p.add_argument("--scales", type=int, nargs="+", default=[480, 576, 688, 864, 1200])
    p.add_argument("--windows", type=int, default=2000, help="windows per image")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--classes", type=int, default=20, help="SVMs scored per window")
    p.add_argument("--out", required=True, help="JSON file to write")
    return run_tool(_bench, p, argv)


if __name__ == "__main__":
    sys.exit(main())
