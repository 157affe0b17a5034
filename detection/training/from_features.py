"""The train stage on the folder ``tools/extract_features.py`` wrote (``tools/train_svm.py``):
the conv-map cache, the backbone and the scales are read from what that stage recorded in
``FEATURES/features_summary.json``, checked against the dataset and the weights file, so no
option has to be repeated.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .. import comm
from ..backbones import Backbone, rebuild_recorded_backbone
from ..config import merge, parse_overrides
from ..data.voc import VOCDataset, report_images
from ..detector import DetectorSettings, SPPDetector
from ..errors import CacheError
from ..features import ConvMapCache, make_featurizer, pool5_dim
from .finetune import FinetuneConfig
from ..io.jsonfile import read_json
from ..proposals import compute_proposals
from .bbox_regression import BBoxRegressionConfig
from .detector_training import TrainConfig, train_detector

__all__ = ["train_from_features", "open_feature_folder", "recorded_backbone", "settings_from_cache",
           "fc_finetune_schedule"]


def fc_finetune_schedule(iterations: int) -> FinetuneConfig:
    """fc fine-tuning for ``iterations`` mini-batches (0: none), the learning rate divided by 10 at
    half and at three quarters of the run (the SPP-net code's steps, scaled to the run)."""
    return FinetuneConfig(enabled=iterations > 0, iterations=max(iterations, 1),
                          lr_steps=(int(iterations * 0.5), int(iterations * 0.75)))


def open_feature_folder(features: str | Path) -> tuple[dict[str, Any], ConvMapCache]:
    """The summary ``tools/extract_features.py`` wrote in ``features`` and the conv-map cache it names.

    Raises:
        CacheError: the summary is missing or names no cache; the cache cannot be opened.
    """
    summary_path = Path(features) / "features_summary.json"
    if not summary_path.is_file():
        raise CacheError(f"{summary_path} is missing: run tools/extract_features.py --out {features} first")
    summary = read_json(summary_path)
    if not isinstance(summary, dict) or not isinstance(summary.get("cache"), str):
        raise CacheError(f"{summary_path}: no 'cache' folder named in it; rerun tools/extract_features.py")
    return summary, ConvMapCache.open(summary["cache"])


def recorded_backbone(summary: dict[str, Any], cache: ConvMapCache, summary_path: str | Path,
                      weights: str | None = None, seed: int | None = None) -> Backbone:
    """The backbone the conv maps were computed with: the weights and seed recorded in the
    summary unless given, checked against the weights id the cache recorded.

    Raises:
        CacheError: a malformed backbone record.
        ModelError: the weights cannot be loaded or are not the recorded ones.
    """
    recorded = summary.get("backbone") if isinstance(summary.get("backbone"), dict) else {}
    weights = weights if weights is not None else recorded.get("weights")
    seed = seed if seed is not None else recorded.get("seed", 0)
    if not (weights is None or isinstance(weights, str)) or isinstance(seed, bool) or not isinstance(seed, int):
        raise CacheError(f"{summary_path}: malformed backbone record {str(recorded)[:200]}; rerun tools/extract_features.py")
    s = cache.settings
    return rebuild_recorded_backbone(s["backbone"], weights, seed, s["weights_id"], str(summary_path))


def settings_from_cache(cache: ConvMapCache, feature_layer: str, scale_rule: str) -> DetectorSettings:
    """Detector settings whose scales and max size are those the conv maps were computed at."""
    s = cache.settings
    return DetectorSettings(scales=tuple(s["scales"]), max_size=int(s["max_size"]), feature_layer=feature_layer,
                            scale_rule=scale_rule)


def train_from_features(data: str | Path, split: str, features: str | Path, out: str | Path, *,
                        weights: str | None = None, seed: int | None = None, layer: str | None = None,
                        finetune_iterations: int = 0, bbox_regression: bool = True, scale_rule: str = "area",
                        workers: int | None = None, overrides: Sequence[str] = (), skip_bad: bool = False,
                        progress: bool = True) -> SPPDetector:
    """Train a detector on the conv-map cache of ``features`` and write the model file ``out``.

    Args:
        data, split: the dataset and split the features were extracted from (checked).
        features: the ``--out`` folder of ``tools/extract_features.py``.
        out: model file to write; fine-tuning checkpoints go beside it.
        weights, seed: the backbone's weights and seed (default: those recorded in ``features``).
        layer: the SVMs' features, pool5 / fc6 / fc7 (default fc7 with fine-tuning, else pool5).
        finetune_iterations: fc fine-tuning mini-batches first (0: none; :func:`fc_finetune_schedule`).
        bbox_regression: train box regressors.
        scale_rule: multi-scale window-to-scale rule stored in the model ("area" or "code").
        workers: selective-search processes if proposals are missing.
        overrides: ``KEY=VALUE`` overrides of the :class:`TrainConfig` (``svm.C=0.001``, the
            pipeline's ``train.svm.C``), applied after the options above.
        skip_bad: leave out undecodable images instead of stopping.
        progress: progress bars.
    Returns:
        The trained detector (already written to ``out``).
    Raises:
        CacheError: the folder is not a finished feature extraction of this dataset and split.
        ModelError: the recorded weights file is gone or has changed.
    """
    comm.init_distributed("cpu")     # under torchrun: the ranks share the classes out
    if layer is None:
        layer = "fc7" if finetune_iterations > 0 else "pool5"
    summary, cache = open_feature_folder(features)
    s = cache.settings
    dataset = VOCDataset(data, split, use_flipped=bool(s["flipped"]), skip_bad=skip_bad)
    if s["dataset_fingerprint"] != str(dataset.fingerprint()) or s["split"] != split:
        raise CacheError(f"the conv-map cache {cache.root} was made for another dataset or split "
                         f"({s['split']}); rerun tools/extract_features.py for {data} {split}")
    backbone = recorded_backbone(summary, cache, Path(features) / "features_summary.json", weights, seed)
    proposals = compute_proposals(dataset, Path(features) / "proposals", num_workers=workers)
    settings = settings_from_cache(cache, layer, scale_rule)
    cfg = TrainConfig(finetune=fc_finetune_schedule(finetune_iterations), bbox=BBoxRegressionConfig(enabled=bbox_regression))
    cfg = merge(cfg, parse_overrides(list(overrides)))
    featurizer = make_featurizer(settings.method, settings, cache=cache)
    detector = train_detector(dataset.records, dataset.classes, proposals.proposals_for_record, backbone,
                              featurizer, pool5_dim(backbone.out_channels, settings.levels), settings, cfg,
                              out_dir=Path(out).parent, progress=progress,
                              finetune_pool5_fn=featurizer.finetune_fn(dataset.records))
    if comm.is_main():
        detector.save(out, {"dataset": {"root": str(data), "split": split}, "train_config": dataclasses.asdict(cfg)})
        report_images(dataset)
    comm.barrier("train: waiting for rank 0 to write the model file")
    return detector
