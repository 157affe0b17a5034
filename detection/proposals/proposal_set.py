"""The proposals of a set of images (:class:`ProposalSet`) and its ``.npz`` file.

Boxes are in the library's convention (:mod:`detection.boxes`): float32 ``(x1, y1, x2, y2)``,
0-based, continuous, in ORIGINAL (unflipped) image pixels.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..boxes import flip_boxes
from ..errors import CacheError
from ..io.files import atomic_save_npz, load_npz
from ..io.jsonfile import parse_json

if TYPE_CHECKING:
    from ..data.records import ImageRecord

__all__ = ["ProposalSet", "FORMAT_VERSION"]

#: Version of the ``proposals_<key>.npz`` layout; bump when it changes (old caches then miss).
FORMAT_VERSION = 2  # 2: every shard has its checksum beside it (<shard>.crc32)


class ProposalSet:
    """Proposals of a set of images, stored flat: ``boxes[offsets[i]:offsets[i + 1]]`` belong to
    ``image_ids[i]``.

    Args:
        image_ids: N unique ids.
        boxes: float32 array[M, 4], internal convention, original (unflipped) image pixels.
        offsets: int64 array[N + 1], ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == M``.
        metadata: JSON-able dict (settings, source, format version) saved with the arrays.
    """

    def __init__(self, image_ids: Sequence[str], boxes: np.ndarray, offsets: np.ndarray,
                 metadata: dict[str, Any] | None = None) -> None:
        self.image_ids: tuple[str, ...] = tuple(str(i) for i in image_ids)
        self.boxes = np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1)
        self.metadata: dict[str, Any] = dict(metadata or {})
        problem = self._check()
        if problem:
            raise CacheError(f"inconsistent proposal set: {problem}")
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def _check(self) -> str | None:
        n = len(self.image_ids)
        if len(set(self.image_ids)) != n:
            return "duplicate image ids"
        if self.offsets.shape != (n + 1,):
            return f"offsets has shape {self.offsets.shape}, expected ({n + 1},)"
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.boxes) or (np.diff(self.offsets) < 0).any():
            return "offsets do not partition the boxes"
        if not np.isfinite(self.boxes).all():
            return "non-finite box coordinates"
        return None

    @classmethod
    def from_lists(cls, image_ids: Sequence[str], boxes: Sequence[np.ndarray],
                   metadata: dict[str, Any] | None = None) -> "ProposalSet":
        """Build from one array[N_i, 4] per image."""
        arrays = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
        if len(arrays) != len(image_ids):
            raise CacheError(f"{len(image_ids)} image ids but {len(arrays)} box arrays")
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        flat = np.concatenate(arrays) if arrays else np.zeros((0, 4), np.float32)
        return cls(image_ids, flat, offsets, metadata)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __repr__(self) -> str:
        return f"ProposalSet({len(self)} images, {len(self.boxes)} boxes)"

    def boxes_for(self, image_id: str) -> np.ndarray:
        """float32 array[N, 4] of the (unflipped) image ``image_id`` (a view: do not modify)."""
        try:
            i = self._index[image_id]
        except KeyError:
            raise CacheError(f"no proposals for image {image_id!r}") from None
        return self.boxes[self.offsets[i]:self.offsets[i + 1]]

    def proposals_for_record(self, record: "ImageRecord") -> np.ndarray:
        """Proposals in the frame of ``record``: mirrored when ``record.flipped``. array[N, 4]."""
        boxes = self.boxes_for(record.image_id)
        if record.flipped:
            return flip_boxes(boxes, record.width)
        return boxes.copy()

    def num_boxes(self) -> np.ndarray:
        """int64 array[N]: boxes per image."""
        return np.diff(self.offsets)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (.npz) atomically: image_ids (unicode), boxes, offsets, metadata (JSON text)."""
        meta = dict(self.metadata, format_version=FORMAT_VERSION)
        ids = np.array(self.image_ids, dtype=str) if self.image_ids else np.zeros(0, dtype="<U1")
        atomic_save_npz(path, image_ids=ids, boxes=self.boxes, offsets=self.offsets,
                        metadata=np.array(json.dumps(meta, sort_keys=True)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ProposalSet":
        """Read and validate a file written by :meth:`save`.

        Raises:
            CacheError: missing, unreadable or inconsistent file, or another format version.
        """
        path = Path(path)
        try:
            data = load_npz(path)
        except FileNotFoundError:
            raise CacheError(f"{path}: proposal cache does not exist") from None
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
            raise CacheError(f"{path}: unreadable proposal cache ({type(e).__name__}: {e})") from None
        missing = {"image_ids", "boxes", "offsets", "metadata"} - set(data)
        if missing:
            raise CacheError(f"{path}: not a proposal cache (missing {sorted(missing)})")
        try:
            text = str(data["metadata"][()])
        except (ValueError, IndexError) as e:
            raise CacheError(f"{path}: bad metadata ({e})") from None
        meta = parse_json(text, f"{path}: metadata")   # size and depth limits; CacheError
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path}: proposal cache format {meta.get('format_version') if isinstance(meta, dict) else '?'}"
                             f" != {FORMAT_VERSION}; recompute it")
        if data["image_ids"].dtype.kind != "U" or data["boxes"].dtype != np.float32 \
                or data["boxes"].ndim != 2 or data["boxes"].shape[1:] != (4,) or data["offsets"].dtype != np.int64:
            raise CacheError(f"{path}: arrays have unexpected dtypes or shapes")
        try:
            return cls(data["image_ids"].tolist(), data["boxes"], data["offsets"], meta)
        except CacheError as e:
            raise CacheError(f"{path}: {e}") from None
