"""What every tool shares: logging set-up and turning a DetectionError into a one-line message."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .errors import DetectionError
from .runtime import set_threads

__all__ = ["run_tool", "add_common_args"]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: one per core)")


def run_tool(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse arguments, configure logging, run ``main``; bad input exits 2 with ``error: ...``."""
    add_common_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        set_threads(args.threads)
        return int(main(args) or 0)
    except DetectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, read-only folder, ...: say which file, keep what is done
        print(f"error: {e.strerror or e} ({e.filename or 'no file name'}); finished artifacts are intact",
              file=sys.stderr)
        return 2
