"""VOC evaluation: hand-computed APs, equality with a straight port of the devkit loop, result files."""
from __future__ import annotations

import logging
import math
import types
from pathlib import Path

import numpy as np
import pytest

from detection.boxes import internal_to_voc, voc_to_internal
from detection.data.records import ImageRecord
from detection.errors import DatasetError, DetectionError
from detection.evaluation import (ClassDetections, VOCEvaluator, default_metric, detections_by_class,
                                  evaluate_class, evaluate_detections, evaluate_result_dir, read_result_dir,
                                  read_result_file, result_file_name, voc_ap, write_result_files)


# ------------------------------------------------------------------------------------------------
# The slow reference: py-faster-rcnn lib/datasets/voc_eval.py (voc_ap and the loop of voc_eval),
# on 1-based inclusive boxes with the +1 areas. Two documented differences, both also in our
# implementation: a stable sort (ties keep input order) and precision = tp / max(tp + fp, eps).
# ------------------------------------------------------------------------------------------------
def ref_voc_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.
        for t in np.arange(0., 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.
    else:
        mrec = np.concatenate(([0.], rec, [1.]))
        mpre = np.concatenate(([0.], prec, [0.]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def ref_voc_eval(class_recs, image_ids, confidence, BB, ovthresh=0.5, use_07_metric=False):
    """class_recs: {image: {'bbox': array[G, 4] 1-based, 'difficult': bool[G]}}."""
    class_recs = {k: {"bbox": v["bbox"], "difficult": v["difficult"], "det": [False] * len(v["bbox"])}
                  for k, v in class_recs.items()}
    npos = sum(int(np.sum(~v["difficult"])) for v in class_recs.values())
    sorted_ind = np.argsort(-confidence, kind="stable")
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1., 0.)
            ih = np.maximum(iymax - iymin + 1., 0.)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) +
                   (BBGT[:, 2] - BBGT[:, 0] + 1.) *
                   (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.
        else:
            fp[d] = 1.
    fp_flags, tp_flags = fp.astype(bool), tp.astype(bool)
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = ref_voc_ap(rec, prec, use_07_metric)
    return rec, prec, ap, tp_flags, fp_flags


def _random_problem(rng, num_images=25, num_det=300, integer=True):
    """Random ground truth (1-based, ~20 % difficult, 0-4 per image) and detections: jittered
    copies of ground truths (many duplicates), exact IoU-0.5 shifts and their +-1 px
    neighbours, random boxes; scores from a few values so that ties are common."""
    gts, diffs = [], []
    for _ in range(num_images):
        g = int(rng.integers(0, 5))
        xy = rng.integers(1, 200, size=(g, 2))
        wh = rng.integers(10, 80, size=(g, 2))
        gts.append(np.concatenate([xy, xy + wh - 1], axis=1).astype(np.float64))
        diffs.append(rng.random(g) < 0.2)
    det_img = rng.integers(0, num_images, size=num_det)
    boxes = np.zeros((num_det, 4))
    for d, i in enumerate(det_img):
        kind = rng.integers(0, 3)
        if len(gts[i]) and kind < 2:
            b = gts[i][rng.integers(0, len(gts[i]))].copy()
            if kind == 0:                     # jitter
                b += rng.integers(-6, 7, size=4)
            else:                             # shift by s with (W - s) / (W + s) around 0.5
                w = b[2] - b[0] + 1
                s = round(w / 3) + int(rng.integers(-1, 2))
                b[[0, 2]] += s
        else:
            xy = rng.integers(1, 200, size=2)
            b = np.concatenate([xy, xy + rng.integers(5, 80, size=2)]).astype(np.float64)
        if not integer:
            b = b + rng.uniform(-0.5, 0.5, size=4)
        b[2:] = np.maximum(b[2:], b[:2])
        boxes[d] = b
    scores = rng.integers(0, 20, size=num_det) / 10.0  # few distinct values -> ties
    return gts, diffs, det_img, scores, boxes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["voc07", "voc10"])
def test_equals_devkit_loop_on_random_detections(seed, metric):
    rng = np.random.default_rng(seed)
    gts, diffs, det_img, scores, boxes = _random_problem(rng)
    class_recs = {str(i): {"bbox": g, "difficult": d} for i, (g, d) in enumerate(zip(gts, diffs))}
    rec, prec, ap, tp, fp = ref_voc_eval(class_recs, [str(i) for i in det_img], scores, boxes,
                                         use_07_metric=metric == "voc07")
    res = evaluate_class([voc_to_internal(g) for g in gts], diffs, det_img, scores, voc_to_internal(boxes),
                         metric=metric)
    # Integer coordinates: every IoU is a ratio of exact integers, so the results are identical.
    np.testing.assert_array_equal(res.tp, tp)
    np.testing.assert_array_equal(res.fp, fp)
    np.testing.assert_array_equal(res.recall, rec)
    np.testing.assert_array_equal(res.precision, prec)
    assert res.ap == pytest.approx(ap, abs=1e-15)   # 11-point: the port sums p / 11 term by term
    assert res.npos == sum(int((~d).sum()) for d in diffs)
    # The corners alone reproduce the AP (what metrics.json keeps for plots).
    r, p = res.curve_corners()
    assert voc_ap(r, p, metric) == pytest.approx(ap, abs=1e-12)


def test_equals_devkit_loop_with_fractional_coordinates():
    rng = np.random.default_rng(42)
    for metric in ("voc07", "voc10"):
        gts, diffs, det_img, scores, boxes = _random_problem(rng, num_images=40, num_det=500, integer=False)
        class_recs = {str(i): {"bbox": g, "difficult": d} for i, (g, d) in enumerate(zip(gts, diffs))}
        rec, prec, ap, tp, fp = ref_voc_eval(class_recs, [str(i) for i in det_img], scores, boxes,
                                             use_07_metric=metric == "voc07")
        res = evaluate_class([voc_to_internal(g, np.float64) for g in gts], diffs, det_img, scores,
                             voc_to_internal(boxes, np.float64), metric=metric)
        np.testing.assert_array_equal(res.tp, tp)
        np.testing.assert_allclose(res.precision, prec, rtol=1e-12)
        assert res.ap == pytest.approx(ap, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------------
def test_difficult_match_ignored_and_duplicate_is_fp():
    gt = [np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)]
    diff = [np.array([False, True])]
    boxes = np.array([[0, 0, 10, 10],      # 0.9: TP on the object
                      [50, 50, 60, 60],    # 0.8: the difficult object -> ignored
                      [0, 0, 10, 11],      # 0.7: the object again -> duplicate FP
                      [100, 100, 110, 110]], float)  # 0.6: nothing -> FP
    res = evaluate_class(gt, diff, np.zeros(4, int), np.array([0.9, 0.8, 0.7, 0.6]), boxes)
    np.testing.assert_array_equal(res.tp, [True, False, False, False])
    np.testing.assert_array_equal(res.fp, [False, False, True, True])
    np.testing.assert_allclose(res.precision, [1, 1, 0.5, 1 / 3])
    np.testing.assert_allclose(res.recall, [1, 1, 1, 1])
    assert res.npos == 1 and res.ap == 1.0


def test_ignored_first_detection_gives_zero_precision_not_nan():
    # The first-ranked detection hits a difficult object: tp + fp = 0 there.
    gt = [np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)]
    res = evaluate_class(gt, [np.array([False, True])], np.zeros(2, int), np.array([0.9, 0.1]),
                         np.array([[50, 50, 60, 60], [0, 0, 10, 10]], float))
    np.testing.assert_array_equal(res.precision, [0.0, 1.0])
    assert res.ap == 1.0


