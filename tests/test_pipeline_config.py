"""Every setting of the pipeline's tree (detection.pipeline.PipelineConfig) either acts on the run or
is refused by name: a walk over every leaf (the dataclass fields, so a new setting without a
declared use fails here), the key of each stage it changes, the paths where it would do nothing,
and OUT/config.yaml read back as the same settings and the same keys."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from detection.config import ConfigError, load_config, merge, save_config
from detection.pipeline import PipelineConfig, detector_settings, refuse_unused_settings, stage_keys

TOOLS = Path(__file__).resolve().parents[1] / "tools"

ALL = frozenset({"conv_finetune", "train_parts", "train", "detect", "timing"})   # every artifact from the trunk on
TRAINED = frozenset({"train_parts", "train", "detect", "timing"})    # the model file and what uses it
CALIBRATED = frozenset({"train", "detect", "timing"})                # the calibration alone is refitted
TIMING = frozenset({"timing"})

#: How the run uses each leaf: the stages whose key (the settings hash its artifact is kept under)
#: changes with it. An empty set: the leaf changes how the run goes, never what it makes; the
#: reason says what it acts on.
RUNTIME = {
    "device": "the device every stage computes on",
    "proposal_workers": "selective-search processes",
    "features.workers": "DataLoader processes filling the conv-map cache",
    "features.cache": "whether conv maps are kept on disk or computed again (the same features: tests/test_nodes.py)",
    "train.memory_gb": "the budget of each process the train stage is checked against before any stage runs",
    "metric": "the AP definition the evaluation (rerun every time) writes to metrics.json",
}
_DATA = ["root", "train_split", "test_split", "flip", "classes", "skip_bad", "synthetic_trainval", "synthetic_test",
         "synthetic_seed", "synthetic_crowded"]
_PROPOSALS = ["mode", "max_boxes", "resize_to", "min_size", "base_k", "inc_k", "sigma", "seed"]
_FEATURES = ["scales", "max_size", "levels", "projection_rule", "scale_rule", "rcnn_batch_size"]
_FINETUNE = ["enabled", "iterations", "lr", "lr_steps", "momentum", "weight_decay", "batch_size", "images_per_batch",
             "fg_fraction", "fg_iou", "bg_iou_lo", "dropout", "hidden", "checkpoint_every", "seed"]
_SVM = ["C", "bias_multiplier", "pos_weight", "neg_iou", "hard_threshold", "evict_threshold", "retrain_every",
        "target_norm", "norm_images", "norm_boxes_per_image", "passes", "use_difficult", "tol", "max_iter", "seed",
        "classes_without_positives", "max_positives", "max_negatives", "mining_block"]
_BBOX = ["enabled", "lam", "min_iou", "regularize_bias", "include_gt", "use_difficult", "target_norm", "norm_images",
         "norm_boxes_per_image", "seed", "max_samples", "max_gt_samples"]
USES: dict[str, frozenset[str]] = {
    **{k: frozenset() for k in RUNTIME},
    **{f"data.{k}": ALL for k in _DATA},
    **{f"proposals.{k}": ALL for k in _PROPOSALS},
    **{f"backbone.{k}": ALL for k in ("name", "weights", "seed")},
    **{f"features.{k}": ALL for k in _FEATURES},
    **{f"conv_finetune.{k}": ALL for k in [*_FINETUNE, "conv_lr_mult"]},
    "method": TRAINED, "feature_layer": TRAINED, "features.fp16": TRAINED,
    **{f"train.finetune.{k}": TRAINED for k in _FINETUNE},
    **{f"train.svm.{k}": TRAINED for k in _SVM},
    **{f"train.bbox.{k}": TRAINED for k in _BBOX},
    **{f"train.calibration.{k}": CALIBRATED for k in ("enabled", "folds", "iou", "C", "nms_choices")},
    "train.max_train_windows": TRAINED, "train.head_seed": TRAINED,
    # The score calibration is fitted through the post-processing (tested apart without it).
    **{f"test.{k}": CALIBRATED for k in ("nms_iou", "max_per_class", "score_threshold", "box_vote_iou")},
    **{f"timing.{k}": TIMING for k in ("enabled", "num_images", "rcnn_windows")},
}

#: Settings under which a part acts (its switch on, fc layers for fc fine-tuning).
CONTEXT = {"conv_finetune.": {"conv_finetune": {"enabled": True}},
           "train.finetune.": {"feature_layer": "fc7", "train": {"finetune": {"enabled": True}}}}

#: Another valid value, where the generic rule (flip a bool, add one, nudge a number, shrink a
#: tuple's first element) cannot make one.
OTHER = {"method": "rcnn", "device": "cpu", "data.root": "/data/VOC2007", "data.train_split": "train",
         "data.test_split": "val", "data.classes": ["circle"], "proposals.mode": "quality",
         "backbone.name": "alexnet", "backbone.weights": "imagenet", "features.projection_rule": "code",
         "features.scale_rule": "code", "feature_layer": "fc7", "train.svm.classes_without_positives": "error",
         "metric": "voc10", "proposal_workers": 1, "features.workers": 1, "train.memory_gb": 12.0,
         "train.max_train_windows": 10, "train.calibration.nms_choices": [0.3, 0.5],
         "timing.rcnn_windows": 10, "test.box_vote_iou": 0.5}


def leaves(node: Any, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        out += leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def nested(leaf: str, value: Any) -> dict[str, Any]:
    for part in reversed(leaf.split(".")):
        value = {part: value}
    return value


def get(cfg: Any, leaf: str) -> Any:
    for part in leaf.split("."):
        cfg = getattr(cfg, part)
    return cfg


def other(leaf: str, value: Any) -> Any:
    if leaf in OTHER:
        return OTHER[leaf]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.05
    if isinstance(value, tuple):
        return [value[0] - 1, *value[1:]]
    raise AssertionError(f"no other value for {leaf} = {value!r}: add one to OTHER")


def context(leaf: str) -> PipelineConfig:
    cfg = PipelineConfig()
    for prefix, updates in CONTEXT.items():
        if leaf.startswith(prefix):
            cfg = merge(cfg, updates)
    return cfg


def changed_stages(a: PipelineConfig, b: PipelineConfig) -> set[str]:
    ka, kb = stage_keys(a), stage_keys(b)
    return {stage for stage in ka if ka[stage] != kb[stage]}


def test_every_leaf_has_a_declared_use():
    # A new setting must say what it acts on (here) or it fails: none is accepted and ignored.
    assert sorted(leaves(PipelineConfig())) == sorted(USES)


@pytest.mark.parametrize("leaf", sorted(USES))
def test_each_leaf_changes_the_keys_it_declares(leaf, tmp_path):
    base = context(leaf)
    changed = merge(base, nested(leaf, other(leaf, get(base, leaf))))
    assert get(changed, leaf) != get(base, leaf)
    refuse_unused_settings(changed)                 # a value the run takes
    assert changed_stages(base, changed) == USES[leaf]
    # OUT/config.yaml is the settings that ran: read back, the same tree and the same keys.
    save_config(changed, tmp_path / "config.yaml")
    again = load_config(PipelineConfig, tmp_path / "config.yaml")
    assert again == changed and stage_keys(again) == stage_keys(changed)


def _switchable() -> list[tuple[str, str]]:
    out = []
    for leaf in leaves(PipelineConfig()):
        part = leaf.rsplit(".", 1)[0]
        if "." in leaf and f"{part}.enabled" in USES and not leaf.endswith(".enabled"):
            out.append((leaf, f"{part}.enabled"))
    return out


@pytest.mark.parametrize("leaf, switch", _switchable())
def test_a_setting_of_a_switched_off_part_is_refused_by_name(leaf, switch):
    cfg = merge(context(leaf), nested(switch, False))
    cfg = merge(cfg, nested(leaf, other(leaf, get(cfg, leaf))))
    if leaf == "train.finetune.hidden":
        # The fc head's sizes act without fine-tuning too (fc6/fc7 features of a head of these
        # sizes); with SVMs on pool5 there is no fc layer and they are refused.
        refuse_unused_settings(merge(cfg, {"feature_layer": "fc7"}))
        with pytest.raises(ConfigError, match=r"train\.finetune\.hidden sizes fc6/fc7"):
            refuse_unused_settings(merge(cfg, {"feature_layer": "pool5"}))
        return
    with pytest.raises(ConfigError, match=rf"^{leaf} is set, but {switch}=false"):
        refuse_unused_settings(cfg)


@pytest.mark.parametrize("leaf", [k for k in USES if k.startswith("data.synthetic_")])
def test_the_generated_datasets_settings_are_refused_with_a_dataset_folder(leaf):
    cfg = merge(PipelineConfig(), {"data": {"root": "/data/VOC2007"}})
    refuse_unused_settings(cfg)
    cfg = merge(cfg, nested(leaf, other(leaf, get(cfg, leaf))))
    with pytest.raises(ConfigError, match=rf"{leaf} applies to the generated dataset only"):
        refuse_unused_settings(cfg)


@pytest.mark.parametrize("other_setting, message", [
    ({"method": "rcnn"}, "features.cache=false turns off the conv-map cache, which method=rcnn does not make"),
    ({"features": {"fp16": True}}, "features.fp16 stores the cached conv maps as float16, but features.cache=false "
                                   "keeps no maps")])
def test_without_the_cache_the_settings_of_the_cache_are_refused_by_name(other_setting, message):
    no_cache = merge(PipelineConfig(), {"features": {"cache": False}})
    refuse_unused_settings(no_cache)
    refuse_unused_settings(merge(PipelineConfig(), other_setting))
    with pytest.raises(ConfigError, match="^" + message):
        refuse_unused_settings(merge(no_cache, other_setting))


@pytest.mark.parametrize("leaf", [k for k in USES if k.startswith("test.")])
def test_detection_settings_key_only_detection_without_calibration(leaf):
    base = merge(PipelineConfig(), {"train": {"calibration": {"enabled": False}}})
    changed = merge(base, nested(leaf, other(leaf, get(base, leaf))))
    assert changed_stages(base, changed) == {"detect", "timing"}
    # The model file stores the setting: eval_voc.py --model detects with it.
    assert get(detector_settings(changed), leaf.split(".", 1)[1]) == get(changed, leaf)


def test_run_pipeline_keeps_every_set_option(tmp_path):
    # `--set a=1 --set b=2` keeps both (before, the second --set replaced the first): the refusal
    # names data.synthetic_trainval from the first and data.root from the second, before any work.
    proc = subprocess.run([sys.executable, str(TOOLS / "run_pipeline.py"), "--out", str(tmp_path / "run"),
                           "--set", "data.synthetic_trainval=10", "--set", "data.root=/data/VOC2007"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: data.synthetic_trainval applies to the generated dataset only; it cannot be set with data.root " \
           "(/data/VOC2007)" in proc.stderr
    assert not (tmp_path / "run").exists()
