"""Caffe ``.caffemodel`` files read without Caffe or generated protobuf code, and converted into
this project's ``zf5`` / ``vgg16`` state dicts (``tools/convert_caffe.py``).

A ``.caffemodel`` is a serialised ``NetParameter`` (Caffe's ``caffe.proto``). Only what the
weights need is read, straight from the protobuf wire format (a field is a varint key
``number << 3 | wire type`` followed by a varint, 4 or 8 bytes, or a length and that many bytes):

* ``NetParameter.layer`` (field 100, ``LayerParameter``: ``name`` 1, ``type`` 2, ``blobs`` 7) and
  the legacy ``NetParameter.layers`` (field 2, ``V1LayerParameter``: ``name`` 4, ``blobs`` 6; the
  2014 releases, SPP_net's among them, use these);
* ``BlobProto``: ``shape`` 7 (``BlobShape.dim`` 1, int64, packed or not), the legacy 4-d ``num`` 1,
  ``channels`` 2, ``height`` 3, ``width`` 4, and ``data`` 5 (float32, packed or not) or
  ``double_data`` 8.

Everything else is skipped by its wire type. The file is untrusted: a truncated varint or field,
a length past the end, a group or unknown wire type, a blob whose element count does not match its
shape, or a layer of the wrong shape for the target network is a :class:`ModelError` naming the
file and where.

Caffe's networks take BGR pixels in 0..255 minus a mean pixel; this project's trunks take RGB
normalised with torchvision's ImageNet mean/std (:class:`~detection.backbones.Backbone`). The
conversion folds that difference into conv1 (input channels reversed and scaled, the mean moved
into the bias), so the converted trunk computes what the Caffe net computes, except that the image
border is zero-padded in the normalised space (the ImageNet mean colour) where Caffe pads the
mean-subtracted image with 0 (its mean pixel): the two colours differ by less than one grey level
with Fast R-CNN's mean.
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from .backbones import IMAGENET_MEAN, IMAGENET_STD, ZF5, build_backbone
from .errors import ModelError
from .io.files import atomic_torch_save

__all__ = ["CaffeLayer", "read_caffemodel", "CAFFE_LAYER_MAPS", "FAST_RCNN_PIXEL_MEANS", "caffe_state_dict",
           "convert_caffemodel"]

log = logging.getLogger(__name__)

#: Fast R-CNN's ``PIXEL_MEANS`` (BGR, 0..255), the mean its and SPP_net's ImageNet models subtract.
FAST_RCNN_PIXEL_MEANS = (102.9801, 115.9465, 122.7717)

#: Caffe layer name -> (weight key, bias key) of the project's state dict, per target network.
#: ZF-5: the official SPP_net release's names (conv1..conv5), ``detection.backbones.ZF5`` indices;
#: VGG16: the Fast R-CNN / VGG release's names, torchvision's ``vgg16`` keys.
CAFFE_LAYER_MAPS: dict[str, dict[str, tuple[str, str]]] = {
    "zf5": {f"conv{i}": (f"features.{k}.weight", f"features.{k}.bias")
            for i, k in zip(range(1, 6), (0, 4, 8, 10, 12))},
    "vgg16": {**{name: (f"features.{k}.weight", f"features.{k}.bias") for name, k in zip(
        ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
         "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"),
        (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28))},
        "fc6": ("classifier.0.weight", "classifier.0.bias"), "fc7": ("classifier.3.weight", "classifier.3.bias"),
        "fc8": ("classifier.6.weight", "classifier.6.bias")},
}
#: Layers a target may lack in the file: VGG16's fc8 (the ImageNet classifier; Fast R-CNN's
#: models replace it by cls_score/bbox_pred). Detection never uses it (the head ends at fc7).
OPTIONAL_LAYERS = {"vgg16": ("fc8",)}

_MAX_BLOB_ELEMENTS = 1 << 31      # 8 GB of float32: no real layer is near it


@dataclass
class CaffeLayer:
    """One layer of a caffemodel: name, type (a string; the legacy enum as ``"V1:<n>"``) and
    its blobs as float32 arrays in their Caffe shapes."""

    name: str
    type: str
    blobs: list[np.ndarray]


class _Reader:
    """Protobuf wire-format fields of one message (bytes ``[start, end)`` of ``data``)."""

    def __init__(self, data: memoryview, start: int, end: int, source: str) -> None:
        self.data, self.pos, self.end, self.source = data, start, end, source

    def _error(self, what: str) -> ModelError:
        return ModelError(f"caffemodel {self.source} is malformed at byte {self.pos}: {what}")

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.pos >= self.end:
                raise self._error("a varint runs past the end (truncated file?)")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift >= 70:
                raise self._error("a varint longer than 10 bytes")

    def fields(self) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
        """(field number, wire type, value): an int for varint / fixed fields, (start, end) of
        the bytes for length-delimited ones."""
        while self.pos < self.end:
            key = self.varint()
            number, wire = key >> 3, key & 7
            if number == 0:
                raise self._error("field number 0")
            if wire == 0:
                yield number, wire, self.varint()
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                if self.pos + size > self.end:
                    raise self._error(f"a {size}-byte field runs past the end (truncated file?)")
                value = int.from_bytes(self.data[self.pos:self.pos + size], "little")
                self.pos += size
                yield number, wire, value
            elif wire == 2:
                length = self.varint()
                if length > self.end - self.pos:
                    raise self._error(f"field {number} claims {length} bytes, {self.end - self.pos} are left "
                                      "(truncated file?)")
                start = self.pos
                self.pos += length
                yield number, wire, (start, self.pos)
            else:
                raise self._error(f"field {number} has wire type {wire} (groups or not protobuf at all)")

    def sub(self, span: tuple[int, int]) -> "_Reader":
        return _Reader(self.data, span[0], span[1], self.source)

    def text(self, span: tuple[int, int]) -> str:
        return bytes(self.data[span[0]:span[1]]).decode("utf-8", errors="replace")


def _expect(wire: int, wanted: tuple[int, ...], what: str, r: _Reader) -> None:
    if wire not in wanted:
        raise r._error(f"{what} has wire type {wire}")


def _packed_or_single(r: _Reader, wire: int, value, fixed: str | None, out: list, what: str) -> None:
    """A repeated scalar: packed (one length-delimited run) or one element per field."""
    if wire == 2:
        start, end = value
        if fixed is None:
            sub = r.sub(value)
            while sub.pos < sub.end:
                out.append(sub.varint())
        else:
            size = struct.calcsize(fixed)
            if (end - start) % size:
                raise r._error(f"packed {what} of {end - start} bytes is not a whole number of values")
            out.append(np.frombuffer(r.data[start:end], dtype=np.dtype(fixed).newbyteorder("<")))
    elif fixed is None and wire == 0:
        out.append(value)
    elif fixed == "f" and wire == 5:
        out.append(np.array([struct.unpack("<f", value.to_bytes(4, "little"))[0]], np.float32))
    elif fixed == "d" and wire == 1:
        out.append(np.array([struct.unpack("<d", value.to_bytes(8, "little"))[0]], np.float64))
    else:
        raise r._error(f"{what} has wire type {wire}")


def _blob(r: _Reader, layer: str) -> np.ndarray:
    legacy = {1: 1, 2: 1, 3: 1, 4: 1}
    have_legacy = False
    dims: list[int] | None = None
    data: list[np.ndarray] = []
    for number, wire, value in r.fields():
        if number in legacy:
            _expect(wire, (0,), f"blob dimension {number} of layer {layer!r}", r)
            legacy[number], have_legacy = int(value), True
        elif number == 7:                      # BlobShape
            _expect(wire, (2,), f"blob shape of layer {layer!r}", r)
            dims = []
            for n2, w2, v2 in r.sub(value).fields():
                if n2 == 1:
                    _packed_or_single(r, w2, v2, None, dims, f"blob shape of layer {layer!r}")
        elif number == 5:
            _packed_or_single(r, wire, value, "f", data, f"blob data of layer {layer!r}")
        elif number == 8:
            _packed_or_single(r, wire, value, "d", data, f"blob double_data of layer {layer!r}")
    shape = tuple(dims) if dims is not None else tuple(legacy[k] for k in (1, 2, 3, 4))
    if dims is None and not have_legacy:
        shape = ()
    if any(d < 0 or d >= _MAX_BLOB_ELEMENTS for d in shape) or int(np.prod(shape, dtype=object)) >= _MAX_BLOB_ELEMENTS:
        raise r._error(f"a blob of layer {layer!r} has an impossible shape {shape}")
    values = np.concatenate(data).astype(np.float32) if data else np.zeros(0, np.float32)
    count = int(np.prod(shape, dtype=np.int64)) if shape else len(values)
    if len(values) != count:
        raise ModelError(f"caffemodel {r.source}: a blob of layer {layer!r} has {len(values)} values for its "
                         f"shape {shape} ({count})")
    return values.reshape(shape if shape else (count,))


def _layer(r: _Reader, legacy: bool) -> CaffeLayer:
    name_field, type_field, blobs_field = (4, 5, 6) if legacy else (1, 2, 7)
    name, type_, blob_spans = "", "", []
    v0: tuple[int, int] | None = None
    for number, wire, value in r.fields():
        if number == name_field and wire == 2:
            name = r.text(value)
        elif number == type_field:
            type_ = f"V1:{value}" if legacy and wire == 0 else (r.text(value) if wire == 2 else str(value))
        elif number == blobs_field:
            _expect(wire, (2,), "a layer's blob", r)
            blob_spans.append(value)
        elif legacy and number == 1 and wire == 2:
            v0 = value                        # a V0LayerParameter inside (name 1, type 2, blobs 50)
    if v0 is not None and not blob_spans:
        sub = r.sub(v0)
        for number, wire, value in sub.fields():
            if number == 1 and wire == 2:
                name = name or r.text(value)
            elif number == 2 and wire == 2:
                type_ = type_ or r.text(value)
            elif number == 50 and wire == 2:
                blob_spans.append(value)
    return CaffeLayer(name, type_, [_blob(r.sub(span), name) for span in blob_spans])


def read_caffemodel(path: str | Path) -> list[CaffeLayer]:
    """Every layer of a ``.caffemodel`` (new ``layer`` and legacy ``layers`` fields), in file
    order, with its blobs.

    Raises:
        ModelError: unreadable or malformed file, or one without any layer.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read caffemodel {path}: {e.strerror or e}") from None
    r = _Reader(memoryview(data), 0, len(data), str(path))
    layers = []
    for number, wire, value in r.fields():
        if number in (2, 100):
            _expect(wire, (2,), "a layer", r)
            layers.append(_layer(r.sub(value), legacy=number == 2))
    if not layers:
        raise ModelError(f"caffemodel {path} holds no layers (not a caffemodel, or a deploy prototxt?)")
    return layers