def test_iou_threshold_is_strict():
    gt = [np.array([[0, 0, 10, 10]], float)]
    exactly_half = np.array([[0, 0, 10, 20]], float)       # 100 / 200
    just_above = np.array([[0, 0, 10, 19.9]], float)       # 100 / 199
    assert evaluate_class(gt, [np.zeros(1, bool)], [0], [1.0], exactly_half).ap == 0.0
    assert evaluate_class(gt, [np.zeros(1, bool)], [0], [1.0], just_above).ap == 1.0


def test_argmax_takes_first_ground_truth_on_equal_iou():
    # Two identical ground truths, the first difficult: the detection is matched to the first
    # (ignored), so the non-difficult one stays unclaimed and the next detection is a TP.
    gt = [np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)]
    diff = [np.array([True, False])]
    res = evaluate_class(gt, diff, [0, 0], [0.9, 0.8], np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float))
    np.testing.assert_array_equal(res.tp, [False, False])
    np.testing.assert_array_equal(res.fp, [False, False])
    assert res.ap == 0.0


def test_hand_worked_pr_curve_11_point_vs_area():
    # Four objects in four images; ranked detections TP, FP, TP, FP, FP, TP (one object missed).
    # recall    .25  .25  .5   .5   .5   .75
    # precision 1    1/2  2/3  1/2  2/5  3/4 ... (3 / 6 = 1/2)
    gt = [np.array([[0, 0, 10, 10]], float) for _ in range(4)]
    diff = [np.zeros(1, bool) for _ in range(4)]
    hit, miss = [0, 0, 10, 10], [20, 20, 30, 30]
    det_img = np.array([0, 0, 1, 1, 2, 2])
    boxes = np.array([hit, miss, hit, miss, miss, hit], float)
    scores = np.array([6, 5, 4, 3, 2, 1], float)
    res07 = evaluate_class(gt, diff, det_img, scores, boxes, metric="voc07")
    np.testing.assert_allclose(res07.recall, [0.25, 0.25, 0.5, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(res07.precision, [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5, 1 / 2])
    # 11-point: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6, .7 -> 1/2; t = .8, .9, 1 -> 0.
    assert res07.ap == pytest.approx((3 * 1 + 3 * 2 / 3 + 2 * 0.5) / 11, abs=1e-15)
    # Area under the envelope: .25 * 1 + .25 * 2/3 + .25 * 1/2 = 13/24.
    res10 = evaluate_class(gt, diff, det_img, scores, boxes, metric="voc10")
    assert res10.ap == pytest.approx(13 / 24, abs=1e-15)


def test_11_point_thresholds_are_the_ports_arange():
    # recall 0.3 (= 3/10) is below the port's third threshold 0.1 * 3 = 0.30000000000000004.
    rec = np.array([0.1, 0.2, 0.3])
    assert voc_ap(rec, np.ones(3), "voc07") == pytest.approx(3 / 11, abs=1e-15)
    assert voc_ap(rec, np.ones(3), "voc07") == pytest.approx(ref_voc_ap(rec, np.ones(3), True), abs=1e-15)


def test_perfect_and_empty_detections():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 40, 40]], float), np.array([[5, 5, 9, 9]], float)]
    diff = [np.zeros(2, bool), np.zeros(1, bool)]
    allgt = np.concatenate(gt)
    for metric in ("voc07", "voc10"):
        assert evaluate_class(gt, diff, [0, 0, 1], [0.3, 0.2, 0.1], allgt, metric=metric).ap == 1.0
        empty = evaluate_class(gt, diff, np.zeros(0, int), np.zeros(0), np.zeros((0, 4)), metric=metric)
        assert empty.ap == 0.0 and empty.npos == 3 and len(empty.recall) == 0


