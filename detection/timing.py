"""Per-stage timing of SPP-net against R-CNN on the same backbone, proposals and hardware.

Both methods run the same detector code except the window features: SPP-net pools every window
from one conv map per image per scale, R-CNN warps every window to the network's input size and
runs the whole conv trunk on each crop. Times are wall-clock seconds per image after a warm-up
image, with CUDA synchronisation around each stage; FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` so each speed-up can be set beside its arithmetic
limit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .detector import SPPDetector
from .features import conv_maps_for_image, pooled_window_features
from .rcnn import warp_windows
from .spp import spatial_pyramid_pool

__all__ = ["StageTimer", "time_detector", "compare_methods"]

log = logging.getLogger(__name__)

STAGES = ("conv", "pool", "fc", "svm", "nms")


class StageTimer:
    """Accumulates wall-clock seconds (and optionally FLOPs) per named stage."""

    def __init__(self, device: torch.device, count_flops: bool = False) -> None:
        self.device = device
        self.count_flops = count_flops
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        counter = FlopCounterMode(display=False) if self.count_flops else contextlib.nullcontext()
        t0 = time.perf_counter()
        with counter:
            yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        if self.count_flops:
            self.flops[name] = self.flops.get(name, 0.0) + float(counter.get_total_flops())


@torch.inference_mode()
def _run_once(detector: SPPDetector, image: np.ndarray, proposals: np.ndarray, timer: StageTimer) -> int:
    """One detection with every stage timed; returns the number of detections."""
    s = detector.settings
    dev = detector.device
    boxes = torch.as_tensor(np.asarray(proposals, np.float32).reshape(-1, 4))
    if s.method == "spp":
        with timer.stage("conv"):
            maps = conv_maps_for_image(detector.backbone, image, s.scales, s.max_size, dev)
        with timer.stage("pool"):
            # Fix: same projection as SPPDetector.pool5_features (the trunk's first cell centre).
            pool5 = pooled_window_features(maps.maps, maps.factors, boxes, maps.stride, s.levels,
                                           s.projection_rule, "area", device=dev,
                                           first_cell_center=maps.first_cell_center)
    else:
        # R-CNN's "pool" stage is the warping of every window (and pooling each crop's map).
        with timer.stage("pool"):
            x = detector.backbone.preprocess(image, 1.0).to(dev)
        pooled = []
        for i in range(0, len(boxes), s.rcnn_batch_size):
            with timer.stage("pool"):
                crops = warp_windows(x, boxes[i:i + s.rcnn_batch_size].to(dev), detector.backbone.input_size)
            with timer.stage("conv"):
                fmap = detector.backbone.trunk(crops)
            with timer.stage("pool"):
                pooled.append(spatial_pyramid_pool(fmap, tuple(s.levels)))
        pool5 = torch.cat(pooled)
    with timer.stage("fc"):
        feats = detector.head.features(pool5, s.feature_layer)
    with timer.stage("svm"):
        scores = detector.svms.scores(feats)
        h, w = image.shape[:2]
        k = scores.shape[1]
        if detector.regressors is not None:
            refined = detector.regressors.apply(pool5.cpu().numpy(), proposals)
            per_class = torch.as_tensor(refined, dtype=torch.float32, device=dev)
        else:
            per_class = boxes.to(dev)[:, None, :].expand(-1, k, -1)
        from torchvision.ops import clip_boxes_to_image
        per_class = clip_boxes_to_image(per_class.reshape(-1, 4), (h, w)).reshape(-1, k, 4)
    with timer.stage("nms"):
        dets = detector._postprocess(per_class, scores)
    return len(dets)


def time_detector(detector: SPPDetector, images: Sequence[np.ndarray], proposals: Sequence[np.ndarray],
                  warmup: int = 1, count_flops: bool = True) -> dict[str, float]:
    """Mean seconds per image of every stage (and ``total``), plus FLOPs per image.

    With ``count_flops`` an untimed pass over all images counts the FLOPs (counting slows
    execution down) and is also the warm-up (allocator, kernels, caches); without it the first
    ``warmup`` images are run once untimed.
    """
    n = max(1, len(images))
    out: dict = {}
    if count_flops:
        flop_timer = StageTimer(detector.device, count_flops=True)
        for image, props in zip(images, proposals):
            _run_once(detector, image, props, flop_timer)
        out["flops"] = {k: flop_timer.flops.get(k, 0.0) / n for k in STAGES}
        out["flops"]["total"] = sum(out["flops"][k] for k in STAGES)
    else:
        for image, props in list(zip(images, proposals))[:warmup]:
            _run_once(detector, image, props, StageTimer(detector.device))
    timer = StageTimer(detector.device)
    for image, props in zip(images, proposals):
        _run_once(detector, image, props, timer)
    out.update({k: timer.seconds.get(k, 0.0) / n for k in STAGES})
    out["total"] = sum(out[k] for k in STAGES)
    return out


def compare_methods(spp: SPPDetector, rcnn: SPPDetector, images: Sequence[np.ndarray],
                    proposals: Sequence[np.ndarray], proposal_seconds: float | None = None,
                    warmup: int = 1, spp_svd: SPPDetector | None = None) -> dict:
    """The timing comparison of ``tools/compare_rcnn.py`` (seconds per image).

    ``spp_svd``, if given, is SPP-net with SVD-truncated fc layers, timed in the same run and
    compared with the same R-CNN pass (``spp_svd`` and ``speedup_svd`` in the result).
    """
    t_spp = time_detector(spp, images, proposals, warmup)
    t_rcnn = time_detector(rcnn, images, proposals, warmup)
    flops = {"spp": t_spp.pop("flops"), "rcnn": t_rcnn.pop("flops")}

    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else float("nan")

    speedup = {k: ratio(t_rcnn[k], t_spp[k]) for k in ("conv", "fc", "total")}
    flop_ratio = {k: ratio(flops["rcnn"][k], flops["spp"][k]) for k in ("conv", "fc", "total")}
    result = {
        "spp": t_spp, "rcnn": t_rcnn, "speedup": speedup,
        "flops": {**flops, "ratio": flop_ratio},
        "device": _device_name(spp.device),
        "num_images": len(images),
        "num_windows": int(round(float(np.mean([len(p) for p in proposals])))) if len(proposals) else 0,
        "proposals_seconds_per_image": proposal_seconds,
        "settings": {"spp": dataclasses.asdict(spp.settings), "rcnn": dataclasses.asdict(rcnn.settings)},
        "torch_threads": torch.get_num_threads(),
    }
    if spp_svd is not None:
        t_svd = time_detector(spp_svd, images, proposals, warmup)
        flops["spp_svd"] = result["flops"]["spp_svd"] = t_svd.pop("flops")
        result["spp_svd"] = t_svd
        result["speedup_svd"] = {k: ratio(t_rcnn[k], t_svd[k]) for k in ("conv", "fc", "total")}
        result["flops"]["ratio_svd"] = {k: ratio(flops["rcnn"][k], flops["spp_svd"][k])
                                        for k in ("conv", "fc", "total")}
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_detector(backbone, num_classes: int, settings, hidden: tuple[int, int] = (4096, 4096), seed: int = 0,
                    device: str | torch.device = "cpu", bbox: bool = True) -> SPPDetector:
    """A detector with randomly initialised fc layers, SVMs and box regressors: it costs exactly
    what a trained one costs, so it times the pipeline when no trained model is at hand."""
    from .bbox_regression import BoxRegressors
    from .heads import FCHead
    from .svm import LinearSVMs

    g = torch.Generator().manual_seed(seed)
    pool5_dim = backbone.out_channels * sum(n * n for n in settings.levels)
    head = FCHead(pool5_dim, hidden, num_classes=None, dropout=0.0, generator=g).eval()
    dim = {"pool5": pool5_dim, "fc6": hidden[0], "fc7": hidden[1]}[settings.feature_layer]
    svms = LinearSVMs(weights=torch.randn((num_classes, dim), generator=g).numpy() * 0.01,
                      biases=np.zeros(num_classes, np.float32), feature_scale=1.0)
    regressors = None
    if bbox:
        regressors = BoxRegressors(weights=torch.randn((num_classes, pool5_dim, 4), generator=g).numpy() * 1e-4,
                                   biases=np.zeros((num_classes, 4), np.float32),
                                   target_mean=np.zeros((num_classes, 4), np.float32),
                                   target_unwhiten=np.tile(np.eye(4, dtype=np.float32) * 0.1, (num_classes, 1, 1)),
                                   feature_scale=1.0)
    classes = [f"class_{k}" for k in range(num_classes)]
    return SPPDetector(backbone, head, svms, regressors, classes, settings, device)
