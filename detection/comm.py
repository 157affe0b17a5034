"""The one module that knows about ``torch.distributed``: rank, world size, sharding, barriers and
gathering results to rank 0.

Started by ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``), every tool joins the process group on its first call to
:func:`init_distributed`: gloo when the process works on the CPU, NCCL (with gloo beside it for
the small Python objects exchanged here) on GPUs. Without a launcher every function here is the
trivial one-process version: rank 0 of 1, :func:`shard` returns everything, barriers return at
once.

A rank that stops (an error, a kill, out of memory) closes its connections: the others fail in
their next collective with a :class:`~detection.errors.DistributedError` that names the step and
the ranks that did not answer, instead of hanging. A rank that hangs without dying is caught by
the collectives' timeout, ``DETECTION_DIST_TIMEOUT`` seconds (default 1,800).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Sequence
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError
from .io.files import process_alive

__all__ = ["TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "launched", "init_distributed", "shutdown", "world_size", "rank",
           "local_world_size", "is_main", "shard", "shard_bounds", "barrier", "broadcast",
           "all_gather", "gather", "all_reduce_sum", "main_first_value", "sum_gradients"]

T = TypeVar("T")

#: Environment variable: seconds a collective waits for the other ranks before giving up.
TIMEOUT_ENV = "DETECTION_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
#: Set by torchrun's agent: how many times it restarted the workers (``--max-restarts``).
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"


def launched() -> bool:
    """Whether a launcher asked for more than one process (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not an integer") from None


def timeout_seconds() -> float:
    """The collectives' timeout (``DETECTION_DIST_TIMEOUT``, refused by name when not a positive number)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: the collectives' timeout must be a positive number of "
                               "seconds")
    return value


def init_distributed(device: torch.device | str | None = None) -> None:
    """Join the process group the launcher describes (``env://``); nothing without a launcher or
    when already joined. ``device``: where this rank computes (a CUDA device selects NCCL for
    CUDA tensors and makes it this rank's current GPU)."""
    if not launched() or is_initialized():
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    device = torch.device(device) if device is not None else torch.device("cpu")
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    timeout = datetime.timedelta(seconds=timeout_seconds())
    try:
        # The launcher's store (env://), its keys under a prefix of its own for each attempt:
        # after a restart (torchrun --max-restarts) torchrun's agent serves the workers the same
        # store, where the killed attempt's keys remain, and a rank of the new attempt could read
        # a dead peer's gloo address and wait on it until the timeout (seen here).
        store, rank_, size = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        attempt = _env_int(RESTART_ENV, 0)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"detection/attempt_{attempt}", store),
                                rank=rank_, world_size=size, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {os.environ.get('RANK', '?')} could not join the process group at "
                               f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} "
                               f"({_one_line(e)})") from None
    # Who is who, so that a rank that loses another can say which (see _lost_ranks).
    peers = all_gather((socket.gethostname(), os.getpid()), "joining: exchanging host names and process ids")
    _PEERS.clear()
    _PEERS.extend(peers)


def shutdown() -> None:
    """Leave the process group (the end of a tool); nothing when none was joined."""
    if is_initialized():
        dist.destroy_process_group()
    _PEERS.clear()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def local_world_size() -> int:
    """Processes on this machine (``LOCAL_WORLD_SIZE``; 1 without a launcher)."""
    # Read before the process group is joined too: threads and workers are sized from it first.
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def is_main() -> bool:
    return rank() == 0


def shard_bounds(n: int, index: int | None = None, parts: int | None = None) -> tuple[int, int]:
    """[start, stop) of part ``index`` (default: this rank) of ``n`` items cut into ``parts``
    (default: the world size) contiguous pieces whose sizes differ by at most one: no padding,
    no duplicates."""
    index = rank() if index is None else index
    parts = world_size() if parts is None else parts
    return n * index // parts, n * (index + 1) // parts


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (all of them in a one-process run)."""
    start, stop = shard_bounds(len(items))
    return list(items[start:stop])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


# How gloo names the ranks it lost (monitored_barrier on rank 0; its peers on the others).
_MISSING_RANKS = re.compile(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier")
_LOST_RANK = re.compile(r"send/recv from rank (\d+)")

#: (host name, pid) of every rank, in rank order: filled once when the process group is joined,
#: emptied when it is left. Only read to name the ranks whose process is gone after a failure.
_PEERS: list[tuple[str, int]] = []


def _lost_ranks() -> list[int]:
    """Ranks on this machine whose process is gone (ranks on other machines cannot be checked)."""
    host = socket.gethostname()
    return [r for r, (h, pid) in enumerate(_PEERS) if h == host and r != rank() and not process_alive(pid)]


def _collective(what: str, fn: Callable[[], T]) -> T:
    """Run one collective; a failure (a rank died or timed out) becomes a DistributedError naming
    the step, this rank and, where the backend knows them, the ranks that did not answer."""
    try:
        return fn()
    except (RuntimeError, ValueError, ConnectionError) as e:   # DistBackendError is a RuntimeError
        text = _one_line(e)
        missing, lost, gone = _MISSING_RANKS.search(text), _LOST_RANK.search(text), _lost_ranks()
        who = (f"rank(s) {', '.join(map(str, gone))} stopped (process gone)" if gone else
               f"rank(s) {missing.group(1).strip()} never got there" if missing else
               f"rank {lost.group(1)} is gone" if lost else
               f"another rank stopped or did not answer within {timeout_seconds():g} s")
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what}: {who} (it failed or was killed: its own log says why; "
            f"rerun the same command to resume) [{text}]") from None


def barrier(what: str) -> None:
    """Wait until every rank reaches this point. On gloo, rank 0 names the ranks that did not."""
    if world_size() == 1:
        return
    timeout = datetime.timedelta(seconds=timeout_seconds())

    def wait() -> None:
        if dist.get_backend() == "gloo":
            # Reports which ranks are missing (gloo only); every rank calls it.
            dist.monitored_barrier(timeout=timeout, wait_all_ranks=True)
        else:
            dist.barrier()
    _collective(what, wait)


def broadcast(value: T, what: str) -> T:
    """Rank 0's ``value`` on every rank (Python objects, sent pickled between the ranks)."""
    if world_size() == 1:
        return value
    box = [value]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def all_gather(value: T, what: str) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    _collective(what, lambda: dist.all_gather_object(out, value))
    return out


def gather(value: T, what: str) -> list[T] | None:
    """Every rank's ``value`` in rank order on rank 0; None on the others."""
    if world_size() == 1:
        return [value]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    _collective(what, lambda: dist.gather_object(value, out, dst=0))
    return out


def all_reduce_sum(value: int | float, what: str) -> int | float:
    """The sum of ``value`` over the ranks (a float64 on the CPU: exact for counts)."""
    if world_size() == 1:
        return value
    return sum(all_gather(value, what))


def main_first_value(compute: Callable[[], T], what: str) -> T:
    """Rank 0 computes a (small) value, every rank gets it: decisions the ranks must agree on
    (is this stage done?) are taken once."""
    return broadcast(compute() if is_main() else None, what)


def sum_gradients(parameters: Sequence[torch.nn.Parameter], what: str) -> None:
    """Add up the gradients of ``parameters`` over the ranks, in one flat all-reduce (what
    DistributedDataParallel does after backward; here the forward runs through the featurizer,
    not through one wrapped module). A rank with no gradient for a parameter adds zeros, and
    every rank ends with the sum."""
    if world_size() == 1:
        return
    params = list(parameters)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    _collective(what, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
        offset += p.numel()
