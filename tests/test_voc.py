"""VOC-layout reader: XML parsing, the 1-based -> 0-based conversion, class lists, image decoding
of every pixel format real data holds, flips, and a DatasetError naming the file for bad input."""
from __future__ import annotations

import logging
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.boxes import internal_to_voc
from detection.data.images import MAX_IMAGE_PIXELS, load_image, read_image
from detection.data.voc import VOC_CLASSES, VOCDataset, flip_record
from detection.errors import DatasetError

# --------------------------------------------------------------------------------------------
# helpers: write a tiny VOC-layout dataset by hand


def _obj(name: str, box: tuple, difficult: str | None = "0", truncated: str | None = "0") -> str:
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    flags = ""
    if difficult is not None:
        flags += f"<difficult>{difficult}</difficult>"
    if truncated is not None:
        flags += f"<truncated>{truncated}</truncated>"
    return f"<object><name>{name}</name>{flags}<bndbox>{tags}</bndbox></object>"


def _xml(objects: list[str], size: tuple[int, int] | None = (64, 48)) -> str:
    size_xml = ""
    if size is not None:
        size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return f"<annotation><filename>x.jpg</filename>{size_xml}{''.join(objects)}</annotation>"


def _write(root: Path, images: dict[str, tuple[str, Image.Image | bytes | None]],
           splits: dict[str, str]) -> Path:
    """images: id -> (xml text, PIL image saved as <id>.jpg | raw bytes | None for no file)."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (xml, img) in images.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")
        dest = root / "JPEGImages" / f"{image_id}.jpg"
        if isinstance(img, bytes):
            dest.write_bytes(img)
        elif img is not None:
            img.save(dest, format="PNG" if img.mode in ("RGBA", "P", "I;16", "1") else "JPEG", quality=95)
    for split, text in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(text, encoding="utf-8")
    return root


def _grey(w: int = 64, h: int = 48) -> Image.Image:
    return Image.new("RGB", (w, h), (128, 128, 128))


# --------------------------------------------------------------------------------------------
# XML parsing and conversion


def test_flags_present_and_missing_and_sizes(tmp_path, caplog):
    root = _write(tmp_path / "d", {
        "a": (_xml([_obj("cat", (1, 2, 10, 20), "1", "1"), _obj("dog", (5, 5, 30, 40), None, None)]), _grey()),
        "nosize": (_xml([_obj("cat", (1, 1, 64, 48))], size=None), _grey()),
        "zero": (_xml([_obj("cat", (1, 1, 8, 8))], size=(0, 0)), _grey()),
        "wrong": (_xml([_obj("dog", (1, 1, 8, 8))], size=(640, 480)), _grey()),
        "empty": (_xml([]), _grey()),
    }, {"trainval": "a\nnosize\n\nzero\nwrong\nempty\n"})
    with caplog.at_level(logging.WARNING, logger="detection.data.voc"):
        ds = VOCDataset(root, "trainval")
    assert [r.image_id for r in ds] == ["a", "nosize", "zero", "wrong", "empty"]
    a = ds[0]
    np.testing.assert_array_equal(a.difficult, [True, False])
    np.testing.assert_array_equal(a.truncated, [True, False])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    for r in ds:
        assert (r.width, r.height) == (64, 48)
    assert ds.size_from_image == ("nosize", "zero")
    assert ds.size_mismatch == ("wrong",)
    assert "2 annotation(s) give no or a zero <size>" in caplog.text
    assert "1 annotation(s) give a <size> that disagrees" in caplog.text
    empty = ds[4]  # an image without objects is a valid record
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)


def test_one_based_inclusive_boxes_cover_exactly_the_drawn_pixels(tmp_path):
    """A rectangle painted on 0-based columns 10..29, rows 5..14 is VOC box (11, 6, 30, 15) and
    internal box (10, 5, 30, 15): slicing [y1:y2, x1:x2] gives exactly the painted pixels."""
    arr = np.zeros((40, 50, 3), np.uint8)
    arr[5:15, 10:30] = 255
    root = _write(tmp_path / "d", {"p": (_xml([_obj("cat", (11, 6, 30, 15))], (50, 40)), Image.fromarray(arr))},
                  {"trainval": "p\n"})
    (root / "JPEGImages" / "p.jpg").unlink()
    Image.fromarray(arr).save(root / "JPEGImages" / "p.png")  # lossless; also tests the .png fallback
    rec = VOCDataset(root, "trainval")[0]
    np.testing.assert_array_equal(rec.boxes, [[10, 5, 30, 15]])
    np.testing.assert_array_equal(internal_to_voc(rec.boxes), [[11, 6, 30, 15]])
    img = load_image(rec)
    x1, y1, x2, y2 = rec.boxes[0].astype(int)
    assert (img[y1:y2, x1:x2] == 255).all()
    assert img.sum() == 255 * 3 * (x2 - x1) * (y2 - y1)  # nothing painted outside the box


def test_fractional_coordinates_are_kept(tmp_path):
    root = _write(tmp_path / "d", {"f": (_xml([_obj("cat", ("3.5", "2.25", "20.5", "30"))]), _grey())},
                  {"trainval": "f\n"})
    np.testing.assert_allclose(VOCDataset(root, "trainval")[0].boxes, [[2.5, 1.25, 20.5, 30]])


def test_box_partly_outside_is_clipped_with_a_warning(tmp_path, caplog):
    root = _write(tmp_path / "d", {"c": (_xml([_obj("cat", (0, -3, 70, 40)), _obj("cat", (2, 2, 9, 9))]), _grey())},
                  {"trainval": "c\n"})
    with caplog.at_level(logging.WARNING, logger="detection.data.voc"):
        rec = VOCDataset(root, "trainval")[0]
    np.testing.assert_array_equal(rec.boxes, [[0, 0, 64, 40], [1, 1, 9, 9]])
    assert "1 box(es) reach outside their image and were clipped" in caplog.text


# --------------------------------------------------------------------------------------------
# class lists


def test_classes_inferred_from_all_splits_sorted(tmp_path):
    root = _write(tmp_path / "d", {
        "1": (_xml([_obj("zebra", (1, 1, 9, 9)), _obj("apple", (2, 2, 9, 9))]), _grey()),
        "2": (_xml([_obj("mango", (1, 1, 9, 9))]), _grey()),
        "3": (_xml([_obj("apple", (1, 1, 9, 9))]), _grey()),  # in no split: still scanned
    }, {"trainval": "1\n", "test": "2\n"})
    tv, te = VOCDataset(root, "trainval"), VOCDataset(root, "test")
    assert tv.classes == te.classes == ("apple", "mango", "zebra")
    np.testing.assert_array_equal(tv[0].labels, [2, 0])
    np.testing.assert_array_equal(te[0].labels, [1])


def test_voc_folder_gets_voc_class_order(tmp_path):
    images = {"000001": (_xml([_obj("person", (1, 1, 9, 9)), _obj("cat", (2, 2, 9, 9))]), _grey())}
    voc = VOCDataset(_write(tmp_path / "VOC2007", images, {"test": "000001\n"}), "test")
    assert voc.classes == VOC_CLASSES
    np.testing.assert_array_equal(voc[0].labels, [VOC_CLASSES.index("person"), VOC_CLASSES.index("cat")])
    # The same names in a folder not named like VOC: a dataset of its own, sorted names.
    other = VOCDataset(_write(tmp_path / "mine", images, {"test": "000001\n"}), "test")
    assert other.classes == ("cat", "person")


def test_user_class_list_skips_other_objects_with_a_warning(tmp_path, caplog):
    root = _write(tmp_path / "d", {
        "1": (_xml([_obj("zebra", (1, 1, 9, 9)), _obj("apple", (2, 2, 9, 9)), _obj("apple", (3, 3, 9, 9))]), _grey()),
    }, {"trainval": "1\n"})
    with caplog.at_level(logging.WARNING, logger="detection.data.voc"):
        ds = VOCDataset(root, "trainval", classes=["zebra", "kiwi"])
    assert ds.classes == ("zebra", "kiwi")
    np.testing.assert_array_equal(ds[0].labels, [0])
    np.testing.assert_array_equal(ds[0].boxes, [[0, 0, 9, 9]])
    assert "skipped 2 object(s)" in caplog.text and "apple" in caplog.text
    with pytest.raises(DatasetError, match="unique"):
        VOCDataset(root, "trainval", classes=["zebra", "zebra"])


def test_split_file_second_column_blank_lines_and_duplicates(tmp_path, caplog):
    root = _write(tmp_path / "d", {i: (_xml([_obj("cat", (1, 1, 9, 9))]), _grey()) for i in ("a", "b")},
                  {"cat_trainval": " a  1\n\n b -1\r\n a 1\n"})
    with caplog.at_level(logging.WARNING, logger="detection.data.voc"):
        ds = VOCDataset(root, "cat_trainval")
    assert [r.image_id for r in ds] == ["a", "b"]
    assert "1 duplicate id(s)" in caplog.text


# --------------------------------------------------------------------------------------------
# image decoding


def _dataset_with_image(tmp_path: Path, img: Image.Image | bytes, fmt: str | None = None) -> VOCDataset:
    """One-image dataset whose ``.jpg`` file holds ``img`` saved in ``fmt``."""
    root = _write(tmp_path / "d", {"i": (_xml([]), None)}, {"trainval": "i\n"})
    dest = root / "JPEGImages" / "i.jpg"
    if isinstance(img, bytes):
        dest.write_bytes(img)
    else:
        img.save(dest, format=fmt)
    return VOCDataset(root, "trainval")


def _pattern(w: int = 40, h: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 6, yy * 8, (xx + yy) * 3], axis=-1).astype(np.uint8)


def test_greyscale(tmp_path):
    grey = _pattern()[..., 0]
    out = load_image(_dataset_with_image(tmp_path, Image.fromarray(grey, "L"), "PNG")[0])
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


def test_png_named_jpg(tmp_path):
    rgb = _pattern()
    out = load_image(_dataset_with_image(tmp_path, Image.fromarray(rgb), "PNG")[0])
    np.testing.assert_array_equal(out, rgb)  # lossless PNG: exact


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:, :20, 3] = 255        # opaque left half
    rgba[:, 20:, 3] = 0          # transparent right half: stored colour must not leak
    rgba[:, 30:, 3] = 128        # half transparent strip
    out = load_image(_dataset_with_image(tmp_path, Image.fromarray(rgba, "RGBA"), "PNG")[0])
    assert out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out[:, :20], np.broadcast_to([10, 20, 30], (30, 20, 3)))
    np.testing.assert_array_equal(out[:, 20:30], 255)
    ref = np.round((128 * np.array([10, 20, 30]) + 127 * 255) / 255)  # alpha blend, 8-bit
    assert np.abs(out[:, 30:].astype(int) - ref).max() <= 1


def test_palette_with_and_without_transparency(tmp_path):
    idx = (np.arange(40)[None, :] // 10 + np.zeros((30, 1), int)).astype(np.uint8)  # 4 colour bands
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 50, 60, 70] + [0] * (256 * 3 - 12)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette)
    out = load_image(_dataset_with_image(tmp_path / "plain", img, "PNG")[0])
    np.testing.assert_array_equal(out[0, ::10], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [50, 60, 70]])
    img.info["transparency"] = 3  # index 3 transparent -> white
    out = load_image(_dataset_with_image(tmp_path / "transparent", img, "PNG")[0])
    np.testing.assert_array_equal(out[0, ::10], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]])


def test_cmyk_jpeg(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (200, 40, 40)
    rgb[:, 16:32] = (40, 200, 40)
    rgb[:, 32:] = (40, 40, 200)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    ds = _dataset_with_image(tmp_path, cmyk, "JPEG")
    assert Image.open(ds[0].path).mode == "CMYK"
    out = load_image(ds[0])
    # JPEG is lossy: compare the band centres with a tolerance.
    for x, colour in ((8, (200, 40, 40)), (24, (40, 200, 40)), (40, (40, 40, 200))):
        assert np.abs(out[16, x].astype(int) - colour).max() <= 12


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey16 = (np.arange(40)[None, :] * 1600 + np.zeros((30, 1), int)).astype(np.uint16)  # 0..62400
    ds = _dataset_with_image(tmp_path, Image.fromarray(grey16), "PNG")
    out = load_image(ds[0])
    ref = np.round(grey16 * (255 / 65535)).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], ref)
    np.testing.assert_array_equal(out[..., 2], ref)


def test_exif_orientation_is_not_applied(tmp_path):
    """VOC boxes refer to the stored pixels: a rotate-90 EXIF tag must not rotate the array."""
    img = Image.fromarray(_pattern(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW when displayed
    root = _write(tmp_path / "d", {"e": (_xml([]), None)}, {"trainval": "e\n"})
    img.save(root / "JPEGImages" / "e.jpg", format="JPEG", exif=exif)
    rec = VOCDataset(root, "trainval")[0]
    assert (rec.width, rec.height) == (40, 30)
    assert load_image(rec).shape == (30, 40, 3)


# --------------------------------------------------------------------------------------------
# flips


def test_flip_boxes_and_pixels_agree(tmp_path):
    arr = np.full((40, 64, 3), 30, np.uint8)
    arr[8:20, 5:17] = (250, 0, 0)  # an off-centre red box: columns 5..16, rows 8..19
    root = _write(tmp_path / "d", {"f": (_xml([_obj("cat", (6, 9, 17, 20))], (64, 40)), None)}, {"trainval": "f\n"})
    Image.fromarray(arr).save(root / "JPEGImages" / "f.png")
    ds = VOCDataset(root, "trainval", use_flipped=True)
    assert len(ds) == 2 and not ds[0].flipped and ds[1].flipped and ds[1].key == "f_flip"
    flipped = ds[1]
    np.testing.assert_array_equal(flipped.boxes, [[64 - 17, 8, 64 - 5, 20]])
    img = load_image(flipped)
    x1, y1, x2, y2 = flipped.boxes[0].astype(int)
    assert (img[y1:y2, x1:x2] == (250, 0, 0)).all()
    assert (img == (250, 0, 0)).all(axis=2).sum() == (x2 - x1) * (y2 - y1)
    np.testing.assert_array_equal(img, load_image(ds[0])[:, ::-1])
    assert img.flags["C_CONTIGUOUS"]
    back = flip_record(flipped)
    assert not back.flipped
    np.testing.assert_array_equal(back.boxes, ds[0].boxes)


# --------------------------------------------------------------------------------------------
# bad input: DatasetError naming the file


def _raises_naming(name: str, fn, *args, **kwargs) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    assert name in str(info.value), str(info.value)
    return info.value


def _one(tmp_path: Path, xml: str, img=None, split: str = "x\n") -> Path:
    return _write(tmp_path / "d", {"x": (xml, _grey() if img is None else img)}, {"trainval": split})


def test_malformed_xml(tmp_path):
    root = _one(tmp_path, "<annotation><object><name>cat</name>")
    _raises_naming("x.xml", VOCDataset, root, "trainval")


def test_entity_expansion_is_refused(tmp_path):
    bomb = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            "<annotation><object><name>&lol2;</name></object></annotation>")
    _raises_naming("x.xml", VOCDataset, _one(tmp_path, bomb), "trainval")


@pytest.mark.parametrize("box, reason", [
    (("a", 1, 9, 9), "non-numeric"),
    ((1, 1, "", 9), "non-numeric"),
    ((1, 1, "nan", 9), "non-finite"),
    ((10, 1, 5, 9), "inverted"),
    ((1, 20, 9, 9), "inverted"),
    ((100, 100, 120, 120), "outside"),
])
def test_bad_boxes(tmp_path, box, reason):
    err = _raises_naming("x.xml", VOCDataset, _one(tmp_path, _xml([_obj("cat", box)])), "trainval")
    assert reason in str(err)


def test_bad_flag(tmp_path):
    _raises_naming("x.xml", VOCDataset, _one(tmp_path, _xml([_obj("cat", (1, 1, 9, 9), difficult="maybe")])),
                   "trainval")


def test_missing_image_and_missing_xml(tmp_path):
    root = _write(tmp_path / "d", {"x": (_xml([]), None)}, {"trainval": "x\n", "test": "y\n"})
    _raises_naming("x.jpg", VOCDataset, root, "trainval")
    _raises_naming("y.xml", VOCDataset, root, "test")
    _raises_naming("nosuch.txt", VOCDataset, root, "nosuch")
    _raises_naming("elsewhere", VOCDataset, tmp_path / "elsewhere", "trainval")


def test_truncated_jpeg(tmp_path):
    ok = tmp_path / "ok.jpg"
    Image.fromarray(_pattern(200, 150)).save(ok, format="JPEG")
    data = ok.read_bytes()
    ds = _dataset_with_image(tmp_path, data[: len(data) // 2])  # header intact: constructs
    _raises_naming("i.jpg", load_image, ds[0])


def test_random_bytes(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    root = _write(tmp_path / "d", {"i": (_xml([]), noise)}, {"trainval": "i\n"})
    _raises_naming("i.jpg", VOCDataset, root, "trainval")
    _raises_naming("i.jpg", read_image, root / "JPEGImages" / "i.jpg")


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "/etc/passwd", "a\\b", "..", "a\x00b", "C:evil"])
def test_unsafe_image_ids(tmp_path, bad_id):
    err = _raises_naming("trainval.txt", VOCDataset, _one(tmp_path, _xml([]), split=f"{bad_id}\n"), "trainval")
    assert repr(bad_id) in str(err)


def test_unsafe_split_name(tmp_path):
    _raises_naming("../x", VOCDataset, _one(tmp_path, _xml([])), "../x")


def test_empty_split(tmp_path):
    err = _raises_naming("trainval.txt", VOCDataset, _one(tmp_path, _xml([]), split="\n  \n"), "trainval")
    assert "lists no images" in str(err)


def test_image_changed_after_reading(tmp_path):
    ds = _dataset_with_image(tmp_path, _grey(64, 48), "JPEG")
    _grey(32, 32).save(ds[0].path, format="JPEG")
    _raises_naming("i.jpg", load_image, ds[0])


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring this size with 64 bytes of pixel data: Pillow reads the size lazily.
    (Fix: with IHDR alone Pillow 13 does not identify the file, so the test passed without
    reaching the size guard.)"""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(10_000, 8_000), (30_000, 30_000)])  # ours / also Pillow's bomb error
