"""Where and with how many threads and worker processes the tools run: ``--device auto``,
``--threads`` and each rank's share of the machine's cores (:func:`rank_share`)."""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from . import comm
from .errors import DetectionError

__all__ = ["resolve_device", "set_threads", "cores_per_machine", "rank_share", "ResourcePlan", "resource_plan"]

log = logging.getLogger(__name__)


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


def cores_per_machine() -> int:
    """The CPU cores this process may run on: its affinity mask (what a container, ``taskset``
    or a batch scheduler grants), else every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):      # no affinity masks on this platform (macOS)
        return max(1, os.cpu_count() or 1)


def rank_share(requested: int | None, what: str, *, cores: int | None = None, local_world: int | None = None,
               minimum: int = 1) -> int:
    """How many threads or worker processes ``what`` uses in this process: ``requested`` when
    given (a warning when the processes of this machine, each using as many, would need more
    than its cores), else this rank's share of the cores, ``cores // local_world`` (at least
    ``minimum``), so that N processes on one machine never oversubscribe it.

    Args:
        requested: the user's explicit value, kept as it is; None: the share.
        what: the setting's name, for the warning.
        cores: cores of this machine (default :func:`cores_per_machine`).
        local_world: processes on this machine (default :func:`detection.comm.local_world_size`,
            the launcher's ``LOCAL_WORLD_SIZE``).
    """
    cores = cores_per_machine() if cores is None else cores
    local_world = comm.local_world_size() if local_world is None else local_world
    if requested is None:
        return max(minimum, cores // max(1, local_world))
    if requested * local_world > cores:
        log.warning("%s=%d in each of %d process(es) on this machine asks for %d of its %d cores: they will "
                    "compete (leave it unset for %d each)", what, requested, local_world, requested * local_world,
                    cores, max(minimum, cores // max(1, local_world)))
    return requested


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads for this process and return them: ``threads`` when given, else
    ``OMP_NUM_THREADS`` when set without a launcher (a user's explicit value), else this rank's
    share of the cores (:func:`rank_share`; a launcher's ``OMP_NUM_THREADS=1`` default is
    replaced by it, so the ranks of a machine use all of its cores and no more)."""
    if threads is not None and threads < 1:
        raise DetectionError(f"--threads must be >= 1, got {threads}")
    if threads is None and os.environ.get("OMP_NUM_THREADS") and not comm.launched():
        return torch.get_num_threads()
    threads = rank_share(threads, "--threads")
    torch.set_num_threads(int(threads))
    return threads


@dataclasses.dataclass(frozen=True)
class ResourcePlan:
    """The threads and worker processes of one rank, and what they were sized from."""

    cores: int                 # cores of this machine (its affinity mask)
    local_world: int           # processes of the run on this machine
    threads: int               # torch's CPU threads
    loader_workers: int        # DataLoader workers decoding images for the conv-map cache
    proposal_workers: int      # selective-search worker processes

    def describe(self) -> str:
        return (f"{self.threads} torch thread(s), {self.loader_workers} DataLoader worker(s), "
                f"{self.proposal_workers} selective-search process(es) ({self.cores} cores, "
                f"{self.local_world} process(es) on this machine)")


def resource_plan(loader_workers: int | None, proposal_workers: int | None) -> ResourcePlan:
    """This rank's workers: the given counts (``features.workers``, ``proposal_workers``), each
    None sized by :func:`rank_share`; threads are torch's current count (:func:`set_threads`)."""
    cores, local = cores_per_machine(), comm.local_world_size()
    return ResourcePlan(cores, local, torch.get_num_threads(),
                        rank_share(loader_workers, "features.workers", cores=cores, local_world=local),
                        rank_share(proposal_workers, "proposal_workers", cores=cores, local_world=local))
