"""Fine-tuning fc6/fc7/fc8 (and optionally the conv layers) on pooled window features.

The paper's recipe (He et al. 2014, Sec. 4.1, "Fine-tuning"; docs/pipeline.md): windows with IoU >= 0.5 with a ground truth
are positives labelled with its class, windows with IoU in [0.1, 0.5) are background, mini-batches
of exactly 128 windows hold 32 positives and 96 background windows (:func:`sample_minibatch`), SGD
with momentum 0.9 and weight decay 5e-4, a random scale per window while training.

The schedule is the code's shape (lr 1e-3, x0.1 twice) scaled down: the paper runs 250k + 50k
mini-batches (the code 3 x 30k); :func:`schedule_summary` states a run's length as a fraction of
both, and :func:`finetune` logs it. Each iteration draws its samples from a generator seeded with
``(seed, iteration)``, so a run resumed from a checkpoint is identical to an uninterrupted one.
Under ``torchrun`` each mini-batch's windows (fc layers only) or images (conv layers too: one
forward pass per image) are shared out over the ranks and their gradients summed (data
parallel, the same mini-batch and random draws as one process, for any number of ranks).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import comm
from ..boxes import box_iou_numpy
from ..data.records import ImageRecord
from ..errors import CacheError, DetectionError
from ..features.featurizer import PooledFn
from ..heads import FCHead
from ..io.files import atomic_torch_save, load_verified_torch

__all__ = ["FinetuneConfig", "WindowLabels", "label_windows", "sample_minibatch", "schedule_summary", "finetune",
           "PAPER_ITERATIONS", "CODE_ITERATIONS"]

#: Mini-batches of 128 windows in the paper's fine-tuning (250k at lr 1e-4, 50k at 1e-5) ...
PAPER_ITERATIONS = 300_000
#: ... and in the official code's (30k at each of lr 1e-3, 1e-4, 1e-5).
CODE_ITERATIONS = 90_000

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = True
    iterations: int = 2000
    lr: float = 1e-3                       # the code's first stage (paper: 1e-4)
    lr_steps: tuple[int, ...] = (1000, 1500)  # lr x 0.1 at each (the code: thirds of the run)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128                  # windows per mini-batch (paper)
    images_per_batch: int | None = 4       # images a mini-batch is drawn from (refilled when they run
                                           # short); None: the whole dataset, as the code does
    fg_fraction: float = 0.25              # share of positives in a mini-batch (paper)
    fg_iou: float = 0.5                    # IoU >= 0.5 with a ground truth: positive (paper)
    bg_iou_lo: float = 0.1                 # IoU in [0.1, 0.5): background (paper)
    dropout: float = 0.5
    hidden: tuple[int, int] = (4096, 4096)
    checkpoint_every: int = 500
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class WindowLabels:
    """Training windows of one image: boxes (proposals + ground truth) and their labels."""

    boxes: np.ndarray      # float32 [N, 4], internal convention
    labels: np.ndarray     # int64 [N], 1..K for positives, 0 for background, -1 ignored
    fg: np.ndarray         # indices of positives
    bg: np.ndarray         # indices of background windows


def label_windows(record: ImageRecord, proposals: np.ndarray, cfg: FinetuneConfig) -> WindowLabels:
    """Label an image's windows (its proposals plus its non-difficult ground truth)."""
    keep = ~record.difficult.astype(bool)
    gt_boxes, gt_labels = record.boxes[keep], record.labels[keep]
    boxes = np.concatenate([gt_boxes, np.asarray(proposals, dtype=np.float32).reshape(-1, 4)]).astype(np.float32)
    labels = np.full(len(boxes), -1, dtype=np.int64)
    if len(gt_boxes):
        iou = box_iou_numpy(boxes, gt_boxes)
        best = iou.argmax(axis=1)
        best_iou = iou[np.arange(len(boxes)), best]
    else:
        best = np.zeros(len(boxes), dtype=np.int64)
        best_iou = np.zeros(len(boxes))
    fg = best_iou >= cfg.fg_iou
    bg = (best_iou < cfg.fg_iou) & (best_iou >= cfg.bg_iou_lo)
    if len(gt_boxes):
        labels[fg] = gt_labels[best[fg]] + 1
    labels[bg] = 0
    return WindowLabels(boxes, labels, np.flatnonzero(fg), np.flatnonzero(bg))


#: Pools up to this size are drawn without replacement (a permutation of 10^5 costs ~1 ms).
_PERMUTE_LIMIT = 100_000


