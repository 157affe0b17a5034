#!/usr/bin/env python
"""Draw several scale-robustness curves (the ``--rescale`` output of tools/eval_classifier.py) in one PNG:

    python tools/plot_scale_curves.py --out scales.png "no SPP=runs/nospp/center_scales.json" \\
        "SPP single=runs/single/full_scales.json" "SPP multi=runs/multi/full_scales.json"
"""
import argparse
import sys

from detection.classification.robustness import plot_scale_curves
from detection.cli import run_tool
from detection.errors import DetectionError
from detection.io.jsonfile import read_json


def main(args: argparse.Namespace) -> int:
    curves = {}
    for item in args.curves:
        label, sep, path = item.partition("=")
        if not sep:
            raise DetectionError(f"{item!r} is not LABEL=FILE")
        data = read_json(path)
        curve = data.get("scale_curve") if isinstance(data, dict) else None
        if not isinstance(curve, dict) or not all(k in curve for k in ("factors", "values")):
            raise DetectionError(f"{path} has no scale_curve (run tools/eval_classifier.py with --rescale)")
        curves[label] = curve
    plot_scale_curves(curves, args.out, args.title)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("curves", nargs="+", metavar="LABEL=FILE")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="")
    sys.exit(run_tool(main, p))