def _fold_input(weight: torch.Tensor, bias: torch.Tensor, pixel_means_bgr: Sequence[float]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """conv1 for torchvision-normalised RGB input x = (v/255 - m) / s from conv1 for Caffe's
    BGR input v - mean: v = 255 (s x + m), so W' = W[:, ::-1] * 255 s and
    b' = b + sum W[:, bgr] (255 m - mean)."""
    m = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    s = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    mean_rgb = torch.tensor(pixel_means_bgr, dtype=torch.float64).flip(0)
    w_rgb = weight.double().flip(1)                          # BGR input channels -> RGB
    new_w = w_rgb * (255.0 * s).view(1, 3, 1, 1)
    new_b = bias.double() + (w_rgb * (255.0 * m - mean_rgb).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return new_w.float(), new_b.float()


def caffe_state_dict(layers: Sequence[CaffeLayer], target: str, expected: dict[str, torch.Tensor],
                     source: str, pixel_means_bgr: Sequence[float] = FAST_RCNN_PIXEL_MEANS) -> dict[str, torch.Tensor]:
    """The ``target`` network's state dict from a caffemodel's layers, layer by layer
    (:data:`CAFFE_LAYER_MAPS`), shapes checked against ``expected`` (the target's own state
    dict), conv1 folded for normalised RGB input. Keys of ``expected`` no layer gives (VGG16's
    fc8 when the file lacks it) are zeros, with a warning.

    Raises:
        ModelError: unknown target, a mapped layer missing, twice, or of another shape.
    """
    if target not in CAFFE_LAYER_MAPS:
        raise ModelError(f"no Caffe layer mapping for {target!r}: use one of {', '.join(CAFFE_LAYER_MAPS)}")
    mapping = CAFFE_LAYER_MAPS[target]
    by_name: dict[str, CaffeLayer] = {}
    for layer in layers:
        if layer.name in mapping and layer.blobs:
            if layer.name in by_name:
                raise ModelError(f"caffemodel {source} has two layers named {layer.name!r} with weights")
            by_name[layer.name] = layer
    missing = [n for n in mapping if n not in by_name and n not in OPTIONAL_LAYERS.get(target, ())]
    if missing:
        have = ", ".join(sorted(layer.name for layer in layers if layer.blobs)) or "none"
        raise ModelError(f"caffemodel {source} lacks the {target} layer(s) {', '.join(missing)} "
                         f"(its layers with weights: {have})")
    state = {k: torch.zeros(tuple(v.shape), dtype=torch.float32) for k, v in expected.items()}
    filled = set()
    first_conv = next(iter(mapping))
    for name, layer in by_name.items():
        wkey, bkey = mapping[name]
        if len(layer.blobs) != 2:
            raise ModelError(f"caffemodel {source}: layer {name!r} has {len(layer.blobs)} blobs, expected 2 "
                             "(weights and bias)")
        want_w, want_b = tuple(expected[wkey].shape), tuple(expected[bkey].shape)
        w, b = layer.blobs
        # Legacy 4-d blobs: fc weights (1, 1, out, in), biases (1, 1, 1, out).
        if w.size != int(np.prod(want_w)) or b.size != int(np.prod(want_b)):
            raise ModelError(f"caffemodel {source}: layer {name!r} has blobs of shape {w.shape} and {b.shape}, "
                             f"{target} needs {want_w} and {want_b}")
        if w.ndim == 4 and len(want_w) == 4 and w.shape != want_w:
            raise ModelError(f"caffemodel {source}: layer {name!r} weights are {w.shape}, {target} needs {want_w}")
        wt = torch.from_numpy(np.ascontiguousarray(w).reshape(want_w).copy())
        bt = torch.from_numpy(np.ascontiguousarray(b).reshape(want_b).copy())
        if name == first_conv:
            wt, bt = _fold_input(wt, bt, pixel_means_bgr)
        state[wkey], state[bkey] = wt, bt
        filled.update((wkey, bkey))
    zero = [k for k in expected if k not in filled]
    if zero:
        log.warning("caffemodel %s has no %s for %s: left at zero (detection does not use them)",
                    source, ", ".join(n for n in mapping if n not in by_name), ", ".join(zero))
    return state


def convert_caffemodel(path: str | Path, target: str, out: str | Path,
                       pixel_means_bgr: Sequence[float] = FAST_RCNN_PIXEL_MEANS) -> str:
    """Read a caffemodel, map it onto ``target`` ("zf5" or "vgg16"), write the state dict to
    ``out`` (atomically) and load it back with ``build_backbone(target, weights=out)`` (strict).

    Returns:
        the weights id of the written file (``sha256:...``), what models trained on it record.
    """
    if target not in CAFFE_LAYER_MAPS:
        raise ModelError(f"no Caffe layer mapping for {target!r}: use one of {', '.join(CAFFE_LAYER_MAPS)}")
    layers = read_caffemodel(path)
    log.info("caffemodel %s: %d layers, with weights: %s", path, len(layers),
             ", ".join(f"{layer.name} {[tuple(b.shape) for b in layer.blobs]}" for layer in layers if layer.blobs))
    with torch.device("meta"):      # shapes only: VGG16's 138 M parameters are never initialised
        model = ZF5() if target == "zf5" else torchvision.models.vgg16()
    state = caffe_state_dict(layers, target, model.state_dict(), str(path), pixel_means_bgr)
    atomic_torch_save(out, state)
    return build_backbone(target, weights=out).weights_id
