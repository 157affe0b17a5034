"""The R-CNN baseline: crop every window (with context padding), warp it to the network's input
size and run the whole conv trunk on each crop.

Crops are made on the device in one batched op: ``torchvision.ops.roi_align`` with an output of
``size x size`` samples each (padded) window on a regular grid with bilinear interpolation, which
is R-CNN's anisotropic warp. Parts of a padded window outside the image read zeros of the
*normalised* image, i.e. the mean colour, as R-CNN fills them with the mean.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchvision.ops import roi_align

from .pooling import spatial_pyramid_pool
from ..timer import NO_TIMER, Timer

__all__ = ["CONTEXT_PADDING", "context_padded_boxes", "warp_windows", "rcnn_window_features"]

#: R-CNN's context: 16 pixels around the window in the warped (input-size) frame.
CONTEXT_PADDING = 16


def context_padded_boxes(boxes: torch.Tensor, size: int, padding: int = CONTEXT_PADDING) -> torch.Tensor:
    """Grow each box about its centre so that, once warped to ``size``, the original box fills
    the central ``size - 2 * padding`` pixels (R-CNN's ``context_padding``)."""
    if size <= 2 * padding:
        # A negative or infinite scale below would turn boxes inside out silently.
        raise ValueError(f"warp size {size} leaves no room inside a context padding of {padding} px")
    scale = size / float(size - 2 * padding)
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
    hw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * 0.5 * scale
    hh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) * 0.5 * scale
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=1)


def warp_windows(image: torch.Tensor, boxes: torch.Tensor, size: int, padding: int = CONTEXT_PADDING) -> torch.Tensor:
    """Warped crops of every window.

    Args:
        image: normalised image Tensor[1, 3, H, W].
        boxes: Tensor[N, 4] internal boxes in the image's pixels.
        size: output side (the network's input size: 224 for ZF-5, 227 for AlexNet).
        padding: context padding in output pixels.
    Returns:
        Tensor[N, 3, size, size].
    """
    padded = context_padded_boxes(boxes.to(image.dtype), size, padding)
    rois = torch.cat([padded.new_zeros((len(padded), 1)), padded], dim=1)
    # sampling_ratio=1: one bilinear sample per output pixel, i.e. a plain warp.
    return roi_align(image, rois.to(image.device), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=1, aligned=True)


def rcnn_window_features(trunk: torch.nn.Module, image: torch.Tensor, boxes: torch.Tensor, size: int,
                         levels: Sequence[int], batch_size: int = 128, timer: Timer = NO_TIMER) -> torch.Tensor:
    """R-CNN pool5 features: the trunk runs on every warped window; the crop's conv map is pooled
    with the same pyramid as SPP-net so the fc / SVM recipe on top is the same.

    ``timer`` bills the warping and pooling to stage "pool" and the trunk to "conv".

    Returns:
        Tensor[N, C * sum(n*n)].
    """
    out = []
    for start in range(0, len(boxes), batch_size):
        with timer.stage("pool"):
            crops = warp_windows(image, boxes[start:start + batch_size], size)
        with timer.stage("conv"):
            fmap = trunk(crops)
        with timer.stage("pool"):
            # The bins every SPP-net window is pooled with, so one fc head serves both methods.
            out.append(spatial_pyramid_pool(fmap, tuple(levels), bins="adaptive"))
    if not out:
        return image.new_zeros((0, 0))
    return torch.cat(out)
