"""Tests of detection.bench (the benchmarks behind tools/bench_spp.py and tools/bench_train_memory.py):
what they report is what they ran on, checked against the trunk's own geometry and by hand."""
from __future__ import annotations

import numpy as np
import pytest

from detection.backbones import build_backbone
from detection.bench import bench_spp_core, bench_train_stage, first_image_of_shape
from detection.config import merge, save_config
from detection.data.voc import VOCDataset
from detection.errors import DetectionError
from detection.pipeline import PipelineConfig

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
