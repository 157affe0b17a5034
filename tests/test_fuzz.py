"""Fuzzing every reader of files a user hands us: VOC annotations and split files, images (and
their size guard), devkit result files, proposal caches, R-CNN .mat files, model and weights
files, YAML configs and the conv-map cache.

Each reader gets random bytes, truncated, bit-flipped and overwritten copies of a valid file, and
structured mutations (random values in the right places). The contract: the reader returns a
well-formed result, or raises the documented :class:`~detection.errors.DetectionError` subclass
with a one-line message naming the file. Any other exception fails the example (hypothesis then
shrinks it to a minimal input). Hostile inputs (XML entity expansion and external entities,
pickles with a malicious ``__reduce__``, YAML object tags and alias bombs, decompression bombs)
must be refused without running or expanding anything.

Hypothesis runs derandomized (the same examples on every run: reproducible in CI, no example
database), with a bounded number of examples and a per-example deadline (60 s: hangs, not load). For a deeper run, scale
the example counts: ``SPP_FUZZ_SCALE=20 python -m pytest tests/test_fuzz.py``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tempfile
import time
import warnings
import zlib
from datetime import timedelta
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pytest
import scipy.io
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from detection.backbones import ZF5, build_backbone
from detection.config import ConfigError, merge, parse_overrides, read_yaml_mapping, to_dict
from detection.data.records import ImageRecord
from detection.data.images import MAX_IMAGE_PIXELS, image_size, read_image
from detection.data.voc import VOCDataset
from detection.detector import DetectorSettings, SPPDetector
from detection.errors import CacheError, DatasetError, DetectionError, ModelError
from detection.evaluation import evaluate_detections, read_result_file
from detection.features import CONVMAP_FORMAT_VERSION, ConvMapCache
from detection.model import load_model, save_model
from detection.pipeline import PipelineConfig
from detection.proposals import ProposalSet, load_rcnn_mat
from detection.timing import random_detector


FUZZ_SCALE = max(1, int(os.environ.get("SPP_FUZZ_SCALE", "1")))


def fuzz(max_examples: int = 40, seconds: float = 60.0):
    """Hypothesis settings: derandomized, no example database, bounded examples and time.

    The per-example deadline catches a hang or an expanding bomb, not a busy machine: 5 s failed
    for a 1-s example of the .mat fuzz beside other jobs (9.2 s), so it is 60 s.
    """
    return settings(max_examples=max_examples * FUZZ_SCALE, derandomize=True, database=None,
                    deadline=timedelta(seconds=seconds), print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def expect(error: type[DetectionError], fn, *args, name: str | None = None, **kwargs):
    """``fn(*args)``'s result, or the ``error`` it raised (one-line message naming ``name``).
    Any other exception propagates: that is the failure fuzzing looks for."""
    try:
        return fn(*args, **kwargs)
    except error as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"message must be one non-empty line: {msg!r}"
        assert name is None or name in msg, f"message does not name {name!r}: {msg!r}"
        return e


# --------------------------------------------------------------------------------------------
# byte-level corruption of a valid file


def _flip(data: bytes, bits: list[int]) -> bytes:
    buf = bytearray(data)
    for b in bits:
        buf[(b // 8) % len(buf)] ^= 1 << (b % 8)
    return bytes(buf)


def corrupted(valid: bytes, max_random: int = 2048) -> st.SearchStrategy[bytes]:
    """Random bytes, or ``valid`` truncated, bit-flipped or with a run of bytes overwritten."""
    n = len(valid)
    return st.one_of(
        st.binary(max_size=max_random),
        st.integers(0, n - 1).map(lambda k: valid[:k]),
        st.lists(st.integers(0, 8 * n - 1), min_size=1, max_size=12).map(lambda bits: _flip(valid, bits)),
        st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=64)).map(
            lambda t: valid[:t[0]] + t[1] + valid[t[0] + len(t[1]):]),
    )


#: Text a field of a hand-edited file may hold: numbers of every kind, NaN/inf, overflow,
#: Python-only float syntax, non-ASCII digits, empty and arbitrary text.
FIELD = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats().map(repr),
    st.sampled_from(["", "nan", "inf", "-inf", "Infinity", "1e999", "-1e999", "0x10", "1_0", " 7 ", "abc",
                     "\u0661\u0662", "1,5", "+3", "-0", "1e-320"]),
    st.text(max_size=12),
)


# --------------------------------------------------------------------------------------------
# a one-image VOC dataset


def _pattern(w: int = 40, h: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern()).save(buf, format=fmt, **kw)
    return buf.getvalue()


VALID_IMAGES = {fmt: _encoded(fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF")}

VALID_XML = ("<annotation><filename>x.jpg</filename><size><width>40</width><height>30</height>"
             "<depth>3</depth></size><object><name>cat</name><difficult>0</difficult><truncated>0</truncated>"
             "<bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>"
             "</annotation>")


def make_voc(root: Path) -> Path:
    """Image ``x`` (40x30 JPEG) with one 'cat', split ``trainval`` = [x]."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages" / "x.jpg").write_bytes(VALID_IMAGES["JPEG"])
    (root / "Annotations" / "x.xml").write_text(VALID_XML, encoding="utf-8")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("x\n", encoding="utf-8")
    return root


