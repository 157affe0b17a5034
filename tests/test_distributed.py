"""Several processes (torch.distributed, gloo on the CPU) give the artifacts of one: the sharding
arithmetic, the SVMs' mining shared by image and class and the class split of the box regressors
against one process, the whole pipeline on 2 processes (torchrun) against 1, and a rank killed mid-stage:
the other stops with a message naming the step and the rank, and a rerun (any number of
processes) resumes and gives the same result."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from detection import comm
from detection.data.synthetic import make_synthetic_voc
from detection.detector import DetectionSettings
from detection.errors import DistributedError
from detection.features import ConvMapCache
from detection.model import load_model
from detection.proposals import ProposalSet
from detection.training.bbox_regression import (BBoxRegressionConfig, assemble_box_regressors, fit_box_regressors,
                                                train_box_regressors)
from detection.training.calibration import CalibrationConfig, fit_calibration
from detection.training.hard_negatives import train_svms
from detection.training.samples import ListFeatureSource, Ranks
from detection.training.svm import SVMConfig

from test_bbox_regression import linear_map_source
from test_calibration import _sample as calibration_sample
from test_svm import DIM, make_samples

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


# ---- sharding arithmetic and the one-process versions -------------------------------------------

def test_shards_are_contiguous_cover_everything_once_and_differ_by_at_most_one():
    for n in range(0, 23):
        for parts in range(1, 6):
            bounds = [comm.shard_bounds(n, i, parts) for i in range(parts)]
            assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_without_a_launcher_every_collective_is_the_one_process_version(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    comm.init_distributed("cpu")
    assert (comm.world_size(), comm.rank(), comm.is_main(), comm.launched()) == (1, 0, True, False)
    assert comm.shard(["a", "b", "c"]) == ["a", "b", "c"]
    assert comm.gather(5, "x") == [5] and comm.all_gather(5, "x") == [5] and comm.broadcast(7, "x") == 7
    assert comm.all_reduce_sum(3, "x") == 3 and comm.main_first_value(lambda: "v", "x") == "v"
    comm.barrier("x")


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_timeout_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(comm.TIMEOUT_ENV, value)
    with pytest.raises(DistributedError, match=comm.TIMEOUT_ENV):
        comm.timeout_seconds()


# ---- the class split of the train stage -------------------------------------------------------

def _thread_ranks(world: int) -> list[Ranks]:
    """``Ranks`` of ``world`` trainers running in threads, exchanging values as the ranks' all-gather."""
    barrier, values, calls = threading.Barrier(world), {}, [0] * world

    def make(index: int):
        def all_gather(value, what):
            slot = calls[index]
            calls[index] += 1
            values[(slot, index)] = value
            barrier.wait()
            return [values[(slot, i)] for i in range(world)]
        return Ranks(index, world, all_gather)
    return [make(i) for i in range(world)]


@pytest.mark.parametrize("passes", [1, 3])
def test_svms_trained_by_ranks_sharing_images_and_classes_equal_one_trainer(passes, monkeypatch, tmp_path):
    # scikit-learn's liblinear draws from one process-wide generator (mt_rand in its newrand.h)
    # with the GIL released, so fits in concurrent threads interleave their draws and differ from
    # run to run. Ranks are processes, each with its own generator; here the threads take turns
    # inside a fit (the exchanges still meet between fits).
    lock, fit = threading.Lock(), LinearSVC.fit

    def one_fit_at_a_time(self, *args, **kwargs):
        with lock:
            return fit(self, *args, **kwargs)
    monkeypatch.setattr(LinearSVC, "fit", one_fit_at_a_time)
    k = 3
    source = ListFeatureSource(make_samples(0, 30, num_classes=k), DIM)
    # 4 ranks for blocks of 3 images and 3 classes: a rank with no image of a block and no class.
    cfg = SVMConfig(retrain_every=150, passes=passes, mining_block=3, max_negatives=60)
    whole = train_svms(source, k, cfg, class_names=["a", "b", "c"])
    ranks, parts = _thread_ranks(4), [None] * 4

    def run(i: int) -> None:
        parts[i] = train_svms(source, k, cfg, class_names=["a", "b", "c"], ranks=ranks[i], cache_dir=tmp_path)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for part in parts:                   # every rank ends with every class's SVM
        np.testing.assert_array_equal(part.weights, whole.weights)
        np.testing.assert_array_equal(part.biases, whole.biases)
        assert part.feature_scale == whole.feature_scale
        assert part.meta == whole.meta
    assert whole.meta["passes_done"] == passes or whole.meta["converged"]
    assert sum(st["dropped"] for st in whole.meta["stats"].values()) > 0


