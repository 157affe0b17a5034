"""detection.apply and tools/detect.py: which files --images names, and detections that a COCO
tool reads and that score as eval_voc.py --model scores the same split (a small model trained on
the synthetic dataset); the same files from 2 processes as from 1; bad images skipped and listed."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detection.apply import collect_images
from detection.data.voc import VOCDataset
from detection.errors import DatasetError
from detection.evaluation import ClassDetections, evaluate_detections
from detection.evaluation.coco import coco_ground_truth

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), DETECTION_DIST_TIMEOUT="120", **extra)
    return env


def run(*args: str | Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_collect_images_expands_folders_and_patterns_in_order_once(tmp_path):
    a = _touch(tmp_path / "one" / "b.jpg")
    b = _touch(tmp_path / "one" / "a.PNG")
    _touch(tmp_path / "one" / "notes.txt")
    c = _touch(tmp_path / "one" / "sub" / "c.jpeg")
    d = _touch(tmp_path / "two" / "d.bmp")
    named = _touch(tmp_path / "odd.name")
    # a folder: its images sorted, not its subfolders; a named file whatever its suffix; a
    # pattern ('**' recurses); an image named twice comes once, where first named
    got = collect_images([tmp_path / "one", named, str(tmp_path / "**" / "*.jp*g"), str(tmp_path / "two")])
    assert got == [b, a, named, c, d]
    with pytest.raises(DatasetError, match="no file matches the pattern"):
        collect_images([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty .* holds no images"):
        collect_images([tmp_path / "empty"])
    with pytest.raises(DatasetError, match="nosuch.jpg does not exist"):
        collect_images([tmp_path / "nosuch.jpg"])


@pytest.fixture(scope="module")
def trained(synthetic_voc, tmp_path_factory):
    """A model trained by the tool chain on the synthetic trainval split, and eval_voc.py
    --model's metrics (VOC and COCO) for the test split."""
    tmp = tmp_path_factory.mktemp("apply")
    feat, model = tmp / "feat", tmp / "model.pt"
    common = ["--data", synthetic_voc, "--workers", "0", "--split", "trainval"]
    run(TOOLS / "extract_features.py", *common, "--out", feat, "--backbone", "alexnet", "--scales", "224", "--quiet")
    run(TOOLS / "train_svm.py", *common, "--features", feat, "--out", model, "--quiet")
    metrics = tmp / "eval" / "metrics.json"
    run(TOOLS / "eval_voc.py", "--data", synthetic_voc, "--split", "test", "--model", model, "--coco",
        "--out", metrics, "--quiet", "--device", "cpu")
    return model, json.loads(metrics.read_text())


def _test_images(root: Path) -> list[Path]:
    ids = (root / "ImageSets" / "Main" / "test.txt").read_text().split()
    return [root / "JPEGImages" / f"{i}.jpg" for i in ids]


@pytest.mark.slow
def test_detect_output_loads_in_pycocotools_and_scores_as_eval_voc(synthetic_voc, trained, tmp_path):
    model, metrics = trained
    assert metrics["mAP"] > 0.0                       # a model that finds something: AP is not trivially 0
    out = tmp_path / "det"
    test_ids = set((synthetic_voc / "ImageSets" / "Main" / "test.txt").read_text().split())
    images = _test_images(synthetic_voc)          # and the first one named again: detected once
    run(TOOLS / "detect.py", "--model", model, "--images", *images, images[0], "--out", out, "--draw", "--quiet",
        "--device", "cpu")
    info = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]) for i in info["images"]] == images and info["skipped"] == []
    assert [i["id"] for i in info["images"]] == list(range(1, len(images) + 1))
    assert sorted(p.name for p in (out / "drawn").iterdir()) == sorted(f"{p.stem}_det.png" for p in images)
    with Image.open(out / "drawn" / f"{images[0].stem}_det.png") as im:
        assert im.size == Image.open(images[0]).size

    dataset = VOCDataset(synthetic_voc, "test")
    assert [c["name"] for c in info["categories"]] == list(dataset.classes)
    gt = coco_ground_truth(dataset.records, dataset.classes)
    gt_id = {g["file_name"]: g["id"] for g in gt["images"]}
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {"image_id", "category_id", "bbox", "score", "probability"} <= set(dets[0])
    file_of = {i["id"]: Path(i["file_name"]).stem for i in info["images"]}
    assert set(file_of.values()) == test_ids
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{**d, "image_id": gt_id[file_of[d["image_id"]]]} for d in dets])
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(metrics["coco"]["AP"], abs=1e-9)
    assert ev.stats[1] == pytest.approx(metrics["coco"]["AP50"], abs=1e-9)

    # and the devkit's AP of the same detections is eval_voc's
    per_class = []
    for c in range(len(dataset.classes)):
        mine = [d for d in dets if d["category_id"] == c + 1]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)]).reshape(-1, 4)
        per_class.append(ClassDetections([file_of[d["image_id"]] for d in mine],
                                         np.array([d["score"] for d in mine]), boxes))
    voc = evaluate_detections(dataset.records, dataset.classes, per_class, metrics["metric"])
    assert voc["mAP"] == pytest.approx(metrics["mAP"], abs=1e-9)
    # a class without test objects: NaN here, null in metrics.json
    assert {k: None if v != v else v for k, v in voc["AP"].items()} == pytest.approx(metrics["AP"], abs=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_detect_on_two_processes_writes_what_one_does_and_skips_bad_images(synthetic_voc, trained, tmp_path):
    """A folder and a pattern, with an undecodable image among them: --skip-bad lists it; two
    processes (as torchrun starts them) write the same detections.json and images.json as one."""
    model, _ = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in _test_images(synthetic_voc):
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    base = [str(TOOLS / "detect.py"), "--model", str(model), "--images", str(folder), "--device", "cpu",
            "--threads", "1", "--quiet"]
    args = [*base, "--skip-bad"]
    run(*args, "--out", tmp_path / "one")
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, *args, "--out", str(tmp_path / "two")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    for p in ranks:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for name in ("detections.json", "images.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    info = json.loads((tmp_path / "one" / "images.json").read_text())
    assert [s["file_name"] for s in info["skipped"]] == [str(folder / "broken.jpg")]
    assert "broken.jpg" in info["skipped"][0]["error"]
    # ids are positions in the sorted folder: broken.jpg, the last, is skipped
    n = len(_test_images(synthetic_voc))
    assert [i["id"] for i in info["images"]] == list(range(1, n + 1))
    proc = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "three")], capture_output=True,
                          text=True, timeout=600, env=_env())
    assert proc.returncode == 2 and "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
