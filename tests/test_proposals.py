"""Tests of detection.proposals: selective search on hand-made images, the cache (reuse, keys,
corruption, resume after SIGKILL), R-CNN .mat loading and proposal recall.

Selective search runs at small sizes (resize_to 96-128) so the file stays fast on 2 cores.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from detection.boxes import box_iou_numpy, internal_to_voc
from detection.data.records import ImageRecord
from detection.errors import CacheError, DatasetError
from detection.proposals import (
    ProposalSet,
    compute_proposals,
    load_rcnn_mat,
    proposal_recall,
    selective_search,
    xywh_to_internal,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = 128  # resize_to used with the synthetic dataset: enough structure, fast


def rectangle_image(height: int = 96, width: int = 128, box=(40, 30, 110, 80), seed: int = 0) -> np.ndarray:
    """Grey noise with one red rectangle covering columns x1..x2-1 and rows y1..y2-1."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 110, size=(height, width, 3)).astype(np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = (220, 30, 30)
    return img


# ---------------------------------------------------------------------------- conversion


def test_xywh_to_internal_matches_pixel_coverage():
    # A mask covering columns 3..7 and rows 4..9 (inclusive): OpenCV's Rect is (3, 4, 5, 6),
    # and the continuous box covering those pixels is [3, 8) x [4, 10).
    mask = np.zeros((20, 20), np.uint8)
    mask[4:10, 3:8] = 1
    rect = np.array([cv2.boundingRect(mask)])
    np.testing.assert_array_equal(rect, [[3, 4, 5, 6]])
    out = xywh_to_internal(rect)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[3, 4, 8, 10]])
    assert xywh_to_internal(np.zeros((0, 4))).shape == (0, 4)


# ---------------------------------------------------------------------------- selective search


def test_selective_search_finds_the_rectangle_and_obeys_the_contract():
    img = rectangle_image()
    gt = np.array([[40, 30, 110, 80]], dtype=np.float64)
    boxes = selective_search(img, max_boxes=300, resize_to=None, min_size=8)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert 1 <= len(boxes) <= 300
    assert box_iou_numpy(gt, boxes).max() > 0.7
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 128).all() and (boxes[:, 3] <= 96).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 8).all() and ((boxes[:, 3] - boxes[:, 1]) >= 8).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    np.testing.assert_array_equal(boxes, np.round(boxes))


def test_selective_search_is_deterministic_and_truncates_in_priority_order():
    img = rectangle_image(seed=1)
    a = selective_search(img, max_boxes=300, resize_to=None, min_size=8)
    b = selective_search(img, max_boxes=300, resize_to=None, min_size=8)
    np.testing.assert_array_equal(a, b)
    first = selective_search(img, max_boxes=7, resize_to=None, min_size=8)
    np.testing.assert_array_equal(first, a[:7])
    other_seed = selective_search(img, max_boxes=300, resize_to=None, min_size=8, seed=1)
    # Same set of boxes, (almost surely) another order.
    assert {tuple(r) for r in other_seed} == {tuple(r) for r in a}


def test_selective_search_maps_resized_boxes_back_to_original_pixels():
    img = rectangle_image(height=96, width=128, box=(40, 30, 110, 80))
    got = selective_search(img, max_boxes=1000, resize_to=64, min_size=20)
    # Reference: segment the half-size image ourselves, scale the boxes by exactly 2, then apply
    # the size filter in original pixels (20 px = 10 px at half size).
    half = cv2.resize(img, (64, 48), interpolation=cv2.INTER_AREA)
    ref = selective_search(half, max_boxes=1000, resize_to=None, min_size=0) * 2
    ref = ref[((ref[:, 2] - ref[:, 0]) >= 20) & ((ref[:, 3] - ref[:, 1]) >= 20)]
    np.testing.assert_array_equal(got, ref)
    assert box_iou_numpy(np.array([[40, 30, 110, 80]]), got).max() > 0.7


def test_selective_search_falls_back_to_the_whole_image_and_logs(caplog):
    tiny = np.full((8, 12, 3), 128, np.uint8)
    with caplog.at_level(logging.WARNING, logger="detection.proposals"):
        boxes = selective_search(tiny, min_size=20, resize_to=None)
    np.testing.assert_array_equal(boxes, [[0, 0, 12, 8]])
    assert boxes.dtype == np.float32
    assert "whole image" in caplog.text


