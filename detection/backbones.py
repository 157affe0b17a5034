"""Conv trunks (image -> conv map) with their pretrained fc6/fc7, and weights loading.

A :class:`Backbone` is what SPP-net needs from a classification network: the conv layers run
once on the whole image (``trunk``, total stride 16), and the fully connected layers that follow
pool5 (``head``, fc6 + fc7) are reused on the spatial-pyramid-pooled windows.

Names (:func:`build_backbone`):

- ``"zf5"`` — the paper's ZF-5 (conv1 96x7x7/2, LRN, pool 3x3/2, conv2 256x5x5/2, LRN,
  pool 3x3/2, conv3 384x3x3, conv4 384x3x3, conv5 256x3x3), with the appendix's padding of
  ``floor(p/2)`` in every layer, so conv cell ``j`` is centred on image pixel ``16 j`` and the
  paper's window projection holds without an offset. No pretrained weights exist in torchvision:
  random (seeded) init or a state-dict file.
- ``"alexnet"`` — torchvision AlexNet, ``features[:-1]`` (conv5 + ReLU, the final max pool is what
  SPP replaces): stride 16, 256 channels; head = pretrained fc6, fc7 (9216 = 256*6*6 inputs).
- ``"vgg11" ... "vgg19_bn"`` (``"vgg16"`` the usual one) — ``features`` up to the last conv's
  ReLU: stride 16, 512 channels; head = fc6, fc7 (25088 = 512*6*6 inputs).
- ``"squeezenet1_0"``, ``"squeezenet1_1"`` — the whole ``features`` (stride 16, 512 channels);
  no fc layers (head ``None``).
- ``"resnet18"`` ... ``"resnet152"``, ``"resnext*"``, ``"wide_resnet*"`` — stem + layer1..layer3
  (stride 16, the "C4" trunk of Faster R-CNN); head ``None``.
- ``"mobilenet_v2"`` — torchvision MobileNetV2 ``features[:14]`` plus the 1x1 expansion conv of
  block 14 (stride 16, 576 channels: where the MobileNetV2 paper attaches SSDLite at stride 16);
  head ``None``. ``"mobilenet_v2_tf"`` is the same trunk with TensorFlow's "SAME" padding in its
  stride-2 convs (:class:`Conv2dSame`), for weights trained in TensorFlow; its inputs are padded
  at the bottom/right to a multiple of 16 so that every strided conv sees an even side and the
  cell centres do not depend on the image size.

BatchNorm layers of the ResNet and MobileNetV2 trunks are frozen
(``torchvision.ops.FrozenBatchNorm2d``, as detection codebases do): fine-tuning through SPP uses
mini-batches of one or two images, whose statistics would ruin the pretrained ones.

Weights (``weights=``): ``None`` -> seeded random init (no global RNG side effects);
``"imagenet"``/``"DEFAULT"`` or a torchvision enum member name (``"IMAGENET1K_V1"``) ->
torchvision's weights API (needs internet or a filled torch hub cache); a path -> a state dict
of the *full* torchvision model (``torch.load(weights_only=True)``, strict).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import DetectionError, ModelError
from .io import describe_missing, file_sha256
from .model import torch_load_reason

__all__ = [
    "Backbone",
    "ZF5",
    "Conv2dSame",
    "tf_same_padding",
    "WithinChannelLRN",
    "TrunkGeometry",
    "trunk_geometry",
    "build_backbone",
    "rebuild_recorded_backbone",
    "available_backbones",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

log = logging.getLogger(__name__)

#: torchvision's ImageNet normalisation of RGB values in [0, 1] (all its classification models).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_VGG_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
_RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                 "wide_resnet50_2", "wide_resnet101_2")


_MOBILENET_NAMES = ("mobilenet_v2", "mobilenet_v2_tf")


def available_backbones() -> tuple[str, ...]:
    """Every name :func:`build_backbone` accepts."""
    return ("zf5", "alexnet", "squeezenet1_0", "squeezenet1_1") + _VGG_NAMES + _RESNET_NAMES + _MOBILENET_NAMES


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


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` of ``module`` replaced by a ``FrozenBatchNorm2d`` with its statistics
    and affine parameters (fixed buffers: train mode and optimisers leave them alone)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, eps=child.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key).detach())
                setattr(parent, name, frozen)
    return module


# --------------------------------------------------------------------------------------------
# ZF-5
# --------------------------------------------------------------------------------------------

class WithinChannelLRN(nn.Module):
    """Caffe's ``lrn`` with ``norm_region: WITHIN_CHANNEL``, as in the SPP_net ZF-5 model
    (``model-defs/Zeiler_conv5.prototxt``: local_size 3, alpha 5e-5, beta 0.75).

    ``y = x / (1 + alpha / size^2 * sum_{size x size window} x^2) ^ beta`` (zero padding).
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # avg_pool2d with count_include_pad divides by size^2, which is Caffe's alpha / n^2.
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x / (1.0 + self.alpha * mean_sq).pow(self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class ZF5(nn.Module):
    """The paper's ZF-5 conv trunk (Table 1 of the TPAMI paper, "ZF-5"), padded ``floor(p/2)``.

    The official code's prototxt pads conv1 by 1 and nothing else (and compensates with
    ``offset0 = 21`` in the window projection); the paper's appendix pads every layer by
    ``floor(p/2)``, which makes the conv5 map ``ceil(H/16) x ceil(W/16)`` and cell ``j`` centred on
    pixel ``16 j``. We follow the paper. ``features`` holds the layers so that state-dict keys look
    like torchvision's (``features.0.weight``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=3),      # conv1
            nn.ReLU(inplace=True),
            WithinChannelLRN(),                                         # norm1
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),           # pool1
            nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=2),     # conv2
            nn.ReLU(inplace=True),
            WithinChannelLRN(),                                         # norm2
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),           # pool2
            nn.Conv2d(256, 384, kernel_size=3, padding=1),              # conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),              # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),              # conv5
            nn.ReLU(inplace=True),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init keeps activations from vanishing through 5 ReLU layers, so random
                # ZF-5 features are usable for tests; the Caffe model used N(0, 0.01) and
                # ImageNet pre-training, which we cannot reproduce here.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --------------------------------------------------------------------------------------------
# Geometry: stride, receptive field, centre of the first cell, minimum input
# --------------------------------------------------------------------------------------------

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


def _spatial_layers(module: nn.Module) -> list[tuple[int, int, int, int, bool | str]]:
    """(kernel, stride, padding, dilation, ceil_mode) of every conv/pool along the main path,
    in forward order (a within-channel LRN counts as a size x size, stride-1 layer). ResNet ``downsample`` branches are skipped (they run in parallel with the
    block's own strided conv, not after it); SqueezeNet Fire's parallel 1x1 / 3x3 expands add
    nothing when walked in sequence (1x1, pad 0 and 3x3, pad 1 keep size and centre)."""
    layers: list[tuple[int, int, int, int, bool | str]] = []

    def first(v: int | tuple[int, ...]) -> int:
        return int(v[0] if isinstance(v, tuple) else v)

    def walk(m: nn.Module) -> None:
        for name, child in m.named_children():
            if name == "downsample":
                continue
            if isinstance(child, nn.Conv2d):
                if child.kernel_size[0] != child.kernel_size[1] or child.stride[0] != child.stride[1]:
                    raise ModelError(f"non-square conv layer {child} is not supported")
                # "same": output ceil(n/s); the geometry is that of an even side (0 padding at
                # the top/left), which Backbone.input_multiple guarantees.
                layers.append((first(child.kernel_size), first(child.stride), first(child.padding),
                               first(child.dilation), "same" if isinstance(child, Conv2dSame) else False))
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


def _out_size(size: int, layers: list[tuple[int, int, int, int, bool | str]]) -> int:
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
    layers = _spatial_layers(trunk)
    jump, rf, center = 1, 1, 0.0           # center: pixel *index* of cell 0's RF centre
    for k, s, p, d, _ in layers:
        # Output cell j covers input indices [s*j - p, s*j - p + d*(k-1)].
        rf += d * (k - 1) * jump
        center += (d * (k - 1) / 2.0 - p) * jump
        jump *= s
    min_size = 1
    while _out_size(min_size, layers) < 1:
        min_size += 1
    return TrunkGeometry(stride=jump, receptive_field=rf, first_cell_center=center + 0.5,
                         min_input_size=min_size)


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------

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
            ZF-5: pixel 0's centre); pass it to ``spp.project_boxes(first_cell_center=...)``.
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
        layers = _spatial_layers(self.trunk)
        return _out_size(int(height), layers), _out_size(int(width), layers)

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


# --------------------------------------------------------------------------------------------
# Building and weights
# --------------------------------------------------------------------------------------------

def _torchvision_ctor(name: str):
    try:
        return torchvision.models.get_model_builder(name)
    except ValueError as e:
        raise ModelError(f"unknown backbone {name!r}: use one of {', '.join(available_backbones())}") from e


def _list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_state_dict_file(model: nn.Module, path: Path, name: str) -> str:
    """Load a state-dict file strictly into ``model``; returns the weights id."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        raise ModelError(f"cannot read weights file {path}: {torch_load_reason(e)}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]         # a training checkpoint wrapping the state dict
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]   # keys may be ints, ...
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape (file vs model: {_list(shapes, 3)})")
        raise ModelError(f"weights file {path} does not fit {name}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)   # casts e.g. fp16 files to the model's fp32
    except RuntimeError as e:   # a sparse or meta tensor cannot be copied into a parameter
        raise ModelError(f"weights file {path} does not fit {name}: {' '.join(str(e).split())[:300]}") from None
    return f"sha256:{file_sha256(path)}"


def _make_model(name: str, weights: str | Path | None, seed: int) -> tuple[nn.Module, str]:
    """The full model (ZF5 or torchvision) with its weights, and the weights id."""
    is_zf5 = name == "zf5"
    tv_name = name.removesuffix("_tf")      # the TF-padded MobileNetV2 is torchvision's model
    ctor = ZF5 if is_zf5 else _torchvision_ctor(tv_name)
    if weights is None:
        # fork_rng restores the global CPU RNG afterwards: building a model never changes the
        # random stream of the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ZF5() if is_zf5 else ctor(weights=None)
        return model, f"random:{seed}"
    wstr = str(weights)
    path = Path(wstr).expanduser()
    enum_cls = None if is_zf5 else torchvision.models.get_model_weights(tv_name)
    if wstr in ("imagenet", "DEFAULT") or (enum_cls is not None and wstr in enum_cls.__members__ and not path.exists()):
        if enum_cls is None:
            raise ModelError(f"no pretrained weights are published for {name}; pass --weights PATH "
                             f"to a state-dict file or use random init")
        if name.endswith("_tf"):
            raise ModelError(f"{name} pads like TensorFlow, for TensorFlow-trained weights files; torchvision's "
                             f"{tv_name} weights were trained with its own padding: use --backbone {tv_name}")
        enum = enum_cls.DEFAULT if wstr in ("imagenet", "DEFAULT") else enum_cls[wstr]
        try:
            model = ctor(weights=enum)
        except Exception as e:  # noqa: BLE001 - URLError, OSError, RuntimeError (hash) ...
            raise ModelError(
                f"could not get torchvision weights {enum} for {name} ({type(e).__name__}: {e}); "
                f"without internet, download {enum.url} elsewhere and pass --weights PATH") from e
        return model, f"torchvision:{enum}"
    if not path.is_file():
        # A folder, a FIFO (torch.load would block on it forever), a broken link: not "no such file".
        if os.path.lexists(path):
            raise ModelError(f"weights file {path} for {name} {describe_missing(path)}")
        hint = "" if enum_cls is None else f", nor a torchvision weights name ({', '.join(enum_cls.__members__)})"
        raise ModelError(f"weights {wstr!r} for {name}: no such file{hint}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZF5() if is_zf5 else ctor(weights=None)
    return model, _load_state_dict_file(model, path, name)


def rebuild_recorded_backbone(name: str, weights: str | None, seed: int, weights_id: str, recorded_in: str) -> Backbone:
    """The backbone an earlier stage recorded (``recorded_in``, e.g. a features summary), checked
    against the weights id it recorded: a weights file that is gone or has changed since is
    refused with a message saying so, instead of silently giving other features.

    Raises:
        ModelError: the weights cannot be loaded, or they are not the recorded ones.
    """
    try:
        backbone = build_backbone(name, weights=weights, seed=seed)
    except ModelError as e:
        raise ModelError(f"the conv maps of {recorded_in} need backbone {name} with weights {weights!r}, which "
                         f"cannot be loaded now: {e}") from None
    if backbone.weights_id != weights_id:
        raise ModelError(f"the conv maps of {recorded_in} were computed with weights {weights_id}, but "
                         f"{weights!r} (seed {seed}) gives {backbone.weights_id}: the file changed since, or "
                         "other --weights/--seed were given; rerun the earlier stage")
    return backbone


def build_backbone(name: str, weights: str | Path | None = None, seed: int = 0) -> Backbone:
    """Build a named backbone (see the module docstring) in eval mode.

    Args:
        name: "zf5", "alexnet", "vgg16" (any vgg*), "squeezenet1_0", "squeezenet1_1", "resnet50" ...
        weights: None (random init from ``seed``), "imagenet" / "DEFAULT" / a torchvision enum
            member name, or the path of a state-dict file of the full model.
        seed: seed of the random init (also used for layers a weights file does not cover: none,
            since loading is strict).
    Returns:
        A :class:`Backbone` on the CPU, in eval mode.
    Raises:
        ModelError: unknown name, unreadable / mismatched weights file, download failure.
    """
    if name not in available_backbones():
        raise ModelError(f"unknown backbone {name!r}: use one of {', '.join(available_backbones())}")
    model, weights_id = _make_model(name, weights, seed)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    head: nn.Module | None = None
    head_dim: int | None = None
    if name == "zf5":
        trunk, channels, input_size = model.features, 256, 224
    elif name == "alexnet":
        # Drop the final max pool (pool5): SPP takes its place. Stride 4 * 2 * 2 = 16.
        trunk, channels, input_size = model.features[:-1], 256, 227
        head, head_dim = model.classifier[:-1], 4096     # dropout, fc6, relu, dropout, fc7, relu
    elif name.startswith("vgg"):
        trunk, channels, input_size = model.features[:-1], 512, 224   # up to conv5_3 + ReLU
        head, head_dim = model.classifier[:-1], 4096     # fc6, relu, dropout, fc7, relu, dropout
    elif name.startswith("squeezenet"):
        trunk, channels, input_size = model.features, 512, 224
    elif name.startswith("mobilenet"):
        # Blocks 0-13 (stride 16, 96 channels) and block 14's expansion conv + BN + ReLU6.
        trunk = _freeze_batchnorm(nn.Sequential(*model.features[:14], model.features[14].conv[0]))
        channels, input_size = 576, 224
        if name.endswith("_tf"):
            tf_same_padding(trunk)
    else:  # ResNet family: C4 trunk
        trunk = _freeze_batchnorm(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                                model.layer1, model.layer2, model.layer3))
        channels, input_size = model.layer3[-1].conv1.in_channels, 224
    backbone = Backbone(name, trunk, channels, input_size, head, head_dim, weights_id, mean, std,
                        input_multiple=16 if name.endswith("_tf") else 1)
    if backbone.stride != 16:
        raise ModelError(f"{name} trunk has stride {backbone.stride}, expected 16")
    log.info("built backbone %s (%s): stride %d, %d channels, receptive field %d px",
             name, weights_id, backbone.stride, channels, backbone.receptive_field)
    return backbone.eval()

