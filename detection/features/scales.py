"""Image scales: the defaults (the paper's 1 and 5 scales), the tools' scale names, the resize
factor of each scale, the scale each window is pooled from (docs/spp.md, "Scales"), and the
pooling of windows from the maps of their scales (:func:`pooled_window_features`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DetectionError
from .pooling import DEFAULT_LEVELS, pool5_dim, pool_windows, project_boxes

__all__ = ["DEFAULT_SCALES_1", "DEFAULT_SCALES_5", "CODE_SCALES_5", "DEFAULT_MAX_SIZE", "PAPER_TARGET",
           "CODE_TARGET", "SCALE_RULES", "named_scales", "scale_factors", "choose_scale", "select_scales",
           "pooled_window_features", "as_boxes_tensor"]

#: 1-scale testing: shorter side 688 (paper, Sec. 4.2).
DEFAULT_SCALES_1: tuple[int, ...] = (688,)
#: 5-scale: the paper's {480, 576, 688, 864, 1200}; the official code uses 874 for 864.
DEFAULT_SCALES_5: tuple[int, ...] = (480, 576, 688, 864, 1200)
CODE_SCALES_5: tuple[int, ...] = (480, 576, 688, 874, 1200)
#: Cap on the longer side after resizing. Neither the paper nor the code caps the size (the code
#: only falls back to the CPU above 1200x2400x3 input values); 2000 keeps every VOC image at
#: every paper scale untouched (500x375 at s=1200 is 1200x1600) and bounds a 3160x4605 photo,
#: or a panorama, to a conv map of at most 125 cells per side.
DEFAULT_MAX_SIZE: int = 2000
#: The paper picks the scale whose window area is closest to 224^2 pixels.
PAPER_TARGET: int = 224
#: The code: sz_conv_standard * step_standard = 13 * 16 = 208 pixels (``spm_expected_scale.m``).
CODE_TARGET: int = 208
#: Rules a detector picks each window's scale with (training uses the same; docs/spp.md).
SCALE_RULES = ("area", "code")


def named_scales(text: str) -> tuple[int, ...]:
    """The tools' ``--scales``: "1" (the paper's 1-scale, 688), "5" (its 5 scales), "code5" (the
    official code's, 874 for 864), or a comma-separated list of shorter sides ("480,688")."""
    named = {"1": DEFAULT_SCALES_1, "5": DEFAULT_SCALES_5, "code5": CODE_SCALES_5}
    if text in named:
        return named[text]
    try:
        scales = tuple(int(s) for s in text.split(","))
    except ValueError:
        scales = ()
    if not scales or min(scales) <= 0:
        raise DetectionError(f"--scales {text!r}: use 1, 5, code5 or a comma-separated list of positive sizes")
    return scales



def scale_factors(height: int, width: int, scales: Sequence[int] = DEFAULT_SCALES_1,
                  max_size: int | None = DEFAULT_MAX_SIZE) -> list[float]:
    """Resize factor per scale: shorter side -> s, unless the longer side would exceed max_size.

    Args:
        height, width: original image size in pixels.
        scales: target shorter sides (e.g. :data:`DEFAULT_SCALES_5`).
        max_size: cap on the longer side after resizing (None: no cap).
    Returns:
        One float factor per scale (``Backbone.preprocess`` resizes to round(H*f) x round(W*f)).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    out = []
    for s in scales:
        f = float(s) / min(height, width)
        if max_size is not None and max(height, width) * f > max_size:
            f = float(max_size) / max(height, width)
        out.append(f)
    return out


def choose_scale(boxes_orig_px: torch.Tensor, factors: Sequence[float], target: int | None = None,
                 rule: str = "area") -> torch.Tensor:
    """Index of the scale to pool each window from.

    - ``"area"`` (paper, Sec. 4.2): the scale at which the window has a number of pixels closest
      to ``target^2`` (target 224): ``argmin_s |w*h*f_s^2 - target^2|``.
    - ``"code"`` (``utils/spm_pool/spm_expected_scale.m`` + ``spp_features_convX_to_poolX.m``): the
      expected shorter side ``208 * min_side / sqrt(w*h)`` and the scale nearest to it, i.e.
      ``argmin_s |f_s*sqrt(w*h) - 208|`` (comparing window sides linearly; the code also rounds
      the expected scale to an integer, which only moves exact ties).

    Ties go to the smaller scale index. Zero-area windows count as tiny (1e-6 px^2), so they go
    to the largest factor, the limit for windows shrinking to a point.

    Args:
        boxes_orig_px: Tensor[N, 4] boxes in original-image pixels (w = x2-x1, h = y2-y1).
        factors: per scale, its resize factor (:func:`scale_factors`).
        target: window side in pixels; default 224 ("area") or 208 ("code").
        rule: "area" or "code".
    Returns:
        LongTensor[N] of scale indices.
    """
    if rule not in ("area", "code"):
        raise ValueError(f"unknown scale rule {rule!r}: use 'area' or 'code'")
    if len(factors) == 0:
        raise ValueError("no scales to choose from")
    if target is None:
        target = PAPER_TARGET if rule == "area" else CODE_TARGET
    b = torch.as_tensor(boxes_orig_px).to(torch.float64).reshape(-1, 4)
    area = ((b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)).clamp(min=1e-6)[:, None]
    f = torch.as_tensor([float(v) for v in factors], dtype=torch.float64, device=b.device)[None, :]
    if rule == "area":
        dist = (area * f * f - float(target) ** 2).abs()
    else:
        dist = (area.sqrt() * f - float(target)).abs()
    return dist.argmin(dim=1)      # first minimum: the smaller index on ties


def select_scales(boxes: torch.Tensor, factors: Sequence[float], scale_rule: str | int = "area",
                  generator: torch.Generator | Sequence[torch.Generator] | None = None,
                  target: int | None = None) -> torch.Tensor:
    """Scale index for every window.

    Args:
        boxes: Tensor[N, 4] internal boxes in original-image pixels.
        factors: resize factor of each scale (scaled size = factor * original size).
        scale_rule: "area" — the scale at which the window's area is closest to ``target``²
            (the paper's best scale, used at test time; :func:`choose_scale`); "code" — the SPP
            code's rule (scaled window side closest to ``target``, default 208); "random" — a
            uniformly random scale per window (the SPP code's multi-scale fine-tuning);
            "random-image" — one random scale for all the windows (fine-tuning the conv layers:
            one differentiable conv pass per image); an int — that scale index for every window.
        generator: torch.Generator for the random rules (pass one: results are then reproducible),
            or for "random" one per window: each window's scale is then drawn from its own, the
            same whichever windows are pooled with it (fine-tuning shares an image's windows out
            over processes).
        target: window side the "area"/"code" rules aim at (default: :func:`choose_scale`'s,
            224 for "area", 208 for "code").
    Returns:
        LongTensor[N] of indices into ``factors``.
    """
    n, num_scales = len(boxes), len(factors)
    if num_scales == 0:
        raise ValueError("no scales")
    if isinstance(scale_rule, (int, np.integer)) and not isinstance(scale_rule, bool):
        if not 0 <= int(scale_rule) < num_scales:
            raise ValueError(f"scale index {scale_rule} out of range for {num_scales} scales")
        return torch.full((n,), int(scale_rule), dtype=torch.long)
    if scale_rule in ("area", "code"):
        if num_scales == 1:
            return torch.zeros(n, dtype=torch.long)
        return torch.as_tensor(choose_scale(boxes, list(factors), target=target, rule=scale_rule),
                               dtype=torch.long).reshape(n)
    per_window = generator is not None and not isinstance(generator, torch.Generator)
    if per_window and len(generator) != n:
        raise ValueError(f"{len(generator)} generators for {n} windows: give one per window")
    if scale_rule == "random":
        if per_window:
            return torch.cat([torch.randint(num_scales, (1,), generator=g, dtype=torch.long) for g in generator]
                             ) if n else torch.zeros(0, dtype=torch.long)
        return torch.randint(num_scales, (n,), generator=generator, dtype=torch.long)
    if per_window and scale_rule == "random-image":
        raise ValueError("scale rule 'random-image' draws one scale per image: give one generator, not one per "
                         "window")
    if scale_rule == "random-image":
        return torch.full((n,), int(torch.randint(num_scales, (1,), generator=generator)), dtype=torch.long)
    raise ValueError(f"unknown scale_rule {scale_rule!r}: use 'area', 'code', 'random', 'random-image' or a "
                     "scale index")


def pooled_window_features(maps: Sequence[torch.Tensor | np.ndarray], factors: Sequence[float],
                           boxes: torch.Tensor | np.ndarray, stride: int,
                           levels: Sequence[int] = DEFAULT_LEVELS, rule: str = "paper",
                           scale_rule: str | int = "area", generator: torch.Generator | None = None,
                           device: torch.device | str | None = None,
                           scale_index: torch.Tensor | None = None,
                           first_cell_center: float = 0.5, scale_target: int | None = None) -> torch.Tensor:
    """SPP features of windows given the conv maps of one image at several scales.

    Each window is pooled from the map of one scale (see :func:`select_scales`): its box is
    multiplied by that scale's factor, projected onto the map (``pooling.project_boxes`` with
    ``rule``) and pooled into ``sum(n*n for n in levels)`` bins per channel. Windows are grouped
    by scale (one ``pooling.pool_windows`` call per scale) and returned in the input order.

    Args:
        maps: per scale, the conv map [C, H_k, W_k] (Tensor, or numpy array / memmap of any float
            dtype; fp16 maps are pooled in fp32, max pooling of fp16 values is exact); only the
            maps of scales some window uses are read.
        factors: per scale, the resize factor used to compute the map.
        boxes: [N, 4] internal (x1, y1, x2, y2) boxes in original-image pixels.
        stride: total stride of the trunk (16 for ZF-5).
        levels: pyramid levels.
        rule: window projection rule ("paper" or "code").
        scale_rule, generator, scale_target: see :func:`select_scales` (its ``target``).
        device: where to pool (default: the device of a tensor map, else CPU).
        scale_index: precomputed scale index per window (overrides ``scale_rule``).
        first_cell_center: image coordinate of conv cell 0's centre,
            ``Backbone.first_cell_center`` (0.5 for ZF-5; see ``pooling.project_boxes``).
    Returns:
        float32 Tensor[N, C * sum(n^2)] (C * 50 for the default levels).
    """

    if len(maps) != len(factors) or len(maps) == 0:
        raise ValueError(f"{len(maps)} maps but {len(factors)} scale factors")
    boxes_t = as_boxes_tensor(boxes)
    if scale_index is None:
        scale_index = select_scales(boxes_t, factors, scale_rule, generator, scale_target)
    scale_index = torch.as_tensor(scale_index, dtype=torch.long).reshape(-1)
    if len(scale_index) != len(boxes_t):
        raise ValueError(f"{len(scale_index)} scale indices for {len(boxes_t)} boxes")
    used = torch.unique(scale_index).tolist()
    first = maps[used[0] if used else 0]
    if device is None:
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    out = torch.zeros((len(boxes_t), pool5_dim(int(first.shape[0]), levels)), dtype=torch.float32, device=device)
    for k in used:
        sel = torch.nonzero(scale_index == k).flatten()
        fmap = _as_float_tensor(maps[k], device)
        scaled = boxes_t[sel] * float(factors[k])
        cells = project_boxes(scaled, stride, (int(fmap.shape[1]), int(fmap.shape[2])), rule=rule,
                              first_cell_center=first_cell_center)
        out[sel.to(device)] = pool_windows(fmap, cells.to(device), levels=tuple(levels)).to(torch.float32)
    return out


def _as_float_tensor(fmap: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    if isinstance(fmap, torch.Tensor):
        t = fmap
    else:
        # np.array copies out of a (read-only) memmap; torch.from_numpy needs a writable array.
        t = torch.from_numpy(np.array(fmap))
    return t.to(device=device, dtype=torch.float32)


def as_boxes_tensor(boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Boxes [N, 4] as a float64 CPU tensor (projection and scale choice are computed in float64)."""
    if isinstance(boxes, torch.Tensor):
        return boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    return torch.from_numpy(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
