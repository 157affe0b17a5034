#!/usr/bin/env python
"""Compute the conv-map cache of a dataset split (one conv pass per image per scale).

Proposals are computed first (into OUT/proposals, resumed if partial) unless --no-proposals;
then the conv maps go to OUT/convmaps_<key>/ and a summary to OUT/features_summary.json.

Example:
    python tools/extract_features.py --data $DATA/raccoon --split trainval \\
        --out runs/raccoon --backbone zf5 --scales 1 --fp16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detection.cli import add_skip_bad_arg, run_tool
from detection.extraction import extract_split
from detection.features.scales import named_scales


def _extract(args: argparse.Namespace) -> int:
    summary = extract_split(args.data, args.split, args.out, args.backbone, args.weights, args.seed,
                            named_scales(args.scales), args.max_size, args.fp16, args.flip, args.workers,
                            args.device, not args.no_proposals, args.rebuild, args.skip_bad, not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="VOC-layout dataset folder")
    p.add_argument("--split", required=True, help="image set name (ImageSets/Main/<split>.txt)")
    p.add_argument("--out", required=True, type=Path, help="output folder (caches and summary)")
    p.add_argument("--backbone", default="zf5", help="conv trunk name (default zf5)")
    p.add_argument("--weights", default=None, help="weights file, or 'imagenet'; default random init")
    p.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised trunk")
    p.add_argument("--scales", default="1",
                   help="1: s=688; 5: s in {480, 576, 688, 864, 1200} (the paper's settings); or a "
                        "comma-separated list of shorter sides, e.g. 128,256")
    p.add_argument("--max-size", type=int, default=None, help="cap on the longer side after resizing")
    p.add_argument("--fp16", action="store_true", help="store the maps as float16 (half the bytes)")
    p.add_argument("--flip", action="store_true", help="also cache the horizontally flipped images")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers decoding/resizing images, and selective-search processes (default: "
                        "the cores of the machine divided by the processes of the run on it)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--no-proposals", action="store_true", help="do not compute proposals first")
    p.add_argument("--rebuild", action="store_true", help="delete an existing cache of these settings first")
    add_skip_bad_arg(p)
    return run_tool(_extract, p, argv)


if __name__ == "__main__":
    sys.exit(main())
