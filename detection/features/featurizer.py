"""One featurizer: an image (or its cached conv maps) and windows -> the windows' pooled (pool5)
features, and through an fc head their fc6 / fc7 features.

One interface (:class:`WindowFeaturizer`), four implementations:

- :class:`CachedSPPFeaturizer`: SPP-net, windows pooled from a :class:`ConvMapCache` (training
  the SVMs and box regressors, fine-tuning fc layers);
- :class:`RecomputedSPPFeaturizer`: the same features without the cache (``features.cache=false``,
  for datasets whose maps do not fit the disk): a record's maps computed each time its windows
  are pooled, as the cache would hold them;
- :class:`InMemorySPPFeaturizer`: SPP-net, conv maps computed for the image (detection, timing,
  fine-tuning the conv layers: differentiable through the trunk);
- :class:`CropWarpFeaturizer`: R-CNN, every window cropped, warped and run through the trunk (the
  baseline: its training, detection and timing).

Both SPP-net implementations pool with :func:`detection.features.scales.pooled_window_features`,
so a window has the same features wherever they are computed. :func:`make_featurizer` is the one
place that picks an implementation. A timer (:mod:`detection.timer`) passed in bills the trunk to
stage "conv", window pooling (or cropping and warping) to "pool" and the fc layers to "fc".
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.records import ImageRecord
from ..data.images import load_image
from ..errors import DetectionError
from ..timer import NO_TIMER, Timer
from .convmap_cache import ConvMapCache
from .conv_pass import check_image, conv_maps_for_image
from .extract import extract_conv_maps
from .pooling import DEFAULT_LEVELS
from .rcnn import rcnn_window_features
from .scales import DEFAULT_MAX_SIZE, DEFAULT_SCALES_1, as_boxes_tensor, pooled_window_features, scale_factors, \
    select_scales

__all__ = ["METHODS", "FeatureSettings", "WindowFeaturizer", "CachedSPPFeaturizer", "RecomputedSPPFeaturizer",
           "InMemorySPPFeaturizer", "CropWarpFeaturizer", "make_featurizer", "training_featurizer", "layer_features"]

#: Window-feature methods: SPP-net (pool every window from one conv map per scale) and R-CNN.
METHODS = ("spp", "rcnn")

#: An image, or the record it is read from (a record or its key for a cache).
Item = ImageRecord | np.ndarray | str
#: pooled_fn(index of an image, boxes Tensor[N, 4] in original image pixels, generator) -> Tensor[N, D]:
#: what fine-tuning (:func:`detection.training.finetune.finetune`) draws windows from. The
#: generator is one for the image, or a sequence of one per window when fine-tuning shares an
#: image's windows out over processes (each window's random draws then come from its own).
PooledFn = Callable[[int, torch.Tensor, torch.Generator | Sequence[torch.Generator]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """How windows become pooled features: the one home and default of each such setting (the
    pipeline's ``features.*``; a detector's settings extend these)."""

    scales: tuple[int, ...] = DEFAULT_SCALES_1  # shorter side per scale (1-scale: 688)
    max_size: int = DEFAULT_MAX_SIZE          # cap on the longer side after resizing
    levels: tuple[int, ...] = DEFAULT_LEVELS  # pyramid: 50 bins per channel
    projection_rule: str = "paper"            # window -> conv-cell rule ("paper" or "code")
    scale_rule: str = "area"                  # multi-scale: window area nearest 224^2 ("area", paper)
                                              # or side nearest 208 ("code"); docs/spp.md
    rcnn_batch_size: int = 128                # R-CNN: warped windows per trunk call

    def feature_settings(self) -> FeatureSettings:
        """Only these settings (of a subclass's instance: a detector's or the pipeline's)."""
        return FeatureSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FeatureSettings)})


