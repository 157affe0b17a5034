"""Slow, obviously correct window features (for tests of the featurizer, the detector and timing),
the AP of a model file computed without the pipeline's detect and evaluate stages, and the SVMs'
hard-negative mining with every class in memory (for the on-disk, sharded trainer).

Each step is written from the paper's (or the official code's) rule by loops over boxes, bins and
pixels, and shares no code with ``detection.features`` beyond the trunk itself (``preprocess`` +
the conv layers): the scale of a window, its projection onto conv cells and the pyramid bins come
from the slow references of tests/test_spp.py, R-CNN's padded warp from tests/test_rcnn.py.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from detection.boxes import box_iou_numpy, internal_to_voc
from detection.data.images import load_image
from detection.data.voc import VOCDataset
from detection.detector import SPPDetector
from detection.linear import UNTRAINED_BIAS
from detection.training.svm import fit_linear_svm
from test_eval_voc import ref_voc_eval
from test_rcnn import ref_warp
from test_spp import ref_project_code, ref_project_paper, ref_spp_window

#: The paper's window side for the "area" scale rule and the code's for its rule (docs/spp.md).
AREA_TARGET, CODE_TARGET = 224, 208
#: R-CNN's context padding, in warped pixels.
RCNN_PADDING = 16


def reference_scale(box: Sequence[float], factors: Sequence[float], rule: str) -> int:
    """The scale a window is pooled from: "area", |w h f^2 - 224^2| smallest; "code",
    |sqrt(w h) f - 208| smallest; the first on ties."""
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-6)
    if rule == "area":
        dist = [abs(area * f * f - AREA_TARGET ** 2) for f in factors]
    else:
        dist = [abs(math.sqrt(area) * f - CODE_TARGET) for f in factors]
    return dist.index(min(dist))


def reference_factors(height: int, width: int, scales: Sequence[int], max_size: int) -> list[float]:
    """Shorter side -> s, unless the longer side would pass max_size."""
    return [min(s / min(height, width), max_size / max(height, width)) for s in scales]


def reference_conv_map(backbone, image: np.ndarray, factor: float) -> np.ndarray:
    """The trunk's map of the image resized by ``factor``, float64 [C, H, W]."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return backbone(backbone.preprocess(image, factor))[0].double().numpy()
    finally:
        backbone.train(was_training)


def reference_spp_features(backbone, image: np.ndarray, boxes: np.ndarray, scales: Sequence[int], max_size: int,
                           levels: Sequence[int], rule: str = "paper", scale_rule: str = "area") -> np.ndarray:
    """SPP-net window features one box at a time: its scale, its cells, the pyramid over them.

    Returns float64 [N, C * sum(n*n)].
    """
    h, w = image.shape[:2]
    factors = reference_factors(h, w, scales, max_size)
    maps = [reference_conv_map(backbone, image, f) for f in factors]
    c0, stride = float(backbone.first_cell_center), int(backbone.stride)
    out = []
    for box in np.asarray(boxes, np.float64).tolist():
        k = reference_scale(box, factors, scale_rule) if len(factors) > 1 else 0
        fmap = maps[k]
        scaled = [v * factors[k] for v in box]
        size = fmap.shape[1:]
        if rule == "paper":
            cells = ref_project_paper(scaled, stride, size, c0)
        else:   # the code's offset0 is the 1-based pixel of cell 1's centre
            cells = ref_project_code(scaled, stride, size, c0 + 0.5)
        out.append(ref_spp_window(fmap, cells, levels))
    return np.stack(out)


