"""detection.pipeline.run_pipeline end to end on the tiny synthetic dataset (real selective search,
real AlexNet trunk, real SVMs): its artifacts, a rerun that skips every finished stage, and a
change of detection-only settings (NMS) that re-detects without retraining."""
from __future__ import annotations

import json

import pytest
import torch

from detection.config import merge
from detection.detector import SPPDetector
from detection.pipeline import PipelineConfig, run_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(root, **test) -> PipelineConfig:
    return merge(PipelineConfig(), {
        "data": {"root": str(root), "flip": False},
        "proposals": {"max_boxes": 100, "workers": 0},
        "backbone": {"name": "alexnet", "weights": None},
        "features": {"scales": [128], "workers": 0},
        "svm": {"norm_images": 4},
        "metric": "voc07",
        "timing": {"num_images": 1, "rcnn_windows": 10},
        "test": test,
    })


def _stages(out):
    return json.loads((out / "stages.json").read_text())


def test_pipeline_artifacts_resume_and_detection_only_settings(synthetic_voc, tmp_path):
    out = tmp_path / "run"
    metrics = run_pipeline(_config(synthetic_voc), out, progress=False)
    for name in ("config.yaml", "model.pt", "metrics.json", "timing.json", "report.md", "stages.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["mAP"] == metrics["mAP"]
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["metric"] == "voc07"
    first = _stages(out)
    model_mtime = (out / "model.pt").stat().st_mtime_ns

    # The same config again: nothing is recomputed.
    run_pipeline(_config(synthetic_voc), out, progress=False)
    assert _stages(out) == first
    assert (out / "model.pt").stat().st_mtime_ns == model_mtime

    # Another NMS threshold: the train stage is kept, detection reruns with the new setting, and
    # the model file now carries it (eval_voc.py --model detects as this run did).
    old = SPPDetector.from_file(out / "model.pt")
    run_pipeline(_config(synthetic_voc, nms_iou=0.6), out, progress=False)
    second = _stages(out)
    assert second["train"] == first["train"]
    assert second["detect"]["key"] != first["detect"]["key"]
    new = SPPDetector.from_file(out / "model.pt")
    assert new.settings.nms_iou == 0.6 and old.settings.nms_iou == 0.3
    for name, tensor in old.svms.tensors().items():
        assert torch.equal(tensor, new.svms.tensors()[name]), name
