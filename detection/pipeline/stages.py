"""Which pipeline stages are done, with which settings (``OUT/stages.json``)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .. import comm
from ..config import to_dict
from ..errors import CacheError
from ..io.jsonfile import read_json, settings_key, write_json
from .config import PipelineConfig

__all__ = ["StageBook", "stage_key", "stage_keys"]

log = logging.getLogger(__name__)


class StageBook:
    """Book-keeping of which stages are done, with which settings (``OUT/stages.json``)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / "stages.json"
        self.state: dict[str, Any] = {}
        if self.path.exists():
            try:
                state = read_json(self.path)
                if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
                    raise CacheError(f"{self.path}: not a stage book (expected {{stage: {{key, ...}}}})")
                self.state = state
            except CacheError as e:
                # Only book-keeping: every stage's own cache is validated on its own, so forgetting
                # which are done costs their checks (and any stage whose artifact is missing).
                log.warning("%s; treating every stage as not done", e)

    def done(self, name: str, key: str, *artifacts: Path) -> bool:
        """Whether stage ``name`` is done with settings ``key`` and its artifacts exist; under
        ``torchrun`` rank 0 decides and tells the others, so that every rank takes the same path
        (every rank must ask; a stage rank 0 runs alone asks :meth:`done_here`)."""
        return comm.main_first_value(lambda: self.done_here(name, key, *artifacts), f"stage {name}: is it done?")

    def done_here(self, name: str, key: str, *artifacts: Path) -> bool:
        """:meth:`done` as this process sees it, without asking the other ranks."""
        return self.state.get(name, {}).get("key") == key and all(p.exists() for p in artifacts)

    def mark(self, name: str, key: str, seconds: float, **info: Any) -> None:
        """Record a finished stage (rank 0 writes the file)."""
        self.state[name] = {"key": key, "seconds": round(seconds, 3), **info}
        if comm.is_main():
            write_json(self.path, self.state)


def stage_key(*parts: Any) -> str:
    """A short hash of the settings a stage depends on (configs or plain values)."""
    return settings_key({"parts": [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]})


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """The key of each keyed stage: a hash of every setting its artifact depends on, and of no
    other (a process count or a memory budget changes how a stage runs, never what it makes).

    ``conv_finetune``: the trunk trained through SPP; ``train``: the model file; ``detect``: the
    result files; ``timing``: timing.json. ``train_parts`` keys the train stage's checkpoints of
    the SVMs and box regressors (``OUT/train_checkpoint/``): the model file's key without the
    score calibration, which is fitted through the detector's post-processing, so ``test`` keys
    ``train`` when it is fitted, and a change of ``test`` refits only the calibration. The
    proposals and the conv-map cache carry their own keys (:mod:`detection.proposals.cache`,
    :mod:`detection.features.convmap_cache`).
    """
    features = to_dict(cfg.features.feature_settings())
    conv = stage_key(cfg.data, cfg.proposals, cfg.backbone, features, cfg.conv_finetune)
    parts_cfg = {k: v for k, v in to_dict(cfg.train).items() if k not in ("memory_gb", "calibration")}
    parts = stage_key(cfg.method, cfg.data, cfg.proposals, cfg.backbone, features, cfg.features.fp16,
                      conv if cfg.conv_finetune.enabled else None, cfg.feature_layer, parts_cfg)
    train = stage_key(parts, cfg.train.calibration, cfg.test if cfg.train.calibration.enabled else None)
    return {"conv_finetune": conv, "train_parts": parts, "train": train, "detect": stage_key(train, cfg.test),
            "timing": stage_key(train, cfg.test, cfg.timing)}