def test_class_without_ground_truth_is_nan_and_left_out_of_map(caplog):
    recs = [_record("a", [[0, 0, 10, 10]], [0]), _record("b", [[0, 0, 10, 10]], [0], difficult=[True])]
    dets = [ClassDetections(["a"], [1.0], [[0, 0, 10, 10]]),
            ClassDetections(["b"], [1.0], [[0, 0, 10, 10]])]
    with caplog.at_level(logging.WARNING):
        m = evaluate_detections(recs, ["cat", "dog"], dets)
    assert m["AP"]["cat"] == 1.0
    assert math.isnan(m["AP"]["dog"])
    assert m["mAP"] == 1.0
    assert m["classes_without_ground_truth"] == ["dog"]
    assert "dog" in caplog.text


# ------------------------------------------------------------------------------------------------
# Records, per-class detections, the evaluator
# ------------------------------------------------------------------------------------------------
def _record(image_id, boxes, labels, difficult=None, flipped=False):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    difficult = np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool)
    return ImageRecord(image_id, Path(f"/nonexistent/{image_id}.jpg"), 100, 80, boxes,
                       np.asarray(labels, np.int64), difficult, np.zeros(n, bool), flipped)


def _random_records(rng, n=20, num_classes=3):
    recs = []
    for i in range(n):
        g = int(rng.integers(0, 4))
        xy = rng.integers(0, 60, size=(g, 2))
        boxes = np.concatenate([xy, xy + rng.integers(5, 30, size=(g, 2))], axis=1)
        recs.append(_record(f"img{i:03d}", boxes, rng.integers(0, num_classes, g), rng.random(g) < 0.2))
    return recs


