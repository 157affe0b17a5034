"""detection.classification: fixed-length SPP output, the no-SPP pool5, multi-size switching,
bucketing without padding, views, metrics, classifier.pt validation and an accuracy floor."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection.classification import (ClassifierConfig, build_classifier, load_classifier, make_scale_folder,
                                      read_split, save_classifier, train_classifier)
from detection.classification.api import resolve_config
from detection.classification.buckets import bucket_shape, pad_to_batch
from detection.classification.data import read_voc_labels
from detection.classification.metrics import image_ap, topk_accuracy
from detection.classification.regimes import CROP_POSITIONS, Item, make_input, plan_epoch
from detection.classification.views import evaluate, score_image, view_windows
from detection.config import ConfigError
from detection.data.voc import VOCDataset
from detection.errors import DetectionError, ModelError
from detection.model import load_model, save_model

#: Small inputs so that the tests run in seconds: ZF-5 (random init) at 64 px, a 3-level pyramid.
SMALL = ["model.backbone=zf5", "model.levels=[3,2,1]", "model.hidden=[64]", "model.fixed_input=64",
         "train.crop=64", "train.resize=72", "train.sizes=[64,52]", "train.any_side=64", "train.batch_size=16",
         "test.resize=72", "test.crop=64", "test.full_side=64", "test.multi_scales=[64,80]"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """Synthetic ImageFolder: 4 shape classes, 16 train / 8 test images each, 64 px high, objects 16-64 px."""
    return make_scale_folder(tmp_path_factory.mktemp("cls") / "tiny", train_per_class=16, test_per_class=8,
                             height=64, object_range=(16.0, 64.0), seed=1)


def small_cfg(*extra: str, **flags) -> ClassifierConfig:
    return resolve_config(overrides=SMALL + list(extra), **flags)


def classes4():
    return ("a", "b", "c", "d")


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

def test_spp_output_is_fixed_length_for_any_input_size():
    torch.manual_seed(0)
    model = build_classifier(small_cfg(), classes4(), False).eval()
    dims = set()
    with torch.no_grad():
        for h, w in ((64, 64), (64, 150), (97, 61), (200, 120)):
            x = torch.randn(2, 3, h, w)
            pooled = model.pool_map(model.conv_map(x))
            dims.add(pooled.shape[1])
            assert model(x).shape == (2, 4)
    assert dims == {256 * (9 + 4 + 1)}     # ZF-5's 256 channels x 14 bins


def test_no_spp_pool5_is_the_fixed_window_and_refuses_other_sizes():
    model = build_classifier(small_cfg(no_spp=True), classes4(), False).eval()
    fmap = torch.randn(1, 3, *model.fixed_map, dtype=torch.float32)
    # Slow reference: bins of the finest level, window ceil(a/n), stride floor(a/n), explicit loops.
    a, n = model.fixed_map[0], max(model.cfg.levels)
    k, s = math.ceil(a / n), a // n
    m = (a - k) // s + 1
    ref = torch.empty(1, 3, m, m)
    for i in range(m):
        for j in range(m):
            ref[0, :, i, j] = fmap[0, :, i * s:i * s + k, j * s:j * s + k].amax(dim=(1, 2))
    assert torch.equal(model.pool_map(fmap), ref.flatten(1))
    with pytest.raises(DetectionError, match="takes only 64x64"):
        model(torch.randn(1, 3, 80, 80))


def test_config_refuses_multi_size_without_spp_and_unknown_keys():
    with pytest.raises(ConfigError, match="needs the SPP layer"):
        small_cfg(no_spp=True, regime="multi")
    with pytest.raises(ConfigError, match="unknown config key"):
        small_cfg("train.epoch=3")
    with pytest.raises(ConfigError, match="train.crop"):
        small_cfg("train.crop=100")


# ---------------------------------------------------------------------------------------------
# Regimes and buckets
# ---------------------------------------------------------------------------------------------

def test_multi_size_switches_every_epoch_and_resizes_the_same_crop():
    cfg = small_cfg(regime="multi").train
    rng = np.random.default_rng(0)
    sizes = [(int(w), 72) for w in rng.integers(72, 140, 20)]
    for epoch, side in enumerate((64, 52, 64, 52)):
        plan = plan_epoch(cfg, sizes, epoch)
        assert {b.shape for b in plan} == {(side, side)}
        assert sorted(it.index for b in plan for it in b.items) == list(range(20))
    image = rng.integers(0, 256, (72, 101, 3), dtype=np.uint8)
    for position in range(len(CROP_POSITIONS)):
        for flip in (False, True):
            item = Item(0, position, flip)
            big = make_input(image, item, (64, 64), cfg)
            small = make_input(image, item, (52, 52), cfg)
            # Reference: slice the crop by hand, resize it, then mirror.
            y = {0: 4, 1: 0, 2: 0, 3: 8, 4: 8}[position]
            x = {0: 18, 1: 0, 2: 37, 3: 0, 4: 37}[position]
            crop = image[y:y + 64, x:x + 64]
            want = cv2.resize(crop, (52, 52), interpolation=cv2.INTER_AREA)
            if flip:
                crop, want = crop[:, ::-1], want[:, ::-1]
            assert np.array_equal(big, crop) and np.array_equal(small, want)


def test_single_size_always_feeds_the_crop_size():
    cfg = small_cfg(regime="single").train
    plans = [plan_epoch(cfg, [(100, 72)] * 5, e) for e in range(3)]
    assert {b.shape for p in plans for b in p} == {(64, 64)}


def test_bucket_shape_is_the_nearest_bucket():
    rng = np.random.default_rng(1)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(20, 800, 2))
        shape = bucket_shape(w, h, 64, 0.1, 3.0)
        a = min(max(math.log(w / h), -math.log(3)), math.log(3))
        k = min(range(-12, 13), key=lambda j: abs(a - 0.1 * j))     # brute force over buckets
        long_side = int(round(64 * min(math.exp(abs(k) * 0.1), 3.0)))
        assert shape == ((64, long_side) if k >= 0 else (long_side, 64))
        if 1 / 3 <= w / h <= 3:
            got = shape[1] / shape[0]
            assert abs(math.log(got) - math.log(w / h)) <= 0.05 + 1.5 / 64   # half a step + rounding


def test_any_size_bucketing_never_pads():
    cfg = small_cfg("train.batch_size=4", regime="any").train
    rng = np.random.default_rng(2)
    sizes = [(int(rng.integers(40, 200)), 64) for _ in range(37)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
    for epoch in range(2):
        plan = plan_epoch(cfg, sizes, epoch)
        assert sorted(it.index for b in plan for it in b.items) == list(range(37))
        for batch in plan:
            assert len(batch.items) <= 4
            for it in batch.items:
                w, h = sizes[it.index]
                assert bucket_shape(w, h, 64, cfg.aspect_step, cfg.max_aspect) == batch.shape
                assert make_input(images[it.index], it, batch.shape, cfg).shape[:2] == batch.shape
    padded = small_cfg("train.batching=pad", regime="any").train
    assert all(b.shape is None for b in plan_epoch(padded, sizes, 0))


def test_pad_to_batch_pads_bottom_right_with_zeros():
    a, b = torch.ones(1, 3, 2, 5), torch.full((1, 3, 4, 3), 2.0)
    out = pad_to_batch([a, b])
    assert out.shape == (2, 3, 4, 5)
    assert torch.equal(out[0, :, :2, :5], a[0]) and out[0, :, 2:].abs().sum() == 0
    assert torch.equal(out[1, :, :4, :3], b[0]) and out[1, :, :, 3:].abs().sum() == 0


# ---------------------------------------------------------------------------------------------
# Views and metrics
# ---------------------------------------------------------------------------------------------

def test_view_windows():
    assert view_windows(224, 224, 224) == [(0, 0, 224, 224)]
    assert len(view_windows(224, 300, 224)) == 3
    assert len(view_windows(300, 400, 224)) == 9


def test_multi_view_of_a_crop_sized_image_is_the_full_view_and_its_mirror():
    cfg = small_cfg("test.multi_scales=[64]")
    model = build_classifier(cfg, classes4(), False).eval()
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        multi = score_image(model, image, "multi", cfg.test)
        full = score_image(model, image, "full", cfg.test)
        mirror = score_image(model, np.ascontiguousarray(image[:, ::-1]), "full", cfg.test)
    assert torch.allclose(multi, (full + mirror) / 2, atol=1e-6)


def test_topk_and_image_ap_against_hand_computed_values():
    scores = np.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    # Ranked: s=.9 pos, .8 neg, .7 ignored, .6 pos -> precision 1 at recall .5, 2/3 at recall 1.
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    t = np.array([1, 0, -1, 1, 0], np.int8)
    expected = (6 * 1.0 + 5 * (2 / 3)) / 11          # VOC07 11-point: t = 0..0.5 and 0.6..1.0
    assert image_ap(s, t) == pytest.approx(expected)


def test_voc_image_labels(synthetic_voc):
    data = read_voc_labels(synthetic_voc, "trainval")
    records = VOCDataset(synthetic_voc, "trainval").records
    for sample, rec in zip(data.samples, records):
        for k in range(len(data.classes)):
            mine = rec.labels == k
            want = 1 if (mine & ~rec.difficult).any() else (-1 if mine.any() else 0)
            assert sample.targets[k] == want


# ---------------------------------------------------------------------------------------------
# classifier.pt
# ---------------------------------------------------------------------------------------------

def test_classifier_file_round_trip_and_validation(tmp_path):
    cfg = small_cfg()
    model = build_classifier(cfg, classes4(), False).eval()
    path = tmp_path / "classifier.pt"
    save_classifier(path, model, cfg)
    loaded, cfg2, meta = load_classifier(path)
    assert cfg2 == cfg and loaded.classes == classes4()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))

    tensors, meta = load_model(path)

    def tampered(name, t, m):
        p = tmp_path / name
        save_model(p, t, m)
        return p

    bad_cfg = dict(meta, config={**meta["config"], "train": {**meta["config"]["train"], "regimen": "any"}})
    with pytest.raises(ModelError, match="unknown config key"):
        load_classifier(tampered("a.pt", tensors, bad_cfg))
    with pytest.raises(ModelError, match="class name"):
        load_classifier(tampered("b.pt", tensors, dict(meta, classes=["a", "a", "c", "d"])))
    with pytest.raises(ModelError, match="do not fit"):
        load_classifier(tampered("c.pt", tensors, dict(meta, classes=["a", "b", "c"])))
    nan = dict(tensors)
    nan["fc.1.weight"] = torch.full_like(nan["fc.1.weight"], float("nan"))
    with pytest.raises(ModelError, match="non-finite"):
        load_classifier(tampered("d.pt", nan, meta))
    with pytest.raises(ModelError, match="not a classifier"):
        load_classifier(tampered("e.pt", tensors, {k: v for k, v in meta.items() if k != "kind"}))
    missing = {k: v for k, v in tensors.items() if not k.startswith("fc.")}
    with pytest.raises(ModelError, match="missing"):
        load_classifier(tampered("f.pt", missing, meta))


# ---------------------------------------------------------------------------------------------
# Accuracy floors (chance is 0.25)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("regime", ["single", "multi", "any"])
def test_svm_head_accuracy_floor(tiny_folder, regime):
    train = read_split(tiny_folder, "train")
    test = read_split(tiny_folder, "test", train.classes)
    cfg = small_cfg("model.head=svm", regime=regime)
    model, stats = train_classifier(train, cfg)
    for view in ("center", "full"):
        assert evaluate(model, test, view, cfg.test)["top1"] >= 0.65


@pytest.mark.slow
def test_fc_head_accuracy_floor(tiny_folder):
    train = read_split(tiny_folder, "train")
    test = read_split(tiny_folder, "test", train.classes)
    cfg = small_cfg("train.lr=0.003", "train.epochs=15", "model.dropout=0.0", regime="single")
    model, stats = train_classifier(train, cfg)
    assert stats["epoch_losses"][-1] < stats["epoch_losses"][0]
    assert evaluate(model, test, "center", cfg.test)["top1"] >= 0.5
