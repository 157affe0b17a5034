"""Stage timers passed into the detector's own code path (so timing measures what ``detect()``
does, not a copy of it).

The detector wraps each of its stages in ``timer.stage(name)``; :data:`NO_TIMER` (the default)
does nothing, :class:`StageTimer` accumulates wall-clock seconds and optionally FLOPs per stage.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator, Protocol

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Timer", "NullTimer", "NO_TIMER", "StageTimer"]


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