def test_a_bad_image_stops_every_rank_with_the_message_of_one_process():
    samples = make_samples(0, 12)
    bad = samples[7]
    samples[7] = type(bad)(key=bad.key, gt_boxes=bad.gt_boxes, gt_labels=bad.gt_labels, gt_features=bad.gt_features,
                           boxes=bad.boxes, features=np.full_like(bad.features, np.nan))
    source = ListFeatureSource(samples, DIM)
    with pytest.raises(Exception) as alone:
        train_svms(source, 2, SVMConfig(), feature_scale=1.0)
    ranks, errors = _thread_ranks(2), [None, None]

    def run(i: int) -> None:
        try:
            train_svms(source, 2, SVMConfig(), feature_scale=1.0, ranks=ranks[i])
        except Exception as e:  # noqa: BLE001 - the test compares the messages
            errors[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert "img007" in str(alone.value) and "NaN" in str(alone.value)
    assert [str(e) for e in errors] == [str(alone.value)] * 2


def test_calibration_shared_by_ranks_equals_one_process(monkeypatch):
    lock, fit = threading.Lock(), LinearSVC.fit       # one liblinear fit at a time (see above)

    def one_fit_at_a_time(self, *args, **kwargs):
        with lock:
            return fit(self, *args, **kwargs)
    monkeypatch.setattr(LinearSVC, "fit", one_fit_at_a_time)
    rng = np.random.default_rng(3)
    samples, groups = [], []
    for i in range(9):
        for suffix in ("", "_flip"):
            samples.append(calibration_sample(f"im{i}{suffix}", rng))
            groups.append(f"im{i}")
    source, cfg = ListFeatureSource(samples, dim=6), SVMConfig(C=0.1, norm_images=18, norm_boxes_per_image=50)

    def calibrate(ranks=Ranks()):
        return fit_calibration(source, groups, 2, cfg, CalibrationConfig(folds=3), feature_scale=1.0,
                               settings=DetectionSettings(), class_names=["a", "b"], ranks=ranks)
    whole, ranks, parts = calibrate(), _thread_ranks(3), [None] * 3

    def run(i: int) -> None:
        parts[i] = calibrate(ranks[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert whole is not None and whole.meta["windows"]["a"] > 0
    for part in parts:
        np.testing.assert_array_equal(part.slopes, whole.slopes)
        np.testing.assert_array_equal(part.intercepts, whole.intercepts)
        assert part.meta == whole.meta


def test_box_regressors_fitted_in_parts_equal_one_fit():
    dim, k = 12, 3
    rng = np.random.default_rng(1)
    source, _ = linear_map_source(2, 24, dim, rng.normal(scale=0.008, size=(k, dim, 4)),
                                  rng.normal(scale=0.03, size=(k, 4)))
    cfg, names = BBoxRegressionConfig(include_gt=False, min_iou=0.5), ["a", "b", "c"]
    whole = train_box_regressors(source, k, cfg, class_names=names, feature_scale=0.5)
    fitted = {}
    for classes in ([2], [0, 1]):
        fitted.update(fit_box_regressors(source, k, cfg, classes, class_names=names, feature_scale=0.5))
    parts = assemble_box_regressors(fitted, names, cfg, 0.5)
    for name in ("weights", "biases", "target_mean", "target_unwhiten"):
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name))
    assert parts.meta == whole.meta


PLAN_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from detection import comm
from detection.training import bbox_regression
from detection.training.bbox_regression import BBoxRegressionConfig, plan_regression_samples
from test_bbox_regression import linear_map_source
comm.init_distributed("cpu")
rng = np.random.default_rng(1)
source, _ = linear_map_source(2, 24, 12, rng.normal(scale=0.008, size=(3, 12, 4)), rng.normal(scale=0.03, size=(3, 4)))
seen = []
boxes_of = bbox_regression.candidate_boxes
def counted(source, i):                 # the images this rank plans
    seen.append(i)
    return boxes_of(source, i)
bbox_regression.candidate_boxes = counted
cfg = BBoxRegressionConfig(include_gt=True, min_iou=0.5, max_samples=50, max_gt_samples=5)   # caps after the gather
plan = plan_regression_samples(source, 3, cfg, share_images=True)
rows = [[[s.image, s.gt_rows.tolist(), s.gt_targets.tolist(), s.proposal_rows.tolist(), s.proposal_targets.tolist()]
         for s in per_class] for per_class in plan]
with open(f"{sys.argv[1]}.rank{comm.rank()}.json", "w") as f:
    json.dump({"plan": rows, "seen": seen}, f)
comm.shutdown()
"""


@pytest.mark.slow
def test_the_box_regression_plan_is_shared_by_image_and_equals_one_process(tmp_path):
    args = [sys.executable, "-c", PLAN_SCRIPT]
    subprocess.run([*args, str(tmp_path / "one"), str(ROOT / "tests")], check=True, env=_env(), timeout=300)
    for p in _launch([*args, str(tmp_path / "two"), str(ROOT / "tests")], 2):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one.rank0.json").read_text())
    two = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in range(2)]
    assert one["seen"] == list(range(24)) and [r["seen"] for r in two] == [list(range(12)), list(range(12, 24))]
    assert all(len(c) for c in one["plan"])
    capped = [sum(len(s[3]) for s in c) for c in one["plan"]]
    assert max(capped) == 50                     # a class was capped: the subset is drawn after the gather
    for rank in two:
        assert rank["plan"] == one["plan"]


# ---- fine-tuning, data parallel ----------------------------------------------------------------

FINETUNE_SCRIPT = """
import json, sys
import numpy as np, torch
from detection import comm
from detection.heads import FCHead
from detection.training.finetune import FinetuneConfig, WindowLabels, finetune
out, share, images_per_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
comm.init_distributed("cpu")
torch.set_num_threads(1)
rng = np.random.default_rng(0)
windows = []
for i in range(6):
    xy, wh = rng.uniform(0, 80, (40, 2)), rng.uniform(5, 40, (40, 2))
    labels = rng.integers(0, 3, 40).astype(np.int64)
    windows.append(WindowLabels(np.concatenate([xy, xy + wh], 1).astype(np.float32), labels,
                                np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)))
