"""Any-size batching: images at (nearly) their own aspect, grouped so that a batch needs no padding.

How buckets are formed: an image of ``w x h`` has the log aspect ``a = log(w / h)``, clipped to
``±log(max_aspect)``. Its bucket is ``k = round(a / step)``, and every image of bucket ``k`` is
resized to exactly the bucket's size: shorter side ``side``, longer side
``round(side * exp(|k| * step))`` (capped at ``side * max_aspect``). So all images of a bucket
have one size, a batch drawn from one bucket stacks without padding, and an image is stretched
by at most ``exp(step / 2)`` (5 % for the default step 0.1) away from its own aspect; only
images beyond ``max_aspect`` are squeezed further.

Each epoch the images of every bucket are shuffled and cut into batches of ``batch_size`` (the
last batch of a bucket may be smaller), and the batches of all buckets are shuffled together.

The alternative, ``pad``: random batches of images at their exact aspect, zero-padded (the mean
colour after normalisation) at the bottom/right to the largest height and width of the batch.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["bucket_shape", "own_shape", "bucket_batches", "random_batches", "pad_to_batch"]


def _log_aspect(width: int, height: int, max_aspect: float) -> float:
    limit = math.log(max_aspect)
    return min(max(math.log(width / height), -limit), limit)


def _shape(side: int, log_aspect: float, max_aspect: float) -> tuple[int, int]:
    long_side = int(round(side * min(math.exp(abs(log_aspect)), max_aspect)))
    return (side, long_side) if log_aspect >= 0 else (long_side, side)


def bucket_shape(width: int, height: int, side: int, step: float, max_aspect: float) -> tuple[int, int]:
    """(height, width) of the bucket of a ``width x height`` image (see the module docstring)."""
    k = round(_log_aspect(width, height, max_aspect) / step)
    return _shape(side, k * step, max_aspect)


def own_shape(width: int, height: int, side: int, max_aspect: float) -> tuple[int, int]:
    """(height, width) of the image resized to shorter side ``side`` at its own (clipped) aspect."""
    return _shape(side, _log_aspect(width, height, max_aspect), max_aspect)


def bucket_batches(shapes: Sequence[tuple[int, int]], batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Batches of indices, each from one bucket.

    Args:
        shapes: the bucket (height, width) of every image.
        batch_size: most images per batch.
        rng: this epoch's generator.
    Returns:
        Lists of indices into ``shapes``, every list holding images of one shape.
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, s in enumerate(shapes):
        groups[tuple(s)].append(i)
    batches = []
    for key in sorted(groups):                 # sorted: the plan does not depend on dict order
        idx = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[list[int]]:
    """A shuffled order of ``n`` items cut into batches."""
    order = rng.permutation(n).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def pad_to_batch(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensor[1, C, H_i, W_i] -> Tensor[N, C, max H, max W], zero-padded at the bottom/right."""
    h = max(int(t.shape[-2]) for t in tensors)
    w = max(int(t.shape[-1]) for t in tensors)
    return torch.cat([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors])
