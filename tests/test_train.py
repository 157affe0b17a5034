"""detection.training.detector_training: the box regressors read features only of proposals near
a ground truth, one class at a time, and get exactly the model that reading every proposal gives."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.data.records import ImageRecord
from detection.detector import DetectorSettings
from detection.errors import DetectionError
from detection.linear import UNTRAINED_BIAS
from detection.training.window_source import WindowFeatureSource
from detection.training.bbox_regression import BBoxRegressionConfig, ClassRegressor, train_box_regressors
from detection.training.detector_training import TrainCheckpoint, TrainConfig, regression_sources, train_detector
from detection.training.from_features import fc_finetune_schedule
from detection.training.samples import compute_feature_scale
from detection.training.svm import SVMConfig

DIM = 12


def _record(i: int, rng: np.random.Generator) -> ImageRecord:
    xy = rng.uniform(0, 60, (2, 2))
    gt = np.concatenate([xy, xy + rng.uniform(20, 40, (2, 2))], axis=1).astype(np.float32)
    return ImageRecord(image_id=f"im{i}", path=Path(f"im{i}.jpg"), width=120, height=120, boxes=gt,
                       labels=np.array([0, 1]), difficult=np.array([False, i % 3 == 0]),
                       truncated=np.zeros(2, bool))


def _proposals(record: ImageRecord) -> np.ndarray:
    rng = np.random.default_rng(int(record.image_id[2:]))
    jitter = np.repeat(record.boxes, 30, axis=0) + rng.normal(0, 6, (60, 4)).astype(np.float32)
    xy = rng.uniform(0, 80, (60, 2))
    far = np.concatenate([xy, xy + rng.uniform(5, 40, (60, 2))], axis=1).astype(np.float32)
    boxes = np.concatenate([jitter, far])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes


def _pool5(record: ImageRecord, boxes: torch.Tensor) -> torch.Tensor:
    # A deterministic per-window feature (what pooling a cached map is): depends on the box only.
    b = boxes.double()
    basis = torch.arange(1, DIM + 1, dtype=torch.float64)
    return torch.relu(torch.sin(b[:, :1] * basis / 40) + torch.cos(b[:, 2:3] * basis / 50) + b[:, 1:2] / 100).float()


@pytest.mark.parametrize("max_samples,max_gt_samples", [(None, None), (15, None), (15, 5)])
def test_per_class_regression_sources_give_the_regressors_of_every_proposal(max_samples, max_gt_samples):
    # max_samples=15 caps both classes (~30-60 samples each), max_gt_samples=5 their GT rows (12
    # and 8): the per-class sources pick the capped subsets before pooling; the single source
    # plans on every proposal.
    rng = np.random.default_rng(0)
    records = [_record(i, rng) for i in range(12)]
    cfg = BBoxRegressionConfig(lam=10.0, max_samples=max_samples, max_gt_samples=max_gt_samples)
    every = WindowFeatureSource(records, _proposals, _pool5, None, "pool5", DIM)
    per_class = regression_sources(every, 2, cfg)
    # class 1 is difficult in every third image: those images are not read for it
    assert [r.image_id for r in per_class[1].records] == [r.image_id for i, r in enumerate(records) if i % 3]
    assert 0 < len(per_class[0].image(0).boxes) < len(every.image(0).boxes)
    a = train_box_regressors(every, 2, cfg, feature_scale=0.5)
    b = train_box_regressors(per_class, 2, cfg, feature_scale=0.5)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.biases, b.biases)
    assert a.meta["stats"] == b.meta["stats"]
    counts = [a.meta["stats"][f"class_{c}"]["num_samples"] for c in range(2)]
    if max_samples is None:
        assert min(counts) > 15
    elif max_gt_samples is None:             # the GT boxes (12 and 8) plus 15 proposals each
        assert counts == [12 + 15, 8 + 15]
    else:
        assert counts == [5 + 15, 5 + 15]


def test_feature_norm_from_sampled_rows_equals_the_norm_from_every_row():
    # compute_feature_scale pools only the rows it draws when the source can; the same rows are
    # drawn, so the scale is the one computed from every candidate's features.
    class EveryRow(WindowFeatureSource):
        sample_candidates = None        # hide the fast path

    rng = np.random.default_rng(1)
    records = [_record(i, rng) for i in range(6)]
    fast = WindowFeatureSource(records, _proposals, _pool5, None, "pool5", DIM)
    slow = EveryRow(records, _proposals, _pool5, None, "pool5", DIM)
    a = compute_feature_scale(fast, 20.0, num_images=4, boxes_per_image=25, seed=3)
    b = compute_feature_scale(slow, 20.0, num_images=4, boxes_per_image=25, seed=3)
    assert a == pytest.approx(b, rel=1e-6) and a[0] > 0


def test_class_without_training_positives_is_trained_around(caplog):
    """A class that appears only in the test split: the others are trained, it stays untrained
    (SVM that never fires, identity box regressor), with a warning; or an error when asked."""
    rng = np.random.default_rng(2)
    records = [_record(i, rng) for i in range(6)]
    classes = ["a", "b", "only_in_test"]
    cfg = TrainConfig(svm=SVMConfig(norm_images=6, norm_boxes_per_image=20),
                      bbox=BBoxRegressionConfig(norm_images=6, norm_boxes_per_image=20))
    args = (records, classes, _proposals, build_backbone("zf5"), _pool5, DIM, DetectorSettings(feature_layer="pool5"))
    with caplog.at_level("WARNING", logger="detection.training.hard_negatives"):
        detector = train_detector(*args, cfg, progress=False)
    assert "only_in_test" in caplog.text
    assert detector.svms.meta["untrained"] == ["only_in_test"]
    assert detector.svms.biases[2] == UNTRAINED_BIAS and not detector.svms.weights[2].any()
    assert detector.regressors.meta["stats"]["only_in_test"] == {"num_samples": 0, "untrained": True}
    assert not detector.regressors.weights[2].any() and detector.regressors.weights[:2].any()
    strict = dataclasses.replace(cfg, svm=dataclasses.replace(cfg.svm, classes_without_positives="error"))
    with pytest.raises(DetectionError, match="only_in_test"):
        train_detector(*args, strict, progress=False)


def test_fc_finetune_schedule_of_train_svm():
    # tools/train_svm.py --finetune N: the learning rate drops at half and three quarters of the run.
    on = fc_finetune_schedule(24)
    assert (on.enabled, on.iterations, on.lr_steps) == (True, 24, (12, 18))
    off = fc_finetune_schedule(0)
    assert (off.enabled, off.iterations) == (False, 1)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_train_checkpoint_with_a_damaged_byte_is_named_and_redone(tmp_path, caplog, damage):
    """A box-regressor checkpoint whose bytes no longer match its checksum (one flipped byte, or
    cut short) is named in a warning and counted as not done, never loaded; the other class's
    checkpoint still loads, equal to what was saved."""
    ckpt = TrainCheckpoint(tmp_path, "key")
    rng = np.random.default_rng(0)
    saved = [ClassRegressor(rng.normal(size=(6, 4)), rng.normal(size=4), rng.normal(size=4), np.eye(4),
                            stats={"num_samples": 3}) for _ in range(2)]
    for c, r in enumerate(saved):
        ckpt.save_regressor(c, r, scale=2.0)
    path = tmp_path / "bbox_1.pt"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) - 50:]
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        done = TrainCheckpoint(tmp_path, "key").regressors(2, scale=2.0)
    assert f"{path}: checkpoint is corrupt or torn" in caplog.text
    assert list(done) == [0]
    np.testing.assert_array_equal(done[0].weight, saved[0].weight)
