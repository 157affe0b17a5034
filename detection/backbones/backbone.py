"""A conv trunk plus its pretrained fc6/fc7 (:class:`Backbone`), with the facts SPP-net needs
about them (stride, receptive field, first cell centre) and the image preprocessing."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DetectionError
from .geometry import map_side, spatial_layers, trunk_geometry

__all__ = ["Backbone", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

#: torchvision's ImageNet normalisation of RGB values in [0, 1] (all its classification models).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """A conv trunk plus its pretrained fc6/fc7, with the facts SPP-net needs about them.

    Attributes:
        name: backbone name (``build_backbone`` argument).
        trunk: image Tensor[N, 3, H, W] (normalised) -> conv map Tensor[N, C, H', W'].
        stride: total stride (16 for every built-in trunk).
        out_channels: C.
        mean, std: per-channel RGB normalisation of values in [0, 1].
        input_size: the network's classification input side (224; 227 for AlexNet), what
            R-CNN warps every window to.
        head: fc6 + fc7 taking a flattened ``C*6*6`` pool5 vector (torchvision order C, 6, 6),
            or None when the model has none.
        head_dim: output size of ``head`` (4096) or None.
        weights_id: "random:<seed>", "torchvision:<enum>" or "sha256:<hex of the file>".
        receptive_field: receptive field of one conv cell, in pixels.
        first_cell_center: continuous image coordinate of cell 0's receptive-field centre (0.5 for
            ZF-5: pixel 0's centre); pass it to ``detection.features.pooling.project_boxes(first_cell_center=...)``.
        min_input_size: smallest image side that gives a non-empty conv map.
        input_multiple: ``preprocess`` pads the image at the bottom/right (with the mean colour)
            to a multiple of this (16 for TF "SAME"-padded trunks, 1 otherwise); the map keeps
            ``map_size`` of the unpadded image, as "SAME" convs give ``ceil(n / 16)`` either way.
    """

    def __init__(self, name: str, trunk: nn.Module, out_channels: int, input_size: int,
                 head: nn.Module | None, head_dim: int | None, weights_id: str,
                 mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD, input_multiple: int = 1) -> None:
        super().__init__()
        self.name = name
        self.input_multiple = int(input_multiple)
        self.trunk = trunk
        self.head = head
        self.head_dim = head_dim
        self.out_channels = int(out_channels)
        self.input_size = int(input_size)
        self.weights_id = weights_id
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        geo = trunk_geometry(trunk)
        self.stride = geo.stride
        self.receptive_field = geo.receptive_field
        self.first_cell_center = geo.first_cell_center
        self.min_input_size = geo.min_input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tensor[N, 3, H, W] normalised images -> conv map Tensor[N, C, ceil-ish(H/16), ...]."""
        return self.trunk(x)

    def map_size(self, height: int, width: int) -> tuple[int, int]:
        """Conv map (H', W') for an input of (height, width), without running the trunk."""
        layers = spatial_layers(self.trunk)
        return map_side(int(height), layers), map_side(int(width), layers)

    def preprocess(self, image: np.ndarray, scale_factor: float) -> torch.Tensor:
        """Resize and normalise one image for the trunk.

        Args:
            image: uint8 array[H, W, 3], RGB.
            scale_factor: resize factor f; the output is ``round(H*f) x round(W*f)``
                (cv2.resize, bilinear, like the official code's imresize without antialiasing).
        Returns:
            float32 Tensor[1, 3, round(H*f), round(W*f)] on the CPU.
        Raises:
            DetectionError: the image is not HxWx3 uint8, or the resized image is smaller than
                ``min_input_size`` (the conv map would be empty).
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise DetectionError(f"expected a uint8 HxWx3 RGB image, got {desc}")
        h, w = image.shape[:2]
        new_h, new_w = int(round(h * scale_factor)), int(round(w * scale_factor))
        if min(new_h, new_w) < self.min_input_size:
            raise DetectionError(
                f"image of {w}x{h} px resized by {scale_factor:.4g} to {new_w}x{new_h} is smaller than "
                f"{self.name}'s minimum input side {self.min_input_size} px (its conv map would be "
                f"empty); use a larger scale or drop the image")
        if min(new_h, new_w) < self.receptive_field:
            log.debug("resized image %dx%d is smaller than the %d px receptive field of %s",
                      new_w, new_h, self.receptive_field, self.name)
        if (new_h, new_w) != (h, w):
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        # np.array copies: decoded images may be read-only, which torch.from_numpy warns about.
        x = torch.from_numpy(np.array(image, dtype=np.uint8, order="C")).permute(2, 0, 1).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        x = ((x - mean) / std).unsqueeze(0)
        m = self.input_multiple
        if m > 1 and (new_h % m or new_w % m):
            x = F.pad(x, (0, -new_w % m, 0, -new_h % m))     # zero = the mean colour after normalising
        return x.contiguous()

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, stride={self.stride}, out_channels={self.out_channels}, "
                f"receptive_field={self.receptive_field}, weights_id={self.weights_id!r}")
