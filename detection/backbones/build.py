"""Building a named backbone with its weights: seeded random init, torchvision's published
weights, or a state-dict file (strictly checked); and rebuilding the one an earlier stage
recorded (see the package docstring for the names)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import ModelError
from ..io.files import file_sha256
from ..io.paths import describe_missing
from ..model import torch_load_reason
from .backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from .efficientnet import (LITE_EXPANDED_NAMES, LITE_MEAN, LITE_NAMES, LITE_STD, efficientnet_lite, lite_base_name,
                           lite_trunk, packaged_weights_file, timm_state_dict)
from .layers import freeze_batchnorm, tf_same_padding
from .zf5 import ZF5

__all__ = ["available_backbones", "build_backbone", "rebuild_recorded_backbone"]

log = logging.getLogger(__name__)

_VGG_NAMES = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
_RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                 "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                 "wide_resnet50_2", "wide_resnet101_2")


_MOBILENET_NAMES = ("mobilenet_v2", "mobilenet_v2_tf")


def available_backbones() -> tuple[str, ...]:
    """Every name :func:`build_backbone` accepts."""
    return (("zf5", "alexnet", "squeezenet1_0", "squeezenet1_1") + _VGG_NAMES + _RESNET_NAMES + _MOBILENET_NAMES
            + LITE_NAMES + LITE_EXPANDED_NAMES)


def _torchvision_ctor(name: str):
    try:
        return torchvision.models.get_model_builder(name)
    except ValueError as e:
        raise ModelError(f"unknown backbone {name!r}: use one of {', '.join(available_backbones())}") from e


def _list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_state_dict_file(model: nn.Module, path: Path, name: str,
                          rename: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None) -> str:
    """Load a state-dict file strictly into ``model`` (its keys first passed through ``rename``);
    returns the weights id."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        raise ModelError(f"cannot read weights file {path}: {torch_load_reason(e)}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]         # a training checkpoint wrapping the state dict
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    if rename is not None:
        state = rename(state)
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
    """The full model (ZF5, torchvision or timm) with its weights, and the weights id."""
    base = lite_base_name(name)
    if base:
        return _make_lite(base, weights, seed)
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
    _check_weights_path(path, wstr, name, "" if enum_cls is None else
                        f", nor a torchvision weights name ({', '.join(enum_cls.__members__)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZF5() if is_zf5 else ctor(weights=None)
    return model, _load_state_dict_file(model, path, name)


def _check_weights_path(path: Path, wstr: str, name: str, hint: str) -> None:
    if not path.is_file():
        # A folder, a FIFO (torch.load would block on it forever), a broken link: not "no such file".
        if os.path.lexists(path):
            raise ModelError(f"weights file {path} for {name} {describe_missing(path)}")
        raise ModelError(f"weights {wstr!r} for {name}: no such file{hint}")


def _make_lite(name: str, weights: str | Path | None, seed: int) -> tuple[nn.Module, str]:
    """An EfficientNet-Lite (timm) with random weights, the installed package's ImageNet weights
    (``"imagenet"``/``"DEFAULT"``), or a state-dict file in timm's or efficientnet_pytorch's names."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = efficientnet_lite(name)
    if weights is None:
        return model, f"random:{seed}"
    wstr = str(weights)
    path = Path(wstr).expanduser()
    if wstr in ("imagenet", "DEFAULT"):
        path = packaged_weights_file(name)
    else:
        _check_weights_path(path, wstr, name, ", nor 'imagenet' (the installed package's weights)")
    stages = [len(stage) for stage in model.blocks]
    return model, _load_state_dict_file(model, path, name, lambda state: timm_state_dict(state, stages))


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
            member name (EfficientNet-Lite: the installed package's weights), or the path of a
            state-dict file of the full model.
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
        trunk = freeze_batchnorm(nn.Sequential(*model.features[:14], model.features[14].conv[0]))
        channels, input_size = 576, 224
        if name.endswith("_tf"):
            tf_same_padding(trunk)
    elif lite_base_name(name):
        # Stem + stages 0-4 (stride 16, 112 channels; ``_expanded``: and the next block's expansion conv);
        # the strided convs pad like TensorFlow ("SAME"), as the weights were trained. See
        # docs/spp.md for why the default trunk ends at 112 channels.
        trunk, channels = lite_trunk(model, expansion=name in LITE_EXPANDED_NAMES)
        trunk = freeze_batchnorm(trunk)
        input_size = int(model.pretrained_cfg["input_size"][-1])     # 224, 240, 260: R-CNN's warp size
        mean, std = LITE_MEAN, LITE_STD
    else:  # ResNet family: C4 trunk
        trunk = freeze_batchnorm(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                                model.layer1, model.layer2, model.layer3))
        channels, input_size = model.layer3[-1].conv1.in_channels, 224
    backbone = Backbone(name, trunk, channels, input_size, head, head_dim, weights_id, mean, std,
                        input_multiple=16 if name.endswith("_tf") or lite_base_name(name) else 1)
    if backbone.stride != 16:
        raise ModelError(f"{name} trunk has stride {backbone.stride}, expected 16")
    log.info("built backbone %s (%s): stride %d, %d channels, receptive field %d px",
             name, weights_id, backbone.stride, channels, backbone.receptive_field)
    return backbone.eval()
