"""Spatial pyramid pooling: whole-map SPP, window -> conv-cell projection, and pooling of many
windows of one conv map (the scale of each window: :mod:`detection.features.scales`).

Bin rules (docs/spp.md, "Bins"):

- ``"adaptive"`` (windows, always): bin ``i`` of ``n`` over a length of ``a`` cells is the
  half-open cell range ``[floor(i*a/n), ceil((i+1)*a/n))`` — the official code's
  ``spm_pool_caffe_mex.cpp`` and exactly what :func:`torch.nn.functional.adaptive_max_pool2d`
  does. Bins of neighbouring indices may share a cell; when ``a < n`` cells repeat, so every
  window gives the same number of bins.
- ``"paper"`` (whole-map SPP for classification, Sec. 2.3, the default of
  :func:`spatial_pyramid_pool`): a max-pooling window of ``ceil(a/n)`` cells moved by
  ``floor(a/n)``, i.e. bin ``i`` is ``[i*floor(a/n), i*floor(a/n) + ceil(a/n))``. It needs
  ``a >= n`` (a stride of 0 is no pooling), so it cannot serve windows of a few cells.

Feature layout: for each level ``n`` the pooled ``[C, n, n]`` block flattened (channel-major,
then row, then column: ``Tensor.flatten`` of ``[C, n, n]``), levels concatenated in the order
given. With the default levels (6, 3, 2, 1) and 256 channels that is 256*50 = 12,800 values; the
first 256*36 are the 6x6 level, which is what a pretrained fc6 (``Backbone.head``) takes.

See docs/spp.md for the projection rules and their derivation.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_LEVELS",
    "pool5_dim",
    "CODE_OFFSET",
    "BIN_RULES",
    "PROJECTION_RULES",
    "spatial_pyramid_pool",
    "SpatialPyramidPooling",
    "project_boxes",
    "pool_windows",
]

#: The paper's pyramid {6x6, 3x3, 2x2, 1x1}: 50 bins per channel.
DEFAULT_LEVELS: tuple[int, ...] = (6, 3, 2, 1)
#: Window -> conv-cell projection rules (:func:`project_boxes`).
PROJECTION_RULES = ("paper", "code")
#: The code's ``offset`` for ZF-5 (pixels the window is shrunk by on each side before picking
#: the nearest cells): 6.5 = sz_conv_standard / 2 with sz_conv_standard = 13.
CODE_OFFSET: float = 6.5

#: Memory budget of the range-max table of :func:`pool_windows` (the table is built for chunks
#: of channels that fit; 64 MiB covers 256 channels of a 43x58 map at 688 px whole).
_TABLE_BYTES = 64 << 20
#: Windows pooled per step: 32 windows x 36 bins x 4 blocks x 256 channels x 4 B = 4.7 MB of
#: gathered blocks stay in cache; 32 was fastest of 16..512 on the 2-core dev machine.
_WINDOW_CHUNK = 32


# --------------------------------------------------------------------------------------------
# Whole-map SPP
# --------------------------------------------------------------------------------------------

def pool5_dim(channels: int, levels: Sequence[int] = DEFAULT_LEVELS) -> int:
    """Length of one pooled window or image (the "pool5" vector): ``channels * sum(n*n)``, e.g.
    256 * 50 = 12,800 for the paper's (6, 3, 2, 1) pyramid on ZF-5."""
    return int(channels) * sum(n * n for n in _check_levels(levels))


def _check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    levels = tuple(int(n) for n in levels)
    if not levels or any(n < 1 for n in levels):
        raise ValueError(f"pyramid levels must be positive integers, got {levels}")
    return levels


BIN_RULES = ("paper", "adaptive")


