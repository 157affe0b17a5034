"""Tests of detection.features.pooling and .scales against slow, obvious references (float64 where
it matters)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detection.features import pooling
from detection.features import scales as feature_scales
from detection.features.pooling import (
    SpatialPyramidPooling,
    pool_windows,
    project_boxes,
    spatial_pyramid_pool,
)
from detection.features.scales import choose_scale, scale_factors


# ---------------------------------------------------------------------------------------------
# Slow references
# ---------------------------------------------------------------------------------------------

def ref_spp_window(fmap: np.ndarray, cell: tuple[int, int, int, int], levels) -> np.ndarray:
    """Loops over levels and bins with the bin rule [floor(i*a/n), ceil((i+1)*a/n))."""
    c1, r1, c2, r2 = cell
    win = fmap[:, r1:r2 + 1, c1:c2 + 1]
    channels, h, w = win.shape
    out = []
    for n in levels:
        block = np.empty((channels, n, n))
        for i in range(n):
            y0, y1 = math.floor(i * h / n), math.ceil((i + 1) * h / n)
            for j in range(n):
                x0, x1 = math.floor(j * w / n), math.ceil((j + 1) * w / n)
                block[:, i, j] = win[:, y0:y1, x0:x1].reshape(channels, -1).max(axis=1)
        out.append(block.reshape(-1))
    return np.concatenate(out)


def ref_project_paper(box, stride, size, c0):
    """Cells whose centres c0 + S*j lie strictly inside the window, by enumeration; then the
    midpoint collapse and clamping."""
    out = []
    for lo, hi, n in ((box[0], box[2], size[1]), (box[1], box[3], size[0])):
        inside = [j for j in range(-200, 400) if lo < c0 + stride * j < hi]
        if inside:
            a, b = inside[0], inside[-1]
        else:  # empty: first centre right of lo, last centre left of hi
            a = min(j for j in range(-200, 400) if c0 + stride * j > lo)
            b = max(j for j in range(-200, 400) if c0 + stride * j < hi)
            a = b = (a + b) // 2
        out.append((min(max(a, 0), n - 1), min(max(b, 0), n - 1)))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def ref_project_code(box, stride, size, offset0, offset=6.5):
    """A line-by-line port of SPP_net's spm_pool_caffe_mex.cpp box normalisation (1-based
    boxes l = x1 + 1, r = x2; C integer division; clamp to [1, W]); returned 0-based."""
    l, t, r, b = box[0] + 1, box[1] + 1, box[2], box[3]
    x0 = int(math.floor((l - offset0 + offset) / stride + 0.5) + 1)
    y0 = int(math.floor((t - offset0 + offset) / stride + 0.5) + 1)
    x1 = int(math.ceil((r - offset0 - offset) / stride - 0.5) + 1)
    y1 = int(math.ceil((b - offset0 - offset) / stride - 0.5) + 1)

    def cdiv2(v):  # C's truncating division by 2
        return int(v / 2)

    if x0 > x1:
        x0 = x1 = cdiv2(x0 + x1)
    if y0 > y1:
        y0 = y1 = cdiv2(y0 + y1)
    hgt, wid = size
    top, bottom = min(hgt, max(1, y0)), min(hgt, max(1, y1))
    left, right = min(wid, max(1, x0)), min(wid, max(1, x1))
    return (left - 1, top - 1, right - 1, bottom - 1)


def random_cells(gen: torch.Generator, n: int, height: int, width: int) -> torch.Tensor:
    """Random inclusive cell ranges, a third of them single cells."""
    c1 = torch.randint(0, width, (n,), generator=gen)
    r1 = torch.randint(0, height, (n,), generator=gen)
    c2 = torch.minimum(c1 + torch.randint(0, width, (n,), generator=gen), torch.tensor(width - 1))
    r2 = torch.minimum(r1 + torch.randint(0, height, (n,), generator=gen), torch.tensor(height - 1))
    single = torch.arange(n) % 3 == 0
    c2 = torch.where(single, c1, c2)
    r2 = torch.where(single, r1, r2)
    return torch.stack([c1, r1, c2, r2], dim=1)


# ---------------------------------------------------------------------------------------------
# Whole-map SPP
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (6, 6), (7, 13), (13, 13), (20, 9)])
def test_spatial_pyramid_pool_fixed_length_and_reference(hw):
    gen = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(2, 4, *hw, generator=gen, dtype=torch.float64)
    out = spatial_pyramid_pool(x, bins="adaptive")
    assert out.shape == (2, 4 * 50)
    for k in range(2):
        ref = ref_spp_window(x[k].numpy(), (0, 0, hw[1] - 1, hw[0] - 1), (6, 3, 2, 1))
        np.testing.assert_array_equal(out[k].numpy(), ref)


def ref_spp_paper(fmap: np.ndarray, levels) -> np.ndarray:
    """The paper's whole-map bins by loops: bin i of n is [i*floor(a/n), i*floor(a/n) + ceil(a/n))."""
    channels, h, w = fmap.shape
    out = []
    for n in levels:
        block = np.empty((channels, n, n))
        for i in range(n):
            y0 = i * (h // n)
            for j in range(n):
                x0 = j * (w // n)
                block[:, i, j] = fmap[:, y0:y0 + math.ceil(h / n), x0:x0 + math.ceil(w / n)].reshape(channels, -1).max(axis=1)
        out.append(block.reshape(-1))
    return np.concatenate(out)


@pytest.mark.parametrize("hw", [(6, 6), (7, 13), (10, 10), (13, 13), (14, 14), (20, 9), (17, 31)])
def test_paper_bins_match_the_slow_reference(hw):
    gen = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(2, 4, *hw, generator=gen, dtype=torch.float64)
    out = spatial_pyramid_pool(x, bins="paper")
    assert out.shape == (2, 4 * 50)
    for k in range(2):
        np.testing.assert_array_equal(out[k].numpy(), ref_spp_paper(x[k].numpy(), (6, 3, 2, 1)))
    assert torch.equal(spatial_pyramid_pool(x), out)            # the paper's rule is the default


def test_paper_and_adaptive_bins_hand_worked():
    # A 14x14 map whose value is the column index; the 6x6 level's first row of bins.
    # Paper: window ceil(14/6) = 3, stride floor(14/6) = 2 -> bins [0,3) [2,5) [4,7) [6,9) [8,11)
    #        [10,13): maxima 2 4 6 8 10 12 (column 13 is never pooled).
    # Adaptive (the code): [floor(14i/6), ceil(14(i+1)/6)) = [0,3) [2,5) [4,7) [7,10) [9,12) [11,14):
    #        maxima 2 4 6 9 11 13.
    x = torch.arange(14.0).expand(1, 1, 14, 14)
    paper = spatial_pyramid_pool(x, (6,), bins="paper").reshape(6, 6)[0]
    adaptive = spatial_pyramid_pool(x, (6,), bins="adaptive").reshape(6, 6)[0]
    assert paper.tolist() == [2, 4, 6, 8, 10, 12]
    assert adaptive.tolist() == [2, 4, 6, 9, 11, 13]
    # 13 cells (ZF-5's conv5 at 224 px, the paper's example): window 3, stride 2 gives
    # [0,3) [2,5) ... [10,13), exactly the adaptive bins; likewise for the 3x3, 2x2 and 1x1 levels.
    x13 = torch.arange(13.0).expand(1, 1, 13, 13)
    assert torch.equal(spatial_pyramid_pool(x13, bins="paper"), spatial_pyramid_pool(x13, bins="adaptive"))


def test_paper_bins_refuse_maps_smaller_than_a_level():
    with pytest.raises(ValueError, match="at least 6x6 cells.*got 5x9.*bins='adaptive'"):
        spatial_pyramid_pool(torch.zeros(1, 2, 5, 9))
    assert spatial_pyramid_pool(torch.zeros(1, 2, 5, 9), bins="adaptive").shape == (1, 100)
    with pytest.raises(ValueError, match="unknown bin rule"):
        spatial_pyramid_pool(torch.zeros(1, 2, 6, 6), bins="round")
    with pytest.raises(ValueError, match="unknown bin rule"):
        SpatialPyramidPooling(bins="round")


def test_spatial_pyramid_pool_module():
    m = SpatialPyramidPooling((4, 2, 1))
    assert "levels=(4, 2, 1), bins='paper'" in repr(m)
    assert m(torch.randn(1, 3, 5, 9)).shape == (1, m.output_size(3)) == (1, 63)
    with pytest.raises(ValueError):
        SpatialPyramidPooling((3, 0))


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------

MAP = (43, 58)   # conv map of a 688 x 917 input (ZF-5)


@pytest.mark.parametrize("box, expected", [
    ((0, 0, 16, 16), (0, 0, 0, 0)),            # one cell: only centre 0.5 is inside
    ((16, 16, 48, 48), (1, 1, 2, 2)),          # edges on stride multiples: centres 16.5, 32.5
    ((16.5, 16.5, 48.5, 48.5), (2, 2, 2, 2)),  # edges exactly on centres: strictly inside only
    ((15.9, 0, 49, 16), (1, 0, 3, 0)),         # just below / above the centres
    ((20, 20, 30, 30), (1, 1, 1, 1)),          # no centre inside: midpoint of (2, 1)
    ((40, 40, 40, 40), (2, 2, 2, 2)),          # zero area: still one cell
    ((0, 0, 917, 688), (0, 0, 57, 42)),        # whole image -> whole map
    ((-50, -50, -10, -10), (0, 0, 0, 0)),      # outside, top left: clamped
    ((1000, 700, 1100, 800), (57, 42, 57, 42)),  # outside, bottom right: clamped
    ((900, 0, 2000, 688), (57, 0, 57, 42)),    # sticks out on the right
])
def test_project_paper_hand_worked(box, expected):
    got = project_boxes(torch.tensor([box], dtype=torch.float32), 16, MAP, rule="paper")
    assert tuple(got[0].tolist()) == expected
    assert tuple(got[0].tolist()) == ref_project_paper(box, 16, MAP, 0.5)
    assert got.dtype == torch.long


@pytest.mark.parametrize("box, expected", [
    # j1 = floor((x1 + 14.5) / 16), j2 = ceil((x2 - 15.5) / 16) for c0 = 0.5, offset 6.5
    ((0, 0, 16, 16), (0, 0, 1, 1)),
    ((16, 16, 48, 48), (1, 1, 3, 3)),
    ((17.5, 0, 47.5, 16), (2, 0, 2, 1)),       # x: 32/16 = 2 exactly, 32/16 = 2 exactly
    ((20, 20, 30, 30), (1, 1, 1, 1)),          # empty (2 > 1): midpoint 1
    ((0, 0, 917, 688), (0, 0, 57, 42)),
    ((-50, -50, -10, -10), (0, 0, 0, 0)),
])
def test_project_code_hand_worked(box, expected):
    got = project_boxes(torch.tensor([box], dtype=torch.float64), 16, MAP, rule="code")
    assert tuple(got[0].tolist()) == expected
    assert tuple(got[0].tolist()) == ref_project_code(box, 16, MAP, offset0=1.0)


@pytest.mark.parametrize("c0", [0.5, 20.5, 15.5])
def test_project_matches_references_on_random_boxes(c0):
    rng = np.random.default_rng(int(c0 * 10))
    xy = rng.uniform(-60, 960, size=(400, 2))
    wh = np.exp(rng.uniform(np.log(0.5), np.log(800), size=(400, 2)))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    boxes[:50] = np.round(boxes[:50] / 16) * 16            # edges on stride multiples
    boxes[50:80] = np.round(boxes[50:80] - c0) + c0        # edges on half pixels / centres
    t = torch.from_numpy(boxes)
    paper = project_boxes(t, 16, MAP, rule="paper", first_cell_center=c0)
    code = project_boxes(t, 16, MAP, rule="code", first_cell_center=c0)
    for k, box in enumerate(boxes.tolist()):
        assert tuple(paper[k].tolist()) == ref_project_paper(box, 16, MAP, c0), box
        # offset0 of the code is the 1-based pixel index of cell 1's centre: c0 + 0.5
        assert tuple(code[k].tolist()) == ref_project_code(box, 16, MAP, offset0=c0 + 0.5), box
    for cells in (paper, code):
        assert (cells[:, 2] >= cells[:, 0]).all() and (cells[:, 3] >= cells[:, 1]).all()
        assert (cells >= 0).all() and (cells[:, [0, 2]] < MAP[1]).all() and (cells[:, [1, 3]] < MAP[0]).all()


def test_project_rejects_bad_arguments():
    with pytest.raises(ValueError):
        project_boxes(torch.zeros(1, 4), 16, MAP, rule="centre")
    with pytest.raises(ValueError):
        project_boxes(torch.zeros(1, 4), 16, (0, 5))
    assert project_boxes(torch.zeros(0, 4), 16, MAP).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Window pooling
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["table", "roi_pool"])
@pytest.mark.parametrize("hw, levels", [((13, 17), (6, 3, 2, 1)), ((3, 5), (6, 3, 2, 1)),
                                        ((1, 1), (6, 3, 2, 1)), ((40, 29), (6, 3, 2, 1)),
                                        ((11, 9), (5, 4, 2, 1)), ((9, 12), (1,)), ((9, 12), (2, 6))])
def test_pool_windows_matches_reference(method, hw, levels):
    gen = torch.Generator().manual_seed(hw[0] * 31 + hw[1] + len(levels))
    fmap = torch.randn(5, *hw, generator=gen, dtype=torch.float64)
    cells = random_cells(gen, 60, *hw)
    cells[0] = torch.tensor([0, 0, hw[1] - 1, hw[0] - 1])      # the whole map
    out = pool_windows(fmap, cells, levels, method=method)
    assert out.shape == (60, 5 * sum(n * n for n in levels)) and out.dtype == torch.float64
    for k, cell in enumerate(cells.tolist()):
        np.testing.assert_array_equal(out[k].numpy(), ref_spp_window(fmap.numpy(), cell, levels))
        c1, r1, c2, r2 = cell     # the same as whole-map SPP of the cropped window
        crop = fmap[None, :, r1:r2 + 1, c1:c2 + 1]
        torch.testing.assert_close(out[k], spatial_pyramid_pool(crop, levels, bins="adaptive")[0], rtol=0, atol=0)


def test_pool_windows_float32_fp16_and_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    fmap = torch.randn(64, 30, 41, generator=gen)
    cells = random_cells(gen, 100, 30, 41)
    ref = torch.stack([spatial_pyramid_pool(fmap[None, :, r1:r2 + 1, c1:c2 + 1], bins="adaptive")[0]
                       for c1, r1, c2, r2 in cells.tolist()])
    torch.testing.assert_close(pool_windows(fmap[None], cells), ref, rtol=0, atol=0)
    half = pool_windows(fmap.half(), cells)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref.half().float(), rtol=0, atol=0)
    # A tiny table budget forces one channel chunk per few channels; small window chunks too.
    monkeypatch.setattr(pooling, "_TABLE_BYTES", 4096 * 8)
    monkeypatch.setattr(pooling, "_WINDOW_CHUNK", 7)
    torch.testing.assert_close(pool_windows(fmap, cells), ref, rtol=0, atol=0)


