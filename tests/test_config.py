import dataclasses

import pytest

from detection.config import ConfigError, load_config, merge, parse_overrides, save_config, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    scales: tuple[int, ...] = (688,)
    rule: str = "paper"
    lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "zf5"
    flip: bool = True
    weights: str | None = None
    inner: Inner = Inner()


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: vgg16\ninner:\n  scales: [480, 688]\n")
    cfg = load_config(Outer, f, ["inner.lr=0.01", "flip=false", "weights=/x.pth"])
    assert cfg == Outer(name="vgg16", flip=False, weights="/x.pth", inner=Inner(scales=(480, 688), lr=0.01))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # frozen after merging


def test_unknown_keys_and_bad_types_rejected(tmp_path):
    with pytest.raises(ConfigError, match="inner.nope"):
        merge(Outer(), {"inner": {"nope": 1}})
    with pytest.raises(ConfigError, match="unknown"):
        load_config(Outer, None, ["typo=1"])
    with pytest.raises(ConfigError, match="integer"):
        merge(Outer(), {"inner": {"scales": ["a"]}})
    with pytest.raises(ConfigError, match="true/false"):
        merge(Outer(), {"flip": "yes"})
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_save_round_trip(tmp_path):
    cfg = merge(Outer(), {"inner": {"scales": [480, 576]}})
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg
    assert to_dict(cfg)["inner"]["scales"] == [480, 576]


@dataclasses.dataclass(frozen=True)
class Pair:
    hidden: tuple[int, int] = (4096, 4096)


def test_fixed_length_tuples():
    assert merge(Pair(), {"hidden": [256, 128]}) == Pair(hidden=(256, 128))
    with pytest.raises(ConfigError, match="2 values"):
        merge(Pair(), {"hidden": [1, 2, 3]})
