"""PASCAL VOC-layout datasets -> :class:`~detection.data.records.ImageRecord` lists.

Layout read (the devkit's): ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` (``.jpeg`` and
``.png`` are accepted when the ``.jpg`` is missing) and ``ImageSets/Main/<split>.txt`` (one id
per line; a second column, as in VOC's per-class lists, is ignored).

The XML boxes are 1-based inclusive pixel indices; they are converted ONCE here with
:func:`detection.boxes.voc_to_internal` and every later stage works in the internal convention.

Real datasets are messy (photo sets gathered from the web, such as the fruit set in docs/benchmarks.md): the XML ``<size>`` may be 0x0 or
wrong, files named ``.jpg`` may be PNGs with alpha or palettes, boxes may poke out of the image.
Policy: the image header (read lazily, no decode) is the truth for the size; boxes hanging over
the border are clipped with a warning; anything that cannot be fixed without guessing (a
non-numeric or inverted box, a box wholly outside the image, a corrupt file) is a
:class:`~detection.errors.DatasetError` that names the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as DET
import numpy as np
from defusedxml import DefusedXmlException

from .. import comm
from ..boxes import flip_boxes, voc_to_internal
from ..errors import DatasetError, DetectionError
from ..io.files import file_checksum
from ..io.paths import check_class_name, describe_missing
from .images import inspect_image, read_image
from .names import check_name, is_file, show_id, show_path
from .records import ImageRecord

__all__ = ["VOC_CLASSES", "VOCDataset", "flip_record", "report_images"]

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

#: Image suffixes tried, in order, for ``JPEGImages/<id>``.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")

#: Bump when parsing rules change (clipping, class inference...): part of the fingerprint, so
#: caches keyed on it are rebuilt.
_FORMAT_VERSION = 2

#: VOC folder names (VOC2007, VOC2012, VOCdevkit/VOC2007...): use the devkit's class order.
_VOC_ROOT = re.compile(r"^VOC\d{4}$", re.IGNORECASE)


@dataclasses.dataclass
class _Annotation:
    """The raw content of one XML file (VOC 1-based boxes as floats)."""

    names: list[str]
    boxes: np.ndarray  # float64 [N, 4], VOC 1-based inclusive
    difficult: list[bool]
    truncated: list[bool]
    size: tuple[int, int] | None  # (width, height) from <size>, None when missing or unparsable


def flip_record(record: ImageRecord) -> ImageRecord:
    """The record of the horizontally mirrored image (boxes mirrored; pixels on load)."""
    return dataclasses.replace(record, boxes=flip_boxes(record.boxes, record.width).astype(np.float32),
                               flipped=not record.flipped)


# --------------------------------------------------------------------------------------------
# annotations


def _text(elem: Element | None) -> str | None:
    if elem is None or elem.text is None:
        return None
    return elem.text.strip()


def _flag(obj: Element, tag: str, xml_path: Path) -> bool:
    """A 0/1 flag (difficult, truncated); a missing or empty tag means False."""
    text = _text(obj.find(tag))
    if not text:
        return False
    try:
        return float(text) != 0
    except ValueError:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise DatasetError(f"{xml_path}: <{tag}> is {text!r}, expected 0 or 1") from None


def _parse_xml(xml_path: Path) -> Element:
    if not xml_path.is_file():
        raise DatasetError(f"annotation {show_path(xml_path)} {describe_missing(xml_path)}")
    try:
        # defusedxml refuses entity expansion (billion laughs) and external entities.
        return DET.parse(str(xml_path)).getroot()
    except (ParseError, DefusedXmlException) as e:
        raise DatasetError(f"malformed annotation {xml_path}: {e}") from None
    except OSError as e:
        raise DatasetError(f"cannot read annotation {xml_path}: {e}") from None


def _object_names(xml_path: Path) -> list[str]:
    names = [(_text(o.find("name")) or "") for o in _parse_xml(xml_path).iter("object")]
    for name in filter(None, names):
        try:
            check_class_name(name)
        except DetectionError as e:
            raise DatasetError(f"{xml_path}: {e}") from None
    return names


def _read_annotation(xml_path: Path) -> _Annotation:
    root = _parse_xml(xml_path)
    size = None
    w_text, h_text = _text(root.find("size/width")), _text(root.find("size/height"))
    if w_text is not None and h_text is not None:
        try:
            size = (int(float(w_text)), int(float(h_text)))
        except (ValueError, OverflowError):  # "abc", or "inf" (found by tests/test_fuzz.py)
            size = None  # unparsable size: the image header decides anyway
    names, boxes, difficult, truncated = [], [], [], []
    for obj in root.iter("object"):
        name = _text(obj.find("name"))
        if not name:
            raise DatasetError(f"{xml_path}: an <object> has no <name>")
        try:   # it becomes a file name and a model's class: refused here, not after training
            check_class_name(name)
        except DetectionError as e:
            raise DatasetError(f"{xml_path}: {e}") from None
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = _text(obj.find(f"bndbox/{tag}"))
            try:
                value = float(text)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise DatasetError(f"{xml_path}: object {name!r} has a missing or non-numeric "
                                   f"<{tag}> {text!r}") from None
            if not math.isfinite(value):
                raise DatasetError(f"{xml_path}: object {name!r} has a non-finite <{tag}> {text!r}")
            coords.append(value)
        if coords[0] > coords[2] or coords[1] > coords[3]:
            raise DatasetError(f"{xml_path}: object {name!r} has an inverted box "
                               f"(xmin, ymin, xmax, ymax) = {tuple(coords)}")
        names.append(name)
        boxes.append(coords)
        difficult.append(_flag(obj, "difficult", xml_path))
        truncated.append(_flag(obj, "truncated", xml_path))
    return _Annotation(names, np.asarray(boxes, np.float64).reshape(-1, 4), difficult, truncated, size)


def _find_image(image_dir: Path, image_id: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        path = image_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    first = image_dir / f"{image_id}{IMAGE_SUFFIXES[0]}"
    if os.path.lexists(first):   # there, but a folder, a FIFO, a broken link...: say so
        raise DatasetError(f"image {show_path(first)} {describe_missing(first)}")
    raise DatasetError(f"image {show_path(first)} does not exist (also tried "
                       f"{', '.join(IMAGE_SUFFIXES[1:])})")


@dataclasses.dataclass
class _SplitFile:
    """What one id's files hold, read once by one rank: the parsed XML, the image path, its
    header's size and problems and both files' stamps, or the error each read raised (replayed in
    split order by every rank, so a bad file stops them all with the one-process message)."""

    annotation: _Annotation | None = None
    xml_error: str | None = None
    path: Path | None = None
    path_error: str | None = None
    header: tuple[tuple[int, int], list[str]] | None = None
    header_error: str | None = None
    stamp: str = ""


def _read_one(ann_dir: Path, image_dir: Path, image_id: str) -> _SplitFile:
    xml_path = ann_dir / f"{image_id}.xml"
    try:
        facts = _SplitFile(annotation=_read_annotation(xml_path))
    except DatasetError as e:
        return _SplitFile(xml_error=str(e))
    try:
        facts.path = _find_image(image_dir, image_id)
    except DatasetError as e:
        facts.path_error = str(e)
        return facts
    try:
        # Header (and last bytes) only: cheap, and the header is always the truth for the size.
        facts.header = inspect_image(facts.path)
    except DatasetError as e:
        facts.header_error = str(e)
        return facts
    # The files' content, not their modification times: a copied or synced data folder keys the
    # same caches, an edited file (even one given back its old time and size) new ones.
    checksums = []
    for path in (xml_path, facts.path):
        try:
            checksums.append(file_checksum(path))
        except OSError as e:
            facts.header_error = f"cannot read {show_path(path)}: {e.strerror or e}"
            return facts
    facts.stamp = f"{image_id}:{checksums[0]}:{facts.path.name}:{checksums[1]}"
    return facts


def _read_split_files(ann_dir: Path, image_dir: Path, ids: Sequence[str]) -> dict[str, _SplitFile]:
    """{id: its files' content} for every id of a split. Under ``torchrun`` each rank reads a
    contiguous share and the shares are gathered: every rank gets the whole split for 1/N of the
    reads. Every rank of the process group must call this (it is a collective)."""
    mine = {image_id: _read_one(ann_dir, image_dir, image_id) for image_id in comm.shard(ids)}
    files: dict[str, _SplitFile] = {}
    for part in comm.all_gather(mine, "data: gathering the annotations and image headers each rank read"):
        files.update(part)
    return files


# --------------------------------------------------------------------------------------------
# the dataset


def _undecodable(image_dir: Path, ids: Sequence[str]) -> dict[str, str]:
    """{id: error} of the images of ``ids`` that cannot be decoded (a warning each). Under
    ``torchrun`` each rank decodes a contiguous share and the lists are gathered: every rank
    gets the same list for 1/N of the decoding. Every rank of the process group must call this
    (it is a collective). Ids without an image file are left to the caller, which names them."""
    mine: dict[str, str] = {}
    for image_id in comm.shard(ids):
        try:
            path = _find_image(image_dir, image_id)
        except DatasetError:
            continue
        try:
            read_image(path)
        except DatasetError as e:
            mine[image_id] = str(e)
            log.warning("skipping %s (--skip-bad): %s", show_id(image_id), e)
    bad: dict[str, str] = {}
    for part in comm.all_gather(mine, "data: gathering the images no rank could decode (--skip-bad)"):
        bad.update(part)
    return bad


class VOCDataset:
    """The records of one split of a VOC-layout dataset.

    Args:
        root: dataset folder (holding ``Annotations``, ``JPEGImages``, ``ImageSets/Main``).
        split: name of ``ImageSets/Main/<split>.txt``.
        classes: class names (label i = classes[i]); objects of other classes are skipped (one
            warning with the count). ``None``: :data:`VOC_CLASSES` when ``root`` is named like
            ``VOC2007`` and every object of the split is a VOC class; otherwise the sorted set
            of names over ALL XML files in ``Annotations`` (so every split of a folder gets the
            same list).
        use_flipped: append a horizontally mirrored record after the originals (same order).
        skip_bad: decode every image once now and leave out those that cannot be decoded (a
            warning each; listed in ``skipped``); False: such an image stops the stage that
            decodes it, naming the file. Decided here, once, so every stage sees the same records.
            Under ``torchrun`` each rank decodes a share and the lists are gathered (every rank
            must then build the dataset: it is a collective).

    Attributes:
        root, split, classes, records (list[ImageRecord]); ``size_from_image`` and
        ``size_mismatch``: ids whose XML size was missing/0 or disagreed with the image header;
        ``imperfect``: {id: what} of images read despite a flaw (wrong suffix, colour mode,
        truncated); ``skipped``: {id: error} of images left out by ``skip_bad``.
    """

    def __init__(self, root: str | os.PathLike, split: str, classes: Sequence[str] | None = None,
                 use_flipped: bool = False, skip_bad: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.use_flipped = bool(use_flipped)
        self.skip_bad = bool(skip_bad)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} "
                               f"{'is not a folder' if os.path.lexists(self.root) else 'does not exist'}")
        split_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        check_name(split, "split name", split_file)
        ids = self._read_split(split_file)
        ann_dir, image_dir = self.root / "Annotations", self.root / "JPEGImages"
        files = _read_split_files(ann_dir, image_dir, ids)
        for image_id in ids:        # the first bad XML in split order, as one process reading them finds it
            if files[image_id].xml_error is not None:
                raise DatasetError(files[image_id].xml_error)
        annotations = {i: files[i].annotation for i in ids}
        self.classes = self._resolve_classes(classes, annotations, ann_dir)
        index = {c: k for k, c in enumerate(self.classes)}

        records: list[ImageRecord] = []
        stamp: list[str] = []
        skipped: Counter[str] = Counter()
        size_from_image, size_mismatch, clipped = [], [], 0
        imperfect: dict[str, str] = {}
        bad: dict[str, str] = _undecodable(image_dir, ids) if self.skip_bad else {}
        for image_id in ids:
            ann, facts = annotations[image_id], files[image_id]
            xml_path = ann_dir / f"{image_id}.xml"
            if facts.path_error is not None:
                raise DatasetError(facts.path_error)
            path = facts.path
            if image_id in bad:
                continue
            if facts.header_error is not None:
                if not self.skip_bad:
                    raise DatasetError(facts.header_error)
                bad[image_id] = facts.header_error
                log.warning("skipping %s (--skip-bad): %s", show_id(image_id), facts.header_error)
                continue
            (width, height), problems = facts.header
            if problems:
                imperfect[image_id] = f"{show_path(path)}: {'; '.join(problems)}"
            if ann.size is None or ann.size[0] <= 0 or ann.size[1] <= 0:
                size_from_image.append(image_id)
                log.debug("%s: no usable <size>; image header says %dx%d", xml_path, width, height)
            elif ann.size != (width, height):
                size_mismatch.append(image_id)
                log.debug("%s: <size> %dx%d disagrees with image %s (%dx%d); trusting the image",
                          xml_path, *ann.size, path, width, height)
            keep = [k for k, n in enumerate(ann.names) if n in index]
            skipped.update(n for n in ann.names if n not in index)
            # VOC 1-based inclusive -> internal 0-based continuous: the one conversion.
            boxes = voc_to_internal(ann.boxes[keep], dtype=np.float64)
            inside = boxes.copy()
            np.clip(inside[:, 0::2], 0, width, out=inside[:, 0::2])
            np.clip(inside[:, 1::2], 0, height, out=inside[:, 1::2])
            for k in np.nonzero((inside != boxes).any(axis=1))[0]:
                if inside[k, 2] <= inside[k, 0] or inside[k, 3] <= inside[k, 1]:
                    raise DatasetError(f"{xml_path}: box {ann.boxes[keep][k].tolist()} "
                                       f"({ann.names[keep[k]]!r}) lies outside the {width}x{height} "
                                       f"image {path}")
                clipped += 1
                log.debug("%s: box %s clipped to the %dx%d image", xml_path,
                          ann.boxes[keep][k].tolist(), width, height)
            records.append(ImageRecord(
                image_id=image_id, path=path, width=width, height=height,
                boxes=inside.astype(np.float32),
                labels=np.array([index[ann.names[k]] for k in keep], np.int64),
                difficult=np.array([ann.difficult[k] for k in keep], bool),
                truncated=np.array([ann.truncated[k] for k in keep], bool),
            ))
            stamp.append(facts.stamp)

        if size_from_image:
            log.warning("%s/%s: %d annotation(s) give no or a zero <size>; sizes read from the "
                        "image headers (e.g. %s)", self.root, split, len(size_from_image),
                        ", ".join(size_from_image[:3]))
        if size_mismatch:
            log.warning("%s/%s: %d annotation(s) give a <size> that disagrees with the image; "
                        "trusting the image (e.g. %s)", self.root, split, len(size_mismatch),
                        ", ".join(size_mismatch[:3]))
        if clipped:
            log.warning("%s/%s: %d box(es) reach outside their image and were clipped to it",
                        self.root, split, clipped)
        if skipped:
            log.warning("%s/%s: skipped %d object(s) of classes not in the class list: %s",
                        self.root, split, sum(skipped.values()), dict(sorted(skipped.items())))
        if imperfect:
            log.warning("%s/%s: %d image(s) are imperfect but readable (e.g. %s)", self.root, split,
                        len(imperfect), "; ".join(list(imperfect.values())[:3]))
        if not records:
            raise DatasetError(f"{split_file}: none of its {len(ids)} images can be decoded "
                               f"(e.g. {next(iter(bad.values()))})")
        self.imperfect: dict[str, str] = imperfect
        self.skipped: dict[str, str] = {i: bad[i] for i in ids if i in bad}     # in split order
        self.size_from_image: tuple[str, ...] = tuple(size_from_image)
        self.size_mismatch: tuple[str, ...] = tuple(size_mismatch)
        if self.use_flipped:
            records += [flip_record(r) for r in records]
        self.records: list[ImageRecord] = records
        blob = "\n".join([f"v{_FORMAT_VERSION}", split, ",".join(self.classes), *stamp])
        self._fingerprint = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    @staticmethod
    def _read_split(split_file: Path) -> list[str]:
        if not split_file.is_file():
            raise DatasetError(f"split file {split_file} {describe_missing(split_file)}")
        try:
            # utf-8-sig: a byte-order mark (Windows editors add one) is not part of the first id.
            # Lines end at \n only: str.splitlines would also cut at U+2028, U+0085, ...
            lines = split_file.read_text(encoding="utf-8-sig").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"cannot read split file {split_file}: {e}") from None
        ann_dir = split_file.parents[2] / "Annotations"
        ids: list[str] = []
        seen: set[str] = set()
        duplicates = 0
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            image_id = fields[0]
            # A second column is VOC's per-class flag (1 / -1 / 0), ignored. Anything else means an
            # id holding whitespace, which the whitespace-separated split and result files cannot
            # hold: refused with the id shown exactly, never silently cut at the space.
            if len(fields) > 1 and (len(fields) > 2 or fields[1] not in ("1", "-1", "0")
                                    or is_file(ann_dir / f"{line.strip()}.xml")):
                raise DatasetError(
                    f"{split_file}:{number}: line {line.strip()[:80]!r} is not '<id>' or '<id> <1|-1|0>'; "
                    f"image ids holding whitespace are not supported (VOC split and result files "
                    f"separate fields by whitespace): rename the files")
            check_name(image_id, "image id", split_file)
            if image_id in seen:
                duplicates += 1
                continue
            seen.add(image_id)
            ids.append(image_id)
        if duplicates:
            log.warning("%s: %d duplicate id(s) ignored", split_file, duplicates)
        if not ids:
            raise DatasetError(f"split file {split_file} lists no images")
        return ids

    def _resolve_classes(self, classes: Sequence[str] | None, annotations: dict[str, _Annotation],
                         ann_dir: Path) -> tuple[str, ...]:
        if classes is not None:
            out = tuple(str(c) for c in classes)
            if not out or len(set(out)) != len(out) or not all(out):
                raise DatasetError(f"{self.root}: classes must be non-empty and unique, got {out}")
            return out
        split_names = {n for a in annotations.values() for n in a.names}
        if _VOC_ROOT.match(self.root.resolve().name) and split_names <= set(VOC_CLASSES):
            return VOC_CLASSES
        # Infer from every XML of the folder so that trainval and test agree on label indices.
        names = set(split_names)
        for xml_path in sorted(ann_dir.glob("*.xml")):
            if xml_path.stem not in annotations:
                names.update(n for n in _object_names(xml_path) if n)
        if not names:  # images without annotations (e.g. to run a detector on): no classes
            log.warning("%s: no annotated objects anywhere; the class list is empty", ann_dir)
        return tuple(sorted(names))

    def fingerprint(self) -> str:
        """Hash of the split, class list, image ids and the content (CRC-32) of their annotation
        and image files (plus the parsing-rules version): keys caches. Not the folder's path nor
        the files' times, so a moved, copied or synced data folder keeps its caches."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return (f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, images={len(self.records)}, "
                f"classes={len(self.classes)}, use_flipped={self.use_flipped})")


#: Files named per category in the end-of-run summary (the rest are counted).
_SUMMARY_NAMES = 50


def report_images(*datasets: VOCDataset) -> list[str]:
    """Log (WARNING) and return the end-of-run summary of imperfect and skipped images, one line
    per split and kind; nothing when every image was clean. Tools call it last, so the files a
    user should look at are not lost in the log of a long run."""
    lines = []
    for ds in datasets:
        for what, items in (("imperfect but used", ds.imperfect), ("skipped (--skip-bad)", ds.skipped)):
            if items:
                shown = list(items.values())[:_SUMMARY_NAMES]
                more = f"; and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
                lines.append(f"summary: {ds.root}/{ds.split}: {len(items)} image(s) {what}: "
                             f"{' | '.join(shown)}{more}")
    for line in lines:
        log.warning("%s", line)
    return lines
