"""Ids and paths that come from data (split files, XML, folder listings): validated, and shown
in messages so that an invisible or look-alike character is never hidden."""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import DatasetError

__all__ = ["MAX_NAME_BYTES", "check_name", "is_file", "show_id", "show_path"]

#: Longest image id or split name, in UTF-8 bytes: file names (``<id>.xml``, cache shards) must
#: stay under the usual 255-byte limit, else the OS raises "File name too long".
MAX_NAME_BYTES = 200


def show_id(value: str) -> str:
    """An id as a message shows it: as is when every character is visible, else its ``repr``
    (``'000001\\u200b'``), so an invisible or look-alike character is never hidden."""
    if value and value.isprintable() and value.strip() == value and value.isascii():
        return value
    return repr(value)


def check_name(value: str, what: str, source: Path) -> None:
    """Refuse ids/split names that could address files outside the dataset.

    Any character a file name may hold is accepted (``img..1``, ``caf\u00e9``, a zero-width
    space) except path separators and NUL; ``.`` and ``..`` alone are refused.
    """
    bad = (not value or "/" in value or "\\" in value or "\x00" in value or value in (".", "..")
           or os.path.isabs(value) or re.match(r"^[A-Za-z]:", value) is not None)
    if bad:
        raise DatasetError(f"{source}: invalid {what} {value!r} (ids must be plain file stems)")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise DatasetError(f"{source}: {what} {value[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")


def is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the OS refuses (too long, NUL) instead of raising."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def show_path(path: Path) -> str:
    """A path whose file name came from data, shown unambiguously (see :func:`show_id`)."""
    shown = show_id(path.name)
    return str(path) if shown == path.name else f"{path.parent}{os.sep}{shown}"
