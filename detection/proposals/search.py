"""Selective search (Uijlings et al., IJCV 2013) on one image, with OpenCV's implementation
(``cv2.ximgproc.segmentation``), and the settings that change its boxes.

Every box here is in the library's convention (:mod:`detection.boxes`): float32
``(x1, y1, x2, y2)``, 0-based, continuous, in ORIGINAL image pixels. Choices, and why:

* **Canonical size.** Selective search is not scale invariant: the graph segmentation's ``k`` is
  in pixel units, so the same photo at two sizes gives different boxes, and cost grows with the
  pixel count. R-CNN's later code resized every image to a fixed *width* of 500 px
  (``selective_search_boxes(im, fast_mode, im_width)``: "resize image to canonical dimensions
  since proposals aren't scale invariant"); its published VOC 2007 boxes were computed on the
  original images, whose LONGER side is 500 px for almost every VOC image. We resize so the
  longer side is ``resize_to`` (default 500, up or down): it reproduces VOC's native scale for
  both landscape and portrait images (a fixed width would upscale portrait VOC images 1.5x) and
  bounds the cost of multi-megapixel photos. ``resize_to=None`` segments at full resolution.
  Boxes are mapped back by the exact per-axis scale (continuous coordinates scale exactly).
* **Order and determinism.** OpenCV returns boxes sorted by a randomised hierarchy rank
  (``rand() * level``, as in the paper), with exact duplicates already removed. It draws from
  the C library's global ``rand()``, so the order depends on whatever ran before in the process.
  We call ``srand(seed)`` before every image, which makes the output a pure function of
  (image, settings): a resumed run and a run with any number of worker processes give identical
  boxes. If the C library cannot be found (non-glibc platforms) a warning is logged and the
  order is not reproducible.
* **Filtering.** Boxes are clipped to the image, rounded to whole pixels (they come from pixel
  masks; scaling back makes them fractional), boxes narrower or shorter than ``min_size``
  original pixels are dropped (R-CNN's ``FilterBoxesWidth`` with ``minBoxWidth = 20``), exact
  duplicates after rounding are removed keeping the first (highest priority), and the first
  ``max_boxes`` are kept (R-CNN / SPP-net use about 2,000).
* **Empty result.** If nothing survives (e.g. an image smaller than ``min_size``), the whole
  image box is returned and a warning is logged: downstream stages then still have a window to
  score, and an empty array never passes silently.
* **Fast vs quality.** OpenCV's "fast" mode uses HSV and Lab, k in {150, 300, 450} and two
  similarity strategies; "quality" adds three colour spaces and two strategies, k up to 750.
  (The MATLAB code used k in {50, 100} for fast mode; OpenCV's ``base_k``/``inc_k``/``sigma``
  are exposed for those who want to match it more closely.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
from typing import Any, Literal

import cv2
import numpy as np

from ..errors import DetectionError

__all__ = ["SelectiveSearchConfig", "selective_search", "xywh_to_internal"]

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class SelectiveSearchConfig:
    """Every setting that changes selective-search output (all of it goes into the cache key).

    Attributes:
        mode: ``"fast"`` (SPP-net / R-CNN) or ``"quality"`` (about 3-5x slower, more boxes).
        max_boxes: keep at most this many boxes, in OpenCV's priority order (R-CNN: ~2,000).
        resize_to: segment an image resized so its longer side has this many pixels (None: as is).
        min_size: drop boxes narrower or shorter than this many ORIGINAL-image pixels (R-CNN: 20).
        base_k, inc_k, sigma: OpenCV's graph-segmentation settings (its defaults: 150, 150, 0.8).
        seed: seed of the C ``rand()`` that OpenCV uses to randomise the box order.
    """

    mode: Literal["fast", "quality"] = "fast"
    max_boxes: int = 2000
    resize_to: int | None = 500
    min_size: int = 20
    base_k: int = 150
    inc_k: int = 150
    sigma: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("fast", "quality"):
            raise DetectionError(f"selective search mode must be 'fast' or 'quality', got {self.mode!r}")
        if self.max_boxes < 1:
            raise DetectionError(f"max_boxes must be >= 1, got {self.max_boxes}")
        if self.resize_to is not None and self.resize_to < 16:
            # Below ~16 px the segmentation has nothing left to group.
            raise DetectionError(f"resize_to must be >= 16 or None, got {self.resize_to}")
        if self.min_size < 0:
            raise DetectionError(f"min_size must be >= 0, got {self.min_size}")
        if self.base_k <= 0 or self.inc_k <= 0 or self.sigma < 0:
            raise DetectionError(f"bad segmentation settings: base_k={self.base_k}, inc_k={self.inc_k}, sigma={self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# selective search on one image


def _c_rand_seeder() -> Any | None:
    """``srand`` of the C library OpenCV's ``rand()`` draws from, or None if it cannot be found."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).srand
    except OSError:
        return None


