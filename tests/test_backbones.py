"""Tests of detection.backbones: geometry (stride, receptive field, cell centres), seeded init,
preprocessing, weights loading and its error messages."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.layers import FrozenBatchNormAct2d

from detection.backbones import Backbone, build_backbone, trunk_geometry
from detection.backbones.efficientnet import imagenet_classifier, packaged_weights_file, timm_state_dict
from detection.data.images import load_image
from detection.data.voc import VOCDataset
from detection.errors import DetectionError, ModelError
from detection.io.files import file_sha256

SHARED = Path(os.environ.get("SPP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
WEIGHTS = SHARED / "weights"
SQ10 = WEIGHTS / "squeezenet1_0-deepcompression.pth"
SQ11 = WEIGHTS / "squeezenet1_1-ncnn-fp16.pth"
MOBILENET = WEIGHTS / "mobilenet_v2-coral-quant.pth"
FRUIT = SHARED / "data" / "fruit" / "JPEGImages"


@pytest.fixture(scope="module")
def zf5() -> Backbone:
    return build_backbone("zf5")


@pytest.mark.parametrize("name, channels, center", [
    ("zf5", 256, 0.5), ("alexnet", 256, 15.5), ("vgg16", 512, 8.0),
    ("squeezenet1_0", 512, 17.5), ("squeezenet1_1", 512, 15.5), ("resnet18", 256, 0.5),
    ("resnet50", 1024, 0.5), ("mobilenet_v2", 576, 0.5),
    # TF "SAME" padding pads 0 before each of the 4 stride-2 convs: the centre moves 1+2+4+8 px.
    ("mobilenet_v2_tf", 576, 15.5),
    # EfficientNet-Lite: "SAME" too; its 5x5 stride-2 conv pads 1 before: 1 + 2 + (2-1)*4 + 8 px.
    ("efficientnet_lite0", 112, 15.5), ("efficientnet_lite1", 112, 15.5), ("efficientnet_lite2", 120, 15.5),
    # One 1x1 conv further: the same cells, 672 channels.
    ("efficientnet_lite0_expanded", 672, 15.5), ("efficientnet_lite2_expanded", 720, 15.5)])
def test_builtin_trunks_have_stride_16(name, channels, center):
    b = build_backbone(name)
    assert b.stride == 16 and b.out_channels == channels and b.first_cell_center == center
    assert not b.training
    with torch.inference_mode():
        for h, w in ((64, 96), (97, 130)):
            y = b(torch.randn(1, 3, h, w))
            assert y.shape[1] == channels
            assert tuple(y.shape[2:]) == b.map_size(h, w)
            # stride 16: the map grows by one cell per 16 input pixels
            assert b.map_size(h + 16, w + 32) == (y.shape[2] + 1, y.shape[3] + 2)


def test_zf5_map_is_ceil_of_size_over_16(zf5):
    # pad floor(p/2) everywhere: every layer maps n to ceil(n/2)
    for s in (1, 15, 16, 17, 688, 917, 1200):
        assert zf5.map_size(s, s) == (-(-s // 16),) * 2
    # 139 px from the convs and pools, + 2*2 + 2*8 from the 3x3 LRNs after conv1 and conv2
    assert zf5.receptive_field == 159 and zf5.min_input_size == 1
    layers = [type(m).__name__ for m in zf5.trunk]
    assert layers.count("Conv2d") == 5 and layers.count("WithinChannelLRN") == 2


@pytest.mark.parametrize("name, size, j", [("zf5", 320, 8), ("alexnet", 320, 8), ("resnet18", 480, 15),
                                           ("mobilenet_v2", 640, 20), ("mobilenet_v2_tf", 640, 20),
                                           ("efficientnet_lite0", 640, 20), ("efficientnet_lite2", 640, 20),
                                           ("efficientnet_lite0_expanded", 640, 20)])
def test_receptive_field_and_cell_centre_from_gradients(name, size, j):
    """The input pixels that influence one cell: their extent is the receptive field and its
    middle is ``first_cell_center + 16 j``."""
    b = build_backbone(name, seed=1)
    x = torch.randn(1, 3, size, size, requires_grad=True)
    y = b(x)
    y[0, :, j, j].sum().backward()
    cols = torch.nonzero(x.grad[0].abs().sum(dim=(0, 1)) > 0).flatten()
    lo, hi = int(cols.min()), int(cols.max()) + 1          # continuous extent [lo, hi)
    assert hi - lo == b.receptive_field
    assert (lo + hi) / 2 == b.first_cell_center + 16 * j


def test_geometry_of_unknown_layer_stack():
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.MaxPool2d(2))
    g = trunk_geometry(trunk)
    assert (g.stride, g.receptive_field, g.first_cell_center, g.min_input_size) == (4, 5, 2.5, 5)
    assert trunk(torch.zeros(1, 3, 5, 5)).shape[-1] == 1


def test_random_init_is_seeded_without_global_side_effects():
    state = torch.random.get_rng_state()
    a, b, c = build_backbone("zf5", seed=3), build_backbone("zf5", seed=3), build_backbone("zf5", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.trunk[0].weight, c.trunk[0].weight)
    assert a.weights_id == "random:3"


def test_heads_take_flattened_6x6_pool5():
    alex = build_backbone("alexnet")
    assert alex.input_size == 227 and alex.head_dim == 4096
    assert alex.head.eval()(torch.randn(2, 256 * 36)).shape == (2, 4096)
    assert build_backbone("squeezenet1_0").head is None


def test_preprocess_resizes_and_normalises(zf5):
    mean = np.array(zf5.mean) * 255
    image = np.tile(mean.round().astype(np.uint8), (375, 500, 1))
    x = zf5.preprocess(image, 688 / 375)
    assert x.shape == (1, 3, 688, round(500 * 688 / 375)) and x.dtype == torch.float32
    assert x.abs().max() < 0.01                       # the mean colour normalises to ~0
    gradient = np.zeros((4, 6, 3), dtype=np.uint8)
    gradient[:, :, 0] = np.arange(6) * 50
    y = zf5.preprocess(gradient, 1.0)
    np.testing.assert_allclose(y[0, 0, 0].numpy(), (np.arange(6) * 50 / 255 - zf5.mean[0]) / zf5.std[0], rtol=1e-6)


def test_preprocess_rejects_bad_and_too_small_images():
    alex = build_backbone("alexnet")
    assert alex.min_input_size == 31 and alex.map_size(30, 30) == (0, 0) and alex.map_size(31, 31) == (1, 1)
    with pytest.raises(DetectionError, match="minimum input side 31"):
        alex.preprocess(np.zeros((20, 400, 3), dtype=np.uint8), 1.5)
    assert alex.preprocess(np.zeros((21, 400, 3), dtype=np.uint8), 1.5).shape[2] == 32
    with pytest.raises(DetectionError, match="uint8 HxWx3"):
        alex.preprocess(np.zeros((20, 20), dtype=np.uint8), 1.0)
    with pytest.raises(DetectionError, match="uint8 HxWx3"):
        alex.preprocess(np.zeros((20, 20, 3), dtype=np.float32), 1.0)


def test_unknown_names_and_weights():
    with pytest.raises(ModelError, match="unknown backbone"):
        build_backbone("zf6")
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_backbone("zf5", weights="imagenet")
    with pytest.raises(ModelError, match="no such file"):
        build_backbone("alexnet", weights="/nonexistent/alexnet.pth")


def test_state_dict_roundtrip_and_mismatch_messages(tmp_path):
    src = build_backbone("zf5", seed=7)
    path = tmp_path / "zf5.pth"
    torch.save({f"features.{k}": v for k, v in src.trunk.state_dict().items()}, path)
    loaded = build_backbone("zf5", weights=path)
    assert loaded.weights_id.startswith("sha256:") and len(loaded.weights_id) == 7 + 64
    for k, v in src.trunk.state_dict().items():
        assert torch.equal(v, loaded.trunk.state_dict()[k])

    bad = tmp_path / "bad.pth"
    sd = {f"features.{k}": v for k, v in src.trunk.state_dict().items()}
    sd.pop("features.0.bias")
    sd["features.4.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, bad)
    with pytest.raises(ModelError) as e:
        build_backbone("zf5", weights=bad)
    msg = str(e.value)
    assert str(bad) in msg and "does not fit zf5" in msg
    assert "1 missing keys (features.0.bias)" in msg and "1 unexpected keys (extra.weight)" in msg
    assert "features.4.weight (3, 3) vs (256, 96, 5, 5)" in msg

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read weights file"):
        build_backbone("zf5", weights=garbage)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(ModelError, match="does not hold a state dict"):
        build_backbone("zf5", weights=notdict)


@pytest.mark.skipif(not (SQ10.is_file() and SQ11.is_file()), reason="shared weights absent")
def test_shared_squeezenet_weights_load_strictly():
    b10 = build_backbone("squeezenet1_0", weights=SQ10)
    b11 = build_backbone("squeezenet1_1", weights=SQ11)
    assert b10.weights_id == "sha256:3b87cfe6ec36d22336a9fa9f8e5c1ddb17046c0700c905e769c67a6ac43a451c"
    assert b11.weights_id == "sha256:f70dea33b510b92f7924478c80dda296ed90e2562180e4ab9164130744760b3c"
    assert b11.trunk[0].weight.dtype == torch.float32          # the fp16 file is cast on load
    with pytest.raises(ModelError, match="does not fit squeezenet1_0") as e:
        build_backbone("squeezenet1_0", weights=SQ11)
    assert "keys of another shape" in str(e.value)


@pytest.mark.skipif(not (SQ10.is_file() and (FRUIT / "banana_1.jpg").is_file()),
                    reason="shared weights or fruit images absent")
@pytest.mark.parametrize("weights, name", [(SQ10, "squeezenet1_0"), (SQ11, "squeezenet1_1")])
def test_pretrained_trunk_gives_sensible_imagenet_predictions(weights, name):
    """The loaded trunk + the file's classifier recognise a banana and an orange photo
    (ImageNet classes 954 and 950)."""
    b = build_backbone(name, weights=weights)
    full = torchvision.models.get_model(name)
    full.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    full.eval()
    for _, x, label in _fruit_photos(b):
        with torch.inference_mode():
            fmap = b(x)
            torch.testing.assert_close(fmap, full.features(x))
            logits = full.classifier(fmap).flatten(1)
        assert torch.isfinite(logits).all()
        assert int(logits.argmax()) == label


def _fruit_photos(backbone):
    """(name, the photo preprocessed at a 224-px shorter side, its ImageNet class) for a banana
    and an orange photo of the shared fruit set (classes 954 and 950)."""
    import cv2
    for image_name, label in (("banana_1.jpg", 954), ("orange_1.jpg", 950)):
        rgb = np.ascontiguousarray(cv2.imread(str(FRUIT / image_name))[:, :, ::-1])
        yield image_name, backbone.preprocess(rgb, 224 / min(rgb.shape[:2])), label


def test_conv2d_same_pads_as_tensorflow():
    from detection.backbones import Conv2dSame
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
    same = Conv2dSame(2, 3, 3, stride=2)
    same.load_state_dict(conv.state_dict())                       # the same parameter names
    even, odd = torch.randn(1, 2, 8, 10), torch.randn(1, 2, 7, 9)
    # Even side: 0 before, 1 after (TensorFlow); odd side: 1 and 1, as torchvision pads.
    ref_even = torch.nn.functional.conv2d(torch.nn.functional.pad(even, (0, 1, 0, 1)), conv.weight, conv.bias, 2)
    torch.testing.assert_close(same(even), ref_even)
    torch.testing.assert_close(same(odd), conv(odd))
    assert not torch.allclose(same(even), conv(even))


def test_batchnorm_is_frozen_in_resnet_and_mobilenet_trunks():
    for name in ("resnet18", "mobilenet_v2"):
        b = build_backbone(name, seed=0)
        norms = [m for m in b.trunk.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
        assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.trunk.modules())
        before = {k: v.clone() for k, v in b.trunk.state_dict().items()}
        b.trunk.train()
        b.trunk(torch.randn(2, 3, 64, 64) * 5)                   # a training-mode pass
        assert all(torch.equal(v, b.trunk.state_dict()[k]) for k, v in before.items())


def test_tf_trunk_refuses_torchvisions_weights():
    with pytest.raises(ModelError, match="torchvision's mobilenet_v2 weights were trained with its own padding"):
        build_backbone("mobilenet_v2_tf", weights="imagenet")


def test_tf_trunk_pads_inputs_to_a_multiple_of_16():
    b = build_backbone("mobilenet_v2_tf")
    x = b.preprocess(np.full((50, 70, 3), 128, np.uint8), 1.0)
    assert tuple(x.shape[-2:]) == (64, 80)
    assert torch.all(x[..., 50:, :] == 0) and torch.all(x[..., :, 70:] == 0)
    assert tuple(b(x).shape[-2:]) == b.map_size(50, 70) == (4, 5)


@pytest.mark.skipif(not (MOBILENET.is_file() and (FRUIT / "banana_1.jpg").is_file()),
                    reason="shared weights or fruit images absent")
def test_shared_mobilenet_v2_with_tf_padding_recognises_fruit():
    """The TF-trained weights in the TF-padded trunk: the trunk equals the full network's first
    layers, and with the file's classifier (the rest of the network, TF-padded too) a banana and
    an orange photo are recognised (ImageNet classes 954 and 950)."""
    from detection.backbones import tf_same_padding

    b = build_backbone("mobilenet_v2_tf", weights=MOBILENET)
    assert b.weights_id == "sha256:32d0377862079eeefcdd86974b4bc5f0b464babca0f409897211aab929d59ae9"
    full = torchvision.models.mobilenet_v2()
    full.load_state_dict(torch.load(MOBILENET, map_location="cpu", weights_only=True))
    tf_same_padding(full.features)
    full.eval()
    for image_name, x, label in _fruit_photos(b):
        with torch.inference_mode():
            fmap = b(x)
            torch.testing.assert_close(fmap, full.features[14].conv[0](full.features[:14](x)), rtol=1e-4, atol=1e-4)
            logits = full(torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear"))
        assert int(logits.argmax()) == label, image_name


# ---- EfficientNet-Lite ---------------------------------------------------------------------------

LITE_STAGES = {"efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1], "efficientnet_lite1": [1, 3, 3, 4, 4, 5, 1],
               "efficientnet_lite2": [1, 3, 3, 4, 4, 5, 1]}


def _timm_lite(name: str) -> torch.nn.Module:
    """timm's own tf_efficientnet_lite (timm's "SAME" convs, unfrozen BN) with the packaged
    ImageNet weights, renamed: the reference the trunk is checked against."""
    model = timm.create_model(f"tf_{name}", pretrained=False)
    state = torch.load(packaged_weights_file(name), map_location="cpu", weights_only=True)
    model.load_state_dict(timm_state_dict(state, LITE_STAGES[name]), strict=True)
    return model.eval()


@pytest.mark.parametrize("name", sorted(LITE_STAGES))
def test_efficientnet_lite_imagenet_weights_come_from_the_installed_package(name):
    """``imagenet`` loads the package's file (no download), renamed key by key into timm's names:
    the renamed keys are exactly timm's, and the trunk equals timm's own network up to blocks.4
    (its own Conv2dSame and BatchNorm) on an input of a side that is not a multiple of 16."""
    path = packaged_weights_file(name)
    b = build_backbone(name, weights="imagenet")
    assert b.weights_id == f"sha256:{file_sha256(path)}"
    state = torch.load(path, map_location="cpu", weights_only=True)
    timm_keys = set(timm.create_model(f"tf_{name}", pretrained=False).state_dict())
    assert set(timm_state_dict(state, LITE_STAGES[name])) == timm_keys
    full = _timm_lite(name)
    x = torch.randn(1, 3, 83, 117)
    with torch.inference_mode():
        torch.testing.assert_close(b(x), full.blocks[:5](full.bn1(full.conv_stem(x))), rtol=1e-4, atol=1e-4)
    # the file in efficientnet_pytorch's names works as --weights PATH too (the same weights id)
    assert build_backbone(name, weights=path).weights_id == b.weights_id


def test_efficientnet_lite_key_mapping_by_hand():
    """Block n of efficientnet_pytorch is (stage, index) of timm by the stage sizes; the first
    stage has no expansion conv, so its BN numbering differs."""
    t = torch.zeros(1)
    mapped = timm_state_dict({"_conv_stem.weight": t, "_bn0.bias": t, "_blocks.0._bn1.weight": t,
                              "_blocks.0._project_conv.weight": t, "_blocks.1._expand_conv.weight": t,
                              "_blocks.2._bn0.running_var": t, "_blocks.3._depthwise_conv.weight": t,
                              "_blocks.5._bn2.num_batches_tracked": t, "_blocks.15._project_conv.weight": t,
                              "_conv_head.weight": t, "_bn1.weight": t, "_fc.bias": t, "other.x": t},
                             [1, 2, 2, 3, 3, 4, 1])
    assert sorted(mapped) == sorted([
        "conv_stem.weight", "bn1.bias", "blocks.0.0.bn1.weight", "blocks.0.0.conv_pw.weight",
        "blocks.1.0.conv_pw.weight", "blocks.1.1.bn1.running_var", "blocks.2.0.conv_dw.weight",
        "blocks.3.0.bn3.num_batches_tracked", "blocks.6.0.conv_pwl.weight", "conv_head.weight", "bn2.weight",
        "classifier.bias", "other.x"])
    timm_named = {"blocks.0.0.conv_dw.weight": t}
    assert timm_state_dict(timm_named, [1]) == timm_named


def test_efficientnet_lite_normalises_as_trained_and_freezes_bn():
    """(x - 127) / 128 on 0..255 values; padded to a multiple of 16 with 0 (grey 127); the BN
    layers (with their ReLU6) stay fixed in a training-mode pass."""
    b = build_backbone("efficientnet_lite0", weights="imagenet")
    image = np.zeros((20, 30, 3), np.uint8)
    image[0, 0] = (0, 127, 255)
    x = b.preprocess(image, 1.0)
    assert tuple(x.shape) == (1, 3, 32, 32)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]))
    assert torch.all(x[..., 20:, :] == 0) and torch.all(x[..., 30:] == 0)
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in b.trunk.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.trunk.modules())
    before = {k: v.clone() for k, v in b.trunk.state_dict().items()}
    b.trunk.train()
    b.trunk(torch.randn(2, 3, 64, 64) * 5)
    assert all(torch.equal(v, b.trunk.state_dict()[k]) for k, v in before.items())


def test_the_expanded_lite_trunk_is_the_112_channel_one_and_the_next_expansion_conv():
    """The same packaged weights: its layers up to stage 4 are the 112-channel trunk's, and its
    map is that trunk's map through block 5.0's 1x1 expansion conv + BN + ReLU6."""
    short = build_backbone("efficientnet_lite0", weights="imagenet")
    long = build_backbone("efficientnet_lite0_expanded", weights="imagenet")
    assert long.weights_id == short.weights_id and long.out_channels == 672
    n = len(short.trunk)
    assert len(long.trunk) == n + 2
    for a, b in zip(short.trunk, long.trunk[:n]):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    expansion = imagenet_classifier("efficientnet_lite0").blocks[5][0]
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        torch.testing.assert_close(long(x), expansion.bn1(expansion.conv_pw(short(x))))


def test_efficientnet_lite_weights_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file, nor 'imagenet'"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "none.pth")
    bad = tmp_path / "lite1.pth"
    torch.save(torch.load(packaged_weights_file("efficientnet_lite1"), weights_only=True), bad)
    with pytest.raises(ModelError, match="does not fit efficientnet_lite0"):
        build_backbone("efficientnet_lite0", weights=bad)


@pytest.mark.skipif(not FRUIT.is_dir(), reason="shared fruit images absent")
@pytest.mark.parametrize("name", sorted(LITE_STAGES))
def test_efficientnet_lite_recognises_fruit_crops(name):
    """The packaged weights through the key mapping, on labelled photos: every banana and orange
    box of the fruit test split (40 and 42), cropped, resized to the network's input and scaled
    (x - 127) / 128, is top-1 banana (954) / orange (950) at least 80 % of the time (measured:
    35-37/40 and 36-38/42 over Lite0/1/2; with torchvision's mean/std instead, Lite0 gets 22/40
    and 19/42)."""
    full = imagenet_classifier(name)
    size = int(full.pretrained_cfg["input_size"][-1])
    ds = VOCDataset(FRUIT.parent, "test")
    for cls, label in (("banana", 954), ("orange", 950)):
        crops = []
        for rec in ds:
            for box, lab in zip(rec.boxes, rec.labels):
                if ds.classes[lab] == cls:
                    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
                    crops.append(cv2.resize(load_image(rec)[y1:y2, x1:x2], (size, size),
                                            interpolation=cv2.INTER_LINEAR))
        x = (torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() - 127) / 128
        with torch.inference_mode():
            top1 = full(x).argmax(1)
        assert len(crops) >= 40 and int((top1 == label).sum()) >= 0.8 * len(crops), (cls, top1.tolist())
