"""The window features of every path are the same: cached-map SPP (SVM / box-regression training),
in-memory SPP (detection), fc and conv fine-tuning, and R-CNN's crop-and-warp (the baseline and
its training). Written before those paths were merged into one featurizer, to pin their outputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.data.voc import VOCDataset, load_image
from detection.detector import DetectorSettings
from detection.features import conv_maps_for_image, extract_conv_maps, pooled_window_features
from detection.spp import scale_factors
from detection.timing import random_detector, rcnn_twin
from detection.train import rcnn_pool5_fn, spp_pool5_fn

LEVELS = (4, 2, 1)
SCALES = (96, 160)       # two scales: the scale rules matter
MAX_SIZE = 400

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


def _settings(**kw) -> DetectorSettings:
    return DetectorSettings(scales=SCALES, max_size=MAX_SIZE, levels=LEVELS, **kw)


@pytest.mark.parametrize("rule", ["paper", "code"])
@pytest.mark.parametrize("scale_rule", ["area", "code"])
def test_cached_in_memory_and_detection_features_are_equal(dataset, backbone, cache, rule, scale_rule):
    settings = _settings(projection_rule=rule, scale_rule=scale_rule)
    detector = random_detector(backbone, 2, settings, hidden=(8, 8))
    for i, record in enumerate(dataset.records):
        image, boxes = load_image(record), _boxes(record, seed=i)
        cached = spp_pool5_fn(cache, settings)(record, boxes)
        maps = conv_maps_for_image(backbone, image, SCALES, MAX_SIZE)
        in_memory = pooled_window_features(maps.maps, maps.factors, boxes, maps.stride, LEVELS, rule, scale_rule,
                                           first_cell_center=maps.first_cell_center)
        detected = detector.pool5_features(image, boxes.numpy())
        assert cached.shape == (len(boxes), backbone.out_channels * 21)
        torch.testing.assert_close(in_memory, cached, rtol=0, atol=1e-5)
        torch.testing.assert_close(detected, in_memory, rtol=0, atol=0)


def test_fine_tuning_features_are_the_cached_features_at_the_drawn_scale(dataset, backbone, cache):
    # fc fine-tuning: a random scale per window from the cache; conv fine-tuning: one random
    # scale per image, its map computed by the trunk (differentiable) and pooled.
    record = dataset.records[0]
    image, boxes = load_image(record), _boxes(record, seed=5)
    per_scale = [cache.window_features(record, boxes, levels=LEVELS, scale_rule=k) for k in range(len(SCALES))]
    g = torch.Generator().manual_seed(1)
    fc = cache.window_features(record, boxes, levels=LEVELS, scale_rule="random", generator=g)
    drawn = torch.randint(len(SCALES), (len(boxes),), generator=torch.Generator().manual_seed(1))
    assert set(drawn.tolist()) == {0, 1}
    for i, k in enumerate(drawn.tolist()):
        torch.testing.assert_close(fc[i], per_scale[k][i], rtol=0, atol=0)

    # The conv fine-tuning path as pipeline._finetune_conv computed it.
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        factors = scale_factors(image.shape[0], image.shape[1], SCALES, MAX_SIZE)
        k = int(torch.randint(len(factors), (1,), generator=g))
        with torch.no_grad():
            fmap = backbone.trunk(backbone.preprocess(image, factors[k]))[0]
        conv = pooled_window_features([fmap], [factors[k]], boxes, backbone.stride, LEVELS, "paper",
                                      scale_index=torch.zeros(len(boxes), dtype=torch.long),
                                      first_cell_center=float(backbone.first_cell_center))
        torch.testing.assert_close(conv, per_scale[k], rtol=0, atol=1e-5)


def test_rcnn_baseline_and_rcnn_training_features_are_equal(dataset, backbone):
    detector = random_detector(backbone, 2, _settings(), hidden=(8, 8))
    twin = rcnn_twin(detector)
    record = dataset.records[0]
    boxes = _boxes(record, n=5, seed=3)
    trained_on = rcnn_pool5_fn(backbone, LEVELS, twin.settings.rcnn_batch_size)(record, boxes)
    detected = twin.pool5_features(load_image(record), boxes.numpy())
    assert trained_on.shape == (5, backbone.out_channels * 21)
    torch.testing.assert_close(detected, trained_on, rtol=0, atol=0)