@pytest.fixture
def voc(tmp_path) -> Path:
    return make_voc(tmp_path / "voc")


# --------------------------------------------------------------------------------------------
# VOC XML annotations


@st.composite
def voc_xml(draw) -> bytes:
    """A VOC annotation with random field values (some tags left out), maybe byte-corrupted."""
    def tag(name: str, value: str | None) -> str:
        return "" if value is None else f"<{name}>{escape(value)}</{name}>"

    opt = st.none() | FIELD
    size = tag("width", draw(opt)) + tag("height", draw(opt))
    objects = []
    for _ in range(draw(st.integers(0, 3))):
        box = "".join(tag(t, draw(opt)) for t in ("xmin", "ymin", "xmax", "ymax"))
        name = draw(st.none() | st.sampled_from(["cat", "dog"]) | st.text(max_size=8))
        objects.append(f"<object>{tag('name', name)}{tag('difficult', draw(opt))}{tag('truncated', draw(opt))}"
                       f"<bndbox>{box}</bndbox></object>")
    raw = f"<annotation><size>{size}</size>{''.join(objects)}</annotation>".encode("utf-8")
    return draw(st.just(raw) | corrupted(raw))


@pytest.mark.fuzz
@fuzz(max_examples=150)
@given(xml=voc_xml() | corrupted(VALID_XML.encode()))
def test_annotation_fuzz(voc, xml):
    (voc / "Annotations" / "x.xml").write_bytes(xml)
    ds = expect(DatasetError, VOCDataset, voc, "trainval", name="x.xml")
    if isinstance(ds, VOCDataset):
        (r,) = ds.records
        assert (r.width, r.height) == (40, 30)   # the image header decides, whatever <size> says
        b = r.boxes
        assert b.dtype == np.float32 and b.shape == (len(r.labels), 4) and np.isfinite(b).all()
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 40).all() and (b[:, 3] <= 30).all()
        assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()
        assert ((r.labels >= 0) & (r.labels < len(ds.classes))).all()


@pytest.mark.fuzz
@fuzz(max_examples=60)
@given(text=st.lists(st.text(max_size=300), max_size=4).map("\n".join).map(str.encode) | corrupted(b"x\nx 1\n"))
def test_split_file_fuzz(voc, text):
    (voc / "ImageSets" / "Main" / "fuzz.txt").write_bytes(text)
    ds = expect(DatasetError, VOCDataset, voc, "fuzz")
    if isinstance(ds, VOCDataset):
        assert [r.image_id for r in ds] == ["x"]


@pytest.mark.parametrize("image_id", ["a" * 300, "\u00e9" * 150])
def test_overlong_image_id(voc, image_id):
    """Longer than a file name may be: a DatasetError, not the OS's "File name too long"."""
    (voc / "ImageSets" / "Main" / "long.txt").write_text(image_id + "\n", encoding="utf-8")
    err = expect(DatasetError, VOCDataset, voc, "long", name="long.txt")
    assert isinstance(err, DatasetError)


