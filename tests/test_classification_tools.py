"""tools/train_classifier.py and tools/eval_classifier.py as users run them: bad layouts are
refused with one ``error:`` line; (slow) a 2-process run gives the 1-process result."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.classification import make_scale_folder

TOOLS = Path(__file__).resolve().parents[1] / "tools"
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
SMALL = ["model.backbone=zf5", "model.levels=[3,2,1]", "model.fixed_input=64", "train.crop=64", "train.resize=72",
         "train.sizes=[64,52]", "train.any_side=64", "test.resize=72", "test.crop=64", "test.full_side=64",
         "test.multi_scales=[64,80]", "model.head=svm"]


def run_tool(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env or CHILD_ENV)


def assert_refused(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert needle in errors[0], errors[0]


def image_folder(root: Path, layout: dict[str, list[str]]) -> Path:
    """``{"train/a": ["x.png", ...], ...}``: small PNGs in class folders (an empty list: an empty folder)."""
    rng = np.random.default_rng(0)
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / folder / name)
    return root


def train(data: Path, out: Path) -> subprocess.CompletedProcess:
    return run_tool("train_classifier.py", "--data", data, "--out", out, "--backbone", "zf5", "--device", "cpu",
                    "--set", *SMALL)


GOOD = {"train/a": ["1.png", "2.png"], "train/b": ["3.png", "4.png"], "test/a": ["5.png"], "test/b": ["6.png"]}


def test_refuses_an_empty_class_folder(tmp_path):
    data = image_folder(tmp_path / "d", {**GOOD, "train/c": [], "test/c": ["7.png"]})
    assert_refused(train(data, tmp_path / "out"), f"class folder {data / 'train' / 'c'} has no images")


def test_refuses_a_class_missing_from_the_test_split(tmp_path):
    data = image_folder(tmp_path / "d", {k: v for k, v in GOOD.items() if k != "test/b"})
    assert_refused(train(data, tmp_path / "out"), "class 'b' is missing from split")


def test_refuses_a_corrupt_image(tmp_path):
    data = image_folder(tmp_path / "d", GOOD)
    (data / "train" / "b" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert_refused(train(data, tmp_path / "out"), f"cannot read image {data / 'train' / 'b' / 'bad.jpg'}")


@pytest.mark.slow
def test_refuses_full_view_of_a_no_spp_model_and_a_detector_file(tmp_path):
    data = make_scale_folder(tmp_path / "tiny", train_per_class=3, test_per_class=2, height=64,
                             object_range=(16.0, 64.0))
    proc = run_tool("train_classifier.py", "--data", data, "--out", tmp_path / "nospp", "--backbone", "zf5",
                    "--no-spp", "--device", "cpu", "--set", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_tool("eval_classifier.py", "--model", tmp_path / "nospp" / "classifier.pt", "--data", data,
                    "--view", "full", "--out", tmp_path / "m.json")
    assert_refused(proc, "needs an SPP classifier")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    proc = run_tool("eval_classifier.py", "--model", tmp_path / "junk.pt", "--data", data, "--view", "center",
                    "--out", tmp_path / "m.json")
    assert_refused(proc, "junk.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tool: str, *args) -> None:
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(TOOLS / tool), *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(CHILD_ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
    data = make_scale_folder(tmp_path / "tiny", train_per_class=6, test_per_class=3, height=64,
                             object_range=(16.0, 64.0))
    args = ["--data", data, "--backbone", "zf5", "--regime", "any", "--device", "cpu", "--set", *SMALL]
    assert run_tool("train_classifier.py", *args, "--out", tmp_path / "one").returncode == 0
    _two_ranks("train_classifier.py", *args, "--out", tmp_path / "two")
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["test"]["top1"] == two["test"]["top1"]
    ev = ["--data", data, "--view", "multi", "--rescale", "0.8", "1.25"]
    proc = run_tool("eval_classifier.py", "--model", tmp_path / "one" / "classifier.pt", *ev, "--out", tmp_path / "e1.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _two_ranks("eval_classifier.py", "--model", tmp_path / "one" / "classifier.pt", *ev, "--out", tmp_path / "e2.json")
    e1, e2 = (json.loads((tmp_path / f).read_text()) for f in ("e1.json", "e2.json"))
    assert e1["top1"] == e2["top1"] and e1["scale_curve"]["values"] == e2["scale_curve"]["values"]
    assert (tmp_path / "e1_scales.png").stat().st_size > 1000
