#!/usr/bin/env python
"""Per-stage CPU accounting of the pipeline: run it with 1 process and with N under torchrun
(each from an empty folder) and print, per stage, the CPU seconds of 1 process, summed over the
N ranks (no duplicated work: at most ~1x) and on the slowest rank (the work is divided: ~1/N)
(:func:`detection.bench.bench_accounting`).

The pipeline is the embedded default (synthetic data, conv fine-tuning) unless --data/--config
say otherwise; --set makes it smaller, e.g.

    python tools/bench_accounting.py --out runs/accounting --set data.synthetic_trainval=16 \\
        conv_finetune.iterations=40 train.finetune.iterations=20
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.bench import bench_accounting, format_accounting_table
from detection.cli import add_set_arg, run_tool
from detection.io.jsonfile import write_json


def _bench(args: argparse.Namespace) -> int:
    result = bench_accounting(Path(__file__).with_name("run_pipeline.py"), args.out, processes=args.processes,
                              data=args.data, config=args.config, overrides=args.set)
    write_json(Path(args.out) / "accounting_table.json", result)
    print(format_accounting_table(result["rows"], args.processes))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the two runs (1proc/, <N>proc/) and accounting_table.json")
    p.add_argument("--processes", type=int, default=2, help="processes of the torchrun run (default 2)")
    p.add_argument("--data", help="VOC-layout folder (default: the embedded synthetic dataset)")
    p.add_argument("--config", help="YAML config file")
    add_set_arg(p, "data.synthetic_trainval=16 conv_finetune.iterations=40")
    return run_tool(_bench, p, argv)


if __name__ == "__main__":
    sys.exit(main())
