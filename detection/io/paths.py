"""Paths and file names that come from data: a safe file name for any name (:func:`safe_file_part`),
a check that a path stays in its folder, and messages that say truthfully why a path cannot be read."""
from __future__ import annotations

import hashlib
import os
import re
import stat
import unicodedata
from pathlib import Path

from ..errors import DetectionError, StorageError

__all__ = ["safe_file_part", "check_class_name", "path_in_folder", "describe_missing", "os_reason",
           "MAX_FILE_PART_BYTES"]

#: Longest file-name part made from a name read from data (a class name, an image id), in UTF-8
#: bytes after escaping: leaves room for prefixes/suffixes under the usual 255-byte limit.
MAX_FILE_PART_BYTES = 200


def os_reason(e: OSError) -> str:
    """An OSError in a few words, without its file name (callers name the file)."""
    return f"cannot be read ({e.strerror or type(e).__name__})" if e.strerror else f"{type(e).__name__}: {e}"


def describe_missing(path: str | os.PathLike) -> str:
    """Why ``path`` cannot be opened as a regular file, in words that are true: "does not exist"
    only when nothing is there; otherwise "is a folder", "is a broken symbolic link", "is a FIFO
    ...", "has a parent that is a regular file", "name too long", "permission denied"."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)!r})"
        return "does not exist"
    except NotADirectoryError:
        return "does not exist (a parent folder is a regular file)"
    except OSError as e:
        return f"cannot be opened ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    if stat.S_ISREG(st.st_mode):
        return "exists but cannot be read"
    kind = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(st.st_mode), "not a regular file")
    return f"is {kind}, not a regular file"


# Characters that never go into a file name as they are: path separators, the escape character
# itself, "~" (it marks a hashed name, below), characters a file system or a terminal treats
# specially (NUL, controls, Windows' reserved set) and lone surrogates (a file name that was not
# UTF-8). Everything else (letters of any script, spaces, dots) is kept.
_UNSAFE_CHARS = re.compile(r'[%~/\\\x00-\x1f\x7f<>:"|?*\ud800-\udfff]')
# One unit of an escaped name: a %XX escape or one character (a long name is cut between units).
_ESCAPED_UNIT = re.compile(r"%[0-9A-F]{2}|.", re.S)
# Hex digits of the SHA-256 that end a name too long to escape in full.
_NAME_HASH_HEX = 32


def _escape(name: str) -> str:
    part = _UNSAFE_CHARS.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")),
                             name)
    return part.replace(".", "%2E") if part in (".", "..") else part


def safe_file_part(name: str, what: str = "name") -> str:
    """The one file-name part for a name read from data (class name, image id, cache record key):
    it cannot leave its folder and no two names share it.

    Names made of safe characters are returned unchanged (``comp4_det_test_dog.txt`` stays the
    devkit's name, ``000001_flip`` names its conv-map folder); others are escaped like a URL
    (``%2F`` for ``/``), which is one-to-one. ``.`` and ``..`` alone are escaped too. A name longer
    than :data:`MAX_FILE_PART_BYTES` once escaped keeps the start of its escaped form followed by
    ``~`` and the first 32 hex digits of its SHA-256 (``~`` is escaped in every other name, so
    the two forms never meet). The result never contains a path separator, so
    ``folder / f"{prefix}{part}{suffix}"`` stays in ``folder``.

    Raises:
        DetectionError: an empty name or one that is not text.
    """
    if not isinstance(name, str) or not name:
        raise DetectionError(f"{what} {name!r} cannot name a file: it is empty or not text")
    part = _escape(name)
    if len(part.encode("utf-8")) <= MAX_FILE_PART_BYTES:
        return part
    room, head = MAX_FILE_PART_BYTES - 1 - _NAME_HASH_HEX, []
    for unit in _ESCAPED_UNIT.findall(part):
        room -= len(unit.encode("utf-8"))
        if room < 0:
            break
        head.append(unit)
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_NAME_HASH_HEX]
    return "".join(head) + "~" + digest


def check_class_name(name: str) -> None:
    """Refuse a class name read from data (an XML file, a model file) that cannot be used: it
    becomes a result-file name the devkit and a reader recognise (:func:`safe_file_part` in full,
    never hashed) and is printed, so a control character (a newline would forge output lines)
    or an over-long name is a DetectionError showing its repr."""
    if not isinstance(name, str) or not name:
        raise DetectionError(f"class name {name!r} cannot name a file: it is empty or not text")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise DetectionError(f"class name {name[:60]!r} holds a control character")
    if any("\ud800" <= ch <= "\udfff" for ch in name):
        raise DetectionError(f"class name {name[:60]!r} cannot name a file: it is not valid Unicode")
    size = len(_escape(name).encode("utf-8"))
    if size > MAX_FILE_PART_BYTES:
        raise DetectionError(f"class name {name[:40]!r}... cannot name a file: {size} bytes once escaped, above "
                             f"the limit of {MAX_FILE_PART_BYTES}")


def path_in_folder(folder: str | os.PathLike, file_name: str) -> Path:
    """``folder / file_name``, checked to be a direct child of ``folder`` (a last line of defence
    behind :func:`safe_file_part`: raises StorageError otherwise)."""
    folder = Path(folder)
    path = folder / file_name
    if (os.sep in file_name or (os.altsep and os.altsep in file_name) or file_name in ("", ".", "..")
            or path.parent != folder):
        raise StorageError(f"{folder}: refusing to write {file_name!r}, which would leave the folder")
    return path
