"""Training a classifier: fc layers by SGD under a regime (:mod:`.regimes`), or linear SVMs on the
pooled vectors (head ``svm``).

Data parallel under ``torchrun``: every rank computes the same epoch plan, takes a contiguous
share of each batch, and divides its summed loss by the whole batch's size; the gradients are
summed over the ranks (:func:`detection.comm.sum_gradients`), so each step is the one-process
step (up to float order and the ranks' own dropout masks).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.svm import LinearSVC

from .. import comm
from ..errors import DetectionError
from .buckets import pad_to_batch
from .config import ClassifierConfig
from .data import ClassificationSet, load_pixels, resize_shorter
from .model import SPPClassifier, build_classifier, images_to_batch
from .regimes import Batch, Item, base_side, make_input, plan_epoch

__all__ = ["train_classifier", "classification_loss", "preload", "pooled_features", "fit_svms"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def preload(data: ClassificationSet, side: int) -> list[np.ndarray]:
    """Every image of ``data`` decoded once and resized to shorter side ``side`` (the largest any
    epoch uses), kept in memory: decoding a large photo takes longer than a training step."""
    return [resize_shorter(load_pixels(s), side) for s in data.samples]


def classification_loss(scores: torch.Tensor, data: ClassificationSet, indices: list[int]) -> torch.Tensor:
    """Summed loss of some samples: cross-entropy (single-label) or per-class sigmoid BCE over the
    labels that are not ignored (multi-label)."""
    if not data.multilabel:
        y = torch.tensor([data.samples[i].label for i in indices], dtype=torch.long, device=scores.device)
        return F.cross_entropy(scores, y, reduction="sum")
    t = torch.from_numpy(np.stack([data.samples[i].targets for i in indices]).astype(np.float32)).to(scores.device)
    keep = t >= 0
    return F.binary_cross_entropy_with_logits(scores[keep], t[keep], reduction="sum")


def _batch_tensor(model: SPPClassifier, images: list[np.ndarray], batch: Batch, items, cfg: ClassifierConfig) -> torch.Tensor:
    inputs = [make_input(images[it.index], it, batch.shape, cfg.train) for it in items]
    if batch.shape is None:
        return pad_to_batch([images_to_batch(model.backbone, [x]) for x in inputs])
    return images_to_batch(model.backbone, inputs)


def _lr(cfg: ClassifierConfig, epoch: int) -> float:
    return cfg.train.lr * 0.1 ** sum(epoch >= s for s in cfg.train.lr_steps)


def _train_fc(model: SPPClassifier, data: ClassificationSet, images: list[np.ndarray], cfg: ClassifierConfig,
              device: torch.device, progress: Progress | None) -> dict[str, Any]:
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    sizes = [(img.shape[1], img.shape[0]) for img in images]
    losses, seen, batches, input_pixels = [], 0, 0, 0
    start = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed * 1000 + comm.rank())       # dropout masks: seeded, per rank
        for epoch in range(t.epochs):
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, epoch)
            total = 0.0
            plan = plan_epoch(t, sizes, epoch)
            for b, batch in enumerate(plan):
                lo, hi = comm.shard_bounds(len(batch.items))
                opt.zero_grad(set_to_none=True)
                value = 0.0
                if hi > lo:
                    items = batch.items[lo:hi]
                    x = _batch_tensor(model, images, batch, items, cfg).to(device)
                    input_pixels += x.shape[0] * x.shape[2] * x.shape[3]
                    loss = classification_loss(model(x), data, [it.index for it in items]) / len(batch.items)
                    loss.backward()
                    value = float(loss.detach())
                comm.sum_gradients(params, "classifier training: summing the ranks' gradients")
                value = float(comm.all_reduce_sum(value, "classifier training: summing the ranks' losses"))
                if not math.isfinite(value):
                    raise DetectionError(f"training diverged in epoch {epoch} (loss {value}); lower train.lr")
                opt.step()
                total += value * len(batch.items)
                seen += len(batch.items)
                batches += 1
                if progress is not None:
                    progress(f"epoch {epoch + 1}/{t.epochs}", b + 1, len(plan))
            losses.append(total / max(len(images), 1))
            log.info("epoch %d/%d: loss %.4f (lr %g)", epoch + 1, t.epochs, losses[-1], _lr(cfg, epoch))
    seconds = time.perf_counter() - start
    model.eval()
    return {"epoch_losses": losses, "images": seen, "batches": batches, "seconds": seconds,
            "images_per_second": seen / seconds if seconds > 0 else None,
            "input_pixels_per_rank": input_pixels}


def pooled_features(model: SPPClassifier, images: list[np.ndarray], cfg: ClassifierConfig,
                    device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Pooled vectors of the regime's deterministic training views (centre crop at every size of
    the regime, or the bucketed whole image), this rank's share gathered on every rank.

    Returns:
        (float32 array[M, dim], int64 array[M] image index of each row).
    """
    t = cfg.train
    sizes = [(img.shape[1], img.shape[0]) for img in images]
    plain = dataclasses.replace(t, flip=False, batch_size=cfg.test.batch_size)
    epochs = range(len(t.sizes)) if t.regime == "multi" else range(1)
    feats, index = [], []
    model.eval()
    with torch.no_grad():
        for epoch in epochs:
            for batch in plan_epoch(plain, sizes, epoch):
                # Centre crops: the deterministic view of the crop regimes.
                items = [Item(it.index, 0, False) for it in batch.items]
                lo, hi = comm.shard_bounds(len(items))
                if hi > lo:
                    x = _batch_tensor(model, images, batch, items[lo:hi], cfg).to(device)
                    feats.append(model.pool_map(model.conv_map(x)).cpu().numpy())
                    index += [it.index for it in items[lo:hi]]
    parts = comm.all_gather((np.concatenate(feats) if feats else None, index), "SVM features: gathering")
    x = np.concatenate([p[0] for p in parts if p[0] is not None])
    idx = np.concatenate([np.asarray(p[1], np.int64) for p in parts])
    return x, idx


