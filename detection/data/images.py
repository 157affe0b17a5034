"""Image files -> uint8 RGB pixels, whatever the file holds, with the checks real datasets need.

Real datasets are messy (photo sets gathered from the web, such as the fruit set in docs/benchmarks.md): files named ``.jpg`` may be PNGs
with alpha or palettes, 16-bit greyscale, CMYK, cut short, or decompression bombs. The header
(read lazily, no decode) gives the size; :func:`read_image` decodes anything Pillow reads from a
short list of raster formats into RGB; a truncated JPEG missing only a few rows loads with a
warning; anything else is a :class:`~detection.errors.DatasetError` that names the file.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DatasetError
from ..io.paths import describe_missing
from .names import is_file, show_path
from .records import ImageRecord

__all__ = ["MAX_IMAGE_PIXELS", "IMAGE_FORMATS", "MAX_TRUNCATED_FRACTION", "image_size", "read_image",
           "inspect_image", "load_image"]

log = logging.getLogger(__name__)


#: Largest image accepted, in pixels: 64 MP (8000x8000, ~190 MB decoded RGB) is 4x the largest
#: photo in the shared data (3160x4605 = 14.6 MP) and stays below Pillow's own
#: decompression-bomb warning threshold (~89 MP), so an accepted image never trips it; anything
#: larger is far beyond what SPP-net's scales (<= 1200 px) use and is refused as a likely bomb.
MAX_IMAGE_PIXELS = 64_000_000

#: Formats Pillow may open (it sniffs the content, whatever the suffix): the raster formats
#: photos come in. Anything else is refused as unreadable -- in particular EPS, whose loader
#: runs Ghostscript on the file, and the rarely used decoders that see little fuzzing.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")

#: A truncated JPEG (its data ends early; browsers and OpenCV show it) loads, with a warning,
#: when the rows its data does not determine are at most this fraction of its height: a file a
#: few bytes short loses its last row of 8 or 16 pixel blocks (3% of a 480-row photo); a file
#: cut in half is refused (the detector would be shown a grey half-image).
MAX_TRUNCATED_FRACTION = 0.1

#: What a suffix says the file holds (a mismatch is reported as imperfect, and read anyway).
_SUFFIX_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}

#: Bytes at the end of a JPEG searched for its end-of-image marker when a dataset is read: some
#: cameras append a few kB after the marker; reading more would read most of every file.
_JPEG_TAIL_BYTES = 4096

#: Pillow modes that need a conversion to RGB (reported as imperfect, and converted).
_PLAIN_MODES = ("RGB", "L")

#: Errors Pillow raises for unreadable, truncated or hostile files.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError,
                 Image.DecompressionBombError, UnidentifiedImageError)


def _open_checked(path: Path) -> Image.Image:
    """``Image.open`` (lazy: header only) with the pixel limit; errors -> DatasetError."""
    if not is_file(path):   # a folder or FIFO (opening one would wait forever) is not "missing"
        raise DatasetError(f"image {show_path(path)} {describe_missing(path)}")
    try:
        # No warnings filter here (it is process-global state): our limit is below Pillow's
        # warning threshold, so Pillow only warns about images we refuse anyway.
        img = Image.open(path, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist") from None
    except _IMAGE_ERRORS as e:
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise DatasetError(f"image {path} has an empty size {w}x{h}")
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise DatasetError(f"image {path} is {w}x{h} = {w * h} pixels, above the limit of "
                           f"{MAX_IMAGE_PIXELS} (detection.data.images.MAX_IMAGE_PIXELS); refusing a "
                           f"possible decompression bomb")
    return img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding the pixels."""
    with _open_checked(Path(path)) as img:
        return img.size


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 array[H, W, 3] RGB."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (Pillow opens 16-bit PNGs as I;16 or I): scale 0..65535 to 0..255
        # instead of Pillow's convert, which clips everything above 255 to white.
        a = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.round(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":  # float greyscale: assume 0..255 like Pillow's own "F" -> "L"
        grey = np.clip(np.round(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels: composite over white, as image viewers (and annotation tools
        # displaying the file) show them; the colour stored under alpha 0 is arbitrary (in the
        # shared fruit data some files store black there, others white).
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    # L, 1, P, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, RGB.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into uint8 array[H, W, 3] RGB, whatever the file holds.

    Pillow sniffs the content, so a PNG named ``.jpg`` reads fine. EXIF orientation is NOT
    applied: VOC boxes (and the sizes in the XML) refer to the stored pixel grid, and
    annotation tools such as labelImg draw on that grid; rotating would misplace every box.
    A truncated JPEG whose data still determines all but :data:`MAX_TRUNCATED_FRACTION` of its
    rows loads with a warning naming it (the rest is filled in by the decoder, as browsers do).

    Raises:
        DatasetError: missing, corrupt, over-large file, or a truncated one missing more rows
            (the message names it).
    """
    path = Path(path)
    img = _open_checked(path)
    try:
        with img:
            try:
                img.load()
            except OSError as e:
                if img.format != "JPEG" or "truncated" not in str(e):
                    raise
                pixels, lost = _decode_truncated_jpeg(path)
                h = pixels.shape[0]
                if lost > MAX_TRUNCATED_FRACTION * h:
                    raise DatasetError(f"cannot decode image {path}: truncated JPEG, {lost} of its {h} rows are "
                                       f"not in the file (at most {MAX_TRUNCATED_FRACTION:.0%} may be missing)") from None
                log.warning("%s: truncated JPEG: %s; the decoder fills them in, as image viewers do",
                            path, f"the last {lost} of its {h} rows are not in the file" if lost
                            else "only its end marker is missing")
                return pixels
            return np.ascontiguousarray(_to_rgb(img))
    except _IMAGE_ERRORS as e:
        raise DatasetError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def _decode_truncated_jpeg(path: Path) -> tuple[np.ndarray, int]:
    """Decode a JPEG whose data ends early; return (RGB pixels, rows its data does not determine).

    The data is closed with an end-of-image marker and decoded; decoding it again with two
    different runs of filler bytes before the marker changes exactly the rows the file's own data
    does not determine (checked against the intact files of the shared data, cut at 2 bytes to
    half their size), so the first row that differs is where the file's information ends.
    """
    data = path.read_bytes()

    def decode(tail: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data + tail), formats=("JPEG",)) as im:
            im.load()
            return _to_rgb(im)

    eoi = b"\xff\xd9"
    pixels = decode(eoi)
    changed = np.zeros(pixels.shape[0], bool)
    for filler in (b"\x55", b"\xaa"):   # no 0xFF: filler must not read as a marker
        changed |= (decode(filler * 512 + eoi) != pixels).any(axis=(1, 2))
    rows = np.flatnonzero(changed)
    lost = int(pixels.shape[0] - rows[0]) if len(rows) else 0
    return np.ascontiguousarray(pixels), lost


def inspect_image(path: str | os.PathLike) -> tuple[tuple[int, int], list[str]]:
    """(width, height) from the header, and what is imperfect about the file but readable: a
    suffix that names another format, a colour mode that needs converting, a JPEG without its
    end-of-image marker (truncated). Reads the header and the last bytes only.

    Raises:
        DatasetError: unreadable header, over-large image (see :func:`image_size`).
    """
    path = Path(path)
    problems = []
    with _open_checked(path) as img:
        size, fmt, mode = img.size, img.format, img.mode
    expected = _SUFFIX_FORMATS.get(path.suffix.lower())
    if expected and fmt != expected:
        problems.append(f"a {fmt} file named {path.suffix}")
    if mode not in _PLAIN_MODES:
        problems.append(f"colour mode {mode}")
    if fmt == "JPEG":
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - _JPEG_TAIL_BYTES))
                tail = f.read()
        except OSError as e:
            raise DatasetError(f"cannot read image {path}: {e.strerror or e}") from None
        if b"\xff\xd9" not in tail:
            problems.append(f"no JPEG end marker in its last {_JPEG_TAIL_BYTES // 1024} kB (cut short?)")
    return size, problems


def load_image(record: ImageRecord) -> np.ndarray:
    """The pixels of a record: uint8 array[H, W, 3] RGB, mirrored when ``record.flipped``.

    Raises:
        DatasetError: unreadable file, or its size differs from the record's (the file changed
            since the dataset was read).
    """
    img = read_image(record.path)
    h, w = img.shape[:2]
    if (w, h) != (record.width, record.height):
        raise DatasetError(f"image {record.path} is {w}x{h} but its record says "
                           f"{record.width}x{record.height}; did the file change?")
    if record.flipped:
        img = np.ascontiguousarray(img[:, ::-1])
    return img
