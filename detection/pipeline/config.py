"""The pipeline's settings: one typed, frozen tree (``OUT/config.yaml``, exactly the settings
that ran), each setting with one home and one default, and the checks that refuse, by name, a
setting the run would not use.

The window-feature settings live in ``features`` (:class:`detection.features.FeatureSettings`,
shared with the detector's settings), the proposals' in ``proposals``, the train stage's in
``train`` (which is the :class:`~detection.training.detector_training.TrainConfig`), and
``test`` holds only what acts after the SVMs score the windows
(:class:`~detection.detector.DetectionSettings`). The model file records them all
(:func:`detector_settings`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..config import ConfigError, merge, parse_overrides, read_yaml_mapping, to_dict
from ..detector import DetectionSettings, DetectorSettings, check_settings
from ..errors import DetectionError
from ..features.featurizer import FeatureSettings
from ..features.scales import named_scales
from ..training.finetune import FinetuneConfig
from ..proposals import SelectiveSearchConfig
from ..training.detector_training import TrainConfig, refuse_unused_finetune

__all__ = ["DataConfig", "BackboneConfig", "FeatureConfig", "TimingConfig", "PipelineConfig",
           "ConvFinetuneConfig", "embedded_default_overrides", "pipeline_config", "refuse_unused_settings",
           "detector_settings"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    root: str | None = None               # VOC-layout folder; None: generate the synthetic dataset
    train_split: str = "trainval"
    test_split: str = "test"
    flip: bool = True                     # add horizontally flipped training images (paper)
    classes: tuple[str, ...] | None = None
    skip_bad: bool = False                # leave out undecodable images (decided once, for both splits)
    # The generated dataset (data.root null): images per split, seed, the crowded variant
    # (detection.data.synthetic). Refused with data.root.
    synthetic_trainval: int = 120
    synthetic_test: int = 60
    synthetic_seed: int = 0
    synthetic_crowded: bool = False


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    name: str = "zf5"
    weights: str | None = None            # None: seeded random init; a path; or "imagenet"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FeatureConfig(FeatureSettings):
    """The window-feature settings (:class:`FeatureSettings`) and how the conv-map cache is made."""

    fp16: bool = False                    # store the cached maps as float16
    workers: int | None = None            # DataLoader workers decoding images for the cache (None:
                                          # this rank's share of the machine's cores)
    #: Keep the training split's conv maps on disk (the conv-map cache). False: no cache, each
    #: record's maps computed again whenever training pools its windows (the same features; for
    #: datasets whose maps do not fit the disk: docs/pipeline.md, "Without the conv-map cache").
    cache: bool = True


@dataclasses.dataclass(frozen=True)
class ConvFinetuneConfig(FinetuneConfig):
    """Training the conv layers through SPP before the features are cached (beyond the paper, as
    Fast R-CNN does): the embedded default uses it to get useful features without pretrained
    weights. The settings of fc fine-tuning, with the defaults of a short, fast schedule on a
    small head."""

    enabled: bool = False
    iterations: int = 600
    lr: float = 0.01
    lr_steps: tuple[int, ...] = (400,)
    batch_size: int = 64
    images_per_batch: int | None = 2
    hidden: tuple[int, int] = (256, 256)
    checkpoint_every: int = 100
    #: The conv layers' learning rate as a multiple of ``lr`` (the small fc head's).
    conv_lr_mult: float = 1.0


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    enabled: bool = True
    num_images: int = 3
    rcnn_windows: int | None = None       # cap R-CNN's windows per image (None: all proposals)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    method: str = "spp"                   # "spp" or "rcnn"
    device: str = "auto"                  # cuda:LOCAL_RANK when a GPU is visible, else cpu
    data: DataConfig = DataConfig()
    proposals: SelectiveSearchConfig = SelectiveSearchConfig()   # every setting of the windows
    proposal_workers: int | None = None   # selective-search processes (None: this rank's share of
                                          # the machine's cores: cores // processes on it)
    backbone: BackboneConfig = BackboneConfig()
    features: FeatureConfig = FeatureConfig()
    conv_finetune: ConvFinetuneConfig = ConvFinetuneConfig()
    feature_layer: str = "pool5"          # SVM input; fc7 with fine-tuning (paper), pool5 without
    train: TrainConfig = TrainConfig()    # fc fine-tuning, SVMs, box regressors, score calibration
    test: DetectionSettings = DetectionSettings()   # NMS, score threshold, detections per class
    metric: str | None = None             # voc07 / voc10; None: voc07 for VOC2007, else voc10
    timing: TimingConfig = TimingConfig()


def embedded_default_overrides() -> dict[str, Any]:
    """Settings of the no-download default run on the synthetic dataset (2 CPU cores, minutes)."""
    return {
        # AlexNet's trunk (random init) trains through SPP ~10x faster than ZF-5 on a CPU.
        "backbone": {"name": "alexnet", "weights": None},
        "features": {"scales": [400]},
        "conv_finetune": {"enabled": True},
        "metric": "voc07",            # the issue and the paper report VOC2007 11-point AP
        "feature_layer": "pool5",
    }


#: The ``--data`` recipe's scales: shorter sides for training and testing, each window pooled at
#: the one whose resized window area is nearest 224^2 (docs/benchmarks.md, "The `--data` recipe").
DATA_RECIPE_SCALES = (480, 576, 688)
#: The ``--data`` recipe's NMS thresholds, one chosen per data set on the calibration's held-out
#: folds (objects that overlap each other, such as bunches of bananas, need a higher one).
DATA_RECIPE_NMS_CHOICES = (0.3, 0.4, 0.5, 0.6)


def data_default_overrides() -> dict[str, Any]:
    """The recipe of a run on the user's own data (``--data``) where the user names no trunk:
    EfficientNet-Lite0 with the ImageNet weights installed with the package (no download), cut
    after the next block's 1x1 expansion (``efficientnet_lite0_expanded``: 672 channels), three
    scales, SVM C = 0.01 (the weaker regularisation measured better), the NMS threshold chosen
    on the calibration's held-out folds, VOC07 11-point AP (the paper's metric) and no
    SPP-net vs R-CNN timing stage (a benchmark, not part of training a detector). Each step was
    chosen on a validation split of trainval, never on test (docs/benchmarks.md). A trunk named in
    the config file, a flag or an override comes with the plain defaults and its own weights
    (random init unless they are named too); any setting the user writes wins over the recipe."""
    return {
        "backbone": {"name": "efficientnet_lite0_expanded", "weights": "imagenet"},
        "features": {"scales": list(DATA_RECIPE_SCALES)},
        "train": {"svm": {"C": 0.01}, "calibration": {"nms_choices": list(DATA_RECIPE_NMS_CHOICES)}},
        "metric": "voc07",
        "timing": {"enabled": False},
    }


def _names_backbone(*sources: Any) -> bool:
    return any(isinstance(src, dict) and isinstance(src.get("backbone"), dict) and "name" in src["backbone"]
               for src in sources)


def pipeline_config(data: str | None = None, config: str | None = None, overrides: list[str] | None = None,
                    **flags: Any) -> PipelineConfig:
    """The config of ``tools/run_pipeline.py``: defaults (the embedded default's without
    ``data``), then the YAML file ``config``, then the flags (``skip_bad``, ``backbone``,
    ``weights``, ``scales`` as ``named_scales`` reads it, ``method``, ``device``; None: not
    given), then ``key=value`` overrides."""
    cfg = PipelineConfig()
    if data is None:
        cfg = merge(cfg, embedded_default_overrides())
    from_file: Any = {}
    try:
        from_file = read_yaml_mapping(config) if config else {}
    except ConfigError as e:   # say which file holds the unknown key or wrong value
        raise ConfigError(f"config file {config}: {e}") from None
    if data is not None and not (flags.get("backbone") or _names_backbone(from_file, parse_overrides(overrides))):
        cfg = merge(cfg, data_default_overrides())
    if config:
        try:
            cfg = merge(cfg, from_file)
        except ConfigError as e:
            raise ConfigError(f"config file {config}: {e}") from None
    given = {k: v for k, v in flags.items() if v not in (None, False)}
    updates = {"data": {**({"root": data} if data else {}), **({"skip_bad": True} if given.get("skip_bad") else {})},
               "backbone": {k: given[f] for k, f in (("name", "backbone"), ("weights", "weights")) if f in given},
               "features": {"scales": list(named_scales(given["scales"]))} if "scales" in given else {},
               "method": given.get("method"), "device": given.get("device")}
    cfg = merge(cfg, {k: v for k, v in updates.items() if v not in ({}, None)})
    return merge(cfg, parse_overrides(overrides))


#: Settings inside a part that may be switched off which act even then: the fc head's sizes
#: (fc6/fc7 features without fine-tuning come from a head of these sizes).
_USED_WHEN_OFF = {"train.finetune.hidden"}


def _switched_off(node: Any, where: str) -> list[tuple[str, str]]:
    """(setting, switch) for every setting under ``node`` set away from its default inside a
    part whose ``enabled`` is false: a setting of a switched-off part does nothing."""
    found = []
    if not dataclasses.is_dataclass(node):
        return found
    names = [f.name for f in dataclasses.fields(node)]
    if "enabled" in names and node.enabled is False:
        default = to_dict(type(node)())
        for key, value in to_dict(node).items():
            if key != "enabled" and f"{where}{key}" not in _USED_WHEN_OFF and value != default[key]:
                found.append((f"{where}{key}", f"{where}enabled"))
        return found
    for name in names:
        found += _switched_off(getattr(node, name), f"{where}{name}.")
    return found


def refuse_unused_settings(cfg: PipelineConfig) -> None:
    """ConfigError naming the first setting the run would ignore or cannot use."""
    for key, switch in _switched_off(cfg, ""):
        raise ConfigError(f"{key} is set, but {switch}=false: that part does not run, so the setting would do "
                          f"nothing; remove it or set {switch}=true")
    if cfg.data.root is not None:
        default = DataConfig()
        for f in dataclasses.fields(DataConfig):
            if f.name.startswith("synthetic_") and getattr(cfg.data, f.name) != getattr(default, f.name):
                raise ConfigError(f"data.{f.name} applies to the generated dataset only; it cannot be set with "
                                  f"data.root ({cfg.data.root})")
    try:
        cfg.train.calibration.validate()  # before any stage runs: the calibration comes after the SVMs
    except DetectionError as e:
        raise ConfigError(f"train.{e}") from None
    if cfg.train.calibration.nms_choices and cfg.test.nms_iou != DetectionSettings().nms_iou:
        raise ConfigError(f"test.nms_iou={cfg.test.nms_iou} is set, but train.calibration.nms_choices="
                          f"{list(cfg.train.calibration.nms_choices)} chooses the NMS threshold on the held-out folds: "
                          f"set train.calibration.nms_choices=[] to keep test.nms_iou, or leave test.nms_iou unset")
    refuse_unused_finetune(cfg.feature_layer, cfg.train.finetune, "train.")
    if cfg.feature_layer == "pool5" and cfg.train.finetune.hidden != FinetuneConfig().hidden:
        raise ConfigError("train.finetune.hidden sizes fc6/fc7, but the SVMs read pool5 (feature_layer=pool5) "
                          "and the model has no fc layer: leave it unset or set feature_layer=fc7")
    if cfg.method == "rcnn" and cfg.features.fp16:
        # R-CNN warps every window through the trunk: no conv-map cache is made, so nothing is
        # stored as float16. (features.workers, a process count that changes no result, is left
        # alone so one config serves both methods.)
        raise ConfigError("features.fp16 sets up the conv-map cache, which method=rcnn does not make: "
                          "leave it unset or use method=spp")
    if not cfg.features.cache:
        # (features.workers, which decode images for the cache only, is left alone as for rcnn.)
        if cfg.method == "rcnn":
            raise ConfigError("features.cache=false turns off the conv-map cache, which method=rcnn does not make: "
                              "leave it unset or use method=spp")
        if cfg.features.fp16:
            raise ConfigError("features.fp16 stores the cached conv maps as float16, but features.cache=false keeps "
                              "no maps: set one of them back")
    try:
        check_settings(detector_settings(cfg))
    except ValueError as e:
        raise ConfigError(f"features / test settings: {e}") from None


def detector_settings(cfg: PipelineConfig) -> DetectorSettings:
    """The settings the trained detector stores, each from its one home: the window features from
    ``features``, the proposals from ``proposals``, ``method`` and ``feature_layer``, and the
    post-processing from ``test``."""
    return DetectorSettings(**dataclasses.asdict(cfg.features.feature_settings()),
                            **dataclasses.asdict(cfg.test), method=cfg.method, feature_layer=cfg.feature_layer,
                            proposals=cfg.proposals)
