"""The whole pipeline in one call: proposals -> conv features -> (fine-tuning) -> SVMs + box
regressors -> detection on the test split -> evaluation -> the R-CNN timing comparison -> report.

Every stage writes its artifact under ``OUT`` and is skipped on a rerun when the artifact exists
and was made with the same settings (each stage records a hash of the settings it depends on).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import build_backbone
from .calibration import calibration_report
from .training.calibration import CalibrationConfig
from .config import ConfigError, save_config, to_dict
from .data.synthetic import make_synthetic_voc
from .data.images import load_image
from .data.voc import VOCDataset, report_images
from .detector import DETECTION_ONLY_SETTINGS, DetectorSettings, SPPDetector, iter_detections
from .errors import CacheError, DetectionError
from .evaluation import default_metric, detections_by_class, evaluate_result_dir, write_result_files
from .features import extract_conv_maps, pooled_window_features
from .finetune import FinetuneConfig, finetune, label_windows
from .heads import FCHead
from .io import atomic_torch_save, make_dirs, read_json, settings_key, write_json
from .proposals import SelectiveSearchConfig, compute_proposals
from .report import write_report
from .runtime import resolve_device
from .spp import DEFAULT_LEVELS, DEFAULT_MAX_SIZE, DEFAULT_SCALES_1, scale_factors
from .timing import compare_methods, rcnn_twin
from .train import rcnn_pool5_fn, spp_pool5_fn
from .training.bbox_regression import BBoxRegressionConfig
from .training.detector_training import TrainConfig, check_train_memory, refuse_unused_finetune, train_detector
from .training.svm import SVMConfig

__all__ = ["DataConfig", "BackboneConfig", "FeatureConfig", "ConvFinetuneConfig",
           "TimingConfig", "PipelineConfig", "run_pipeline", "embedded_default_overrides"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    root: str | None = None               # VOC-layout folder; None: generate the synthetic dataset
    train_split: str = "trainval"
    test_split: str = "test"
    flip: bool = True                     # add horizontally flipped training images (paper)
    classes: tuple[str, ...] | None = None
    skip_bad: bool = False                # leave out undecodable images (decided once, for both splits)
    synthetic_trainval: int = 120
    synthetic_test: int = 60
    synthetic_seed: int = 0
    synthetic_crowded: bool = False       # the crowded variant (detection.data.synthetic)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    name: str = "zf5"
    weights: str | None = None            # None: seeded random init; a path; or "imagenet"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    scales: tuple[int, ...] = DEFAULT_SCALES_1   # 1-scale; 5-scale: spp.DEFAULT_SCALES_5
    max_size: int = DEFAULT_MAX_SIZE
    fp16: bool = False
    levels: tuple[int, ...] = DEFAULT_LEVELS
    projection_rule: str = "paper"
    workers: int = 2


@dataclasses.dataclass(frozen=True)
class ConvFinetuneConfig:
    """Training the conv layers through SPP before the features are cached (beyond the paper,
    as Fast R-CNN does). The embedded default uses it to get useful features without any
    pretrained weights."""

    enabled: bool = False
    iterations: int = 600
    lr: float = 0.01
    lr_steps: tuple[int, ...] = (400,)
    images_per_batch: int = 2
    batch_size: int = 64
    hidden: tuple[int, int] = (256, 256)
    seed: int = 0


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
    proposal_workers: int | None = None   # selective-search processes (None: all cores)
    backbone: BackboneConfig = BackboneConfig()
    features: FeatureConfig = FeatureConfig()
    conv_finetune: ConvFinetuneConfig = ConvFinetuneConfig()
    finetune: FinetuneConfig = FinetuneConfig(enabled=False)
    feature_layer: str = "pool5"          # SVM input; fc7 with fine-tuning (paper), pool5 without
    svm: SVMConfig = SVMConfig()
    bbox_regression: bool = True
    bbox: BBoxRegressionConfig = BBoxRegressionConfig()
    max_train_windows: int | None = None
    #: GB for the train stage's large arrays; see detection.training.detector_training.TrainConfig
    #: .memory_gb (checked before the first stage runs). null: no check.
    memory_gb: float | None = 8.0
    calibration: CalibrationConfig = CalibrationConfig()   # probabilities for the SVM scores
    test: DetectorSettings = DetectorSettings()
    metric: str | None = None             # voc07 / voc10; None: voc07 for VOC2007, else voc10
    timing: TimingConfig = TimingConfig()
    seed: int = 0


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


# ----------------------------------------------------------------------------------------------


class _Stages:
    """Book-keeping of which stages are done, with which settings (``OUT/stages.json``)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.state: dict[str, Any] = {}
        if self.path.exists():
            try:
                state = read_json(self.path)
                if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
                    raise CacheError(f"{self.path}: not a stage book (expected {{stage: {{key, ...}}}})")
                self.state = state
            except CacheError as e:
                # Only book-keeping: every stage's own cache is validated on its own, so forgetting
                # which are done costs their checks (and any stage whose artifact is missing).
                log.warning("%s; treating every stage as not done", e)

    def done(self, name: str, key: str, *artifacts: Path) -> bool:
        return self.state.get(name, {}).get("key") == key and all(p.exists() for p in artifacts)

    def mark(self, name: str, key: str, seconds: float, **info: Any) -> None:
        self.state[name] = {"key": key, "seconds": round(seconds, 3), **info}
        write_json(self.path, self.state)


