"""The embedded synthetic dataset: determinism, VOC structure, tight boxes, atomic writing."""
from __future__ import annotations

import colorsys
import hashlib
import importlib.util
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from detection.boxes import box_iou_numpy
from detection.data.synthetic import DIFFICULT_MAX_SIDE, SYNTHETIC_CLASSES, make_synthetic_voc
from detection.data.images import load_image
from detection.data.voc import VOCDataset
from detection.errors import DatasetError
from detection.io.jsonfile import read_json

REPO = Path(__file__).resolve().parents[1]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = make_synthetic_voc(tmp_path / "a", num_trainval=4, num_test=2, seed=3)
    b = make_synthetic_voc(tmp_path / "b", num_trainval=4, num_test=2, seed=3)
    c = make_synthetic_voc(tmp_path / "c", num_trainval=4, num_test=2, seed=4)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) == 6 * 2 + 3  # xml + jpg per image, two split files, synthetic.json
    assert da == db
    assert all(da[k] != dc[k] for k in da if k.startswith("JPEGImages"))


def test_structure_and_annotations(synthetic_voc):
    tv, te = VOCDataset(synthetic_voc, "trainval"), VOCDataset(synthetic_voc, "test")
    assert tv.classes == te.classes == SYNTHETIC_CLASSES
    assert not tv.size_from_image and not tv.size_mismatch
    ids = [r.image_id for r in [*tv, *te]]
    assert ids == [f"{i:06d}" for i in range(1, len(ids) + 1)]  # trainval first, no overlap
    meta = read_json(synthetic_voc / "synthetic.json")
    assert (len(tv), len(te)) == (meta["num_trainval"], meta["num_test"])
    for rec in [*tv, *te]:
        assert (rec.width, rec.height) == tuple(meta["image_size"])
        assert 1 <= len(rec.boxes) <= 4
        b = rec.boxes
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= rec.width).all() and (b[:, 3] <= rec.height).all()
        side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        np.testing.assert_array_equal(rec.difficult, side < DIFFICULT_MAX_SIDE)
        assert (side <= 150).all()


def _saturation(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float64)
    mx, mn = f.max(axis=2), f.min(axis=2)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1), 0.0)


def test_boxes_are_tight_around_saturated_class_coloured_pixels(synthetic_voc):
    """Objects are saturated, the background muted. Each box's outermost rows and columns hold
    object pixels (the box is not too large), the one-pixel ring just outside an isolated box
    holds almost none (not too small: an off-by-one at the 1-based conversion would put a whole
    object edge there), and the object's hue is its class's."""
    hue_centre = {"circle": 0.0, "square": 0.62, "star": 0.13, "triangle": 0.33}
    ds = VOCDataset(synthetic_voc, "trainval")
    ring_fractions = []
    for rec in ds:
        img = load_image(rec)
        sat = _saturation(img) > 0.45
        for k, (box, label) in enumerate(zip(rec.boxes.astype(int), rec.labels)):
            x1, y1, x2, y2 = box
            patch = sat[y1:y2, x1:x2]
            assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
            mean = img[y1:y2, x1:x2][patch].mean(axis=0) / 255.0
            diff = abs(colorsys.rgb_to_hsv(*mean)[0] - hue_centre[ds.classes[label]])
            assert min(diff, 1 - diff) < 0.1, (rec.image_id, ds.classes[label])
            grown = np.array([[x1 - 2, y1 - 2, x2 + 2, y2 + 2]])
            others = np.delete(rec.boxes, k, axis=0)
            isolated = not (len(others) and (box_iou_numpy(grown, others) > 0).any())
            if isolated and x1 >= 1 and y1 >= 1 and x2 < rec.width and y2 < rec.height:
                ring = np.concatenate([sat[y1 - 1, x1 - 1:x2 + 1], sat[y2, x1 - 1:x2 + 1],
                                       sat[y1 - 1:y2 + 1, x1 - 1], sat[y1 - 1:y2 + 1, x2]])
                ring_fractions.append(ring.mean())
    assert len(ring_fractions) >= 5
    # Measured on seed 0: mean 0.01 (background noise); boxes 1 px too small give ~0.3.
    assert np.mean(ring_fractions) < 0.05 and max(ring_fractions) < 0.25, ring_fractions


