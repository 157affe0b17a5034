"""Devkit result files: one per class, ``comp4_det_<split>_<class>.txt``, one line per detection,
``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` in 1-based VOC pixels; converted at the edge
with :func:`detection.boxes.voc_to_internal` / :func:`~detection.boxes.internal_to_voc`. And the
AP definition a dataset's results are scored with (:func:`default_metric`).
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..boxes import internal_to_voc, voc_to_internal
from ..errors import DatasetError, DetectionError
from ..io.files import atomic_write_text, make_dirs
from ..io.paths import path_in_folder, safe_file_part
from .detections import ClassDetections, class_list

__all__ = ["DEFAULT_PREFIX", "default_metric", "read_result_dir", "read_result_file", "result_file_name",
           "write_result_files"]

log = logging.getLogger(__name__)

#: Score format of result files: 9 significant digits round-trip a float32 score (what the
#: detector makes) exactly, so writing and reading back never creates ties the detector did not
#: make; float64 scores keep their order (rounding is monotone). Boxes get one decimal (0.1 px),
#: the usual devkit format.
_SCORE_FORMAT = "{:.9g}"
_BOX_FORMAT = "{:.1f}"
DEFAULT_PREFIX = "comp4_det_"


def result_file_name(split: str, class_name: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``comp4_det_<split>_<class>.txt``, the devkit's name for a class's result file.

    Class names come from data (XML files, a model file): a name with a path separator or
    another character unsafe in a file name is escaped one-to-one (``a/b`` -> ``a%2Fb``, see
    :func:`detection.io.paths.safe_file_part`), so the file never lands outside the results folder.
    """
    return f"{prefix}{safe_file_part(split, 'split')}_{safe_file_part(class_name, 'class name')}.txt"


def write_result_files(out_dir: str | Path, split: str, classes: Sequence[str],
                       detections: Sequence[ClassDetections] | Mapping[str, ClassDetections],
                       prefix: str = DEFAULT_PREFIX) -> list[Path]:
    """Write one devkit result file per class, atomically.

    Lines are ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>``: scores with 9 significant
    digits (exact for float32), boxes converted to 1-based VOC pixels with one decimal.

    Args:
        out_dir: folder (created).
        split: split name used in the file names.
        classes: class names in label order.
        detections: per class (list or mapping, see :func:`evaluate_detections`).
        prefix: file-name prefix.
    Returns:
        the written paths, in class order (a class without detections gets an empty file).
    """
    out_dir = make_dirs(out_dir)
    per_class = class_list(classes, detections)
    paths_of = {name: path_in_folder(out_dir, result_file_name(split, name, prefix)) for name in classes}
    # Remove the previous run's files first: a run killed part-way then leaves some classes
    # missing (reported when scored), never a silent mix of old and new detections.
    for name in classes:
        paths_of[name].unlink(missing_ok=True)
    paths = []
    for name, d in zip(classes, per_class):
        if not np.isfinite(d.scores).all() or not np.isfinite(d.boxes).all():
            raise DetectionError(f"detections of class {name!r} contain NaN or infinite values")
        ids = d.image_ids.tolist()
        if any(not s or any(ch.isspace() for ch in s) for s in set(ids)):
            raise DetectionError(f"class {name!r}: an image id is empty or contains whitespace")
        voc = internal_to_voc(d.boxes)
        fmt = f"{{}} {_SCORE_FORMAT} {_BOX_FORMAT} {_BOX_FORMAT} {_BOX_FORMAT} {_BOX_FORMAT}\n"
        text = "".join(fmt.format(i, s, a, b, c, e)
                       for i, s, a, b, c, e in zip(ids, d.scores.tolist(), *voc.T.tolist()))
        path = paths_of[name]
        atomic_write_text(path, text)
        paths.append(path)
    log.info("wrote %d result files to %s", len(paths), out_dir)
    return paths


def _line_error(path: Path, text: str, index: Mapping[str, int]) -> DatasetError:
    """The first offending line, found slowly (only called once the fast path has failed)."""
    for k, line in enumerate(text.splitlines(), start=1):
        row = line.split()
        if not row:
            continue
        where = f"{path}:{k}"
        if len(row) != 6:
            return DatasetError(f"{where}: expected '<image_id> <score> <xmin> <ymin> <xmax> <ymax>', "
                                f"got {len(row)} fields: {line.strip()[:120]!r}")
        if row[0] not in index:
            return DatasetError(f"{where}: image id {row[0]!r} is not in the split")
        try:
            values = [float(x) for x in row[1:]]
        except ValueError:
            return DatasetError(f"{where}: not a number in {line.strip()[:120]!r}")
        if not all(math.isfinite(v) for v in values):
            return DatasetError(f"{where}: NaN or infinite score or coordinate in {line.strip()[:120]!r}")
    return DatasetError(f"{path}: malformed result file")  # not reached when called after a failure


