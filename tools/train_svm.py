#!/usr/bin/env python
"""Train a detector on a conv-map cache: (fc fine-tuning) -> one linear SVM per class with
hard-negative mining -> per-class box regressors; writes the one model file.

    python tools/extract_features.py --data DIR --split trainval --out FEAT --backbone squeezenet1_0 --weights W.pth
    python tools/train_svm.py --data DIR --split trainval --features FEAT --out model.pt --weights W.pth
    python tools/eval_voc.py --data DIR --split test --model model.pt --out metrics.json
"""
import argparse
import sys
from pathlib import Path

from detection.cli import add_skip_bad_arg, run_tool
from detection.config import merge, parse_overrides
from detection.errors import CacheError


def main(args: argparse.Namespace) -> int:
    import dataclasses

    from detection.backbones import rebuild_recorded_backbone
    from detection.data.voc import VOCDataset, report_images
    from detection.detector import DetectorSettings
    from detection.features import ConvMapCache, make_featurizer
    from detection.finetune import FinetuneConfig
    from detection.io import read_json
    from detection.proposals import compute_proposals
    from detection.train import TrainConfig, train_detector

    if args.layer is None:
        args.layer = "fc7" if args.finetune > 0 else "pool5"
    summary_path = Path(args.features) / "features_summary.json"
    if not summary_path.is_file():
        raise CacheError(f"{summary_path} is missing: run tools/extract_features.py --out {args.features} first")
    summary = read_json(summary_path)
    if not isinstance(summary, dict) or not isinstance(summary.get("cache"), str):
        raise CacheError(f"{summary_path}: no 'cache' folder named in it; rerun tools/extract_features.py")
    cache = ConvMapCache.open(summary["cache"])
    s = cache.settings
    dataset = VOCDataset(args.data, args.split, use_flipped=bool(s["flipped"]), skip_bad=args.skip_bad)
    if s["dataset_fingerprint"] != str(dataset.fingerprint()) or s["split"] != args.split:
        raise CacheError(f"the conv-map cache {cache.root} was made for another dataset or split "
                         f"({s['split']}); rerun tools/extract_features.py for {args.data} {args.split}")
    recorded = summary.get("backbone") if isinstance(summary.get("backbone"), dict) else {}
    weights = args.weights if args.weights is not None else recorded.get("weights")
    seed = args.seed if args.seed is not None else recorded.get("seed", 0)
    if not (weights is None or isinstance(weights, str)) or isinstance(seed, bool) or not isinstance(seed, int):
        raise CacheError(f"{summary_path}: malformed backbone record {str(recorded)[:200]}; rerun tools/extract_features.py")
    backbone = rebuild_recorded_backbone(s["backbone"], weights, seed, s["weights_id"], str(summary_path))
    proposals = compute_proposals(dataset, Path(args.features) / "proposals", num_workers=args.workers)
    settings = DetectorSettings(scales=tuple(s["scales"]), max_size=int(s["max_size"]), feature_layer=args.layer,
                                scale_rule=args.scale_rule)
    cfg = TrainConfig(finetune=FinetuneConfig(enabled=args.finetune > 0, iterations=max(args.finetune, 1),
                                              lr_steps=(int(args.finetune * 0.5), int(args.finetune * 0.75))),
                      bbox_regression=not args.no_bbox)
    cfg = merge(cfg, parse_overrides(args.set))
    pool5_dim = backbone.out_channels * sum(n * n for n in settings.levels)
    featurizer = make_featurizer(settings.method, settings, cache=cache)
    detector = train_detector(dataset.records, dataset.classes, proposals.proposals_for_record, backbone,
                              featurizer, pool5_dim, settings,
                              cfg, out_dir=Path(args.out).parent, progress=not args.quiet,
                              finetune_pool5_fn=featurizer.finetune_fn(dataset.records))
    detector.save(args.out, {"dataset": {"root": str(args.data), "split": args.split},
                             "train_config": dataclasses.asdict(cfg)})
    print(f"model written to {args.out}")
    report_images(dataset)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--features", required=True, help="the --out folder of tools/extract_features.py")
    p.add_argument("--out", required=True, help="model file to write")
    p.add_argument("--weights", default=None,
                   help="default: the weights extract_features.py recorded in FEAT/features_summary.json")
    p.add_argument("--seed", type=int, default=None, help="default: the seed extract_features.py recorded")
    p.add_argument("--layer", default=None, choices=["pool5", "fc6", "fc7"],
                   help="SVM features (default fc7 with --finetune, else pool5)")
    p.add_argument("--finetune", type=int, default=0, metavar="ITERATIONS",
                   help="fine-tune fc6/fc7/fc8 for this many mini-batches first (0: no fine-tuning)")
    p.add_argument("--no-bbox", action="store_true", help="no box regression")
    p.add_argument("--scale-rule", choices=["area", "code"], default="area",
                   help="multi-scale: each window's scale by area nearest 224^2 (paper) or side nearest 208 "
                        "(official code); stored in the model (docs/spp.md)")
    p.add_argument("--workers", type=int, default=None, help="selective-search processes if proposals are missing")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training config overrides, e.g. svm.C=0.001 finetune.lr=0.0001")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
