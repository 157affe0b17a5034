"""Tests of detection.training.finetune: window labels, mini-batch sampling, training, exact resumption."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from detection.data.records import ImageRecord
from detection.errors import DetectionError
from detection.training.finetune import FinetuneConfig, WindowLabels, finetune, label_windows, sample_minibatch
from detection.heads import FCHead
from detection.features.pooling import pool_windows, project_boxes

LEVELS = (2, 1)          # 5 bins per channel keep the problem tiny
CHANNELS = 4
STRIDE = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _project_and_pool(fmap, boxes, stride, levels, first_cell_center=0.5):
    """Windows pooled from a map [1, C, H, W] or [C, H, W]: the two public ops."""
    cells = project_boxes(boxes, stride, tuple(fmap.shape[-2:]), first_cell_center=first_cell_center)
    return pool_windows(fmap, cells.to(fmap.device), levels)


def _record(boxes, labels, difficult=None, image_id: str = "img") -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = len(boxes)
    difficult = np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord(image_id=image_id, path=Path(f"/nonexistent/{image_id}.jpg"), width=128, height=128,
                       boxes=boxes, labels=np.asarray(labels, dtype=np.int64), difficult=difficult,
                       truncated=np.zeros(n, bool))


# ---------------------------------------------------------------------------------------------
# label_windows
# ---------------------------------------------------------------------------------------------

def test_label_windows_hand_worked_case():
    cfg = FinetuneConfig()
    # GT A (class 2), GT C (class 1), GT B (class 0) is difficult and must play no part.
    record = _record([[0, 0, 10, 10], [40, 0, 50, 10], [20, 20, 30, 30]], [2, 1, 0], [False, False, True])
    proposals = np.array([
        [0, 0, 10, 5],        # IoU with A = 50 / 100 = 0.5            -> positive, class 2 + 1 = 3
        [0, 0, 10, 4.9],      # 49 / 100 = 0.49                         -> background 0
        [0, 0, 1, 10],        # 10 / 100 = 0.1 (lower edge included)     -> background 0
        [0, 0, 0.99, 10],     # 9.9 / 100 = 0.099                        -> ignored -1
        [20, 20, 30, 30],     # the difficult GT itself: IoU 0 with A, C -> ignored -1
        [41, 0, 50, 10],      # IoU with C = 90 / 100 = 0.9              -> positive, class 1 + 1 = 2
        [8, 0, 44, 10],       # A: 20 / 440, C: 40 / 420, both < 0.1     -> ignored -1
        [5, 0, 45, 10],       # A and C: 50 / 450 = 0.11, in [0.1, 0.5)  -> background 0
    ], dtype=np.float32)
    w = label_windows(record, proposals, cfg)
    # The non-difficult ground truth comes first (it is a positive of its own class).
    np.testing.assert_array_equal(w.boxes[:2], record.boxes[:2])
    np.testing.assert_array_equal(w.boxes[2:], proposals)
    assert w.boxes.dtype == np.float32 and w.labels.dtype == np.int64
    np.testing.assert_array_equal(w.labels, [3, 2, 3, 0, 0, -1, -1, 2, -1, 0])
    np.testing.assert_array_equal(w.fg, [0, 1, 2, 7])
    np.testing.assert_array_equal(w.bg, [3, 4, 9])


def test_label_windows_without_usable_ground_truth():
    cfg = FinetuneConfig()
    props = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], np.float32)
    only_difficult = _record([[0, 0, 10, 10]], [0], [True])
    w = label_windows(only_difficult, props, cfg)
    assert len(w.boxes) == 2 and (w.labels == -1).all() and len(w.fg) == 0 and len(w.bg) == 0
    empty = _record(np.zeros((0, 4)), [])
    w = label_windows(empty, props, cfg)
    assert (w.labels == -1).all()


# ---------------------------------------------------------------------------------------------
# sample_minibatch
# ---------------------------------------------------------------------------------------------

def _windows(n_fg: int, n_bg: int, n_ignored: int = 3, k: int = 3, seed: int = 0) -> WindowLabels:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(1, k + 1, n_fg), np.zeros(n_bg, np.int64), -np.ones(n_ignored, np.int64)])
    perm = rng.permutation(len(labels))
    labels = labels[perm].astype(np.int64)
    boxes = rng.uniform(0, 100, (len(labels), 4)).astype(np.float32)
    return WindowLabels(boxes, labels, np.flatnonzero(labels > 0), np.flatnonzero(labels == 0))


def _labels(windows, batch):
    return np.concatenate([windows[i].labels[idx] for i, idx in batch])


def test_sample_minibatch_honours_batch_size_and_fg_fraction():
    windows = [_windows(20, 50, seed=s) for s in range(5)]
    cfg = FinetuneConfig(batch_size=32, images_per_batch=2, fg_fraction=0.25)
    batch = sample_minibatch(windows, cfg, torch.Generator().manual_seed(0))
    assert len(batch) == 2 and batch[0][0] != batch[1][0]
    for i, idx in batch:
        assert len(np.unique(idx)) == len(idx)                   # no window twice
    labels = _labels(windows, batch)
    assert (labels > 0).sum() == 8 and (labels == 0).sum() == 24        # exactly 25 % of 32
    assert sum(len(idx) for _, idx in batch) == cfg.batch_size
    again = sample_minibatch(windows, cfg, torch.Generator().manual_seed(0))
    assert [(i, idx.tolist()) for i, idx in batch] == [(i, idx.tolist()) for i, idx in again]
    other = sample_minibatch(windows, cfg, torch.Generator().manual_seed(1))
    assert [(i, idx.tolist()) for i, idx in batch] != [(i, idx.tolist()) for i, idx in other]


def test_sample_minibatch_is_exactly_32_positives_of_128_and_refills_short_images():
    # The paper's batch: 128 windows, 32 positives. Images with 3 positives each: 2 images hold
    # 6, so more images are drawn until 32 positives are available (the refill).
    windows = [_windows(3, 40, seed=s) for s in range(30)]
    cfg = FinetuneConfig(batch_size=128, images_per_batch=2, fg_fraction=0.25)
    for seed in range(10):
        batch = sample_minibatch(windows, cfg, torch.Generator().manual_seed(seed))
        labels = _labels(windows, batch)
        assert len(labels) == 128 and (labels > 0).sum() == 32 and (labels == 0).sum() == 96
        assert len(batch) >= 11                                  # ceil(32 / 3) images at least
        pairs = {(i, j) for i, idx in batch for j in idx.tolist()}
        assert len(pairs) == 128                                 # no window twice
    # images_per_batch=None: drawn from across the whole dataset (the code's window data layer).
    across = sample_minibatch(windows, dataclasses.replace(cfg, images_per_batch=None), torch.Generator().manual_seed(0))
    assert len(_labels(windows, across)) == 128 and len(across) > 20


def test_sample_minibatch_repeats_positives_only_when_the_dataset_is_short():
    windows = [_windows(2, 50)]
    cfg = FinetuneConfig(batch_size=16, images_per_batch=4, fg_fraction=0.25)
    ((i, idx),) = sample_minibatch(windows, cfg, torch.Generator().manual_seed(0))
    labels = windows[0].labels[idx]
    # 4 positives are needed and the whole dataset holds 2: drawn with replacement (as the code
    # always draws), so the batch keeps exactly 25 % positives.
    assert i == 0 and (labels > 0).sum() == 4 and (labels == 0).sum() == 12
    assert set(idx[labels > 0].tolist()) <= set(windows[0].fg.tolist())


def test_sample_minibatch_statistics_match_the_paper_recipe():
    # Over many batches every positive window of the chosen pool is equally likely: the share of
    # positives drawn from each image follows its share of the positives (uniform across images,
    # not a fixed share per image).
    windows = [_windows(30, 60, seed=0), _windows(10, 60, seed=1)]
    cfg = FinetuneConfig(batch_size=32, images_per_batch=2, fg_fraction=0.25)
    from_first = 0
    for seed in range(300):
        batch = dict(sample_minibatch(windows, cfg, torch.Generator().manual_seed(seed)))
        from_first += int((windows[0].labels[batch.get(0, np.zeros(0, np.int64))] > 0).sum())
    share = from_first / (300 * 8)
    assert 0.70 < share < 0.80                                   # 30 of 40 positives = 0.75


def test_sample_minibatch_skips_images_without_labelled_windows():
    empty = WindowLabels(np.zeros((3, 4), np.float32), -np.ones(3, np.int64), np.zeros(0, np.int64),
                         np.zeros(0, np.int64))
    windows = [empty, empty, _windows(5, 5), empty, empty]
    cfg = FinetuneConfig(batch_size=8, images_per_batch=1)
    for seed in range(20):
        batch = sample_minibatch(windows, cfg, torch.Generator().manual_seed(seed))
        assert [i for i, _ in batch] == [2]


# ---------------------------------------------------------------------------------------------
# finetune on a tiny problem: fixed conv maps, pooled with the real SPP code
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 2


def _toy_problem(num_images: int = 4, seed: int = 0):
    """Images of 128 x 128 px (8 x 8 conv cells) with one object each; its class lights up a
    channel of the conv map over the object, so windows are learnable from pooled features."""
    rng = np.random.default_rng(seed)
    records, maps, proposals = [], [], []
    for i in range(num_images):
        c = i % NUM_CLASSES
        x1, y1 = rng.integers(0, 48, 2) * 1.0
        gt = np.array([[x1, y1, x1 + 64, y1 + 64]], np.float32)
        fmap = rng.normal(0, 0.3, (CHANNELS, 8, 8)).astype(np.float32)
        c1, r1 = int(x1 // STRIDE), int(y1 // STRIDE)
        fmap[1 + c, r1:r1 + 4, c1:c1 + 4] += 2.0
        records.append(_record(gt, [c], image_id=f"im{i}"))
        maps.append(torch.from_numpy(fmap))
        jitter = rng.uniform(-40, 40, (60, 4)).astype(np.float32)
        props = np.clip(gt + jitter, 0, 128)
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 8)
        proposals.append(props)
    return records, maps, proposals


def _pooled_fn(maps):
    def fn(i: int, boxes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _project_and_pool(maps[i], boxes, stride=STRIDE, levels=LEVELS)
    return fn


def _cfg(**kw) -> FinetuneConfig:
    base = dict(iterations=8, lr=0.01, lr_steps=(5,), batch_size=16, images_per_batch=2, hidden=(16, 16),
                checkpoint_every=3, seed=5)
    base.update(kw)
    return FinetuneConfig(**base)


def _fresh_head(cfg: FinetuneConfig, seed: int = 0) -> FCHead:
    return FCHead(CHANNELS * sum(n * n for n in LEVELS), cfg.hidden, num_classes=NUM_CLASSES,
                  dropout=cfg.dropout, generator=torch.Generator().manual_seed(seed))


def _labelled(records, proposals, cfg):
    return [label_windows(r, p, cfg) for r, p in zip(records, proposals)]


def test_finetune_lowers_the_loss():
    records, maps, proposals = _toy_problem()
    cfg = _cfg(iterations=60, lr=0.03, lr_steps=(), dropout=0.0, checkpoint_every=1000)
    windows = _labelled(records, proposals, cfg)
    head = _fresh_head(cfg)
    seen = []
    losses = finetune(head, windows, _pooled_fn(maps), cfg, progress=lambda it, loss: seen.append((it, loss)))
    assert len(losses) == 60 and [it for it, _ in seen] == list(range(60))
    # An untrained 3-way classifier scores about log(3) = 1.1; windows overlapping an object by
    # IoU 0.1..0.5 look partly like it, so the loss plateaus near 0.5 on this problem.
    assert np.mean(losses[:5]) > 0.7
    assert np.mean(losses[-10:]) < 0.65 * np.mean(losses[:5])
    assert not head.training                                   # left in eval mode


def test_finetune_resumed_from_checkpoint_equals_uninterrupted_run(tmp_path):
    records, maps, proposals = _toy_problem()
    cfg = _cfg()

    # The uninterrupted run.
    head_a = _fresh_head(cfg)
    losses_a = finetune(head_a, _labelled(records, proposals, cfg), _pooled_fn(maps), cfg)

    # A run killed during iteration 4 (the last checkpoint is after iteration 3).
    class Killed(Exception):
        pass

    def kill_at_4(it: int, loss: float) -> None:
        if it == 4:
            raise Killed

    ckpt = tmp_path / "ft.pt"
    head_b = _fresh_head(cfg)
    with pytest.raises(Killed):
        finetune(head_b, _labelled(records, proposals, cfg), _pooled_fn(maps), cfg, checkpoint=ckpt,
                 progress=kill_at_4)
    assert ckpt.exists()
    assert torch.load(ckpt, weights_only=True)["iteration"] == 3

    # Resumed with new objects everywhere (a different initial head, too: the checkpoint wins).
    head_c = _fresh_head(cfg, seed=99)
    records2, maps2, proposals2 = _toy_problem()
    losses_c = finetune(head_c, _labelled(records2, proposals2, cfg), _pooled_fn(maps2), cfg, checkpoint=ckpt)
    assert losses_c == losses_a[3:]
    sa, sc = head_a.state_dict(), head_c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    # The final checkpoint is at the end of the run: calling again does nothing.
    assert finetune(_fresh_head(cfg, seed=98), _labelled(records, proposals, cfg), _pooled_fn(maps), cfg,
                    checkpoint=ckpt) == []


def test_finetune_does_not_resume_a_checkpoint_of_other_settings(tmp_path):
    records, maps, proposals = _toy_problem()
    cfg = _cfg(iterations=3)
    ckpt = tmp_path / "ft.pt"
    finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), _pooled_fn(maps), cfg, checkpoint=ckpt)
    other = dataclasses.replace(cfg, lr=0.02)
    head_a, head_b = _fresh_head(other), _fresh_head(other)
    losses_a = finetune(head_a, _labelled(records, proposals, other), _pooled_fn(maps), other)
    losses_b = finetune(head_b, _labelled(records, proposals, other), _pooled_fn(maps), other, checkpoint=ckpt)
    assert losses_b == losses_a and len(losses_b) == 3          # started over, not resumed
    assert all(torch.equal(a, b) for a, b in zip(head_a.state_dict().values(), head_b.state_dict().values()))


def test_finetune_checkpoint_key_guards_the_features(tmp_path):
    records, maps, proposals = _toy_problem()
    cfg = _cfg(iterations=3)
    ckpt = tmp_path / "ft.pt"
    finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), _pooled_fn(maps), cfg, checkpoint=ckpt,
             checkpoint_key="backbone A")
    more = dataclasses.replace(cfg, iterations=5)
    resumed = finetune(_fresh_head(more), _labelled(records, proposals, more), _pooled_fn(maps), more,
                       checkpoint=ckpt, checkpoint_key="backbone A")
    assert len(resumed) == 2                                   # same key: a longer run resumes
    other = finetune(_fresh_head(more), _labelled(records, proposals, more), _pooled_fn(maps), more,
                     checkpoint=ckpt, checkpoint_key="backbone B")
    assert len(other) == 5                                     # other features: starts over


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_finetune_damaged_checkpoint_is_named_and_redone(tmp_path, caplog, damage):
    """A checkpoint whose bytes do not match the checksum written with it (a flipped byte, a file
    cut short, another file in its place) is named in a warning and fine-tuning starts over: the
    result equals a run that never had a checkpoint."""
    records, maps, proposals = _toy_problem()
    cfg = _cfg(iterations=3)
    ckpt = tmp_path / "ft.pt"
    finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), _pooled_fn(maps), cfg, checkpoint=ckpt)
    assert (tmp_path / "ft.pt.crc32").is_file()
    data = bytearray(ckpt.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        del data[len(data) - 100:]
    else:
        data = bytearray(b"PK\x03\x04 not really a zip")
    ckpt.write_bytes(bytes(data))
    more = dataclasses.replace(cfg, iterations=5)
    head_a, head_b = _fresh_head(more), _fresh_head(more)
    losses_a = finetune(head_a, _labelled(records, proposals, more), _pooled_fn(maps), more)
    with caplog.at_level(logging.WARNING):
        losses_b = finetune(head_b, _labelled(records, proposals, more), _pooled_fn(maps), more, checkpoint=ckpt)
    assert f"{ckpt}: fine-tuning checkpoint is corrupt or torn" in caplog.text
    assert losses_b == losses_a and len(losses_b) == 5          # started over, not resumed
    assert all(torch.equal(a, b) for a, b in zip(head_a.state_dict().values(), head_b.state_dict().values()))


def test_finetune_leaves_global_rng_alone_and_repeats():
    records, maps, proposals = _toy_problem()
    cfg = _cfg(iterations=3)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    losses1 = finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), _pooled_fn(maps), cfg)
    assert torch.equal(torch.rand(2), expected)
    losses2 = finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), _pooled_fn(maps), cfg)
    assert losses1 == losses2


def test_finetune_refuses_without_positives_or_fc8():
    records, maps, proposals = _toy_problem(num_images=2)
    cfg = _cfg(iterations=1)
    far = [np.array([[0, 0, 2, 2]], np.float32)] * 2
    no_gt = [_record(np.zeros((0, 4)), [], image_id=f"e{i}") for i in range(2)]
    with pytest.raises(DetectionError, match="nothing to fine-tune"):
        finetune(_fresh_head(cfg), _labelled(no_gt, far, cfg), _pooled_fn(maps), cfg)
    head = FCHead(20, (16, 16), num_classes=None)
    with pytest.raises(ValueError, match="fc8"):
        finetune(head, _labelled(records, proposals, cfg), _pooled_fn(maps), cfg)


def test_finetune_survives_images_without_labelled_windows():
    records, maps, proposals = _toy_problem(num_images=2)
    empties = [_record([[0, 0, 10, 10]], [0], [True], image_id=f"d{i}") for i in range(6)]
    all_records = records + empties
    all_maps = maps + [maps[0]] * 6
    all_props = proposals + [proposals[0]] * 6
    cfg = _cfg(iterations=10, images_per_batch=1, checkpoint_every=1000)
    losses = finetune(_fresh_head(cfg), _labelled(all_records, all_props, cfg), _pooled_fn(all_maps), cfg)
    assert len(losses) == 10 and np.isfinite(losses).all()


# ---------------------------------------------------------------------------------------------
# Conv fine-tuning through SPP
# ---------------------------------------------------------------------------------------------

def _conv_problem():
    records, _, proposals = _toy_problem(num_images=2)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, 3, 128, 128, generator=g) for _ in records]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trunk = nn.Conv2d(3, CHANNELS, kernel_size=STRIDE, stride=STRIDE)    # 128 px -> 8 cells

    def fn(i: int, boxes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return _project_and_pool(trunk(images[i]), boxes, stride=STRIDE, levels=LEVELS, first_cell_center=8.0)
    return records, proposals, trunk, fn


def test_conv_finetuning_updates_the_trunk(tmp_path):
    records, proposals, trunk, fn = _conv_problem()
    cfg = _cfg(iterations=4)
    before = trunk.weight.detach().clone()
    head = _fresh_head(cfg)
    finetune(head, _labelled(records, proposals, cfg), fn, cfg, trunk=trunk, checkpoint=tmp_path / "c.pt")
    assert not torch.equal(trunk.weight, before)
    assert "trunk" in torch.load(tmp_path / "c.pt", weights_only=True)
    assert not trunk.training

    # Without the trunk given, it is not trained, even though gradients reach it.
    records, proposals, trunk, fn = _conv_problem()
    before = trunk.weight.detach().clone()
    finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), fn, cfg)
    assert torch.equal(trunk.weight, before)


def test_trunk_lr_mult_scales_the_trunks_steps():
    # conv_finetune.conv_lr_mult reaches the optimizer: with momentum and weight decay, plain SGD's
    # first step is -lr * mult * (grad + wd * w), so a multiplier of 0 leaves the trunk as it was
    # and 2 moves it twice as far as 1.
    cfg = _cfg(iterations=1)
    steps = {}
    for mult in (0.0, 1.0, 2.0):
        records, proposals, trunk, fn = _conv_problem()
        before = trunk.weight.detach().clone()
        finetune(_fresh_head(cfg), _labelled(records, proposals, cfg), fn, cfg, trunk=trunk, trunk_lr_mult=mult)
        steps[mult] = (trunk.weight.detach() - before).double()
    assert torch.equal(steps[0.0], torch.zeros_like(steps[0.0]))
    assert steps[1.0].abs().max() > 0
    torch.testing.assert_close(steps[2.0], 2 * steps[1.0], rtol=1e-4, atol=1e-7)