torch.manual_seed(1)
trunk = torch.nn.Linear(4, 16)          # stands for the conv layers: trained in the "images" runs
seen = {"windows": 0, "calls": 0}
def noise(n, generator):                # random draws, as random scales are: the image's or each window's
    if isinstance(generator, torch.Generator):
        return torch.randn(n, 16, generator=generator)
    assert len(generator) == n
    return torch.cat([torch.randn(1, 16, generator=g) for g in generator]) if n else torch.zeros(0, 16)
def pooled(i, boxes, generator):
    seen["windows"] += len(boxes)
    seen["calls"] += 1
    return torch.tanh(trunk(boxes / 50) + i) + 0.1 * noise(len(boxes), generator)
head = FCHead(16, (8, 8), num_classes=2, dropout=0.5, generator=torch.Generator().manual_seed(0))
cfg = FinetuneConfig(enabled=True, iterations=6, lr=0.05, lr_steps=(4,), batch_size=16,
                     images_per_batch=images_per_batch, hidden=(8, 8))
losses = finetune(head, windows, pooled, cfg, trunk=trunk if share == "images" else None, share=share)
with open(f"{out}.rank{comm.rank()}.json", "w") as f:
    json.dump(seen, f)
if comm.is_main():
    torch.save({"state": head.state_dict(), "trunk": trunk.state_dict(), "losses": torch.tensor(losses)}, out)
comm.shutdown()
"""


def _launch(args: list[str], world: int) -> list[subprocess.Popen]:
    """``world`` processes of ``args`` started as torchrun starts them."""
    port = str(_free_port())
    return [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def _finetune(out: Path, world: int, share: str, images_per_batch: int) -> tuple[dict, list[dict]]:
    """The fine-tuning script on ``world`` processes: rank 0's result and what each rank computed."""
    args = [sys.executable, "-c", FINETUNE_SCRIPT, str(out), share, str(images_per_batch)]
    if world == 1:
        subprocess.run(args, check=True, env=_env(), timeout=300)
    else:
        for p in _launch(args, world):
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    seen = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    return torch.load(out, weights_only=True), seen


