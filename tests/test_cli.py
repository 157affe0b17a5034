"""detection.cli.run_tool: every way a tool can stop ends in one line, no traceback."""
from __future__ import annotations

import argparse
import errno

import pytest

from detection.cli import EXIT_ERROR, EXIT_INTERRUPTED, add_set_arg, run_tool
from detection.errors import CacheError


def _raiser(exc: BaseException):
    def main(args):
        raise exc
    return main


@pytest.mark.parametrize("exc, code, needle", [
    (CacheError("W/features_summary.json: truncated JSON (Expecting value: line 1, column 9)"), EXIT_ERROR,
     "error: W/features_summary.json: truncated JSON"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "W/" + "a" * 300), EXIT_ERROR,
     "(302 characters): File name too long"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "W/model.pt"), EXIT_ERROR, "error: W/model.pt: Is a directory"),
    (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted: finished work is kept"),
    (ValueError("something nobody foresaw\nsecond line"), EXIT_ERROR,
     "error: unexpected ValueError: something nobody foresaw second line"),
    (RecursionError("maximum recursion depth exceeded"), EXIT_ERROR, "error: unexpected RecursionError"),
])
def test_every_failure_is_one_line(capsys, monkeypatch, exc, code, needle):
    monkeypatch.delenv("DETECTION_TRACEBACK", raising=False)
    assert run_tool(_raiser(exc), argparse.ArgumentParser(), []) == code
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_unprintable_file_name_does_not_break_the_message(capfd):
    """A file name that is not UTF-8 (a surrogate escape) is printed escaped, not as a crash."""
    bad = "W/caf\udce9.jpg"
    assert run_tool(_raiser(CacheError(f"{bad}: truncated JSON")), argparse.ArgumentParser(), []) == EXIT_ERROR
    err = capfd.readouterr().err
    assert "error: W/caf\\udce9.jpg: truncated JSON" in err and "Traceback" not in err


def test_every_set_option_is_kept():
    """--set a=1 --set b=2 keeps both (argparse's nargs='*' alone keeps only the last)."""
    parser = argparse.ArgumentParser()
    add_set_arg(parser, "a=1")
    args = parser.parse_args(["--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]
    assert parser.parse_args([]).set == []
