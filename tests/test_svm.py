"""Hard-negative SVM training on small synthetic "feature" problems (no images, no network).

The synthetic source: each image has 1-2 GT objects; a box's feature is a fixed background vector
plus, for each GT object, IoU(box, object) times the object's class vector, plus Gaussian noise. So
GT boxes are clean positives, windows far from every object are negatives, and windows at IoU
0.1-0.3 are the hard ones.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.svm import LinearSVC

from detection.boxes import box_iou_numpy
from detection.errors import DetectionError, ModelError
from detection.linear import UNTRAINED_BIAS, LinearSVMs
from detection.errors import CacheError
from detection.training.hard_negatives import SVMTrainer, _Reservoir, train_svms
from detection.training.samples import ImageSample, ListFeatureSource, compute_feature_scale

from references import reference_train_svms
from detection.training.svm import SVMConfig, fit_linear_svm, svm_objective

DIM = 32
K = 2


def make_samples(seed: int, n_images: int, dim: int = DIM, num_classes: int = K, n_props: int = 80,
                 noise: float = 0.3, labels: list[int] | None = None) -> list[ImageSample]:
    rng = np.random.default_rng(seed)
    class_vecs = np.random.default_rng(123).normal(size=(num_classes, dim))
    class_vecs *= 3.0 / np.linalg.norm(class_vecs, axis=1, keepdims=True)
    background = np.abs(np.random.default_rng(7).normal(size=dim))
    out = []
    for i in range(n_images):
        g = int(rng.integers(1, 3))
        wh = rng.uniform(20, 50, size=(g, 2))
        xy = rng.uniform(0, 100 - wh)
        gt = np.concatenate([xy, xy + wh], axis=1)
        lab = rng.integers(0, num_classes, size=g) if labels is None else np.array(labels[:g])
        gt, lab = gt[: len(lab)], lab
        # Half the proposals jitter a GT box (all IoUs), half are random windows.
        src = gt[rng.integers(0, len(gt), size=n_props // 2)]
        size = np.tile(src[:, 2:] - src[:, :2], 2)
        jit = src + rng.normal(scale=0.25, size=src.shape) * size
        jit[:, 2:] = np.maximum(jit[:, 2:], jit[:, :2] + 2)
        r_wh = rng.uniform(5, 60, size=(n_props - len(src), 2))
        r_xy = rng.uniform(0, 100 - r_wh)
        props = np.concatenate([jit, np.concatenate([r_xy, r_xy + r_wh], axis=1)])

        def feats(b: np.ndarray) -> np.ndarray:
            f = background + box_iou_numpy(b, gt) @ class_vecs[lab] + noise * rng.normal(size=(len(b), dim))
            return f.astype(np.float32)

        out.append(ImageSample(key=f"img{i:03d}", gt_boxes=gt, gt_labels=lab, gt_features=feats(gt),
                               boxes=props, features=feats(props)))
    return out


def negatives_of(sample: ImageSample, c: int, neg_iou: float = 0.3) -> np.ndarray:
    """Slow obvious reference: indices of the candidates (GT first) that are negatives for class c."""
    cand = sample.candidate_boxes()
    out = []
    for j, box in enumerate(cand):
        ious = [box_iou_numpy(box[None], g[None])[0, 0] for g, lab in zip(sample.gt_boxes, sample.gt_labels)
                if lab == c]
        if max(ious, default=0.0) < neg_iou:
            out.append(j)
    return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def train_samples() -> list[ImageSample]:
    return make_samples(0, 40)


def test_separates_toy_problem(train_samples):
    svms = train_svms(ListFeatureSource(train_samples, DIM), K, SVMConfig(retrain_every=200))
    assert svms.weights.shape == (K, DIM) and svms.biases.shape == (K,)
    test = make_samples(1, 60)
    for c in range(K):
        pos = np.concatenate([svms.scores(s.gt_features)[s.gt_labels == c, c] for s in test])
        neg = np.concatenate([svms.scores(s.candidate_features())[negatives_of(s, c), c] for s in test])
        assert len(pos) > 20 and len(neg) > 1000
        assert (pos > 0).mean() >= 0.9, (pos > 0).mean()
        assert (neg < 0).mean() >= 0.995, (neg < 0).mean()
    stats = svms.meta["stats"]
    assert set(stats) == {"class_0", "class_1"}
    assert all(st["train_accuracy"] > 0.95 and st["num_pos"] > 0 for st in stats.values())


def test_mining_converges_and_cache_is_consistent(train_samples):
    """With several passes the loop stops after a pass that finds no new hard negative; then, by an
    independent rescoring of every negative, none outside the cache is hard for the final model."""
    cfg = SVMConfig(retrain_every=150, passes=6)
    trainer = SVMTrainer(ListFeatureSource(train_samples, DIM), K, cfg)
    svms = trainer.train()
    assert svms.meta["converged"] and 2 <= svms.meta["passes_done"] < 6
    for c in range(K):
        keys = trainer.cached_negative_keys(c)
        assert len(np.unique(keys, axis=0)) == len(keys)                 # no duplicates
        cached = {tuple(k) for k in keys.tolist()}
        total_neg = 0
        for i, s in enumerate(train_samples):
            neg = negatives_of(s, c)
            total_neg += len(neg)
            scores = svms.scores(s.candidate_features())[:, c].astype(np.float64)
            hard = neg[scores[neg] > cfg.hard_threshold]
            missing = [j for j in hard.tolist() if (i, j) not in cached]
            assert not missing, f"image {i}: hard negatives {missing} not in the cache"
            # Every cached key is a negative of this image (IoU < 0.3 with every GT of c).
            assert set(keys[keys[:, 0] == i, 1].tolist()) <= set(neg.tolist())
        # Memory bound: the cache never held all negatives, and easy ones were evicted.
        assert 0 < trainer.peak_cached(c) < total_neg
        assert svms.meta["stats"][f"class_{c}"]["evicted"] > 0
        assert len(keys) < trainer.peak_cached(c)


def test_one_pass_retrains_every_n_new_negatives(train_samples):
    trainer = SVMTrainer(ListFeatureSource(train_samples, DIM), K, SVMConfig(retrain_every=100))
    svms = trainer.train()
    assert svms.meta["passes_done"] == 1 and not svms.meta["converged"]
    for st in svms.meta["stats"].values():
        assert st["retrains"] >= 3             # first image, >= 1 on the way, the final one
        assert st["peak_cached"] >= st["num_neg_cached"]
    few = SVMTrainer(ListFeatureSource(train_samples, DIM), K, SVMConfig(retrain_every=10**9)).train()
    assert all(st["retrains"] == 2 for st in few.meta["stats"].values())   # first image + final


def test_fit_matches_primal_qp():
    """liblinear through LinearSVC solves R-CNN's primal (C, -w1 2, -B 10), checked against a
    slow generic QP solver on a tiny problem."""
    rng = np.random.default_rng(3)
    d = 4
    x_pos = rng.normal(loc=0.6, size=(12, d))
    x_neg = rng.normal(loc=-0.4, size=(25, d))
    cfg = SVMConfig(C=0.5, tol=1e-8, max_iter=100000)
    w, b, z_pos, z_neg = fit_linear_svm(x_pos, x_neg, cfg)

    x = np.concatenate([x_pos, x_neg])
    y = np.concatenate([np.ones(len(x_pos)), -np.ones(len(x_neg))])
    cost = np.where(y > 0, cfg.C * cfg.pos_weight, cfg.C)
    n, bm = len(x), cfg.bias_multiplier
    # variables: w (d), v (bias weight; bias = v * B), xi (n)
    obj = lambda t: 0.5 * t[:d] @ t[:d] + 0.5 * t[d] ** 2 + cost @ t[d + 1:]
    cons = [{"type": "ineq", "fun": lambda t: y * (x @ t[:d] + bm * t[d]) - 1 + t[d + 1:]},
            {"type": "ineq", "fun": lambda t: t[d + 1:]}]
    res = minimize(obj, np.concatenate([np.zeros(d + 1), np.ones(n)]), constraints=cons, method="SLSQP",
                   options={"ftol": 1e-12, "maxiter": 1000})
    assert res.success
    np.testing.assert_allclose(w, res.x[:d], atol=2e-4)
    np.testing.assert_allclose(b, bm * res.x[d], atol=2e-3)
    ours = svm_objective(w, b, z_pos, z_neg, cfg)["objective"]
    assert ours == pytest.approx(res.fun, rel=1e-4)


def test_saved_model_scores_equal_decision_function(train_samples):
    """LinearSVMs (with its feature scale, after a state round trip) scores raw features exactly as
    an independently built LinearSVC with the documented settings scores scaled features."""
    cfg = SVMConfig()
    scale, _ = compute_feature_scale(ListFeatureSource(train_samples, DIM), cfg.target_norm, 200, 200, 0)
    x_pos = np.concatenate([s.gt_features[s.gt_labels == 0] for s in train_samples])
    x_neg = np.concatenate([s.features[::7] for s in train_samples])
    w, b, _, _ = fit_linear_svm(x_pos * scale, x_neg * scale, cfg)
    svms = LinearSVMs(weights=w[None], biases=[b], feature_scale=scale, meta={"classes": ["a"]})
    svms = LinearSVMs.from_state(svms.tensors(), json.loads(json.dumps(svms.to_meta())))

    ref = LinearSVC(loss="hinge", dual=True, C=1e-3, intercept_scaling=10, class_weight={1: 2, -1: 1}, tol=0.1,
                    random_state=0)
    x = np.concatenate([x_pos, x_neg]).astype(np.float64) * scale
    ref.fit(x, np.r_[np.ones(len(x_pos)), -np.ones(len(x_neg))])
    raw = np.concatenate([x_pos, x_neg])
    np.testing.assert_allclose(svms.scores(raw)[:, 0], ref.decision_function(x), rtol=1e-4, atol=1e-4)
    t = svms.scores(torch.from_numpy(raw))
    np.testing.assert_allclose(t.numpy(), svms.scores(raw), rtol=1e-5, atol=1e-5)
    # liblinear's -B semantics: same as appending a constant feature of 10 with no intercept.
    aug = LinearSVC(loss="hinge", dual=True, C=1e-3, fit_intercept=False, class_weight={1: 2, -1: 1}, tol=0.1,
                    random_state=0).fit(np.c_[x, np.full(len(x), 10.0)],
                                        np.r_[np.ones(len(x_pos)), -np.ones(len(x_neg))])
    np.testing.assert_allclose(w, aug.coef_[0, :-1], rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(10.0 * aug.coef_[0, -1], rel=1e-5, abs=1e-6)


def test_model_state_validation():
    with pytest.raises(ModelError):
        LinearSVMs(weights=np.zeros((2, 3)), biases=np.zeros(3), feature_scale=1.0)
    with pytest.raises(ModelError):
        LinearSVMs.from_state({"weight": torch.zeros(2, 3)}, {"feature_scale": 1.0})
    svms = LinearSVMs(weights=np.zeros((2, 3)), biases=np.zeros(2), feature_scale=2.0)
    with pytest.raises(ModelError):
        svms.scores(np.zeros((4, 5)))


#: Issue 17 made "warn" (train the others) the default; these two tests ask for the error.
STRICT = SVMConfig(classes_without_positives="error")


def test_class_without_positives_is_an_error():
    samples = make_samples(2, 6, num_classes=3, labels=[0, 2])            # class 1 never appears
    with pytest.raises(DetectionError, match="dog"):
        train_svms(ListFeatureSource(samples, DIM), 3, STRICT, class_names=["cat", "dog", "bird"])


def test_class_without_positives_is_left_untrained_with_a_warning(caplog):
    samples = make_samples(2, 6, num_classes=3, labels=[0, 2])            # class 1 never appears
    with caplog.at_level("WARNING", logger="detection.training.hard_negatives"):
        svms = train_svms(ListFeatureSource(samples, DIM), 3, class_names=["cat", "dog", "bird"])
    assert "dog" in caplog.text and "untrained" in caplog.text
    assert svms.meta["untrained"] == ["dog"]
    assert not svms.weights[1].any() and svms.biases[1] == UNTRAINED_BIAS
    assert svms.weights[0].any() and svms.weights[2].any()
    # The other classes get the models they get without the empty class in the list at all.
    two = [dataclasses.replace(s, gt_labels=np.where(s.gt_labels == 2, 1, s.gt_labels)) for s in samples]
    alone = train_svms(ListFeatureSource(two, DIM), 2, class_names=["cat", "bird"])
    np.testing.assert_allclose(alone.weights, svms.weights[[0, 2]], rtol=1e-5, atol=1e-6)
    scores = svms.scores(np.stack([s.gt_features[0] for s in samples]))
    assert (scores[:, 1] < -1000).all()                           # it never detects
    with pytest.raises(DetectionError, match="classes_without_positives"):
        SVMConfig(classes_without_positives="maybe").validate()


def test_no_class_with_positives_is_still_an_error():
    samples = [dataclasses.replace(s, gt_difficult=np.ones(len(s.gt_labels), bool)) for s in make_samples(2, 4)]
    with pytest.raises(DetectionError, match="no positive"):
        train_svms(ListFeatureSource(samples, DIM), K)


def test_difficult_only_class_has_no_positives():
    samples = make_samples(2, 6, labels=[0, 1])
    samples = [dataclasses.replace(s, gt_difficult=s.gt_labels == 1) for s in samples]
    with pytest.raises(DetectionError, match="class_1"):
        train_svms(ListFeatureSource(samples, DIM), K, STRICT)
    svms = train_svms(ListFeatureSource(samples, DIM), K, SVMConfig(use_difficult=True))
    assert svms.meta["stats"]["class_1"]["num_pos"] > 0


@pytest.mark.parametrize("where", ["features", "gt_features"])
def test_nan_features_are_an_error(train_samples, where):
    samples = list(train_samples[:5])
    bad = getattr(samples[3], where).copy()
    bad[0, 5] = np.nan
    samples[3] = dataclasses.replace(samples[3], **{where: bad})
    with pytest.raises(DetectionError, match="img003"):
        train_svms(ListFeatureSource(samples, DIM), K, feature_scale=1.0)
    with pytest.raises(DetectionError, match="img003"):
        train_svms(ListFeatureSource(samples, DIM), K)


def test_all_zero_features_are_an_error(train_samples):
    samples = [dataclasses.replace(s, gt_features=np.zeros_like(s.gt_features), features=np.zeros_like(s.features))
               for s in train_samples[:4]]
    with pytest.raises(DetectionError, match="all-zero"):
        train_svms(ListFeatureSource(samples, DIM), K)


def test_inconsistent_sample_and_config_are_errors():
    with pytest.raises(DetectionError, match="x1"):
        ImageSample(key="x1", gt_boxes=np.zeros((2, 4)), gt_labels=[0], gt_features=np.zeros((2, 3)),
                    boxes=np.zeros((0, 4)), features=np.zeros((0, 3)))
    with pytest.raises(DetectionError, match="evict_threshold"):
        train_svms(ListFeatureSource([], DIM), K, SVMConfig(evict_threshold=-0.5))
    with pytest.raises(DetectionError, match="no images"):
        train_svms(ListFeatureSource([], DIM), K)


def test_feature_scale_brings_mean_norm_to_target(train_samples):
    src = ListFeatureSource(train_samples, DIM)
    scale, mean_norm = compute_feature_scale(src, 20.0, num_images=1000, boxes_per_image=10**6, seed=0)
    feats = np.concatenate([s.candidate_features() for s in train_samples]).astype(np.float64)
    assert mean_norm == pytest.approx(np.linalg.norm(feats, axis=1).mean(), rel=1e-6)
    assert np.linalg.norm(feats * scale, axis=1).mean() == pytest.approx(20.0, rel=1e-6)


def test_max_positives_keeps_a_seeded_subset_in_image_order(tmp_path):
    # 60 images with 1-2 objects of 2 classes: ~45 positives per class; a cap of 10 keeps 10 of
    # them (the same 10 every time), each one a real GT feature, in image order.
    samples = make_samples(4, 60)
    src = ListFeatureSource(samples, DIM)

    def positives(c):
        reservoir = _Reservoir(10, DIM, np.random.default_rng([0, c]), tmp_path / "scratch")
        for s in samples:
            reservoir.add(s.gt_features[s.gt_labels == c])
        return reservoir.rows()

    for c in range(K):
        every = np.concatenate([s.gt_features[s.gt_labels == c] for s in samples])
        kept = positives(c)
        assert len(every) > 30 and len(kept) == 10
        rows = [int(np.flatnonzero((every == r).all(axis=1))[0]) for r in kept]
        assert rows == sorted(rows) and len(set(rows)) == 10
        np.testing.assert_array_equal(kept, positives(c))
        assert not (tmp_path / "scratch").exists()
    # At or above the class sizes the cap changes nothing.
    a = train_svms(src, K, SVMConfig(max_positives=None))
    b = train_svms(src, K, SVMConfig(max_positives=1000))
    np.testing.assert_array_equal(a.weights, b.weights)


def test_max_negatives_bounds_every_cache_and_keeps_the_hardest(train_samples):
    src = ListFeatureSource(train_samples, DIM)
    free = train_svms(src, K, SVMConfig(retrain_every=10**9, max_negatives=None))
    assert all(st["peak_cached"] > 300 for st in free.meta["stats"].values())
    capped = train_svms(src, K, SVMConfig(retrain_every=10**9, max_negatives=150))
    for st in capped.meta["stats"].values():
        assert st["peak_cached"] <= 150 and st["num_neg_cached"] <= 150 and st["dropped"] > 0
    # The hardest negatives carry the model: the capped SVMs still separate the classes.
    test = make_samples(1, 30)
    for svms in (free, capped):
        pos = np.concatenate([s.gt_features[s.gt_labels == 0] for s in test])
        neg = np.concatenate([s.features[box_iou_numpy(s.boxes, s.gt_boxes).max(axis=1) < 0.1] for s in test])
        assert (svms.scores(pos)[:, 0] > 0).mean() > 0.9 and (svms.scores(neg)[:, 0] < 0).mean() > 0.9
    big = train_svms(src, K, SVMConfig(retrain_every=10**9, max_negatives=10**6))
    np.testing.assert_array_equal(big.weights, free.weights)
    with pytest.raises(DetectionError, match="max_negatives"):
        train_svms(src, K, SVMConfig(max_negatives=0))


# ---- the on-disk caches and the block schedule against the in-memory reference ------------------

@pytest.mark.parametrize("block", [1, 8])
def test_the_on_disk_trainer_equals_the_in_memory_reference(block, tmp_path):
    """Every class's positives and negatives on disk, mined in blocks: the SVMs, counts and cached
    keys of the plain in-memory recipe (tests/references.py), with every cap at work (positives
    subsampled, caches trimmed, easy negatives evicted, retrainings on the way, two passes)."""
    samples = make_samples(5, 30)
    cfg = SVMConfig(retrain_every=100, passes=2, max_positives=12, max_negatives=120, mining_block=block)
    trainer = SVMTrainer(ListFeatureSource(samples, DIM), K, cfg, cache_dir=tmp_path / "cache")
    svms = trainer.train()
    weights, biases, info = reference_train_svms(samples, K, cfg, svms.feature_scale)
    np.testing.assert_array_equal(svms.weights, weights)
    np.testing.assert_array_equal(svms.biases, biases)
    for c in range(K):
        st = svms.meta["stats"][f"class_{c}"]
        assert {n: st[n] for n in ("retrains", "evicted", "dropped", "peak_cached")} == \
            {n: info[c][n] for n in ("retrains", "evicted", "dropped", "peak_cached")}
        assert [tuple(k) for k in trainer.cached_negative_keys(c).tolist()] == info[c]["keys"]
        assert st["num_pos"] == 12 and st["dropped"] > 0 and st["evicted"] > 0 and st["retrains"] >= 3
    assert not (tmp_path / "cache").exists()                  # the caches are removed at the end


def test_a_block_of_one_is_the_per_image_schedule_and_larger_blocks_differ():
    samples = make_samples(5, 30)
    src = ListFeatureSource(samples, DIM)
    one = train_svms(src, K, SVMConfig(retrain_every=100, mining_block=1))
    eight = train_svms(src, K, SVMConfig(retrain_every=100, mining_block=8))
    assert not np.array_equal(one.weights, eight.weights)      # the block is part of what is trained
    assert one.meta["config"]["mining_block"] == 1


class _Corrupting:
    """A source that damages a file of class 0's cache once the mining reads image ``at``."""

    def __init__(self, samples, folder, at: int, damage) -> None:
        self.inner, self.folder, self.at, self.damage, self.dim = ListFeatureSource(samples, DIM), folder, at, damage, DIM
        self.done = False

    def num_images(self):
        return self.inner.num_images()

    def image(self, index, *, with_proposals=True):
        files = sorted((self.folder / "class_0").glob("neg_*.npy"))
        if with_proposals and index == self.at and files and not self.done:   # the mining's read
            self.damage(files[-1])
            self.done = True
        return self.inner.image(index, with_proposals=with_proposals)


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-64])


