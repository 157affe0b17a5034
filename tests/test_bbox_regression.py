"""Box regression: the (dx, dy, dw, dh) parametrisation, sample selection, and the ridge fit against
a slow closed-form reference, on tiny synthetic inputs in float64."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import detection.training.ridge as ridge_module
from detection.boxes import box_iou_numpy
from detection.errors import DetectionError, ModelError
from detection.linear import MAX_LOG_SCALE, BoxRegressors, decode, encode
from detection.training.bbox_regression import BBoxRegressionConfig, collect_regression_samples, train_box_regressors
from detection.training.ridge import fit_class_regressor, regression_memory_bytes, ridge
from detection.training.samples import ImageSample, ListFeatureSource


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(-50, 500, size=(n, 2))
    wh = rng.uniform(5, 300, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


def encode_slow(p, g):
    """One box at a time, straight from the R-CNN paper (appendix C) with w = x2 - x1."""
    out = []
    for (px1, py1, px2, py2), (gx1, gy1, gx2, gy2) in zip(p.tolist(), g.tolist()):
        pw, ph, gw, gh = px2 - px1, py2 - py1, gx2 - gx1, gy2 - gy1
        out.append([((gx1 + gw / 2) - (px1 + pw / 2)) / pw, ((gy1 + gh / 2) - (py1 + ph / 2)) / ph,
                    math.log(gw / pw), math.log(gh / ph)])
    return np.array(out)


def test_encode_hand_example_and_slow_reference():
    p = np.array([[0.0, 0.0, 10.0, 20.0]])
    g = np.array([[5.0, 5.0, 15.0, 25.0]])
    np.testing.assert_allclose(encode(p, g), [[0.5, 0.25, 0.0, 0.0]])
    np.testing.assert_allclose(encode(p, np.array([[0.0, 0.0, 20.0, 10.0]])),
                               [[0.5, -0.25, math.log(2), math.log(0.5)]])
    rng = np.random.default_rng(0)
    p, g = random_boxes(rng, 200), random_boxes(rng, 200)
    np.testing.assert_allclose(encode(p, g), encode_slow(p, g), rtol=1e-12, atol=1e-12)


def test_encode_decode_round_trip():
    rng = np.random.default_rng(1)
    p, g = random_boxes(rng, 1000), random_boxes(rng, 1000)
    d = encode(p, g)
    assert np.abs(d[:, 2:]).max() < MAX_LOG_SCALE          # no clamping involved
    np.testing.assert_allclose(decode(p, d), g, rtol=0, atol=1e-6)
    np.testing.assert_allclose(encode(p, decode(p, d)), d, rtol=0, atol=1e-9)


def test_decode_zero_deltas_is_identity_and_broadcasts_over_classes():
    rng = np.random.default_rng(2)
    p = random_boxes(rng, 50)
    np.testing.assert_allclose(decode(p, np.zeros((50, 4))), p, atol=1e-9)
    deltas = rng.normal(scale=0.2, size=(50, 3, 4))
    out = decode(p, deltas)
    assert out.shape == (50, 3, 4)
    for k in range(3):
        np.testing.assert_allclose(out[:, k], decode(p, deltas[:, k]), atol=1e-12)


def test_decode_clamps_huge_scales_and_rejects_bad_boxes():
    p = np.array([[0.0, 0.0, 10.0, 10.0]])
    out = decode(p, np.array([[0.0, 0.0, 1e4, 1e4]]))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 10.0 * 1000 / 16)
    with pytest.raises(DetectionError, match="empty"):
        encode(np.array([[5.0, 5.0, 5.0, 9.0]]), p)
    with pytest.raises(DetectionError):
        decode(np.array([[0.0, 0.0, np.nan, 1.0]]), np.zeros((1, 4)))


def ridge_slow(x, y, lam, regularize_bias):
    """Closed-form reference in float64: SPP-net's whitening and (A'A + lam I) \\ A'Y."""
    mu = y.mean(axis=0)
    yc = y - mu
    s = yc.T @ yc / len(yc)
    d, v = np.linalg.eigh(s)
    t = v @ np.diag(1 / np.sqrt(d + 0.001)) @ v.T
    t_inv = v @ np.diag(np.sqrt(d + 0.001)) @ v.T
    yn = yc @ t
    if regularize_bias:
        a = np.c_[x, np.ones(len(x))]
        beta = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ yn)
        return lambda f: (np.c_[f, np.ones(len(f))] @ beta) @ t_inv + mu
    xm, ym = x.mean(axis=0), yn.mean(axis=0)
    xc = x - xm
    beta = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (yn - ym))
    b = ym - xm @ beta
    return lambda f: (f @ beta + b) @ t_inv + mu


