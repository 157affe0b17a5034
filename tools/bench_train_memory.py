#!/usr/bin/env python
"""Peak memory and time of the train stage alone (SVMs + box regressors) on the first N training
images of a finished pipeline run, reusing its proposals and conv maps
(:func:`detection.bench.bench_train_stage`).

Run one process per image count: peak RSS (``VmHWM``) only grows within a process. The
images are the first N of the run's training split, with their flipped copies when the run used
flips; every setting is the run's own (``OUT/config.yaml``).

Example:
    python tools/bench_train_memory.py --run runs/crowded --images 100 --out train_100.json
"""
from __future__ import annotations

import argparse
import json
import sys

from detection.bench import bench_train_stage
from detection.cli import run_tool
from detection.io.jsonfile import write_json


def _bench(args: argparse.Namespace) -> int:
    result = bench_train_stage(args.run, args.images, progress=not args.quiet)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "svm_stats"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run_pipeline.py --out folder")
    p.add_argument("--images", type=int, required=True, help="train on the first N images of its training split")
    p.add_argument("--out", required=True, help="JSON file to write")
    return run_tool(_bench, p, argv)


if __name__ == "__main__":
    sys.exit(main())
