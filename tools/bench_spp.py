#!/usr/bin/env python
"""Time the SPP core on one image: the conv pass at one scale, :func:`detection.features.pooling.pool_windows`
of many windows (default sparse-table method, and its ``method="roi_pool"`` variant), and
torchvision's ``roi_pool`` run at every pyramid level for comparison (:func:`detection.bench.bench_spp_core`).

The image: ``--image FILE``; or ``--data DIR`` (a VOC-layout dataset), its first ``--split`` image
of VOC's usual 4:3 shape; else random pixels (500 x 375). All timings are medians of ``--repeat``
runs after one warm-up, with ``--threads`` torch threads (default: one per core).

Example:
    python tools/bench_spp.py --data data/raccoon --backbone zf5 --windows 2000 --threads 2 --repeat 5 --out spp.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from detection.bench import bench_spp_core, first_image_of_shape
from detection.cli import run_tool
from detection.data.images import load_image, read_image
from detection.io.jsonfile import write_json


def _bench(args: argparse.Namespace) -> int:
    if args.image is not None:
        image, name = read_image(args.image), str(args.image)
    elif args.data is not None:
        record = first_image_of_shape(args.data, args.split)
        image, name = load_image(record), str(record.path)
    else:
        image, name = np.random.default_rng(args.seed).integers(0, 256, (375, 500, 3), dtype=np.uint8), "random"
    result = bench_spp_core(image, args.backbone, args.weights, args.scale, args.windows,
                            [int(v) for v in args.levels.split(",")], args.repeat, args.device, args.seed,
                            roi_pool=not args.no_roi_pool)
    result["image"] = name
    for k, v in result.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out is not None:
        write_json(args.out, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="zf5")
    p.add_argument("--weights", default=None, help="state-dict file (default: random init)")
    p.add_argument("--image", type=Path, default=None, help="image file")
    p.add_argument("--data", type=Path, default=None, help="VOC-layout dataset: its first 4:3 image of --split")
    p.add_argument("--split", default="test", help="image set of --data (default test)")
    p.add_argument("--scale", type=int, default=688, help="shorter side of the conv pass")
    p.add_argument("--windows", type=int, default=2000)
    p.add_argument("--levels", default="6,3,2,1")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-roi-pool", action="store_true", help="skip the torchvision roi_pool timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return run_tool(_bench, p, argv)


if __name__ == "__main__":
    sys.exit(main())
