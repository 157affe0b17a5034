"""Window features, the SPP-net stage (docs/spp.md): the pooling op (:mod:`.pooling`), image
scales and each window's scale (:mod:`.scales`), the conv pass of one image (:mod:`.conv_pass`),
the conv-map cache (:mod:`.convmap_cache`), its filling (:mod:`.extract`, images decoded by
:mod:`.loader`), R-CNN's crop and warp (:mod:`.rcnn`) and the one featurizer that detection,
training, fine-tuning and timing read window features from (:mod:`.featurizer`). The stage entry
that also computes proposals is :mod:`detection.extraction` (this package never imports
:mod:`detection.proposals`).
"""
from .convmap_cache import CONVMAP_FORMAT_VERSION, ConvMapCache, cache_records, convmap_settings
from .conv_pass import ImageConvMaps, conv_maps_for_image
from .extract import extract_conv_maps
from .featurizer import (METHODS, CachedSPPFeaturizer, CropWarpFeaturizer, FeatureSettings, InMemorySPPFeaturizer,
                         RecomputedSPPFeaturizer, WindowFeaturizer, layer_features, make_featurizer,
                         training_featurizer)
from .pooling import DEFAULT_LEVELS, SpatialPyramidPooling, pool5_dim, pool_windows, project_boxes, spatial_pyramid_pool
from .rcnn import rcnn_window_features, warp_windows
from .scales import (CODE_SCALES_5, DEFAULT_MAX_SIZE, DEFAULT_SCALES_1, DEFAULT_SCALES_5, named_scales,
                     pooled_window_features, scale_factors, select_scales)

__all__ = [
    "CONVMAP_FORMAT_VERSION", "ConvMapCache", "cache_records", "convmap_settings",
    "ImageConvMaps", "conv_maps_for_image", "extract_conv_maps",
    "METHODS", "CachedSPPFeaturizer", "CropWarpFeaturizer", "FeatureSettings", "InMemorySPPFeaturizer",
    "RecomputedSPPFeaturizer", "WindowFeaturizer", "layer_features", "make_featurizer", "training_featurizer",
    "DEFAULT_LEVELS", "SpatialPyramidPooling", "pool5_dim", "pool_windows", "project_boxes", "spatial_pyramid_pool",
    "rcnn_window_features", "warp_windows",
    "CODE_SCALES_5", "DEFAULT_MAX_SIZE", "DEFAULT_SCALES_1", "DEFAULT_SCALES_5", "named_scales",
    "pooled_window_features", "scale_factors", "select_scales",
]
