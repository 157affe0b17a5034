"""The one box convention of the library, and conversions at its edges.

Inside the library every box is ``(x1, y1, x2, y2)`` in 0-based, continuous, float pixel
coordinates: pixel column ``i`` (0-based) covers ``[i, i + 1)``, so a box that covers columns
``a..b`` inclusive is ``x1 = a, x2 = b + 1`` and its width is ``x2 - x1``.

PASCAL VOC (XML annotations, devkit result files) and R-CNN's published selective-search boxes
use 1-based *inclusive* pixel indices: ``xmin..xmax`` covers pixels ``xmin - 1 .. xmax - 1``
(0-based), i.e. the continuous interval ``[xmin - 1, xmax)``. Hence the conversion below:
subtract 1 from the minimum corner only. With it, IoU in our convention equals the devkit's
IoU with its "+1" areas exactly.
"""
from __future__ import annotations

import numpy as np
import numpy.typing
import torch
from torchvision.ops import box_area, box_iou, clip_boxes_to_image, remove_small_boxes

__all__ = [
    "voc_to_internal",
    "internal_to_voc",
    "flip_boxes",
    "box_iou",
    "box_iou_numpy",
    "box_area",
    "clip_boxes_to_image",
    "remove_small_boxes",
    "valid_boxes_mask",
]


def voc_to_internal(boxes: np.ndarray, dtype: np.typing.DTypeLike = np.float32) -> np.ndarray:
    """1-based inclusive VOC ``(xmin, ymin, xmax, ymax)`` -> internal 0-based continuous boxes.

    Args:
        boxes: array[N, 4] of VOC pixel indices.
        dtype: output type; float64 keeps fractional coordinates read from result files exact
            enough for the evaluation's IoU > 0.5 test.
    Returns:
        array[N, 4] (float32 by default) ``(xmin - 1, ymin - 1, xmax, ymax)``.
    """
    out = np.asarray(boxes, dtype=dtype).reshape(-1, 4).copy()
    out[:, :2] -= 1.0
    return out


def internal_to_voc(boxes: np.ndarray) -> np.ndarray:
    """Internal 0-based continuous boxes -> 1-based inclusive VOC coordinates (float).

    Inverse of :func:`voc_to_internal`. Values are not rounded: the devkit reads floats.
    """
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, :2] += 1.0
    return out


def flip_boxes(boxes: np.ndarray | torch.Tensor, width: float) -> np.ndarray | torch.Tensor:
    """Mirror boxes horizontally in an image of the given width (``x -> width - x``)."""
    if isinstance(boxes, torch.Tensor):
        out = boxes.clone()
    else:
        out = np.array(boxes, copy=True)
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between every box of ``a`` (array[N, 4]) and ``b`` (array[M, 4]) -> array[N, M].

    numpy twin of :func:`torchvision.ops.box_iou` for code that stays in numpy (float64 math).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def valid_boxes_mask(boxes: np.ndarray, width: float | None = None, height: float | None = None) -> np.ndarray:
    """Boolean mask of boxes that are finite, have positive width and height and (when a size
    is given) overlap the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ok = np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if width is not None:
        ok &= (boxes[:, 2] > 0) & (boxes[:, 0] < width)
    if height is not None:
        ok &= (boxes[:, 3] > 0) & (boxes[:, 1] < height)
    return ok