def reference_rcnn_features(backbone, image: np.ndarray, boxes: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """R-CNN window features one box at a time: the padded window warped pixel by pixel to the
    trunk's input size, the trunk on the crop, the pyramid over its whole map.

    Returns float64 [N, C * sum(n*n)].
    """
    with torch.no_grad():
        normalised = backbone.preprocess(image, 1.0)[0].double().numpy()
    size = int(backbone.input_size)
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for box in np.asarray(boxes, np.float64).tolist():
            crop = torch.from_numpy(ref_warp(normalised, box, size, RCNN_PADDING)).float()[None]
            with torch.no_grad():
                fmap = backbone.trunk(crop)[0].double().numpy()
            out.append(ref_spp_window(fmap, (0, 0, fmap.shape[2] - 1, fmap.shape[1] - 1), levels))
    finally:
        backbone.train(was_training)
    return np.stack(out)


def reference_voc_ap(model_path, root, metric: str) -> dict[str, float]:
    """Per-class AP of the model file on the test split, computed independently of the pipeline's
    detect and evaluate stages: SPPDetector.detect on each image (its own selective search), the
    boxes written as the result files write them (1-based, 0.1 px; scores to 9 digits), and the
    devkit loop ported in tests/test_eval_voc.py (``ref_voc_eval``). Classes without ground truth
    are left out."""
    detector = SPPDetector.from_file(model_path)
    records = VOCDataset(root, "test").records
    dets = [detector.detect(load_image(r)) for r in records]
    ap = {}
    for c, name in enumerate(detector.classes):
        gt = {r.image_id: {"bbox": internal_to_voc(r.boxes[r.labels == c]), "difficult": r.difficult[r.labels == c]}
              for r in records}
        if not sum(int((~g["difficult"]).sum()) for g in gt.values()):
            continue
        ids = [r.image_id for r, d in zip(records, dets) for _ in range(int((d.labels == c).sum()))]
        scores = np.array([float(f"{s:.9g}") for d in dets for s in d.scores[d.labels == c]])
        boxes = np.round(np.concatenate([internal_to_voc(d.boxes[d.labels == c]) for d in dets]), 1)
        ap[name] = ref_voc_eval(gt, ids, scores, boxes, use_07_metric=metric == "voc07")[2]
    return ap


def reference_train_svms(samples, num_classes: int, cfg, scale: float) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The SVM recipe of ``detection.training.hard_negatives`` written plainly, in one process with
    every class's positives and negatives in Python lists: (weights [K, D], biases [K], per
    class ``{"retrains", "evicted", "dropped", "peak_cached", "keys"}``). A block's images are
    scored one by one with the model of the block's start; trimming keeps the highest scores
    under the current model (a row's score from the mining, or from the last retraining)."""
    k, dim = num_classes, samples[0].gt_features.shape[1]
    pos = []
    for c in range(k):                      # reservoir sampling (Algorithm R), in stream order
        rng, rows, index, seen = np.random.default_rng([cfg.seed, c]), [], [], 0
        for s in samples:
            keep = np.ones(len(s.gt_labels), bool) if cfg.use_difficult else ~s.gt_difficult
            feats, labels = s.gt_features[keep] * np.float32(scale), s.gt_labels[keep]
            for row in feats[labels == c]:
                t, seen = seen, seen + 1
                if cfg.max_positives is None or t < cfg.max_positives:
                    rows.append(row)
                    index.append(t)
                elif (j := int(rng.integers(0, t + 1))) < cfg.max_positives:
                    rows[j], index[j] = row, t
        pos.append(np.array(rows, np.float32).reshape(-1, dim)[np.argsort(index, kind="stable")])
    weights, biases = np.zeros((k, dim), np.float32), np.zeros(k, np.float32)
    active = [c for c in range(k) if len(pos[c])]
    biases[[c for c in range(k) if not len(pos[c])]] = UNTRAINED_BIAS
    cache = [[] for _ in range(k)]          # per class: [key, row, score] in the order cached
    info = [{"retrains": 0, "evicted": 0, "dropped": 0, "peak_cached": 0, "added": 0} for _ in range(k)]
    trained = [False] * k

    def retrain(c: int) -> None:
        neg = np.array([row for _, row, _ in cache[c]], np.float32).reshape(-1, dim)
        w, b, _, z_neg = fit_linear_svm(pos[c], neg, cfg)
        weights[c], biases[c] = w, b
        info[c]["evicted"] += int((z_neg < cfg.evict_threshold).sum())
        cache[c] = [[key, row, z] for (key, row, _), z in zip(cache[c], z_neg) if z >= cfg.evict_threshold]
        info[c]["retrains"] += 1
        info[c]["added"] = 0
        trained[c] = True

    for p in range(cfg.passes):
        added_in_pass = 0
        for start in range(0, len(samples), cfg.mining_block):
            w0, b0 = weights.copy(), biases.copy()
            for i in range(start, min(len(samples), start + cfg.mining_block)):
                s = samples[i]
                feats = s.candidate_features() * np.float32(scale)
                boxes = s.candidate_boxes()
                scores = feats @ w0.T + b0
                for c in active:
                    cached = {key for key, _, _ in cache[c]}
                    fresh = 0
                    for j in range(len(boxes)):
                        ious = [box_iou_numpy(boxes[j:j + 1], g[None])[0, 0]
                                for g, label in zip(s.gt_boxes, s.gt_labels) if label == c]
                        if max(ious, default=0.0) < cfg.neg_iou and scores[j, c] > cfg.hard_threshold \
                                and (i, j) not in cached:
                            cache[c].append([(i, j), feats[j], float(scores[j, c])])
                            fresh += 1
                    info[c]["added"] += fresh
                    added_in_pass += fresh
                    if cfg.max_negatives is not None and len(cache[c]) > cfg.max_negatives:
                        order = np.argsort([-z for _, _, z in cache[c]], kind="stable")
                        keep = set(order[:cfg.max_negatives].tolist())
                        info[c]["dropped"] += len(cache[c]) - len(keep)
                        cache[c] = [e for n, e in enumerate(cache[c]) if n in keep]
                    info[c]["peak_cached"] = max(info[c]["peak_cached"], len(cache[c]))
            for c in active:
                if cache[c] and ((p == 0 and start == 0) or info[c]["added"] > cfg.retrain_every):
                    retrain(c)
        for c in active:
            if cache[c] and (info[c]["added"] > 0 or not trained[c]):
                retrain(c)
        if p > 0 and added_in_pass == 0:
            break
    for c in range(k):
        info[c]["keys"] = sorted(key for key, _, _ in cache[c])
        del info[c]["added"]
    return weights, biases, info
