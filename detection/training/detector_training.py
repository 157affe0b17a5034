"""The train stage: (fc fine-tuning) -> SVMs -> box regressors, from pooled window features.

The features of a window are always computed from the conv-map cache (SPP-net) or from warped
crops (R-CNN) when they are needed, one image at a time (:class:`detection.training.window_source.WindowFeatureSource`),
so memory is bounded by one block of images' windows plus one class being retrained (the SVMs'
positives and hard negatives are on disk, ``out_dir/svm_cache/``), never by the size of the
dataset or the number of classes. The stage's worst-case memory is checked before anything runs
against a budget taken from the machine's available memory (:func:`check_train_memory`,
:func:`memory_budget_gb`), and its progress is checkpointed per step (:class:`TrainCheckpoint`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import comm
from ..backbones import Backbone
from ..config import ConfigError
from ..data.records import ImageRecord
from ..detector import DetectorSettings, SPPDetector, class_boxes
from ..errors import DetectionError, ModelError
from .finetune import FinetuneConfig, finetune, label_windows
from ..heads import FCHead
from ..io.files import atomic_torch_save, load_verified_torch
from ..calibration import ScoreCalibration
from ..linear import LinearSVMs
from .window_source import Pool5Fn, WindowFeatureSource
from .bbox_regression import (BBoxRegressionConfig, ClassRegressor, assemble_box_regressors, fit_box_regressors,
                              plan_regression_samples)
from .calibration import CalibrationConfig, fit_calibration
from .hard_negatives import train_svms
from .ridge import regression_memory_bytes
from .samples import ImageSample, Ranks, compute_feature_scale
from .svm import SVMConfig, svm_memory_bytes

__all__ = ["TrainConfig", "check_train_memory", "memory_budget_gb", "available_memory_bytes", "AUTO_MEMORY_FRACTION",
           "refuse_unused_finetune", "train_detector", "TrainCheckpoint", "regression_sources"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The train stage's settings: the one home of each (the pipeline's ``train.*``, the
    ``--set`` keys of ``tools/train_svm.py``)."""

    finetune: FinetuneConfig = FinetuneConfig(enabled=False)
    svm: SVMConfig = SVMConfig()
    bbox: BBoxRegressionConfig = BBoxRegressionConfig()
    #: Cap on proposals per training image used for the SVMs (None: all). R-CNN's crops are costly.
    max_train_windows: int | None = None
    #: Seeds the fc head's initial weights (fc6, fc7, fc8); fine-tuning's mini-batches, scales and
    #: dropout draw from ``finetune.seed``, the SVMs' and regressors' samples from their own seeds.
    head_seed: int = 0
    #: Budget in GB of each process for the large arrays of this stage (one SVM retraining and one
    #: mining block, each box regressor's samples and solve), checked before training starts
    #: (:func:`check_train_memory`) and again per class before box regression reads features.
    #: None: AUTO_MEMORY_FRACTION of the machine's available memory (MemAvailable), divided among
    #: the processes torchrun started on this machine (:func:`memory_budget_gb`).
    memory_gb: float | None = None
    #: Probabilities for the SVM scores (detection.calibration): cross-fitted Platt scaling.
    calibration: CalibrationConfig = CalibrationConfig()


#: Share of the machine's available memory the train stage budgets when ``memory_gb`` is not set:
#: the rest is for the process's libraries (~1 GB), one image's conv maps and the file cache.
AUTO_MEMORY_FRACTION = 0.8
#: The budget when the available memory cannot be read (neither /proc/meminfo nor sysconf).
FALLBACK_MEMORY_GB = 8.0


