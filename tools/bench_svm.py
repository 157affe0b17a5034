#!/usr/bin/env python
"""Time hard-negative SVM training on a synthetic problem of realistic size, and its peak memory.

Features are generated on the fly, one image at a time and identically on every read (seeded
by the image index), so the only things held in memory are what the trainer keeps (one class
being retrained, one block being mined: the caches are on disk). Each image has 1-3 objects; a window's feature is ReLU noise plus, per
object, IoU(window, object) times the object's class vector. Run one process per image count:
peak RSS (``VmHWM``) only grows within a process.

Example:
    python tools/bench_svm.py --images 100 --windows 2000 --dim 4096 --classes 20 --out bench.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np


class SyntheticFeatureSource:
    """Lazily generated images: GT boxes, ``windows`` proposals and their ``dim``-d features."""

    def __init__(self, num_images: int, windows: int, dim: int, num_classes: int, seed: int = 0) -> None:
        self.n, self.windows, self.dim, self.k, self.seed = num_images, windows, dim, num_classes, seed
        vecs = np.random.default_rng(seed).standard_normal((num_classes, dim), dtype=np.float32)
        # Class signal of norm ~ that of the noise (sqrt(dim) * 0.58 for ReLU'd N(0,1)): a hard problem.
        self.class_vecs = np.maximum(vecs, 0) * 1.2
        self.seconds = 0.0                  # time spent generating features (not training)
        self.reads = 0

    def num_images(self) -> int:
        return self.n

    def image(self, index: int, *, with_proposals: bool = True):
        from detection.boxes import box_iou_numpy
        from detection.training.samples import ImageSample

        t0 = time.perf_counter()
        rng = np.random.default_rng((self.seed, index))
        g = int(rng.integers(1, 4))
        wh = rng.uniform(60, 300, size=(g, 2))
        xy = rng.uniform(0, 500 - wh)
        gt = np.concatenate([xy, xy + wh], axis=1)
        labels = rng.integers(0, self.k, size=g)
        labels[0] = index % self.k          # every class has positives once images >= classes
        # A quarter of the windows jitter an object (all IoUs), the rest are random.
        src = gt[rng.integers(0, g, size=self.windows // 4)]
        jit = src + rng.normal(scale=0.3, size=src.shape) * np.tile(src[:, 2:] - src[:, :2], 2)
        jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 8)
        r_wh = rng.uniform(20, 400, size=(self.windows - len(src), 2))
        r_xy = rng.uniform(0, 500 - r_wh)
        boxes = np.concatenate([jit, np.concatenate([r_xy, r_xy + r_wh], axis=1)])

        def feats(b: np.ndarray) -> np.ndarray:
            f = np.maximum(rng.standard_normal((len(b), self.dim), dtype=np.float32), 0)
            f += box_iou_numpy(b, gt).astype(np.float32) @ self.class_vecs[labels]
            return f

        gt_feats = feats(gt)
        if not with_proposals:
            boxes = boxes[:0]
        sample = ImageSample(key=f"synthetic{index:05d}", gt_boxes=gt, gt_labels=labels, gt_features=gt_feats,
                             boxes=boxes, features=feats(boxes))
        self.seconds += time.perf_counter() - t0
        self.reads += 1
        return sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100, help="training images")
    p.add_argument("--windows", type=int, default=2000, help="proposals per image")
    p.add_argument("--dim", type=int, default=4096, help="feature length (fc7: 4096)")
    p.add_argument("--classes", type=int, default=20, help="object classes")
    p.add_argument("--threads", type=int, default=2, help="BLAS threads")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="budget of the SVM training, checked first as the train stage checks train.memory_gb "
                        "(default: from the machine's available memory)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="folder of the on-disk class caches (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="write the measurements here (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from threadpoolctl import threadpool_limits

        from detection.bench import peak_rss_bytes
        from detection.errors import DetectionError
        from detection.training.bbox_regression import BBoxRegressionConfig
        from detection.training.detector_training import TrainConfig, check_train_memory
        from detection.training.hard_negatives import SVMTrainer
        from detection.training.svm import SVMConfig
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        source = SyntheticFeatureSource(args.images, args.windows, args.dim, args.classes)
        # The SVM part of the train stage's check (1-3 objects per image: at most windows + 3 candidates).
        need = check_train_memory(TrainConfig(memory_gb=args.memory_gb, bbox=BBoxRegressionConfig(enabled=False)),
                                  args.classes, args.dim, args.dim, args.windows + 3)
        rss0 = peak_rss_bytes()
        t0 = time.perf_counter()
        with threadpool_limits(args.threads):
            trainer = SVMTrainer(source, args.classes, SVMConfig(), progress=True, cache_dir=args.cache_dir)
            svms = trainer.train()
        seconds = time.perf_counter() - t0
        stats = svms.meta["stats"].values()
        result = {
            "images": args.images, "windows": args.windows, "dim": args.dim, "classes": args.classes,
            "threads": args.threads, "seconds": round(seconds, 1),
            "svm_estimate_gb": round(need["svm"], 3), "budget_gb": round(need["budget"], 3),
            "seconds_generating_features": round(source.seconds, 1), "image_reads": source.reads,
            "peak_rss_mb": round(peak_rss_bytes() / 2**20),
            "rss_before_training_mb": round(rss0 / 2**20),
            "all_features_mb": round(args.images * args.windows * args.dim * 4 / 2**20),
            "retrains": sum(s["retrains"] for s in stats),
            "max_peak_cached": max(s["peak_cached"] for s in stats),
            "final_cached_total": sum(s["num_neg_cached"] for s in stats),
            "positives_total": sum(s["num_pos"] for s in stats),
            "mean_train_accuracy": round(float(np.mean([s["train_accuracy"] for s in stats])), 4),
        }
        text = json.dumps(result, indent=2)
        if args.out is not None:
            from detection.io.files import atomic_write_text

            atomic_write_text(args.out, text + "\n")
        print(text)
    except DetectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