def _key(*parts: Any) -> str:
    return settings_key({"parts": [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]})


def run_pipeline(cfg: PipelineConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the metrics dict.

    Writes ``OUT/config.yaml`` (resolved config), ``OUT/model.pt``, ``OUT/results/``,
    ``OUT/metrics.json``, ``OUT/timing.json``, ``OUT/report.md`` and the stage caches.
    """

    _refuse_shadowed_test_settings(cfg)
    refuse_unused_finetune(cfg.feature_layer, cfg.finetune)
    out = Path(out)
    make_dirs(out)
    save_config(cfg, out / "config.yaml")
    stages = _Stages(out)
    timings: dict[str, float] = {}

    # 1. data -----------------------------------------------------------------------------------
    root = cfg.data.root
    if root is not None and cfg.data.synthetic_crowded:
        raise DetectionError("data.synthetic_crowded applies to the generated dataset only; it cannot be set "
                             f"with data.root ({root})")
    if root is None:
        t0 = time.perf_counter()
        root = str(make_synthetic_voc(out / "synthetic_voc", num_trainval=cfg.data.synthetic_trainval,
                                      num_test=cfg.data.synthetic_test, seed=cfg.data.synthetic_seed,
                                      crowded=cfg.data.synthetic_crowded))
        timings["data"] = time.perf_counter() - t0
    train_ds = VOCDataset(root, cfg.data.train_split, classes=cfg.data.classes, use_flipped=cfg.data.flip,
                          skip_bad=cfg.data.skip_bad)
    test_ds = VOCDataset(root, cfg.data.test_split, classes=train_ds.classes, skip_bad=cfg.data.skip_bad)
    classes = train_ds.classes
    log.info("data: %s, %d training records, %d test images, classes %s", root, len(train_ds), len(test_ds), classes)

    # The train stage's memory, checked before anything runs: the worst case its settings allow.
    device = resolve_device(cfg.device)
    backbone = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, seed=cfg.backbone.seed)
    tcfg = TrainConfig(finetune=cfg.finetune, svm=cfg.svm, bbox=cfg.bbox, bbox_regression=cfg.bbox_regression,
                       max_train_windows=cfg.max_train_windows, seed=cfg.seed, memory_gb=cfg.memory_gb,
                       calibration=cfg.calibration)
    pool5_dim = backbone.out_channels * sum(n * n for n in cfg.features.levels)
    layer_dim = pool5_dim if cfg.feature_layer == "pool5" else cfg.finetune.hidden[1 if cfg.feature_layer == "fc7" else 0]
    windows = cfg.proposals.max_boxes if cfg.max_train_windows is None else min(cfg.proposals.max_boxes,
                                                                                  cfg.max_train_windows)
    need = check_train_memory(tcfg, len(classes), pool5_dim, layer_dim,
                              windows + max((len(r.boxes) for r in train_ds.records), default=0))
    log.info("train stage memory, worst case: %s GB (memory_gb=%s)",
             {k: None if v is None else round(v, 2) for k, v in need.items()}, cfg.memory_gb)

    # 2. proposals ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ss = dict(num_workers=cfg.proposal_workers, progress=progress)
    train_props = compute_proposals(train_ds, out / "proposals", cfg.proposals, **ss)
    test_props = compute_proposals(test_ds, out / "proposals", cfg.proposals, **ss)
    timings["proposals"] = time.perf_counter() - t0

    # 3. conv fine-tuning through SPP (optional) -------------------------------------------------
    if cfg.conv_finetune.enabled:
        t0 = time.perf_counter()
        _finetune_conv(cfg, backbone, train_ds, train_props, out / "conv_finetune", stages, progress)
        timings["conv_finetune"] = time.perf_counter() - t0

    # 4. conv maps of the training split ---------------------------------------------------------
    settings = dataclasses.replace(cfg.test, method=cfg.method, scales=tuple(cfg.features.scales),
                                   max_size=cfg.features.max_size, levels=tuple(cfg.features.levels),
                                   projection_rule=cfg.features.projection_rule, feature_layer=cfg.feature_layer,
                                   proposals=cfg.proposals)
    t0 = time.perf_counter()
    if cfg.method == "spp":
        cache = extract_conv_maps(train_ds, backbone, out / "features", scales=settings.scales,
                                  max_size=settings.max_size, fp16=cfg.features.fp16, device=device,
                                  num_workers=cfg.features.workers, progress=progress)
        pool5_fn = spp_pool5_fn(cache, settings)

        def finetune_fn(i: int, boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            # The SPP code's multi-scale fine-tuning: a random scale per window.
            return cache.window_features(train_ds.records[i], boxes, levels=settings.levels,
                                         rule=settings.projection_rule, scale_rule="random", generator=g)
    elif cfg.method == "rcnn":
        pool5_fn = rcnn_pool5_fn(backbone, settings.levels, settings.rcnn_batch_size, device)
        finetune_fn = None
    else:
        raise DetectionError(f"unknown method {cfg.method!r}: use spp or rcnn")
    timings["features"] = time.perf_counter() - t0

    # 5. fc fine-tuning, SVMs, box regressors -> model.pt ------------------------------------------
    model_path = out / "model.pt"
    model_meta = {"config": to_dict(cfg), "dataset": {"root": str(root), "split": train_ds.split}}
    # Settings that only act at detection time (NMS, thresholds) key the detect stage, not this one:
    # changing them re-detects without retraining.
    train_settings = {k: v for k, v in to_dict(settings).items() if k not in DETECTION_ONLY_SETTINGS}
    train_key = _key(cfg.method, cfg.data, cfg.proposals, cfg.backbone, cfg.features, cfg.conv_finetune,
                     cfg.finetune, cfg.feature_layer, cfg.svm, cfg.bbox_regression, cfg.bbox,
                     cfg.max_train_windows, cfg.calibration, train_settings)
    if not stages.done("train", train_key, model_path):
        t0 = time.perf_counter()
        # The SVMs and each box regressor are checkpointed as they finish: a crash or kill in box
        # regression keeps the SVMs, and the rerun continues (train_key: everything they depend on).
        detector = train_detector(train_ds.records, classes, train_props.proposals_for_record, backbone, pool5_fn,
                                  pool5_dim, settings, tcfg, out_dir=out, progress=progress,
                                  finetune_pool5_fn=finetune_fn, checkpoint_key=train_key)
        detector.save(model_path, model_meta)
        stages.mark("train", train_key, time.perf_counter() - t0)
        shutil.rmtree(out / "train_checkpoint", ignore_errors=True)    # model.pt holds it all now
    timings["train"] = stages.state["train"]["seconds"]
    detector = SPPDetector.from_file(model_path, device=device)
    detection_settings = {k: getattr(settings, k) for k in DETECTION_ONLY_SETTINGS}
    if any(getattr(detector.settings, k) != v for k, v in detection_settings.items()):
        # The model file keeps the settings this run detects with (eval_voc.py --model reads them).
        detector.settings = dataclasses.replace(detector.settings, **detection_settings)
        detector.save(model_path, model_meta)

    # 6. detection on the test split -> result files ---------------------------------------------
    results_dir = out / "results"
    det_key = _key(train_key, cfg.data.test_split, detection_settings)
    if not stages.done("detect", det_key, results_dir):
        t0 = time.perf_counter()
        all_dets = [dets for _, _, dets in iter_detections(detector, test_ds.records,
                                                            test_props.proposals_for_record, progress)]
        write_result_files(results_dir, test_ds.split, classes, _per_class(all_dets, test_ds.records, len(classes)))
        # How well the probabilities match how often the detections are right, on this split.
        kept = [r for r in test_ds.records if not r.flipped]
        write_json(out / "calibration.json", calibration_report(kept, all_dets)
                   if detector.calibration is not None else {})
        stages.mark("detect", det_key, time.perf_counter() - t0, seconds_per_image=(time.perf_counter() - t0) / max(1, len(test_ds)))
    timings["detect"] = stages.state["detect"]["seconds"]

    # 7. evaluation --------------------------------------------------------------------------------
    metrics = evaluate_results(test_ds, results_dir, cfg.metric, out)
    metrics["stage_seconds"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["untrained_classes"] = list(detector.svms.meta.get("untrained", []))
    calibration = read_json(out / "calibration.json") if (out / "calibration.json").is_file() else {}
    if calibration:
        metrics["calibration"] = calibration
    write_json(out / "metrics.json", metrics)

    # 8. timing: SPP-net against R-CNN -------------------------------------------------------------
    timing = None
    if cfg.timing.enabled:
        timing_key = _key(train_key, cfg.timing)
        if not stages.done("timing", timing_key, out / "timing.json"):
            t0 = time.perf_counter()
            timing = compare_on_records(detector, test_ds.records[: cfg.timing.num_images],
                                        test_props.proposals_for_record, cfg.timing.rcnn_windows)
            write_json(out / "timing.json", timing)
            stages.mark("timing", timing_key, time.perf_counter() - t0)
        timing = read_json(out / "timing.json")

    # 9. report ------------------------------------------------------------------------------------
    write_report(out, metrics, timing, test_ds, detector, test_props.proposals_for_record)
    report_images(train_ds, test_ds)
    return metrics


#: Detector settings whose value comes from a training setting (the features the SVMs were
#: trained on): ``test.<key>`` cannot differ from it, so setting it is refused by name.
_TEST_SETTINGS_FROM_TRAINING = {"method": "method", "scales": "features.scales", "max_size": "features.max_size",
                                "levels": "features.levels", "projection_rule": "features.projection_rule",
                                "feature_layer": "feature_layer", "proposals": "proposals"}


def _refuse_shadowed_test_settings(cfg: PipelineConfig) -> None:
    default = DetectorSettings()
    for key, home in _TEST_SETTINGS_FROM_TRAINING.items():
        if getattr(cfg.test, key) != getattr(default, key):
            raise ConfigError(f"test.{key} cannot be set: detection uses the features the SVMs were trained on, "
                              f"so it takes {home}; set {home} instead")


def _per_class(all_dets, records, num_classes: int):
    """Per-image detections -> per class (image ids, scores, boxes) for the result files."""
    return detections_by_class([r.image_id for r in records], all_dets, num_classes)


def evaluate_results(dataset, results_dir: Path, metric: str | None, out: Path) -> dict[str, Any]:
    metric = metric or default_metric(dataset.root)
    metrics = evaluate_result_dir(dataset, results_dir, metric=metric, coco=True)
    try:
        from .evaluation.plots import plot_pr_curves
        plot_pr_curves(metrics, out / "pr_curves")
    except Exception as e:  # pictures are a nicety; never lose the metrics over them
        log.warning("could not draw PR curves: %s", e)
    return metrics


def compare_on_records(detector: SPPDetector, records, proposals_fn, rcnn_windows: int | None = None) -> dict[str, Any]:
    """SPP-net vs R-CNN timing with the trained model's head/SVMs on a few test images."""

    images = [load_image(r) for r in records]
    props = [np.asarray(proposals_fn(r), np.float32) for r in records]
    if rcnn_windows is not None:
        props = [p[:rcnn_windows] for p in props]
    return compare_methods(detector, rcnn_twin(detector), images, props)


def _finetune_conv(cfg: PipelineConfig, backbone, train_ds, train_props, work: Path, stages: _Stages,
                   progress: bool) -> None:
    """Train the conv trunk (with a small fc head) through SPP on the training windows, then keep
    the trunk. Resumable through the fine-tuning checkpoint; skipped when already done."""
    from tqdm.auto import tqdm


    c = cfg.conv_finetune
    key = _key(cfg.data, cfg.proposals, cfg.backbone, cfg.features, c)
    trunk_path = work / "trunk.pt"
    if stages.done("conv_finetune", key, trunk_path):
        try:
            state = torch.load(trunk_path, map_location="cpu", weights_only=True)
            copy.deepcopy(backbone.trunk).load_state_dict(state)   # check it fits before touching the trunk
        except Exception as e:  # noqa: BLE001 - any unreadable file: redo the stage, do not crash
            log.warning("%s cannot be read (%s): training the conv layers again", trunk_path,
                        " ".join(str(e).split())[:200] or type(e).__name__)
        else:
            backbone.trunk.load_state_dict(state)
            backbone.weights_id = f"finetuned:{key}"
            return
    t0 = time.perf_counter()
    fcfg = FinetuneConfig(iterations=c.iterations, lr=c.lr, lr_steps=c.lr_steps, batch_size=c.batch_size,
                          images_per_batch=c.images_per_batch, hidden=c.hidden, finetune_conv=True,
                          checkpoint_every=100, seed=c.seed)
    records = train_ds.records
    windows = [label_windows(r, train_props.proposals_for_record(r), fcfg) for r in records]
    images: dict[int, np.ndarray] = {}
    levels = tuple(cfg.features.levels)
    scales = tuple(cfg.features.scales)

    def pooled(i: int, boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if i not in images:  # decoded once: the training set is small when this stage is used
            images[i] = load_image(records[i])
        image = images[i]
        factors = scale_factors(image.shape[0], image.shape[1], scales, cfg.features.max_size)
        k = int(torch.randint(len(factors), (1,), generator=g))
        fmap = backbone.trunk(backbone.preprocess(image, factors[k]))[0]
        return pooled_window_features([fmap], [factors[k]], boxes, backbone.stride, levels,
                                      cfg.features.projection_rule, scale_index=torch.zeros(len(boxes), dtype=torch.long),
                                      first_cell_center=float(backbone.first_cell_center))

    gen = torch.Generator().manual_seed(c.seed)
    head = FCHead(backbone.out_channels * sum(n * n for n in levels), c.hidden, num_classes=len(train_ds.classes),
                  dropout=0.5, generator=gen)
    make_dirs(work)
    bar = tqdm(total=c.iterations, desc="fine-tune conv", disable=not progress)
    losses = finetune(head, windows, pooled, fcfg, checkpoint=work / "checkpoint.pt", trunk=backbone.trunk,
                      checkpoint_key=f"conv:{key}:{backbone.name}:{backbone.weights_id}",
                      progress=lambda it, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.3f}"))
    bar.close()
    atomic_torch_save(trunk_path, backbone.trunk.state_dict())
    backbone.weights_id = f"finetuned:{key}"
    stages.mark("conv_finetune", key, time.perf_counter() - t0,
                first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
