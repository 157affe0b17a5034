#!/usr/bin/env python
"""Peak memory and time of the train stage alone (SVMs + box regressors) on the first N training
images of a finished pipeline run, reusing its proposals and conv maps.

Run one process per image count: peak RSS (``ru_maxrss``) only grows within a process. The
images are the first N of the run's training split, with their flipped copies when the run used
flips; every setting is the run's own (``OUT/config.yaml``).

Example:
    python tools/bench_train_memory.py --run runs/crowded --images 100 --out train_100.json
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from detection.backbones import build_backbone
from detection.cli import run_tool
from detection.config import load_config
from detection.data.voc import VOCDataset
from detection.errors import DetectionError
from detection.features import extract_conv_maps, make_featurizer
from detection.io.jsonfile import write_json
from detection.pipeline import PipelineConfig, detector_settings
from detection.proposals import compute_proposals
from detection.training.detector_training import TrainConfig, train_detector


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20    # kB on Linux


def main(args: argparse.Namespace) -> int:
    run = Path(args.run)
    cfg = load_config(PipelineConfig, run / "config.yaml")
    if cfg.method != "spp" or cfg.data.root is None or cfg.conv_finetune.enabled or cfg.finetune.enabled:
        raise DetectionError("bench_train_memory.py measures SPP runs on a --data folder without fine-tuning")
    ds = VOCDataset(cfg.data.root, cfg.data.train_split, classes=cfg.data.classes, use_flipped=cfg.data.flip)
    ids = list(dict.fromkeys(r.image_id for r in ds.records))[: args.images]
    records = [r for r in ds.records if r.image_id in set(ids)]
    props = compute_proposals(ds, run / "proposals", cfg.proposals, num_workers=0, progress=False)
    backbone = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, seed=cfg.backbone.seed)
    settings = detector_settings(cfg)
    cache = extract_conv_maps(ds, backbone, run / "features", scales=settings.scales, max_size=settings.max_size,
                              fp16=cfg.features.fp16, num_workers=0, progress=False)
    tcfg = TrainConfig(finetune=cfg.finetune, svm=cfg.svm, bbox=cfg.bbox, bbox_regression=cfg.bbox_regression,
                       max_train_windows=cfg.max_train_windows, seed=cfg.seed, memory_gb=cfg.memory_gb,
                       calibration=cfg.calibration)
    before = _peak_gb()
    t0 = time.perf_counter()
    detector = train_detector(records, ds.classes, props.proposals_for_record, backbone,
                              make_featurizer(settings.method, settings, cache=cache),
                              backbone.out_channels * sum(n * n for n in settings.levels), settings, tcfg,
                              progress=not args.quiet)
    result = {"run": str(run), "images": len(ids), "records": len(records),
              "objects": int(sum(len(r.boxes) for r in records)), "train_seconds": round(time.perf_counter() - t0, 1),
              "peak_rss_gb_before_training": round(before, 3), "peak_rss_gb": round(_peak_gb(), 3),
              "svm_stats": detector.svms.meta["stats"],
              "bbox_samples": {k: v["num_samples"] for k, v in detector.regressors.meta["stats"].items()}
              if detector.regressors is not None else None}
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "svm_stats"}))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished run_pipeline.py --out folder")
    p.add_argument("--images", type=int, required=True, help="train on the first N images of its training split")
    p.add_argument("--out", required=True, help="JSON file to write")
    sys.exit(run_tool(main, p))
