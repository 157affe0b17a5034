"""Where and with how many threads the tools run: ``--device auto`` and ``--threads``."""
from __future__ import annotations

import os

import torch

from .errors import DetectionError

__all__ = ["resolve_device", "set_threads"]


def resolve_device(spec: str | torch.device) -> torch.device:
    """``"auto"``: ``cuda:LOCAL_RANK`` (``LOCAL_RANK`` as set by ``torchrun``, else 0) when a GPU
    is visible, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"``: that device, refused with a
    message when it is not there."""
    if isinstance(spec, torch.device):
        return spec
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DetectionError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DetectionError(f"device {spec!r}: no CUDA GPU is visible to torch; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DetectionError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif device.type != "cpu":
        raise DetectionError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def set_threads(threads: int | None) -> None:
    """torch's CPU threads for this process (None: torch's default, one per core)."""
    if threads is None:
        return
    if threads < 1:
        raise DetectionError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(int(threads))
