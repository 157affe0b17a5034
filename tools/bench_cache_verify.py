#!/usr/bin/env python
"""Time reading a cached conv map with and without checking its checksum.

Writes ``--images`` records of a float16 conv-map cache (random maps the size of ZF-5's conv5 of
a 500x375 VOC image at the paper's five scales: 256 channels, stride 16), then reads every map
back three ways, each repeated ``--repeats`` times with the files in the page cache:

- ``open``: the memory-mapped array only (what pooling starts from; bytes read on demand);
- ``read``: open and touch every byte (a sum), the cost of a pass that reads whole maps;
- ``verify``: what :meth:`ConvMapCache.maps` costs the first time a cache object reads a map
  (open + CRC-32 of every byte), later reads of the same object cost ``open``.

Example:
    python tools/bench_cache_verify.py --images 20 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from detection.features.convmap_cache import CONVMAP_FORMAT_VERSION, ConvMapCache

# The paper's scales: a 500x375 image resized to shorter side s, ZF-5 conv5 at stride 16.
SCALES = (480, 576, 688, 864, 1200)


def _shapes(channels: int, width: int = 500, height: int = 375) -> list[tuple[int, int, int]]:
    return [(channels, round(height * s / height) // 16, round(width * s / height) // 16) for s in SCALES]


def _timed(repeats: int, keys: list[str], fn) -> float:
    """Best over ``repeats`` of the mean seconds of ``fn(key)`` per key."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for key in keys:
            fn(key)
        best = min(best, time.perf_counter() - t)
    return best / len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--dir", default=None, help="folder for the cache (default: a temporary one)")
    args = ap.parse_args()

    shapes = _shapes(args.channels)
    settings = {"format_version": CONVMAP_FORMAT_VERSION, "scales": list(SCALES), "dtype": "float16",
                "stride": 16, "channels": args.channels, "first_cell_center": 0.5}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cache = ConvMapCache.create(Path(tmp), settings)
        rng = np.random.default_rng(0)
        keys = [f"{i:06d}" for i in range(args.images)]
        for key in keys:
            maps = [np.maximum(rng.standard_normal(s, dtype=np.float32), 0) for s in shapes]
            cache.write_record(key, maps, {"factors": [1.0] * len(SCALES), "map_shapes": [list(s) for s in shapes],
                                           "input_shapes": [[1, 1]] * len(SCALES), "image_size": [375, 500]})
        nbytes = sum(p.stat().st_size for p in Path(cache.root).rglob("s*.npy"))

        opened = ConvMapCache.open(cache.root)
        t_open = _timed(args.repeats, keys, lambda key: [opened._load_map(key, k, None, None)
                                                          for k in range(len(SCALES))])
        t_read = _timed(args.repeats, keys, lambda key: [float(np.asarray(opened._load_map(key, k, None, None),
                                                                          dtype=np.float32).sum())
                                                          for k in range(len(SCALES))])
        times = []
        for _ in range(args.repeats):  # a fresh object each time: every map verified
            fresh = ConvMapCache.open(cache.root)
            t = time.perf_counter()
            for key in keys:
                fresh.maps(key)
            times.append((time.perf_counter() - t) / len(keys))
        t_verify = min(times)
    per_image = nbytes / args.images
    print(json.dumps({"images": args.images, "map_shapes": [list(s) for s in shapes], "bytes_per_image": per_image,
                      "open_ms": 1e3 * t_open, "read_ms": 1e3 * t_read, "open_verify_ms": 1e3 * t_verify,
                      "verify_GB_per_s": per_image / max(t_verify - t_open, 1e-9) / 1e9}, indent=None))


if __name__ == "__main__":
    main()