def _random_outputs(rng, recs, num_classes=3):
    outs = []
    for r in recs:
        k = int(rng.integers(0, 6))
        src = np.concatenate([r.boxes, rng.integers(0, 60, size=(k, 4)).astype(np.float32)])
        pick = rng.integers(0, len(src), size=k) if len(src) else np.zeros(0, int)
        boxes = np.sort(src[pick].reshape(k, 2, 2), axis=1).reshape(k, 4) + rng.integers(-3, 4, size=(k, 4))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        outs.append(types.SimpleNamespace(boxes=boxes.astype(np.float32), scores=rng.random(k).astype(np.float32),
                                          labels=rng.integers(0, num_classes, k)))
    return outs


def test_evaluate_detections_matches_per_class_reference_and_evaluator():
    rng = np.random.default_rng(7)
    classes = ["a", "b", "c"]
    recs = _random_records(rng)
    outs = _random_outputs(rng, recs)
    per_class = detections_by_class([r.image_id for r in recs], outs, 3)
    m = evaluate_detections(recs, classes, per_class, metric="voc10")
    for c, name in enumerate(classes):
        class_recs = {r.image_id: {"bbox": internal_to_voc(r.boxes[r.labels == c]),
                                   "difficult": r.difficult[r.labels == c]} for r in recs}
        d = per_class[c]
        _, _, ap, _, _ = ref_voc_eval(class_recs, list(d.image_ids), d.scores, internal_to_voc(d.boxes))
        assert m["AP"][name] == pytest.approx(ap, abs=1e-12)
        assert m["num_detections"][name] == sum(int((o.labels == c).sum()) for o in outs)
    assert m["mAP"] == pytest.approx(np.mean(list(m["AP"].values())))
    ev = VOCEvaluator(recs, classes, metric="voc10")
    for r, o in zip(recs, outs):
        ev.process(r.image_id, o.boxes, o.scores, o.labels)
    assert ev.evaluate()["AP"] == m["AP"]
    ev.reset()
    assert ev.evaluate()["mAP"] == 0.0
    with pytest.raises(DetectionError, match="nope"):
        ev.process("nope", np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))


def test_flipped_records_are_ignored_and_unknown_ids_rejected():
    recs = [_record("a", [[0, 0, 10, 10]], [0]), _record("a", [[90, 0, 100, 10]], [0], flipped=True)]
    m = evaluate_detections(recs, ["cat"], [ClassDetections(["a"], [1.0], [[0, 0, 10, 10]])])
    assert m["num_images"] == 1 and m["AP"]["cat"] == 1.0
    with pytest.raises(DetectionError, match="'zzz'"):
        evaluate_detections(recs, ["cat"], [ClassDetections(["zzz"], [1.0], [[0, 0, 10, 10]])])
    with pytest.raises(DetectionError, match="unknown AP metric"):
        evaluate_detections(recs, ["cat"], {}, metric="voc12")


