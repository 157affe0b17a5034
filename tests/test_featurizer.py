"""The one featurizer (detection.features.featurizer) against slow references (tests/references.py):
cached-map SPP (SVM / box-regression training), in-memory SPP (detection), fc and conv
fine-tuning, and R-CNN's crop-and-warp (the baseline and its training) each give the window
features that a loop over boxes, cells and bins computes from the paper's rules."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.data.images import load_image
from detection.data.voc import VOCDataset
from detection.detector import DetectorSettings
from detection.errors import DetectionError
from detection.features import (CachedSPPFeaturizer, CropWarpFeaturizer, InMemorySPPFeaturizer, RecomputedSPPFeaturizer,
                                cache_records, conv_maps_for_image, extract_conv_maps, make_featurizer, pooled_window_features,
                                training_featurizer)
from detection.features.scales import scale_factors
from detection.timer import StageTimer
from detection.timing import random_detector, rcnn_twin
from references import reference_factors, reference_rcnn_features, reference_scale, reference_spp_features

LEVELS = (4, 2, 1)
# Two scales large enough that windows of the 320x240 images go to either one under the paper's
# 224 px and the code's 208 px targets (windows above ~170 px a side to the smaller): the scale
# rules matter.
SCALES = (200, 400)
MAX_SIZE = 800

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone():
    # squeezenet: its first conv cell is centred at 15.5 px, so a path that forgets the trunk's
    # geometry shows up.
    return build_backbone("squeezenet1_1", seed=0)


@pytest.fixture(scope="module")
def dataset(synthetic_voc):
    ds = copy.copy(VOCDataset(synthetic_voc, "trainval"))
    ds.records = list(ds.records[:2])
    return ds


@pytest.fixture(scope="module")
def cache(dataset, backbone, tmp_path_factory):
    return extract_conv_maps(dataset, backbone, tmp_path_factory.mktemp("maps"), scales=SCALES, max_size=MAX_SIZE,
                             num_workers=0, progress=False)


def _boxes(record, n: int = 30, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [record.width - 20, record.height - 20], (n, 2))
    wh = rng.uniform(8, 200, (n, 2))
    return torch.from_numpy(np.concatenate([xy, xy + wh], axis=1).astype(np.float32))


def _scales_used(record, boxes, scale_rule) -> set[int]:
    factors = reference_factors(record.height, record.width, SCALES, MAX_SIZE)
    return {reference_scale(b, factors, scale_rule) for b in boxes.tolist()}


def _settings(**kw) -> DetectorSettings:
    return DetectorSettings(scales=SCALES, max_size=MAX_SIZE, levels=LEVELS, **kw)


@pytest.mark.parametrize("rule", ["paper", "code"])
@pytest.mark.parametrize("scale_rule", ["area", "code"])
def test_cached_in_memory_and_detection_features_are_equal(dataset, backbone, cache, rule, scale_rule):
    settings = _settings(projection_rule=rule, scale_rule=scale_rule)
    detector = random_detector(backbone, 2, settings, hidden=(8, 8))
    for i, record in enumerate(dataset.records):
        image, boxes = load_image(record), _boxes(record, seed=i)
        assert _scales_used(record, boxes, scale_rule) == {0, 1}
        cached = make_featurizer("spp", settings, cache=cache)(record, boxes)
        maps = conv_maps_for_image(backbone, image, SCALES, MAX_SIZE)
        pooled = pooled_window_features(maps.maps, maps.factors, boxes, maps.stride, LEVELS, rule, scale_rule,
                                        first_cell_center=maps.first_cell_center)
        in_memory = make_featurizer("spp", settings, backbone=backbone).pool5(record, boxes)
        detected = detector.pool5_features(image, boxes.numpy())
        ref = torch.from_numpy(reference_spp_features(backbone, image, boxes.numpy(), SCALES, MAX_SIZE, LEVELS, rule,
                                                      scale_rule)).float()
        assert ref.shape == (len(boxes), backbone.out_channels * 21)
        for got in (cached, in_memory, pooled, detected):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_fine_tuning_features_are_the_cached_features_at_the_drawn_scale(dataset, backbone, cache):
    # fc fine-tuning: a random scale per window from the cache; conv fine-tuning: one random
    # scale per image, its map computed by the trunk (differentiable) and pooled.
    record = dataset.records[0]
    image, boxes = load_image(record), _boxes(record, seed=5)
    cached = make_featurizer("spp", _settings(), cache=cache)
    per_scale = [cached.pool5(record, boxes, scale_rule=k) for k in range(len(SCALES))]
    g = torch.Generator().manual_seed(1)
    fc = cached.finetune_fn(dataset.records)(0, boxes, g)
    drawn = torch.randint(len(SCALES), (len(boxes),), generator=torch.Generator().manual_seed(1))
    assert set(drawn.tolist()) == {0, 1}
    for i, k in enumerate(drawn.tolist()):
        torch.testing.assert_close(fc[i], per_scale[k][i], rtol=0, atol=0)

    # Conv fine-tuning: the draw pipeline's conv stage made before the merge, one scale per image,
    # and gradients reach the trunk.
    conv_fn = make_featurizer("spp", _settings(), backbone=backbone).finetune_fn([image])
    for seed in range(4):
        factors = scale_factors(image.shape[0], image.shape[1], SCALES, MAX_SIZE)
        k = int(torch.randint(len(factors), (1,), generator=torch.Generator().manual_seed(seed)))
        conv = conv_fn(0, boxes, torch.Generator().manual_seed(seed))
        assert conv.requires_grad
        torch.testing.assert_close(conv.detach(), per_scale[k], rtol=0, atol=1e-5)
    conv.sum().backward()
    assert all(p.grad is not None for p in backbone.trunk.parameters() if p.requires_grad)
    backbone.trunk.zero_grad(set_to_none=True)


def test_without_the_cache_training_reads_the_cached_features_bit_for_bit(dataset, backbone, tmp_path):
    # features.cache=false: the same maps computed again at each call, pooled the same way, for
    # every scale rule, fine-tuning's random scale per window, and the flipped records.
    settings = _settings()
    with_flips = extract_conv_maps(dataset, backbone, tmp_path / "maps", scales=SCALES, max_size=MAX_SIZE,
                                   include_flipped=True, num_workers=0, progress=False)
    records = cache_records(dataset, include_flipped=True)
    assert [r.flipped for r in records] == [False, False, True, True]
    cached = make_featurizer("spp", settings, cache=with_flips)
    recomputed = training_featurizer("spp", settings, dataset, backbone, tmp_path / "none", cache=False)
    assert type(recomputed) is RecomputedSPPFeaturizer and not (tmp_path / "none").exists()
    for i, record in enumerate(records):
        boxes = _boxes(record, seed=10 + i)
        for rule in ("area", "code", 0, 1):
            torch.testing.assert_close(recomputed.pool5(record, boxes, scale_rule=rule),
                                       cached.pool5(record, boxes, scale_rule=rule), rtol=0, atol=0)
        got = recomputed.finetune_fn(records)(i, boxes, torch.Generator().manual_seed(i))
        want = cached.finetune_fn(records)(i, boxes, torch.Generator().manual_seed(i))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert recomputed.conv_passes == 5 * len(records)
    with pytest.raises(DetectionError, match="without the cache nothing is stored"):
        training_featurizer("spp", settings, dataset, backbone, tmp_path / "none", cache=False, fp16=True)


def test_rcnn_baseline_and_rcnn_training_features_are_the_warped_crops(dataset, backbone):
    detector = random_detector(backbone, 2, _settings(), hidden=(8, 8))
    twin = rcnn_twin(detector)
    record = dataset.records[0]
    boxes = _boxes(record, n=3, seed=3)
    boxes[0] = torch.tensor([-10.0, -6.0, 40.0, 30.0])    # padded beyond the image: reads the mean colour
    trained_on = make_featurizer("rcnn", twin.settings, backbone=backbone)(record, boxes)
    detected = twin.pool5_features(load_image(record), boxes.numpy())
    ref = torch.from_numpy(reference_rcnn_features(backbone, load_image(record), boxes.numpy(), LEVELS)).float()
    assert ref.shape == (3, backbone.out_channels * 21)
    # A bilinear warp in float64 vs roi_align in float32, through the trunk: agree to ~1e-5 relative.
    torch.testing.assert_close(trained_on, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(detected, ref, rtol=1e-4, atol=1e-4)


def test_one_place_picks_the_implementation_and_the_timer_sees_its_stages(backbone, cache, dataset):
    settings = _settings()
    assert type(make_featurizer("spp", settings, cache=cache)) is CachedSPPFeaturizer
    assert type(make_featurizer("spp", settings, backbone=backbone)) is InMemorySPPFeaturizer
    assert type(make_featurizer("spp", settings, backbone=backbone, cache_features=True)) is RecomputedSPPFeaturizer
    assert type(make_featurizer("rcnn", settings, backbone=backbone)) is CropWarpFeaturizer
    assert type(random_detector(backbone, 2, settings, hidden=(8, 8)).featurizer) is InMemorySPPFeaturizer
    with pytest.raises(DetectionError, match="unknown method 'fast'"):
        make_featurizer("fast", settings, backbone=backbone)
    with pytest.raises(DetectionError, match=r"holds scales \[200, 400\]"):
        make_featurizer("spp", DetectorSettings(scales=(96,), max_size=MAX_SIZE), cache=cache)
    record = dataset.records[0]
    boxes = _boxes(record, n=4)
    for method, stages in (("spp", {"conv", "pool"}), ("rcnn", {"conv", "pool"})):
        timer = StageTimer("cpu")
        featurizer = make_featurizer(method, settings, backbone=backbone)
        head_less = featurizer.features(load_image(record), boxes, layer="pool5", timer=timer)
        torch.testing.assert_close(head_less, featurizer.pool5(record, boxes), rtol=0, atol=0)
        assert set(timer.seconds) == stages | {"fc"}