# Bytes that are whitespace or line breaks for str.split / str.splitlines other than
# space, tab, CR, LF: their presence sends a file to the slow, per-line structure check.
_RARE_SEPARATORS = np.array([0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x1F], dtype=np.uint8)


def _six_fields_per_line(data: bytes) -> bool:
    """True when every non-blank line has exactly 6 whitespace-separated fields, checked on the
    raw bytes with numpy (O(bytes), no per-line Python work). False also means "cannot tell
    cheaply" (non-ASCII or rare separators): the caller then checks line by line."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return True
    if buf.max() >= 0x80 or np.isin(buf, _RARE_SEPARATORS).any():
        return False
    newline = (buf == 0x0A) | (buf == 0x0D)
    space = newline | (buf == 0x20) | (buf == 0x09)
    token_start = ~space
    token_start[1:] &= space[:-1]                          # a field begins after whitespace
    per_line = np.bincount(np.cumsum(newline)[token_start])  # fields on each line
    return bool(np.all((per_line == 0) | (per_line == 6)))


def read_result_file(path: str | Path, image_ids: Sequence[str] | Mapping[str, int]) -> ClassDetections:
    """Read one devkit result file.

    Args:
        path: ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` per line, 1-based VOC pixels;
            blank lines are skipped.
        image_ids: the split's image ids (or a mapping id -> index, to reuse across files).
    Returns:
        :class:`ClassDetections` (boxes in the internal convention, float64).
    Raises:
        DatasetError naming the file and line: wrong number of fields, a field that is not a
        number, a NaN/infinite value, an image id not in the split; or an unreadable file.
    """
    path = Path(path)
    index = image_ids if isinstance(image_ids, Mapping) else {s: i for i, s in enumerate(image_ids)}
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read result file ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from e
    # Fast path: structure checked on the bytes, then one split of the whole text; every id must
    # be known, every number parse and be finite. Any failure -> the slow scan that names the
    # first offending line.
    if not _six_fields_per_line(data):
        if any(len(line.split()) not in (0, 6) for line in text.splitlines()):
            raise _line_error(path, text, index)
    tokens = text.split()
    ids = tokens[0::6]
    if any(s not in index for s in ids):
        raise _line_error(path, text, index)
    try:
        cols = [np.fromiter(map(float, tokens[k::6]), dtype=np.float64, count=len(ids)) for k in range(1, 6)]
    except ValueError:
        raise _line_error(path, text, index) from None
    values = np.stack(cols, axis=1) if ids else np.zeros((0, 5))
    if not np.isfinite(values).all():
        raise _line_error(path, text, index)
    return ClassDetections(np.asarray(ids, dtype=np.str_), values[:, 0], voc_to_internal(values[:, 1:], np.float64))


def read_result_dir(results_dir: str | Path, split: str, classes: Sequence[str], image_ids: Sequence[str],
                    prefix: str = DEFAULT_PREFIX, progress: bool = False) -> list[ClassDetections]:
    """Read every class's result file from a folder; a missing file means no detections (logged).

    Returns:
        one :class:`ClassDetections` per class, in class order.
    """
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        what = "does not exist" if not results_dir.exists() else "is not a folder"
        raise DatasetError(f"{results_dir}: results folder {what}")
    index = {s: i for i, s in enumerate(image_ids)}
    out = []
    it: Iterable[str] = classes
    if progress:
        it = tqdm(classes, desc="read results", unit="class")
    for name in it:
        path = path_in_folder(results_dir, result_file_name(split, name, prefix))
        if not path.is_file():
            log.warning("%s: missing, class %r has no detections (AP 0)", path, name)
            out.append(ClassDetections.empty())
            continue
        out.append(read_result_file(path, index))
    return out


_YEAR = re.compile(r"voc\D?(\d{4})", re.IGNORECASE)


def default_metric(root: str | Path) -> str:
    """The AP definition for a dataset root: "voc07" (11-point) when the folder or its parent is
    named like a VOC year before 2010 (``VOC2007``, ``voc_2007``, ``VOCdevkit/VOC2007``: the
    devkit switched to area under the curve in 2010), "voc10" for any other dataset."""
    root = Path(root)
    for name in (root.name, root.parent.name):
        m = _YEAR.search(name)
        if m:
            return "voc07" if int(m.group(1)) < 2010 else "voc10"
    return "voc10"
