"""The one model file: tensors + JSON-able metadata, loadable with ``weights_only=True``.

Layout (a ``torch.save`` of plain containers, no pickled classes)::

    {"format": "detection-model", "version": 1,
     "meta": "<JSON text>",                  # classes, backbone, weights hash, pyramid, scales, ...
     "tensors": {"trunk.<name>": Tensor,     # conv layers (self-contained: no weights file needed)
                 "head.<name>": Tensor,      # fc6 / fc7
                 "svm.weight": [K, D], "svm.bias": [K],
                 "bbox.weight": [K, D, 4], "bbox.bias": [K, 4], ...}}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import DetectionError, ModelError
from .io.files import atomic_torch_save
from .io.jsonfile import parse_json
from .io.paths import check_class_name, describe_missing

__all__ = ["MODEL_FORMAT", "MODEL_VERSION", "MAX_CLASSES", "MAX_TENSORS", "MAX_META_BYTES", "save_model",
           "load_model", "check_class_names", "prefixed", "unprefixed", "torch_load_reason"]

MODEL_FORMAT = "detection-model"
MODEL_VERSION = 1

#: Most classes a model may have: LVIS has 1,203, so 10,000 is generous; it bounds the per-class
#: loops and result files a hostile model file can ask for.
MAX_CLASSES = 10_000

#: Most tensors a model file may hold: ours hold ~30 (VGG-16's trunk 26 + head + SVMs + boxes).
MAX_TENSORS = 1_000

#: Largest metadata text: ours is a few kB (SVM training statistics per class included).
MAX_META_BYTES = 16 << 20


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def save_model(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the model file atomically. ``meta`` must be JSON-able."""
    blob = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": json.dumps(meta, sort_keys=True),
            "tensors": {k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
    atomic_torch_save(path, blob)


def torch_load_reason(e: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` failed. torch's own refusal
    spans a dozen lines and suggests ``weights_only=False``, which would run the file's code."""
    text = str(e)
    if "Weights only load failed" in text:
        # The detail ("Unsupported operand 149", "Trying to load unsupported GLOBAL posix.system
        # ...") sits between torch's boilerplate lines.
        lines = [line.replace("WeightsUnpickler error:", "").strip() for line in text.splitlines()[1:]]
        detail = next((line for line in lines if line and not line.startswith(("Please file", "Check the doc"))), "")
        detail = detail.split(". ")[0][:160]
        return ("refused by weights-only loading: it holds something other than tensors and plain containers, "
                "or is not a PyTorch file" + (f" ({detail})" if detail else ""))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def load_model(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file written by :func:`save_model` (never unpickles arbitrary objects).

    Raises:
        ModelError: missing, damaged, or not a model file of this format/version.
    """
    path = Path(path)
    if not path.is_file():
        what = describe_missing(path)
        # "does not exist" alone would be false for a folder, a FIFO, a broken link: say what is there.
        raise ModelError(f"model file {path} does not exist" + ("" if what.startswith("does not exist")
                                                                else f" as a file: the path {what}"))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    # Every error, not a list of types: torch.load of arbitrary bytes also raises IndexError (an
    # empty file), KeyError (a text file read as a legacy pickle), OSError (unreadable), ... and a
    # user must get a ModelError naming the file, not a traceback. weights_only=True means nothing
    # of the file ran, whatever failed.
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model file {path} cannot be read safely: {torch_load_reason(e)}") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path} is not a detection model file")
    if blob.get("version") != MODEL_VERSION:
        raise ModelError(f"model file {path} has version {blob.get('version')}; this code reads {MODEL_VERSION}")
    try:
        if not isinstance(blob.get("meta"), str):
            raise TypeError("its metadata is not JSON text")
        meta = parse_json(blob["meta"], "metadata", max_bytes=MAX_META_BYTES)
        tensors = dict(blob["tensors"])
    except (KeyError, TypeError, ValueError, DetectionError) as e:   # ValueError covers dict()
        raise ModelError(f"model file {path} is damaged: {e}") from None
    if len(tensors) > MAX_TENSORS:
        raise ModelError(f"model file {path} is damaged: {len(tensors)} tensors, above the limit of {MAX_TENSORS}")
    # The content is validated, not only the container: weights_only also admits lists, ints...
    if not isinstance(meta, dict):
        raise ModelError(f"model file {path} is damaged: its metadata is not a JSON object")
    bad = [str(k) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"model file {path} is damaged: entries that are not named tensors: {', '.join(bad[:5])}")
    return tensors, meta


def check_class_names(classes: Any) -> tuple[str, ...]:
    """Validate class names read from a model file (untrusted: they become file names and lines
    printed to the user).

    Returns:
        the names as a tuple.
    Raises:
        ValueError: not a list of 1..:data:`MAX_CLASSES` unique, non-empty strings; a name with a
            control character (a newline would forge output lines); a name that cannot be made a
            file name (too long). Names are shown with ``repr`` so invisible characters show.
    """
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a list of names, got {str(classes)[:80]!r}")
    if not 1 <= len(classes) <= MAX_CLASSES:
        raise ValueError(f"{len(classes)} classes; a model has 1 to {MAX_CLASSES}")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise ValueError(f"class name {dup!r} appears more than once")
    for name in classes:
        try:
            check_class_name(name)
        except DetectionError as e:
            raise ValueError(str(e)) from None
    return tuple(classes)
