"""Images of a split decoded and resized for the trunk in DataLoader worker processes, in order,
one record at a time (:func:`resized_images`)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import load_image
from ..data.records import ImageRecord
from ..errors import DetectionError
from ..workers import init_worker_process
from .conv_pass import image_name
from .scales import scale_factors

__all__ = ["resized_images"]


class _ResizedImages(Dataset):
    """Decodes and resizes records in DataLoader workers.

    Item i -> ``(i, inputs, factors, (H, W), error)``: ``inputs`` one Tensor[1, 3, H', W'] per
    scale. A DetectionError (unreadable image) is returned, not raised, so that the main process
    re-raises it with its own message instead of DataLoader's worker traceback text.
    """

    def __init__(self, records: Sequence[ImageRecord], preprocess: Any, scales: Sequence[int],
                 max_size: int) -> None:
        self.records = list(records)
        self.preprocess = preprocess
        self.scales = tuple(int(s) for s in scales)
        self.max_size = int(max_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor], list[float], tuple[int, int],
                                           DetectionError | None]:

        record = self.records[i]
        try:
            image = load_image(record)
            h, w = image.shape[:2]
            factors = [float(f) for f in scale_factors(h, w, self.scales, self.max_size)]
            with torch.inference_mode():
                inputs = [self.preprocess(image, f) for f in factors]
        except DetectionError as e:
            # Name the image: preprocess's message says what is wrong, not with which file.
            msg = str(e) if str(record.path) in str(e) else f"{image_name(record)}: {e}"
            return i, [], [], (0, 0), type(e)(msg)
        return i, inputs, factors, (h, w), None


def _worker_init(worker_id: int) -> None:
    # One OpenCV thread per worker: workers already run in parallel, and OpenCV's own pool on
    # top of them only oversubscribes the cores (torch sets 1 thread in workers itself).
    cv2.setNumThreads(1)
    init_worker_process()


def _first(batch: list[Any]) -> Any:
    # batch_size=1: images of different sizes cannot be stacked, so take the one item as is.
    return batch[0]


def resized_images(records: Sequence[ImageRecord], preprocess: Any, scales: Sequence[int], max_size: int,
                   num_workers: int, pin_memory: bool = False) -> Iterable[tuple[int, list[torch.Tensor], list[float],
                                                                                 tuple[int, int], DetectionError | None]]:
    """The records decoded, resized to every scale and preprocessed by ``num_workers`` worker
    processes (0: in this process), in order: items as :class:`_ResizedImages` gives them.

    ``preprocess`` (a Backbone's: cv2 resize + normalise) only uses plain Python attributes of
    the backbone, never its parameters, so workers can call it wherever the trunk lives.
    """
    images = _ResizedImages(records, preprocess, scales, max_size)
    return DataLoader(images, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first,
                      pin_memory=pin_memory, worker_init_fn=_worker_init if num_workers else None,
                      # spawn, not fork: a child forked from a parent whose OpenCV/OpenMP thread
                      # pools already ran can deadlock (seen here in the test suite).
                      multiprocessing_context="spawn" if num_workers else None,
                      persistent_workers=False)
