"""A validation split carved out of a VOC-layout dataset's training split, so that settings (the
trunk, scales, C, NMS...) are chosen without the test split ever being read.

The new folder holds links to the dataset's ``Annotations`` and ``JPEGImages`` (nothing is copied
or changed in the dataset) and ``ImageSets/Main/train.txt`` (the images trained on) and
``val.txt`` (the held-out ones). Train and evaluate on it with
``run_pipeline.py --data OUT --set data.train_split=train data.test_split=val``.
"""
from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from detection.data.voc import VOCDataset
from detection.errors import DatasetError
from detection.io.files import atomic_write_text

__all__ = ["make_validation_split"]

_LINKED = ("Annotations", "JPEGImages")


def make_validation_split(root: str | os.PathLike, out: str | os.PathLike, *, split: str = "trainval",
                          fraction: float = 0.2, seed: int = 0) -> dict[str, Any]:
    """Write ``out`` with ``round(fraction * n)`` of the ``n`` images of ``root``'s ``split`` held
    out as ``val`` (``random.Random(seed).sample``: the same images on every machine) and the rest
    as ``train``, in the split file's order. Rerunning with the same arguments finds it made;
    anything else already at ``out`` is refused, never overwritten.

    Returns {"train": n, "val": n, "objects": {"train"|"val": {class: count}}, "missing_in_val":
    classes with no object among the held-out images (their AP cannot be measured there)}.
    """
    if not 0 < fraction < 1:
        raise DatasetError(f"fraction {fraction} must lie strictly between 0 and 1")
    dataset = VOCDataset(root, split)   # every id, XML and class checked before anything is written
    ids = [r.image_id for r in dataset.records]
    count = round(fraction * len(ids))
    if not 0 < count < len(ids):
        raise DatasetError(f"{fraction} of the {len(ids)} images of split {split!r} of {root} leaves "
                           f"{count} to hold out: at least one image must remain on each side")
    held = set(random.Random(seed).sample(ids, count))
    parts = {"train": [i for i in ids if i not in held], "val": [i for i in ids if i in held]}

    root, out = Path(root).resolve(), Path(out)
    main = out / "ImageSets" / "Main"
    texts = {name: "".join(f"{i}\n" for i in part) for name, part in parts.items()}
    if os.path.lexists(out):
        _check_existing(out, root, main, texts)
    else:
        main.mkdir(parents=True)
        for name in _LINKED:
            (out / name).symlink_to(root / name, target_is_directory=True)
        for name, text in texts.items():
            atomic_write_text(main / f"{name}.txt", text)

    objects = {name: Counter() for name in parts}
    for record in dataset.records:
        side = "val" if record.image_id in held else "train"
        objects[side].update(dataset.classes[int(k)] for k in record.labels)
    return {"train": len(parts["train"]), "val": len(parts["val"]),
            "objects": {side: dict(sorted(c.items())) for side, c in objects.items()},
            "missing_in_val": [c for c in dataset.classes if objects["train"][c] and not objects["val"][c]]}


def _check_existing(out: Path, root: Path, main: Path, texts: dict[str, str]) -> None:
    """Accept ``out`` only if it is the split these arguments make."""
    for name in _LINKED:
        link = out / name
        if not link.is_symlink() or link.resolve() != (root / name).resolve():
            raise DatasetError(f"{out} exists and is not this validation split of {root} ({link} is not a link "
                               f"to {root / name}): choose another --out or remove it")
    for name, text in texts.items():
        path = main / f"{name}.txt"
        try:
            same = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if not same:
            raise DatasetError(f"{out} exists with another split ({path} differs from the one these arguments "
                               f"make): choose another --out or remove it")