def test_pool_windows_gradcheck():
    gen = torch.Generator().manual_seed(5)
    # Distinct values (a permutation) so that every max has a unique argmax.
    fmap = (torch.randperm(2 * 7 * 9, generator=gen).double() / 10).view(2, 7, 9).requires_grad_()
    cells = torch.tensor([[0, 0, 8, 6], [2, 1, 2, 1], [1, 2, 7, 4], [3, 0, 5, 6], [0, 5, 8, 6]])
    assert torch.autograd.gradcheck(lambda f: pool_windows(f, cells), (fmap,))
    # and the gradient equals the one through adaptive_max_pool2d of the crops
    w = torch.randn(len(cells), 2 * 50, generator=gen, dtype=torch.float64)
    (g_fast,) = torch.autograd.grad((pool_windows(fmap, cells) * w).sum(), fmap)
    ref = torch.stack([spatial_pyramid_pool(fmap[None, :, r1:r2 + 1, c1:c2 + 1], bins="adaptive")[0]
                       for c1, r1, c2, r2 in cells.tolist()])
    (g_ref,) = torch.autograd.grad((ref * w).sum(), fmap)
    torch.testing.assert_close(g_fast, g_ref)


def test_pool_windows_rejects_bad_cells():
    fmap = torch.randn(2, 4, 4)
    for bad in ([0, 0, 4, 3], [-1, 0, 1, 1], [2, 0, 1, 1]):
        with pytest.raises(ValueError):
            pool_windows(fmap, torch.tensor([bad]))
    with pytest.raises(ValueError):
        pool_windows(fmap, torch.tensor([[0, 0, 1, 1]]), method="slow")
    assert pool_windows(fmap, torch.zeros(0, 4, dtype=torch.long)).shape == (0, 100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pool_windows_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(11)
    fmap = torch.randn(256, 43, 58, generator=gen)
    cells = random_cells(gen, 500, 43, 58)
    cpu = pool_windows(fmap, cells)
    for method in ("table", "roi_pool"):
        gpu = pool_windows(fmap.cuda(), cells.cuda(), method=method)
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    f = fmap[:4, :9, :11].double().cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pool_windows(x, random_cells(torch.Generator().manual_seed(1), 5, 9, 11).cuda()), (f,))


