#!/usr/bin/env python
"""Draw a model's detections on images.

    python tools/demo.py --model runs/default/model.pt --images img1.jpg img2.png --out demo/
"""
import argparse
import logging
import sys
from pathlib import Path

import cv2

from detection.cli import add_skip_bad_arg, run_tool
from detection.errors import DatasetError
from detection.io import make_dirs
from detection.runtime import resolve_device


def main(args: argparse.Namespace) -> int:
    from detection.data.images import read_image
    from detection.detector import SPPDetector
    from detection.visualize import draw_detections

    detector = SPPDetector.from_file(args.model, device=resolve_device(args.device))
    out = make_dirs(args.out)
    skipped = []
    for path in args.images:
        try:
            image = read_image(path)
        except DatasetError as e:
            if not args.skip_bad:
                raise
            logging.warning("skipping %s (--skip-bad): %s", path, e)
            skipped.append(path)
            continue
        dets = detector.detect(image)
        drawn = draw_detections(image, dets.boxes, dets.labels, dets.scores, detector.classes, args.threshold)
        dest = out / (Path(path).stem + "_det.png")
        if not cv2.imwrite(str(dest), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
            raise DatasetError(f"cannot write {dest}")
        keep = dets.scores >= args.threshold
        print(f"{path}: {int(keep.sum())} detections -> {dest}")
    if skipped:
        logging.warning("summary: %d image(s) skipped (--skip-bad): %s", len(skipped), " | ".join(skipped))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", default="demo")
    p.add_argument("--threshold", type=float, default=0.0, help="SVM score threshold for drawing")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
