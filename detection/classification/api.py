"""The two tool-level calls: train (and test) a classifier, evaluate a classifier file.

``tools/train_classifier.py`` and ``tools/eval_classifier.py`` parse arguments and call these;
under ``torchrun`` every rank calls them, training is data parallel, scoring is sharded, and
rank 0 alone writes the artifacts.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import comm
from ..config import merge, parse_overrides, read_yaml_mapping
from ..errors import DatasetError
from ..io.files import make_dirs
from ..io.jsonfile import write_json
from ..runtime import resolve_device
from .config import ClassifierConfig, as_dict
from .data import ClassificationSet, read_split, train_split_name
from .model import load_classifier, save_classifier
from .robustness import plot_scale_curves, scale_curve
from .training import train_classifier
from .views import check_view, evaluate

__all__ = ["resolve_config", "run_training", "run_evaluation", "score_text"]

log = logging.getLogger(__name__)


def resolve_config(config_file: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                   backbone: str | None = None, weights: str | None = None, regime: str | None = None,
                   head: str | None = None, no_spp: bool = False) -> ClassifierConfig:
    """Defaults, then the YAML file, then the flags, then ``key=value`` overrides (each layer
    validated; unknown keys are refused by name)."""
    cfg = ClassifierConfig()
    if config_file is not None:
        cfg = merge(cfg, read_yaml_mapping(config_file))
    flags: dict[str, Any] = {"model": {}, "train": {}}
    for key, value in (("backbone", backbone), ("weights", weights), ("head", head)):
        if value is not None:
            flags["model"][key] = value
    if no_spp:
        flags["model"]["spp"] = False
    if regime is not None:
        flags["train"]["regime"] = regime
    cfg = merge(cfg, flags)
    return merge(cfg, parse_overrides(list(overrides)))


def score_text(metrics: dict[str, Any]) -> str:
    """The headline of a metrics dict: ``mAP 0.9750`` (VOC layout) or ``top-1 0.9438`` (ImageFolder)."""
    return f"mAP {metrics['map']:.4f}" if "map" in metrics else f"top-1 {metrics['top1']:.4f}"


def _check_pair(train: ClassificationSet, test: ClassificationSet) -> None:
    if test.multilabel:
        missing = [c for j, c in enumerate(test.classes) if not any(s.targets[j] == 1 for s in test.samples)]
        if missing:
            log.warning("class(es) %s have no positive image in split %s: their AP is undefined",
                        ", ".join(missing), test.split)


def run_training(data: str | os.PathLike, out: str | os.PathLike, cfg: ClassifierConfig, device: str = "auto",
                 view: str = "center") -> dict[str, Any] | None:
    """Train on the training split of ``data`` (``train`` or ``trainval``), test on ``test``;
    write ``out/classifier.pt`` and ``out/metrics.json`` (rank 0). Returns the metrics (rank 0)."""
    dev = resolve_device(device)
    comm.init_distributed(dev)
    out = Path(out)
    train = read_split(data, train_split_name(data))
    test = read_split(data, "test", train.classes)    # refused before training when the layouts disagree
    _check_pair(train, test)
    log.info("classifier config: %s", as_dict(cfg))
    log.info("%d training images, %d test images, %d classes (%s)", len(train.samples), len(test.samples),
             len(train.classes), train.layout)
    model, stats = train_classifier(train, cfg, dev)
    if not cfg.model.spp and view in ("full", "multi"):
        view = "center"
    metrics = evaluate(model, test, view, cfg.test, device=dev)
    if not comm.is_main():
        comm.barrier("classifier training: rank 0 writing")
        return None
    make_dirs(out)
    save_classifier(out / "classifier.pt", model, cfg, {"train_images": len(train.samples)})
    result = {"test": metrics, "training": stats, "config": as_dict(cfg), "data": str(data),
              "layout": train.layout, "world_size": comm.world_size(),
              "threads": torch.get_num_threads()}
    write_json(out / "metrics.json", result)
    comm.barrier("classifier training: rank 0 writing")
    return result


def run_evaluation(model_path: str | os.PathLike, data: str | os.PathLike, split: str, view: str,
                   out: str | os.PathLike, scales: Sequence[int] | None = None,
                   rescale: Sequence[float] | None = None, device: str = "auto") -> dict[str, Any] | None:
    """Score ``split`` of ``data`` with a classifier file and one view; write ``out`` (JSON), and
    with ``rescale`` factors the scale-robustness curve too (and ``<out stem>_scales.png``).

    Args:
        scales: the multi-view scales (shorter sides), instead of the file's ``test.multi_scales``.
        rescale: factors of the scale-robustness curve (e.g. 0.5 0.71 1 1.41 2).
    """
    dev = resolve_device(device)
    comm.init_distributed(dev)
    model, cfg, _meta = load_classifier(model_path)
    model.to(dev)
    if scales:
        cfg = merge(cfg, {"test": {"multi_scales": [int(s) for s in scales]}})
    check_view(model, view)
    data_set = read_split(data, split, model.classes)
    if data_set.multilabel != model.multilabel:
        raise DatasetError(f"{data} is {'a VOC-layout (multi-label)' if data_set.multilabel else 'an ImageFolder (single-label)'} "
                           f"dataset, but {model_path} was trained on {'multi' if model.multilabel else 'single'}-label data")
    metrics = evaluate(model, data_set, view, cfg.test, device=dev)
    curve = None
    if rescale:
        curve = scale_curve(model, data_set, view, cfg.test, list(rescale), device=dev)
    if not comm.is_main():
        comm.barrier("classifier evaluation: rank 0 writing")
        return None
    out = Path(out)
    result = {"model": str(model_path), "data": str(data), "split": split, **metrics,
              "multi_scales": list(cfg.test.multi_scales) if view == "multi" else None,
              "world_size": comm.world_size()}
    if curve is not None:
        result["scale_curve"] = curve
        plot_scale_curves({f"{Path(model_path).parent.name} ({view})": curve}, out.with_name(out.stem + "_scales.png"))
    write_json(out, result)
    comm.barrier("classifier evaluation: rank 0 writing")
    return result
