"""detection.pipeline.run_pipeline end to end on the tiny synthetic dataset (real selective search,
real AlexNet trunk, real SVMs): its artifacts, a rerun that skips every finished stage, and a
change of detection-only settings (NMS) that re-detects without retraining."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detection.config import merge
from detection.detector import SPPDetector
from detection.pipeline import PipelineConfig, run_pipeline
from detection.proposals import SelectiveSearchConfig, selective_search
from references import reference_voc_ap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(root, **test) -> PipelineConfig:
    return merge(PipelineConfig(), {
        "data": {"root": str(root), "flip": False},
        # Proposal settings away from their defaults: the model must detect with them.
        "proposals": {"max_boxes": 100, "resize_to": 320, "min_size": 16},
        "proposal_workers": 0,
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
    assert metrics["metric"] == "voc07"
    ref = reference_voc_ap(out / "model.pt", synthetic_voc, "voc07")
    assert {k: v for k, v in metrics["AP"].items() if v == v} == pytest.approx(ref, abs=1e-9)   # v == v: not NaN
    assert metrics["mAP"] == pytest.approx(np.mean(list(ref.values())), abs=1e-9)
    # 8 training images with a random trunk leave no held-out positive window to fit the score
    # calibration on (tests/test_accuracy.py fits one): the model gives scores only, and the
    # report says it draws them by score.
    assert SPPDetector.from_file(out / "model.pt").calibration is None and "calibration" not in metrics
    report = (out / "report.md").read_text()
    assert "## Score calibration" not in report and "## Detections (SVM score >= 0)" in report
    first = _stages(out)
    model_mtime = (out / "model.pt").stat().st_mtime_ns

    # The model file carries every proposal setting of training: detect() on a new image (no
    # proposals given) computes exactly the windows selective search gives with them.
    trained = SPPDetector.from_file(out / "model.pt")
    assert trained.settings.proposals == _config(synthetic_voc).proposals != SelectiveSearchConfig()
    image = np.random.default_rng(5).integers(90, 110, (200, 280, 3), dtype=np.uint8)
    image[40:150, 60:200] = (200, 60, 40)
    windows = selective_search(image, _config(synthetic_voc).proposals)
    np.testing.assert_array_equal(trained.proposals(image), windows)
    assert not np.array_equal(windows, selective_search(image))       # the settings matter here
    got, ref = trained.detect(image), trained.detect(image, windows)
    np.testing.assert_array_equal(got.boxes, ref.boxes)
    np.testing.assert_array_equal(got.scores, ref.scores)

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
    # The model detects a new image with the proposals' settings of the run.
    assert new.settings.proposals.max_boxes == 100 and new.settings.proposals.mode == "fast"
    for name, tensor in old.svms.tensors().items():
        assert torch.equal(tensor, new.svms.tensors()[name]), name


@pytest.mark.parametrize("override, home", [
    ({"test": {"scales": [480, 688]}}, "features.scales"),
    ({"test": {"levels": [4, 2, 1]}}, "features.levels"),
    ({"test": {"max_size": 1000}}, "features.max_size"),
    ({"test": {"projection_rule": "code"}}, "features.projection_rule"),
    ({"test": {"feature_layer": "fc6"}}, "feature_layer"),
    ({"test": {"method": "rcnn"}}, "method"),
    ({"test": {"proposals": {"max_boxes": 50}}}, "proposals"),
    ({"test": {"scale_rule": "code"}}, "features.scale_rule"),
    ({"test": {"rcnn_batch_size": 4}}, "features.rcnn_batch_size"),
])
def test_test_settings_that_training_decides_are_refused_by_name(synthetic_voc, tmp_path, override, home):
    # Before: accepted and silently replaced by the training setting.
    from detection.config import ConfigError
    key = next(iter(override["test"]))
    cfg = merge(_config(synthetic_voc), override)
    with pytest.raises(ConfigError, match=rf"test\.{key} cannot be set: .* set {home} instead"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()          # refused before any work


def test_the_old_test_proposal_settings_are_refused_by_name(synthetic_voc):
    # Their home is proposals (which the model file stores); before, test.proposal_mode and
    # test.max_proposals could differ from the windows the SVMs were trained on.
    from detection.config import ConfigError
    for key in ("proposal_mode", "max_proposals"):
        with pytest.raises(ConfigError, match=rf"unknown config key test\.{key}"):
            merge(_config(synthetic_voc), {"test": {key: 1}})


def test_fc_finetuning_with_pool5_svms_is_refused(synthetic_voc, tmp_path):
    from detection.config import ConfigError
    cfg = merge(_config(synthetic_voc), {"finetune": {"enabled": True}, "feature_layer": "pool5"})
    with pytest.raises(ConfigError, match="finetune.enabled=true trains fc6/fc7, but the SVMs read pool5"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("updates, match", [
    ({"finetune": {"finetune_conv": True}}, r"finetune\.finetune_conv=true: .* conv_finetune\.enabled=true"),
    ({"conv_finetune": {"finetune_conv": False}}, r"conv_finetune\.finetune_conv=false .* conv_finetune\.enabled=false"),
    ({"features": {"scale_rule": "random"}}, r"features / test settings: .*scale rule 'random'"),
    ({"features": {"max_size": 10 ** 6}}, r"features / test settings: setting max_size = 1000000"),
])
def test_settings_the_run_would_not_use_are_refused_by_name(synthetic_voc, tmp_path, updates, match):
    from detection.config import ConfigError
    with pytest.raises(ConfigError, match=match):
        run_pipeline(merge(_config(synthetic_voc), updates), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_every_feature_setting_reaches_the_detector():
    # features.* is the one home of the window-feature settings: each one is what training
    # and the model file's detector use.
    import dataclasses

    from detection.features import FeatureSettings
    from detection.pipeline import detector_settings
    changed = {"scales": (480, 688), "max_size": 1000, "levels": (4, 2, 1), "projection_rule": "code",
               "scale_rule": "code", "rcnn_batch_size": 16}
    assert set(changed) == {f.name for f in dataclasses.fields(FeatureSettings)}
    cfg = merge(PipelineConfig(), {"features": {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()},
                                   "method": "rcnn", "feature_layer": "fc6", "test": {"nms_iou": 0.4},
                                   "proposals": {"mode": "quality", "max_boxes": 300}})
    settings = detector_settings(cfg)
    assert {k: getattr(settings, k) for k in changed} == changed
    assert (settings.method, settings.feature_layer, settings.nms_iou) == ("rcnn", "fc6", 0.4)
    assert settings.proposals == cfg.proposals and (settings.proposals.mode, settings.proposals.max_boxes) == \
        ("quality", 300)


# The child: run_pipeline with the config above, paused for a minute right after class 0's box
# regressor is checkpointed (a logging handler, so the pipeline's own code runs unchanged), which
# is when the test kills it: inside box regression, the SVMs done, the model not yet written.
_CHILD = """
import logging, sys, time
from detection.config import from_dict
from detection.pipeline import PipelineConfig, run_pipeline
import json, torch
torch.set_num_threads(1)