@pytest.mark.parametrize("regularize_bias", [True, False])
@pytest.mark.parametrize("n,lam", [(40, 3.0), (9, 50.0), (40, 0.0)])   # N < D; lam = 0: least squares
def test_fit_matches_closed_form_ridge(regularize_bias, n, lam):
    rng = np.random.default_rng(4)
    d = 12
    x = rng.normal(size=(n, d)) + 0.5
    y = x[:, :4] @ rng.normal(size=(4, 4)) * 0.1 + rng.normal(scale=0.05, size=(n, 4)) + [0.1, -0.2, 0.3, 0.0]
    cfg = BBoxRegressionConfig(lam=lam, regularize_bias=regularize_bias)
    w, b, mean, unwhiten, _ = fit_class_regressor(x.astype(np.float32), y, cfg.lam, cfg.regularize_bias)
    reg = BoxRegressors(weights=w[None], biases=b[None], target_mean=mean[None], target_unwhiten=unwhiten[None],
                        feature_scale=1.0)
    f = rng.normal(size=(7, d)) + 0.5
    want = ridge_slow(x.astype(np.float32).astype(np.float64), y, lam, regularize_bias)(f)
    np.testing.assert_allclose(reg.predict_deltas(f)[:, 0], want, rtol=1e-4, atol=1e-5)


def linear_map_source(seed: int, n_images: int, dim: int, maps: np.ndarray, offsets: np.ndarray,
                      per_image: int = 20) -> tuple[ListFeatureSource, list[tuple[np.ndarray, np.ndarray]]]:
    """Images whose proposals' true deltas are a known linear function of their features, per class.

    Returns the source and, per class, (features, true deltas) of every proposal made.
    """
    rng = np.random.default_rng(seed)
    num_classes = len(maps)
    samples, truth = [], [([], []) for _ in range(num_classes)]
    for i in range(n_images):
        c = int(rng.integers(num_classes))
        wh = rng.uniform(40, 80, size=2)
        xy = rng.uniform(0, 100, size=2)
        gt = np.concatenate([xy, xy + wh])[None]
        f = rng.normal(size=(per_image, dim)).astype(np.float32)
        t = f.astype(np.float64) @ maps[c] + offsets[c]          # small deltas: IoU stays high
        # Proposal P with encode(P, gt) == t: Pw = Gw / exp(dw), Pcx = Gcx - dx * Pw.
        gw, gh = wh
        pw, ph = gw / np.exp(t[:, 2]), gh / np.exp(t[:, 3])
        pcx, pcy = gt[0, 0] + gw / 2 - t[:, 0] * pw, gt[0, 1] + gh / 2 - t[:, 1] * ph
        props = np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], axis=1)
        assert box_iou_numpy(props, gt).min() > 0.5
        samples.append(ImageSample(key=f"im{i}", gt_boxes=gt, gt_labels=[c], gt_features=np.ones((1, dim)),
                                   boxes=props, features=f))
        truth[c][0].append(f)
        truth[c][1].append(t)
    return ListFeatureSource(samples, dim), [(np.concatenate(a), np.concatenate(b)) for a, b in truth]


def test_ridge_recovers_a_known_linear_map():
    dim, k = 16, 2
    rng = np.random.default_rng(5)
    maps = rng.normal(scale=0.008, size=(k, dim, 4))
    offsets = rng.normal(scale=0.03, size=(k, 4))
    src, _ = linear_map_source(6, 30, dim, maps, offsets)
    cfg = BBoxRegressionConfig(lam=1e-6, include_gt=False, min_iou=0.5)
    reg = train_box_regressors(src, k, cfg, class_names=["a", "b"])
    assert reg.weights.shape == (k, dim, 4)
    test_src, truth = linear_map_source(7, 6, dim, maps, offsets)
    for c in range(k):
        f, t = truth[c]
        np.testing.assert_allclose(reg.predict_deltas(f)[:, c], t, atol=1e-4)
    # apply() moves every test proposal onto its GT box.
    for s in test_src.samples:
        refined = reg.apply(s.features, s.boxes, labels=np.full(len(s.boxes), s.gt_labels[0]))
        np.testing.assert_allclose(refined, np.repeat(s.gt_boxes, len(s.boxes), axis=0), atol=1e-2)
        assert reg.apply(s.features, s.boxes).shape == (len(s.boxes), k, 4)
    # State round trip through tensors + JSON metadata.
    again = BoxRegressors.from_state(reg.tensors(), json.loads(json.dumps(reg.to_meta())))
    f = truth[0][0]
    np.testing.assert_array_equal(again.predict_deltas(f), reg.predict_deltas(f))
    assert again.meta["stats"]["a"]["num_samples"] > 0