def _doctype(internal: str) -> str:
    return f'<?xml version="1.0"?>\n<!DOCTYPE annotation [\n{internal}\n]>\n'


def test_entity_expansion_and_external_entities_are_refused(voc, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET", encoding="utf-8")
    lol = '<!ENTITY lol "lolololololololololol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
    hostile = {
        "billion laughs": _doctype(lol) + "<annotation><object><name>&lol9;</name></object></annotation>",
        "quadratic blowup": _doctype(f'<!ENTITY a "{"x" * 50_000}">')
        + f"<annotation><object><name>{'&a;' * 20_000}</name></object></annotation>",
        "external entity": _doctype(f'<!ENTITY xxe SYSTEM "file://{secret}">')
        + "<annotation><object><name>&xxe;</name></object></annotation>",
        "external parameter entity": _doctype(f'<!ENTITY % xxe SYSTEM "file://{secret}"> %xxe;')
        + "<annotation></annotation>",
        "external DTD": f'<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "file://{secret}">'
        "<annotation><object><name>&secret;</name></object></annotation>",
    }
    for what, xml in hostile.items():
        (voc / "Annotations" / "x.xml").write_text(xml, encoding="utf-8")
        t0 = time.perf_counter()
        with pytest.raises(DatasetError, match="x.xml") as info:
            VOCDataset(voc, "trainval")
        assert time.perf_counter() - t0 < 5, what          # refused, not expanded
        assert "TOPSECRET" not in str(info.value), what    # nothing of the file was read


# --------------------------------------------------------------------------------------------
# images


@pytest.mark.fuzz
@pytest.mark.parametrize("fmt", sorted(VALID_IMAGES))
@fuzz(max_examples=40)
@given(data=st.data())
def test_image_fuzz(tmp_path, fmt, data):
    path = tmp_path / "i.jpg"
    path.write_bytes(data.draw(corrupted(VALID_IMAGES[fmt])))
    arr = expect(DatasetError, read_image, path, name="i.jpg")
    if isinstance(arr, np.ndarray):
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        assert image_size(path) == (arr.shape[1], arr.shape[0])


def test_non_raster_formats_are_refused(tmp_path):
    """Pillow sniffs the content: an EPS named .jpg would run Ghostscript when decoded. Only the
    raster formats of detection.data.images.IMAGE_FORMATS are opened."""
    path = tmp_path / "i.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DatasetError, match="i.jpg"):
        read_image(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` with 64 bytes of pixel data: Pillow opens it (the
    size is read lazily; without an IDAT chunk Pillow would not even identify the file)."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))


def _jpeg_with_size(width: int, height: int) -> bytes:
    data = bytearray(VALID_IMAGES["JPEG"])
    sof = data.index(b"\xff\xc0")                      # baseline SOF0: length, precision, height, width
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(VALID_IMAGES["BMP"])
    data[18:26] = struct.pack("<ii", width, height)    # BITMAPINFOHEADER: signed width, height
    return bytes(data)


@pytest.mark.fuzz
@fuzz(max_examples=60)
@given(header=st.one_of(
    st.tuples(st.just("png"), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("jpeg"), st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1)),
    st.tuples(st.just("bmp"), st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1)),
))
def test_declared_image_size_fuzz(tmp_path, header):
    """A header may declare any size: above MAX_IMAGE_PIXELS it is refused before decoding
    (decompression bomb guard); below, reading fails or works, but never otherwise."""
    kind, w, h = header
    path = tmp_path / "i.jpg"
    path.write_bytes({"png": _png_header, "jpeg": _jpeg_with_size, "bmp": _bmp_with_size}[kind](w, h))
    size = expect(DatasetError, image_size, path, name="i.jpg")
    if kind in ("png", "jpeg") and w * h > MAX_IMAGE_PIXELS and w < 2**31 and h < 2**31:
        assert isinstance(size, DatasetError) and "limit" in str(size)   # ours or Pillow's bomb check
    if isinstance(size, tuple):
        assert 0 < size[0] * size[1] <= MAX_IMAGE_PIXELS
        if size[0] * size[1] <= 4_000_000:
            expect(DatasetError, read_image, path, name="i.jpg")


def test_huge_declared_size_is_refused_before_decoding(tmp_path):
    path = tmp_path / "i.jpg"
    for size in ((10_000, 8_000), (60_000, 60_000)):   # ours (80 MP) / also Pillow's bomb error (3.6 GP)
        path.write_bytes(_png_header(*size))
        if size[0] * size[1] < Image.MAX_IMAGE_PIXELS:
            assert Image.open(path).size == size          # a file Pillow would go on to decode
        t0 = time.perf_counter()
        with pytest.raises(DatasetError, match="i.jpg.*limit"):
            read_image(path)
        assert time.perf_counter() - t0 < 2


# --------------------------------------------------------------------------------------------
# devkit result files


RESULT_IDS = ["000001", "000002"]


@st.composite
def result_text(draw) -> bytes:
    field = st.sampled_from(RESULT_IDS + ["000003", "000001.jpg"]) | FIELD
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):   # a well-formed line with random numbers
            fields = [draw(st.sampled_from(RESULT_IDS))] + [draw(FIELD) for _ in range(5)]
        else:
            fields = draw(st.lists(field, max_size=8))
        lines.append(draw(st.sampled_from([" ", "\t", "  "])).join(fields))
    raw = draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8")
    return draw(st.just(raw) | corrupted(raw if raw else b"000001 0.5 1 2 3 4\n"))


def _records() -> list[ImageRecord]:
    return [ImageRecord(i, Path(f"{i}.jpg"), 100, 80, np.array([[10, 10, 50, 40]], np.float32),
                        np.zeros(1, np.int64), np.zeros(1, bool), np.zeros(1, bool)) for i in RESULT_IDS]


@pytest.mark.fuzz
@fuzz(max_examples=150)
@given(raw=result_text())
def test_result_file_fuzz(tmp_path, raw):
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_bytes(raw)
    dets = expect(DatasetError, read_result_file, path, RESULT_IDS, name=path.name)
    if isinstance(dets, DatasetError):
        return
    lines = [line for line in raw.decode("utf-8").splitlines() if line.split()]
    assert len(dets) == len(lines)
    assert np.isfinite(dets.scores).all() and np.isfinite(dets.boxes).all()
    assert set(dets.image_ids.tolist()) <= set(RESULT_IDS)
    with np.errstate(all="ignore"):     # 1e300-sized boxes overflow their areas: a number, not an error
        metrics = evaluate_detections(_records(), ["cat"], [dets], metric="voc10")
    assert 0.0 <= metrics["AP"]["cat"] <= 1.0


# --------------------------------------------------------------------------------------------
# proposal caches and R-CNN .mat files


def _valid_proposals(path: Path) -> bytes:
    ProposalSet.from_lists(["a", "b"], [np.array([[0, 0, 5, 5], [1, 2, 3, 4]], np.float32),
                                        np.array([[2, 2, 9, 9]], np.float32)], {"source": "test"}).save(path)
    return path.read_bytes()


class Exploit:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


NPZ_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.bool_, np.dtype("<U3")]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


@pytest.mark.fuzz
@fuzz(max_examples=80)
@given(data=st.data())
def test_proposal_cache_fuzz(tmp_path, data):
    path = tmp_path / "proposals_x.npz"
    valid = _valid_proposals(path)
    if data.draw(st.booleans()):
        path.write_bytes(data.draw(corrupted(valid)))
    else:   # an .npz with the right names (and others) holding arrays of any dtype and shape
        names = data.draw(st.lists(st.sampled_from(["image_ids", "boxes", "offsets", "metadata", "other"]),
                                   unique=True))
        arrays = {n: data.draw(NPZ_ARRAYS) for n in names}
        if "metadata" in arrays and data.draw(st.booleans()):
            arrays["metadata"] = np.array(json.dumps(data.draw(st.dictionaries(st.text(max_size=3), FIELD))))
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    ps = expect(CacheError, ProposalSet.load, path, name=path.name)
    if isinstance(ps, ProposalSet):
        assert ps.offsets[-1] == len(ps.boxes) and len(ps.offsets) == len(ps) + 1
        for image_id in ps.image_ids:
            assert ps.boxes_for(image_id).shape[1] == 4


def test_pickled_proposal_cache_is_refused_without_running_code(tmp_path):
    marker, path = tmp_path / "marker.txt", tmp_path / "proposals_x.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = Exploit(marker)
    with open(path, "wb") as f:
        np.savez(f, image_ids=payload, boxes=payload, offsets=payload, metadata=payload)
    with pytest.raises(CacheError, match=path.name):
        ProposalSet.load(path)
    assert not marker.exists()


def _cell(items: list) -> np.ndarray:
    cell = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        cell[i, 0] = item
    return cell


MAT_CELL_ITEM = st.one_of(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)),
    hnp.arrays(np.int32, st.tuples(st.integers(0, 4), st.sampled_from([3, 4, 5]))),
    st.text(min_size=1, max_size=6),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 9), min_size=1),
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(lambda v: _cell(v)),
)


@pytest.mark.fuzz
@fuzz(max_examples=60)
@given(data=st.data())
def test_rcnn_mat_fuzz(voc, tmp_path, data):
    ds = VOCDataset(voc, "trainval")
    path = tmp_path / "voc_2007_trainval.mat"
    valid = {"images": _cell(["x"]), "boxes": _cell([np.array([[4.0, 3, 25, 20]])])}
    scipy.io.savemat(path, valid)
    choice = data.draw(st.sampled_from(["bytes", "structure"]))
    if choice == "bytes":
        path.write_bytes(data.draw(corrupted(path.read_bytes())))
    else:
        images = data.draw(st.lists(st.sampled_from(["x", "y"]) | MAT_CELL_ITEM, max_size=3))
        boxes = data.draw(st.lists(MAT_CELL_ITEM, max_size=3))
        as_cell = data.draw(st.booleans())
        drop = data.draw(st.lists(st.sampled_from(["images", "boxes"]), unique=True, max_size=1))
        try:
            content = {"images": _cell(images) if as_cell else np.array(images or [""], dtype=str),
                       "boxes": _cell(boxes)}
            for key in drop:
                del content[key]
            scipy.io.savemat(path, content)
        except Exception:               # noqa: BLE001 - scipy cannot write this combination
            return
    ps = expect(DatasetError, load_rcnn_mat, path, ds, name=path.name)
    if isinstance(ps, ProposalSet):
        assert ps.image_ids == ("x",)
        b = ps.boxes_for("x")
        assert np.isfinite(b).all() and (b[:, 0::2] <= 40).all() and (b[:, 1::2] <= 30).all()


@pytest.mark.parametrize("boxes", ["text", "struct", "nested cell", "3 columns", "nan"])
def test_rcnn_mat_odd_boxes(voc, tmp_path, boxes):
    """Cells the fuzzer above rarely lines up with the dataset's image id."""
    value = {"text": "1 2 3 4", "struct": {"a": 1}, "nested cell": _cell([np.ones((1, 4))]),
             "3 columns": np.ones((2, 3)), "nan": np.full((1, 4), np.nan)}[boxes]
    path = tmp_path / "voc_2007_trainval.mat"
    scipy.io.savemat(path, {"images": _cell(["x"]), "boxes": _cell([value])})
    err = expect(DatasetError, load_rcnn_mat, path, VOCDataset(voc, "trainval"), name=path.name)
    assert isinstance(err, DatasetError)


# --------------------------------------------------------------------------------------------
# model files and weights files


def _small_model(path: Path) -> bytes:
    save_model(path, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"classes": ["a"]})
    return path.read_bytes()


@pytest.mark.fuzz
@fuzz(max_examples=80)
@given(data=st.data())
def test_model_file_bytes_fuzz(tmp_path, data):
    path = tmp_path / "model.pt"
    path.write_bytes(data.draw(corrupted(_small_model(path))))
    out = expect(ModelError, load_model, path, name="model.pt")
    if isinstance(out, tuple):
        tensors, meta = out
        assert isinstance(meta, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory) -> tuple[dict, dict]:
    """Tensors and metadata of a real (random, tiny-headed) detector model file."""
    settings_ = DetectorSettings(scales=(96,), feature_layer="fc7")
    det = random_detector(build_backbone("zf5"), 2, settings_, hidden=(8, 8))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    det.save(path)
    SPPDetector.from_file(path)   # the unmutated file loads
    return load_model(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=5)


def _paths(tree, prefix=()):
    """Every (path) into a JSON tree of dicts and lists."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


@pytest.mark.fuzz
@fuzz(max_examples=60, seconds=120)
@given(data=st.data())
def test_model_file_content_fuzz(tmp_path, detector_file, data):
    """Valid container, hostile content: a meta value replaced or removed, a tensor replaced,
    removed or renamed. from_file either builds a consistent detector or raises ModelError --
    before allocating anything sized by the metadata."""
    tensors, meta = dict(detector_file[0]), json.loads(json.dumps(detector_file[1]))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(meta) if p]
        p = data.draw(st.sampled_from(paths))
        parent = meta
        for k in p[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[p[-1]]
        else:
            parent[p[-1]] = data.draw(JSON | st.integers(10**5, 10**12))
    if data.draw(st.booleans()):
        name = data.draw(st.sampled_from(sorted(tensors)))
        action = data.draw(st.sampled_from(["drop", "reshape", "rename"]))
        t = tensors.pop(name)
        if action == "reshape":
            tensors[name] = torch.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)), dtype=t.dtype)
        elif action == "rename":
            tensors[name + "x"] = t
    path = tmp_path / "model.pt"
    save_model(path, tensors, meta)
    det = expect(ModelError, SPPDetector.from_file, path, name="model.pt")
    if isinstance(det, SPPDetector):
        x = torch.zeros(1, det.head.in_dim)
        det.score_windows(x)          # dims fit end to end


@pytest.mark.parametrize("edit", [
    ("settings", [1]),                                  # not a mapping
    ("settings", {"levels": "abc"}),                    # wrong type inside
    ("settings", {"levels": [1]}),                      # pool5 no longer fits fc6: detect() would crash
    ("settings", {"feature_layer": "fc9"}),
    ("settings", {"scales": [0]}),
    ("classes", 5),
    ("classes", ["a", "a"]),
    ("head", {"svd_ranks": {"dropout": 3}}),
])
def test_model_metadata_odd_values(tmp_path, detector_file, edit):
    tensors, meta = detector_file
    meta = json.loads(json.dumps(meta))
    key, value = edit
    if isinstance(value, dict) and isinstance(meta[key], dict):
        meta[key].update(value)
    else:
        meta[key] = value
    save_model(tmp_path / "model.pt", tensors, meta)
    err = expect(ModelError, SPPDetector.from_file, tmp_path / "model.pt", name="model.pt")
    assert isinstance(err, ModelError)


def test_model_metadata_cannot_make_the_loader_allocate(tmp_path, detector_file):
    """fc6 declared 100,000 wide (a 5 GB layer if built before the tensors are checked)."""
    tensors, meta = detector_file
    meta = json.loads(json.dumps(meta))
    meta["head"]["hidden"] = [100_000, 8]
    save_model(tmp_path / "model.pt", tensors, meta)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="model.pt"):
        SPPDetector.from_file(tmp_path / "model.pt")
    assert time.perf_counter() - t0 < 5


@pytest.fixture(scope="module")
def zf5_weights(tmp_path_factory) -> Path:
    """A valid ZF-5 state-dict file (a path: hypothesis prints a failing example's arguments)."""
    path = tmp_path_factory.mktemp("weights") / "zf5.pth"
    torch.save(ZF5().state_dict(), path)
    return path


@pytest.mark.fuzz
@fuzz(max_examples=25, seconds=120)
@given(data=st.data())
def test_weights_file_bytes_fuzz(tmp_path, zf5_weights, data):
    path = tmp_path / "w.pth"
    # Flipping bits in 15 MB mostly hits tensor data: aim the corruption at both ends.
    valid = zf5_weights.read_bytes()
    head, tail = valid[:4096], valid[-4096:]
    where = data.draw(st.sampled_from(["head", "tail", "all"]))
    if where == "head":
        raw = data.draw(corrupted(head)) + valid[4096:]
    elif where == "tail":
        raw = valid[:-4096] + data.draw(corrupted(tail))
    else:
        raw = data.draw(corrupted(valid[:65536]))
    path.write_bytes(raw)
    expect(ModelError, build_backbone, "zf5", weights=path, name="w.pth")


TENSORS = st.one_of(
    st.lists(st.integers(0, 4), max_size=3).map(lambda s: torch.zeros(s)),
    st.sampled_from([torch.zeros(96, 3, 7, 7, dtype=torch.float16), torch.zeros(96, 3, 7, 7, dtype=torch.int64),
                     torch.zeros(96, 3, 7, 7, dtype=torch.bool), torch.zeros(96, 3, 7, 7, dtype=torch.complex64),
                     torch.zeros(96, dtype=torch.float64), torch.zeros(96, 3, 7, 7).to_sparse()]),
)


@pytest.mark.fuzz
@fuzz(max_examples=40, seconds=120)
@given(data=st.data())
def test_weights_file_content_fuzz(tmp_path, data):
    state = dict(ZF5().state_dict())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(list(state) + ["extra", 7, ""]))
        state[key] = data.draw(TENSORS | JSON)
    if data.draw(st.booleans()):
        state = data.draw(st.sampled_from([{"state_dict": state}, [state], {"state_dict": 5}, state]))
    path = tmp_path / "w.pth"
    torch.save(state, path)
    expect(ModelError, build_backbone, "zf5", weights=path, name="w.pth")


@pytest.mark.parametrize("change", ["int key", "sparse tensor", "meta tensor", "complex tensor", "str value"])
def test_odd_state_dicts(tmp_path, change):
    """Cases the fuzzer above rarely combines: each must load or be a ModelError naming the file."""
    state = dict(ZF5().state_dict())
    w = state["features.0.weight"]
    state.update({"int key": {7: torch.zeros(2)}, "sparse tensor": {"features.0.weight": w.to_sparse()},
                  "meta tensor": {"features.0.weight": w.to("meta")},
                  "complex tensor": {"features.0.weight": w.to(torch.complex64)},
                  "str value": {"features.0.weight": "w"}}[change])
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch warns about casting complex values to real
        expect(ModelError, build_backbone, "zf5", weights=path, name="w.pth")


@pytest.mark.parametrize("wrap", ["bare", "in_state_dict", "legacy_pickle"])
def test_pickled_weights_are_refused_without_running_code(tmp_path, wrap):
    marker, path = tmp_path / "marker.txt", tmp_path / "w.pth"
    payload = Exploit(marker)
    if wrap == "legacy_pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload if wrap == "bare" else {"features.0.weight": payload}, path)
    with pytest.raises(ModelError, match="w.pth"):
        build_backbone("zf5", weights=path)
    with pytest.raises(ModelError, match="w.pth"):
        load_model(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# YAML configs


def _load_pipeline_config(path: Path) -> PipelineConfig:
    """What tools/run_pipeline.py --config does."""
    return merge(PipelineConfig(), read_yaml_mapping(path))


def _config_keys(d, prefix=()):
    out = []
    for k, v in d.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _config_keys(v, prefix + (k,))
    return out


CONFIG_KEYS = _config_keys(to_dict(PipelineConfig()))


@st.composite
def config_yaml(draw) -> bytes:
    """Real config keys (and a few unknown ones) with random values, as YAML; maybe corrupted."""
    tree: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(CONFIG_KEYS) | st.tuples(st.text(max_size=4)))
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
        node[key[-1]] = draw(JSON | st.sampled_from([[480, 688], "spp", "fast", True, 0.001]))
    raw = yaml.safe_dump(tree).encode("utf-8")
    return draw(st.just(raw) | corrupted(raw) | st.text(max_size=200).map(str.encode))


@pytest.mark.fuzz
@fuzz(max_examples=150)
@given(raw=config_yaml())
def test_yaml_config_fuzz(tmp_path, raw):
    path = tmp_path / "config.yaml"
    path.write_bytes(raw)
    cfg = expect(ConfigError, _load_pipeline_config, path)
    if isinstance(cfg, PipelineConfig):
        assert merge(PipelineConfig(), to_dict(cfg)) == cfg


@pytest.mark.fuzz
@fuzz(max_examples=80)
@given(items=st.lists(st.text(max_size=20) | st.tuples(st.sampled_from([".".join(k) for k in CONFIG_KEYS]), FIELD)
                      .map("=".join), max_size=4))
def test_override_fuzz(items):
    def apply():
        return merge(PipelineConfig(), parse_overrides(items))
    expect(ConfigError, apply)


def test_hostile_yaml_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    # Nine levels of nine aliases: 20 lines of YAML, a list of 9**9 strings when printed.
    bomb = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"
    hostile = {
        "python object tag": f"backbone: !!python/object/apply:pathlib.Path.touch [{str(marker)!r}]\n",
        "alias bomb in place of a section": f"data: {bomb}\n",
        "deep nesting": "features: {scales: " + "[" * 5000 + "]" * 5000 + "}\n",
        "mixed key types": "1: 2\nmethod: spp\n",
        "not UTF-8": b"method: \xff\xfe spp\n",
        "not a mapping": "- a\n- b\n",
    }
    for what, text in hostile.items():
        path = tmp_path / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        # CPU seconds, not wall: a loaded machine must not fail the test (a bomb would take hours).
        t0 = time.process_time()
        err = expect(ConfigError, _load_pipeline_config, path)
        assert isinstance(err, ConfigError), what
        assert time.process_time() - t0 < 5, what
        assert len(str(err)) < 2000, what
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# the conv-map cache


def _convmap_cache(tmp_path: Path) -> ConvMapCache:
    cache = ConvMapCache.create(tmp_path / "feat", {"format_version": CONVMAP_FORMAT_VERSION, "scales": [64], "dtype": "float32",
                                                    "stride": 16, "channels": 2, "first_cell_center": 0.5})
    cache.write_record("x", [np.ones((2, 3, 4), np.float32)],
                       {"factors": [1.0], "map_shapes": [[2, 3, 4]], "input_shapes": [[48, 64]], "image_size": [48, 64]})
    return cache


@pytest.mark.fuzz
@fuzz(max_examples=60)
@given(data=st.data())
def test_convmap_cache_fuzz(tmp_path, data):
    cache = _convmap_cache(Path(tempfile.mkdtemp(dir=tmp_path)))
    what = data.draw(st.sampled_from(["map", "marker", "meta"]))
    if what == "map":
        path = cache.map_path("x", 0)
        path.write_bytes(data.draw(corrupted(path.read_bytes())))
        out = expect(CacheError, cache.maps, "x", name="s0.npy")
    elif what == "marker":
        path = cache.record_dir("x") / ConvMapCache.DONE
        info = json.loads(path.read_text())
        info[data.draw(st.sampled_from(sorted(info)))] = data.draw(JSON)
        path.write_bytes(data.draw(st.just(json.dumps(info).encode()) | corrupted(path.read_bytes())))
        out = expect(CacheError, ConvMapCache.open(cache.root).maps, "x")
    else:
        path = cache.root / ConvMapCache.META
        path.write_bytes(data.draw(corrupted(path.read_bytes())))
        out = expect(CacheError, ConvMapCache.open, cache.root, name="meta.json")
    if isinstance(out, list):
        assert all(m.ndim == 3 for m in out)
