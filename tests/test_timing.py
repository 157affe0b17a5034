"""Tests of detection.timing: stage timers, FLOP counts against hand-computed ones, and the conv
FLOP ratio of R-CNN to SPP-net against its arithmetic value."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.detector import DetectorSettings
from detection.timing import STAGES, StageTimer, compare_methods, random_detector, time_detector
from references import reference_rcnn_features, reference_spp_features

LEVELS = (4, 2, 1)
HIDDEN = (24, 16)
NUM_CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detectors():
    backbone = build_backbone("squeezenet1_1", seed=0)      # a small trunk: 512 channels, stride 16
    settings = DetectorSettings(scales=(96,), levels=LEVELS)
    spp = random_detector(backbone, NUM_CLASSES, settings, hidden=HIDDEN, seed=0)
    rcnn = random_detector(backbone, NUM_CLASSES, dataclasses.replace(settings, method="rcnn"), hidden=HIDDEN, seed=0)
    return spp, rcnn


def _image(h: int = 72, w: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _proposals(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, [60, 40], (n, 2))
    return np.concatenate([xy, xy + rng.uniform(10, 30, (n, 2))], axis=1).astype(np.float32)


def test_stage_timer_accumulates_seconds_and_flops():
    timer = StageTimer(torch.device("cpu"), count_flops=True)
    a, b = torch.randn(8, 32), torch.randn(32, 5)
    with timer.stage("fc"):
        a @ b
        time.sleep(0.01)
    with timer.stage("fc"):
        a @ b
    with timer.stage("svm"):
        pass
    assert timer.flops == {"fc": 2 * (2 * 8 * 32 * 5), "svm": 0.0}      # a matmul is 2 M N K FLOPs
    assert timer.seconds["fc"] >= 0.01 and timer.seconds["svm"] >= 0.0
    plain = StageTimer(torch.device("cpu"))
    with plain.stage("x"):
        a @ b
    assert plain.flops == {} and plain.seconds["x"] >= 0.0


def test_time_detector_reports_every_stage(detectors):
    spp, rcnn = detectors
    images, props = [_image(), _image(60, 80)], [_proposals(3), _proposals(2)]
    for det in (spp, rcnn):
        out = time_detector(det, images, props, warmup=1)
        assert set(out) == set(STAGES) | {"total", "flops"}
        assert all(out[k] >= 0.0 for k in STAGES) and out["conv"] > 0.0
        assert out["total"] == pytest.approx(sum(out[k] for k in STAGES))
        assert set(out["flops"]) == set(STAGES) | {"total"}
        assert all(v >= 0.0 for v in out["flops"].values()) and out["flops"]["conv"] > 0
    no_flops = time_detector(spp, images[:1], props[:1], warmup=0, count_flops=False)
    assert "flops" not in no_flops


def test_fc_and_svm_flops_are_the_layer_arithmetic(detectors):
    spp, rcnn = detectors
    n = 6
    pool5_dim = spp.backbone.out_channels * sum(k * k for k in LEVELS)
    fc = 2 * n * (pool5_dim * HIDDEN[0] + HIDDEN[0] * HIDDEN[1])        # fc6 + fc7 multiply-adds x 2
    svm = 2 * n * HIDDEN[1] * NUM_CLASSES
    for det in (spp, rcnn):                                            # the same in both methods
        out = time_detector(det, [_image()], [_proposals(n)], warmup=0)
        assert out["flops"]["fc"] == fc
        assert out["flops"]["svm"] == svm


@pytest.mark.parametrize("scale", [96, 160])
def test_conv_flop_ratio_is_the_arithmetic_ratio(detectors, scale):
    spp, rcnn = detectors
    spp = _with_scale(spp, scale)
    rcnn = _with_scale(rcnn, scale)
    image, props = _image(), _proposals(6)
    f_spp = time_detector(spp, [image], [props], warmup=0)["flops"]["conv"]
    f_rcnn = time_detector(rcnn, [image], [props], warmup=0)["flops"]["conv"]
    # R-CNN runs the trunk on every window at 224 x 224; SPP-net once on the scaled image.
    h, w = image.shape[:2]
    f = scale / min(h, w)
    arithmetic = len(props) * rcnn.backbone.input_size ** 2 / (round(h * f) * round(w * f))
    assert arithmetic / 1.5 < f_rcnn / f_spp < arithmetic * 1.5


def _with_scale(det, scale: int):
    from detection.detector import SPPDetector
    return SPPDetector(det.backbone, det.head, det.svms, det.regressors, det.classes,
                       dataclasses.replace(det.settings, scales=(scale,)), det.device)


def test_compare_methods_summary(detectors):
    spp, rcnn = detectors
    out = compare_methods(spp, rcnn, [_image()], [_proposals(6)], proposal_seconds=0.5, warmup=0)
    assert out["num_images"] == 1 and out["num_windows"] == 6 and out["proposals_seconds_per_image"] == 0.5
    for k in ("conv", "fc", "total"):
        assert set(out["spp"]) == set(out["rcnn"]) == set(STAGES) | {"total"}
        assert np.isfinite(out["speedup"][k]) and out["speedup"][k] > 0
    assert out["flops"]["ratio"]["fc"] == 1.0
    assert out["flops"]["ratio"]["conv"] > 10                          # 6 crops of 224^2 vs one 96x128 image
    assert out["settings"]["rcnn"]["method"] == "rcnn" and out["settings"]["spp"]["method"] == "spp"
    assert "flops" not in out["spp"] and "flops" not in out["rcnn"]


@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_timed_run_is_the_detectors_own_path(detectors, method):
    # Timing passes a timer into SPPDetector.detect(): the timed run gives exactly the
    # detections (and, through pool5_features, the window features) of an untimed run.
    det = detectors[0] if method == "spp" else detectors[1]
    image, props = _image(), _proposals(6)
    timer = StageTimer(torch.device("cpu"))
    timed = det.detect(image, props, timer=timer)
    plain = det.detect(image, props)
    assert set(timer.seconds) == set(STAGES)
    np.testing.assert_array_equal(timed.boxes, plain.boxes)
    np.testing.assert_array_equal(timed.scores, plain.scores)
    features_timer = StageTimer(torch.device("cpu"))
    timed_features = det.pool5_features(image, props, features_timer)
    assert set(features_timer.seconds) == {"conv", "pool"}
    s = det.settings
    ref = (reference_spp_features(det.backbone, image, props, s.scales, s.max_size, s.levels, s.projection_rule,
                                  s.scale_rule) if method == "spp" else
           reference_rcnn_features(det.backbone, image, props, s.levels))
    torch.testing.assert_close(timed_features, torch.from_numpy(ref).float(), rtol=1e-4, atol=1e-4)


def test_compare_rcnn_times_the_features_rcnn_training_uses(detectors):
    # compare_rcnn's R-CNN twin (the SPP detector with method="rcnn") computes the same window
    # features as the R-CNN training path (the R-CNN featurizer called on a record), i.e. it
    # times the R-CNN detector.
    from detection.features import make_featurizer
    from detection.timing import rcnn_twin
    spp, _ = detectors
    image, props = _image(), _proposals(6)
    twin = rcnn_twin(spp)
    assert twin.settings.method == "rcnn" and twin.head is spp.head and twin.svms is spp.svms
    record_features = make_featurizer("rcnn", spp.settings, backbone=spp.backbone)
    ref = torch.from_numpy(reference_rcnn_features(spp.backbone, image, props, spp.settings.levels)).float()
    torch.testing.assert_close(twin.pool5_features(image, props), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_features_of(record_features, image, props), ref, rtol=1e-4, atol=1e-4)


def _features_of(pool5_fn, image, props):
    """Training features read their image from disk: hand it the image through a temporary PNG record."""
    import tempfile
    from pathlib import Path

    import cv2

    from detection.data.records import ImageRecord
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "im.png"
        cv2.imwrite(str(path), image[:, :, ::-1])
        record = ImageRecord(image_id="im", path=path, width=image.shape[1], height=image.shape[0],
                             boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64),
                             difficult=np.zeros(0, bool), truncated=np.zeros(0, bool))
        return pool5_fn(record, torch.as_tensor(props))


def test_compare_methods_times_svd_fc_in_the_same_run(detectors):
    import copy

    from detection.detector import SPPDetector
    spp, rcnn = detectors
    svd = SPPDetector(spp.backbone, copy.deepcopy(spp.head).compress(8, 4), spp.svms, spp.regressors, spp.classes,
                      spp.settings, spp.device)
    out = compare_methods(spp, rcnn, [_image()], [_proposals(6)], warmup=0, spp_svd=svd)
    for k in ("conv", "fc", "total"):
        assert out["speedup_svd"][k] == pytest.approx(out["rcnn"][k] / out["spp_svd"][k])
    assert out["flops"]["spp_svd"]["conv"] == out["flops"]["spp"]["conv"]   # same trunk, same image
    assert out["flops"]["spp_svd"]["fc"] < out["flops"]["spp"]["fc"]        # rank 8/4 fc is cheaper
    assert out["flops"]["ratio_svd"]["fc"] > 1.0


def test_compare_on_dataset_times_the_models_own_proposals(detectors, tmp_path):
    # compare_rcnn.py with --model: the windows are the model's selective search (every stored
    # setting), and the settings written to timing.json are the ones that made them; the
    # command-line mode / window count replace only those two settings.
    from detection.data.images import load_image
    from detection.data.synthetic import make_synthetic_voc
    from detection.data.voc import VOCDataset
    from detection.proposals import selective_search
    from detection.timing import compare_on_dataset
    spp, _ = detectors
    stored = dataclasses.replace(spp.settings.proposals, max_boxes=7, resize_to=200, min_size=12)
    model = tmp_path / "model.pt"
    type(spp)(spp.backbone, spp.head, spp.svms, spp.regressors, spp.classes,
              dataclasses.replace(spp.settings, proposals=stored)).save(model)
    root = make_synthetic_voc(tmp_path / "voc", num_trainval=1, num_test=1, image_size=(160, 120))
    image = load_image(VOCDataset(root, "test").records[0])

    out = compare_on_dataset(root, "test", tmp_path / "t.json", num_images=1, model=str(model), device="cpu")
    assert out["settings"]["spp"]["proposals"] == dataclasses.asdict(stored)
    assert out["settings"]["rcnn"]["proposals"] == dataclasses.asdict(stored)
    assert out["num_windows"] == len(selective_search(image, stored)) <= 7

    out = compare_on_dataset(root, "test", tmp_path / "t.json", num_images=1, model=str(model), device="cpu",
                             proposal_mode="quality", windows=3)
    used = dataclasses.replace(stored, mode="quality", max_boxes=3)
    assert out["settings"]["spp"]["proposals"] == dataclasses.asdict(used)
    assert out["num_windows"] == len(selective_search(image, used)) <= 3


def test_compare_rcnn_refuses_settings_its_model_would_ignore(tmp_path):
    # With --model the model file's own backbone and settings are timed: --scales, --scale-rule
    # and --feature-layer (before: silently ignored) are refused by name, before anything is read.
    import subprocess
    import sys
    from pathlib import Path

    from detection.errors import DetectionError
    from detection.timing import compare_on_dataset
    tool = Path(__file__).resolve().parents[1] / "tools" / "compare_rcnn.py"
    proc = subprocess.run([sys.executable, str(tool), "--data", str(tmp_path), "--out", str(tmp_path / "t.json"),
                           "--model", str(tmp_path / "model.pt"), "--scales", "5", "--feature-layer", "pool5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error: --scales, --feature-layer cannot be given with --model" in proc.stderr
    with pytest.raises(DetectionError, match="backbone, settings cannot be given with it"):
        compare_on_dataset(tmp_path, "test", tmp_path / "t.json", model=str(tmp_path / "model.pt"),
                           backbone="zf5", settings=DetectorSettings())
