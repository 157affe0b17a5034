"""Which trunk ``run_pipeline.py`` uses: without --data the embedded default's (AlexNet, random);
with --data and no trunk named a pretrained one (EfficientNet-Lite0, the ImageNet weights installed
with the package); a trunk the user names comes with the user's weights or random init."""
from __future__ import annotations

from detection.backbones import build_backbone
from detection.backbones.efficientnet import packaged_weights_file
from detection.io.files import file_sha256
from detection.pipeline import pipeline_config


def _trunk(**kwargs) -> tuple[str, str | None]:
    cfg = pipeline_config(**kwargs)
    return cfg.backbone.name, cfg.backbone.weights


def test_data_runs_default_to_a_pretrained_trunk(tmp_path):
    assert _trunk() == ("alexnet", None)
    assert _trunk(data="photos") == ("efficientnet_lite0", "imagenet")
    assert _trunk(data="photos", weights="/w.pth") == ("efficientnet_lite0", "/w.pth")
    assert _trunk(data="photos", backbone="zf5") == ("zf5", None)
    assert _trunk(data="photos", backbone="resnet18", weights="imagenet") == ("resnet18", "imagenet")
    assert _trunk(data="photos", overrides=["backbone.name=vgg16"]) == ("vgg16", None)
    config = tmp_path / "c.yaml"
    config.write_text("backbone: {name: squeezenet1_1}\n")
    assert _trunk(data="photos", config=str(config)) == ("squeezenet1_1", None)
    config.write_text("features: {scales: [600]}\n")
    assert _trunk(data="photos", config=str(config)) == ("efficientnet_lite0", "imagenet")
    # and it builds here, offline, from the installed package
    name, weights = _trunk(data="photos")
    backbone = build_backbone(name, weights=weights)
    assert backbone.weights_id == f"sha256:{file_sha256(packaged_weights_file(name))}"
