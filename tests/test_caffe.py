"""detection.caffe and tools/convert_caffe.py: a ZF-5 .caffemodel with known weights, written here
in the protobuf wire format (legacy V1 ``layers`` as SPP_net's release has them, and the newer
``layer`` field), converted; the converted trunk's conv5 map equals one computed from those weights
by plain conv / LRN / pool calls on Caffe's BGR mean-subtracted input. Malformed files fail with
one clear error."""
from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from detection.backbones import IMAGENET_MEAN, build_backbone
from detection.caffe import CAFFE_LAYER_MAPS, FAST_RCNN_PIXEL_MEANS, convert_caffemodel, read_caffemodel
from detection.errors import ModelError

TOOLS = Path(__file__).resolve().parents[1] / "tools"

# ---- a minimal protobuf writer ---------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, wire: int, payload: bytes | int) -> bytes:
    key = varint(number << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload                          # fixed 32/64-bit payload, already bytes


def blob(a: np.ndarray, legacy: bool, packed: bool = True) -> bytes:
    a = np.asarray(a, np.float32)
    if legacy:      # num, channels, height, width: 4-d, ones in front
        dims = (1,) * (4 - a.ndim) + a.shape
        head = b"".join(field(n, 0, d) for n, d in zip((1, 2, 3, 4), dims))
    else:
        head = field(7, 2, field(1, 2, b"".join(varint(d) for d in a.shape)))
    flat = a.ravel()
    data = (field(5, 2, flat.astype("<f4").tobytes()) if packed
            else b"".join(field(5, 5, struct.pack("<f", v)) for v in flat.tolist()))
    return head + data


def layer(name: str, blobs: list[np.ndarray], legacy: bool, type_: str = "Convolution", packed: bool = True) -> bytes:
    if legacy:      # V1LayerParameter: name 4, type 5 (an enum; 4 = CONVOLUTION), blobs 6
        body = field(4, 2, name.encode()) + field(5, 0, 4) + b"".join(field(6, 2, blob(b, True, packed)) for b in blobs)
        return field(2, 2, body)
    body = field(1, 2, name.encode()) + field(2, 2, type_.encode()) + b"".join(
        field(7, 2, blob(b, False, packed)) for b in blobs)
    return field(100, 2, body)


ZF5_SHAPES = {"conv1": (96, 3, 7, 7), "conv2": (256, 96, 5, 5), "conv3": (384, 256, 3, 3),
              "conv4": (384, 384, 3, 3), "conv5": (256, 384, 3, 3)}


def zf5_weights(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in ZF5_SHAPES.items():
        fan_in = shape[1] * shape[2] * shape[3]
        # conv1 sees 0..255 pixels: a smaller scale keeps every layer's activations O(1)
        scale = np.sqrt(2.0 / fan_in) * (1 / 64 if name == "conv1" else 1.0)
        out[name] = ((rng.standard_normal(shape) * scale).astype(np.float32),
                     (rng.standard_normal(shape[0]) * 0.1).astype(np.float32))
    return out


def zf5_caffemodel(weights, legacy: bool, packed: bool = True) -> bytes:
    """A NetParameter as SPP_net's Zeiler_conv5 has it: name, weightless layers between the convs
    (relu, norm, pool), an unknown varint and a fixed64 field (skipped by wire type)."""
    parts = [field(1, 2, b"Zeiler_conv5"), field(999, 0, 7), field(998, 1, struct.pack("<d", 1.5))]
    for name in ZF5_SHAPES:
        w, b = weights[name]
        parts.append(layer(name, [w, b], legacy, packed=packed))
        parts.append(layer(f"relu{name[-1]}", [], legacy, type_="ReLU"))
        if name in ("conv1", "conv2"):
            parts.append(layer(f"norm{name[-1]}", [], legacy, type_="LRN"))
            parts.append(layer(f"pool{name[-1]}", [], legacy, type_="Pooling"))
    return b"".join(parts)


# ---- the reference: Caffe's layers on Caffe's input -------------------------------------------


def caffe_lrn(x: torch.Tensor, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> torch.Tensor:
    """Caffe's WITHIN_CHANNEL LRN: x / (1 + alpha / size^2 * (sum of squares over the size x size
    window, zero padded)) ^ beta, the sum as a depthwise conv with a ones kernel."""
    c = x.shape[1]
    ones = torch.ones(c, 1, size, size, dtype=x.dtype)
    sq = F.conv2d(x * x, ones, padding=size // 2, groups=c)
    return x / (1 + alpha / size ** 2 * sq) ** beta


def reference_conv5(image: np.ndarray, weights) -> torch.Tensor:
    """ZF-5 (the project's paddings, docs/spp.md) on Caffe's input: BGR 0..255 minus the mean
    pixel, the border padded with the ImageNet mean colour (what the folded conv1 pads with)."""
    mean_bgr = torch.tensor(FAST_RCNN_PIXEL_MEANS, dtype=torch.float64).view(1, 3, 1, 1)
    v = torch.from_numpy(image[:, :, ::-1].astype(np.float64).copy()).permute(2, 0, 1)[None] - mean_bgr
    border = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).flip(0).view(1, 3, 1, 1) * 255 - mean_bgr
    h, w = v.shape[-2:]
    padded = border.expand(1, 3, h + 6, w + 6).clone()
    padded[..., 3:3 + h, 3:3 + w] = v

    def conv(x, name, stride, pad):
        wt, b = (torch.from_numpy(a).double() for a in weights[name])
        return F.relu(F.conv2d(x, wt, b, stride=stride, padding=pad))

    x = conv(padded, "conv1", 2, 0)
    x = F.max_pool2d(caffe_lrn(x), 3, 2, padding=1)
    x = conv(x, "conv2", 2, 2)
    x = F.max_pool2d(caffe_lrn(x), 3, 2, padding=1)
    x = conv(x, "conv3", 1, 1)
    x = conv(x, "conv4", 1, 1)
    return conv(x, "conv5", 1, 1)


@pytest.mark.parametrize("legacy, packed", [(True, True), (False, True), (False, False)])
def test_converted_zf5_computes_the_caffe_nets_conv5(tmp_path, legacy, packed):
    weights = zf5_weights()
    model = tmp_path / "zf5.caffemodel"
    model.write_bytes(zf5_caffemodel(weights, legacy, packed))
    layers = read_caffemodel(model)
    assert [layer.name for layer in layers if layer.blobs] == list(ZF5_SHAPES)
    assert len(layers) == 5 + 5 + 4
    np.testing.assert_array_equal(layers[0].blobs[0], weights["conv1"][0])
    out = tmp_path / "zf5.pth"
    weights_id = convert_caffemodel(model, "zf5", out)
    backbone = build_backbone("zf5", weights=out)
    assert backbone.weights_id == weights_id
    image = np.random.default_rng(1).integers(0, 256, (67, 91, 3), dtype=np.uint8)
    with torch.inference_mode():
        got = backbone(backbone.preprocess(image, 1.0))[0].double()
    want = reference_conv5(image, weights)[0]
    assert got.shape == want.shape == (256, 5, 6)
    assert want.abs().max() > 0.1 and (want > 0).float().mean() > 0.1      # a map with signal in it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # conv2..conv5 are taken as they are: a swap of two layers' weights would show here
    state = torch.load(out, weights_only=True)
    for name, key in (("conv2", "features.4"), ("conv5", "features.12")):
        np.testing.assert_array_equal(state[f"{key}.weight"].numpy(), weights[name][0])


def test_vgg16_mapping_follows_torchvisions_conv_order():
    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    convs = [f"features.{i}.weight" for i, m in enumerate(vgg.features) if isinstance(m, torch.nn.Conv2d)]
    linears = [f"classifier.{i}.weight" for i, m in enumerate(vgg.classifier) if isinstance(m, torch.nn.Linear)]
    mapping = CAFFE_LAYER_MAPS["vgg16"]
    assert [mapping[n][0] for n in mapping if n.startswith("conv")] == convs
    assert [mapping[n][0] for n in ("fc6", "fc7", "fc8")] == linears
    assert list(mapping)[:3] == ["conv1_1", "conv1_2", "conv2_1"]


def test_malformed_caffemodels_are_refused_with_a_reason(tmp_path):
    weights = zf5_weights()
    good = zf5_caffemodel(weights, legacy=True)

    def refused(data: bytes, match: str, name: str = "bad.caffemodel") -> None:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelError, match=match):
            convert_caffemodel(path, "zf5", tmp_path / "out.pth")
        assert not (tmp_path / "out.pth").exists()

    refused(good[:len(good) // 2], "truncated file")
    refused(good + b"\x80", "varint runs past the end")
    refused(b"\x0b\x00\x00", "wire type 3")
    refused(b"name: 'not binary'\n", "malformed|no layers")
    refused(field(1, 2, b"a net without layers"), "holds no layers")
    wrong = dict(weights, conv2=(np.zeros((256, 96, 3, 3), np.float32), weights["conv2"][1]))
    refused(zf5_caffemodel(wrong, legacy=False), "layer 'conv2' has blobs of shape")
    short = {k: v for k, v in weights.items() if k != "conv5"}
    refused(b"".join(layer(n, list(v), False) for n, v in short.items()), r"lacks the zf5 layer\(s\) conv5")
    bad_count = field(100, 2, field(1, 2, b"conv1") + field(
        7, 2, field(7, 2, field(1, 2, varint(4) + varint(4))) + field(5, 2, np.zeros(3, "<f4").tobytes())))
    refused(bad_count, "has 3 values for its shape")
    with pytest.raises(ModelError, match="no Caffe layer mapping for 'resnet50'"):
        convert_caffemodel(tmp_path / "bad.caffemodel", "resnet50", tmp_path / "out.pth")


def test_every_truncation_of_a_small_file_is_an_error_or_fewer_layers(tmp_path):
    rng = np.random.default_rng(0)
    data = layer("a", [rng.standard_normal((2, 3)), rng.standard_normal(2)], True) + layer(
        "b", [rng.standard_normal(4)], False, packed=False)
    path = tmp_path / "small.caffemodel"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        try:
            layers = read_caffemodel(path)
        except ModelError as e:
            assert "small.caffemodel" in str(e)
        else:
            assert [layer.name for layer in layers] == ["a"]        # cut at the layer boundary


def test_convert_caffe_tool(tmp_path):
    model, out = tmp_path / "zf5.caffemodel", tmp_path / "zf5.pth"
    data = zf5_caffemodel(zf5_weights(), legacy=True)
    model.write_bytes(data)
    proc = subprocess.run([sys.executable, str(TOOLS / "convert_caffe.py"), "--caffemodel", str(model), "--target",
                           "zf5", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--backbone zf5 --weights" in proc.stdout and out.is_file()
    model.write_bytes(data[:-7])
    proc = subprocess.run([sys.executable, str(TOOLS / "convert_caffe.py"), "--caffemodel", str(model), "--target",
                           "zf5", "--out", str(tmp_path / "b.pth"), "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: caffemodel") and "Traceback" not in proc.stderr
