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

__all__ = ["StageBook", "stage_key"]

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
