"""Tests of detection.features.rcnn (R-CNN crop + warp) against a slow per-pixel bilinear reference.

Sampling convention (derived from ``roi_align(aligned=True, sampling_ratio=1)``): for a padded
window (X1, Y1, X2, Y2) warped to ``size x size``, output pixel (i, j) samples the continuous
point x = X1 + (j + 0.5) * (X2 - X1) / size, y = Y1 + (i + 0.5) * (Y2 - Y1) / size, i.e. image
index (x - 0.5, y - 0.5) (pixel k covers [k, k+1), its centre is k + 0.5). Bilinear weights of
the four neighbours; torchvision reads 0 more than one pixel outside the image (x < -1 or
x > W in index units) and clamps to the border pixel within that band, which the reference
does the same way.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from detection.features.pooling import spatial_pyramid_pool
from detection.features.rcnn import CONTEXT_PADDING, context_padded_boxes, rcnn_window_features, warp_windows


def ref_padded_box(box, size: int, padding: int) -> tuple[float, float, float, float]:
    """Grow the box about its centre by size / (size - 2 * padding) (sides at least 1 px)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    s = size / (size - 2 * padding)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return cx - w * s / 2, cy - h * s / 2, cx + w * s / 2, cy + h * s / 2


def ref_sample(img: np.ndarray, y: float, x: float) -> np.ndarray:
    """Bilinear sample of img [C, H, W] at index coordinates (y, x), torchvision's border rule."""
    _, h, w = img.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(img.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * img[:, y0, x0] + (1 - ly) * lx * img[:, y0, x1]
            + ly * (1 - lx) * img[:, y1, x0] + ly * lx * img[:, y1, x1])


def ref_warp(img: np.ndarray, box, size: int, padding: int) -> np.ndarray:
    px1, py1, px2, py2 = ref_padded_box(box, size, padding)
    out = np.zeros((img.shape[0], size, size))
    for i in range(size):
        y = py1 + (i + 0.5) * (py2 - py1) / size
        for j in range(size):
            x = px1 + (j + 0.5) * (px2 - px1) / size
            out[:, i, j] = ref_sample(img, y - 0.5, x - 0.5)
    return out


BOXES = [
    [2.0, 1.0, 7.0, 6.0],        # inside, padding stays inside
    [0.0, 0.0, 11.0, 9.0],       # the whole image: padding reaches outside on every side
    [6.3, 4.7, 10.9, 8.2],       # fractional, near the bottom-right corner
    [-3.0, -2.0, 4.0, 3.0],      # partly outside the image
    [5.0, 5.0, 5.4, 5.2],        # thinner than a pixel: sides clamped to 1 px
    [20.0, 20.0, 30.0, 30.0],    # entirely outside: reads zeros (the mean colour)
]


def test_context_padded_boxes_matches_reference():
    boxes = torch.tensor(BOXES, dtype=torch.float64)
    for size, padding in ((8, 2), (224, 16), (227, 16)):
        got = context_padded_boxes(boxes, size, padding)
        ref = torch.tensor([ref_padded_box(b, size, padding) for b in BOXES], dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_original_box_fills_the_central_pixels():
    # In the warped frame the original box spans [padding, size - padding]: 16 px of context.
    boxes = torch.tensor([[10.0, 20.0, 110.0, 60.0], [0.5, 0.5, 3.5, 300.0]], dtype=torch.float64)
    size = 224
    padded = context_padded_boxes(boxes, size)
    assert CONTEXT_PADDING == 16
    for b, p in zip(boxes, padded):
        for lo, hi, a, c in ((b[0], b[2], p[0], p[2]), (b[1], b[3], p[1], p[3])):
            assert float((lo - a) / (c - a) * size) == pytest.approx(16.0, abs=1e-9)
            assert float((hi - a) / (c - a) * size) == pytest.approx(size - 16.0, abs=1e-9)


def test_warp_windows_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, 3, 9, 11, dtype=torch.float64, generator=g)
    boxes = torch.tensor(BOXES, dtype=torch.float64)
    size, padding = 8, 2
    got = warp_windows(img, boxes, size, padding)
    assert tuple(got.shape) == (len(BOXES), 3, size, size) and got.dtype == torch.float64
    for n, box in enumerate(BOXES):
        ref = ref_warp(img[0].numpy(), box, size, padding)
        np.testing.assert_allclose(got[n].numpy(), ref, rtol=1e-10, atol=1e-10, err_msg=f"box {box}")
    assert torch.count_nonzero(got[5]) == 0                       # outside the image: all mean


def test_warp_of_a_coordinate_ramp_is_the_sampling_grid():
    # An image whose value is the x coordinate of the pixel centre: bilinear sampling of a
    # linear function is exact, so the warp must return the sampled x of every output column.
    h, w = 40, 60
    ramp = torch.arange(w, dtype=torch.float64)[None, None, None, :].expand(1, 1, h, w) + 0.5
    box = torch.tensor([[12.0, 10.0, 44.0, 30.0]], dtype=torch.float64)
    size, padding = 16, 2
    got = warp_windows(ramp.contiguous(), box, size, padding)[0, 0]
    px1, _, px2, _ = ref_padded_box(box[0], size, padding)
    xs = px1 + (np.arange(size) + 0.5) * (px2 - px1) / size
    np.testing.assert_allclose(got.numpy(), np.broadcast_to(xs, (size, size)), rtol=0, atol=1e-12)
    # The central size - 2 * padding columns sample inside the original box.
    inside = (xs >= 12.0) & (xs <= 44.0)
    assert inside.tolist() == [padding <= j < size - padding for j in range(size)]


def test_rcnn_window_features_equal_per_window_loop():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    img = torch.randn(1, 3, 20, 24)
    boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, 24.0, 20.0], [15.0, 3.0, 23.0, 19.0],
                          [4.5, 4.5, 9.5, 6.0], [-2.0, 10.0, 8.0, 25.0]])
    levels = (2, 1)
    got = rcnn_window_features(trunk, img, boxes, size=40, levels=levels, batch_size=2)
    ref = torch.cat([spatial_pyramid_pool(trunk(warp_windows(img, b[None], 40)), levels, bins="adaptive") for b in boxes])
    assert tuple(got.shape) == (5, 4 * 5)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    whole = rcnn_window_features(trunk, img, boxes, size=40, levels=levels, batch_size=128)
    torch.testing.assert_close(whole, ref, rtol=1e-6, atol=1e-6)


def test_padding_must_leave_room():
    with pytest.raises(ValueError, match="no room"):
        context_padded_boxes(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), size=32, padding=16)