class PauseInBoxRegression(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("box regressor 0 checkpointed"):
            print("PAUSED", flush=True)
            time.sleep(60)

logging.getLogger("detection.training.detector_training").addHandler(PauseInBoxRegression())
logging.getLogger("detection.training.detector_training").setLevel(logging.INFO)
run_pipeline(from_dict(PipelineConfig, json.loads(sys.argv[1])), sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_kill_in_box_regression_keeps_the_svms_and_the_rerun_continues(synthetic_voc, tmp_path, caplog):
    import logging
    import os
    import signal
    import subprocess
    import sys

    from detection.config import to_dict

    cfg = _config(synthetic_voc)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(to_dict(cfg)), str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = child.stdout.readline()           # blocks until the pause (or the child's end)
        assert line.strip() == "PAUSED", "the child finished or failed before box regression"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    ckpt = out / "train_checkpoint"
    assert (ckpt / "svms.pt").is_file() and (ckpt / "bbox_0.pt").is_file()
    assert not (ckpt / "bbox_1.pt").exists() and not (out / "model.pt").exists()
    assert not (out / "stages.json").exists() or "train" not in _stages(out)
    saved = torch.load(ckpt / "svms.pt", weights_only=True)

    with caplog.at_level(logging.INFO, logger="detection"):
        run_pipeline(cfg, out, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("SVMs from the checkpoint") for m in messages)
    assert not any("hard negatives" in m and "pass" in m for m in messages)          # no mining again
    assert any(m.endswith("box regressor from the checkpoint") for m in messages)    # class 0 kept
    model = SPPDetector.from_file(out / "model.pt")
    for name, tensor in model.svms.tensors().items():
        assert torch.equal(tensor, saved["tensors"][name]), name
    assert not ckpt.exists()                                  # model.pt holds everything now
    # The budget refuses or allows a run, it never changes what is trained: another budget
    # keeps every stage.
    before = _stages(out)
    run_pipeline(merge(cfg, {"memory_gb": 12.0}), out, progress=False)
    assert _stages(out) == before


@pytest.mark.parametrize("updates,match", [
    ({"memory_gb": 0.5}, r"train stage \(SVM hard-negative mining\).*memory_gb=0\.5.*lower svm\.max_negatives"),
    ({"memory_gb": 1.0, "svm": {"max_positives": 10, "max_negatives": 10}},
     r"train stage \(box regression\).*memory_gb=1.*lower bbox\.max_samples or bbox\.max_gt_samples"),
    ({"svm": {"max_negatives": None}}, r"svm\.max_positives / svm\.max_negatives is null.*memory_gb=8"),
    ({"memory_gb": -1.0}, r"memory_gb must be > 0"),
    ({"data": {"synthetic_crowded": True}}, r"data\.synthetic_crowded .* data\.root"),
])
def test_memory_budget_is_checked_before_any_stage(synthetic_voc, tmp_path, updates, match):
    from detection.errors import DetectionError

    cfg = merge(_config(synthetic_voc), updates)
    with pytest.raises(DetectionError, match=match):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "proposals").exists()


def test_fp16_maps_are_refused_with_rcnn(synthetic_voc, tmp_path):
    # Before: accepted and ignored (R-CNN makes no conv-map cache).
    from detection.config import ConfigError
    cfg = merge(_config(synthetic_voc), {"method": "rcnn", "features": {"fp16": True}})
    with pytest.raises(ConfigError, match=r"features\.fp16 sets up the conv-map cache"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
