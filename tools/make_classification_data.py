#!/usr/bin/env python
"""Make the classification benchmark sets as ImageFolders (docs/benchmarks.md):

    python tools/make_classification_data.py --crops data/fruit data/raccoon --out data/crops
    python tools/make_classification_data.py --synthetic --out data/scales

--crops: every non-difficult box of VOC-layout folders cropped out (trainval -> train, test ->
test); --synthetic: one shape per image, its size varying 4x, at varied aspects.
"""
import argparse
import sys

from detection.classification import make_crop_folder, make_scale_folder
from detection.cli import run_tool


def main(args: argparse.Namespace) -> int:
    if args.synthetic:
        out = make_scale_folder(args.out, seed=args.seed)
    else:
        out = make_crop_folder(args.crops, args.out, max_side=args.max_side)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--crops", nargs="+", metavar="VOC_DIR", help="VOC-layout folders whose boxes are cropped")
    g.add_argument("--synthetic", action="store_true", help="the synthetic set of 4x object sizes")
    p.add_argument("--out", required=True)
    p.add_argument("--max-side", type=int, default=320, help="--crops: crops larger than this are shrunk")
    p.add_argument("--seed", type=int, default=0, help="--synthetic: seed")
    sys.exit(run_tool(main, p))
