#!/usr/bin/env python
"""Draw a model's detections on images: tools/detect.py --draw for a few named files.

    python tools/demo.py --model runs/default/model.pt --images img1.jpg img2.png --out demo/

Writes demo/drawn/<stem>_det.png per image, and demo/detections.json and demo/images.json as
tools/detect.py does (which also takes folders and glob patterns).
"""
import argparse
import sys
from pathlib import Path

from detection.apply import detect_images
from detection.cli import add_draw_args, add_skip_bad_arg, run_tool


def main(args: argparse.Namespace) -> int:
    summary = detect_images(args.model, args.images, args.out, draw=True, skip_bad=args.skip_bad,
                            threshold=args.threshold, score_threshold=args.score_threshold, device=args.device,
                            progress=False)
    for a in summary.images if summary is not None else []:
        print(f"{a.path}: {a.shown} detections ({a.caption}) -> {a.drawn}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", required=True, type=Path)
    p.add_argument("--out", default="demo")
    add_draw_args(p)
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
