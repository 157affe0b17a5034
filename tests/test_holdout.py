"""detection.data.holdout and tools/make_val_split.py: a validation split carved out of trainval
that the pipeline reads as a dataset, the test split never touched, the dataset never changed."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from detection.data.holdout import make_validation_split
from detection.data.voc import VOCDataset
from detection.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]


def _ids(path: Path) -> list[str]:
    return path.read_text().split()


def test_the_held_out_images_are_a_seeded_sample_and_the_rest_trains(synthetic_voc, tmp_path):
    before = {p.name: p.read_bytes() for p in (synthetic_voc / "ImageSets" / "Main").iterdir()}
    out = tmp_path / "val"
    summary = make_validation_split(synthetic_voc, out, fraction=0.25, seed=3)
    trainval = _ids(synthetic_voc / "ImageSets" / "Main" / "trainval.txt")
    train, val = (_ids(out / "ImageSets" / "Main" / f"{s}.txt") for s in ("train", "val"))
    # The obvious reference: 25 % of 8 images, drawn by random.Random(3).sample, order kept.
    held = set(random.Random(3).sample(trainval, 2))
    assert val == [i for i in trainval if i in held] and train == [i for i in trainval if i not in held]
    assert (summary["train"], summary["val"]) == (6, 2)
    # The folder is a dataset: its val split has the trainval records of those ids, same boxes.
    records = {r.image_id: r for r in VOCDataset(synthetic_voc, "trainval").records}
    for r in VOCDataset(out, "val").records:
        assert r.boxes.tolist() == records[r.image_id].boxes.tolist()
    counted = sum(sum(summary["objects"][side].values()) for side in ("train", "val"))
    assert counted == sum(len(r.labels) for r in records.values())
    assert not (out / "ImageSets" / "Main" / "test.txt").exists()   # the test split is not carried over
    assert {p.name: p.read_bytes() for p in (synthetic_voc / "ImageSets" / "Main").iterdir()} == before
    # Rerunning finds it made; another draw into the same folder is refused, nothing overwritten.
    assert make_validation_split(synthetic_voc, out, fraction=0.25, seed=3) == summary
    with pytest.raises(DatasetError, match="exists with another split"):
        make_validation_split(synthetic_voc, out, fraction=0.25, seed=4)
    assert _ids(out / "ImageSets" / "Main" / "val.txt") == val


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 0.01])
def test_a_split_that_leaves_a_side_empty_is_refused(synthetic_voc, tmp_path, fraction):
    with pytest.raises(DatasetError, match="fraction|at least one image"):
        make_validation_split(synthetic_voc, tmp_path / "val", fraction=fraction)
    assert not (tmp_path / "val").exists()


def test_a_folder_that_is_not_such_a_split_is_refused(synthetic_voc, tmp_path):
    (tmp_path / "val").mkdir()
    with pytest.raises(DatasetError, match="is not a link"):
        make_validation_split(synthetic_voc, tmp_path / "val")


def test_the_tool_prints_the_summary(synthetic_voc, tmp_path):
    env = {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_val_split.py"), "--data", str(synthetic_voc),
                           "--out", str(tmp_path / "val"), "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["train"], summary["val"]) == (6, 2)   # round(0.2 * 8) held out
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "make_val_split.py"), "--data", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "v2")], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "nope" in bad.stderr and "Traceback" not in bad.stderr