def available_memory_bytes(meminfo: str | os.PathLike = "/proc/meminfo") -> int | None:
    """Memory the machine can give without swapping: ``MemAvailable`` of ``/proc/meminfo``
    (Linux); elsewhere the free physical pages ``os.sysconf`` reports; None when neither is known."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget_gb(memory_gb: float | None, local_ranks: int = 1, available: int | None = None,
                     prefix: str = "") -> tuple[float, str]:
    """The budget of one process in GB and how it was set (for messages).

    Args:
        memory_gb: the setting; None: ``AUTO_MEMORY_FRACTION`` of ``available`` (default: this
            machine's, :func:`available_memory_bytes`) divided among ``local_ranks`` processes.
        prefix: where ``memory_gb`` sits in the caller's settings tree, for the messages.
    Raises:
        DetectionError: ``memory_gb`` is not a positive finite number.
    """
    if memory_gb is not None:
        if isinstance(memory_gb, bool) or not (isinstance(memory_gb, (int, float)) and math.isfinite(memory_gb)
                                               and memory_gb > 0):
            raise DetectionError(f"{prefix}memory_gb must be > 0 (GB per process) or null (from the machine's "
                                 f"available memory), got {memory_gb!r}")
        return float(memory_gb), f"{prefix}memory_gb={memory_gb:g}"
    available = available_memory_bytes() if available is None else available
    if available is None:
        log.warning("the available memory cannot be read: the train stage budgets %g GB (set %smemory_gb)",
                    FALLBACK_MEMORY_GB, prefix)
        return FALLBACK_MEMORY_GB, f"{prefix}memory_gb unset and the available memory unknown: {FALLBACK_MEMORY_GB:g}"
    ranks = max(1, int(local_ranks))
    budget = AUTO_MEMORY_FRACTION * available / ranks / 2**30
    return budget, (f"{prefix}memory_gb unset: {AUTO_MEMORY_FRACTION:.0%} of the {available / 2**30:.1f} GB available"
                    f"{f' over {ranks} processes on this machine' if ranks > 1 else ''} = {budget:.2f}")


def check_train_memory(cfg: TrainConfig, num_classes: int, pool5_dim: int, layer_dim: int,
                       max_candidates: int, prefix: str = "", world: int = 1, local_ranks: int = 1,
                       available: int | None = None) -> dict[str, float]:
    """Check the train stage's worst case in one process against the budget before anything runs.

    Args:
        num_classes, pool5_dim: K and the pool5 length (box regression).
        layer_dim: length of the SVMs' features (pool5, fc6 or fc7).
        max_candidates: most GT boxes + proposals of one training image.
        prefix: where ``cfg`` sits in the caller's settings tree (the pipeline's ``"train."``),
            so the messages name the keys the user sets.
        world, local_ranks: processes in all (they share each mining block) and on this machine
            (they share its memory, :func:`memory_budget_gb`).
        available: the machine's available bytes (default: read from it).
    Returns:
        GB needed by each part (``svm``, ``bbox``; None where unbounded, a null cap) and the
        ``budget`` in GB.
    Raises:
        DetectionError: a part needs more than the budget, or a null SVM cap; the message names
            the part and the settings to lower.
    """
    p = prefix
    budget, how = memory_budget_gb(cfg.memory_gb, local_ranks, available, prefix)
    svm = svm_memory_bytes(cfg.svm, num_classes, layer_dim, max_candidates, world)
    caps = cfg.bbox.max_samples, cfg.bbox.max_gt_samples
    bbox = regression_memory_bytes(caps[0] + caps[1], pool5_dim) if cfg.bbox.enabled and None not in caps else None
    need = {"svm": None if svm is None else svm / 2**30, "bbox": None if bbox is None else bbox / 2**30,
            "budget": budget}
    if svm is None:
        raise DetectionError(f"train stage (SVM hard-negative mining): {p}svm.max_positives / {p}svm.max_negatives is "
                             f"null, so one class's retraining has no memory bound; set both caps")
    if need["svm"] > budget:
        raise DetectionError(
            f"train stage (SVM hard-negative mining) needs up to {need['svm']:.2f} GB per process for one class of "
            f"{layer_dim:,}-d features ({p}svm.max_positives={cfg.svm.max_positives}, "
            f"{p}svm.max_negatives={cfg.svm.max_negatives}) or one block of {cfg.svm.mining_block} images of up to "
            f"{max_candidates:,} windows ({p}svm.mining_block), above the budget of {budget:.2f} GB ({how}): lower "
            f"{p}svm.max_negatives or {p}svm.max_positives (or {p}svm.mining_block), or raise {p}memory_gb")
    if need["bbox"] is not None and need["bbox"] > budget:
        raise DetectionError(
            f"train stage (box regression) needs up to {need['bbox']:.2f} GB per class for {caps[1]} GT + {caps[0]} "
            f"proposal samples of {pool5_dim:,}-d pool5 features ({p}bbox.max_gt_samples, {p}bbox.max_samples), above "
            f"the budget of {budget:.2f} GB ({how}): lower {p}bbox.max_samples or {p}bbox.max_gt_samples, or raise "
            f"{p}memory_gb")
    return need


def refuse_unused_finetune(feature_layer: str, finetune_cfg: FinetuneConfig, prefix: str = "") -> None:
    """Refused, not ignored: fc fine-tuning trains fc6/fc7, which SVMs on pool5 never read."""
    if finetune_cfg.enabled and feature_layer == "pool5":
        raise ConfigError(f"{prefix}finetune.enabled=true trains fc6/fc7, but the SVMs read pool5 (feature_layer=pool5), "
                          "which fine-tuning does not change: set feature_layer=fc7 (the paper's) or "
                          f"{prefix}finetune.enabled=false")


def train_detector(records: Sequence[ImageRecord], classes: Sequence[str],
                   proposals: Callable[[ImageRecord], np.ndarray], backbone: Backbone, pool5_fn: Pool5Fn,
                   pool5_dim: int, settings: DetectorSettings, cfg: TrainConfig,
                   out_dir: str | Path | None = None, progress: bool = True,
                   finetune_pool5_fn: Callable[[int, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                   checkpoint_key: str | None = None) -> SPPDetector:
    """(fc fine-tuning) -> SVMs on ``settings.feature_layer`` -> box regressors on pool5 -> score
    calibration (through the detector's post-processing with ``settings``' detection settings).

    Args:
        records: training images (flipped ones included when wanted).
        classes: class names (labels index them).
        proposals: proposals of a record (internal boxes in its pixels).
        backbone: the conv trunk the features come from (stored in the model).
        pool5_fn: pooled features of windows of a record (best scale).
        pool5_dim: length of a pooled vector.
        settings: detector settings stored in the model.
        cfg: training settings.
        out_dir: where fine-tuning checkpoints go (resumable).
        finetune_pool5_fn: pooled features for fine-tuning (random scale per window); defaults
            to ``pool5_fn``.
        checkpoint_key: with ``out_dir``, checkpoint the SVMs, then each class's box regressor,
            then the score calibration under ``out_dir/train_checkpoint/`` (:class:`TrainCheckpoint`);
            a rerun with the same key continues from them. The key must change with anything the
            SVMs and box regressors depend on; the calibration's checkpoint is keyed on it plus
            ``cfg.calibration`` and ``settings``' detection settings (what it is fitted through),
            so a change of those alone refits only the calibration.
    Returns:
        The trained detector (not yet saved).
    Raises:
        DetectionError: the settings do not fit the memory budget (before anything is trained).
    """
    refuse_unused_finetune(settings.feature_layer, cfg.finetune)
    k = len(classes)
    max_candidates = max((len(r.boxes) + len(proposals(r)) for r in records), default=0)
    if cfg.max_train_windows is not None:
        max_candidates = min(max_candidates, cfg.max_train_windows + max((len(r.boxes) for r in records), default=0))
    svm_dim = pool5_dim if settings.feature_layer == "pool5" else \
        cfg.finetune.hidden[1 if settings.feature_layer == "fc7" else 0]
    budget = check_train_memory(cfg, k, pool5_dim, svm_dim, max_candidates, world=comm.world_size(),
                                local_ranks=comm.local_world_size())["budget"]
    train_ckpt = TrainCheckpoint(Path(out_dir) / "train_checkpoint", checkpoint_key) \
        if out_dir is not None and checkpoint_key is not None else None
    gen = torch.Generator().manual_seed(cfg.head_seed)
    # SVMs on pool5 use no fc layer: an empty head keeps ~400 MB of unused fc6/fc7 out of the
    # model file (and out of memory).
    hidden = (0, 0) if settings.feature_layer == "pool5" else cfg.finetune.hidden
    head = FCHead(pool5_dim, hidden, num_classes=k, dropout=cfg.finetune.dropout, generator=gen)
    pretrained = backbone.head is not None and settings.feature_layer != "pool5" and head.load_pretrained(backbone.head)
    if settings.feature_layer != "pool5" and not pretrained:
        # fc layers from scratch: scale pool5 to mean norm sqrt(D), i.e. unit-size elements, as
        # their He initialisation assumes.
        pool5_only = WindowFeatureSource(records, proposals, pool5_fn, None, "pool5", pool5_dim, cfg.max_train_windows)
        scale = compute_feature_scale(pool5_only, float(pool5_dim) ** 0.5, cfg.svm.norm_images,
                                      cfg.svm.norm_boxes_per_image, cfg.svm.seed, progress, Ranks.of_comm())[0]
        head.input_scale.fill_(scale)
        log.info("fc layers from scratch: pool5 scaled by %.4g before fc6", scale)
    if settings.feature_layer != "pool5" and cfg.finetune.enabled:
        windows = [label_windows(r, proposals(r), cfg.finetune) for r in records]
        fn = finetune_pool5_fn
        if fn is None:
            def fn(i: int, boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
                return pool5_fn(records[i], boxes)
        ckpt = Path(out_dir) / "finetune_checkpoint.pt" if out_dir is not None else None
        bar = _progress_bar(cfg.finetune.iterations, "fine-tune fc", progress)
        # The resumable checkpoint is keyed on what the pooled features depend on too: it lives
        # in out_dir, which runs with other backbones / scales / pyramids may share.
        feature_key = json.dumps({"backbone": [backbone.name, backbone.weights_id],
                                  "settings": dataclasses.asdict(settings)}, sort_keys=True, default=str)
        losses = finetune(head, windows, fn, cfg.finetune, checkpoint=ckpt,
                          progress=lambda it, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.3f}"),
                          checkpoint_key=feature_key, write_checkpoints=comm.is_main())
        bar.close()
        if losses:
            log.info("fine-tuning: loss %.4f -> %.4f over %d iterations", losses[0], losses[-1], len(losses))
    head.eval()
    head.fc8 = None
    layer_dim = pool5_dim if settings.feature_layer == "pool5" else head.hidden[1 if settings.feature_layer == "fc7" else 0]
    source = WindowFeatureSource(records, proposals, pool5_fn, head, settings.feature_layer, layer_dim,
                                 cfg.max_train_windows)
    svms = train_ckpt.svms() if train_ckpt is not None else None
    if svms is None:
        # Under torchrun every rank mines its share of each block of images for every class, and
        # retrains its share of the classes; every rank ends with all the SVMs.
        svms = train_svms(source, k, cfg.svm, class_names=classes, progress=progress, ranks=Ranks.of_comm(),
                          cache_dir=Path(out_dir) / "svm_cache" if out_dir is not None else None)
        if train_ckpt is not None and comm.is_main():
            train_ckpt.save_svms(svms)
    else:
        log.info("SVMs from the checkpoint %s", train_ckpt.root)
    regressors = None
    if cfg.bbox.enabled:
        pool5_source = WindowFeatureSource(records, proposals, pool5_fn, None, "pool5", pool5_dim,
                                           cfg.max_train_windows)
        if settings.feature_layer == "pool5" and _same_norm_sample(cfg.svm, cfg.bbox):
            scale = svms.feature_scale        # the same features, sampled the same way
        else:
            scale = compute_feature_scale(pool5_source, cfg.bbox.target_norm, cfg.bbox.norm_images,
                                          cfg.bbox.norm_boxes_per_image, cfg.bbox.seed, progress, Ranks.of_comm())[0]
        # With the scale known, only proposals that can become samples need features (a few
        # percent of them), and one class at a time: the same samples, in the same order, as
        # reading every proposal, with one class's features in memory instead of all.
        done = train_ckpt.regressors(k, scale) if train_ckpt is not None else {}
        for c in done:
            log.info("%s: box regressor from the checkpoint", classes[c])
        on_class = functools.partial(train_ckpt.save_regressor, scale=scale) if train_ckpt is not None else None
        # One class at a time, each on its own: under torchrun the ranks share the classes out.
        mine = fit_box_regressors(regression_sources(pool5_source, k, cfg.bbox), k, cfg.bbox,
                                  [c for c in comm.shard(range(k)) if c not in done], class_names=classes,
                                  feature_scale=scale, progress=progress, untrained=svms.meta.get("untrained", ()),
                                  memory_budget=int(budget * 2**30), on_class=on_class)
        fitted = dict(done)
        for part in comm.all_gather(mine, "box regression: gathering every rank's classes"):
            fitted.update(part)
        regressors = assemble_box_regressors(fitted, classes, cfg.bbox, scale)
    calibration = None
    if cfg.calibration.enabled:
        cal_key = json.dumps({"calibration": dataclasses.asdict(cfg.calibration),
                              "detection": dataclasses.asdict(settings.detection_settings())}, sort_keys=True)
        found, calibration = train_ckpt.calibration(k, cal_key) if train_ckpt is not None else (False, None)
        if found:
            log.info("score calibration from the checkpoint %s", train_ckpt.root)
        else:
            # Fitted through the detector's own box regression, clipping and post-processing. The
            # regressors are the final ones (fitted on every image): they only move the boxes
            # that are labelled; what is held out is the SVM scores the probabilities map.
            @torch.inference_mode()
            def boxes_fn(i: int, sample: ImageSample) -> torch.Tensor:
                r = source.records[i]
                pool5 = None
                if regressors is not None:
                    pool5 = (torch.from_numpy(sample.features) if settings.feature_layer == "pool5"
                             else pool5_fn(r, torch.from_numpy(sample.boxes)))
                return class_boxes(sample.boxes, pool5, regressors, (r.height, r.width), k)

            # The groups keep an image and its mirror in one fold.
            calibration = fit_calibration(source, [r.image_id for r in records], k, cfg.svm, cfg.calibration,
                                          svms.feature_scale, settings=settings.detection_settings(),
                                          boxes_fn=boxes_fn, class_names=classes, progress=progress,
                                          ranks=Ranks.of_comm())
            if train_ckpt is not None and comm.is_main():
                train_ckpt.save_calibration(calibration, cal_key)
        settings = with_chosen_nms(settings, calibration, cfg.calibration)
    return SPPDetector(backbone, head, svms, regressors, classes, settings, calibration=calibration,
                       meta={"train": {"num_images": len(records), "head_seed": cfg.head_seed,
                                       # what the calibration was fitted through (also when it failed)
                                       "detection_settings": dataclasses.asdict(settings.detection_settings())
                                       if cfg.calibration.enabled else None,
                                       "finetune": dataclasses.asdict(cfg.finetune),
                                       "svm": dataclasses.asdict(cfg.svm),
                                       "bbox": dataclasses.asdict(cfg.bbox) if cfg.bbox.enabled else None}})


def with_chosen_nms(settings: DetectorSettings, calibration: ScoreCalibration | None,
                    cfg: CalibrationConfig) -> DetectorSettings:
    """``settings`` with the NMS threshold the calibration chose on its held-out folds
    (``cfg.nms_choices``); unchanged without choices, or with a warning when none was chosen."""
    if not cfg.nms_choices:
        return settings
    nms = calibration.meta.get("nms") if calibration is not None else None
    chosen = nms.get("chosen") if isinstance(nms, dict) else None
    # From a checkpoint file too: only one of the choices is taken.
    if not any(chosen == t for t in cfg.nms_choices) or isinstance(chosen, bool):
        log.warning("no NMS threshold could be chosen on the held-out folds (no calibration); test.nms_iou=%s "
                    "is kept", settings.nms_iou)
        return settings
    return dataclasses.replace(settings, nms_iou=float(chosen))


class TrainCheckpoint:
    """The train stage's progress on disk: ``svms.pt``, then ``bbox_<k>.pt`` per class, then
    ``calibration.pt``, each written atomically and holding the key of the settings it was made with (a file with another
    key, or unreadable, is ignored and redone), with its checksum beside it (``<file>.crc32``: a
    flipped byte or a torn file is named in a warning and redone). Tensors and JSON strings only (no pickles)."""

    def __init__(self, root: Path, key: str) -> None:
        self.root, self.key = Path(root), key

    def _load(self, name: str, extra: str = "") -> dict | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            state = load_verified_torch(path, "checkpoint")
        except Exception as e:  # noqa: BLE001 - an unreadable or corrupt checkpoint is redone, never trusted
            log.warning("ignoring the unreadable checkpoint %s (%s)", path, " ".join(str(e).split())[:200])
            return None
        if not isinstance(state, dict) or state.get("key") != self.key + extra:
            log.info("ignoring %s: made with other settings", path)
            return None
        return state

    def svms(self) -> LinearSVMs | None:
        state = self._load("svms.pt")
        if state is None:
            return None
        return LinearSVMs.from_state(state["tensors"], json.loads(state["meta"]))

    def save_svms(self, svms: LinearSVMs) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.root / "svms.pt", {"key": self.key, "tensors": svms.tensors(),
                                                  "meta": json.dumps(svms.to_meta())}, checksum=True)

    def calibration(self, num_classes: int, extra: str) -> tuple[bool, ScoreCalibration | None]:
        """(found, calibration): the fit saved by :meth:`save_calibration` with the same ``extra``
        key (what the fit depends on beyond the SVMs); None: the fit was skipped."""
        state = self._load("calibration.pt", extra)
        if state is None:
            return False, None
        try:
            meta = json.loads(state["meta"])
            return True, None if meta is None else ScoreCalibration.from_meta(meta, num_classes)
        except (KeyError, TypeError, ValueError, ModelError) as e:   # redone, never trusted
            log.warning("ignoring the damaged checkpoint %s (%s)", self.root / "calibration.pt", e)
            return False, None

    def save_calibration(self, calibration: ScoreCalibration | None, extra: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(None if calibration is None else calibration.to_meta())
        atomic_torch_save(self.root / "calibration.pt", {"key": self.key + extra, "meta": meta}, checksum=True)

    def regressors(self, num_classes: int, scale: float) -> dict[int, ClassRegressor]:
        done = {}
        for c in range(num_classes):
            state = self._load(f"bbox_{c}.pt")
            if state is not None and state.get("feature_scale") == scale:
                done[c] = ClassRegressor(*(state[n].numpy() for n in ("weight", "bias", "target_mean",
                                                                         "target_unwhiten")),
                                         stats=json.loads(state["stats"]))
        return done

    def save_regressor(self, c: int, r: ClassRegressor, scale: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.root / f"bbox_{c}.pt", {
            "key": self.key, "feature_scale": scale, "stats": json.dumps(r.stats),
            **{n: torch.from_numpy(np.ascontiguousarray(getattr(r, n), dtype=np.float64))
               for n in ("weight", "bias", "target_mean", "target_unwhiten")}}, checksum=True)
        log.info("box regressor %d checkpointed in %s", c, self.root)


def _same_norm_sample(a: SVMConfig, b: BBoxRegressionConfig) -> bool:
    return (a.target_norm, a.norm_images, a.norm_boxes_per_image, a.seed) == \
        (b.target_norm, b.norm_images, b.norm_boxes_per_image, b.seed)


def regression_sources(source: WindowFeatureSource, num_classes: int, cfg: BBoxRegressionConfig
                       ) -> list[WindowFeatureSource]:
    """One pool5 source per class for :func:`train_box_regressors`: class k's source reads only
    the images with a non-difficult GT of class k and only their proposals that are (capped)
    class-k samples (:func:`.bbox_regression.plan_regression_samples`, boxes only).
    Planning again on it keeps every one of those proposals and the same GT subset, so the
    samples are those of planning on ``source``. Under ``torchrun`` the plan is shared out by
    image and gathered: every rank must call this."""
    plan = plan_regression_samples(source, num_classes, cfg, share_images=True)   # every rank calls it
    chosen = [{source.records[s.image].key: s.proposal_rows for s in p} for p in plan]
    none = np.zeros(0, np.int64)
    sources = []
    for c in range(num_classes):
        def has_gt(r: ImageRecord) -> bool:
            keep = np.ones(len(r.boxes), bool) if cfg.use_difficult else ~np.asarray(r.difficult, bool)
            return bool((np.asarray(r.labels)[keep] == c).any())
        sources.append(WindowFeatureSource([r for r in source.records if has_gt(r)], source.proposals,
                                           source.pool5_fn, None, "pool5", source.dim, source.max_windows,
                                           keep_proposals=lambda r, b, c=c: b[chosen[c].get(r.key, none)]))
    return sources



def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled)
