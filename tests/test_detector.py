"""Tests of detection.detector: post-processing against a slow reference, the model-file round
trip of a whole detector, the pooled features against the training path, the 3-line API and
the R-CNN method."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.calibration import ScoreCalibration
from detection.detector import Detections, DetectorSettings, SPPDetector, check_settings, postprocess
from detection.errors import ModelError
from detection.features import conv_maps_for_image, pooled_window_features
from detection.heads import FCHead
from detection.linear import BoxRegressors, LinearSVMs, decode
from detection.model import save_model
from detection.proposals import SelectiveSearchConfig, selective_search
from references import reference_rcnn_features

CLASSES = ("cat", "dog", "bird")
LEVELS = (4, 2, 1)              # 21 bins: keeps the random head and regressors small
HIDDEN = (24, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# A small detector with random parts (squeezenet: its first conv cell is centred at 15.5 px,
# not ZF-5's 0.5, so a projection that forgets the trunk's geometry shows up)
# ---------------------------------------------------------------------------------------------

def _parts(backbone_name: str = "squeezenet1_1", seed: int = 0):
    backbone = build_backbone(backbone_name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    pool5_dim = backbone.out_channels * sum(n * n for n in LEVELS)
    head = FCHead(pool5_dim, HIDDEN, num_classes=None, dropout=0.5, generator=g).eval()
    k = len(CLASSES)
    # Scores of order one around zero, so that some windows fall below the -1.5 threshold.
    w = torch.randn((k, HIDDEN[1]), generator=g).numpy()
    svms = LinearSVMs(weights=w, biases=np.array([0.5, -0.2, 0.0], np.float32), feature_scale=0.3,
                      meta={"note": "random"})
    regressors = BoxRegressors(weights=torch.randn((k, pool5_dim, 4), generator=g).numpy() * 1e-3,
                               biases=torch.randn((k, 4), generator=g).numpy() * 0.1,
                               target_mean=np.zeros((k, 4), np.float32),
                               target_unwhiten=np.tile(np.eye(4, dtype=np.float32) * 0.2, (k, 1, 1)),
                               feature_scale=1.0)
    return backbone, head, svms, regressors


@pytest.fixture(scope="module")
def parts():
    return _parts()


SETTINGS = DetectorSettings(scales=(96,), levels=LEVELS, proposals=SelectiveSearchConfig(max_boxes=50))


def _image(seed: int = 0, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[20:50, 30:70] = (200, 40, 40)                         # something object-like
    return img


def _proposals(seed: int = 1, n: int = 24, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-5, [w - 10, h - 10], (n, 2))
    wh = rng.uniform(8, 60, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# postprocess against a slow reference
# ---------------------------------------------------------------------------------------------

def ref_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_postprocess(boxes: np.ndarray, scores: np.ndarray, thr: float, nms_iou: float, cap: int):
    """Per class: drop scores <= thr and empty boxes, greedy NMS (suppress IoU > nms_iou), keep
    the ``cap`` best. Returns (boxes, scores, labels) sorted by class, then descending score."""
    out_b, out_s, out_l = [], [], []
    for k in range(scores.shape[1]):
        cand = [i for i in range(len(scores)) if scores[i, k] > thr
                and boxes[i, k, 2] > boxes[i, k, 0] and boxes[i, k, 3] > boxes[i, k, 1]]
        cand.sort(key=lambda i: -scores[i, k])
        kept: list[int] = []
        for i in cand:
            if len(kept) == cap:              # greedy: later windows cannot enter the first ``cap``
                break
            if all(ref_iou(boxes[i, k].astype(np.float64), boxes[j, k].astype(np.float64)) <= nms_iou
                   for j in kept):
                kept.append(i)
        for i in kept[:cap]:
            out_b.append(boxes[i, k])
            out_s.append(scores[i, k])
            out_l.append(k)
    return (np.array(out_b, np.float32).reshape(-1, 4), np.array(out_s, np.float32), np.array(out_l, np.int64))


def _by_class_then_score(d: Detections):
    order = np.lexsort((-d.scores, d.labels))
    return d.boxes[order], d.scores[order], d.labels[order]


def _random_candidates(n: int = 400, k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Mostly small scattered boxes (little overlap: > 100 survive NMS in some classes) ...
    xy = rng.uniform(0, 600, (n, k, 2))
    wh = rng.uniform(2, 12, (n, k, 2))
    boxes = np.concatenate([xy, xy + wh], axis=2)
    # ... a cluster of heavily overlapping boxes for NMS to thin out ...
    boxes[:60, :, :] = np.array([100, 100, 140, 130]) + rng.normal(0, 3, (60, k, 4))
    # ... pairs just below and above the 0.3 threshold: IoU(A, A + d) = (10 - d) / (10 + d) ...
    for row, d, at in ((60, 5.267, 700), (62, 5.504, 800)):    # IoU 0.310 and 0.290
        boxes[row, :] = [at, at, at + 10, at + 10]
        boxes[row + 1, :] = [at + d, at, at + 10 + d, at + 10]
    # ... and boxes that have no area.
    boxes[64:70, :, 2] = boxes[64:70, :, 0]
    scores = rng.normal(0.0, 1.0, (n, k))
    scores[60:64] = 5.0 - np.arange(4)[:, None] * 0.01       # A before A + d; all pass the threshold
    scores[64:70] = 9.0                                       # zero-area boxes score high but must go
    scores[:, 2] -= 2.5                                       # class 2: few windows above -1.5
    return torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32)


@pytest.mark.parametrize("settings", [
    DetectorSettings(),
    DetectorSettings(nms_iou=0.5, max_per_class=20, score_threshold=0.0),
])
def test_postprocess_matches_slow_reference(settings):
    boxes, scores = _random_candidates()
    got = Detections(*(t.numpy() for t in postprocess(boxes, scores, settings)))
    ref = ref_postprocess(boxes.numpy(), scores.numpy(), settings.score_threshold, settings.nms_iou,
                          settings.max_per_class)
    counts = np.bincount(ref[2], minlength=3)
    if settings.max_per_class == 100:
        assert counts.max() == 100 and counts.min() < 100     # the cap bites in some class only
    gb, gs, gl = _by_class_then_score(got)
    np.testing.assert_array_equal(gl, ref[2])
    np.testing.assert_array_equal(gs, ref[1])
    np.testing.assert_array_equal(gb, ref[0])
    assert got.boxes.dtype == np.float32 and got.scores.dtype == np.float32 and got.labels.dtype == np.int64
    assert (np.diff(got.scores) <= 0).all()                   # overall by descending score
    # The near-threshold pairs: IoU 0.31 is suppressed at 0.3, IoU 0.29 is not.
    if settings.nms_iou == 0.3:
        for k in range(3):
            s = set(got.scores[got.labels == k].tolist())
            assert {float(np.float32(scores[60, k])), float(np.float32(scores[62, k])),
                    float(np.float32(scores[63, k]))} <= s
            assert float(np.float32(scores[61, k])) not in s


def ref_vote(kept: np.ndarray, label: int, boxes: np.ndarray, scores: np.ndarray, thr: float, iou: float):
    """The box voting of one kept box, slowly: the mean of the class's windows that pass the
    threshold, have area and overlap it by IoU >= ``iou``, weighted by max(0, score)."""
    total, acc = 0.0, np.zeros(4)
    for i in range(len(scores)):
        b = boxes[i, label].astype(np.float64)
        if scores[i, label] > thr and b[2] > b[0] and b[3] > b[1] and ref_iou(kept.astype(np.float64), b) >= iou:
            total += max(0.0, float(scores[i, label]))
            acc += max(0.0, float(scores[i, label])) * b
    return acc / total if total > 0 else kept


@pytest.mark.parametrize("vote_iou", [0.5, 0.8])
def test_box_voting_matches_slow_reference(vote_iou):
    boxes, scores = _random_candidates()
    scores[:, 1] -= 1.0                     # class 1: many kept boxes with no voter above 0
    plain = DetectorSettings(nms_iou=0.4, score_threshold=-1.0)
    voting = dataclasses.replace(plain, box_vote_iou=vote_iou)
    got_b, got_s, got_l = (t.numpy() for t in postprocess(boxes, scores, voting))
    ref_b, ref_s, ref_l = (t.numpy() for t in postprocess(boxes, scores, plain))
    np.testing.assert_array_equal(got_s, ref_s)     # the same detections, in the same order ...
    np.testing.assert_array_equal(got_l, ref_l)
    want = np.array([ref_vote(b, int(k), boxes.numpy(), scores.numpy(), -1.0, vote_iou) for b, k in zip(ref_b, ref_l)])
    np.testing.assert_allclose(got_b, want, rtol=0, atol=1e-3)    # ... with voted boxes
    moved = np.abs(got_b - ref_b).max(axis=1) > 1e-3
    # A kept box scoring <= 0 has no voter above 0: one would overlap it by more than the NMS
    # threshold and score higher, so NMS would have removed it. It stays where it was.
    unvoted = ref_s <= 0
    assert moved.any() and unvoted.any() and not moved[unvoted].any()


def test_box_voting_by_hand():
    # Two windows of class 0 at IoU 0.6 with the first (scores 3 and 1; NMS 0.5 keeps the first),
    # one more at IoU 0.6 scoring -0.5 (no vote),
    # one of class 1 on top of the first (another class: no vote).
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6], [0, 4, 10, 10], [0, 0, 10, 10]], dtype=torch.float32)
    per_class = torch.stack([boxes, boxes], dim=1)               # [4, 2, 4]
    scores = torch.tensor([[3.0, -9], [1.0, -9], [-0.5, -9], [-9, 2.0]])
    s = DetectorSettings(nms_iou=0.5, score_threshold=-1.0, box_vote_iou=0.55)
    got_b, got_s, got_l = postprocess(per_class, scores, s)
    assert got_l.tolist() == [0, 1] and got_s.tolist() == [3.0, 2.0]
    assert got_b.tolist() == [[0, 0, 10, (3 * 10 + 1 * 6) / 4], [0, 0, 10, 10]]


def test_box_voting_threshold_is_checked():
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="box_vote_iou"):
            check_settings(DetectorSettings(box_vote_iou=bad))


def test_postprocess_of_nothing():
    d = Detections(*(t.numpy() for t in postprocess(torch.zeros((5, 3, 4)), torch.full((5, 3), -10.0), SETTINGS)))
    assert len(d) == 0 and d.boxes.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Features: the same as the training path
# ---------------------------------------------------------------------------------------------

def test_pool5_features_use_the_trunk_geometry(parts):
    backbone = parts[0]
    assert backbone.first_cell_center != 0.5                  # the case this test is about
    det = SPPDetector(*parts, CLASSES, SETTINGS)
    img, props = _image(), _proposals()
    got = det.pool5_features(img, props)
    # The training path: ImageConvMaps / ConvMapCache project with the trunk's first cell centre.
    maps = conv_maps_for_image(backbone, img, SETTINGS.scales, SETTINGS.max_size)
    ref = pooled_window_features(maps.maps, maps.factors, torch.from_numpy(props), maps.stride, LEVELS,
                                 SETTINGS.projection_rule, first_cell_center=maps.first_cell_center)
    assert tuple(got.shape) == (len(props), backbone.out_channels * 21)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_detect_equals_manual_pipeline(parts):
    backbone, head, svms, regressors = parts
    settings = dataclasses.replace(SETTINGS, nms_iou=1.0, score_threshold=-np.inf, max_per_class=10_000)
    det = SPPDetector(*parts, CLASSES, settings)
    img, props = _image(), _proposals()
    dets = det.detect(img, props)
    # Without NMS / threshold / cap, every (window, class) with a non-empty clipped box is a detection.
    with torch.inference_mode():
        pool5 = det.pool5_features(img, props)
        scores = svms.scores(head.features(pool5, "fc7")).numpy()
    refined = decode(np.repeat(props[:, None, :], 3, axis=1).reshape(-1, 4).astype(np.float64),
                     regressors.predict_deltas(pool5.numpy()).reshape(-1, 4)).reshape(-1, 3, 4)
    refined[..., 0::2] = refined[..., 0::2].clip(0, img.shape[1])
    refined[..., 1::2] = refined[..., 1::2].clip(0, img.shape[0])
    ok = (refined[..., 2] > refined[..., 0]) & (refined[..., 3] > refined[..., 1])
    assert len(dets) == ok.sum()
    n_idx, k_idx = np.nonzero(ok)
    order = np.lexsort((-scores[n_idx, k_idx], k_idx))
    gb, gs, gl = _by_class_then_score(dets)
    np.testing.assert_array_equal(gl, k_idx[order])
    np.testing.assert_allclose(gs, scores[n_idx, k_idx][order], rtol=1e-6)
    np.testing.assert_allclose(gb, refined[n_idx, k_idx][order], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Model file round trip and the public API
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_saved_and_loaded_detector_gives_identical_detections(parts, tmp_path, method):
    settings = dataclasses.replace(SETTINGS, method=method)
    det = SPPDetector(*parts, CLASSES, settings, meta={"train": {"seed": 3}})
    img, props = _image(), _proposals(n=24 if method == "spp" else 6)
    before = det.detect(img, props)
    assert len(before) > 0
    path = tmp_path / "model.pt"
    det.save(path, extra_meta={"dataset": {"split": "trainval"}})
    loaded = SPPDetector.from_file(path)
    assert loaded.classes == CLASSES and loaded.settings == settings
    assert loaded.meta["train"] == {"seed": 3} and loaded.meta["dataset"] == {"split": "trainval"}
    assert loaded.backbone.weights_id == det.backbone.weights_id
    after = loaded.detect(img, props)
    np.testing.assert_array_equal(after.boxes, before.boxes)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.labels, before.labels)
    # The loaded trunk really is the saved one (not a fresh random init of the same seed).
    for (ka, va), (kb, vb) in zip(det.backbone.trunk.state_dict().items(), loaded.backbone.trunk.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_calibrated_probabilities_are_stored_reloaded_and_follow_the_scores(parts, tmp_path):
    cal = ScoreCalibration(np.array([1.5, 0.8, 2.0]), np.array([0.5, -1.0, 0.2]), {"folds": 2})
    det = SPPDetector(*parts, CLASSES, SETTINGS, calibration=cal)
    img, props = _image(), _proposals()
    before = det.detect(img, props)
    assert len(before) > 0 and before.probabilities is not None
    np.testing.assert_allclose(before.probabilities, cal.probabilities(before.scores, before.labels), rtol=1e-6)
    for c in range(len(CLASSES)):     # within a class, probability order is score order
        m = before.labels == c
        order = np.argsort(before.scores[m])
        assert (np.diff(before.probabilities[m][order]) >= 0).all()
    det.save(tmp_path / "model.pt")
    loaded = SPPDetector.from_file(tmp_path / "model.pt")
    np.testing.assert_array_equal(loaded.calibration.slopes, cal.slopes)
    np.testing.assert_array_equal(loaded.calibration.intercepts, cal.intercepts)
    after = loaded.detect(img, props)
    np.testing.assert_array_equal(after.scores, before.scores)          # raw scores unchanged
    np.testing.assert_array_equal(after.probabilities, before.probabilities)
    assert loaded.detect(img, props[:0]).probabilities.shape == (0,)
    # A model without calibration (older files) gives scores only.
    plain = SPPDetector(*parts, CLASSES, SETTINGS)
    plain.save(tmp_path / "plain.pt")
    assert SPPDetector.from_file(tmp_path / "plain.pt").detect(img, props).probabilities is None
    # A calibration for the wrong number of classes is refused.
    with pytest.raises(ModelError, match="calibration"):
        SPPDetector(*parts, CLASSES, SETTINGS, calibration=ScoreCalibration(np.ones(2), np.zeros(2)))


def test_a_detector_with_svd_fc_layers_saves_and_loads(parts, tmp_path):
    import copy
    backbone, head, svms, regressors = parts
    small = copy.deepcopy(head).compress(4, 3)
    det = SPPDetector(backbone, small, svms, regressors, CLASSES, SETTINGS)
    img, props = _image(), _proposals(n=24)
    path = tmp_path / "model_svd.pt"
    det.save(path)
    loaded = SPPDetector.from_file(path)
    assert loaded.head.svd_ranks == small.svd_ranks
    for (ka, va), (kb, vb) in zip(small.state_dict().items(), loaded.head.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    before, after = det.detect(img, props), loaded.detect(img, props)
    np.testing.assert_array_equal(after.boxes, before.boxes)
    np.testing.assert_array_equal(after.scores, before.scores)


def test_loaded_trunk_weights_come_from_the_file(tmp_path):
    parts = _parts(seed=5)                                    # a trunk that build_backbone(seed=0) is not
    det = SPPDetector(*parts, CLASSES, SETTINGS)
    path = tmp_path / "model.pt"
    det.save(path)
    loaded = SPPDetector.from_file(path)
    img, props = _image(), _proposals()
    torch.testing.assert_close(loaded.pool5_features(img, props), det.pool5_features(img, props), rtol=0, atol=0)


def test_rcnn_features_are_warped_crops(parts):
    backbone = parts[0]
    det = SPPDetector(*parts, CLASSES, dataclasses.replace(SETTINGS, method="rcnn", rcnn_batch_size=4))
    img, props = _image(), _proposals(n=5)
    got = det.pool5_features(img, props)
    ref = torch.from_numpy(reference_rcnn_features(backbone, img, props, LEVELS)).float()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    spp = SPPDetector(*parts, CLASSES, SETTINGS).pool5_features(img, props)
    assert got.shape == spp.shape and not torch.allclose(got, spp)


def test_three_line_api(parts, tmp_path):
    path = tmp_path / "model.pt"
    SPPDetector(*parts, CLASSES, SETTINGS).save(path)

    detector = SPPDetector.from_file(path)
    dets = detector.detect(_image())                          # selective search inside
    boxes, labels, scores = dets.boxes, dets.labels, dets.scores

    assert boxes.shape == (len(dets), 4) and labels.shape == scores.shape == (len(dets),)
    assert len(dets) > 0 and set(labels.tolist()) <= {0, 1, 2}
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 72).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (scores > SETTINGS.score_threshold).all()
    for k in range(3):
        assert (labels == k).sum() <= SETTINGS.max_per_class


#: Every selective-search setting away from its default, as a model trained on such windows has.
OWN_PROPOSALS = SelectiveSearchConfig(mode="quality", max_boxes=30, resize_to=64, min_size=6, base_k=100, inc_k=120,
                                      sigma=0.6, seed=7)


def test_detect_on_a_new_image_computes_the_models_own_windows(parts, tmp_path):
    path = tmp_path / "model.pt"
    SPPDetector(*parts, CLASSES, dataclasses.replace(SETTINGS, proposals=OWN_PROPOSALS)).save(path)
    detector = SPPDetector.from_file(path)
    assert detector.settings.proposals == OWN_PROPOSALS
    image = _image(seed=11)
    windows = selective_search(image, OWN_PROPOSALS)
    np.testing.assert_array_equal(detector.proposals(image), windows)
    assert not np.array_equal(windows, selective_search(image))       # the settings matter here
    got, ref = detector.detect(image), detector.detect(image, windows)
    assert len(got) > 0
    np.testing.assert_array_equal(got.boxes, ref.boxes)
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.labels, ref.labels)


def test_model_files_from_before_the_proposal_settings_detect_as_they_did(parts, tmp_path):
    """An older file holds ``proposal_mode`` and ``max_proposals`` only: its detector runs
    selective search with them and the defaults of every other setting, as it did."""
    import json
    path = tmp_path / "model.pt"
    SPPDetector(*parts, CLASSES, SETTINGS).save(path)
    blob = torch.load(path, weights_only=True)
    meta = json.loads(blob["meta"])
    del meta["settings"]["proposals"]
    meta["settings"].update(proposal_mode="quality", max_proposals=40)
    blob["meta"] = json.dumps(meta)
    torch.save(blob, path)
    detector = SPPDetector.from_file(path)
    assert detector.settings.proposals == SelectiveSearchConfig(mode="quality", max_boxes=40)
    image = _image(seed=12)
    np.testing.assert_array_equal(detector.proposals(image), selective_search(image, mode="quality", max_boxes=40))


def test_no_proposals_no_detections(parts):
    d = SPPDetector(*parts, CLASSES, SETTINGS).detect(_image(), np.zeros((0, 4), np.float32))
    assert len(d) == 0 and d.boxes.dtype == np.float32 and d.labels.dtype == np.int64


def test_without_box_regression_boxes_are_clipped_proposals(parts):
    backbone, head, svms, _ = parts
    det = SPPDetector(backbone, head, svms, None, CLASSES, SETTINGS)
    props = _proposals()
    dets = det.detect(_image(), props)
    clipped = props.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, 96)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, 72)
    for b in dets.boxes:
        assert (np.abs(clipped - b).max(axis=1) < 1e-6).any()


def test_mismatched_parts_and_bad_files_are_model_errors(parts, tmp_path):
    backbone, head, svms, regressors = parts
    with pytest.raises(ModelError, match="3 SVMs for 2 classes"):
        SPPDetector(backbone, head, svms, regressors, CLASSES[:2], SETTINGS)
    path = tmp_path / "other.pt"
    save_model(path, {"x": torch.zeros(1)}, {"hello": "world"})
    with pytest.raises(ModelError, match="does not describe a detector"):
        SPPDetector.from_file(path)
    with pytest.raises(ModelError):
        SPPDetector.from_file(tmp_path / "missing.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_detector_on_cuda_matches_cpu(parts, method):
    # Features and scores, not detections: TF32 convolutions may flip a near-tie in NMS.
    settings = dataclasses.replace(SETTINGS, method=method)
    img, props = _image(), _proposals(n=8)
    cpu = SPPDetector(*parts, CLASSES, settings)
    gpu = SPPDetector(*_parts(), CLASSES, settings, device="cuda")    # fresh copies moved to CUDA
    f_cpu, f_gpu = cpu.pool5_features(img, props), gpu.pool5_features(img, props)
    assert f_gpu.is_cuda
    torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gpu.score_windows(f_gpu).cpu(), cpu.score_windows(f_cpu), rtol=1e-2, atol=1e-2)
    dets = gpu.detect(img, props)                                      # the whole path runs on CUDA
    assert dets.boxes.dtype == np.float32 and len(dets) > 0


# ---------------------------------------------------------------------------------------------
# The multi-scale rule is a setting of the model
# ---------------------------------------------------------------------------------------------

def test_scale_rule_picks_the_scale_of_each_window(parts, tmp_path):
    # Hand-worked (docs/spp.md): a 140x140 window of a 160x160 image at scales (160, 320), i.e.
    # factors (1, 2). "area": |140^2 f^2 - 224^2| is 30,576 at f=1 and 28,224 at f=2 -> scale 320.
    # "code": |140 f - 208| is 68 at f=1 and 72 at f=2 -> scale 160.
    img = np.random.default_rng(5).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    window = np.array([[10.0, 12.0, 150.0, 152.0]], np.float32)
    two_scales = dataclasses.replace(SETTINGS, scales=(160, 320))
    expected = {"area": 320, "code": 160}
    for rule, scale in expected.items():
        det = SPPDetector(*parts, CLASSES, dataclasses.replace(two_scales, scale_rule=rule))
        single = SPPDetector(*parts, CLASSES, dataclasses.replace(SETTINGS, scales=(scale,)))
        torch.testing.assert_close(det.pool5_features(img, window), single.pool5_features(img, window),
                                   rtol=0, atol=0)
        path = tmp_path / f"{rule}.pt"
        det.save(path)
        assert SPPDetector.from_file(path).settings.scale_rule == rule
    features = [SPPDetector(*parts, CLASSES, dataclasses.replace(two_scales, scale_rule=r)).pool5_features(img, window)
                for r in expected]
    assert not torch.equal(*features)            # the two rules really pool different maps here


def test_model_without_a_scale_rule_reads_the_paper_rule_and_a_bad_one_is_refused(parts, tmp_path):
    from detection.model import load_model
    det = SPPDetector(*parts, CLASSES, SETTINGS)
    det.save(tmp_path / "m.pt")
    tensors, meta = load_model(tmp_path / "m.pt")
    del meta["settings"]["scale_rule"]            # a model file written before the setting existed
    save_model(tmp_path / "old.pt", tensors, meta)
    assert SPPDetector.from_file(tmp_path / "old.pt").settings.scale_rule == "area"
    meta["settings"]["scale_rule"] = "nearest"
    save_model(tmp_path / "bad.pt", tensors, meta)
    with pytest.raises(ModelError, match="scale rule 'nearest'"):
        SPPDetector.from_file(tmp_path / "bad.pt")
