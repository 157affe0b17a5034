#!/usr/bin/env python
"""Compute (or resume) the selective-search proposals of a VOC-layout split.

Writes OUT/proposals_<key>.npz (the cache, see detection.proposals.compute_proposals), its
per-image shards, and OUT/summary.json (images, boxes per image, recall at IoU 0.5 / 0.7,
settings, wall time). Rerunning with the same settings resumes or reuses the cache.

Example:
    python tools/compute_proposals.py --data /path/VOC2007 --split trainval --out runs/proposals
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.cli import add_skip_bad_arg, run_tool
from detection.proposals import SelectiveSearchConfig, compute_split_proposals


#: The settings' defaults, from their one home.
DEFAULTS = SelectiveSearchConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="VOC-layout dataset folder")
    p.add_argument("--split", required=True, help="image set name (ImageSets/Main/<split>.txt)")
    p.add_argument("--out", required=True, type=Path, help="output folder (cache + summary.json)")
    p.add_argument("--mode", choices=("fast", "quality"), default=DEFAULTS.mode)
    p.add_argument("--max-boxes", type=int, default=DEFAULTS.max_boxes)
    p.add_argument("--resize-to", type=int, default=DEFAULTS.resize_to or 0,
                   help="segment images resized so the longer side has this many pixels; 0: as is")
    p.add_argument("--min-size", type=int, default=DEFAULTS.min_size,
                   help="drop boxes smaller than this (original pixels)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all CPUs; 1 runs in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_skip_bad_arg(p)
    return p


def _main(args: argparse.Namespace) -> int:
    config = SelectiveSearchConfig(mode=args.mode, max_boxes=args.max_boxes, resize_to=args.resize_to or None,
                                   min_size=args.min_size)
    compute_split_proposals(args.data, args.split, args.out, config, num_workers=args.workers,
                            progress=not (args.no_progress or args.quiet), skip_bad=args.skip_bad)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(_main, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
