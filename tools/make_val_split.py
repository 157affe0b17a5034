#!/usr/bin/env python
"""Carve a validation split out of a VOC-layout dataset's trainval, to choose settings without
reading its test split (detection.data.holdout.make_validation_split).

OUT links to the dataset's Annotations and JPEGImages and holds ImageSets/Main/train.txt and
val.txt; the dataset itself is not changed.

Example:
    python tools/make_val_split.py --data MY_VOC_DIR --out my_val --fraction 0.2 --seed 0
    python tools/run_pipeline.py --data my_val --out runs/my_val --set data.train_split=train data.test_split=val
"""
from __future__ import annotations

import argparse
import json
import logging

from detection.cli import run_tool
from detection.data.holdout import make_validation_split


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="VOC-layout dataset folder")
    p.add_argument("--out", required=True, help="folder to write (links to the dataset's images and XML)")
    p.add_argument("--split", default="trainval", help="split to divide (default: trainval)")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the split held out as val (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    return p


def _main(args: argparse.Namespace) -> int:
    summary = make_validation_split(args.data, args.out, split=args.split, fraction=args.fraction, seed=args.seed)
    log = logging.getLogger("make_val_split")
    log.info("%s: %d images to train on (train), %d held out (val)", args.out, summary["train"], summary["val"])
    if summary["missing_in_val"]:
        log.warning("no object of %s among the held-out images: their AP cannot be measured on val",
                    ", ".join(summary["missing_in_val"]))
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(_main, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