def _draw(n: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """n positions in [0, total): without replacement when the pool holds n, else with
    replacement (the pool is short; the code's window data layer always draws with replacement)."""
    if total >= n and total <= _PERMUTE_LIMIT:
        return torch.randperm(total, generator=generator)[:n]
    # A pool of millions of windows (the whole of VOC): a permutation per mini-batch would cost
    # more than the step; with replacement, a repeat among 128 of 10^6 has probability < 1 %.
    return torch.randint(total, (n,), generator=generator)


def sample_minibatch(windows: Sequence[WindowLabels], cfg: FinetuneConfig,
                     generator: torch.Generator) -> list[tuple[int, np.ndarray]]:
    """One mini-batch of exactly ``batch_size`` windows, ``round(batch_size * fg_fraction)`` of
    them positives (32 + 96 of 128 with the paper's settings), drawn uniformly from the windows
    of the chosen images, as the official code's window data layer does.

    The images: ``images_per_batch`` of them in random order (fewer conv passes when the conv
    layers are trained), more added when they hold fewer positives or background windows than
    the batch needs (refill); with ``images_per_batch=None`` every image (the code: windows from
    across the dataset). Only when the whole dataset is short are windows repeated.

    Returns:
        (image index, window indices) pairs in increasing image order, positives first in each.
    """
    eligible = [i for i, w in enumerate(windows) if len(w.fg) or len(w.bg)]
    if not eligible:
        return []
    n_fg = int(round(cfg.batch_size * cfg.fg_fraction))
    n_bg = cfg.batch_size - n_fg
    order = [eligible[j] for j in torch.randperm(len(eligible), generator=generator).tolist()]
    want = len(order) if cfg.images_per_batch is None else cfg.images_per_batch
    chosen: list[int] = []
    have_fg = have_bg = 0
    for i in order:
        if len(chosen) >= want and have_fg >= n_fg and have_bg >= n_bg:
            break
        chosen.append(i)
        have_fg += len(windows[i].fg)
        have_bg += len(windows[i].bg)
    if have_bg == 0 and n_bg > 0:
        raise DetectionError(f"no training window has an IoU in [{cfg.bg_iou_lo}, {cfg.fg_iou}) with a ground "
                             "truth: no background to fine-tune on (check the proposals, or lower finetune.bg_iou_lo)")
    picked: dict[int, list[np.ndarray]] = {i: [] for i in chosen}
    for kind, n, have in (("fg", n_fg, have_fg), ("bg", n_bg, have_bg)):
        if n == 0 or have == 0:      # no positives anywhere in the chosen images: background only
            continue
        counts = np.array([len(getattr(windows[i], kind)) for i in chosen])
        starts = np.cumsum(counts) - counts
        pos = _draw(n, have, generator).numpy()
        owner = np.searchsorted(starts, pos, side="right") - 1
        for slot, i in enumerate(chosen):
            local = pos[owner == slot] - starts[slot]
            if len(local):
                picked[i].append(getattr(windows[i], kind)[local])
    return [(i, np.concatenate(parts)) for i, parts in sorted(picked.items()) if parts]


def _iteration_generator(seed: int, iteration: int) -> torch.Generator:
    # One generator per iteration: the run does not depend on how it was split into sessions.
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def _checkpoint_key(head: FCHead, windows: Sequence[WindowLabels], cfg: FinetuneConfig, extra: str) -> str:
    """What a checkpoint's content depends on: the config (bar the run length and checkpoint
    period, which may change between sessions), the head's shape, the labelled windows and the
    caller's ``extra`` (what ``pooled_fn`` depends on: backbone weights, scales, pyramid...)."""
    h = hashlib.sha256()
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("iterations", "checkpoint_every")}
    shapes = {k: list(v.shape) for k, v in head.state_dict().items()}
    h.update(json.dumps({"cfg": conf, "head": shapes, "extra": extra}, sort_keys=True, default=str).encode())
    for w in windows:
        h.update(np.ascontiguousarray(w.boxes, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(w.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def schedule_summary(cfg: FinetuneConfig) -> str:
    """The run's length beside the paper's and the code's, in windows seen (batches x 128)."""
    windows = cfg.iterations * cfg.batch_size
    paper, code = PAPER_ITERATIONS * 128, CODE_ITERATIONS * 128
    return (f"{cfg.iterations:,} mini-batches of {cfg.batch_size} windows = {windows:,} windows: "
            f"{100 * windows / paper:.2g} % of the paper's schedule ({PAPER_ITERATIONS:,} x 128), "
            f"{100 * windows / code:.2g} % of the code's ({CODE_ITERATIONS:,} x 128); lr {cfg.lr:g} x 0.1 at "
            f"{', '.join(str(s) for s in cfg.lr_steps) or 'no step'}")


def _lr_at(cfg: FinetuneConfig, iteration: int) -> float:
    return cfg.lr * 0.1 ** sum(iteration >= s for s in cfg.lr_steps)


def finetune(head: FCHead, windows: Sequence[WindowLabels], pooled_fn: PooledFn, cfg: FinetuneConfig,
             checkpoint: str | Path | None = None, trunk: nn.Module | None = None,
             progress: Callable[[int, float], None] | None = None, checkpoint_key: str = "",
             write_checkpoints: bool = True, trunk_lr_mult: float = 1.0, share: str | None = None) -> list[float]:
    """Train ``head`` (which must have fc8) and, when given, ``trunk``.

    Args:
        head: FCHead with fc8 (K + 1 outputs).
        windows: labelled windows per training image (index matches ``pooled_fn``'s).
        pooled_fn: pooled SPP features of some windows of an image (differentiable through the
            trunk when the conv layers are fine-tuned).
        checkpoint: file for periodic checkpoints; an existing one is resumed from.
        trunk: the conv layers, trained too when given (``pooled_fn`` must then run through
            them differentiably); None: only the head is trained.
        progress: called with (iteration, loss) after every iteration.
        checkpoint_key: what else the checkpoint depends on (e.g. the features' settings); a
            checkpoint made with another key, config, head shape or windows is not resumed.
        write_checkpoints: write ``checkpoint`` (False: only resume from it; under ``torchrun``
            every rank holds the same weights and rank 0 alone writes).
        trunk_lr_mult: the trunk's learning rate as a multiple of the head's.
        share: what the ranks of a ``torchrun`` run share out of each mini-batch: "windows"
            (default without ``trunk``: each rank pools and trains on a contiguous share of the
            batch's windows, so every rank works whatever the world size; ``pooled_fn`` then
            gets one generator per window) or "images" (default with ``trunk``: one forward
            pass per image; ranks beyond the batch's image count add zero gradients). The
            mini-batch and its random draws do not depend on the world size either way. A
            ``pooled_fn`` that draws one scale per image (an in-memory SPP featurizer's
            "random-image" rule) needs "images".
    Returns:
        The loss of every iteration run in this call.
    """
    if head.fc8 is None:
        raise ValueError("finetune needs an FCHead with fc8")
    if cfg.batch_size < 1 or not 0.0 <= cfg.fg_fraction <= 1.0 or (cfg.images_per_batch is not None
                                                                  and cfg.images_per_batch < 1):
        raise DetectionError(f"finetune.batch_size ({cfg.batch_size}) and finetune.images_per_batch "
                             f"({cfg.images_per_batch}) must be >= 1 and finetune.fg_fraction "
                             f"({cfg.fg_fraction}) in [0, 1]")
    if not any(len(w.fg) for w in windows):
        raise DetectionError("no training window overlaps a ground-truth box by IoU >= "
                             f"{cfg.fg_iou}: nothing to fine-tune on (check the proposals and annotations)")
    share = share or ("images" if trunk is not None else "windows")
    if share not in ("images", "windows"):
        raise ValueError(f"share={share!r}: use 'images' or 'windows'")
    if share == "images" and cfg.images_per_batch is not None and cfg.images_per_batch < comm.world_size():
        log.warning("fine-tuning shares a mini-batch's %d images over %d ranks: %d rank(s) wait each step (raise "
                    "images_per_batch to the world size to keep them busy)", cfg.images_per_batch,
                    comm.world_size(), comm.world_size() - cfg.images_per_batch)
    params = [{"params": list(head.parameters()), "lr_mult": 1.0}]
    if trunk is not None:
        params.append({"params": [p for p in trunk.parameters() if p.requires_grad], "lr_mult": trunk_lr_mult})
    trainable = [p for group in params for p in group["params"] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start = 0
    # The checkpoint is keyed on what it depends on: one left in the same folder by a run with
    # another config (lr, seed, classes, proposals...) must not be resumed as if it were this run's.
    key = _checkpoint_key(head, windows, cfg, f"{checkpoint_key}:trunk={trunk is not None}:{trunk_lr_mult!r}:{share}")
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            state = load_verified_torch(checkpoint, "fine-tuning checkpoint")
        except CacheError as e:  # a flipped byte, a torn or truncated file: redo, never trust it
            log.warning("%s; starting fine-tuning over", e)
            state = None
        except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
            raise DetectionError(f"fine-tuning checkpoint {checkpoint} cannot be read ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); delete it to start over") from None
        if state is None:
            pass
        elif not isinstance(state, dict) or state.get("key") != key:
            log.warning("fine-tuning checkpoint %s was made with other settings or data: starting over", checkpoint)
        else:
            head.load_state_dict(state["head"])
            if trunk is not None and "trunk" in state:
                trunk.load_state_dict(state["trunk"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["iteration"])
            log.info("resumed fine-tuning from %s at iteration %d", checkpoint, start)

    log.info("fine-tuning%s: %s", " (conv layers too)" if trunk is not None else "", schedule_summary(cfg))
    losses: list[float] = []
    windows_here = 0     # windows this rank computed (the ranks' share of the work, logged)
    head.train()
    if trunk is not None:
        trunk.train()
    for it in range(start, cfg.iterations):
        gen = _iteration_generator(cfg.seed, it)
        lr = _lr_at(cfg, it)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        batch = sample_minibatch(windows, cfg, gen)
        total = sum(len(idx) for _, idx in batch)
        units = _work_units(batch, share, gen)
        # Under torchrun each rank takes a contiguous share of the units; the loss is each
        # window's cross-entropy over the whole batch's count, so the summed gradients are those
        # of one process (up to float order). A rank without a unit adds zeros.
        lo, hi = comm.shard_bounds(len(units))
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        if hi > lo:
            feats, labels, rows = [], [], []
            for i, idx, gens in _by_image(units[lo:hi]):
                boxes = torch.from_numpy(windows[i].boxes[idx])
                if share == "images":    # one generator for the image's scales and dropout masks
                    feats.append(pooled_fn(i, boxes, gens[0]))
                    rows.append((len(idx), gens[0]))
                else:                    # one per window: the same draws on whichever rank
                    feats.append(pooled_fn(i, boxes, gens))
                    rows.extend((1, g) for g in gens)
                labels.append(torch.from_numpy(windows[i].labels[idx]))
                windows_here += len(idx)
            loss = nn.functional.cross_entropy(head(torch.cat(feats).float(), rows), torch.cat(labels),
                                               reduction="sum") / total
            loss.backward()
            loss_sum = float(loss.detach())
        comm.sum_gradients(trainable, "fine-tuning: summing the ranks' gradients")
        value = float(comm.all_reduce_sum(loss_sum, "fine-tuning: summing the ranks' losses"))
        opt.step()
        if not math.isfinite(value):
            raise DetectionError(f"fine-tuning diverged at iteration {it} (loss {value}); lower finetune.lr")
        losses.append(value)
        if progress is not None:
            progress(it, value)
        done = it + 1
        if checkpoint is not None and write_checkpoints and (done % cfg.checkpoint_every == 0
                                                             or done == cfg.iterations):
            state = {"head": head.state_dict(), "optimizer": opt.state_dict(), "iteration": done, "key": key}
            if trunk is not None:
                state["trunk"] = trunk.state_dict()
            atomic_torch_save(checkpoint, state, checksum=True)
    head.eval()
    if trunk is not None:
        trunk.eval()
    if comm.world_size() > 1:
        log.info("fine-tuning: rank %d of %d computed %d windows over %d iterations (units: %s)", comm.rank(),
                 comm.world_size(), windows_here, len(losses), share)
    return losses


def _work_units(batch: list[tuple[int, np.ndarray]], share: str,
                generator: torch.Generator) -> list[tuple[int, np.ndarray, int]]:
    """A mini-batch's units of work, which the ranks share out: (image, window indices, seed of
    the unit's random draws: scales and dropout masks). ``share`` "images": one unit per image
    (training the conv layers needs one forward pass per image); "windows": one per window, so
    that any number of ranks has work. The seeds are drawn in order from the step's generator:
    the draws of a unit do not depend on which rank computes it."""
    if share == "images":
        seeds = torch.randint(0, 2**62, (len(batch),), generator=generator).tolist()
        return [(i, idx, seed) for (i, idx), seed in zip(batch, seeds)]
    seeds = iter(torch.randint(0, 2**62, (sum(len(idx) for _, idx in batch),), generator=generator).tolist())
    return [(i, idx[k:k + 1], next(seeds)) for i, idx in batch for k in range(len(idx))]


def _by_image(units: Sequence[tuple[int, np.ndarray, int]]) -> list[tuple[int, np.ndarray, list[torch.Generator]]]:
    """Consecutive units of one image joined (one feature call per image): (image, window
    indices, a generator per unit)."""
    images: list[int] = []
    rows: list[list[np.ndarray]] = []
    gens: list[list[torch.Generator]] = []
    for i, idx, seed in units:
        if not images or images[-1] != i:
            images.append(i)
            rows.append([])
            gens.append([])
        rows[-1].append(idx)
        gens[-1].append(torch.Generator().manual_seed(seed))
    return [(i, np.concatenate(r), g) for i, r, g in zip(images, rows, gens)]
