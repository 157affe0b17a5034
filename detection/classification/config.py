"""The classifier's settings: one frozen dataclass tree (the machinery of :mod:`detection.config`),
saved inside ``classifier.pt`` and validated when read back.

Each setting has one home: ``model`` (what the network is: it travels with the weights),
``train`` (how it was trained) and ``test`` (how views are made at test time). The tools' flags
(``--backbone``, ``--weights``, ``--regime``, ``--head``, ``--no-spp``) are overrides of these
keys, so every comparison in docs/classification.md is one flag apart.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from ..config import ConfigError, from_dict, merge, to_dict

__all__ = ["ModelConfig", "TrainConfig", "TestConfig", "ClassifierConfig", "REGIMES", "VIEWS", "HEADS",
           "config_from_dict", "with_overrides", "as_dict", "validate"]

REGIMES = ("single", "multi", "any")
VIEWS = ("center", "ten", "full", "multi")
HEADS = ("fc", "svm")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network.

    Attributes:
        backbone, weights, seed: :func:`detection.backbones.build_backbone` arguments (``weights``
            is recorded only: the trained trunk travels inside ``classifier.pt``).
        spp: True: the SPP layer (``levels``, the paper's whole-map bins) after the trunk, any
            input size; False: the baseline, a conventional max pool5 whose fixed window and
            stride (``ceil(a/6)``, ``floor(a/6)`` for the ``a x a`` map of a ``fixed_input``
            square, AlexNet/ZF's 3x3/2 on 13x13) only fit ``fixed_input`` inputs.
        levels: SPP pyramid (bins per side), the paper's {6, 3, 2, 1}; the finest also sets the
            no-SPP pool5 output (6x6).
        fixed_input: input side of the no-SPP baseline (and of crops: 224).
        hidden: widths of the fc layers before the class layer (the paper's fc6, fc7).
        dropout: dropout before each fc layer while training (the paper's 0.5).
        head: "fc" (the fc layers trained with a softmax / sigmoid loss) or "svm" (one linear
            SVM per class on the L2-normalised pooled vector, no fc: the paper's Table 12).
        train_trunk: also train the conv layers (False: the trunk stays as loaded).
    """

    backbone: str = "squeezenet1_1"
    weights: str | None = None
    seed: int = 0
    spp: bool = True
    levels: tuple[int, ...] = (6, 3, 2, 1)
    fixed_input: int = 224
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.5
    head: Literal["fc", "svm"] = "fc"
    train_trunk: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training.

    Attributes:
        regime: "single" (``crop`` crops), "multi" (``sizes``: the crop resized to each size in
            turn, switching after every epoch) or "any" (each image at its own aspect, shorter
            side ``any_side``, batched by aspect buckets).
        resize: shorter side images are resized to before cropping (the paper's 256).
        crop: crop side (224); crops are taken at the centre or a corner (the paper's five).
        sizes: the multi-size regime's input sides, used in turn epoch by epoch (224, 180).
        any_side: shorter side of the any-size regime's inputs.
        batching: any-size batches: "bucket" (one exact size per batch, no padding) or "pad"
            (random batches, zero-padded (the mean colour) at the bottom/right to the largest).
        aspect_step: bucket width in log(width/height): 0.1 -> images are stretched by at most
            exp(0.05) - 1 = 5 % to their bucket's aspect.
        max_aspect: aspects beyond [1/max_aspect, max_aspect] are squeezed to it (a 4:1 banana
            crop at side 224 would be 900 px wide).
        epochs, batch_size, lr, momentum, weight_decay: SGD on the summed cross-entropy (or
            sigmoid BCE for multi-label data) divided by the batch size.
        lr_steps: epochs from which lr is divided by 10 (once per step passed; the paper
            divides twice).
        flip: random horizontal flips.
        svm_c: C of each linear SVM (head "svm").
        seed: seed of the crops, flips, batch order and dropout.
    """

    regime: Literal["single", "multi", "any"] = "single"
    resize: int = 256
    crop: int = 224
    sizes: tuple[int, ...] = (224, 180)
    any_side: int = 224
    batching: Literal["bucket", "pad"] = "bucket"
    aspect_step: float = 0.1
    max_aspect: float = 3.0
    epochs: int = 10
    batch_size: int = 32
    # The paper's 0.01 trains a whole network from scratch; fc layers on the 25,600-d SPP vector
    # of a pretrained trunk diverged at 0.001 (docs/benchmarks.md, "Classification").
    lr: float = 0.0003
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: tuple[int, ...] = ()
    flip: bool = True
    svm_c: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TestConfig:
    """Test views (see :mod:`.views`).

    Attributes:
        resize: shorter side before the centre / ten 224 crops (256).
        crop: side of those crops (224).
        full_side: shorter side of the full-image view (the paper's 256).
        multi_scales: shorter sides of the multi-view test, one conv map each (the paper's six).
        batch_size: centre-view images per forward pass.
    """

    resize: int = 256
    crop: int = 224
    full_side: int = 256
    multi_scales: tuple[int, ...] = (224, 256, 300, 360, 448, 560)
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    test: TestConfig = TestConfig()

    def __post_init__(self) -> None:
        validate(self)


def _positive(where: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{where} must be a positive number, got {value!r}")


def validate(cfg: ClassifierConfig) -> None:
    """Refuse settings that cannot run, naming the key."""
    m, t, s = cfg.model, cfg.train, cfg.test
    if not m.levels or any(n < 1 for n in m.levels) or len(m.levels) > 8 or max(m.levels) > 32:
        raise ConfigError(f"model.levels must be 1 to 8 bins-per-side in 1..32, got {list(m.levels)}")
    if any(h < 1 or h > 65536 for h in m.hidden) or len(m.hidden) > 4:
        raise ConfigError(f"model.hidden must be at most 4 widths in 1..65536, got {list(m.hidden)}")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}")
    for where, v in (("model.fixed_input", m.fixed_input), ("train.resize", t.resize), ("train.crop", t.crop),
                     ("train.any_side", t.any_side), ("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                     ("train.lr", t.lr), ("train.aspect_step", t.aspect_step), ("train.svm_c", t.svm_c),
                     ("test.resize", s.resize), ("test.crop", s.crop), ("test.full_side", s.full_side),
                     ("test.batch_size", s.batch_size)):
        _positive(where, v)
    if not t.max_aspect >= 1.0 or not math.isfinite(t.max_aspect):
        raise ConfigError(f"train.max_aspect must be >= 1, got {t.max_aspect}")
    if t.momentum < 0 or t.weight_decay < 0:
        raise ConfigError("train.momentum and train.weight_decay must be >= 0")
    if not t.sizes or any(v < 1 for v in t.sizes) or not s.multi_scales or any(v < 1 for v in s.multi_scales):
        raise ConfigError("train.sizes and test.multi_scales must be non-empty lists of positive sides")
    if t.crop > t.resize:
        raise ConfigError(f"train.crop ({t.crop}) must not exceed train.resize ({t.resize})")
    if s.crop > s.resize:
        raise ConfigError(f"test.crop ({s.crop}) must not exceed test.resize ({s.resize})")
    if any(v > 4096 for v in (*t.sizes, *s.multi_scales, t.resize, t.any_side, s.resize, s.full_side, m.fixed_input)):
        raise ConfigError("image sides above 4096 px are refused (train.*, test.*, model.fixed_input)")
    if not m.spp:
        if t.regime != "single":
            raise ConfigError(f"train.regime={t.regime!r} needs the SPP layer: the no-SPP baseline takes only "
                              f"{m.fixed_input}x{m.fixed_input} inputs (use regime single)")
        if t.crop != m.fixed_input or s.crop != m.fixed_input:
            raise ConfigError(f"the no-SPP baseline takes {m.fixed_input}x{m.fixed_input} inputs: train.crop "
                              f"({t.crop}) and test.crop ({s.crop}) must equal model.fixed_input")


def config_from_dict(data: Any, where: str = "config") -> ClassifierConfig:
    """A config from plain data (e.g. read from a model file), every key checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a mapping")
    return from_dict(ClassifierConfig, data)


def with_overrides(cfg: ClassifierConfig, updates: dict[str, Any]) -> ClassifierConfig:
    """:func:`detection.config.merge`, re-validated."""
    return merge(cfg, updates)


def as_dict(cfg: ClassifierConfig) -> dict[str, Any]:
    return to_dict(cfg)
