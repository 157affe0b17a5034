"""The training regimes: what each epoch feeds the network (paper Sec. 2.4).

- ``single``: each image resized to shorter side ``resize`` (256), a ``crop`` (224) square at
  the centre or one of the four corners (drawn per image and epoch), randomly flipped.
- ``multi``: the same crops, resized to ``sizes[epoch % len(sizes)]``: 224 in even epochs, 180
  in odd ones by default; the 180 input is the 224 crop resized (same content, lower
  resolution), as in the paper.
- ``any``: each image at its own aspect, shorter side ``any_side``, batched by aspect buckets
  (:mod:`.buckets`) or padded (``batching: pad``).

An epoch's plan (:func:`plan_epoch`) depends only on the seed, the epoch and the image sizes,
so every rank under ``torchrun`` computes the same plan and takes its share of each batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from .buckets import bucket_batches, bucket_shape, own_shape, random_batches
from .config import TrainConfig

__all__ = ["Item", "Batch", "CROP_POSITIONS", "epoch_input_side", "plan_epoch", "crop_at", "make_input",
           "base_side"]

#: The paper's five crop positions: centre, top-left, top-right, bottom-left, bottom-right.
CROP_POSITIONS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a batch: its index, crop position (index into CROP_POSITIONS), flip."""

    index: int
    position: int
    flip: bool


@dataclasses.dataclass(frozen=True)
class Batch:
    """Images fed together. ``shape``: the (height, width) of every input; None when each image
    keeps its own shape and the batch is padded (``batching: pad``)."""

    items: tuple[Item, ...]
    shape: tuple[int, int] | None


def base_side(cfg: TrainConfig) -> int:
    """Shorter side images are kept at between epochs (cropped or bucketed from there)."""
    return cfg.any_side if cfg.regime == "any" else cfg.resize


def epoch_input_side(cfg: TrainConfig, epoch: int) -> int:
    """Input side of a crop regime in ``epoch``: ``crop`` (single) or ``sizes[epoch % len]`` (multi)."""
    return cfg.sizes[epoch % len(cfg.sizes)] if cfg.regime == "multi" else cfg.crop


def plan_epoch(cfg: TrainConfig, sizes: Sequence[tuple[int, int]], epoch: int) -> list[Batch]:
    """The batches of one epoch.

    Args:
        cfg: training settings.
        sizes: (width, height) of every training image, as stored.
        epoch: 0-based epoch.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    n = len(sizes)
    positions = rng.integers(0, len(CROP_POSITIONS), n)
    flips = rng.random(n) < 0.5 if cfg.flip else np.zeros(n, bool)

    def item(i: int) -> Item:
        return Item(i, int(positions[i]), bool(flips[i]))

    if cfg.regime != "any":
        side = epoch_input_side(cfg, epoch)
        return [Batch(tuple(item(i) for i in b), (side, side)) for b in random_batches(n, cfg.batch_size, rng)]
    if cfg.batching == "pad":
        return [Batch(tuple(item(i) for i in b), None) for b in random_batches(n, cfg.batch_size, rng)]
    shapes = [bucket_shape(w, h, cfg.any_side, cfg.aspect_step, cfg.max_aspect) for w, h in sizes]
    return [Batch(tuple(item(i) for i in b), shapes[b[0]]) for b in bucket_batches(shapes, cfg.batch_size, rng)]


def crop_at(image: np.ndarray, side: int, position: int) -> np.ndarray:
    """A ``side`` square of ``image`` (uint8 [H, W, 3], both sides >= side) at a CROP_POSITIONS index."""
    h, w = image.shape[:2]
    y = {0: (h - side) // 2, 1: 0, 2: 0, 3: h - side, 4: h - side}[position]
    x = {0: (w - side) // 2, 1: 0, 2: w - side, 3: 0, 4: w - side}[position]
    return image[y:y + side, x:x + side]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    shrink = height * width < h * w
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def make_input(image: np.ndarray, item: Item, shape: tuple[int, int] | None, cfg: TrainConfig) -> np.ndarray:
    """The uint8 input of one item.

    Args:
        image: the stored image, shorter side :func:`base_side`.
        item: crop position and flip.
        shape: the batch's (height, width); None: the image's own shape (padded batches).
        cfg: training settings.
    """
    if cfg.regime == "any":
        h, w = image.shape[:2]
        target = shape if shape is not None else own_shape(w, h, cfg.any_side, cfg.max_aspect)
        out = _resize(image, *target)
    else:
        out = crop_at(image, cfg.crop, item.position)
        out = _resize(out, *shape)          # multi-size: the same crop at another resolution
    if item.flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
