"""Tests of the score calibration (detection.calibration, detection.training.calibration): the map is
monotonic and survives the model file, Platt's fit recovers a known logistic model, the folds
keep an image with its mirror, the windows are the ones the detector keeps, the ECE matches a
slow reference, and hostile calibration metadata is refused."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detection.calibration import ScoreCalibration
from detection.detector import DetectionSettings
from detection.evaluation.reliability import (calibration_report, expected_calibration_error, label_detections,
                                              reliability_bins)
from detection.training.calibration import (CalibrationConfig, FoldSource, assign_folds, fit_calibration, fit_platt,
                                            held_out_map, window_samples)
from detection.detector import Detections
from detection.errors import DetectionError, ModelError
from detection.training.samples import ImageSample, ListFeatureSource
from detection.training.svm import SVMConfig


def _calibration() -> ScoreCalibration:
    return ScoreCalibration(np.array([2.0, 0.5, 1.0]), np.array([1.0, -0.5, 0.0]), {"folds": 2})


def test_probabilities_rise_with_the_score_in_every_class():
    cal = _calibration()
    scores = np.linspace(-30, 30, 601)
    probs = cal.probabilities(np.repeat(scores[:, None], 3, axis=1))
    assert probs.shape == (601, 3) and np.isfinite(probs).all()
    assert ((probs >= 0) & (probs <= 1)).all()
    assert (np.diff(probs, axis=0) >= 0).all()
    # strictly increasing where float32 can still tell the values apart
    mid = np.abs(scores) < 5
    assert (np.diff(probs[mid], axis=0) > 0).all()
    # The sigmoid, by hand, and the [M] + labels form.
    for c in range(3):
        a, b = cal.slopes[c], cal.intercepts[c]
        np.testing.assert_allclose(probs[:, c], 1 / (1 + np.exp(-(a * scores + b))), rtol=1e-5, atol=1e-7)
    labels = np.array([0, 1, 2, 1])
    s = np.array([0.3, -1.0, 2.0, 0.0])
    np.testing.assert_allclose(cal.probabilities(s, labels),
                               [cal.probabilities(np.full((1, 3), v))[0, c] for v, c in zip(s, labels)], rtol=1e-6)
    # torch and numpy agree
    t = cal.probabilities(torch.tensor(s), torch.tensor(labels))
    np.testing.assert_allclose(t.numpy(), cal.probabilities(s, labels), rtol=1e-6)


def test_meta_round_trip_and_hostile_meta():
    cal = _calibration()
    back = ScoreCalibration.from_meta(cal.to_meta(), 3)
    np.testing.assert_array_equal(back.slopes, cal.slopes)
    np.testing.assert_array_equal(back.intercepts, cal.intercepts)
    assert back.meta == {"folds": 2}
    good = cal.to_meta()
    for bad in ([], "platt", {**good, "method": "isotonic"}, {**good, "slopes": [1.0, 2.0]},
                {**good, "slopes": [1.0, True, 1.0]}, {**good, "slopes": [1.0, -1.0, 1.0]},
                {**good, "slopes": [1.0, 0.0, 1.0]}, {**good, "intercepts": [0.0, float("nan"), 0.0]},
                {**good, "intercepts": "0,0,0"}, {k: v for k, v in good.items() if k != "slopes"}):
        with pytest.raises(ModelError):
            ScoreCalibration.from_meta(bad, 3)


def test_platt_fit_recovers_a_known_logistic_model():
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 2, 40_000)
    labels = rng.random(40_000) < 1 / (1 + np.exp(-(1.5 * scores - 0.7)))
    slope, intercept = fit_platt(scores, labels)
    assert abs(slope - 1.5) < 0.06 and abs(intercept + 0.7) < 0.06
    assert fit_platt(scores, np.zeros_like(labels)) is None            # one label value only
    assert fit_platt(scores, np.ones_like(labels)) is None
    assert fit_platt(scores, scores < 0) is None                       # falls with the score: not monotonic


def test_folds_keep_an_image_with_its_mirror_and_are_balanced():
    groups = ["b", "a", "a", "c", "d", "b", "e", "c", "e"]
    folds = assign_folds(groups, 2)
    for g in set(groups):
        assert len({folds[i] for i, x in enumerate(groups) if x == g}) == 1
    per_fold = [len({g for g, f in zip(groups, folds) if f == k}) for k in range(2)]
    assert sorted(per_fold) == [2, 3]
    np.testing.assert_array_equal(assign_folds(groups, 2), folds)      # deterministic


def test_label_detections_by_hand():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float64)
    gt_labels = np.array([0, 1, 0])
    difficult = np.array([False, False, True])
    boxes = np.array([[0, 0, 10, 10],      # class 0 on object 0: correct
                      [0, 0, 10, 10],      # class 1 on object 0: wrong class
                      [0, 0, 10, 7],       # class 0, IoU 0.7: correct
                      [0, 0, 10, 4],       # class 0, IoU 0.4: wrong
                      [40, 40, 50, 50],    # class 0 on the difficult object only: left out
                      [100, 100, 110, 110]], np.float64)
    labels = np.array([0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(label_detections(boxes, labels, gt, gt_labels, difficult), [1, 0, 1, 0, -1, 0])
    assert label_detections(boxes, labels, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool)).tolist() \
        == [0] * 6


def _slow_ece(p, y, n):
    total, err = len(p), 0.0
    for b in range(n):
        lo, hi = b / n, (b + 1) / n
        idx = [i for i in range(len(p)) if lo <= p[i] < hi or (b == n - 1 and p[i] == 1.0)]
        if idx:
            err += len(idx) / total * abs(sum(y[i] for i in idx) / len(idx) - sum(p[i] for i in idx) / len(idx))
    return err


def test_ece_and_reliability_match_a_slow_reference():
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(500), [0.0, 1.0, 0.5, 0.1]])
    y = (rng.random(len(p)) < p ** 2).astype(int)
    for n in (1, 5, 10, 15):
        assert expected_calibration_error(p, y, n) == pytest.approx(_slow_ece(p, y, n), abs=1e-12)
    rows = reliability_bins(p, y, 10)
    assert sum(r["count"] for r in rows) == len(p)
    assert rows[-1]["high"] == 1.0 and all(r["low"] <= r["mean_probability"] <= r["high"] for r in rows)
    assert expected_calibration_error(np.array([0.8] * 10), np.array([1] * 8 + [0] * 2)) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(np.zeros(0), np.zeros(0)))


def test_calibration_report_counts_detections_and_refuses_uncalibrated_ones():
    class Rec:
        boxes = np.array([[0, 0, 10, 10]], np.float32)
        labels = np.array([0])
        difficult = np.array([False])

    dets = Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([1.0, -1.0], np.float32),
                      np.array([0, 0]), np.array([0.9, 0.2], np.float32))
    rep = calibration_report([Rec()], [dets])
    assert rep["num_detections"] == 2 and rep["above_threshold"] == {"threshold": 0.5, "count": 1,
                                                                     "fraction_correct": 1.0}
    assert rep["ece"] == pytest.approx((0.1 + 0.2) / 2)
    dets.probabilities = None
    with pytest.raises(DetectionError, match="no probabilities"):
        calibration_report([Rec()], [dets])


def _sample(key: str, rng: np.random.Generator, dim: int = 6) -> ImageSample:
    """Two classes; a proposal's features carry its class's signal in proportion to its overlap."""
    gt = np.array([[10, 10, 50, 50], [60, 20, 100, 70]], np.float64)
    gt_labels = np.array([0, 1])
    boxes, feats = [], []
    for _ in range(60):
        g = rng.integers(0, 2)
        jitter = rng.normal(0, rng.choice([2.0, 12.0]), 4)
        box = gt[g] + jitter
        box[2:] = np.maximum(box[2:], box[:2] + 2)
        boxes.append(box)
        iou = label_iou(box, gt[g])
        f = rng.normal(0, 0.6, dim)
        f[g] += 3.0 * iou
        feats.append(f)
    for _ in range(40):                      # background
        xy = rng.uniform(0, 150, 2)
        boxes.append(np.concatenate([xy, xy + rng.uniform(5, 40, 2)]))
        feats.append(rng.normal(0, 0.6, dim))
    gt_feats = np.zeros((2, dim))
    gt_feats[0, 0] = gt_feats[1, 1] = 3.0
    gt_feats += rng.normal(0, 0.6, (2, dim))
    return ImageSample(key=key, gt_boxes=gt, gt_labels=gt_labels, gt_features=gt_feats.astype(np.float32),
                       boxes=np.array(boxes), features=np.array(feats, np.float32))


def label_iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def test_window_samples_are_the_windows_the_detector_keeps():
    rng = np.random.default_rng(2)
    sample = _sample("x", rng)
    scores = rng.normal(0, 1, (len(sample.boxes), 2))
    out = window_samples(sample, scores, DetectionSettings(nms_iou=0.3, score_threshold=-0.5, max_per_class=5),
                         iou=0.5, skip=[1])
    assert len(out[1][0]) == 0                                    # skipped class
    s, y = out[0]
    assert 0 < len(s) <= 5 and (s > -0.5).all() and set(y.tolist()) <= {0, 1}
    # Slow reference: greedy NMS over windows above the threshold, best first (the detector's
    # scores are float32).
    s32 = scores.astype(np.float32)
    order = [i for i in np.argsort(-s32[:, 0], kind="stable") if s32[i, 0] > -0.5]
    kept = []
    for i in order:
        if all(label_iou(sample.boxes[i], sample.boxes[j]) <= 0.3 for j in kept):
            kept.append(i)
    np.testing.assert_array_equal(np.sort(s)[::-1], s32[kept[:5], 0])
    ref_labels = [int(label_iou(sample.boxes[i], sample.gt_boxes[0]) >= 0.5) for i in kept[:5]]
    np.testing.assert_array_equal(y[np.argsort(-s, kind="stable")], ref_labels)


def test_window_samples_label_the_regressed_clipped_boxes():
    # The windows are labelled where the detector puts them (each class's regressed box), and a
    # box the clipping left without area is no detection: before, calibration labelled the raw
    # proposals and kept every one.
    gt = np.array([[10, 10, 50, 50]], np.float64)
    boxes = np.array([[100, 100, 140, 140], [200, 200, 240, 240]], np.float64)
    sample = ImageSample(key="r", gt_boxes=gt, gt_labels=np.array([0]), gt_features=np.zeros((1, 2), np.float32),
                         boxes=boxes, features=np.zeros((2, 2), np.float32))
    scores = np.array([[1.0], [0.5]])
    settings = DetectionSettings(nms_iou=0.3, score_threshold=-1.5, max_per_class=100)
    s, y = window_samples(sample, scores, settings, iou=0.5)[0]
    assert s.tolist() == [1.0, 0.5] and y.tolist() == [0, 0]       # the proposals miss the object
    moved = torch.tensor([[[10.0, 10.0, 50.0, 50.0]], [[300.0, 300.0, 300.0, 340.0]]])   # hit; zero width
    s, y = window_samples(sample, scores, settings, iou=0.5, per_class_boxes=moved)[0]
    assert s.tolist() == [1.0] and y.tolist() == [1]


def test_fit_calibration_end_to_end_on_real_svms():
    rng = np.random.default_rng(3)
    ids = [f"im{i}" for i in range(8)]
    samples, groups = [], []
    for i in ids:
        for suffix in ("", "_flip"):
            samples.append(_sample(i + suffix, rng))
            groups.append(i)
    source = ListFeatureSource(samples, dim=6)
    svm_cfg = SVMConfig(C=0.1, norm_images=16, norm_boxes_per_image=50)
    cal = fit_calibration(source, groups, 2, svm_cfg, CalibrationConfig(), feature_scale=1.0,
                          settings=DetectionSettings(), class_names=["a", "b"])
    assert cal is not None and cal.num_classes == 2 and (cal.slopes > 0).all()
    assert cal.meta["folds"] == 2 and cal.meta["pooled"] == []
    assert all(cal.meta["positives"][c] > 0 for c in "ab")
    assert all(cal.meta["windows"][c] > cal.meta["positives"][c] for c in "ab")
    # Fewer distinct images than folds: no calibration, with a warning (the model gives scores only).
    few = FoldSource(source, [0, 1])
    assert fit_calibration(few, groups[:2], 2, svm_cfg, CalibrationConfig(), 1.0,
                           settings=DetectionSettings()) is None
    with pytest.raises(DetectionError, match="folds"):
        CalibrationConfig(folds=1).validate()


def test_held_out_map_is_the_devkit_map_of_those_detections(synthetic_voc):
    """held_out_map against the evaluation the tools use (evaluate_detections over records): the
    same detections of the same images give the same VOC07 mAP, duplicates counted as false."""
    from detection.data.voc import VOCDataset
    from detection.evaluation.detections import detections_by_class
    from detection.evaluation.devkit import evaluate_detections
    records = VOCDataset(synthetic_voc, "trainval").records
    k = 4
    rng = np.random.default_rng(5)
    images, per_image = [], []
    for r in records:
        # Every object found (some twice: a duplicate is a false positive), plus random boxes.
        boxes = np.concatenate([r.boxes, r.boxes[:1] + 1, rng.uniform(0, 200, (5, 2)).repeat(2, 1) + [0, 0, 30, 30]])
        labels = np.concatenate([r.labels, r.labels[:1], rng.integers(0, k, 5)])
        scores = rng.uniform(0, 1, len(boxes))
        images.append((r.boxes.astype(np.float64), r.labels, r.difficult, (boxes, scores, labels)))
        per_image.append(Detections(boxes.astype(np.float32), scores.astype(np.float32), labels, None))
    expected = evaluate_detections(records, [str(c) for c in range(k)],
                                   detections_by_class([r.image_id for r in records], per_image, k), metric="voc07")
    assert held_out_map(images, k) == pytest.approx(expected["mAP"], abs=1e-6)
    assert math.isnan(held_out_map([], k))


def test_the_nms_threshold_is_chosen_on_the_held_out_folds():
    """Objects in overlapping pairs (IoU 0.47): NMS at 0.3 must drop one of each pair, 0.6 keeps
    both, so 0.6 wins on the held-out images; the choice and each choice's held-out mAP are in
    the calibration's meta, the probabilities fitted at the chosen threshold."""
    rng = np.random.default_rng(4)

    def pair_sample(key):
        gt = np.array([[10, 10, 50, 50], [25, 10, 65, 50]], np.float64)        # IoU 25/55 = 0.4545
        boxes = np.concatenate([gt, gt + 1, rng.uniform(100, 150, (20, 2)).repeat(2, 1) + [0, 0, 20, 20]])
        feats = rng.normal(0, 0.3, (len(boxes), 3)).astype(np.float32)
        feats[:4, 0] += 3.0
        gt_feats = rng.normal(0, 0.3, (2, 3)).astype(np.float32)
        gt_feats[:, 0] += 3.0
        return ImageSample(key=key, gt_boxes=gt, gt_labels=np.array([0, 0]), gt_features=gt_feats,
                           boxes=boxes, features=feats)

    ids = [f"im{i}" for i in range(6)]
    source = ListFeatureSource([pair_sample(i) for i in ids], dim=3)
    svm_cfg = SVMConfig(C=0.1, norm_images=6, norm_boxes_per_image=24)
    cfg = CalibrationConfig(nms_choices=(0.3, 0.6))
    cal = fit_calibration(source, ids, 1, svm_cfg, cfg, 1.0, settings=DetectionSettings(), class_names=["a"])
    nms = cal.meta["nms"]
    assert nms["chosen"] == 0.6 and nms["choices"] == [0.3, 0.6]
    assert nms["held_out_map"]["0.6"] > nms["held_out_map"]["0.3"]
    assert cal.meta["detection_settings"]["nms_iou"] == 0.6
    # Without choices: test.nms_iou as written, no choice recorded.
    plain = fit_calibration(source, ids, 1, svm_cfg, CalibrationConfig(), 1.0, settings=DetectionSettings())
    assert "nms" not in plain.meta and plain.meta["detection_settings"]["nms_iou"] == 0.3
    for bad in ((0.3, 0.3), (0.0,), (1.5,)):
        with pytest.raises(DetectionError, match="nms_choices"):
            CalibrationConfig(nms_choices=bad).validate()