def test_decompression_bomb_refused(tmp_path, size):
    assert size[0] * size[1] > MAX_IMAGE_PIXELS
    root = _write(tmp_path / "d", {"i": (_xml([]), _png_header(*size))}, {"trainval": "i\n"})
    err = _raises_naming("i.jpg", VOCDataset, root, "trainval")
    assert "limit" in str(err)


# --------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_tracks_content(tmp_path):
    root = _write(tmp_path / "d", {i: (_xml([_obj("cat", (1, 1, 9, 9))]), _grey()) for i in ("a", "b")},
                  {"trainval": "a\nb\n", "test": "a\n"})
    fp = VOCDataset(root, "trainval").fingerprint()
    assert isinstance(fp, str) and fp == VOCDataset(root, "trainval").fingerprint()
    assert fp == VOCDataset(root, "trainval", use_flipped=True).fingerprint()  # record keys differ already
    assert fp != VOCDataset(root, "test").fingerprint()
    assert fp != VOCDataset(root, "trainval", classes=["cat", "dog"]).fingerprint()
    (root / "Annotations" / "b.xml").write_text(_xml([_obj("cat", (1, 1, 19, 19))]), encoding="utf-8")
    assert VOCDataset(root, "trainval").fingerprint() != fp


def test_fingerprint_is_the_content_not_the_place_or_the_file_times(tmp_path):
    root = _write(tmp_path / "d", {i: (_xml([_obj("cat", (1, 1, 9, 9))]), _grey()) for i in ("a", "b")},
                  {"trainval": "a\nb\n"})
    fp = VOCDataset(root, "trainval").fingerprint()
    # A copy elsewhere with new file times (what cp, rsync without -t or a download give) keys the same caches.
    copy = Path(shutil.copytree(root, tmp_path / "elsewhere", copy_function=shutil.copyfile))
    image = next((copy / "JPEGImages").glob("b.*"))
    os.utime(image, ns=(1, 1))
    assert VOCDataset(copy, "trainval").fingerprint() == fp
    # One byte of the image changed in place, its size and time given back: new caches.
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-3] ^= 0x01          # in the last bytes of the compressed pixels: the header still reads
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_size == stat.st_size
    assert VOCDataset(copy, "trainval").fingerprint() != fp


