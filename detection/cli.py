"""What every tool shares: logging set-up and one error path.

Whatever stops a tool -- a :class:`DetectionError` from the library (bad input, a damaged
artifact), an OSError from the operating system, Ctrl-C, or an unexpected exception -- ends the
same way: one ``error: ...`` line on stderr naming the file and the problem, no traceback, exit
status 2 (130 after Ctrl-C). Artifacts are written atomically, so nothing is left half-written
and the same command resumes. ``DETECTION_TRACEBACK=1`` shows the traceback of unexpected errors.
Under ``torchrun`` the lines of each rank say which it is, and rank 0 alone prints results.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable

from . import comm
from .errors import DetectionError
from .runtime import set_threads
from .workers import LOG_DATE_FORMAT, LOG_FORMAT

__all__ = ["run_tool", "add_common_args", "add_skip_bad_arg", "add_set_arg", "add_draw_args", "os_error_message", "EXIT_ERROR", "EXIT_INTERRUPTED"]

#: Exit status of a tool stopped by bad input or a failing environment (argparse's, too).
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT, what shells report for a process killed by it).
EXIT_INTERRUPTED = 130


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors; no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: one per core)")


def add_skip_bad_arg(parser: argparse.ArgumentParser) -> None:
    """``--skip-bad``: the one switch, decided for the whole run, for undecodable images."""
    parser.add_argument("--skip-bad", action="store_true",
                        help="decode every image first and leave out those that cannot be decoded (a warning "
                             "each, a summary at the end); default: such an image stops the run, naming it")


def add_set_arg(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set KEY=VALUE ...``: config overrides; every ``--set`` adds to the list (``extend``), so
    ``--set a=1 --set b=2`` keeps both instead of the last replacing the first."""
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"config overrides, e.g. {example}")


def add_draw_args(parser: argparse.ArgumentParser) -> None:
    """``--threshold`` / ``--score-threshold``: which detections a tool draws, and ``--device``."""
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="draw detections with a calibrated probability at or above this (default 0.5)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="draw by raw SVM score instead (the default for a model without calibration: 0)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")


def os_error_message(e: OSError) -> str:
    """An OSError as one line naming its file(s): ``<file>: <reason>``."""
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    reason = e.strerror or str(e) or type(e).__name__
    if names and len(names[0]) > 160:   # a 300-character path: its two ends say which it is
        names[0] = f"{names[0][:60]}...{names[0][-60:]} ({len(names[0])} characters)"
    return f"{' -> '.join(names)}: {reason}" if names else f"{type(e).__name__}: {reason}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_tool(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
             argv: list[str] | None = None) -> int:
    """Parse arguments, configure logging, run ``main``; every failure is one ``error: ...`` line.

    Returns:
        ``main``'s status (0 when None); 2 for any error, 130 after Ctrl-C.
    """
    for stream in (sys.stdout, sys.stderr):
        # A file name that is not valid UTF-8 must not make printing its error message fail.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    rank = _launcher_rank()
    try:
        add_common_args(parser)
        args = parser.parse_args(argv)
        if rank is not None and rank > 0:
            # Under torchrun rank 0 speaks for the run: the other ranks log warnings and errors
            # only, show no progress bars and print no results.
            args.quiet = True
            sys.stdout = open(os.devnull, "w")
        log_format = LOG_FORMAT if rank is None else LOG_FORMAT.replace("%(levelname)s", f"[rank {rank}] %(levelname)s")
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format=log_format,
                            datefmt=LOG_DATE_FORMAT)
        set_threads(args.threads)
        status = int(main(args) or 0)
        comm.shutdown()
        return status
    except DetectionError as e:
        return _fail(_one_line(e))
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # disk full, a path too long, a folder where a file should be, ...
        return _fail(f"{_one_line(os_error_message(e))}; finished artifacts are intact")
    except Exception as e:  # noqa: BLE001 -- a bug or an input nobody foresaw: still one line
        if os.environ.get("DETECTION_TRACEBACK"):
            traceback.print_exc()
        return _fail(f"unexpected {type(e).__name__}: {_one_line(e)[:500]} (please report it; "
                     "DETECTION_TRACEBACK=1 shows where)")


def _launcher_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started several, else None."""
    if not comm.launched():
        return None
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return None


def _fail(message: str) -> int:
    rank = _launcher_rank()
    if rank is not None and not message.startswith("rank "):
        message = f"rank {rank}: {message}"        # several processes share the terminal
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR
