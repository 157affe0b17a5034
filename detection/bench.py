"""Benchmarks a user can rerun (docs/benchmarks.md), one library call per tool:

- :func:`bench_spp_core`: the conv pass of one image at one scale and the pooling of many random
  windows of its map (``tools/bench_spp.py``);
- :func:`bench_train_stage`: time and peak memory of the train stage alone (SVMs + box
  regressors) on the first images of a finished pipeline run (``tools/bench_train_memory.py``).

Times are medians of repeated runs after one warm-up; memory is the process's peak RSS, which only
grows, so measure one image count per process.
"""
from __future__ import annotations

import logging
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import build_backbone
from .config import load_config
from .data.records import ImageRecord
from .data.voc import VOCDataset
from .errors import DetectionError
from .features import FeatureSettings, extract_conv_maps, make_featurizer, pool5_dim
from .features.pooling import DEFAULT_LEVELS, pool_windows, project_boxes
from .features.scales import scale_factors
from .pipeline import PipelineConfig, detector_settings
from .proposals import compute_proposals
from .training.detector_training import train_detector

__all__ = ["bench_spp_core", "bench_train_stage", "first_image_of_shape", "peak_rss_gb"]

log = logging.getLogger(__name__)


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    fn()                                                # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_image_of_shape(data: str | Path, split: str = "test", aspect: tuple[float, float] = (1.28, 1.4)
                         ) -> ImageRecord:
    """The first image of a VOC-layout split whose longer / shorter side ratio is within
    ``aspect`` (default: VOC's usual 4:3, 688 x ~917 at scale 688)."""
    for record in VOCDataset(data, split).records:
        if aspect[0] <= max(record.width, record.height) / min(record.width, record.height) <= aspect[1]:
            return record
    raise DetectionError(f"{data}: no image of split {split!r} has a side ratio in {list(aspect)}")


def bench_spp_core(image: np.ndarray, backbone: str = "zf5", weights: str | None = None, scale: int = 688,
                   windows: int = 2000, levels: Sequence[int] = DEFAULT_LEVELS, repeat: int = 5,
                   device: str = "cpu", seed: int = 0, roi_pool: bool = True) -> dict[str, Any]:
    """Time the SPP core on one image.

    Windows are random (seeded): log-uniform sides between 16 px and the image size, like selective
    search's mix of small and large boxes. Timed: the conv pass at ``scale``, :func:`pool_windows`
    of the windows (its default sparse-table method and ``method="roi_pool"``), and, with
    ``roi_pool``, torchvision's ``roi_pool`` run at every pyramid level for comparison.

    Args:
        image: uint8 RGB [H, W, 3].
    Returns:
        A JSON-able dict of the settings, the map size and the median seconds of each step.
    """
    device_t = torch.device(device)
    levels = tuple(int(v) for v in levels)
    trunk = build_backbone(backbone, weights=weights, seed=seed).to(device_t)
    h, w = image.shape[:2]
    f = scale_factors(h, w, (scale,))[0]
    x = trunk.preprocess(image, f).to(device_t)
    sync = torch.cuda.synchronize if device_t.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(seed)
    bw = np.exp(rng.uniform(np.log(16), np.log(w), windows))
    bh = np.exp(rng.uniform(np.log(16), np.log(h), windows))
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    boxes = torch.from_numpy(np.stack([x1, y1, x1 + bw, y1 + bh], 1) * f)

    def conv() -> torch.Tensor:
        out = trunk(x)
        sync()
        return out

    def timed_pool(method: str) -> Callable[[], None]:
        def run() -> None:
            pool_windows(fmap, cells, levels, method=method)
            sync()
        return run

    with torch.inference_mode():
        t_conv = _median_seconds(conv, repeat)
        fmap = conv()[0]
        cells = project_boxes(boxes, trunk.stride, tuple(fmap.shape[1:]),
                              first_cell_center=trunk.first_cell_center).to(device_t)
        t_pool = _median_seconds(timed_pool("table"), repeat)
        t_pool_roi = _median_seconds(timed_pool("roi_pool"), repeat)
        t_roi = None
        if roi_pool:
            from torchvision.ops import roi_pool as tv_roi_pool

            rois = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long, device=device_t), cells], 1).float()

            def torchvision_levels() -> None:
                torch.cat([tv_roi_pool(fmap[None], rois, n, 1.0).flatten(1) for n in levels], 1)
                sync()

            t_roi = _median_seconds(torchvision_levels, repeat)
    return {
        "backbone": backbone, "weights_id": trunk.weights_id, "image_size": [h, w],
        "input_size": list(x.shape[2:]), "map_size": list(fmap.shape[1:]), "channels": int(fmap.shape[0]),
        "windows": windows, "levels": list(levels), "threads": torch.get_num_threads(), "device": str(device_t),
        "repeat": repeat, "conv_s": t_conv, "pool_windows_s": t_pool, "pool_windows_roi_pool_method_s": t_pool_roi,
        "roi_pool_s": t_roi, "pool_windows_per_s": windows / t_pool,
        "roi_pool_windows_per_s": None if t_roi is None else windows / t_roi, "torch": torch.__version__,
    }


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_train_stage(run: str | Path, images: int, progress: bool = False) -> dict[str, Any]:
    """Train SVMs and box regressors on the first ``images`` training images of a finished
    pipeline run (with their flipped copies when the run used flips), reusing its proposals and
    conv maps and every setting of its ``config.yaml``; time it and measure the peak memory.

    Raises:
        DetectionError: the run is not an SPP-net run on a data folder without fine-tuning.
    """
    run = Path(run)
    cfg = load_config(PipelineConfig, run / "config.yaml")
    if cfg.method != "spp" or cfg.data.root is None or cfg.conv_finetune.enabled or cfg.train.finetune.enabled:
        raise DetectionError(f"{run}: the train-stage benchmark measures SPP runs on a data folder without "
                             "fine-tuning")
    ds = VOCDataset(cfg.data.root, cfg.data.train_split, classes=cfg.data.classes, use_flipped=cfg.data.flip)
    ids = set(list(dict.fromkeys(r.image_id for r in ds.records))[:images])
    records = [r for r in ds.records if r.image_id in ids]
    props = compute_proposals(ds, run / "proposals", cfg.proposals, num_workers=0, progress=False)
    backbone = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, seed=cfg.backbone.seed)
    settings = detector_settings(cfg)
    cache = extract_conv_maps(ds, backbone, run / "features", scales=settings.scales, max_size=settings.max_size,
                              fp16=cfg.features.fp16, num_workers=0, progress=False)
    tcfg = cfg.train
    before = peak_rss_gb()
    t0 = time.perf_counter()
    detector = train_detector(records, ds.classes, props.proposals_for_record, backbone,
                              make_featurizer(settings.method, settings, cache=cache),
                              pool5_dim(backbone.out_channels, settings.levels), settings, tcfg, progress=progress)
    return {"run": str(run), "images": len(ids), "records": len(records),
            "objects": int(sum(len(r.boxes) for r in records)), "train_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gb_before_training": round(before, 3), "peak_rss_gb": round(peak_rss_gb(), 3),
            "svm_stats": detector.svms.meta["stats"],
            "bbox_samples": {k: v["num_samples"] for k, v in detector.regressors.meta["stats"].items()}
            if detector.regressors is not None else None}



class _FirstRecords:
    """The first records of a dataset, as :func:`extract_conv_maps` reads a dataset."""

    def __init__(self, dataset: VOCDataset, n: int) -> None:
        self.records, self.split, self._dataset = list(dataset.records[:n]), dataset.split, dataset

    def fingerprint(self) -> str:
        return self._dataset.fingerprint()


def bench_mining_cost(data: str | Path, out_dir: str | Path, backbone: str = "zf5", weights: str | None = None,
                      scales: Sequence[int] = (480, 576, 688, 864, 1200), windows: int = 2000, images: int = 8,
                      num_classes: int = 20, split: str = "trainval", seed: int = 0) -> dict[str, Any]:
    """Seconds per image of one SVM mining pass on real conv maps: the features read (the
    windows of an image pooled from the conv-map cache, :class:`WindowFeatureSource`) and the
    whole per-image step of :class:`~detection.training.hard_negatives.SVMTrainer` (read, scale,
    IoU with the GT, scores of every class, hard rows), with ``num_classes`` random SVMs.

    The first ``images`` records of ``split`` get their conv maps cached in ``out_dir`` (untimed)
    and ``windows`` random boxes each (the cost depends on their number, not on where they come
    from). Each image is timed twice; the second time counts (the cache files are in the page
    cache, as on a machine whose memory holds them, and each map's checksum is verified once per
    process, at the first read).
    """
    from .training.hard_negatives import SVMTrainer
    from .training.window_source import WindowFeatureSource

    ds = VOCDataset(data, split)
    subset = _FirstRecords(ds, images)
    net = build_backbone(backbone, weights=weights, seed=seed)
    settings = FeatureSettings(scales=tuple(scales))
    cache = extract_conv_maps(subset, net, Path(out_dir), scales=settings.scales, max_size=settings.max_size,
                              num_workers=0, progress=False)
    rng = np.random.default_rng(seed)
    boxes = {}
    for r in subset.records:
        xy = rng.uniform(0, 1, (windows, 2)) * [r.width - 16, r.height - 16]
        wh = 16 + rng.uniform(0, 1, (windows, 2)) * (np.array([r.width, r.height]) - xy - 16)
        boxes[r.key] = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    dim = pool5_dim(net.out_channels, settings.levels)
    source = WindowFeatureSource(subset.records, lambda r: boxes[r.key], make_featurizer("spp", settings, cache=cache),
                                 None, "pool5", dim)
    trainer = SVMTrainer(source, num_classes)
    weights_ = (rng.standard_normal((num_classes, dim)) * 1e-3).astype(np.float32)
    biases = np.full(num_classes, -0.5, np.float32)
    read, step = [], []
    for repeat in range(2):
        for i in range(len(subset.records)):
            t0 = time.perf_counter()
            source.image(i)
            t1 = time.perf_counter()
            # The trainer's own per-image step (it reads the image again).
            trainer._mine_image(i, dim, 1.0, weights_, biases, list(range(num_classes)))
            t2 = time.perf_counter()
            if repeat:
                read.append(t1 - t0)
                step.append(t2 - t1)
    return {"data": str(data), "backbone": backbone, "scales": list(scales), "dim": dim, "windows": windows,
            "images": len(subset.records), "classes": num_classes, "threads": torch.get_num_threads(),
            "read_seconds_per_image": round(statistics.median(read), 4),
            "mining_step_seconds_per_image": round(statistics.median(step), 4),
            "read_seconds_each": [round(t, 4) for t in read], "step_seconds_each": [round(t, 4) for t in step]}