@pytest.mark.parametrize("damage,match", [(_flip_a_byte, r"SVM cache file is corrupt or torn \(checksum"),
                                          (_truncate, r"corrupt SVM cache file|SVM cache file holds")])
def test_a_damaged_class_cache_is_named_never_trained_on(tmp_path, damage, match):
    samples = make_samples(5, 30)
    # Image 20's block comes after the first retraining wrote class 0's cache; the end of the
    # pass reads it back.
    source = _Corrupting(samples, tmp_path, 20, damage)
    with pytest.raises(CacheError, match=r"class_0/neg_\d+\.npy: " + f"(?:{match})"):
        train_svms(source, K, SVMConfig(retrain_every=10**9, mining_block=4), cache_dir=tmp_path)


def test_files_of_an_earlier_run_are_never_read(tmp_path):
    samples = make_samples(5, 30)
    src = ListFeatureSource(samples, DIM)
    alone = train_svms(src, K, SVMConfig(retrain_every=100))
    for c in range(K):                  # an interrupted run's leftovers, with the names this run writes
        folder = tmp_path / "cache" / f"class_{c}"
        folder.mkdir(parents=True)
        for name in ("pos.npy", "neg_000000.npy", "neg_000001.npy"):
            np.save(folder / name, np.ones((3, DIM), np.float32))
            (folder / (name + ".crc32")).write_text("crc32:00000000\n")
    again = train_svms(src, K, SVMConfig(retrain_every=100), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.weights, alone.weights)
    assert not (tmp_path / "cache").exists()