def test_all_classes_and_some_hard_cases(tmp_path):
    """Over 61 images every class appears often, and the hard cases (difficult, truncated) exist."""
    root = make_synthetic_voc(tmp_path / "full", num_trainval=60, num_test=1)
    counts = np.zeros(len(SYNTHETIC_CLASSES), int)
    difficult = truncated = 0
    for split in ("trainval", "test"):
        for rec in VOCDataset(root, split):
            np.add.at(counts, rec.labels, 1)
            difficult += int(rec.difficult.sum())
            truncated += int(rec.truncated.sum())
    assert counts.min() >= 15, counts
    assert difficult > 0 and truncated > 0


def test_reuse_replace_and_refuse(tmp_path):
    root = make_synthetic_voc(tmp_path / "d", num_trainval=2, num_test=1)
    stamp = (root / "synthetic.json").stat().st_mtime_ns
    assert make_synthetic_voc(root, num_trainval=2, num_test=1) == root
    assert (root / "synthetic.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    make_synthetic_voc(root, num_trainval=3, num_test=1)  # other settings: replaced
    assert len(VOCDataset(root, "trainval")) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left behind
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="photos"):
        make_synthetic_voc(foreign, num_trainval=2, num_test=1)
    assert (foreign / "holiday.jpg").read_bytes() == b"x"
    with pytest.raises(DatasetError):
        make_synthetic_voc(tmp_path / "e", num_trainval=0, num_test=1)


def test_killed_generation_leaves_no_dataset_and_reruns(tmp_path):
    root = tmp_path / "killed"
    # A forked child (no re-import) renders a large dataset; SIGKILL it mid-way.
    proc = multiprocessing.get_context("fork").Process(
        target=make_synthetic_voc, args=(root,), kwargs={"num_trainval": 400, "num_test": 10})
    proc.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the temporary folder holds images
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.")]
        if tmps and any((tmps[0] / "JPEGImages").glob("*.jpg")):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not root.exists()  # an interrupted dataset never appears under its name
    made = make_synthetic_voc(root, num_trainval=2, num_test=1)
    assert len(VOCDataset(made, "trainval")) == 2


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_synthetic_voc_tool", REPO / "tools" / "make_synthetic_voc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "tool"
    assert tool.main(["--out", str(out), "--num-trainval", "2", "--num-test", "1", "--seed", "5", "--quiet"]) == 0
    assert read_json(out / "synthetic.json")["seed"] == 5
    assert tool.main(["--out", str(tmp_path), "--num-trainval", "2", "--num-test", "1", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_crowded_option_many_overlapping_objects_one_dominant_class(tmp_path):
    root = make_synthetic_voc(tmp_path / "crowd", num_trainval=12, num_test=3, seed=1, crowded=True)
    ds = VOCDataset(root, "trainval")
    assert ds.classes == ("circle", "square", "triangle")           # stars never appear
    counts = np.array([len(r.boxes) for r in ds.records])
    assert counts.min() >= 8 and 12 <= counts.mean() <= 16           # 12-16 wanted; a few may not fit
    labels = np.concatenate([r.labels for r in ds.records])
    assert 0.55 < (labels == 0).mean() < 0.8                         # circles: 2/3 of the boxes
    overlapping = [(box_iou_numpy(r.boxes, r.boxes) - np.eye(len(r.boxes)) > 0).any(axis=1).mean()
                   for r in ds.records]
    assert np.mean(overlapping) > 0.3                                # many objects overlap another
    assert read_json(root / "synthetic.json")["crowded"] is True
    # the default dataset's settings file has no "crowded" key: datasets made before the option
    # are still reused
    plain = make_synthetic_voc(tmp_path / "plain", num_trainval=2, num_test=1, seed=1)
    assert "crowded" not in read_json(plain / "synthetic.json")
    assert make_synthetic_voc(root, num_trainval=12, num_test=3, seed=1, crowded=True) == root
