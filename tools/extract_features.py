#!/usr/bin/env python
"""Compute the conv-map cache of a dataset split (one conv pass per image per scale).

Proposals are computed first (into OUT/proposals, resumed if partial) unless --no-proposals;
then the conv maps go to OUT/convmaps_<key>/ and a summary to OUT/features_summary.json.

Example:
    python tools/extract_features.py --data /work/shared/data/raccoon --split trainval \\
        --out runs/raccoon --backbone zf5 --scales 1 --fp16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from detection.cli import add_skip_bad_arg, run_tool
from detection.runtime import resolve_device
from detection.spp import named_scales


def _extract(args: argparse.Namespace) -> int:
    from detection.backbones import build_backbone
    from detection.data.voc import VOCDataset, report_images
    from detection.features import extract_conv_maps

    scales = named_scales(args.scales)
    dataset = VOCDataset(args.data, args.split, use_flipped=args.flip, skip_bad=args.skip_bad)
    if not args.no_proposals:
        from detection.proposals import compute_proposals

        # Proposals are computed on the original images (flipped records mirror them); an
        # existing complete cache is reused, a partial one resumed.
        compute_proposals(dataset, args.out / "proposals", num_workers=args.workers, progress=not args.quiet)
    backbone = build_backbone(args.backbone, weights=args.weights, seed=args.seed)
    t0 = time.perf_counter()
    cache = extract_conv_maps(dataset, backbone, args.out, scales=scales, max_size=args.max_size,
                              fp16=args.fp16, include_flipped=args.flip, device=resolve_device(args.device),
                              num_workers=args.workers, progress=not args.quiet, rebuild=args.rebuild)
    seconds = time.perf_counter() - t0
    nbytes = cache.nbytes()
    n = int(cache.settings["num_records"])
    summary = {
        "cache": str(cache.root),
        "num_images": n,
        "seconds": round(seconds, 3),
        "bytes_on_disk": nbytes,
        "bytes_per_image": round(nbytes / max(n, 1)),
        "settings": cache.settings,
        # What the next stage (train_svm.py) rebuilds the trunk from; the weights id in the
        # settings checks that the file is still the same.
        "backbone": {"name": args.backbone, "seed": args.seed,
                     "weights": None if args.weights is None else
                     (args.weights if not Path(args.weights).expanduser().is_file()
                      else str(Path(args.weights).expanduser().resolve()))},
    }
    from detection.io import write_json

    write_json(args.out / "features_summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    report_images(dataset)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="VOC-layout dataset folder")
    p.add_argument("--split", required=True, help="image set name (ImageSets/Main/<split>.txt)")
    p.add_argument("--out", required=True, type=Path, help="output folder (caches and summary)")
    p.add_argument("--backbone", default="zf5", help="conv trunk name (default zf5)")
    p.add_argument("--weights", default=None, help="weights file, or 'imagenet'; default random init")
    p.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised trunk")
    p.add_argument("--scales", default="1",
                   help="1: s=688; 5: s in {480, 576, 688, 864, 1200} (the paper's settings); or a "
                        "comma-separated list of shorter sides, e.g. 128,256")
    p.add_argument("--max-size", type=int, default=None, help="cap on the longer side after resizing")
    p.add_argument("--fp16", action="store_true", help="store the maps as float16 (half the bytes)")
    p.add_argument("--flip", action="store_true", help="also cache the horizontally flipped images")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding/resizing images")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--no-proposals", action="store_true", help="do not compute proposals first")
    p.add_argument("--rebuild", action="store_true", help="delete an existing cache of these settings first")
    add_skip_bad_arg(p)
    return run_tool(_extract, p, argv)


if __name__ == "__main__":
    sys.exit(main())
