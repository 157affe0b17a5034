"""Which trunk and recipe ``run_pipeline.py`` uses: without --data the embedded default's
(AlexNet, random); with --data and no trunk named a pretrained one (EfficientNet-Lite0, the
ImageNet weights installed with the package) and the --data recipe; a trunk the user names comes
with the user's weights or random init and the plain defaults."""
from __future__ import annotations

import pytest

from detection.backbones import build_backbone
from detection.backbones.efficientnet import lite_base_name, packaged_weights_file
from detection.config import ConfigError
from detection.io.files import file_sha256
from detection.pipeline import PipelineConfig, pipeline_config
from detection.pipeline.config import DATA_RECIPE_SCALES, refuse_unused_settings


def _trunk(**kwargs) -> tuple[str, str | None]:
    cfg = pipeline_config(**kwargs)
    return cfg.backbone.name, cfg.backbone.weights


def test_data_runs_default_to_a_pretrained_trunk(tmp_path):
    assert _trunk() == ("alexnet", None)
    assert _trunk(data="photos") == ("efficientnet_lite0_expanded", "imagenet")
    assert _trunk(data="photos", weights="/w.pth") == ("efficientnet_lite0_expanded", "/w.pth")
    assert _trunk(data="photos", backbone="zf5") == ("zf5", None)
    assert _trunk(data="photos", backbone="resnet18", weights="imagenet") == ("resnet18", "imagenet")
    assert _trunk(data="photos", overrides=["backbone.name=vgg16"]) == ("vgg16", None)
    config = tmp_path / "c.yaml"
    config.write_text("backbone: {name: squeezenet1_1}\n")
    assert _trunk(data="photos", config=str(config)) == ("squeezenet1_1", None)
    config.write_text("features: {scales: [600]}\n")
    assert _trunk(data="photos", config=str(config)) == ("efficientnet_lite0_expanded", "imagenet")
    # and it builds here, offline, from the installed package
    name, weights = _trunk(data="photos")
    backbone = build_backbone(name, weights=weights)
    # an expanded trunk is its base model's weights, cut further
    assert backbone.weights_id == f"sha256:{file_sha256(packaged_weights_file(lite_base_name(name)))}"


def test_the_data_recipe_comes_with_the_default_trunk_and_yields_to_what_the_user_writes(tmp_path):
    recipe = pipeline_config(data="photos")
    assert recipe.features.scales == DATA_RECIPE_SCALES == (480, 576, 688)
    assert (recipe.train.svm.C, recipe.metric, recipe.timing.enabled) == (0.01, "voc07", False)
    # A named trunk: the plain defaults (the paper's one scale 688, C 0.001, the timing stage).
    plain = PipelineConfig()
    for named in (pipeline_config(data="photos", backbone="zf5"),
                  pipeline_config(data="photos", overrides=["backbone.name=vgg16"])):
        assert (named.features.scales, named.train.svm.C, named.metric, named.timing.enabled) == \
            (plain.features.scales, plain.train.svm.C, plain.metric, plain.timing.enabled)
    # Whatever the user writes wins over the recipe: a flag, an override, the config file.
    assert pipeline_config(data="photos", scales="1").features.scales == (688,)
    assert pipeline_config(data="photos", overrides=["train.svm.C=0.001"]).train.svm.C == 0.001
    config = tmp_path / "c.yaml"
    config.write_text("timing: {enabled: true}\nmetric: voc10\n")
    from_file = pipeline_config(data="photos", config=str(config))
    assert (from_file.timing.enabled, from_file.metric, from_file.features.scales) == (True, "voc10", DATA_RECIPE_SCALES)
    # Without --data the embedded default is untouched by the recipe.
    assert pipeline_config().features.scales == (400,) and pipeline_config().timing.enabled


def test_a_setting_of_the_recipe_switched_off_timing_is_refused_by_name():
    cfg = pipeline_config(data="photos", overrides=["timing.num_images=5"])
    with pytest.raises(ConfigError, match="timing.num_images is set, but timing.enabled=false"):
        refuse_unused_settings(cfg)
    refuse_unused_settings(pipeline_config(data="photos", overrides=["timing.enabled=true", "timing.num_images=5"]))
