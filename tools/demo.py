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
from detection.data.images import read_image
from detection.detector import SPPDetector
from detection.errors import DatasetError, DetectionError
from detection.io.files import make_dirs
from detection.runtime import resolve_device
from detection.visualize import draw_detections, shown_detections


def main(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise DetectionError(f"--threshold is a probability in [0, 1], got {args.threshold}")
    detector = SPPDetector.from_file(args.model, device=resolve_device(args.device))
    if detector.calibration is None and args.score_threshold is None:
        logging.warning("%s has no score calibration (trained before calibration existed, or with "
                        "train.calibration.enabled=false): drawing SVM scores >= 0", args.model)
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
        keep, values, caption = shown_detections(dets, args.threshold, args.score_threshold)
        drawn = draw_detections(image, dets.boxes[keep], dets.labels[keep], values[keep], detector.classes,
                                -float("inf"))
        dest = out / (Path(path).stem + "_det.png")
        if not cv2.imwrite(str(dest), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
            raise DatasetError(f"cannot write {dest}")
        print(f"{path}: {int(keep.sum())} detections ({caption}) -> {dest}")
    if skipped:
        logging.warning("summary: %d image(s) skipped (--skip-bad): %s", len(skipped), " | ".join(skipped))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", default="demo")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="draw detections with a calibrated probability at or above this (default 0.5)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="draw by raw SVM score instead (the default for a model without calibration: 0)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
