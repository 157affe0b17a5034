#!/usr/bin/env python
"""Time the SPP core on one image: the conv pass at one scale, :func:`detection.features.pooling.pool_windows`
of many windows (default sparse-table method, and its ``method="roi_pool"`` variant), and
torchvision's ``roi_pool`` run at every pyramid level for comparison.

Windows are random (seeded): log-uniform sides between 16 px and the image size, like selective
search's mix of small and large boxes. All timings are medians of ``--repeat`` runs after one
warm-up, with ``torch.set_num_threads(--threads)``.

Example:
    python tools/bench_spp.py --backbone zf5 --windows 2000 --threads 2 --repeat 5 --out spp.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _default_image() -> Path | None:
    """The first raccoon test image of VOC-like 4:3 shape (688 x ~917 at scale 688), when the
    shared data is present."""
    import os

    from PIL import Image

    root = Path(os.environ.get("SPP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    data = root / "data" / "raccoon"
    ids = data / "ImageSets" / "Main" / "test.txt"
    if not ids.is_file():
        return None
    for image_id in ids.read_text().split():
        path = data / "JPEGImages" / f"{image_id}.jpg"
        if path.is_file():
            with Image.open(path) as im:
                w, h = im.size
            if 1.28 <= max(w, h) / min(w, h) <= 1.4:
                return path
    return None


def _timeit(fn, repeat: int) -> float:
    fn()                                                # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="zf5")
    p.add_argument("--weights", default=None, help="state-dict file (default: random init)")
    p.add_argument("--image", type=Path, default=None,
                   help="image file (default: first 4:3 raccoon test image, else random pixels 500x375)")
    p.add_argument("--scale", type=int, default=688, help="shorter side of the conv pass")
    p.add_argument("--windows", type=int, default=2000)
    p.add_argument("--levels", default="6,3,2,1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-roi-pool", action="store_true", help="skip the torchvision roi_pool timing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from detection.errors import DetectionError
    from detection.backbones import build_backbone
    from detection.features.pooling import pool_windows, project_boxes
    from detection.features.scales import scale_factors

    torch.set_num_threads(args.threads)
    levels = tuple(int(v) for v in args.levels.split(","))
    device = torch.device(args.device)
    try:
        backbone = build_backbone(args.backbone, weights=args.weights, seed=args.seed).to(device)
        image_path = args.image if args.image is not None else _default_image()
        if image_path is not None:
            import cv2

            bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise DetectionError(f"cannot read image {image_path}")
            image = np.ascontiguousarray(bgr[:, :, ::-1])
        else:
            image = np.random.default_rng(args.seed).integers(0, 256, (375, 500, 3), dtype=np.uint8)
        h, w = image.shape[:2]
        f = scale_factors(h, w, (args.scale,))[0]
        x = backbone.preprocess(image, f).to(device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

        # Random windows in original-image pixels, log-uniform sides in [16, image side].
        rng = np.random.default_rng(args.seed)
        bw = np.exp(rng.uniform(np.log(16), np.log(w), args.windows))
        bh = np.exp(rng.uniform(np.log(16), np.log(h), args.windows))
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        boxes = torch.from_numpy(np.stack([x1, y1, x1 + bw, y1 + bh], 1) * f)

        with torch.inference_mode():
            def conv():
                out = backbone(x)
                sync()
                return out

            t_conv = _timeit(conv, args.repeat)
            fmap = conv()[0]
            cells = project_boxes(boxes, backbone.stride, tuple(fmap.shape[1:]),
                                  first_cell_center=backbone.first_cell_center).to(device)

            def pool():
                pool_windows(fmap, cells, levels)
                sync()

            t_pool = _timeit(pool, args.repeat)

            def pool_roi_method():
                pool_windows(fmap, cells, levels, method="roi_pool")
                sync()

            t_pool_roi = _timeit(pool_roi_method, args.repeat)
            t_roi = None
            if not args.no_roi_pool:
                from torchvision.ops import roi_pool

                rois = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long, device=device), cells], 1).float()

                def tv():
                    torch.cat([roi_pool(fmap[None], rois, n, 1.0).flatten(1) for n in levels], 1)
                    sync()

                t_roi = _timeit(tv, args.repeat)
    except DetectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result = {
        "backbone": args.backbone, "weights_id": backbone.weights_id, "image": str(image_path),
        "image_size": [h, w], "input_size": list(x.shape[2:]), "map_size": list(fmap.shape[1:]),
        "channels": int(fmap.shape[0]), "windows": args.windows, "levels": list(levels),
        "threads": args.threads, "device": str(device), "repeat": args.repeat,
        "conv_s": t_conv, "pool_windows_s": t_pool, "pool_windows_roi_pool_method_s": t_pool_roi,
        "roi_pool_s": t_roi,
        "pool_windows_per_s": args.windows / t_pool,
        "roi_pool_windows_per_s": None if t_roi is None else args.windows / t_roi,
        "torch": torch.__version__,
    }
    for k, v in result.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out is not None:
        from detection.io.jsonfile import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