def fit_svms(x: np.ndarray, data: ClassificationSet, index: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One linear SVM per class (one-vs-rest; ignored multi-labels left out) on L2-normalised rows.

    Returns:
        (weight float32 [K, D], bias float32 [K]).
    """
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = len(data.classes)
    w = np.zeros((k, x.shape[1]), np.float32)
    b = np.zeros(k, np.float32)
    for j in range(k):
        if data.multilabel:
            y = np.array([data.samples[i].targets[j] for i in index])
        else:
            y = np.array([1 if data.samples[i].label == j else 0 for i in index])
        keep = y >= 0
        if len(np.unique(y[keep])) < 2:
            raise DetectionError(f"class {data.classes[j]!r} has no {'positive' if not (y == 1).any() else 'negative'} "
                                 "training image: an SVM cannot be fitted")
        svm = LinearSVC(C=c, random_state=seed, max_iter=10000)
        svm.fit(x[keep], y[keep])
        w[j], b[j] = svm.coef_[0], svm.intercept_[0]
    return w, b


def train_classifier(data: ClassificationSet, cfg: ClassifierConfig, device: torch.device | str = "cpu",
                     progress: Progress | None = None) -> tuple[SPPClassifier, dict[str, Any]]:
    """Build and train a classifier on ``data`` (the training split).

    Returns:
        (the classifier in eval mode, training statistics: per-epoch losses, images/second ...).
    """
    device = torch.device(device)
    model = build_classifier(cfg, data.classes, data.multilabel).to(device)
    if min(cfg.train.crop, *cfg.train.sizes, cfg.train.any_side) < model.min_input_side:
        raise DetectionError(f"{cfg.model.backbone} with SPP levels {list(cfg.model.levels)} needs inputs of at least "
                             f"{model.min_input_side} px: raise train.crop / train.sizes / train.any_side")
    start = time.perf_counter()
    images = preload(data, base_side(cfg.train))
    load_seconds = time.perf_counter() - start
    log.info("decoded %d training images in %.1f s", len(images), load_seconds)
    if cfg.model.head == "svm":
        start = time.perf_counter()
        x, index = pooled_features(model, images, cfg, device)
        w, b = comm.main_first_value(lambda: fit_svms(x, data, index, cfg.train.svm_c, cfg.train.seed),
                                     "SVM head: rank 0's weights")
        model.svm_weight.copy_(torch.from_numpy(w))
        model.svm_bias.copy_(torch.from_numpy(b))
        seconds = time.perf_counter() - start
        stats: dict[str, Any] = {"images": int(len(index)), "seconds": seconds,
                                 "images_per_second": len(index) / seconds if seconds > 0 else None}
    else:
        stats = _train_fc(model, data, images, cfg, device, progress)
    stats["decode_seconds"] = load_seconds
    stats["world_size"] = comm.world_size()
    return model.eval(), stats
