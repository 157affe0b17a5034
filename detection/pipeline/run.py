"""The whole pipeline in one call: proposals -> conv features -> (fine-tuning) -> SVMs + box
regressors -> detection on the test split -> evaluation -> the R-CNN timing comparison -> report.

Every stage writes its artifact under ``OUT`` and is skipped on a rerun when the artifact exists
and was made with the same settings (each stage records a hash of the settings it depends on).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import time
from pathlib import Path
from typing import Any

from .. import comm
from ..backbones import build_backbone
from ..config import save_config, to_dict
from ..data.synthetic import make_synthetic_voc
from ..data.voc import VOCDataset, report_images
from ..detector import SPPDetector
from ..evaluation import detections_by_class, write_result_files
from ..evaluation.inference import detect_records
from ..evaluation.reliability import calibration_report
from ..evaluation.split import score_split
from ..features.featurizer import RecomputedSPPFeaturizer, training_featurizer
from ..features.pooling import pool5_dim
from ..io.files import make_dirs
from ..io.jsonfile import read_json, write_json
from ..proposals import compute_proposals
from ..report import write_report
from ..runtime import resolve_device, resource_plan
from ..timer import StageAccount
from ..timing import compare_on_records
from ..training.detector_training import check_train_memory, train_detector
from .config import PipelineConfig, detector_settings, refuse_unused_settings
from .conv_finetune import finetune_conv
from .stages import StageBook, stage_keys

__all__ = ["run_pipeline"]

log = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and return the metrics dict.

    Writes ``OUT/config.yaml`` (resolved config), ``OUT/model.pt``, ``OUT/results/``,
    ``OUT/metrics.json``, ``OUT/timing.json``, ``OUT/report.md`` and the stage caches.

    Under ``torchrun`` (``docs/distributed.md``) the per-image stages (proposals, conv maps,
    detection) are shared out by image, fine-tuning by window (or image), and the SVMs and box
    regressors by class; rank 0 writes every shared artifact, evaluates, times and reports, and
    every rank returns the metrics. Each rank writes its wall and CPU seconds per stage of this
    run to ``OUT/accounting/rank<k>.json`` (:class:`~detection.timer.StageAccount`).
    """

    refuse_unused_settings(cfg)
    out = Path(out)
    device = resolve_device(cfg.device)
    comm.init_distributed(device)
    make_dirs(out)
    if comm.is_main():
        save_config(cfg, out / "config.yaml")
    stages = StageBook(out)
    timings: dict[str, float] = {}
    # Threads (set by the tool) and workers: this rank's share of the machine's cores.
    plan = resource_plan(cfg.features.workers, cfg.proposal_workers)
    for r, rank_plan in enumerate(comm.all_gather(plan, "resources: exchanging each rank's threads and workers")):
        log.info("rank %d: %s", r, rank_plan.describe())
    account = StageAccount(out / "accounting" / f"rank{comm.rank()}.json",
                           {"rank": comm.rank(), "world_size": comm.world_size(), "host": socket.gethostname(),
                            "resources": dataclasses.asdict(plan)})

    # 1. data -----------------------------------------------------------------------------------
    with account.stage("data"):
        root = cfg.data.root
        if root is None:
            root = str(out / "synthetic_voc")
            if comm.is_main():
                make_synthetic_voc(root, num_trainval=cfg.data.synthetic_trainval, num_test=cfg.data.synthetic_test,
                                   seed=cfg.data.synthetic_seed, crowded=cfg.data.synthetic_crowded)
            comm.barrier("data: waiting for rank 0 to write the synthetic dataset")
        train_ds = VOCDataset(root, cfg.data.train_split, classes=cfg.data.classes, use_flipped=cfg.data.flip,
                              skip_bad=cfg.data.skip_bad)
        test_ds = VOCDataset(root, cfg.data.test_split, classes=train_ds.classes, skip_bad=cfg.data.skip_bad)
    if cfg.data.root is None:
        timings["data"] = account.wall("data")
    classes = train_ds.classes
    log.info("data: %s, %d training records, %d test images, classes %s", root, len(train_ds), len(test_ds), classes)

    # The train stage's memory, checked before anything runs: the worst case its settings allow.
    backbone = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, seed=cfg.backbone.seed)
    tcfg = cfg.train
    settings = detector_settings(cfg)
    keys = stage_keys(cfg)
    pool5 = pool5_dim(backbone.out_channels, settings.levels)
    layer_dim = pool5 if cfg.feature_layer == "pool5" else tcfg.finetune.hidden[1 if cfg.feature_layer == "fc7" else 0]
    windows = cfg.proposals.max_boxes if tcfg.max_train_windows is None else min(cfg.proposals.max_boxes,
                                                                                   tcfg.max_train_windows)
    need = check_train_memory(tcfg, len(classes), pool5, layer_dim,
                              windows + max((len(r.boxes) for r in train_ds.records), default=0), prefix="train.",
                              world=comm.world_size(), local_ranks=comm.local_world_size())
    log.info("train stage memory per process, worst case and budget: %s GB",
             {k: None if v is None else round(v, 2) for k, v in need.items()})

    # 2. proposals ------------------------------------------------------------------------------
    with account.stage("proposals"):
        ss = dict(num_workers=plan.proposal_workers, progress=progress)
        train_props = compute_proposals(train_ds, out / "proposals", cfg.proposals, **ss)
        test_props = compute_proposals(test_ds, out / "proposals", cfg.proposals, **ss)
    timings["proposals"] = account.wall("proposals")

    # 3. conv fine-tuning through SPP (optional) -------------------------------------------------
    if cfg.conv_finetune.enabled:
        with account.stage("conv_finetune"):
            finetune_conv(cfg, keys["conv_finetune"], backbone, train_ds, train_props, out / "conv_finetune", stages,
                          progress)
        timings["conv_finetune"] = account.wall("conv_finetune")

    # 4. conv maps of the training split (SPP-net) --------------------------------------------------
    with account.stage("features"):
        featurizer = training_featurizer(cfg.method, settings, train_ds, backbone, out / "features",
                                         fp16=cfg.features.fp16, num_workers=plan.loader_workers, device=device,
                                         progress=progress, cache=cfg.features.cache)
    timings["features"] = account.wall("features")
    if isinstance(featurizer, RecomputedSPPFeaturizer):
        log.info("features.cache=false: no conv-map cache; each record's maps are computed whenever training "
                 "pools its windows")

    # 5. fc fine-tuning, SVMs, box regressors -> model.pt ------------------------------------------
    model_path = out / "model.pt"
    model_meta = {"config": to_dict(cfg), "dataset": {"root": str(root), "split": train_ds.split}}
    # The detection settings (test.*) key this stage only when the score calibration is fitted
    # (through them); without it, changing them re-detects without retraining.
    train_key = keys["train"]
    with account.stage("train"):
        if not stages.done("train", train_key, model_path):
            t0 = time.perf_counter()
            # The SVMs and each box regressor are checkpointed as they finish: a crash or kill in
            # box regression keeps the SVMs, and the rerun continues (train_parts: all they depend on).
            detector = train_detector(train_ds.records, classes, train_props.proposals_for_record, backbone,
                                      featurizer, pool5, settings, tcfg, out_dir=out, progress=progress,
                                      finetune_pool5_fn=featurizer.finetune_fn(train_ds.records),
                                      checkpoint_key=keys["train_parts"])
            if isinstance(featurizer, RecomputedSPPFeaturizer):
                # The compute the cache would have saved, in conv passes (docs/pipeline.md).
                log.info("train stage without the conv-map cache: %d conv passes for %d training records (%.2f "
                         "per record) on rank %d", featurizer.conv_passes, len(train_ds.records),
                         featurizer.conv_passes / max(1, len(train_ds.records)), comm.rank())
            if comm.is_main():
                # train_checkpoint/ is kept: a change of the calibration's settings (test.*,
                # train.calibration.*) refits the calibration alone from the SVMs and regressors there.
                detector.save(model_path, model_meta)
            stages.mark("train", train_key, time.perf_counter() - t0)
            comm.barrier("train: waiting for rank 0 to write the model file")
        timings["train"] = stages.state["train"]["seconds"]
        detector = SPPDetector.from_file(model_path, device=device)
        if cfg.train.calibration.nms_choices:
            # The train stage chose the NMS threshold on its held-out folds: the model's is the one.
            settings = dataclasses.replace(settings, nms_iou=detector.settings.nms_iou)
        if detector.settings != settings:
            # Only test.* can differ (the rest keys the train stage): the model file keeps the
            # settings this run detects with (eval_voc.py --model reads them).
            detector.settings = settings
            if comm.is_main():
                detector.save(model_path, model_meta)

    # 6. detection on the test split -> result files ---------------------------------------------
    results_dir = out / "results"
    det_key = keys["detect"]
    with account.stage("detect"):
        if not stages.done("detect", det_key, results_dir):
            t0 = time.perf_counter()
            all_dets = detect_records(detector, test_ds.records, test_props.proposals_for_record, progress)
            if comm.is_main():      # the detections of every rank, gathered in image order
                write_result_files(results_dir, test_ds.split, classes,
                                   _per_class(all_dets, test_ds.records, len(classes)))
                # How well the probabilities match how often the detections are right, on this split.
                kept = [r for r in test_ds.records if not r.flipped]
                write_json(out / "calibration.json", calibration_report(kept, all_dets)
                           if detector.calibration is not None else {})
            stages.mark("detect", det_key, time.perf_counter() - t0,
                        seconds_per_image=(time.perf_counter() - t0) / max(1, len(test_ds)))
    if not comm.is_main():
        # Rank 0 alone evaluates, times and reports (from the files it wrote): its wait is
        # billed to the stage it waits on.
        with account.stage("evaluate"):
            return comm.broadcast(None, "evaluation: waiting for rank 0's metrics")
    timings["detect"] = stages.state["detect"]["seconds"]

    # 7. evaluation --------------------------------------------------------------------------------
    with account.stage("evaluate"):
        metrics = score_split(test_ds, results_dir, metric=cfg.metric, coco=True, plots=out / "pr_curves")
        metrics["stage_seconds"] = {k: round(v, 2) for k, v in timings.items()}
        metrics["untrained_classes"] = list(detector.svms.meta.get("untrained", []))
        metrics["nms_iou"] = detector.settings.nms_iou
        if detector.calibration is not None and "nms" in detector.calibration.meta:
            metrics["nms_choice"] = detector.calibration.meta["nms"]   # the held-out mAP of each choice
        calibration = read_json(out / "calibration.json") if (out / "calibration.json").is_file() else {}
        if calibration:
            metrics["calibration"] = calibration
        write_json(out / "metrics.json", metrics)

    # 8. timing: SPP-net against R-CNN -------------------------------------------------------------
    timing = None
    if cfg.timing.enabled:
        timing_key = keys["timing"]
        with account.stage("timing"):
            if not stages.done_here("timing", timing_key, out / "timing.json"):     # rank 0 alone from here
                t0 = time.perf_counter()
                timing = compare_on_records(detector, test_ds.records[: cfg.timing.num_images],
                                            test_props.proposals_for_record, cfg.timing.rcnn_windows)
                write_json(out / "timing.json", timing)
                stages.mark("timing", timing_key, time.perf_counter() - t0)
            timing = read_json(out / "timing.json")

    # 9. report ------------------------------------------------------------------------------------
    with account.stage("report"):
        write_report(out, metrics, timing, test_ds, detector, test_props.proposals_for_record)
        report_images(train_ds, test_ds)
        return comm.broadcast(metrics, "evaluation: sending the metrics to every rank")


def _per_class(all_dets, records, num_classes: int):
    """Per-image detections -> per class (image ids, scores, boxes) for the result files."""
    return detections_by_class([r.image_id for r in records], all_dets, num_classes)
