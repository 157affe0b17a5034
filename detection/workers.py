"""What every worker process (selective-search pool, DataLoader workers) does first, so that it
behaves like the tool that started it: the tools' log format, and Ctrl-C left to the parent."""
from __future__ import annotations

import logging
import signal

__all__ = ["LOG_FORMAT", "LOG_DATE_FORMAT", "init_worker_process"]

#: The one log line format of the tools and their workers.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def init_worker_process() -> None:
    """Worker-process initializer.

    - Ignore SIGINT: Ctrl-C sends it to the whole process group; a worker that took it would die
      printing its own traceback. The parent alone handles it (it stops the pool; finished work
      is kept).
    - Log warnings (a truncated image, ...) in the tools' format; a spawned worker starts with no
      logging set up, and Python's last-resort handler prints the bare message.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT)