def test_selective_search_rejects_bad_input():
    from detection.errors import DetectionError

    with pytest.raises(DetectionError):
        selective_search(np.zeros((10, 10), np.uint8))
    with pytest.raises(DetectionError):
        selective_search(rectangle_image(), mode="slow")


# ---------------------------------------------------------------------------- ProposalSet


def make_record(image_id, boxes, width=100, height=80, difficult=None, flipped=False) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return ImageRecord(image_id=image_id, path=Path(f"/nonexistent/{image_id}.jpg"), width=width, height=height,
                       boxes=boxes, labels=np.zeros(n, np.int64),
                       difficult=np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool),
                       truncated=np.zeros(n, bool), flipped=flipped)


def test_proposal_set_round_trip_flip_and_validation(tmp_path):
    ps = ProposalSet.from_lists(["a", "bb"], [np.array([[0, 0, 10, 20], [5, 5, 50, 40]]), np.array([[1, 2, 3, 4]])],
                                {"note": "x"})
    assert len(ps) == 2 and "a" in ps and "zz" not in ps
    path = tmp_path / "p.npz"
    ps.save(path)
    back = ProposalSet.load(path)
    assert back.image_ids == ("a", "bb")
    np.testing.assert_array_equal(back.boxes, ps.boxes)
    np.testing.assert_array_equal(back.offsets, [0, 2, 3])
    assert back.metadata["note"] == "x"
    np.testing.assert_array_equal(back.boxes_for("bb"), [[1, 2, 3, 4]])
    flipped = back.proposals_for_record(make_record("a", [], width=100, flipped=True))
    np.testing.assert_array_equal(flipped, [[90, 0, 100, 20], [50, 5, 95, 40]])
    np.testing.assert_array_equal(back.proposals_for_record(make_record("a", [])), ps.boxes_for("a"))
    with pytest.raises(CacheError, match="zz"):
        back.boxes_for("zz")

    # A truncated file and a file of another format version are refused, naming the file.
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="bad.npz"):
        ProposalSet.load(bad)
    old = tmp_path / "old.npz"
    np.savez(old, image_ids=np.array(["a"]), boxes=np.zeros((1, 4), np.float32), offsets=np.array([0, 1]),
             metadata=np.array('{"format_version": 0}'))
    with pytest.raises(CacheError, match="format"):
        ProposalSet.load(old)
    with pytest.raises(CacheError):
        ProposalSet(["a"], np.zeros((2, 4), np.float32), np.array([0, 1]))


# ---------------------------------------------------------------------------- recall


