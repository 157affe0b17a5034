"""The feature-extraction stage (``tools/extract_features.py``): a split's proposals, then its
conv-map cache and a summary. It sits above :mod:`detection.proposals` and
:mod:`detection.features`, which never import each other.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import comm
from .backbones import build_backbone
from .data.voc import VOCDataset, report_images
from .features.extract import extract_conv_maps
from .features.scales import DEFAULT_SCALES_1
from .io.jsonfile import write_json
from .proposals import compute_proposals
from .runtime import resolve_device

__all__ = ["extract_split"]


def extract_split(data: str | Path, split: str, out: str | Path, backbone: str = "zf5", weights: str | None = None,
                  seed: int = 0, scales: Sequence[int] = DEFAULT_SCALES_1, max_size: int | None = None,
                  fp16: bool = False, flip: bool = False, workers: int | None = None, device: str = "auto",
                  proposals: bool = True, rebuild: bool = False, skip_bad: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """``tools/extract_features.py``: proposals of a split (into ``out/proposals``, resumed if
    partial; unless ``proposals`` is false), then its conv-map cache in ``out/convmaps_<key>/``,
    and a summary in ``out/features_summary.json`` (returned)."""
    out = Path(out)
    device = resolve_device(device)
    comm.init_distributed(device)
    dataset = VOCDataset(data, split, use_flipped=flip, skip_bad=skip_bad)
    if proposals:
        # Proposals are computed on the original images (flipped records mirror them); an
        # existing complete cache is reused, a partial one resumed.
        compute_proposals(dataset, out / "proposals", num_workers=workers, progress=progress)
    trunk = build_backbone(backbone, weights=weights, seed=seed)
    t0 = time.perf_counter()
    cache = extract_conv_maps(dataset, trunk, out, scales=scales, max_size=max_size, fp16=fp16, include_flipped=flip,
                              device=device, num_workers=workers, progress=progress, rebuild=rebuild)
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
        "backbone": {"name": backbone, "seed": seed,
                     "weights": None if weights is None else
                     (weights if not Path(weights).expanduser().is_file()
                      else str(Path(weights).expanduser().resolve()))},
    }
    if comm.is_main():
        write_json(out / "features_summary.json", summary)
        report_images(dataset)
    return summary
