"""The plain image record every stage reads: one per image (and one per flipped image)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

__all__ = ["ImageRecord"]


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image of a dataset and its ground truth.

    Attributes:
        image_id: the id from ``ImageSets/Main/<split>.txt`` (file stem of image and XML).
        path: the image file.
        width, height: true size in pixels (read from the image when the XML is missing/wrong).
        boxes: float32 array[N, 4], internal convention (0-based continuous x1, y1, x2, y2).
        labels: int64 array[N], 0-based index into the dataset's class list.
        difficult, truncated: bool arrays[N].
        flipped: the record describes the horizontally mirrored image (boxes already mirrored;
            loaders mirror the pixels).
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    truncated: np.ndarray
    flipped: bool = False

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or not (len(self.labels) == len(self.difficult) == len(self.truncated) == n):
            raise ValueError(f"{self.image_id}: inconsistent annotation arrays")

    @property
    def key(self) -> str:
        """Unique key of the record within a split (flipped records get a suffix)."""
        return f"{self.image_id}_flip" if self.flipped else self.image_id
