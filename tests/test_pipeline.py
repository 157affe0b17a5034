"""detection.pipeline.run_pipeline end to end on the tiny synthetic dataset (real selective search,
real AlexNet trunk, real SVMs): its artifacts, a rerun from the config.yaml it wrote that skips
every finished stage, and a change of a detection setting (NMS) that refits the score calibration
fitted through it, or, without calibration, re-detects without retraining."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from detection.config import merge, to_dict
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
        "train": {"svm": {"norm_images": 4}},
        "metric": "voc07",
        "timing": {"num_images": 1, "rcnn_windows": 10},
        "test": test,
    })


def _stages(out):
    return json.loads((out / "stages.json").read_text())


def test_pipeline_artifacts_resume_and_detection_settings(synthetic_voc, tmp_path, caplog):
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

    # OUT/config.yaml is exactly the settings that ran: read back, it is the config, and a rerun
    # from it finds every stage done with the same keys (nothing is recomputed).
    from detection.config import load_config
    from detection.pipeline import stage_keys
    written = load_config(PipelineConfig, out / "config.yaml")
    assert written == _config(synthetic_voc) and stage_keys(written) == stage_keys(_config(synthetic_voc))
    run_pipeline(written, out, progress=False)
    assert _stages(out) == first
    assert (out / "model.pt").stat().st_mtime_ns == model_mtime

    # Another NMS threshold: the score calibration is fitted through the detector's post-processing,
    # so it is refitted (before: the old one was kept), from the SVMs and box regressors of the
    # train stage's checkpoint; detection reruns, and the model file carries the new setting
    # (eval_voc.py --model detects as this run did).
    old = SPPDetector.from_file(out / "model.pt")
    assert old.meta["train"]["detection_settings"]["nms_iou"] == 0.3
    with caplog.at_level(logging.INFO, logger="detection"):
        run_pipeline(_config(synthetic_voc, nms_iou=0.6), out, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("calibration fold 1/2") for m in messages)
    assert any(m.startswith("SVMs from the checkpoint") for m in messages)
    assert any(m.endswith("box regressor from the checkpoint") for m in messages)
    assert not any(m.startswith("box regressor") and "checkpointed" in m for m in messages)   # none refitted
    second = _stages(out)
    assert second["train"]["key"] != first["train"]["key"]
    assert second["detect"]["key"] != first["detect"]["key"]
    new = SPPDetector.from_file(out / "model.pt")
    assert new.settings.nms_iou == 0.6 and old.settings.nms_iou == 0.3
    assert new.meta["train"]["detection_settings"]["nms_iou"] == 0.6
    # The model detects a new image with the proposals' settings of the run.
    assert new.settings.proposals.max_boxes == 100 and new.settings.proposals.mode == "fast"
    for name, tensor in old.svms.tensors().items():        # the same SVMs
        assert torch.equal(tensor, new.svms.tensors()[name]), name

    # Without the calibration the detection settings touch no trained part: another NMS threshold
    # keeps the train stage and reruns detection only.
    off = {"train": {"svm": {"norm_images": 4}, "calibration": {"enabled": False}}}
    run_pipeline(merge(_config(synthetic_voc, nms_iou=0.6), off), out, progress=False)
    third = _stages(out)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detection.training.calibration"):
        run_pipeline(merge(_config(synthetic_voc, nms_iou=0.5), off), out, progress=False)
    fourth = _stages(out)
    assert fourth["train"] == third["train"] and fourth["detect"]["key"] != third["detect"]["key"]
    assert not any(r.name == "detection.training.calibration" for r in caplog.records)
    assert SPPDetector.from_file(out / "model.pt").settings.nms_iou == 0.5


@pytest.mark.parametrize("key", ["scales", "levels", "max_size", "projection_rule", "feature_layer", "method",
                                 "proposals", "scale_rule", "rcnn_batch_size", "proposal_mode", "max_proposals"])
def test_test_holds_only_detection_settings(synthetic_voc, key):
    # test.* is the post-processing alone (DetectionSettings): what training decides has its one
    # home elsewhere (features.*, method, feature_layer, proposals), and a test.<key> for it is an
    # unknown key. Before, test.scales etc. were accepted and silently replaced by the training
    # setting, and OUT/config.yaml showed test.scales: [688] beside the features.scales that ran.
    from detection.config import ConfigError
    with pytest.raises(ConfigError, match=rf"unknown config key test\.{key}"):
        merge(_config(synthetic_voc), {"test": {key: 1}})
    assert set(to_dict(PipelineConfig().test)) == {"nms_iou", "score_threshold", "max_per_class", "box_vote_iou"}


def test_fc_finetuning_with_pool5_svms_is_refused(synthetic_voc, tmp_path):
    from detection.config import ConfigError
    cfg = merge(_config(synthetic_voc), {"train": {"finetune": {"enabled": True}}, "feature_layer": "pool5"})
    with pytest.raises(ConfigError, match=r"train\.finetune\.enabled=true trains fc6/fc7, but the SVMs read pool5"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("updates, match", [
    # Settings of a part that is switched off do nothing: refused, naming the switch.
    ({"train": {"finetune": {"lr": 0.1}}}, r"train\.finetune\.lr is set, but train\.finetune\.enabled=false"),
    ({"conv_finetune": {"iterations": 5}}, r"conv_finetune\.iterations is set, but conv_finetune\.enabled=false"),
    ({"train": {"calibration": {"enabled": False, "folds": 3}}},
     r"train\.calibration\.folds is set, but train\.calibration\.enabled=false"),
    ({"train": {"bbox": {"enabled": False, "lam": 10.0}}}, r"train\.bbox\.lam is set, but train\.bbox\.enabled=false"),
    ({"timing": {"enabled": False, "num_images": 1}}, r"timing\.num_images is set, but timing\.enabled=false"),
    # The generated dataset's settings with a dataset folder given.
    ({"data": {"synthetic_trainval": 10}}, r"data\.synthetic_trainval applies to the generated dataset only"),
    ({"data": {"synthetic_seed": 3}}, r"data\.synthetic_seed applies to the generated dataset only"),
    # The fc head's sizes without an fc layer (SVMs on pool5).
    ({"train": {"finetune": {"hidden": [64, 64]}}}, r"train\.finetune\.hidden sizes fc6/fc7"),
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
    # No mining again for the final SVMs: the only mining is the score calibration's fold SVMs,
    # fitted after the box regressors (through them).
    mining = [i for i, m in enumerate(messages) if "hard negatives" in m and m.startswith("pass")]
    folds = [i for i, m in enumerate(messages) if m.startswith("calibration fold 1/")]
    assert folds and all(i > folds[0] for i in mining)
    assert any(m.endswith("box regressor from the checkpoint") for m in messages)    # class 0 kept
    model = SPPDetector.from_file(out / "model.pt")
    for name, tensor in model.svms.tensors().items():
        assert torch.equal(tensor, saved["tensors"][name]), name
    # Kept after model.pt is written: a change of test.* refits the calibration alone from it.
    assert (ckpt / "svms.pt").is_file() and (ckpt / "bbox_1.pt").is_file() and (ckpt / "calibration.pt").is_file()
    # The budget refuses or allows a run, it never changes what is trained: another budget
    # keeps every stage.
    before = _stages(out)
    run_pipeline(merge(cfg, {"train": {"memory_gb": 12.0}}), out, progress=False)
    assert _stages(out) == before


@pytest.mark.parametrize("updates,match", [
    ({"train": {"memory_gb": 0.5}},
     r"train stage \(SVM hard-negative mining\).*train\.memory_gb=0\.5.*lower train\.svm\.max_negatives"),
    ({"train": {"memory_gb": 1.0, "svm": {"max_positives": 10, "max_negatives": 10}}},
     r"train stage \(box regression\).*train\.memory_gb=1.*lower train\.bbox\.max_samples or train\.bbox\.max_gt"),
    ({"train": {"svm": {"max_negatives": None}}},
     r"train\.svm\.max_positives / train\.svm\.max_negatives is null.*set both caps"),
    ({"train": {"memory_gb": -1.0}}, r"train\.memory_gb must be > 0"),
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


@pytest.mark.slow
def test_conv_finetuning_stage_trains_the_trunk_with_its_own_settings(synthetic_voc, tmp_path, caplog):
    # conv_finetune.* (the embedded default's stage) reaches the run: the trunk the features come
    # from is the fine-tuned one, and conv_finetune.conv_lr_mult is its learning rate's multiple
    # (0: the trunk stays as built, so its conv maps are those of the untrained trunk).
    from detection.backbones import build_backbone
    conv = {"enabled": True, "iterations": 2, "lr_steps": [1], "batch_size": 16, "images_per_batch": 2,
            "hidden": [16, 16], "checkpoint_every": 1}
    no_timing = {"enabled": False, "num_images": 3, "rcnn_windows": None}      # the defaults: off
    cfg = merge(_config(synthetic_voc), {"conv_finetune": conv, "timing": no_timing,
                                         "train": {"calibration": {"enabled": False}}})
    run_pipeline(cfg, tmp_path / "a", progress=False)
    tuned = SPPDetector.from_file(tmp_path / "a" / "model.pt")
    assert tuned.backbone.weights_id.startswith("finetuned:") and "conv_finetune" in _stages(tmp_path / "a")
    built = build_backbone("alexnet", weights=None).trunk.state_dict()
    assert any(not torch.equal(v, built[k]) for k, v in tuned.backbone.trunk.state_dict().items())

    frozen = merge(cfg, {"conv_finetune": {"conv_lr_mult": 0.0}})
    run_pipeline(frozen, tmp_path / "b", progress=False)
    kept = SPPDetector.from_file(tmp_path / "b" / "model.pt").backbone.trunk.state_dict()
    for k, v in kept.items():
        torch.testing.assert_close(v, built[k], rtol=0, atol=0)
