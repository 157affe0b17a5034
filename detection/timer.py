"""Stage timers passed into the detector's own code path (so timing measures what ``detect()``
does, not a copy of it), and the pipeline's per-rank CPU accounting.

The detector wraps each of its stages in ``timer.stage(name)``; :data:`NO_TIMER` (the default)
does nothing, :class:`StageTimer` accumulates wall-clock seconds and optionally FLOPs per stage.
:class:`StageAccount` measures a process's wall and CPU seconds (its own and its worker
processes') per pipeline stage and writes them to a JSON file.
"""
from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch.utils.flop_counter import FlopCounterMode

from .io.jsonfile import write_json

__all__ = ["Timer", "NullTimer", "NO_TIMER", "StageTimer", "StageAccount", "cpu_seconds"]


class Timer(Protocol):
    def stage(self, name: str) -> contextlib.AbstractContextManager: ...


class NullTimer:
    """A timer that measures nothing (the detector's default)."""

    def stage(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


#: Stateless, so one instance serves every caller.
NO_TIMER = NullTimer()


class StageTimer:
    """Accumulates wall-clock seconds (and optionally FLOPs) per named stage."""

    def __init__(self, device: torch.device | str, count_flops: bool = False) -> None:
        self.device = torch.device(device)
        self.count_flops = count_flops
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, float] = {}

    def _sync(self) -> None:
        # CUDA runs asynchronously: without a sync a stage's work is billed to the next stage.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        counter = FlopCounterMode(display=False) if self.count_flops else contextlib.nullcontext()
        t0 = time.perf_counter()
        with counter:
            yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        if self.count_flops:
            self.flops[name] = self.flops.get(name, 0.0) + float(counter.get_total_flops())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished worker processes
    (``RUSAGE_CHILDREN`` counts a child once it has exited and been waited for: DataLoader and
    selective-search workers are, at the end of their stage)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageAccount:
    """Wall and CPU seconds of one process per named stage, accumulated, and written to ``path``
    (JSON, atomically) after every stage, so that a run stopped midway keeps what it measured.

    File: ``{"info": {...}, "stages": {name: {"wall_s": float, "cpu_s": float}}, "order": [name,
    ...]}``, ``order`` the stages in the order they first ran; ``info`` is the caller's (rank,
    world size, resources).
    """

    def __init__(self, path: str | Path | None, info: dict[str, Any] | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.info = dict(info or {})
        self.stages: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            entry = self.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] = round(entry["wall_s"] + time.perf_counter() - wall0, 4)
            entry["cpu_s"] = round(entry["cpu_s"] + cpu_seconds() - cpu0, 4)
            if self.path is not None:
                write_json(self.path, {"info": self.info, "stages": self.stages, "order": list(self.stages)})

    def wall(self, name: str) -> float:
        """Wall seconds of stage ``name`` so far (0 when it has not run)."""
        return self.stages.get(name, {}).get("wall_s", 0.0)