# ------------------------------------------------------------------------------------------------
# Result files
# ------------------------------------------------------------------------------------------------
def test_result_files_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    recs = _random_records(rng)
    outs = _random_outputs(rng, recs)
    classes = ["a", "b", "c"]
    per_class = detections_by_class([r.image_id for r in recs], outs, 3)
    paths = write_result_files(tmp_path, "test", classes, per_class)
    assert [p.name for p in paths] == [result_file_name("test", c) for c in classes]
    assert paths[0].name == "comp4_det_test_a.txt"
    first = paths[0].read_text().splitlines()[0].split()
    d0 = per_class[0]
    assert first[0] == d0.image_ids[0] and float(first[2]) == pytest.approx(d0.boxes[0, 0] + 1)  # 1-based
    back = read_result_dir(tmp_path, "test", classes, [r.image_id for r in recs])
    for d, b in zip(per_class, back):
        np.testing.assert_array_equal(b.image_ids, d.image_ids)
        # float32 scores (the detector's) survive 9 significant digits exactly.
        np.testing.assert_array_equal(b.scores.astype(np.float32), d.scores.astype(np.float32))
        np.testing.assert_allclose(b.boxes, d.boxes, atol=0.05 + 1e-9)  # one decimal
    ds = types.SimpleNamespace(root=tmp_path / "VOC2007", split="test", classes=tuple(classes), records=recs)
    m = evaluate_result_dir(ds, tmp_path)
    assert m["metric"] == "voc07" and m["split"] == "test"
    # Integer boxes survive the file exactly, so the metrics equal the in-memory ones.
    assert m["AP"] == evaluate_detections(recs, classes, per_class, metric="voc07")["AP"]


def test_perfect_result_files_score_one(tmp_path):
    rng = np.random.default_rng(5)
    recs = _random_records(rng, n=30)
    gt_as_dets = [types.SimpleNamespace(boxes=r.boxes, scores=np.ones(len(r.boxes)), labels=r.labels) for r in recs]
    write_result_files(tmp_path, "val", ["a", "b", "c"],
                       detections_by_class([r.image_id for r in recs], gt_as_dets, 3))
    ds = types.SimpleNamespace(root=tmp_path, split="val", classes=("a", "b", "c"), records=recs)
    for metric in ("voc07", "voc10"):
        m = evaluate_result_dir(ds, tmp_path, metric=metric)
        assert m["mAP"] == 1.0 and m["AP"] == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_blank_lines_and_missing_class_file(tmp_path, caplog):
    (tmp_path / "comp4_det_test_a.txt").write_text("\nx 0.5 1 1 10 10\n\n  y  -1.5e-3 2 2 5 5  \n")
    with caplog.at_level(logging.WARNING):
        a, b = read_result_dir(tmp_path, "test", ["a", "b"], ["x", "y"])
    assert list(a.image_ids) == ["x", "y"]
    np.testing.assert_array_equal(a.scores, [0.5, -1.5e-3])
    np.testing.assert_array_equal(a.boxes, [[0, 0, 10, 10], [1, 1, 5, 5]])
    assert len(b) == 0 and "comp4_det_test_b.txt" in caplog.text
    (tmp_path / "empty.txt").write_text("")
    assert len(read_result_file(tmp_path / "empty.txt", ["x"])) == 0