def _paper_level(x: torch.Tensor, n: int) -> torch.Tensor:
    """The paper's bins of one level: max pooling, window ceil(a/n), stride floor(a/n), per axis.

    With that window and stride at least n outputs fit in ``a`` (the n-th ends at
    ``(n-1)*floor(a/n) + ceil(a/n) <= a``); pooling may produce more (e.g. a = 10, n = 6: window
    2, stride 1, 9 outputs), of which the first n are the paper's bins.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h < n or w < n:
        raise ValueError(f"the paper's bin rule needs a map of at least {n}x{n} cells for a {n}x{n} level "
                         f"(stride floor(a/n) = 0), got {h}x{w}: use bins='adaptive' for small maps")
    kernel = (-(-h // n), -(-w // n))
    return F.max_pool2d(x, kernel, (h // n, w // n))[..., :n, :n]


def spatial_pyramid_pool(x: torch.Tensor, levels: Sequence[int] = DEFAULT_LEVELS, bins: str = "paper") -> torch.Tensor:
    """Max-pool a whole conv map into a fixed-length vector per image (the classification SPP).

    Args:
        x: Tensor[N, C, H, W]. ``bins="paper"``: H, W >= the finest level; ``"adaptive"``: any
            H, W >= 1 (maps smaller than the finest level repeat cells).
        levels: bins per side of each pyramid level.
        bins: "paper" (window ceil(a/n), stride floor(a/n); Sec. 2.3) or "adaptive" (the code's
            ``[floor(i a/n), ceil((i+1) a/n))``, the rule every window is pooled with).
    Returns:
        Tensor[N, C * sum(n*n)]: per level the [C, n, n] block flattened, levels concatenated.
    """
    levels = _check_levels(levels)
    if x.dim() != 4:
        raise ValueError(f"expected a [N, C, H, W] map, got shape {tuple(x.shape)}")
    if bins == "adaptive":
        return torch.cat([F.adaptive_max_pool2d(x, n).flatten(1) for n in levels], dim=1)
    if bins == "paper":
        return torch.cat([_paper_level(x, n).flatten(1) for n in levels], dim=1)
    raise ValueError(f"unknown bin rule {bins!r}: use 'paper' or 'adaptive'")


class SpatialPyramidPooling(nn.Module):
    """Module wrapper of :func:`spatial_pyramid_pool` (Tensor[N, C, H, W] -> [N, C*sum(n^2)])."""

    def __init__(self, levels: Sequence[int] = DEFAULT_LEVELS, bins: str = "paper") -> None:
        super().__init__()
        self.levels = _check_levels(levels)
        if bins not in BIN_RULES:
            raise ValueError(f"unknown bin rule {bins!r}: use 'paper' or 'adaptive'")
        self.bins = bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spatial_pyramid_pool(x, self.levels, self.bins)

    def output_size(self, channels: int) -> int:
        """Length of the pooled vector for a map of ``channels`` channels."""
        return pool5_dim(channels, self.levels)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(levels={self.levels}, bins={self.bins!r})"


# --------------------------------------------------------------------------------------------
# Projection of windows onto conv cells
# --------------------------------------------------------------------------------------------

def project_boxes(boxes: torch.Tensor, stride: int = 16, map_size: tuple[int, int] = (1, 1),
                  rule: str = "paper", first_cell_center: float = 0.5,
                  code_offset: float = CODE_OFFSET) -> torch.Tensor:
    """Conv cells covered by windows, for windows in pixels of the image the map was computed on.

    Cell ``j`` is centred at ``c_j = first_cell_center + stride * j`` (continuous coordinates,
    pixel ``i`` covers ``[i, i+1)``; 0.5 for ZF-5 padded ``floor(p/2)``: pixel ``16 j``'s centre).

    - ``"paper"`` (appendix A): cells whose centres lie strictly inside the window. The paper's
      ``x' = floor(x/S) + 1`` (left) is the first cell centred right of ``x`` and
      ``x' = ceil(x/S) - 1`` (right) the last centred left of ``x``, in a frame where centres sit
      at multiples of S; in ours: ``j1 = floor((x1 - c0)/S) + 1``, ``j2 = ceil((x2 - c0)/S) - 1``.
    - ``"code"`` (SPP_net ``utils/spm_pool/spm_response_boxes.m`` and ``spm_pool_caffe_mex.cpp``):
      ``floor((l - offset0 + offset)/S + 0.5) + 1`` and ``ceil((r - offset0 - offset)/S - 0.5) + 1``
      with 1-based pixel boxes ``l = x1 + 1, r = x2`` and ``offset0`` the 1-based pixel of cell 1's
      centre (``c0 + 0.5``; 21 for the code's unpadded ZF-5): the cell nearest to the first pixel's
      centre moved ``offset`` px inwards, and likewise on the right. In 0-based cells:
      ``j1 = floor((x1 + 0.5 + offset - c0)/S + 0.5)``, ``j2 = ceil((x2 - 0.5 - offset - c0)/S - 0.5)``.

    Both rules then (as the code does) collapse an empty projection (``j2 < j1``) to the midpoint
    cell ``(j1 + j2) // 2`` and clamp into the map, so every window gets at least one cell, and a
    window outside the image is pooled from the border cell nearest to it.

    Args:
        boxes: Tensor[N, 4] (x1, y1, x2, y2) in pixels of the scaled image (any float dtype).
        stride: total stride S of the trunk.
        map_size: (H, W) of the conv map, in cells.
        rule: "paper" or "code".
        first_cell_center: c0, ``Backbone.first_cell_center``.
        code_offset: the code's inward shift in pixels (rule "code" only).
    Returns:
        LongTensor[N, 4] (c1, r1, c2, r2): 0-based inclusive cell ranges, 0 <= c1 <= c2 < W and
        0 <= r1 <= r2 < H, on the device of ``boxes``.
    """
    if rule not in PROJECTION_RULES:
        raise ValueError(f"unknown projection rule {rule!r}: use 'paper' or 'code'")
    height, width = int(map_size[0]), int(map_size[1])
    if height < 1 or width < 1:
        raise ValueError(f"conv map of {height}x{width} cells has no cell to pool")
    b = torch.as_tensor(boxes).to(torch.float64).reshape(-1, 4)
    lo = (b[:, :2] - first_cell_center) / stride     # (x1, y1) in cell units, cell j at j
    hi = (b[:, 2:] - first_cell_center) / stride
    if rule == "paper":
        start = torch.floor(lo) + 1
        end = torch.ceil(hi) - 1
    else:
        start = torch.floor(lo + (0.5 + code_offset) / stride + 0.5)
        end = torch.ceil(hi - (0.5 + code_offset) / stride - 0.5)
    start, end = start.to(torch.long), end.to(torch.long)
    empty = end < start
    mid = torch.div(start + end, 2, rounding_mode="floor")
    start = torch.where(empty, mid, start)
    end = torch.where(empty, mid, end)
    upper = torch.tensor([width - 1, height - 1], device=b.device)
    start = torch.minimum(start.clamp(min=0), upper)
    end = torch.minimum(end.clamp(min=0), upper)
    return torch.stack([start[:, 0], start[:, 1], end[:, 0], end[:, 1]], dim=1)


# --------------------------------------------------------------------------------------------
# Pooling many windows of one map
# --------------------------------------------------------------------------------------------

def _bin_edges(first: torch.Tensor, size: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start (inclusive) and end (exclusive) cells of the n bins of each window along one axis.

    first, size: LongTensor[N]. Returns two LongTensor[N, n]: ``first + floor(i*a/n)`` and
    ``first + ceil((i+1)*a/n)`` in exact integer arithmetic.
    """
    i = torch.arange(n, device=size.device)
    a = size[:, None]
    start = torch.div(i * a, n, rounding_mode="floor")
    end = torch.div((i + 1) * a + (n - 1), n, rounding_mode="floor")
    return first[:, None] + start, first[:, None] + end


def _range_max_table(fmap_hwc: torch.Tensor, kmax: int, lmax: int) -> torch.Tensor:
    """2D sparse table: T[k, l, r, c] = max of the 2^k x 2^l block starting at cell (r, c).

    Blocks that stick out of the map are cut at its border (never queried).
    Args:
        fmap_hwc: Tensor[H, W, C] (channels last, so a query gathers C contiguous values).
    Returns:
        Tensor[kmax+1, lmax+1, H, W, C].
    """
    rows = [fmap_hwc]
    for k in range(1, kmax + 1):
        prev, h = rows[-1], 1 << (k - 1)
        rows.append(torch.cat([torch.maximum(prev[:-h], prev[h:]), prev[-h:]], dim=0) if h < prev.shape[0] else prev)
    table = []
    for t in rows:
        cols = [t]
        for l in range(1, lmax + 1):
            prev, w = cols[-1], 1 << (l - 1)
            cols.append(torch.cat([torch.maximum(prev[:, :-w], prev[:, w:]), prev[:, -w:]], dim=1)
                        if w < prev.shape[1] else prev)
        table.append(torch.stack(cols))
    return torch.stack(table)


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) of a LongTensor of positive values (exact for x < 2^52)."""
    return torch.frexp(x.to(torch.float64))[1].to(torch.long) - 1


def _level_queries(cells: torch.Tensor, n: int, width: int, height: int
                   ) -> tuple[torch.Tensor, int, int]:
    """Sparse-table queries of every n x n bin of every window.

    Args:
        cells: LongTensor[N, 4] (c1, r1, c2, r2) inclusive.
    Returns:
        idx: LongTensor[N, 4, n*n], for each bin the flat indices of its 4 blocks in the table
        ``[K+1, L+1, H, W]`` (one C-vector each); K, L: the largest row / column block levels.
    """
    c1, r1, c2, r2 = cells.unbind(1)
    ys, ye = _bin_edges(r1, r2 - r1 + 1, n)            # [N, n]
    xs, xe = _bin_edges(c1, c2 - c1 + 1, n)
    ky = _floor_log2(ye - ys)                          # a bin of length L is the union of two
    kx = _floor_log2(xe - xs)                          # (overlapping) blocks of 2^floor(log2 L)
    kmax, lmax = int(ky.max()), int(kx.max())
    ya, yb = ys * width, (ye - (1 << ky)) * width      # [N, n] first rows of the two blocks
    xa, xb = xs, xe - (1 << kx)
    base = (ky[:, :, None] * (lmax + 1) + kx[:, None, :]) * (height * width)       # [N, n, n]
    idx = torch.stack([base + ya[:, :, None] + xa[:, None, :],
                       base + ya[:, :, None] + xb[:, None, :],
                       base + yb[:, :, None] + xa[:, None, :],
                       base + yb[:, :, None] + xb[:, None, :]], dim=1)           # [N, 4, n, n]
    return idx.reshape(len(cells), 4, n * n), kmax, lmax


def _coarser(p: torch.Tensor, g: int) -> torch.Tensor:
    """[N, m, m, C] bins -> [N, m/g, m/g, C]: max over g x g groups (strided slices; much faster
    than ``amax`` over non-contiguous dims)."""
    out = None
    for a in range(g):
        for b in range(g):
            s = p[:, a::g, b::g]
            out = s if out is None else torch.maximum(out, s)
    return out


def _pool_table(fmap: torch.Tensor, cells: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """pool_windows by range-max queries on a 2D sparse table (see :func:`pool_windows`)."""
    channels, height, width = fmap.shape
    num = cells.shape[0]
    bases, derive = _level_plan(levels)
    queries = {n: _level_queries(cells, n, width, height) for n in bases}
    kmax = max(q[1] for q in queries.values())
    lmax = max(q[2] for q in queries.values())
    offsets, at = {}, 0                                 # column offset of each level's block
    for n in levels:
        offsets[n] = at
        at += channels * n * n
    out = fmap.new_empty((num, at))
    fmap_hwc = fmap.permute(1, 2, 0)                   # channels last: a query reads C values

    # Bound the table's memory by building it for chunks of channels.
    per_channel = (kmax + 1) * (lmax + 1) * height * width * fmap.element_size()
    cstep = max(1, min(channels, _TABLE_BYTES // max(per_channel, 1)))
    for c0 in range(0, channels, cstep):
        part = fmap_hwc[:, :, c0:c0 + cstep].contiguous()
        cc = part.shape[2]
        table = _range_max_table(part, kmax, lmax).reshape(-1, cc)
        for w0 in range(0, num, _WINDOW_CHUNK):
            w1 = min(num, w0 + _WINDOW_CHUNK)
            pooled: dict[int, torch.Tensor] = {}        # level -> [w, n, n, cc]
            for n in bases:
                q = queries[n][0][w0:w1]                # [w, 4, n*n]
                g = table.index_select(0, q.reshape(-1)).view(w1 - w0, 4, n * n, cc)
                m = torch.maximum(torch.maximum(g[:, 0], g[:, 1]), torch.maximum(g[:, 2], g[:, 3]))
                pooled[n] = m.view(w1 - w0, n, n, cc)
            for n, m in derive:
                pooled[n] = _coarser(pooled[m], m // n)
            for n in levels:
                dst = out[w0:w1, offsets[n] + c0 * n * n: offsets[n] + (c0 + cc) * n * n]
                dst.view(w1 - w0, cc, n, n).copy_(pooled[n].permute(0, 3, 1, 2))
    return out


def _level_plan(levels: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """Which levels to pool directly ("bases": not dividing a finer level) and, for the others,
    the coarsest finer level they divide, in an order where sources come first."""
    uniq = sorted(set(levels), reverse=True)
    bases = [n for n in uniq if not any(m > n and m % n == 0 for m in uniq)]
    derive = []
    for n in uniq:
        if n not in bases:
            derive.append((n, min(m for m in uniq if m > n and m % n == 0)))
    return bases, derive


def _pool_roi_pool(fmap: torch.Tensor, cells: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """pool_windows with torchvision's roi_pool at the base levels.

    roi_pool with integer boxes (c1, r1, c2, r2) at spatial_scale 1 uses a roi of c2 - c1 + 1
    cells and bins [floor(i*w/n), ceil((i+1)*w/n)) (our bin rule, computed in floating point).
    """
    from torchvision.ops import roi_pool

    num, channels = cells.shape[0], fmap.shape[0]
    bases, derive = _level_plan(levels)
    rois = torch.cat([torch.zeros_like(cells[:, :1]), cells], dim=1).to(fmap.dtype)
    pooled = {n: roi_pool(fmap[None], rois, output_size=n, spatial_scale=1.0).permute(0, 2, 3, 1)
              for n in bases}
    for n, m in derive:
        pooled[n] = _coarser(pooled[m], m // n)
    return torch.cat([pooled[n].permute(0, 3, 1, 2).reshape(num, channels * n * n) for n in levels], dim=1)


def pool_windows(fmap: torch.Tensor, cells: torch.Tensor, levels: Sequence[int] = DEFAULT_LEVELS,
                 method: str = "table") -> torch.Tensor:
    """Spatial pyramid max pooling of many windows of one conv map, vectorised over windows.

    Equal to ``spatial_pyramid_pool(fmap[None, :, r1:r2+1, c1:c2+1], levels)`` for every window,
    and differentiable (gradients flow to the argmax cells of ``fmap``).

    Levels that divide a finer level are computed from it: with our bin rule bin ``i`` of ``n``
    over ``a`` cells is exactly the union of bins ``i*m/n .. (i+1)*m/n - 1`` of ``m`` (consecutive
    bins touch or overlap), so the 3x3, 2x2 and 1x1 levels are maxima over groups of 6x6 bins.
    The finest levels are range-max queries on a 2D sparse table of the map (``method="table"``:
    each bin = max of 4 overlapping power-of-two blocks, cost independent of the window size), or
    torchvision's ``roi_pool`` (``method="roi_pool"``, cost grows with the window area).

    Args:
        fmap: Tensor[C, H, W] or [1, C, H, W] (any float dtype, CPU or CUDA).
        cells: LongTensor[N, 4] (c1, r1, c2, r2), 0-based inclusive, from :func:`project_boxes`.
        levels: bins per side of each level.
        method: "table" (default) or "roi_pool".
    Returns:
        Tensor[N, C * sum(n*n)] in ``fmap``'s dtype and device (layout: module docstring).
    """
    levels = _check_levels(levels)
    if fmap.dim() == 4:
        if fmap.shape[0] != 1:
            raise ValueError(f"pool_windows takes one map, got a batch of {fmap.shape[0]}")
        fmap = fmap[0]
    if fmap.dim() != 3:
        raise ValueError(f"expected a [C, H, W] map, got shape {tuple(fmap.shape)}")
    channels, height, width = fmap.shape
    cells = torch.as_tensor(cells, device=fmap.device).to(torch.long).reshape(-1, 4)
    if cells.shape[0] == 0:
        return fmap.new_zeros((0, pool5_dim(channels, levels)))
    if bool(((cells[:, 0] < 0) | (cells[:, 1] < 0) | (cells[:, 2] >= width) | (cells[:, 3] >= height)
             | (cells[:, 2] < cells[:, 0]) | (cells[:, 3] < cells[:, 1])).any()):
        raise ValueError(f"cells must be non-empty inclusive ranges inside the {height}x{width} map")
    if method == "table":
        return _pool_table(fmap, cells, levels)
    if method == "roi_pool":
        return _pool_roi_pool(fmap, cells, levels)
    raise ValueError(f"unknown pooling method {method!r}: use 'table' or 'roi_pool'")

