"""R-CNN's published selective-search boxes (``selective_search_data/voc_2007_*.mat``) as a
:class:`~detection.proposals.proposal_set.ProposalSet`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.io

from ..errors import DatasetError
from .proposal_set import ProposalSet

if TYPE_CHECKING:
    from ..data.voc import VOCDataset

__all__ = ["load_rcnn_mat"]


def _mat_strings(arr: np.ndarray) -> list[str]:
    """Strings from a loadmat'ed cell array of char rows, or a char matrix."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "U":  # char matrix: one row per string
        return [str(s).strip() for s in arr.ravel()]
    out = []
    for el in arr.ravel():
        el = np.asarray(el)
        if el.dtype.kind != "U" or el.size != 1:
            raise ValueError(f"expected a string in 'images', got {el.dtype} {el.shape}")
        out.append(str(el.ravel()[0]).strip())
    return out


def load_rcnn_mat(path: str | os.PathLike, dataset: "VOCDataset") -> ProposalSet:
    """Read R-CNN's published selective-search boxes (``selective_search_data/voc_2007_*.mat``).

    The file holds ``images`` (cell array of image ids) and ``boxes`` (cell array of
    double array[N_i, 4]) with rows ``[y1 x1 y2 x2]`` in 1-based inclusive pixels. Internal:
    ``(x1 - 1, y1 - 1, x2, y2)``. (py-faster-rcnn's ``_load_selective_search_roidb`` does
    ``raw[:, (1, 0, 3, 2)] - 1`` on all four because its boxes are 0-based *inclusive*; ours are
    continuous, so the max corner keeps its value, as in :func:`detection.boxes.voc_to_internal`.)
    Boxes are clipped to the image; the file's order is kept.

    Args:
        path: the .mat file (MATLAB v5/v7; v7.3 HDF5 files are not supported by scipy).
        dataset: images to take, in dataset order (extra images in the file are ignored).
    Returns:
        a :class:`ProposalSet` of the dataset's original images.
    Raises:
        DatasetError: the file is unreadable, malformed, or lacks an image of the dataset.
    """
    path = Path(path)
    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except NotImplementedError:
        raise DatasetError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save with -v7") from None
    except Exception as e:
        raise DatasetError(f"{path}: unreadable .mat file ({type(e).__name__}: {e})") from None
    if "boxes" not in mat or "images" not in mat:
        raise DatasetError(f"{path}: expected variables 'boxes' and 'images', found {sorted(k for k in mat if not k.startswith('__'))}")
    try:
        ids = _mat_strings(mat["images"])
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from None
    cells = np.asarray(mat["boxes"]).ravel()
    if len(cells) != len(ids):
        raise DatasetError(f"{path}: {len(ids)} images but {len(cells)} box arrays")
    index = {image_id: i for i, image_id in enumerate(ids)}

    records = [r for r in dataset.records if not r.flipped]
    all_boxes = []
    for record in records:
        if record.image_id not in index:
            raise DatasetError(f"{path}: no boxes for image {record.image_id!r} of {dataset.root} ({dataset.split})")
        try:
            raw = np.asarray(cells[index[record.image_id]], dtype=np.float64)
        except (ValueError, TypeError):  # text, a struct or a nested cell (tests/test_fuzz.py)
            raise DatasetError(f"{path}: boxes of {record.image_id!r} are not a numeric array") from None
        if raw.size == 0:
            all_boxes.append(np.zeros((0, 4), np.float32))
            continue
        if raw.ndim != 2 or raw.shape[1] != 4 or not np.isfinite(raw).all():
            raise DatasetError(f"{path}: boxes of {record.image_id!r} have shape {raw.shape}, expected [N, 4] finite")
        # [y1 x1 y2 x2] 1-based inclusive -> [x1 y1 x2 y2] 0-based continuous.
        b = raw[:, (1, 0, 3, 2)]
        b[:, :2] -= 1.0
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, record.width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, record.height)
        all_boxes.append(b.astype(np.float32))
    meta = {"source": "rcnn_mat", "file": str(path), "split": dataset.split,
            "dataset_fingerprint": dataset.fingerprint()}
    return ProposalSet.from_lists([r.image_id for r in records], all_boxes, meta)