def test_proposal_recall_hand_worked():
    records = [
        # g1: best IoU 100/120 = 0.833; g2 difficult (ignored); g3: 100/160 = 0.625
        make_record("A", [[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], difficult=[0, 1, 0]),
        make_record("A", [[90, 0, 100, 10]], flipped=True),  # flipped copies are skipped
        make_record("C", [[0, 0, 10, 10]]),  # best IoU 50/150 = 0.333
        make_record("D", [[0, 0, 10, 10]]),  # IoU exactly 0.5 counts (>=)
    ]
    props = ProposalSet.from_lists(["A", "C", "D"], [
        [[0, 0, 10, 12], [50, 50, 60, 66], [200, 200, 210, 210]],
        [[5, 0, 15, 10]],
        [[0, 0, 20, 10]],
    ])
    ds = types.SimpleNamespace(records=records, root=Path("."), split="hand")
    rec = proposal_recall(ds, props, thresholds=(0.5, 0.7, 0.9))
    assert rec == {"0.5": 3 / 4, "0.7": 1 / 4, "0.9": 0.0}
    empty = types.SimpleNamespace(records=[make_record("E", [])], root=Path("."), split="hand")
    assert np.isnan(proposal_recall(empty, ProposalSet.from_lists(["E"], [[[0, 0, 1, 1]]]))["0.5"])


# ---------------------------------------------------------------------------- R-CNN .mat


def _cell(arrays) -> np.ndarray:
    cell = np.empty((1, len(arrays)), dtype=object)
    for i, a in enumerate(arrays):
        cell[0, i] = a
    return cell


def test_load_rcnn_mat_hand_worked(tmp_path):
    # Two layouts of 'images': a cell array (R-CNN's files) and a char matrix.
    ds = types.SimpleNamespace(records=[make_record("000005", [], width=100, height=80)], root=tmp_path,
                               split="hand", fingerprint=lambda: "fp")
    raw = np.array([[1, 1, 10, 20], [5, 2, 80, 200]], dtype=np.float64)  # [y1 x1 y2 x2], 1-based
    for images in (_cell(["000009", "000005"]).T, np.array(["000009", "000005"])):
        path = tmp_path / "ss.mat"
        scipy.io.savemat(path, {"images": images, "boxes": _cell([np.ones((1, 4)), raw])})
        ps = load_rcnn_mat(path, ds)
        assert ps.image_ids == ("000005",)
        # (x1 - 1, y1 - 1, x2, y2); the second box's x2 = 200 is clipped to the width 100.
        np.testing.assert_array_equal(ps.boxes_for("000005"), [[0, 0, 20, 10], [1, 4, 100, 80]])

    ds_missing = types.SimpleNamespace(records=[make_record("000007", [])], root=tmp_path, split="hand",
                                       fingerprint=lambda: "fp")
    with pytest.raises(DatasetError, match="000007"):
        load_rcnn_mat(path, ds_missing)
    scipy.io.savemat(tmp_path / "nokeys.mat", {"x": np.ones(2)})
    with pytest.raises(DatasetError, match="nokeys.mat"):
        load_rcnn_mat(tmp_path / "nokeys.mat", ds)


def test_load_rcnn_mat_round_trips_ground_truth(synthetic_voc, tmp_path):
    from detection.data.voc import VOCDataset

    ds = VOCDataset(synthetic_voc, "trainval")
    ids = [r.image_id for r in ds.records]
    # Write the ground truth as R-CNN would: 1-based inclusive, [y1 x1 y2 x2].
    cells = [internal_to_voc(r.boxes)[:, (1, 0, 3, 2)] for r in ds.records]
    scipy.io.savemat(tmp_path / "voc.mat", {"images": _cell(ids).T, "boxes": _cell(cells)})
    ps = load_rcnn_mat(tmp_path / "voc.mat", ds)
    assert ps.image_ids == tuple(ids)
    for r in ds.records:
        np.testing.assert_allclose(ps.boxes_for(r.image_id), r.boxes, atol=1e-4)
    assert proposal_recall(ds, ps) == {"0.5": 1.0, "0.7": 1.0}


# ---------------------------------------------------------------------------- the cache


def _tool_cmd(data: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "compute_proposals.py"), "--data", str(data), "--split",
            "trainval", "--out", str(out), "--workers", str(workers), "--resize-to", str(SMALL),
            "--no-progress"]


@pytest.mark.slow
def test_compute_proposals_matches_per_image_reference_reuses_and_rebuilds(synthetic_voc, tmp_path, caplog):
    from detection.data.images import load_image
    from detection.data.voc import VOCDataset

    ds = VOCDataset(synthetic_voc, "trainval", use_flipped=True)
    ps = compute_proposals(ds, tmp_path, resize_to=SMALL, num_workers=2, progress=False)
    originals = [r for r in ds.records if not r.flipped]
    assert ps.image_ids == tuple(r.image_id for r in originals)
    for r in originals[:3]:  # the pool's result equals a plain call in this process
        np.testing.assert_array_equal(ps.boxes_for(r.image_id), selective_search(load_image(r), resize_to=SMALL))
    flipped = next(r for r in ds.records if r.flipped)
    np.testing.assert_array_equal(ps.proposals_for_record(flipped)[:, 0],
                                  flipped.width - ps.boxes_for(flipped.image_id)[:, 2])

    caches = sorted(tmp_path.glob("proposals_*.npz"))
    assert len(caches) == 1
    mtime = caches[0].stat().st_mtime_ns
    again = compute_proposals(ds, tmp_path, resize_to=SMALL, num_workers=2, progress=False)
    assert caches[0].stat().st_mtime_ns == mtime  # reused, not rewritten
    np.testing.assert_array_equal(again.boxes, ps.boxes)

    # A damaged cache is rebuilt (from its shards) with a warning, to the same arrays.
    caches[0].write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="detection.proposals"):
        rebuilt = compute_proposals(ds, tmp_path, resize_to=SMALL, num_workers=1, progress=False)
    assert "rebuilding" in caplog.text
    np.testing.assert_array_equal(rebuilt.boxes, ps.boxes)
    np.testing.assert_array_equal(rebuilt.offsets, ps.offsets)

    # Other settings -> another key, another file; nothing of the first is reused.
    other = compute_proposals(ds, tmp_path, resize_to=SMALL, max_boxes=5, num_workers=1, progress=False)
    assert len(sorted(tmp_path.glob("proposals_*.npz"))) == 2
    assert other.num_boxes().max() <= 5
    np.testing.assert_array_equal(other.boxes_for(originals[0].image_id), ps.boxes_for(originals[0].image_id)[:5])


