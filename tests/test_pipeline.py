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


@pytest.mark.parametrize("override, home", [
    ({"test": {"scales": [480, 688]}}, "features.scales"),
    ({"test": {"levels": [4, 2, 1]}}, "features.levels"),
    ({"test": {"max_size": 1000}}, "features.max_size"),
    ({"test": {"projection_rule": "code"}}, "features.projection_rule"),
    ({"test": {"feature_layer": "fc6"}}, "feature_layer"),
    ({"test": {"method": "rcnn"}}, "method"),
])
def test_test_settings_that_training_decides_are_refused_by_name(synthetic_voc, tmp_path, override, home):
    # Before: accepted and silently replaced by the training setting.
    from detection.config import ConfigError
    key = next(iter(override["test"]))
    cfg = merge(_config(synthetic_voc), override)
    with pytest.raises(ConfigError, match=rf"test\.{key} cannot be set: .* set {home} instead"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()          # refused before any work


def test_fc_finetuning_with_pool5_svms_is_refused(synthetic_voc, tmp_path):
    from detection.config import ConfigError
    cfg = merge(_config(synthetic_voc), {"finetune": {"enabled": True}, "feature_layer": "pool5"})
    with pytest.raises(ConfigError, match="finetune.enabled=true trains fc6/fc7, but the SVMs read pool5"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