@pytest.mark.parametrize("content, pattern", [
    ("x 0.5 1 1 10 10\nx 0.5 1 1 10\n", r"bad\.txt:2: expected .* got 5 fields"),
    ("x 0.5 1 1 10 10\n\nx 0.5 1 1 10 10 7\n", r"bad\.txt:3: expected .* got 7 fields"),
    ("x 0.5 1 1 10 10\ny 0.5 1 1 10 10\n", r"bad\.txt:2: image id 'y' is not in the split"),
    ("x nan 1 1 10 10\n", r"bad\.txt:1: NaN or infinite"),
    ("x 0.5 1 1 inf 10\n", r"bad\.txt:1: NaN or infinite"),
    ("x 0.5 1 1 10 10\nx 0.5 one 1 10 10\n", r"bad\.txt:2: not a number"),
    # 7 + 5 fields add up to two lines' worth: still caught per line.
    ("x 0.5 1 1 10 10 x\n0.5 1 1 10 10\n", r"bad\.txt:1: expected .* got 7 fields"),
])
def test_malformed_result_file_names_file_and_line(tmp_path, content, pattern):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DatasetError, match=pattern):
        read_result_file(path, ["x"])


def test_unreadable_inputs(tmp_path):
    with pytest.raises(DatasetError, match="cannot read"):
        read_result_file(tmp_path / "missing.txt", ["x"])
    with pytest.raises(DatasetError, match="does not exist"):
        read_result_dir(tmp_path / "nope", "test", ["a"], ["x"])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00x")
    with pytest.raises(DatasetError, match="UTF-8"):
        read_result_file(tmp_path / "bin.txt", ["x"])
    with pytest.raises(DetectionError, match="NaN"):
        write_result_files(tmp_path, "t", ["a"], [ClassDetections(["x"], [math.nan], [[0, 0, 1, 1]])])
    with pytest.raises(DetectionError, match="whitespace"):
        write_result_files(tmp_path, "t", ["a"], [ClassDetections(["x y"], [1.0], [[0, 0, 1, 1]])])


def test_default_metric():
    assert default_metric("/data/VOCdevkit/VOC2007") == "voc07"
    assert default_metric("/data/VOC2007/sub") == "voc07"
    assert default_metric("/data/voc_2006") == "voc07"
    assert default_metric("/data/VOCdevkit/VOC2012") == "voc10"
    assert default_metric("/work/shared/data/raccoon") == "voc10"


def test_synthetic_dataset_end_to_end(tmp_path):
    """With the real dataset reader: ground truth written as result files scores mAP 1."""
    voc = pytest.importorskip("detection.data.voc")
    synthetic = pytest.importorskip("detection.data.synthetic")
    root = synthetic.make_synthetic_voc(tmp_path / "synthetic", num_trainval=2, num_test=6, seed=0)
    ds = voc.VOCDataset(root, "test")
    dets = [types.SimpleNamespace(boxes=r.boxes, scores=np.linspace(1, 0, len(r.boxes)), labels=r.labels)
            for r in ds.records]
    write_result_files(tmp_path / "results", ds.split, ds.classes,
                       detections_by_class([r.image_id for r in ds.records], dets, len(ds.classes)))
    m = evaluate_result_dir(ds, tmp_path / "results", metric="voc10")
    with_gt = [c for c in ds.classes if m["num_positives"][c] > 0]
    assert with_gt and all(m["AP"][c] == 1.0 for c in with_gt)