# ---------------------------------------------------------------------------------------------
# Scales
# ---------------------------------------------------------------------------------------------

def test_scale_factors():
    assert scale_factors(375, 500, (688,)) == [688 / 375]
    assert scale_factors(500, 375, feature_scales.DEFAULT_SCALES_5) == [s / 375 for s in feature_scales.DEFAULT_SCALES_5]
    # 3160 x 4605 photo at 1200: 1749 px long side, under the 2000 cap
    assert scale_factors(3160, 4605, (1200,)) == [1200 / 3160]
    # a panorama: the cap wins, the longer side becomes exactly max_size
    (f,) = scale_factors(100, 2000, (688,))
    assert f == 1.0 and round(2000 * f) == feature_scales.DEFAULT_MAX_SIZE
    assert scale_factors(100, 2000, (688,), max_size=None) == [6.88]
    with pytest.raises(ValueError):
        scale_factors(0, 10, (688,))


def test_choose_scale_area_and_code_rules():
    factors = [1.0, 2.0]
    boxes = torch.tensor([[0, 0, 224, 224], [10, 10, 122, 122], [0, 0, 160, 160], [0, 0, 140, 140],
                          [0, 0, 5, 5], [3, 3, 3, 3]], dtype=torch.float32)
    # side 140: area rule |140^2 - 224^2| = 30576 > |280^2 - 224^2| = 28224 -> scale 1;
    # code rule |140 - 208| = 68 < |280 - 208| = 72 -> scale 0.
    assert choose_scale(boxes, factors, rule="area").tolist() == [0, 1, 0, 1, 1, 1]
    assert choose_scale(boxes, factors, rule="code").tolist() == [0, 1, 0, 0, 1, 1]
    assert choose_scale(boxes, factors, target=112, rule="area").tolist() == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError):
        choose_scale(boxes, factors, rule="nearest")


