"""Test views (paper Sec. 3.1) and the one loop that scores a split with them.

- ``center``: shorter side ``test.resize`` (256), the centre ``test.crop`` (224) square.
- ``ten``: the centre and four corner squares, each also flipped; scores averaged.
- ``full``: the whole image at shorter side ``test.full_side`` (256), its own aspect (SPP only).
- ``multi``: for each ``s`` in ``test.multi_scales``, the image at shorter side ``s`` and its
  mirror image each go through the trunk once; the ``crop`` windows at the centre, four corners
  and four side middles (those that differ: 3 on a square-ish 224 image) are projected onto the
  conv map (:func:`detection.features.pooling.project_boxes`, the paper's rule) and pooled from
  it, never rerun through the trunk; the views' scores are averaged (18 views per scale, 6 at
  s = 224, as in the paper). The mirror is a second map: a flipped conv map is not the conv map
  of the flipped image.

Scores averaged over views are the softmax probabilities (single-label fc), sigmoids
(multi-label fc) or raw SVM scores.

``rescale`` multiplies every side a view uses (``resize``, ``full_side``, the multi scales): the
scale-robustness measure (:mod:`.robustness`). A centre window larger than the rescaled image
is filled with zeros (the mean colour) around it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import comm
from ..errors import DetectionError
from ..features.pooling import project_boxes
from .config import VIEWS, TestConfig
from .data import ClassificationSet, load_pixels, resize_shorter
from .metrics import classification_metrics
from .model import SPPClassifier

__all__ = ["view_windows", "check_view", "center_crop_or_pad", "score_image", "score_images", "evaluate"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def center_crop_or_pad(x: torch.Tensor, side: int) -> torch.Tensor:
    """The centre ``side`` square of Tensor[N, C, H, W]; zero-padded (the mean colour) where
    the image is smaller."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = max(side - h, 0), max(side - w, 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = int(x.shape[-2]), int(x.shape[-1])
    y0, x0 = (h - side) // 2, (w - side) // 2
    return x[..., y0:y0 + side, x0:x0 + side]


def view_windows(height: int, width: int, side: int) -> list[tuple[int, int, int, int]]:
    """The distinct ``side`` windows (x1, y1, x2, y2) at the centre, four corners and four side
    middles of a ``width x height`` image (windows that coincide are listed once)."""
    xs = [0, (width - side) // 2, width - side]
    ys = [0, (height - side) // 2, height - side]
    out: list[tuple[int, int, int, int]] = []
    for y in ys:
        for x in xs:
            box = (max(x, 0), max(y, 0), max(x, 0) + min(side, width), max(y, 0) + min(side, height))
            if box not in out:
                out.append(box)
    return out


def _prep(model: SPPClassifier, image: np.ndarray) -> torch.Tensor:
    return model.backbone.preprocess(image, 1.0)


def _multi_view_scores(model: SPPClassifier, image: np.ndarray, cfg: TestConfig, rescale: float,
                       device: torch.device) -> torch.Tensor:
    bb = model.backbone
    scores = []
    for s in cfg.multi_scales:
        img = resize_shorter(image, max(1, int(round(s * rescale))))
        h, w = img.shape[:2]
        boxes = torch.tensor(view_windows(h, w, cfg.crop), dtype=torch.float64)
        for flip in (False, True):
            src = np.ascontiguousarray(img[:, ::-1]) if flip else img
            fmap = model.conv_map(_prep(model, src).to(device))
            cells = project_boxes(boxes, bb.stride, tuple(fmap.shape[-2:]), "paper", bb.first_cell_center).tolist()
            pooled = torch.cat([model.pool_map(fmap[..., r1:r2 + 1, c1:c2 + 1]) for c1, r1, c2, r2 in cells])
            scores.append(model.probabilities(model.scores_from_pooled(pooled)))
    return torch.cat(scores).mean(0)


def score_image(model: SPPClassifier, image: np.ndarray, view: str, cfg: TestConfig, rescale: float = 1.0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Averaged view scores Tensor[K] of one uint8 RGB image."""
    device = torch.device(device)
    if view in ("center", "ten"):
        img = resize_shorter(image, max(1, int(round(cfg.resize * rescale))))
        x = _prep(model, img)
        if view == "center":
            batch = center_crop_or_pad(x, cfg.crop)
        else:
            h, w = x.shape[-2:]
            if min(h, w) < cfg.crop:
                x = center_crop_or_pad(x, max(cfg.crop, h, w))
                h, w = x.shape[-2:]
            c = cfg.crop
            crops = [center_crop_or_pad(x, c), x[..., :c, :c], x[..., :c, w - c:], x[..., h - c:, :c], x[..., h - c:, w - c:]]
            batch = torch.cat(crops + [t.flip(-1) for t in crops])
        return model.probabilities(model(batch.to(device))).mean(0)
    if view == "full":
        img = resize_shorter(image, max(1, int(round(cfg.full_side * rescale))))
        return model.probabilities(model(_prep(model, img).to(device)))[0]
    if view == "multi":
        return _multi_view_scores(model, image, cfg, rescale, device)
    raise DetectionError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}")


def check_view(model: SPPClassifier, view: str) -> None:
    if view not in VIEWS:
        raise DetectionError(f"unknown view {view!r}: use one of {', '.join(VIEWS)}")
    if not model.cfg.spp and view in ("full", "multi"):
        raise DetectionError(f"view {view!r} needs an SPP classifier: the no-SPP baseline takes only "
                             f"{model.cfg.fixed_input}x{model.cfg.fixed_input} inputs (use center or ten)")


def score_images(model: SPPClassifier, data: ClassificationSet, view: str, cfg: TestConfig, rescale: float = 1.0,
                 device: torch.device | str = "cpu", progress: Progress | None = None) -> np.ndarray | None:
    """Scores float32 array[N, K] of every sample of ``data``; under ``torchrun`` each rank scores
    a contiguous shard and rank 0 gets them all (None on the other ranks)."""
    check_view(model, view)
    lo, hi = comm.shard_bounds(len(data.samples))
    out = []
    model.eval()
    with torch.no_grad():
        for n, sample in enumerate(data.samples[lo:hi]):
            out.append(score_image(model, load_pixels(sample), view, cfg, rescale, device).float().cpu().numpy())
            if progress is not None:
                progress(n + 1, hi - lo)
    k = len(data.classes)
    parts = comm.gather(np.stack(out) if out else np.zeros((0, k), np.float32), f"scoring {view} views: gathering")
    return None if parts is None else np.concatenate(parts)


def evaluate(model: SPPClassifier, data: ClassificationSet, view: str, cfg: TestConfig, rescale: float = 1.0,
             device: torch.device | str = "cpu", progress: Progress | None = None) -> dict[str, Any] | None:
    """Metrics of one view on a split (rank 0; None on other ranks), with images per second."""
    start = time.perf_counter()
    scores = score_images(model, data, view, cfg, rescale, device, progress)
    seconds = time.perf_counter() - start
    if scores is None:
        return None
    metrics = classification_metrics(scores, data)
    metrics.update({"view": view, "rescale": rescale, "seconds": seconds,
                    "images_per_second": len(data.samples) / seconds if seconds > 0 else None})
    return metrics
