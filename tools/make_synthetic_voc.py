#!/usr/bin/env python
"""Write the embedded synthetic VOC-layout dataset (four shape classes on cluttered backgrounds).

Reuses an existing complete dataset made with the same settings; see
detection.data.synthetic.make_synthetic_voc.

Example:
    python tools/make_synthetic_voc.py --out data/synthetic --num-trainval 120 --num-test 60
"""
from __future__ import annotations

import argparse
import logging

from detection.cli import run_tool
from detection.data.synthetic import make_synthetic_voc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--num-trainval", type=int, default=120, help="images in the trainval split")
    p.add_argument("--num-test", type=int, default=60, help="images in the test split")
    p.add_argument("--width", type=int, default=320, help="image width in pixels")
    p.add_argument("--height", type=int, default=240, help="image height in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the random generator")
    p.add_argument("--crowded", action="store_true",
                   help="crowded scenes: 12-16 overlapping objects per image, 3 classes, circles 2/3 of the boxes")
    return p


def _main(args: argparse.Namespace) -> int:
    root = make_synthetic_voc(args.out, num_trainval=args.num_trainval, num_test=args.num_test,
                              image_size=(args.width, args.height), seed=args.seed, progress=not args.quiet,
                              crowded=args.crowded)
    logging.getLogger("make_synthetic_voc").info("synthetic dataset at %s", root)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(_main, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