def layer_features(pool5: torch.Tensor, head: Any, layer: str, timer: Timer = NO_TIMER) -> torch.Tensor:
    """Window features at ``layer`` ("pool5", "fc6", "fc7") from pooled ones, through ``head``
    (an :class:`detection.heads.FCHead`; None only for pool5), billed to stage "fc"."""
    with timer.stage("fc"):
        return pool5 if head is None and layer == "pool5" else head.features(pool5, layer)


class WindowFeaturizer(abc.ABC):
    """(image, windows) -> features. Boxes are internal (x1, y1, x2, y2) in original pixels."""

    #: The scale rule fine-tuning draws with (:func:`detection.features.scales.select_scales`):
    #: a random scale per window.
    finetune_scale_rule = "random"

    def __init__(self, settings: FeatureSettings, device: torch.device | str = "cpu") -> None:
        self.settings = settings
        self.device = torch.device(device)

    @abc.abstractmethod
    def pool5(self, item: Item, boxes: torch.Tensor | np.ndarray, *, timer: Timer = NO_TIMER,
              scale_rule: str | int | None = None,
              generator: torch.Generator | Sequence[torch.Generator] | None = None,
              differentiable: bool = False) -> torch.Tensor:
        """Pooled features float32 Tensor[N, D] of ``boxes`` [N, 4], rows in box order, on ``device``.

        Args:
            item: the image (uint8 RGB [H, W, 3]) or its record.
            scale_rule: the scale of each window (``select_scales``); None: ``settings.scale_rule``.
            generator: draws of the random scale rules (one, or one per window: ``select_scales``).
            differentiable: gradients flow into the trunk where it runs (fine-tuning conv layers).
        """

    def features(self, item: Item, boxes: torch.Tensor | np.ndarray, head: Any = None, layer: str = "pool5",
                 timer: Timer = NO_TIMER) -> torch.Tensor:
        """Window features at ``layer``: :meth:`pool5`, then ``head`` (:func:`layer_features`)."""
        return layer_features(self.pool5(item, boxes, timer=timer), head, layer, timer)

    def __call__(self, record: ImageRecord, boxes: torch.Tensor) -> torch.Tensor:
        """The training features of a record's windows (``detection.training.window_source.Pool5Fn``), on the CPU."""
        return self.pool5(record, boxes).cpu()

    def finetune_fn(self, items: Sequence[Item]) -> PooledFn:
        """Features for fine-tuning (:data:`PooledFn`) of ``items[i]``, each window
        at a random scale drawn by :attr:`finetune_scale_rule` (the SPP code's multi-scale
        fine-tuning), differentiable where the trunk runs, on the CPU."""
        def pooled(i: int, boxes: torch.Tensor,
                   generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
            return self.pool5(items[i], boxes, scale_rule=self.finetune_scale_rule, generator=generator,
                              differentiable=True).cpu()
        return pooled


class CachedSPPFeaturizer(WindowFeaturizer):
    """SPP-net features pooled from the cached conv maps of a record (only the maps of the scales
    some window uses are read)."""

    def __init__(self, settings: FeatureSettings, cache: ConvMapCache, device: torch.device | str = "cpu") -> None:
        super().__init__(settings, device)
        made = (tuple(cache.settings["scales"]), int(cache.settings["max_size"]))
        if made != (tuple(settings.scales), int(settings.max_size)):
            raise DetectionError(f"the conv-map cache {cache.root} holds scales {list(made[0])} (max_size "
                                 f"{made[1]}), the settings ask for {list(settings.scales)} ({settings.max_size})")
        self.cache = cache

    def pool5(self, item: Item, boxes: torch.Tensor | np.ndarray, *, timer: Timer = NO_TIMER,
              scale_rule: str | int | None = None,
              generator: torch.Generator | Sequence[torch.Generator] | None = None,
              differentiable: bool = False) -> torch.Tensor:
        if isinstance(item, np.ndarray):
            raise DetectionError("a cached featurizer reads conv maps of a record, not of an image array")
        s = self.settings
        key = item if isinstance(item, str) else item.key
        with timer.stage("pool"):
            factors = self.cache.factors(key)
            boxes_t = as_boxes_tensor(boxes)
            scale_index = select_scales(boxes_t, factors, s.scale_rule if scale_rule is None else scale_rule,
                                        generator)
            return pooled_window_features(self.cache.lazy_maps(key), factors, boxes_t, self.cache.stride, s.levels,
                                          s.projection_rule, scale_index=scale_index, device=self.device,
                                          first_cell_center=self.cache.first_cell_center)


class RecomputedSPPFeaturizer(WindowFeaturizer):
    """The features of :class:`CachedSPPFeaturizer` without a cache: each call computes the conv
    maps of the record (at the scales its windows use) as :func:`extract_conv_maps` computes them
    for the cache (the trunk in eval mode under inference mode on ``conv_device``, float32) and
    pools them on ``device`` (the CPU, as training pools from the cache). Fine-tuning the fc
    layers draws a random scale per window, as from the cache, and the trunk stays fixed
    (``differentiable`` is ignored, as it is for cached maps).

    ``conv_passes`` counts the records whose maps were computed (the compute the cache saves)."""

    def __init__(self, settings: FeatureSettings, backbone: Any, conv_device: torch.device | str = "cpu",
                 device: torch.device | str = "cpu") -> None:
        super().__init__(settings, device)
        self.backbone = backbone
        self.conv_device = torch.device(conv_device)
        self.conv_passes = 0

    def pool5(self, item: Item, boxes: torch.Tensor | np.ndarray, *, timer: Timer = NO_TIMER,
              scale_rule: str | int | None = None, generator: torch.Generator | None = None,
              differentiable: bool = False) -> torch.Tensor:
        s = self.settings
        image = _image(item)
        with timer.stage("pool"):
            boxes_t = as_boxes_tensor(boxes)
            factors = scale_factors(image.shape[0], image.shape[1], s.scales, s.max_size)
            scale_index = select_scales(boxes_t, factors, s.scale_rule if scale_rule is None else scale_rule,
                                        generator)
        with timer.stage("conv"):
            used = torch.unique(scale_index).tolist() or [0]
            maps = conv_maps_for_image(self.backbone, image, s.scales, s.max_size, self.conv_device, only=used)
            self.conv_passes += 1
        with timer.stage("pool"):
            return pooled_window_features([None if m is None else m.to(self.device) for m in maps.maps],
                                          maps.factors, boxes_t, maps.stride, s.levels, s.projection_rule,
                                          scale_index=scale_index, device=self.device,
                                          first_cell_center=maps.first_cell_center)


class InMemorySPPFeaturizer(WindowFeaturizer):
    """SPP-net features from conv maps computed for the image (of the scales its windows use)."""

    #: One random scale per image: fine-tuning the conv layers runs one differentiable conv pass.
    finetune_scale_rule = "random-image"

    def __init__(self, settings: FeatureSettings, backbone: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(settings, device)
        self.backbone = backbone

    def pool5(self, item: Item, boxes: torch.Tensor | np.ndarray, *, timer: Timer = NO_TIMER,
              scale_rule: str | int | None = None,
              generator: torch.Generator | Sequence[torch.Generator] | None = None,
              differentiable: bool = False) -> torch.Tensor:
        s = self.settings
        image = _image(item)
        with timer.stage("pool"):
            boxes_t = as_boxes_tensor(boxes)
            factors = scale_factors(image.shape[0], image.shape[1], s.scales, s.max_size)
            scale_index = select_scales(boxes_t, factors, s.scale_rule if scale_rule is None else scale_rule,
                                        generator)
        with timer.stage("conv"):
            used = torch.unique(scale_index).tolist() or [0]
            maps = conv_maps_for_image(self.backbone, image, s.scales, s.max_size, self.device, only=used,
                                       differentiable=differentiable)
        with timer.stage("pool"):
            # The trunk's first cell centre, as the training cache uses.
            return pooled_window_features(maps.maps, maps.factors, boxes_t, maps.stride, s.levels, s.projection_rule,
                                          scale_index=scale_index, device=self.device,
                                          first_cell_center=maps.first_cell_center)


class CropWarpFeaturizer(WindowFeaturizer):
    """R-CNN features: the trunk runs on every warped window (scale settings do not apply; the
    trunk always runs under inference mode, as nothing fine-tunes it through warped crops)."""

    def __init__(self, settings: FeatureSettings, backbone: Any, device: torch.device | str = "cpu") -> None:
        super().__init__(settings, device)
        self.backbone = backbone

    def pool5(self, item: Item, boxes: torch.Tensor | np.ndarray, *, timer: Timer = NO_TIMER,
              scale_rule: str | int | None = None,
              generator: torch.Generator | Sequence[torch.Generator] | None = None,
              differentiable: bool = False) -> torch.Tensor:
        image = _image(item)
        with torch.inference_mode():
            with timer.stage("pool"):
                x = self.backbone.preprocess(image, 1.0).to(self.device)
            return rcnn_window_features(self.backbone.trunk, x, as_boxes_tensor(boxes).to(self.device),
                                        self.backbone.input_size, self.settings.levels,
                                        self.settings.rcnn_batch_size, timer)


def make_featurizer(method: str, settings: FeatureSettings, *, backbone: Any = None,
                    cache: ConvMapCache | None = None, device: torch.device | str = "cpu",
                    cache_features: bool = False) -> WindowFeaturizer:
    """The featurizer of ``method`` ("spp" or "rcnn"): SPP-net pools from ``cache`` when given,
    else from conv maps it computes with ``backbone`` on ``device`` (with ``cache_features``
    the cache's features without a cache, :class:`RecomputedSPPFeaturizer`, pooled on the CPU);
    R-CNN warps windows through ``backbone``."""
    if method == "rcnn":
        return CropWarpFeaturizer(settings, backbone, device)
    if method == "spp":
        if cache is not None:
            return CachedSPPFeaturizer(settings, cache, device)
        if cache_features:
            return RecomputedSPPFeaturizer(settings, backbone, conv_device=device)
        return InMemorySPPFeaturizer(settings, backbone, device)
    raise DetectionError(f"unknown method {method!r}: use {' or '.join(METHODS)}")


def training_featurizer(method: str, settings: FeatureSettings, dataset: Any, backbone: Any, out_dir: str | Path,
                        *, fp16: bool = False, num_workers: int | None = None, device: torch.device | str = "cpu",
                        progress: bool = True, cache: bool = True) -> WindowFeaturizer:
    """The featurizer training reads: SPP-net's from the conv maps of ``dataset`` cached in
    ``out_dir`` (computed, or resumed, here; pooled on the CPU), or with ``cache`` false from
    maps computed on ``device`` whenever windows are pooled (nothing written; ``fp16`` must then
    be false: it is how the cache stores maps); R-CNN's from the images."""
    if method == "spp" and not cache:
        if fp16:
            raise DetectionError("fp16 stores the cached conv maps as float16; without the cache nothing is stored")
        return make_featurizer(method, settings, backbone=backbone.to(device), device=device, cache_features=True)
    if method == "spp":
        cache = extract_conv_maps(dataset, backbone, out_dir, scales=settings.scales, max_size=settings.max_size,
                                  fp16=fp16, device=device, num_workers=num_workers, progress=progress)
        return make_featurizer(method, settings, cache=cache)
    return make_featurizer(method, settings, backbone=backbone.to(device), device=device)


def _image(item: Item) -> np.ndarray:
    if isinstance(item, ImageRecord):
        return load_image(item)
    if isinstance(item, str):
        raise DetectionError(f"{item!r}: the featurizer needs an image or its record, not a key")
    return check_image(item)
