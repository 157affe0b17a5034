"""The optional conv fine-tuning stage: the trunk trained through SPP (with a small fc head) on
the training windows before their conv maps are cached (beyond the paper, as Fast R-CNN does)."""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import comm
from ..features.featurizer import make_featurizer
from ..features.pooling import pool5_dim
from ..training.finetune import finetune, label_windows
from ..heads import FCHead
from ..io.files import atomic_torch_save, load_verified_torch, make_dirs
from .config import PipelineConfig
from .stages import StageBook

__all__ = ["finetune_conv"]

log = logging.getLogger(__name__)


def finetune_conv(cfg: PipelineConfig, key: str, backbone: Any, train_ds: Any, train_props: Any, work: Path,
                  stages: StageBook, progress: bool) -> None:
    """Train the conv trunk (with a small fc head) through SPP on the training windows, then keep
    the trunk. Resumable through the fine-tuning checkpoint; skipped when already done. Under
    ``torchrun`` the images of each mini-batch are shared out over the ranks and the gradients
    summed (the same trunk on every rank); rank 0 alone writes the checkpoints. ``key``: the
    stage's (:func:`.stages.stage_keys`)."""
    c = cfg.conv_finetune
    trunk_path = work / "trunk.pt"
    if stages.done("conv_finetune", key, trunk_path):
        try:
            state = load_verified_torch(trunk_path, "fine-tuned conv layers")
            copy.deepcopy(backbone.trunk).load_state_dict(state)   # check it fits before touching the trunk
        except Exception as e:  # noqa: BLE001 - any unreadable file: redo the stage, do not crash
            log.warning("%s cannot be read (%s): training the conv layers again", trunk_path,
                        " ".join(str(e).split())[:200] or type(e).__name__)
        else:
            backbone.trunk.load_state_dict(state)
            backbone.weights_id = f"finetuned:{key}"
            return
    t0 = time.perf_counter()
    records = train_ds.records
    windows = [label_windows(r, train_props.proposals_for_record(r), c) for r in records]
    # SPP through the trunk whatever the method: one differentiable conv pass per image at a
    # random scale. On the CPU, where the trunk is until the features are extracted.
    featurizer = make_featurizer("spp", cfg.features.feature_settings(), backbone=backbone, device="cpu")
    gen = torch.Generator().manual_seed(c.seed)
    head = FCHead(pool5_dim(backbone.out_channels, cfg.features.levels), c.hidden,
                  num_classes=len(train_ds.classes), dropout=c.dropout, generator=gen)
    make_dirs(work)
    bar = tqdm(total=c.iterations, desc="fine-tune conv", disable=not progress)
    losses = finetune(head, windows, featurizer.finetune_fn(records), c, checkpoint=work / "checkpoint.pt",
                      trunk=backbone.trunk, checkpoint_key=f"conv:{key}:{backbone.name}:{backbone.weights_id}",
                      progress=lambda it, loss: bar.update(1) or bar.set_postfix(loss=f"{loss:.3f}"),
                      write_checkpoints=comm.is_main(), trunk_lr_mult=c.conv_lr_mult)
    bar.close()
    if comm.is_main():
        atomic_torch_save(trunk_path, backbone.trunk.state_dict(), checksum=True)
    backbone.weights_id = f"finetuned:{key}"
    stages.mark("conv_finetune", key, time.perf_counter() - t0,
                first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
