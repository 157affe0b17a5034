#!/usr/bin/env python
"""Apply a trained detector to images and write the detections as COCO JSON (and, with --draw,
the pictures with their detections drawn).

    python tools/detect.py --model runs/default/model.pt --images photos/ 'more/**/*.jpg' one.png \\
        --out detected/ --draw

--images takes files, folders (their image files, not subfolders) and glob patterns (quote them;
'**' recurses). Writes OUT/detections.json (COCO results: image_id, category_id, bbox as x, y, w, h
in pixels, score, probability: every detection the model outputs), OUT/images.json (COCO images
with id and file_name, categories, and the images --skip-bad left out) and with --draw
OUT/drawn/<stem>_det.png (detections with probability >= --threshold). Under torchrun each process
detects a share of the images: torchrun --standalone --nproc-per-node 2 tools/detect.py ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.apply import collect_images, detect_images
from detection.cli import add_draw_args, add_skip_bad_arg, run_tool


def main(args: argparse.Namespace) -> int:
    images = collect_images(args.images)
    summary = detect_images(args.model, images, args.out, draw=args.draw, skip_bad=args.skip_bad,
                            threshold=args.threshold, score_threshold=args.score_threshold, device=args.device,
                            progress=not args.quiet)
    if summary is not None:
        total = sum(a.detections for a in summary.images)
        print(f"{len(summary.images)} images, {total} detections -> {summary.detections_json}, "
              f"{summary.images_json}" + (f"; {len(summary.skipped)} skipped" if summary.skipped else ""))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="trained detector (model.pt)")
    p.add_argument("--images", nargs="+", required=True, help="image files, folders and glob patterns")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--draw", action="store_true", help="also write OUT/drawn/<stem>_det.png per image")
    add_draw_args(p)
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