# --------------------------------------------------------------------------------------------
# the real messy data (skipped without /work/shared)


def test_fruit_reads_and_zero_sizes_come_from_headers(shared_dir):
    root = shared_dir / "data" / "fruit"
    if not root.is_dir():
        pytest.skip("fruit data absent")
    tv, te = VOCDataset(root, "trainval"), VOCDataset(root, "test")
    assert (len(tv), len(te)) == (240, 60)
    assert tv.classes == te.classes == ("apple", "banana", "orange")
    zero = set(tv.size_from_image) | set(te.size_from_image)
    assert len(zero) == 37  # README: 37 XML files say width/height 0
    by_id = {r.image_id: r for r in [*tv, *te]}
    for image_id in zero:
        rec = by_id[image_id]
        with Image.open(rec.path) as im:
            assert im.size == (rec.width, rec.height)
    for rec in [*tv, *te]:
        assert len(rec.boxes) > 0
        assert (rec.boxes[:, 2] <= rec.width).all() and (rec.boxes[:, 3] <= rec.height).all()
        assert (rec.boxes[:, :2] >= 0).all() and (rec.boxes[:, 2:] > rec.boxes[:, :2]).all()
    # Fully decode a handful: one of each kind of file the README lists.
    kinds: dict[tuple, Path] = {}
    for rec in tv:
        with Image.open(rec.path) as im:
            kinds.setdefault((im.format, im.mode), rec)
    assert {("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P")} <= set(kinds)
    for rec in kinds.values():
        img = load_image(rec)
        assert img.dtype == np.uint8 and img.shape == (rec.height, rec.width, 3)


def test_raccoon_reads(shared_dir):
    root = shared_dir / "data" / "raccoon"
    if not root.is_dir():
        pytest.skip("raccoon data absent")
    tv, te = VOCDataset(root, "trainval"), VOCDataset(root, "test")
    assert (len(tv), len(te)) == (160, 40) and tv.classes == ("raccoon",)
    assert sum(len(r.boxes) for r in [*tv, *te]) == 217
    greys = []
    for rec in tv:
        with Image.open(rec.path) as im:
            if im.mode == "L":
                greys.append(rec)
    for rec in greys[:2]:
        assert load_image(rec).shape == (rec.height, rec.width, 3)