def test_flipped_byte_or_truncated_shard_is_named_and_recomputed(synthetic_voc, tmp_path, caplog):
    """A shard whose bytes no longer match the checksum written with it (one flipped byte inside
    the boxes, which numpy reads without complaint) or a shard cut short is named in a warning and
    computed again; a flipped byte in the assembled cache fails its zip CRC-32 and it is rebuilt."""
    from detection.data.voc import VOCDataset

    ds = VOCDataset(synthetic_voc, "trainval")
    ps = compute_proposals(ds, tmp_path, resize_to=SMALL, num_workers=0, progress=False)
    shards = sorted(tmp_path.glob("proposals_*.shards/*.npy"))
    assert all(p.with_name(p.name + ".crc32").is_file() for p in shards)
    flipped, cut = shards[0], shards[1]
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x01
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-8])
    cache = next(tmp_path.glob("proposals_*.npz"))
    data = bytearray(cache.read_bytes())
    data[len(data) // 2] ^= 0x01
    cache.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="detection.proposals"):
        again = compute_proposals(ds, tmp_path, resize_to=SMALL, num_workers=0, progress=False)
    assert f"{flipped}: unreadable proposal shard" in caplog.text and "corrupt or torn" in caplog.text
    assert f"{cut}: unreadable proposal shard" in caplog.text
    assert f"{cache}" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(again.boxes, ps.boxes)
    np.testing.assert_array_equal(again.offsets, ps.offsets)


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_arrays(synthetic_voc, tmp_path):
    from detection.data.voc import VOCDataset

    ds = VOCDataset(synthetic_voc, "trainval")
    # Uninterrupted reference, in this process (the interrupted run uses fresh processes).
    reference = compute_proposals(ds, tmp_path / "ref", resize_to=SMALL, num_workers=1, progress=False)

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_tool_cmd(synthetic_voc, out, workers=1), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("proposals_*.shards/*.npy")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no shard written within 60 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = list(out.glob("proposals_*.shards/*.npy"))
    assert 1 <= len(done) < len(ds.records), "the run must have been interrupted part-way"
    assert not list(out.glob("proposals_*.npz"))

    rerun = subprocess.run(_tool_cmd(synthetic_voc, out, workers=1), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    resumed = ProposalSet.load(next(out.glob("proposals_*.npz")))
    assert resumed.image_ids == reference.image_ids
    np.testing.assert_array_equal(resumed.boxes, reference.boxes)
    np.testing.assert_array_equal(resumed.offsets, reference.offsets)
    assert resumed.metadata == reference.metadata
    summary = (out / "summary.json").read_text()
    for key in ('"num_images"', '"boxes_per_image"', '"recall"', '"0.5"', '"0.7"', '"images_per_second"'):
        assert key in summary


@pytest.mark.slow
def test_bad_image_error_names_the_file(synthetic_voc, tmp_path):
    from detection.data.voc import VOCDataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_voc, data)
    ds = VOCDataset(data, "trainval")
    victim = ds.records[1].path
    victim.write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(DatasetError) as info:
        compute_proposals(ds, tmp_path / "out", resize_to=SMALL, num_workers=2, progress=False)
    assert victim.name in str(info.value)
    assert info.value.__cause__ is None  # no pool traceback chained on

    # The tool prints one line and exits 2.
    spec = importlib.util.spec_from_file_location("compute_proposals_tool", REPO / "tools" / "compute_proposals.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--data", str(data), "--split", "trainval", "--out", str(tmp_path / "out2"), "--workers", "1",
                      "--resize-to", str(SMALL), "--no-progress"]) == 2