def test_choose_scale_code_matches_matlab():
    """spm_expected_scale.m + spp_features_convX_to_poolX.m, ported literally."""
    rng = np.random.default_rng(0)
    height, width = 375, 500
    scales = np.array(feature_scales.CODE_SCALES_5, dtype=np.float64)
    xy = rng.uniform(0, 300, size=(500, 2))
    wh = rng.uniform(4, 200, size=(500, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    area = wh[:, 0] * wh[:, 1]                          # (r - l + 1) * (b - t + 1) in 1-based
    expected = np.round(13 * 16 * min(height, width) / np.sqrt(area))
    matlab = np.abs(scales[None, :] - expected[:, None]).argmin(axis=1)
    ours = choose_scale(torch.from_numpy(boxes), scale_factors(height, width, feature_scales.CODE_SCALES_5),
                        rule="code").numpy()
    differ = np.nonzero(matlab != ours)[0]
    # The code rounds the expected scale to an integer: only near-ties (within 1 px) may differ.
    exact = 13 * 16 * min(height, width) / np.sqrt(area[differ])
    d = np.abs(scales[None, :] - exact[:, None])
    assert np.all(np.abs(d[np.arange(len(differ)), matlab[differ]] - d[np.arange(len(differ)), ours[differ]]) <= 1.0)
    assert len(differ) <= 5


def test_named_scales_are_defined_once():
    from detection.errors import DetectionError
    from detection.features.scales import CODE_SCALES_5, DEFAULT_SCALES_1, DEFAULT_SCALES_5, named_scales
    assert named_scales("1") == DEFAULT_SCALES_1 == (688,)
    assert named_scales("5") == DEFAULT_SCALES_5 == (480, 576, 688, 864, 1200)
    assert named_scales("code5") == CODE_SCALES_5 == (480, 576, 688, 874, 1200)
    assert named_scales("480,688") == (480, 688)
    for bad in ("", "0", "a,b", "-3"):
        with pytest.raises(DetectionError, match="--scales"):
            named_scales(bad)