def test_sample_selection_thresholds_gt_and_difficult():
    gt = np.array([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    # IoU with the first GT: 0.6, exactly 0.5, 0.4 (boxes sharing its top-left corner).
    props = np.array([[0.0, 0.0, 6.0, 10.0], [0.0, 0.0, 5.0, 10.0], [0.0, 0.0, 4.0, 10.0],
                      [50.0, 50.0, 60.0, 59.0]])          # 0.9 with the second (difficult) GT
    np.testing.assert_allclose(box_iou_numpy(props[:3], gt[:1])[:, 0], [0.6, 0.5, 0.4])
    dim = 3
    feats = np.arange(4 * dim, dtype=np.float32).reshape(4, dim) + 1
    s = ImageSample(key="a", gt_boxes=gt, gt_labels=[0, 1], gt_features=np.full((2, dim), 7.0), boxes=props,
                    features=feats, gt_difficult=[False, True])
    src = ListFeatureSource([s], dim)
    out = collect_regression_samples(src, 2, BBoxRegressionConfig(min_iou=0.5), feature_scale=2.0)
    x0, t0 = out[0]
    np.testing.assert_array_equal(x0, 2.0 * np.stack([np.full(dim, 7.0), feats[0]]))   # GT + IoU 0.6 only
    np.testing.assert_allclose(t0, encode(np.stack([gt[0], props[0]]), np.stack([gt[0], gt[0]])))
    assert len(out[1][0]) == 0                                     # difficult GT: no samples
    out = collect_regression_samples(src, 2, BBoxRegressionConfig(min_iou=0.45, include_gt=False,
                                                                   use_difficult=True), feature_scale=1.0)
    assert len(out[0][0]) == 2 and len(out[1][0]) == 1
    with pytest.raises(DetectionError, match="class_1"):
        train_box_regressors(src, 2, BBoxRegressionConfig(), feature_scale=1.0)


def test_errors():
    s = ImageSample(key="bad7", gt_boxes=[[0, 0, 10, 10]], gt_labels=[0], gt_features=[[np.inf, 1.0]],
                    boxes=np.zeros((0, 4)), features=np.zeros((0, 2)))
    with pytest.raises(DetectionError, match="bad7"):
        train_box_regressors(ListFeatureSource([s], 2), 1, feature_scale=1.0)
    with pytest.raises(DetectionError, match="min_iou"):
        train_box_regressors(ListFeatureSource([s], 2), 1, BBoxRegressionConfig(min_iou=1.5))
    with pytest.raises(DetectionError, match="max_samples"):
        train_box_regressors(ListFeatureSource([s], 2), 1, BBoxRegressionConfig(max_samples=0))
    with pytest.raises(DetectionError, match="feature_scale"):     # per-class sources: no norm estimate
        train_box_regressors([ListFeatureSource([s], 2)], 1)
    with pytest.raises(ModelError):
        BoxRegressors(weights=np.zeros((2, 3, 4)), biases=np.zeros((2, 4)), target_mean=np.zeros((1, 4)),
                      target_unwhiten=np.zeros((2, 4, 4)), feature_scale=1.0)
    reg = BoxRegressors(weights=np.zeros((2, 3, 4)), biases=np.zeros((2, 4)), target_mean=np.zeros((2, 4)),
                        target_unwhiten=np.tile(np.eye(4), (2, 1, 1)), feature_scale=1.0)
    with pytest.raises(ModelError):
        reg.apply(np.zeros((1, 3)), np.array([[0, 0, 1, 1]]), labels=[2])
    with pytest.raises(ModelError):
        reg.predict_deltas(np.zeros((1, 5)))
    np.testing.assert_allclose(reg.apply(np.zeros((1, 3)), np.array([[0.0, 0, 1, 1]]))[0, 1], [0, 0, 1, 1])


def test_default_config_is_spp_net():
    cfg = BBoxRegressionConfig()
    assert (cfg.lam, cfg.min_iou, cfg.target_norm) == (4000.0, 0.5, 20.0)
    assert dataclasses.asdict(cfg)["regularize_bias"] is True


@pytest.mark.parametrize("regularize_bias", [True, False])
@pytest.mark.parametrize("n", [40, 9])
def test_fit_in_chunks_equals_the_closed_form(monkeypatch, regularize_bias, n):
    # Chunks of 5 rows / columns: the float64 accumulation across chunks must give the same fit.
    monkeypatch.setattr(ridge_module, "SOLVE_CHUNK", 5)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(n, 12)) + 0.5).astype(np.float32)
    y = rng.normal(scale=0.1, size=(n, 4))
    cfg = BBoxRegressionConfig(lam=2.0, regularize_bias=regularize_bias)
    w, b, mean, unwhiten, mse = fit_class_regressor(x, y, cfg.lam, cfg.regularize_bias)
    f = rng.normal(size=(6, 12)) + 0.5
    want = ridge_slow(x.astype(np.float64), y, 2.0, regularize_bias)(f)
    np.testing.assert_allclose((f @ w + b) @ unwhiten + mean, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(mse, ((ridge_slow(x.astype(np.float64), y, 2.0, regularize_bias)(x) - y) ** 2).mean(0),
                               rtol=1e-6, atol=1e-10)


def test_max_samples_keeps_every_gt_and_a_seeded_subset_of_proposals():
    src, _ = linear_map_source(3, 10, 4, np.tile(np.eye(4) * 0.01, (1, 1, 1)), np.zeros((1, 4)))
    full = collect_regression_samples(src, 1, BBoxRegressionConfig(max_samples=None), feature_scale=1.0)[0]
    capped = collect_regression_samples(src, 1, BBoxRegressionConfig(max_samples=50), feature_scale=1.0)[0]
    assert len(full[0]) == 10 + 200 and len(capped[0]) == 10 + 50
    # every GT row (targets 0, features all ones) is kept; the proposal rows are a subset, in order
    assert (np.abs(capped[1]).sum(axis=1) == 0).sum() == 10
    rows = [int(np.flatnonzero((full[0] == r).all(axis=1))[0]) for r in capped[0] if not (r == 1).all()]
    assert rows == sorted(rows) and len(set(rows)) == 50
    again = collect_regression_samples(src, 1, BBoxRegressionConfig(max_samples=50), feature_scale=1.0)[0]
    np.testing.assert_array_equal(capped[0], again[0])              # seeded: the same subset


def test_max_gt_samples_keeps_a_seeded_subset_of_the_gt_and_every_proposal():
    src, _ = linear_map_source(3, 40, 4, np.tile(np.eye(4) * 0.01, (1, 1, 1)), np.zeros((1, 4)), per_image=3)
    full = collect_regression_samples(src, 1, BBoxRegressionConfig(max_gt_samples=None), feature_scale=1.0)[0]
    capped = collect_regression_samples(src, 1, BBoxRegressionConfig(max_gt_samples=7), feature_scale=1.0)[0]
    assert len(full[0]) == 40 + 120 and len(capped[0]) == 7 + 120
    gt_rows = (capped[0] == 1).all(axis=1)                      # GT features are all ones, targets 0
    assert gt_rows.sum() == 7 and (np.abs(capped[1][gt_rows]).sum(axis=1) == 0).all()
    np.testing.assert_array_equal(capped[0][~gt_rows], full[0][~(full[0] == 1).all(axis=1)])
    again = collect_regression_samples(src, 1, BBoxRegressionConfig(max_gt_samples=7), feature_scale=1.0)[0]
    np.testing.assert_array_equal(capped[1], again[1])
    # the two caps draw from their own streams: capping the proposals too keeps the same GT rows
    both = collect_regression_samples(src, 1, BBoxRegressionConfig(max_gt_samples=7, max_samples=20),
                                      feature_scale=1.0)[0]
    assert len(both[0]) == 7 + 20
    with pytest.raises(DetectionError, match="max_gt_samples"):
        train_box_regressors(src, 1, BBoxRegressionConfig(max_gt_samples=0), feature_scale=1.0)


def test_memory_budget_refuses_a_class_before_reading_its_features():
    class Counting(ListFeatureSource):
        reads = 0

        def candidate_boxes(self, i):
            s = self.samples[i]
            return s.key, s.gt_boxes, s.gt_labels, s.gt_difficult, s.boxes

        def image(self, i, *, with_proposals=True):
            Counting.reads += 1
            return super().image(i, with_proposals=with_proposals)

    plain, _ = linear_map_source(3, 10, 4, np.tile(np.eye(4) * 0.01, (1, 1, 1)), np.zeros((1, 4)))
    src = Counting(plain.samples, plain.dim)
    need = regression_memory_bytes(10 + 200, 4)
    with pytest.raises(DetectionError, match=r"box regression.*210 samples.*memory_gb.*bbox\.max_samples"):
        train_box_regressors(src, 1, feature_scale=1.0, memory_budget=need - 1)
    assert Counting.reads == 0
    reg = train_box_regressors(src, 1, feature_scale=1.0, memory_budget=need)
    assert Counting.reads == 10 and reg.meta["stats"]["class_0"]["num_samples"] == 210


@pytest.mark.parametrize("n", [30, 5])
def test_primal_and_dual_forms_agree(monkeypatch, n):
    # n > D: primal (D+1) x (D+1); n <= D: dual n x n. Both must be the ridge solution.
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = rng.normal(size=(n, 4))
    w, b = ridge(x, y, 3.0, True)
    a = np.concatenate([x.astype(np.float64), np.ones((n, 1))], axis=1)
    beta = np.linalg.solve(a.T @ a + 3.0 * np.eye(13), a.T @ y)
    np.testing.assert_allclose(np.concatenate([w, b[None]]), beta, rtol=1e-8, atol=1e-10)
    assert regression_memory_bytes(n, 12) >= 8 * min(n, 13) ** 2 + 4 * n * 12
