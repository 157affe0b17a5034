"""Tests of detection.bench (the benchmarks behind tools/bench_spp.py, tools/bench_train_memory.py and
tools/bench_accounting.py, with the per-stage CPU accounting of detection.timer):
what they report is what they ran on, checked against the trunk's own geometry and by hand."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detection.backbones import build_backbone
from detection.bench import (accounting_table, bench_spp_core, bench_train_stage, first_image_of_shape,
                             format_accounting_table, read_accounting)
from detection.config import merge, save_config
from detection.data.voc import VOCDataset
from detection.errors import DetectionError
from detection.io.jsonfile import read_json, write_json
from detection.pipeline import PipelineConfig
from detection.timer import StageAccount

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_spp_core_reports_the_maps_and_windows_it_timed():
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = bench_spp_core(image, "zf5", scale=96, windows=40, levels=(2, 1), repeat=1, roi_pool=True)
    # 60x80 resized so the shorter side is 96: 96 x 128, and ZF-5's map of that input.
    assert out["image_size"] == [60, 80] and out["input_size"] == [96, 128]
    assert out["map_size"] == list(build_backbone("zf5").map_size(96, 128)) and out["channels"] == 256
    assert out["windows"] == 40 and out["levels"] == [2, 1] and out["repeat"] == 1
    for key in ("conv_s", "pool_windows_s", "pool_windows_roi_pool_method_s", "roi_pool_s"):
        assert out[key] > 0, key
    assert out["pool_windows_per_s"] == pytest.approx(40 / out["pool_windows_s"])
    assert bench_spp_core(image, "zf5", scale=96, windows=8, repeat=1, roi_pool=False)["roi_pool_s"] is None


def test_first_image_of_shape_is_the_first_with_that_side_ratio(synthetic_voc):
    records = VOCDataset(synthetic_voc, "test").records
    # The synthetic images are 320 x 240 (4:3): the first one is picked; no image is 2:1.
    assert first_image_of_shape(synthetic_voc, "test").image_id == records[0].image_id
    with pytest.raises(DetectionError, match="no image of split 'test' has a side ratio"):
        first_image_of_shape(synthetic_voc, "test", aspect=(1.9, 2.1))


def test_train_stage_benchmark_refuses_runs_it_cannot_measure(tmp_path, synthetic_voc):
    save_config(merge(PipelineConfig(), {"method": "rcnn", "data": {"root": str(synthetic_voc)}}),
                tmp_path / "config.yaml")
    with pytest.raises(DetectionError, match="measures SPP runs on a data folder without fine-tuning"):
        bench_train_stage(tmp_path, images=1)


def test_stage_account_counts_its_workers_cpu_and_writes_each_stage(tmp_path):
    # A worker process that burns CPU until its own clock shows 0.2 s, then reports it: the stage's
    # CPU seconds hold the worker's (RUSAGE_CHILDREN) on top of this process's own.
    burn = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2:\n    pass\n"
            "print(time.process_time())")
    account = StageAccount(tmp_path / "accounting" / "rank0.json", {"rank": 0, "world_size": 1})
    with account.stage("proposals"):
        child = float(subprocess.run([sys.executable, "-c", burn], capture_output=True, text=True,
                                     check=True).stdout)
    first = read_json(tmp_path / "accounting" / "rank0.json")
    assert first["info"] == {"rank": 0, "world_size": 1}
    assert first["stages"]["proposals"]["cpu_s"] >= child >= 0.2
    assert first["stages"]["proposals"]["wall_s"] >= 0.2
    with pytest.raises(RuntimeError):              # a failing stage is still billed and written
        with account.stage("train"):
            raise RuntimeError("stop")
    with account.stage("proposals"):               # a stage run twice adds up
        pass
    second = read_json(tmp_path / "accounting" / "rank0.json")
    assert second["order"] == ["proposals", "train"] and set(second["stages"]) == {"proposals", "train"}
    assert second["stages"]["proposals"]["cpu_s"] >= first["stages"]["proposals"]["cpu_s"]
    assert account.wall("proposals") == second["stages"]["proposals"]["wall_s"] and account.wall("detect") == 0.0


def test_accounting_table_sums_the_ranks_and_finds_the_slowest(tmp_path):
    one = {"info": {"rank": 0, "world_size": 1},
           "stages": {"data": {"cpu_s": 2.0, "wall_s": 2.5}, "train": {"cpu_s": 10.0, "wall_s": 11.0},
                      "evaluate": {"cpu_s": 0.0, "wall_s": 0.1}}}
    many = [{"info": {"rank": 0, "world_size": 2}, "stages": {"data": {"cpu_s": 1.0, "wall_s": 1.5},
                                                               "train": {"cpu_s": 6.0, "wall_s": 6.5}}},
            {"info": {"rank": 1, "world_size": 2}, "stages": {"data": {"cpu_s": 1.2, "wall_s": 1.4},
                                                               "train": {"cpu_s": 5.0, "wall_s": 7.0},
                                                               "evaluate": {"cpu_s": 0.1, "wall_s": 3.0}}}]
    rows = {r["stage"]: r for r in accounting_table(one, many)}
    assert list(rows) == ["data", "train", "evaluate"]          # the order the stages ran in
    assert [r["stage"] for r in accounting_table({**one, "order": ["train", "data", "evaluate"]}, many)] == \
        ["train", "data", "evaluate"]
    assert rows["train"] == {"stage": "train", "cpu_1": 10.0, "cpu_sum_n": 11.0, "sum_ratio": 1.1, "cpu_slowest_n": 6.0,
                             "slowest_ratio": 0.6, "wall_1": 11.0, "wall_n": 7.0, "cpu_per_rank": [6.0, 5.0]}
    assert rows["data"]["sum_ratio"] == 1.1 and rows["data"]["slowest_ratio"] == 0.6
    assert rows["evaluate"]["sum_ratio"] is None and rows["evaluate"]["cpu_per_rank"] == [0.0, 0.1]
    text = format_accounting_table(list(rows.values()), 2)
    assert "| train | 10.00 | 11.00 | 1.10 | 6.00 | 0.60 | 11.00 | 7.00 |" in text
    assert "| evaluate | 0.00 | 0.10 | - | 0.10 | - | 0.10 | 3.00 |" in text
    # read_accounting takes as many ranks as rank 0 recorded, and refuses a file that is not one.
    for r, rank in enumerate(many):
        write_json(tmp_path / "run" / "accounting" / f"rank{r}.json", rank)
    assert read_accounting(tmp_path / "run") == many
    write_json(tmp_path / "bad" / "accounting" / "rank0.json", {"stages": {}})
    with pytest.raises(DetectionError, match="no world_size"):
        read_accounting(tmp_path / "bad")


PARENT_THEN_CHILD = """
import subprocess, sys
held = bytearray(2560 * 2**20)
held[::4096] = b"\\x01" * len(held[::4096])  # touch every page: 2.5 GiB resident in this parent
child = "from detection.bench import peak_rss_bytes; print(peak_rss_bytes())"
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout)
"""


def test_peak_memory_is_the_process_own_not_its_parent():
    """A process started by a large one reports its own peak (ru_maxrss would report the parent's
    2.5 GiB: Linux carries it over fork and exec, as it did under pytest in CI). Importing torch
    and the package alone takes about 1 GiB."""
    out = subprocess.run([sys.executable, "-c", PARENT_THEN_CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child_peak = int(out.stdout.split()[-1])
    assert 0 < child_peak < 2 * 2**30, child_peak
