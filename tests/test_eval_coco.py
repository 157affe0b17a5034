"""COCO export and pycocotools COCOeval bridge."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from detection.data.records import ImageRecord
from detection.evaluation.coco import COCO_STATS, coco_detections, coco_ground_truth, evaluate_coco
from detection.evaluation import ClassDetections

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

CLASSES = ("cat", "dog")


def _records(rng: np.random.Generator, n: int = 12) -> list[ImageRecord]:
    recs = []
    for i in range(n):
        g = int(rng.integers(1, 4))
        xy = rng.integers(0, 150, size=(g, 2))
        boxes = np.concatenate([xy, xy + rng.integers(20, 100, size=(g, 2))], axis=1).astype(np.float32)
        recs.append(ImageRecord(f"im{i}", Path(f"/nonexistent/im{i}.jpg"), 300, 260, boxes,
                                rng.integers(0, 2, g).astype(np.int64), np.zeros(g, bool), np.zeros(g, bool)))
    return recs


def _gt_as_detections(recs, shift=0.0, rng=None) -> list[ClassDetections]:
    out = []
    for c in range(len(CLASSES)):
        ids, boxes = [], []
        for r in recs:
            for b in r.boxes[r.labels == c]:
                ids.append(r.image_id)
                boxes.append(b + (rng.uniform(-shift, shift, 4) if shift else 0))
        out.append(ClassDetections(ids, np.ones(len(ids)), np.array(boxes).reshape(-1, 4)))
    return out


def test_ground_truth_round_trip_through_pycocotools(tmp_path):
    recs = _records(np.random.default_rng(0))
    (tmp_path / "gt.json").write_text(json.dumps(coco_ground_truth(recs, CLASSES)))
    (tmp_path / "dets.json").write_text(json.dumps(coco_detections(recs, CLASSES, _gt_as_detections(recs))))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "gt.json"))
        dets = coco.loadRes(str(tmp_path / "dets.json"))
    assert len(coco.getImgIds()) == len(recs)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getAnnIds()) == sum(len(r.boxes) for r in recs) == len(dets.getAnnIds())
    # bbox = [x1, y1, w, h] of the internal box; ids start at 1.
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    b = recs[0].boxes[0]
    assert ann["bbox"] == pytest.approx([b[0], b[1], b[2] - b[0], b[3] - b[1]])
    assert ann["category_id"] == int(recs[0].labels[0]) + 1 and ann["iscrowd"] == 0


def test_perfect_detections_score_one_and_perturbed_lower():
    recs = _records(np.random.default_rng(1))
    perfect = evaluate_coco(recs, CLASSES, _gt_as_detections(recs))
    assert set(perfect) == set(COCO_STATS)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    noisy = evaluate_coco(recs, CLASSES, _gt_as_detections(recs, shift=8.0, rng=np.random.default_rng(2)))
    assert 0.0 < noisy["AP"] < perfect["AP"]
    assert noisy["AP50"] >= noisy["AP75"]
    assert all(0.0 <= v <= 1.0 for v in noisy.values() if not math.isnan(v))


def test_difficult_objects_are_crowd_regions_and_do_not_count():
    recs = _records(np.random.default_rng(3), n=4)
    r = recs[0]
    difficult = np.zeros(len(r.boxes), bool)
    difficult[0] = True
    recs[0] = ImageRecord(r.image_id, r.path, r.width, r.height, r.boxes, r.labels, difficult, r.truncated)
    gt = coco_ground_truth(recs, CLASSES)
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1
    # Detecting only the non-difficult objects is perfect: the difficult one is not a miss.
    dets = _gt_as_detections(recs)
    keep = [ClassDetections(*_drop(d, r.image_id, r.boxes[0])) if c == r.labels[0] else d
            for c, d in enumerate(dets)]
    assert evaluate_coco(recs, CLASSES, keep)["AP"] == pytest.approx(1.0)


def _drop(d: ClassDetections, image_id: str, box: np.ndarray):
    sel = ~((d.image_ids == image_id) & np.all(np.isclose(d.boxes, box), axis=1))
    return d.image_ids[sel], d.scores[sel], d.boxes[sel]


def test_no_detections_is_zero():
    recs = _records(np.random.default_rng(4), n=3)
    out = evaluate_coco(recs, CLASSES, [ClassDetections.empty(), ClassDetections.empty()])
    assert out == {k: 0.0 for k in COCO_STATS}


def test_voc_and_coco_evaluators_never_import_each_other():
    # Both build on evaluation.detections; the package __init__ combines them.
    import ast
    from pathlib import Path

    import detection.evaluation as evaluation
    folder = Path(evaluation.__file__).parent
    voc = ("devkit", "result_files", "evaluator")      # the VOC protocol's modules
    pairs = [(name, "coco") for name in voc] + [("coco", name) for name in voc]
    for name, other in pairs:
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert other not in imported and f"detection.evaluation.{other}" not in imported, name