def test_slow_structure_path_for_non_ascii_and_crlf(tmp_path):
    # Non-ASCII ids skip the byte-level check; the per-line check must accept and reject alike.
    path = tmp_path / "u.txt"
    path.write_text("caf\u00e9 0.5 1 1 10 10\r\n\r\nx 0.25 2 2 5 5\r\n", encoding="utf-8")
    d = read_result_file(path, ["caf\u00e9", "x"])
    assert list(d.image_ids) == ["caf\u00e9", "x"]
    np.testing.assert_array_equal(d.scores, [0.5, 0.25])
    path.write_text("caf\u00e9 0.5 1 1 10 10\nx 0.25 2 2 5\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"u\.txt:2: expected"):
        read_result_file(path, ["caf\u00e9", "x"])
    path.write_bytes(b"x 0.5 1 1 10 10\x0cx 0.5 1 1 10\n")   # form feed: a line break for Python
    with pytest.raises(DatasetError, match=r"u\.txt:2: expected"):
        read_result_file(path, ["x"])


def test_pr_curve_pngs(tmp_path):
    from detection.evaluation.plots import plot_pr_curves

    recs = [_record("a", [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0]), _record("b", [], [])]
    dets = [ClassDetections(["a", "a", "b"], [0.9, 0.5, 0.7], [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 5, 5]]),
            ClassDetections.empty()]
    m = evaluate_detections(recs, ["cat", "dog/x"], dets, metric="voc10")
    assert m["pr_curves"]["cat"] == {"recall": [0.5, 1.0], "precision": [1.0, 0.666667]}
    paths = plot_pr_curves(m, tmp_path / "pr")
    assert [p.name for p in paths] == ["cat.png"]            # "dog/x" has no ground truth: no curve
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _run_tool(tool: Path, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a tools/ script in this process (a subprocess would re-import torch: seconds)."""
    import runpy
    import sys

    old = sys.argv
    sys.argv = [str(tool), *argv]
    try:
        runpy.run_path(str(tool), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_tool_end_to_end(tmp_path, capsys):
    """tools/eval_voc.py on a synthetic VOC folder: table + metrics.json; bad input exits 2."""
    import json

    voc = pytest.importorskip("detection.data.voc")
    synthetic = pytest.importorskip("detection.data.synthetic")
    root = synthetic.make_synthetic_voc(tmp_path / "VOC2007", num_trainval=2, num_test=5, seed=1)
    ds = voc.VOCDataset(root, "test")
    dets = [types.SimpleNamespace(boxes=r.boxes, scores=np.ones(len(r.boxes)), labels=r.labels) for r in ds.records]
    write_result_files(tmp_path / "res", "test", ds.classes,
                       detections_by_class([r.image_id for r in ds.records], dets, len(ds.classes)))
    tool = Path(__file__).resolve().parents[1] / "tools" / "eval_voc.py"
    out = tmp_path / "metrics.json"
    argv = ["--quiet", "--data", str(root), "--results", str(tmp_path / "res"), "--out", str(out)]
    code, stdout, stderr = _run_tool(tool, argv, capsys)
    assert code == 0, stderr
    metrics = json.loads(out.read_text())
    assert metrics["metric"] == "voc07" and metrics["mAP"] == 1.0      # folder named VOC2007
    assert "mAP" in stdout
    (tmp_path / "res" / f"comp4_det_test_{ds.classes[0]}.txt").write_text("bogus line\n")
    code, stdout, stderr = _run_tool(tool, argv, capsys)
    assert code == 2 and stderr.startswith("error: ") and ":1: expected" in stderr
    code, stdout, stderr = _run_tool(tool, [*argv, "--model", str(tmp_path / "model.pt")], capsys)
    # Until detect_dataset exists: a clear error; afterwards: the missing model file is named.
    assert code == 2 and ("detection.detector is not available" in stderr or "model.pt" in stderr)


def test_rewriting_result_files_never_leaves_a_mix_of_runs(tmp_path):
    old = [ClassDetections(["x"], [0.5], [[0, 0, 9, 9]]), ClassDetections(["x"], [0.4], [[1, 1, 9, 9]])]
    write_result_files(tmp_path, "t", ["a", "b"], old)
    # A new run that fails part-way (class b's detections are invalid): class a's old file must
    # not survive beside it as if it were part of the new run.
    bad = [ClassDetections(["x"], [0.9], [[0, 0, 5, 5]]), ClassDetections(["x"], [math.nan], [[0, 0, 1, 1]])]
    with pytest.raises(DetectionError):
        write_result_files(tmp_path, "t", ["a", "b"], bad)
    assert not (tmp_path / result_file_name("t", "b")).exists()
    text = (tmp_path / result_file_name("t", "a")).read_text() if (tmp_path / result_file_name("t", "a")).exists() else ""
    assert "0.5" not in text
