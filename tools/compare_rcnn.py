#!/usr/bin/env python
"""Time SPP-net against R-CNN on the same backbone, proposals and hardware (the paper's Table 10).

With --svd, SPP-net is timed twice in the same run, with full and with SVD-truncated fc layers,
against one R-CNN pass (full fc).

Per-stage seconds per image (conv, pool = window pooling or crop + warp, fc, svm + box
regression, nms) after an untimed pass that counts FLOPs and warms up, FLOPs per stage, speed-ups; proposals are timed apart
and excluded from `total`, as in the paper. Without --model, the fc layers, SVMs and regressors
are random (they cost the same as trained ones).

    python tools/compare_rcnn.py --data $DATA/raccoon --split test --num-images 3 --out timing.json
"""
import argparse
import sys

from detection.cli import add_skip_bad_arg, run_tool
from detection.detector import DetectorSettings
from detection.errors import DetectionError
from detection.features.scales import named_scales
from detection.report import timing_table
from detection.timing import compare_on_dataset


def main(args: argparse.Namespace) -> int:
    # With --model the model's own settings are timed: options that would set others are refused
    # by name, never ignored.
    given = [f"--{k.replace('_', '-')}" for k in ("scales", "scale_rule", "feature_layer") if getattr(args, k) is not None]
    if args.model and given:
        raise DetectionError(f"{', '.join(given)} cannot be given with --model: the model file {args.model} holds "
                             "its own settings")
    settings = None if args.model else DetectorSettings(scales=named_scales(args.scales or "1"),
                                                        feature_layer=args.feature_layer or "fc7",
                                                        scale_rule=args.scale_rule or "area")
    timing = compare_on_dataset(args.data, args.split, args.out, args.num_images, args.model, args.backbone,
                                args.weights, settings, args.device, args.windows, args.proposal_mode, args.svd,
                                args.skip_bad, command=" ".join(sys.argv))
    print(timing_table(timing))
    print(f"speed-up: conv {timing['speedup']['conv']:.1f}x, total {timing['speedup']['total']:.1f}x "
          f"(FLOP ratios {timing['flops']['ratio']['conv']:.1f}x / {timing['flops']['ratio']['total']:.1f}x)")
    if args.svd:
        print(f"with SVD fc {args.svd[0]}/{args.svd[1]}: SPP-net total {timing['spp_svd']['total']:.4f} s/img, "
              f"speed-up {timing['speedup_svd']['total']:.1f}x (FLOP ratio {timing['flops']['ratio_svd']['total']:.1f}x)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=3)
    p.add_argument("--out", required=True, help="timing.json")
    p.add_argument("--backbone", default=None, help="without --model (default zf5)")
    p.add_argument("--weights", default=None, help="without --model")
    p.add_argument("--scales", default=None, help="without --model: 1 (the default), 5, code5 or a list, e.g. 480,688")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--model", help="a trained model file (its backbone, head and SVMs are timed)")
    p.add_argument("--windows", type=int, default=None,
                   help="selective-search windows per image, at most (default: the model's, else 2000)")
    p.add_argument("--proposal-mode", choices=["fast", "quality"], default=None,
                   help="selective search mode (default: the model's, else fast; quality gives ~2,000 "
                        "windows on small photos)")
    p.add_argument("--scale-rule", choices=["area", "code"], default=None,
                   help="multi-scale window -> scale rule without --model (default area; docs/spp.md)")
    p.add_argument("--feature-layer", default=None, choices=["pool5", "fc6", "fc7"], help="without --model (default fc7)")
    p.add_argument("--svd", type=int, nargs=2, metavar=("RANK6", "RANK7"),
                   help="truncate fc6/fc7 by SVD to these ranks (Fast R-CNN), e.g. 1024 256")
    add_skip_bad_arg(p)
    sys.exit(run_tool(main, p))
