"""Geometry of a conv trunk: stride, receptive field, centre of the first cell, minimum input,
and the map size for an input size, read off its conv and pool layers."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError
from .layers import Conv2dSame
from .zf5 import WithinChannelLRN

__all__ = ["TrunkGeometry", "trunk_geometry", "spatial_layers", "map_side"]

#: (kernel, stride, padding, dilation, ceil_mode) of one conv/pool layer; ceil_mode "same" for
#: a TF "SAME"-padded conv.
SpatialLayer = tuple[int, int, int, int, bool | str]


@dataclass(frozen=True)
class TrunkGeometry:
    """Geometry of a conv trunk along one axis (all our trunks are square-symmetric).

    Attributes:
        stride: total stride S (conv cell j+1 is S pixels right of cell j).
        receptive_field: side of one cell's receptive field in pixels.
        first_cell_center: continuous image coordinate (0-based, pixel i covers [i, i+1)) of the
            receptive-field centre of cell 0; cell j is centred at ``first_cell_center + S*j``.
        min_input_size: smallest input side giving a map of at least one cell.
    """

    stride: int
    receptive_field: int
    first_cell_center: float
    min_input_size: int


def spatial_layers(module: nn.Module) -> list[SpatialLayer]:
    """(kernel, stride, padding, dilation, ceil_mode) of every conv/pool along the main path,
    in forward order (a within-channel LRN counts as a size x size, stride-1 layer). ResNet ``downsample`` branches are skipped (they run in parallel with the
    block's own strided conv, not after it); SqueezeNet Fire's parallel 1x1 / 3x3 expands add
    nothing when walked in sequence (1x1, pad 0 and 3x3, pad 1 keep size and centre)."""
    layers: list[SpatialLayer] = []

    def first(v: int | tuple[int, ...]) -> int:
        return int(v[0] if isinstance(v, tuple) else v)

    def walk(m: nn.Module) -> None:
        for name, child in m.named_children():
            if name == "downsample":
                continue
            if isinstance(child, nn.Conv2d):
                if child.kernel_size[0] != child.kernel_size[1] or child.stride[0] != child.stride[1]:
                    raise ModelError(f"non-square conv layer {child} is not supported")
                k, s, d = first(child.kernel_size), first(child.stride), first(child.dilation)
                if isinstance(child, Conv2dSame):
                    # "same": output ceil(n/s); the geometry is that of a side divisible by the
                    # stride (Backbone.input_multiple guarantees it), padded d(k-1)+1-s in all,
                    # the smaller half at the top/left: 0 for a 3x3/2 conv, 1 for a 5x5/2 one.
                    layers.append((k, s, max(d * (k - 1) + 1 - s, 0) // 2, d, "same"))
                else:
                    layers.append((k, s, first(child.padding), d, False))
            elif isinstance(child, WithinChannelLRN):
                # its size x size neighbourhood widens the receptive field like a 3x3/1 conv
                layers.append((child.size, 1, child.size // 2, 1, False))
            elif isinstance(child, (nn.MaxPool2d, nn.AvgPool2d)):
                stride = child.stride if child.stride is not None else child.kernel_size
                dil = getattr(child, "dilation", 1)
                layers.append((first(child.kernel_size), first(stride), first(child.padding),
                               first(dil), bool(child.ceil_mode)))
            else:
                walk(child)

    walk(module)
    return layers


def map_side(size: int, layers: list[SpatialLayer]) -> int:
    """Map side for an input side, by PyTorch's conv/pool output-size formulas."""
    for k, s, p, d, ceil_mode in layers:
        if ceil_mode == "same":
            size = -(-size // s)
            continue
        span = size + 2 * p - d * (k - 1) - 1
        if span < 0:
            return 0
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1                       # PyTorch: the last window must start inside the input
        size = out
    return size


def trunk_geometry(trunk: nn.Module) -> TrunkGeometry:
    """Stride, receptive field, first-cell centre and minimum input size of a conv trunk."""
    layers = spatial_layers(trunk)
    jump, rf, center = 1, 1, 0.0           # center: pixel *index* of cell 0's RF centre
    for k, s, p, d, _ in layers:
        # Output cell j covers input indices [s*j - p, s*j - p + d*(k-1)].
        rf += d * (k - 1) * jump
        center += (d * (k - 1) / 2.0 - p) * jump
        jump *= s
    min_size = 1
    while map_side(min_size, layers) < 1:
        min_size += 1
    return TrunkGeometry(stride=jump, receptive_field=rf, first_cell_center=center + 0.5,
                         min_input_size=min_size)
