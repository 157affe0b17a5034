#!/usr/bin/env python
"""Time the VOC evaluation on a VOC2007-test-sized synthetic problem: parsing 20 result files
plus devkit matching and AP (``evaluate_result_dir``).

Ground truth: 4,952 images (VOC2007 test), 500 x 375 pixels, 20 classes, 1 + Poisson(1.5)
objects per image (~2.5), 20 % difficult (VOC2007 test: 2,944 of 14,976). The records are built
directly as ImageRecords (no XML is written or parsed: the benchmark measures the evaluation,
not the annotation reader). Detections per class: a jittered copy of each object of the class
(plus duplicates) with higher scores, and random boxes on random images up to ``--dets``
lines, written once with ``write_result_files`` into a temporary folder.

    python tools/bench_eval.py --repeat 3 --out bench_eval.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NUM_IMAGES = 4952      # VOC2007 test
NUM_CLASSES = 20       # VOC
WIDTH, HEIGHT = 500, 375  # the typical VOC image size


@dataclasses.dataclass(frozen=True)
class _Split:
    """The part of the VOCDataset API that ``evaluate_result_dir`` reads."""

    root: Path
    split: str
    classes: tuple[str, ...]
    records: list


def make_records(rng: np.random.Generator, num_images: int, num_classes: int) -> list:
    from detection.data.records import ImageRecord

    recs = []
    for i in range(num_images):
        g = 1 + int(rng.poisson(1.5))
        wh = rng.uniform(20, 300, size=(g, 2))
        xy = rng.uniform(0, [WIDTH, HEIGHT] - wh)
        # Integer VOC pixels, converted like the XML reader does (xmin - 1, xmax).
        voc = np.round(np.concatenate([xy + 1, xy + wh], axis=1))
        boxes = voc.astype(np.float32)
        boxes[:, :2] -= 1
        recs.append(ImageRecord(f"{i:06d}", Path(f"JPEGImages/{i:06d}.jpg"), WIDTH, HEIGHT, boxes,
                                rng.integers(0, num_classes, g).astype(np.int64), rng.random(g) < 0.2,
                                np.zeros(g, bool)))
    return recs


def make_detections(rng: np.random.Generator, recs: list, num_classes: int, dets_per_class: int) -> list:
    from detection.evaluation import ClassDetections

    ids = np.array([r.image_id for r in recs])
    all_boxes = np.concatenate([r.boxes for r in recs]).astype(np.float64)
    all_labels = np.concatenate([r.labels for r in recs])
    all_img = np.repeat(np.arange(len(recs)), [len(r.labels) for r in recs])
    out = []
    for c in range(num_classes):
        sel = np.flatnonzero(all_labels == c)
        # Each object found with probability 0.8, 30 % of those once more (a duplicate).
        found = sel[rng.random(len(sel)) < 0.8]
        src = np.concatenate([found, found[rng.random(len(found)) < 0.3]])
        wh = all_boxes[src, 2:] - all_boxes[src, :2]
        near = all_boxes[src] + rng.normal(scale=0.1, size=(len(src), 4)) * np.tile(wh, 2)
        n_rand = max(0, dets_per_class - len(src))
        r_wh = rng.uniform(10, 300, size=(n_rand, 2))
        r_xy = rng.uniform(0, [WIDTH, HEIGHT] - r_wh)
        boxes = np.concatenate([near, np.concatenate([r_xy, r_xy + r_wh], axis=1)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        img = np.concatenate([all_img[src], rng.integers(0, len(recs), n_rand)])
        scores = np.concatenate([rng.normal(1.0, 1.0, len(src)), rng.normal(-1.0, 1.0, n_rand)]).astype(np.float32)
        out.append(ClassDetections(ids[img], scores, boxes))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=NUM_IMAGES)
    p.add_argument("--classes", type=int, default=NUM_CLASSES)
    p.add_argument("--dets", type=int, default=50_000, help="result-file lines per class")
    p.add_argument("--metric", choices=["voc07", "voc10"], default="voc07")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON file for the numbers")
    args = p.parse_args()

    import torch  # imported by detection.boxes anyway; pin its threads so runs are comparable
    torch.set_num_threads(1)
    from detection.evaluation import evaluate_detections, evaluate_result_dir, read_result_dir, write_result_files
    from detection.io.jsonfile import write_json

    rng = np.random.default_rng(args.seed)
    classes = tuple(f"class{c:02d}" for c in range(args.classes))
    t0 = time.perf_counter()
    recs = make_records(rng, args.images, args.classes)
    dets = make_detections(rng, recs, args.classes, args.dets)
    t_gen = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        t0 = time.perf_counter()
        write_result_files(results, "test", classes, dets)
        t_write = time.perf_counter() - t0
        lines = sum(len(d) for d in dets)
        size = sum(f.stat().st_size for f in results.iterdir())
        split = _Split(Path(tmp) / "VOC2007", "test", classes, recs)
        ids = [r.image_id for r in recs]
        totals, reads, aps = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            metrics = evaluate_result_dir(split, results, metric=args.metric)
            totals.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            parsed = read_result_dir(results, "test", classes, ids)
            reads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            evaluate_detections(recs, classes, parsed, metric=args.metric)
            aps.append(time.perf_counter() - t0)
    out = {
        "images": args.images, "classes": args.classes, "objects": int(sum(len(r.labels) for r in recs)),
        "result_lines": lines, "result_bytes": size, "metric": args.metric, "mAP": metrics["mAP"],
        "seed": args.seed, "repeat": args.repeat,
        "evaluate_result_dir_s": {"median": statistics.median(totals), "min": min(totals)},
        "read_result_dir_s": {"median": statistics.median(reads), "min": min(reads)},
        "evaluate_detections_s": {"median": statistics.median(aps), "min": min(aps)},
        "write_result_files_s": t_write, "generate_s": t_gen,
        "python": platform.python_version(), "numpy": np.__version__,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