def xywh_to_internal(rects: np.ndarray) -> np.ndarray:
    """OpenCV ``Rect`` rows ``(x, y, w, h)`` -> internal ``(x1, y1, x2, y2)``.

    A ``Rect`` covers pixel columns ``x .. x + w - 1``, i.e. the continuous interval
    ``[x, x + w)``, so ``x2 = x + w`` (no -1: internal boxes are continuous, see boxes.py).

    Args:
        rects: array[N, 4] ``(x, y, w, h)``.
    Returns:
        float32 array[N, 4].
    """
    r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(r)
    out[:, :2] = r[:, :2]
    out[:, 2:] = r[:, :2] + r[:, 2:]
    return out.astype(np.float32)


def _resize_longer_side(image: np.ndarray, target: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if target is None or max(h, w) == target:
        return image
    scale = target / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    # INTER_AREA averages when shrinking (no aliasing); INTER_LINEAR when enlarging.
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def _dedup_keep_first(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicate rows, keeping the first occurrence and the original order."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def selective_search(image_rgb: np.ndarray, config: SelectiveSearchConfig | None = None, **settings: Any) -> np.ndarray:
    """Selective-search proposals for one image (see the module docstring for every choice).

    Runs in the calling thread; OpenCV's own threading is left as the caller set it (the worker
    processes of :func:`compute_proposals` set ``cv2.setNumThreads(1)``). Seeds the C library's
    global ``rand()`` (OpenCV randomises the order with it).

    Args:
        image_rgb: uint8 array[H, W, 3], RGB (as :func:`detection.data.images.load_image` returns).
        config: every setting (default: :class:`SelectiveSearchConfig`'s defaults, their one home).
        **settings: fields of :class:`SelectiveSearchConfig` that replace those of ``config``
            (``mode``, ``max_boxes``, ``resize_to``, ``min_size``, ``base_k``, ``inc_k``,
            ``sigma``, ``seed``).
    Returns:
        float32 array[N, 4], 1 <= N <= max_boxes: internal ``(x1, y1, x2, y2)`` in original
        image pixels, integer-valued, inside ``[0, W] x [0, H]``, unique rows, in OpenCV's
        priority order. The whole-image box when nothing else survives (logged).
    """
    cfg = dataclasses.replace(config or SelectiveSearchConfig(), **settings)
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
        raise DetectionError(f"selective_search expects a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]

    small = _resize_longer_side(image, cfg.resize_to)
    # OpenCV's colour conversions (HSV, Lab) assume BGR channel order.
    bgr = np.ascontiguousarray(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if cfg.mode == "fast":
        ss.switchToSelectiveSearchFast(cfg.base_k, cfg.inc_k, cfg.sigma)
    else:
        ss.switchToSelectiveSearchQuality(cfg.base_k, cfg.inc_k, cfg.sigma)
    srand = _c_rand_seeder()
    if srand is None:
        logger.warning("C library not found: selective-search box order is not reproducible")
    else:
        srand(ctypes.c_uint(cfg.seed))
    rects = ss.process()

    boxes = xywh_to_internal(np.asarray(rects).reshape(-1, 4)).astype(np.float64)
    # Back to original pixels: each axis by its own exact ratio (rounding of the resized size
    # makes the two ratios differ slightly).
    boxes[:, [0, 2]] *= width / bgr.shape[1]
    boxes[:, [1, 3]] *= height / bgr.shape[0]
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    boxes = np.round(boxes)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= max(cfg.min_size, 1)) & ((boxes[:, 3] - boxes[:, 1]) >= max(cfg.min_size, 1))
    boxes = _dedup_keep_first(boxes[keep])[: cfg.max_boxes]
    if len(boxes) == 0:
        logger.warning("selective search found no box of at least %d px in a %dx%d image; "
                       "using the whole image box", cfg.min_size, width, height)
        boxes = np.array([[0.0, 0.0, width, height]])
    return boxes.astype(np.float32)
