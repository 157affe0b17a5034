"""Layers the torchvision trunks need for detection: TensorFlow's "SAME" padding in strided convs
(:class:`Conv2dSame`, for TF-trained MobileNetV2 weights) and frozen BatchNorm (fine-tuning
through SPP uses mini-batches of one or two images, whose statistics would ruin the
pretrained ones)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import BatchNormAct2d, freeze_batch_norm_2d
from torch import nn

__all__ = ["Conv2dSame", "tf_same_padding", "freeze_batchnorm"]


class Conv2dSame(nn.Conv2d):
    """A conv with TensorFlow's "SAME" padding: output side ``ceil(n / stride)``, the total
    padding ``max((out - 1) * stride + (k - 1) * dilation + 1 - n, 0)`` split with the smaller
    half at the top/left (a stride-2 3x3 conv on an even side pads 0 before and 1 after, where
    torchvision pads 1 on both sides). Same parameters (and state-dict keys) as ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def tf_same_padding(features: nn.Module) -> None:
    """Replace every strided conv of ``features`` by a :class:`Conv2dSame` sharing its weights."""
    for parent in list(features.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and max(child.stride) > 1:
                same = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                  child.dilation, child.groups, child.bias is not None)
                same.weight, same.bias = child.weight, child.bias
                setattr(parent, name, same)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` replaced by a ``FrozenBatchNorm2d`` with its statistics
    and affine parameters (fixed buffers: train mode and optimisers leave them alone); timm's
    ``BatchNormAct2d`` (BatchNorm followed by its activation, same keys) by timm's
    ``FrozenBatchNormAct2d``, which keeps the activation."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                setattr(parent, name, freeze_batch_norm_2d(child))
            elif isinstance(child, nn.BatchNorm2d):
                frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(parent, name, frozen)
    return module
