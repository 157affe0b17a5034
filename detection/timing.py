"""Per-stage timing of SPP-net against R-CNN on the same backbone, proposals and hardware.

Both methods run the same detector code except the window features: SPP-net pools every window
from one conv map per image per scale, R-CNN warps every window to the network's input size and
runs the whole conv trunk on each crop. The stages timed are the detector's own
(``SPPDetector.detect(..., timer=StageTimer(...))``), so what is timed is what detection runs.
Times are wall-clock seconds per image after a warm-up image, with CUDA synchronisation around
each stage; FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` so each speed-up can be set beside its arithmetic
limit.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .backbones import build_backbone
from .data.images import load_image
from .data.records import ImageRecord
from .data.voc import VOCDataset, report_images
from .detector import DetectorSettings, SPPDetector, check_settings
from .errors import DetectionError
from .features import pool5_dim
from .heads import FCHead
from .io.jsonfile import write_json
from .linear import BoxRegressors, LinearSVMs
from .runtime import resolve_device
from .timer import StageTimer

__all__ = ["STAGES", "StageTimer", "time_detector", "rcnn_twin", "compare_methods", "random_detector",
           "compare_on_records", "compare_on_dataset"]

log = logging.getLogger(__name__)

STAGES = ("conv", "pool", "fc", "svm", "nms")


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
            detector.detect(image, props, timer=flop_timer)
        out["flops"] = {k: flop_timer.flops.get(k, 0.0) / n for k in STAGES}
        out["flops"]["total"] = sum(out["flops"][k] for k in STAGES)
    else:
        for image, props in list(zip(images, proposals))[:warmup]:
            detector.detect(image, props, timer=StageTimer(detector.device))
    timer = StageTimer(detector.device)
    for image, props in zip(images, proposals):
        detector.detect(image, props, timer=timer)
    out.update({k: timer.seconds.get(k, 0.0) / n for k in STAGES})
    out["total"] = sum(out[k] for k in STAGES)
    return out


def rcnn_twin(detector: SPPDetector) -> SPPDetector:
    """The R-CNN detector with the same trunk, fc layers, SVMs and regressors as ``detector``:
    only the window features differ (crop + warp + whole trunk per window)."""
    return SPPDetector(detector.backbone, detector.head, detector.svms, detector.regressors, detector.classes,
                       dataclasses.replace(detector.settings, method="rcnn"), detector.device, detector.meta)


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
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def random_detector(backbone, num_classes: int, settings, hidden: tuple[int, int] = (4096, 4096), seed: int = 0,
                    device: str | torch.device = "cpu", bbox: bool = True) -> SPPDetector:
    """A detector with randomly initialised fc layers, SVMs and box regressors: it costs exactly
    what a trained one costs, so it times the pipeline when no trained model is at hand."""

    g = torch.Generator().manual_seed(seed)
    dim5 = pool5_dim(backbone.out_channels, settings.levels)
    head = FCHead(dim5, hidden, num_classes=None, dropout=0.0, generator=g).eval()
    dim = {"pool5": dim5, "fc6": hidden[0], "fc7": hidden[1]}[settings.feature_layer]
    svms = LinearSVMs(weights=torch.randn((num_classes, dim), generator=g).numpy() * 0.01,
                      biases=np.zeros(num_classes, np.float32), feature_scale=1.0)
    regressors = None
    if bbox:
        regressors = BoxRegressors(weights=torch.randn((num_classes, dim5, 4), generator=g).numpy() * 1e-4,
                                   biases=np.zeros((num_classes, 4), np.float32),
                                   target_mean=np.zeros((num_classes, 4), np.float32),
                                   target_unwhiten=np.tile(np.eye(4, dtype=np.float32) * 0.1, (num_classes, 1, 1)),
                                   feature_scale=1.0)
    classes = [f"class_{k}" for k in range(num_classes)]
    return SPPDetector(backbone, head, svms, regressors, classes, settings, device)


def compare_on_records(spp: SPPDetector, records: Sequence[ImageRecord],
                       proposals_fn: Callable[[ImageRecord], np.ndarray] | None = None,
                       max_windows: int | None = None, svd: tuple[int, int] | None = None) -> dict:
    """SPP-net (``spp``) against R-CNN (its :func:`rcnn_twin`) on the images of ``records``: the
    timing entry of ``tools/compare_rcnn.py`` and of the pipeline's timing stage.

    Proposals come from ``proposals_fn`` (a cache: not timed) or, when None, from the detector's
    own selective search (timed apart, ``proposals_seconds_per_image``); each image keeps at most
    ``max_windows`` of them. With ``svd`` (ranks of fc6, fc7) SPP-net is also timed with truncated
    fc layers (R-CNN keeps the full ones: its time is the conv stage).
    """
    images = [load_image(r) for r in records]
    t0 = time.perf_counter()
    if proposals_fn is not None:
        props, proposal_seconds = [np.asarray(proposals_fn(r), np.float32) for r in records], None
    else:
        props = [spp.proposals(im) for im in images]
        proposal_seconds = (time.perf_counter() - t0) / max(1, len(images))
    if max_windows is not None:
        props = [p[:max_windows] for p in props]
    spp_svd = None
    if svd:
        spp_svd = SPPDetector(spp.backbone, copy.deepcopy(spp.head).compress(*svd), spp.svms, spp.regressors,
                              spp.classes, spp.settings, spp.device)
    return compare_methods(spp, rcnn_twin(spp), images, props, proposal_seconds, spp_svd=spp_svd)


def compare_on_dataset(data: str | Path, split: str, out: str | Path, num_images: int = 3, model: str | None = None,
                       backbone: str | None = None, weights: str | None = None, settings: DetectorSettings | None = None,
                       device: str = "auto", windows: int | None = None, proposal_mode: str | None = None,
                       svd: tuple[int, int] | None = None, skip_bad: bool = False, command: str = "") -> dict:
    """``tools/compare_rcnn.py``: SPP-net against R-CNN on the first ``num_images`` of a split,
    written to ``out`` (JSON) and returned.

    The detector is ``model``'s, or without it a :func:`random_detector` of ``backbone`` (None:
    zf5) with ``settings`` (None: the defaults); with ``model`` these three are its own, and giving
    any of them is refused by name. R-CNN is its :func:`rcnn_twin`. Proposals are the detector's own selective
    search (its stored settings), with ``proposal_mode`` and at most ``windows`` boxes where
    given; they are timed apart, and the settings recorded in ``out`` are the ones used. With
    ``svd`` (ranks of fc6, fc7) SPP-net is also timed with truncated fc layers (R-CNN keeps the
    full ones: its time is the conv stage).
    """
    given = [name for name, v in (("backbone", backbone), ("weights", weights), ("settings", settings)) if v is not None]
    if model and given:
        raise DetectionError(f"the model file {model} holds its own backbone, weights and detector settings; "
                             f"{', '.join(given)} cannot be given with it")
    ds = VOCDataset(data, split, skip_bad=skip_bad)
    if model:
        spp = SPPDetector.from_file(model, device=resolve_device(device))
    else:
        spp = random_detector(build_backbone(backbone or "zf5", weights=weights), len(ds.classes),
                              settings or DetectorSettings(), device=resolve_device(device))
    overrides = {k: v for k, v in (("mode", proposal_mode), ("max_boxes", windows)) if v is not None}
    if overrides:
        spp.settings = dataclasses.replace(spp.settings, proposals=dataclasses.replace(spp.settings.proposals,
                                                                                        **overrides))
        check_settings(spp.settings)
    timing = compare_on_records(spp, ds.records[:num_images], svd=svd)
    timing["svd"] = list(svd) if svd else None
    timing["command"] = command
    write_json(out, timing)
    report_images(ds)
    return timing