def _assert_same_training(a: dict, b: dict) -> None:
    torch.testing.assert_close(b["losses"], a["losses"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["losses"][0], a["losses"][-1])           # it trained
    for part in ("state", "trunk"):
        for name, value in a[part].items():
            torch.testing.assert_close(b[part][name], value, rtol=1e-5, atol=1e-6, msg=f"{part}.{name}")


@pytest.mark.slow
def test_fine_tuning_shares_windows_over_any_number_of_processes(tmp_path):
    # 6 iterations of 16 windows drawn from 2 images: 1, 2 and 3 processes train the same weights,
    # and with 3 every rank pools and trains on its third of each batch's windows.
    one, _ = _finetune(tmp_path / "one.pt", 1, "windows", 2)
    for world in (2, 3):
        many, seen = _finetune(tmp_path / f"{world}.pt", world, "windows", 2)
        _assert_same_training(one, many)
        assert [s["windows"] for s in seen] == [6 * (16 * (r + 1) // world - 16 * r // world) for r in range(world)]


@pytest.mark.slow
def test_conv_fine_tuning_shares_images_and_idle_ranks_do_not_stall(tmp_path):
    # Training the trunk: one forward pass per image, so 2 images a batch on 3 ranks leave the
    # first without work; it adds zero gradients and the run is the one-process run.
    one, _ = _finetune(tmp_path / "one.pt", 1, "images", 2)
    three, seen = _finetune(tmp_path / "three.pt", 3, "images", 2)
    _assert_same_training(one, three)
    assert [s["calls"] for s in seen] == [0, 6, 6]       # an image per step on ranks 1 and 2
    assert sum(s["windows"] for s in seen) == 6 * 16


SKIP_BAD_SCRIPT = """
import json, sys
from detection import comm
from detection.data import voc
comm.init_distributed("cpu")
decoded = []
read = voc.read_image
def counted(path):                      # the decoding --skip-bad does, counted per rank
    decoded.append(path.name)
    return read(path)
voc.read_image = counted
ds = voc.VOCDataset(sys.argv[1], "trainval", skip_bad=True)
with open(f"{sys.argv[2]}.rank{comm.rank()}.json", "w") as f:
    json.dump({"records": [r.image_id for r in ds.records], "skipped": ds.skipped, "decoded": decoded}, f)
comm.shutdown()
"""


@pytest.mark.slow
def test_skip_bad_decodes_each_image_on_one_rank_and_every_rank_gets_the_same_list(synthetic_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc, root)
    ids = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    for bad in (ids[1], ids[6]):       # undecodable: half of each file is missing
        path = root / "JPEGImages" / f"{bad}.jpg"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    args = [sys.executable, "-c", SKIP_BAD_SCRIPT, str(root)]
    subprocess.run([*args, str(tmp_path / "one")], check=True, env=_env(), timeout=300)
    for p in _launch([*args, str(tmp_path / "two")], 2):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one.rank0.json").read_text())
    two = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in range(2)]
    assert list(one["skipped"]) == [ids[1], ids[6]] and one["records"] == [i for i in ids if i not in (ids[1], ids[6])]
    for rank in two:
        assert rank["skipped"] == one["skipped"] and rank["records"] == one["records"]
    assert sorted(one["decoded"]) == sorted(f"{i}.jpg" for i in ids)
    half = len(ids) // 2
    assert [sorted(r["decoded"]) for r in two] == [sorted(f"{i}.jpg" for i in ids[:half]),
                                                   sorted(f"{i}.jpg" for i in ids[half:])]


READ_SCRIPT = """
import json, sys
from detection import comm
from detection.data import voc
from detection.errors import DatasetError
comm.init_distributed("cpu")
parsed, inspected = [], []
parse, inspect = voc._read_annotation, voc.inspect_image
def counted_parse(path):                # the XML reads and image headers, counted per rank
    parsed.append(path.stem)
    return parse(path)
def counted_inspect(path):
    inspected.append(path.stem)
    return inspect(path)
voc._read_annotation, voc.inspect_image = counted_parse, counted_inspect
try:
    ds = voc.VOCDataset(sys.argv[1], "trainval")
    result = {"records": [[r.image_id, r.width, r.height, r.boxes.tolist(), r.labels.tolist()] for r in ds.records],
              "classes": list(ds.classes), "fingerprint": ds.fingerprint(), "imperfect": ds.imperfect}
except DatasetError as e:
    result = {"error": str(e)}
with open(f"{sys.argv[2]}.rank{comm.rank()}.json", "w") as f:
    json.dump({**result, "parsed": parsed, "inspected": inspected}, f)
comm.shutdown()
"""


def _read_split(root: Path, out: Path) -> tuple[dict, list[dict]]:
    args = [sys.executable, "-c", READ_SCRIPT, str(root)]
    subprocess.run([*args, str(out / "one")], check=True, env=_env(), timeout=300)
    for p in _launch([*args, str(out / "two")], 2):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return (json.loads((out / "one.rank0.json").read_text()),
            [json.loads((out / f"two.rank{r}.json").read_text()) for r in range(2)])


@pytest.mark.slow
def test_each_rank_reads_its_share_of_the_split_and_every_rank_gets_the_one_process_dataset(synthetic_voc, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc, root)
    ids = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    one, two = _read_split(root, tmp_path)
    assert "error" not in one and len(one["records"]) == len(ids)
    for rank in two:
        assert {k: rank[k] for k in ("records", "classes", "fingerprint", "imperfect")} == \
               {k: one[k] for k in ("records", "classes", "fingerprint", "imperfect")}
    half = len(ids) // 2
    assert [r["parsed"] for r in two] == [ids[:half], ids[half:]]
    assert [r["inspected"] for r in two] == [ids[:half], ids[half:]]
    assert one["parsed"] == ids and one["inspected"] == ids

    # A malformed XML in rank 1's share and a missing image in rank 0's: every rank stops with the
    # message of one process (the XML first: every annotation is read before any image).
    ann = root / "Annotations" / f"{ids[-2]}.xml"
    ann.write_text(ann.read_text()[:40])
    (root / "JPEGImages" / f"{ids[1]}.jpg").unlink()
    one, two = _read_split(root, tmp_path)
    assert "malformed annotation" in one["error"] and ids[-2] in one["error"]
    assert [r["error"] for r in two] == [one["error"]] * 2
    ann.unlink()
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(i for i in ids if i != ids[-2]) + "\n")
    one, two = _read_split(root, tmp_path)
    assert "does not exist" in one["error"] and ids[1] in one["error"]
    assert [r["error"] for r in two] == [one["error"]] * 2


# ---- whole runs on 2 processes ----------------------------------------------------------------

SMALL_CONFIG = """
data: {flip: false}
proposals: {max_boxes: 100, resize_to: 320, min_size: 16}
proposal_workers: 0
backbone: {name: alexnet, weights: null}
features: {scales: [128], workers: 0}
train: {svm: {norm_images: 4}}
metric: voc07
timing: {num_images: 1, rcnn_windows: 10}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), DETECTION_DIST_TIMEOUT="120", **extra)
    return env


def _pipeline(data: Path, out: Path, config: Path, processes: int) -> subprocess.CompletedProcess:
    args = [str(TOOLS / "run_pipeline.py"), "--data", str(data), "--out", str(out), "--config", str(config),
            "--device", "cpu", "--threads", "1", "--quiet"]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *args]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _results(folder: Path) -> dict[str, list[tuple[str, float, list[float]]]]:
    """Each devkit result file's lines: (image id, score, box)."""
    out = {}
    for path in sorted(folder.glob("comp4_det_test_*.txt")):
        rows = [line.split() for line in path.read_text().splitlines()]
        out[path.name] = [(r[0], float(r[1]), [float(v) for v in r[2:]]) for r in rows]
    return out


@pytest.mark.slow
def test_two_processes_give_the_artifacts_of_one(synthetic_voc, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_CONFIG)
    one, two = tmp_path / "one", tmp_path / "two"
    printed = _pipeline(synthetic_voc, one, config, 1).stdout
    printed_two = _pipeline(synthetic_voc, two, config, 2).stdout
    assert printed.count("mAP") == printed_two.count("mAP") == 1      # rank 0 alone prints

    # Proposals identical.
    for name in ("trainval", "test"):
        [a] = [p for p in (one / "proposals").glob("proposals_*.npz") if ProposalSet.load(p).metadata["split"] == name]
        b = two / "proposals" / a.name
        pa, pb = ProposalSet.load(a), ProposalSet.load(b)
        assert pa.image_ids == pb.image_ids
        np.testing.assert_array_equal(pa.boxes, pb.boxes)
    # Conv maps bit-identical (one torch thread in every process).
    [cache_one] = [ConvMapCache.open(p) for p in one.glob("features/convmaps_*")]
    cache_two = ConvMapCache.open(two / "features" / cache_one.root.name)
    for key in json.loads((cache_one.root / "index.json").read_text())["records"]:
        for a, b in zip(cache_one.maps(key), cache_two.maps(key)):
            np.testing.assert_array_equal(a, b)
    # The same model (SVMs, box regressors), detections and mAP.
    (ma, meta_a), (mb, meta_b) = load_model(one / "model.pt"), load_model(two / "model.pt")
    assert set(ma) == set(mb) and meta_a["settings"] == meta_b["settings"]
    for name, value in ma.items():
        torch.testing.assert_close(mb[name], value, rtol=1e-5, atol=1e-6, msg=name)
    ra, rb = _results(one / "results"), _results(two / "results")
    assert list(ra) == list(rb) and len(ra) == 4
    for name in ra:
        assert [(d[0]) for d in ra[name]] == [(d[0]) for d in rb[name]], name
        np.testing.assert_allclose([d[1] for d in ra[name]], [d[1] for d in rb[name]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([d[2] for d in ra[name]], [d[2] for d in rb[name]], rtol=1e-4, atol=1e-3)
    metrics_one = json.loads((one / "metrics.json").read_text())
    metrics_two = json.loads((two / "metrics.json").read_text())
    assert metrics_two["mAP"] == pytest.approx(metrics_one["mAP"], abs=1e-6)
    assert metrics_two["AP"] == pytest.approx(metrics_one["AP"], abs=1e-6)


@pytest.mark.slow
def test_the_stage_tools_on_two_processes_give_the_model_and_metrics_of_one(synthetic_voc, tmp_path):
    def chain(out: Path, processes: int) -> tuple[dict, dict]:
        launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                              str(processes)]
        common = ["--data", str(synthetic_voc), "--workers", "0", "--threads", "1"]
        for tool, *args in (
                ("extract_features.py", *common, "--split", "trainval", "--out", str(out / "feat"),
                 "--backbone", "alexnet", "--scales", "160", "--device", "cpu"),
                ("train_svm.py", *common, "--split", "trainval", "--features", str(out / "feat"),
                 "--out", str(out / "model.pt"), "--quiet"),
                ("eval_voc.py", "--data", str(synthetic_voc), "--split", "test", "--model", str(out / "model.pt"),
                 "--out", str(out / "metrics.json"), "--device", "cpu", "--threads", "1", "--quiet")):
            proc = subprocess.run([sys.executable, *launcher, str(TOOLS / tool), *args], capture_output=True,
                                  text=True, timeout=900, env=_env())
            assert proc.returncode == 0, tool + proc.stderr[-3000:]
        return load_model(out / "model.pt")[0], json.loads((out / "metrics.json").read_text())

    (model_one, metrics_one), (model_two, metrics_two) = chain(tmp_path / "one", 1), chain(tmp_path / "two", 2)
    for name, value in model_one.items():
        torch.testing.assert_close(model_two[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert metrics_two["mAP"] == pytest.approx(metrics_one["mAP"], abs=1e-6)
    assert metrics_two["num_detections"] == metrics_one["num_detections"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_and_a_rerun_resumes(tmp_path):
    data = make_synthetic_voc(tmp_path / "voc", num_trainval=24, num_test=2, seed=3)
    ids = (data / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    args = [sys.executable, str(TOOLS / "compute_proposals.py"), "--data", str(data), "--split", "trainval",
            "--workers", "1", "--no-progress"]
    out = tmp_path / "two"
    ranks = _launch([*args, "--out", str(out)], 2)     # as torchrun starts them; any launcher works
    second_half = [i for i in ids[len(ids) // 2:]]
    deadline = time.monotonic() + 300
    while not any(p.exists() for p in out.glob("proposals_*.shards/*.npy") if p.stem in second_half):
        assert time.monotonic() < deadline and ranks[1].poll() is None, ranks[1].communicate()
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGKILL)                # mid-stage: it has written some of its images
    ranks[1].wait()
    _, err = ranks[0].communicate(timeout=300)
    assert ranks[0].returncode == 2, err
    assert "error: rank 0 of 2: proposals: waiting for every rank's images: rank(s) 1 " in err, err
    [shards] = list(out.glob("proposals_*.shards"))
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npy")}
    assert 0 < len(kept) < len(ids) and not list(out.glob("proposals_*.npz"))

    # The same command with one process resumes: finished images are not recomputed.
    subprocess.run([*args, "--out", str(out)], check=True, capture_output=True, env=_env(), timeout=300)
    assert all(shards.joinpath(name).stat().st_mtime_ns == t for name, t in kept.items())
    reference = tmp_path / "one"
    subprocess.run([*args, "--out", str(reference)], check=True, capture_output=True, env=_env(), timeout=300)
    [a] = list(reference.glob("proposals_*.npz"))
    resumed, fresh = ProposalSet.load(out / a.name), ProposalSet.load(a)
    assert resumed.image_ids == fresh.image_ids
    np.testing.assert_array_equal(resumed.boxes, fresh.boxes)
