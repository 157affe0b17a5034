"""The conv pass: one image through the trunk at every scale, in memory
(:func:`conv_maps_for_image`), and the step both it and the cache filling share
(:func:`forward_scales`: preprocessed inputs -> maps, with errors that name the image)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from ..data.records import ImageRecord
from ..errors import DetectionError
from .scales import scale_factors

__all__ = ["ImageConvMaps", "check_image", "conv_maps_for_image", "forward_scales", "image_name"]


@dataclasses.dataclass
class ImageConvMaps:
    """The conv maps of one image at every scale, in memory.

    Attributes:
        maps: per scale, Tensor[C, H_k, W_k] (float32), or None for a scale not computed.
        factors: per scale, the resize factor (scaled = factor * original pixels).
        stride: total stride of the trunk that made the maps.
        image_size: (height, width) of the original image.
        first_cell_center: image coordinate of conv cell 0's centre (``pooling.project_boxes``).
    """

    maps: list[torch.Tensor | None]
    factors: list[float]
    stride: int
    image_size: tuple[int, int]
    first_cell_center: float = 0.5


def image_name(record: ImageRecord | None, image: np.ndarray | None = None) -> str:
    """How messages name an image: its key and path, else its size."""
    if record is not None:
        return f"image {record.key} ({record.path})"
    return f"image of size {image.shape[1]}x{image.shape[0]}" if image is not None else "image"


def forward_scales(backbone: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device,
                    name: str) -> list[torch.Tensor]:
    """Run the trunk on each preprocessed input [1, 3, H', W'] -> list of maps [C, H, W] (float32).

    Raises DetectionError naming the image when the input is too small for the trunk.
    """
    maps = []
    for x in inputs:
        try:
            y = backbone(x.to(device, non_blocking=True))
        except (DetectionError, torch.cuda.OutOfMemoryError):
            raise
        except RuntimeError as e:  # e.g. "Output size is too small" from a pooling layer
            raise DetectionError(f"{name}: the conv trunk failed on the resized input of "
                                 f"{x.shape[-1]}x{x.shape[-2]} px: {str(e).splitlines()[0]}") from None
        if y.shape[0] != 1 or y.shape[-1] < 1 or y.shape[-2] < 1:
            raise DetectionError(f"{name}: empty conv map {tuple(y.shape)} for input {tuple(x.shape)}")
        maps.append(y[0].float())
    return maps


def check_image(image: np.ndarray) -> np.ndarray:
    """The image as an array, or a DetectionError unless it is uint8 RGB [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DetectionError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def conv_maps_for_image(backbone: torch.nn.Module, image: np.ndarray, scales: Sequence[int],
                        max_size: int, device: torch.device | str = "cpu", only: Sequence[int] | None = None,
                        differentiable: bool = False) -> ImageConvMaps:
    """Conv maps of one image at every scale (or the scales ``only``), in memory.

    Args:
        backbone: a ``detection.backbones.Backbone`` (uses ``preprocess``, ``forward``,
            ``stride``).
        image: uint8 array[H, W, 3] RGB.
        scales: shorter-side lengths, e.g. ``scales.DEFAULT_SCALES_1`` = (688,).
        max_size: cap on the longer side after resizing.
        device: where to run the trunk.
        only: indices of the scales to compute (default: all); the others' maps are None.
        differentiable: run the trunk as it is (its train/eval mode, gradients recorded), to
            fine-tune the conv layers; by default it runs in eval mode under
            ``torch.inference_mode``.
    Returns:
        ImageConvMaps with float32 maps on ``device``.
    """
    image = check_image(image)
    h, w = image.shape[:2]
    factors = [float(f) for f in scale_factors(h, w, tuple(scales), max_size)]
    wanted = list(range(len(factors))) if only is None else sorted({int(k) for k in only})
    device = torch.device(device)
    name = image_name(None, image)
    if differentiable:
        computed = forward_scales(backbone, [backbone.preprocess(image, factors[k]) for k in wanted], device, name)
    else:
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.inference_mode():
                inputs = [backbone.preprocess(image, factors[k]) for k in wanted]
                computed = forward_scales(backbone, inputs, device, name)
        finally:
            backbone.train(was_training)
    maps: list[torch.Tensor | None] = [None] * len(factors)
    for k, fmap in zip(wanted, computed):
        maps[k] = fmap
    return ImageConvMaps(maps=maps, factors=factors, stride=int(backbone.stride), image_size=(h, w),
                         first_cell_center=float(backbone.first_cell_center))
