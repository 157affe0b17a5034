#!/usr/bin/env python
"""Draw a model's detections on images.

    python tools/demo.py --model runs/default/model.pt --images img1.jpg img2.png --out demo/
"""
import argparse
import sys
from pathlib import Path

import cv2

from detection.cli import run_tool
from detection.errors import DatasetError
from detection.runtime import resolve_device


def main(args: argparse.Namespace) -> int:
    from detection.data.voc import read_image
    from detection.detector import SPPDetector
    from detection.visualize import draw_detections

    detector = SPPDetector.from_file(args.model, device=resolve_device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = read_image(path)
        dets = detector.detect(image)
        drawn = draw_detections(image, dets.boxes, dets.labels, dets.scores, detector.classes, args.threshold)
        dest = out / (Path(path).stem + "_det.png")
        if not cv2.imwrite(str(dest), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
            raise DatasetError(f"cannot write {dest}")
        keep = dets.scores >= args.threshold
        print(f"{path}: {int(keep.sum())} detections -> {dest}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", default="demo")
    p.add_argument("--threshold", type=float, default=0.0, help="SVM score threshold for drawing")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    sys.exit(run_tool(main, p))
