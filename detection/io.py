"""Small file helpers shared by every cache: atomic writes, stable hashes, JSON.

Every artifact is written to a temporary file in the destination folder and renamed into place
(``os.replace`` is atomic on POSIX), so a reader never sees a half-written file, and an
interrupted run leaves at worst a stray ``.*.tmp`` file that no reader ever opens.

A write that fails for a reason of the environment (disk full, file size limit, a read-only
folder, an output path under a regular file) raises :class:`~detection.errors.StorageError`
naming the file, so tools print one ``error: ...`` line instead of a traceback; the temporary
file is removed and every file written before is left as it was.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import CacheError, DetectionError, StorageError

__all__ = ["atomic_path", "atomic_write_text", "atomic_save_npz", "atomic_torch_save", "make_dirs", "load_npz",
           "read_json", "parse_json", "write_json", "file_sha256", "settings_key", "safe_file_part",
           "check_class_name", "path_in_folder", "process_alive", "describe_missing", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_FILE_PART_BYTES"]

#: Largest JSON artifact or model metadata read, in bytes: the biggest written here (a metrics.json
#: with PR curves of 20 classes, a conv-map index of 10k images) is a few MB; a larger file is
#: damaged or hostile and is refused before it is parsed.
MAX_JSON_BYTES = 64 << 20

#: Deepest nesting accepted in JSON: ours nest 4 levels; Python's parser would hit its recursion
#: limit (a RecursionError, not a JSON error) at ~1,000 levels.
MAX_JSON_DEPTH = 32

#: Longest file-name part made from a name read from data (a class name, an image id), in UTF-8
#: bytes after escaping: leaves room for prefixes/suffixes under the usual 255-byte limit.
MAX_FILE_PART_BYTES = 200

# The process umask, read once (os.umask can only be read by setting it). mkstemp creates files
# with mode 0600; artifacts get the mode a plain open() would have given them (0644 usually).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _storage_error(path: Path, e: OSError) -> StorageError:
    if isinstance(e, FileExistsError):      # mkdir of a path that is a regular file
        reason = "a file is in the way of a folder"
    elif isinstance(e, NotADirectoryError):  # a parent of the path is a regular file
        reason = "a parent folder is a regular file"
    elif e.errno is None:  # numpy's short write ("27648 requested and 16352 written") hides ENOSPC/EFBIG
        reason = f"{e}: disk full?"
    else:
        reason = e.strerror or str(e)
    return StorageError(f"{path}: cannot write ({reason}); files written before are intact, rerun to resume")


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a failure (a regular file in the way, a read-only file system, ...)
    raises StorageError naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _storage_error(path, e) from None
    return path


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success fsync it and rename it onto ``dest``.

    On an exception the temporary file is removed and ``dest`` is left untouched; an OSError
    (disk full, read-only folder, ...) becomes a StorageError naming ``dest``.
    """
    dest = Path(dest)
    make_dirs(dest.parent)
    _remove_stale_temps(dest)
    try:
        # The pid in the name tells a later writer of ``dest`` whether this file is abandoned.
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=suffix + ".tmp", dir=dest.parent)
    except OSError as e:
        raise _storage_error(dest, e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, dest)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError) and not isinstance(e, StorageError):
            raise _storage_error(dest, e) from None
        raise


def _remove_stale_temps(dest: Path) -> None:
    """Delete the temporary files of ``dest`` whose writer process is gone.

    A run killed mid-write (SIGKILL, power loss) leaves its ``.<name>.<pid>.<random>.tmp``; without
    this every interrupted save of a large model or checkpoint would leak its size on disk.
    Temporary files of live processes (a concurrent writer) are left alone.
    """
    prefix = f".{dest.name}."
    try:
        names = [e.name for e in os.scandir(dest.parent) if e.name.startswith(prefix) and e.name.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(dest.parent / name)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (a zombie counts as gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    try:  # a killed process nobody has reaped yet (a zombie) is gone too (Linux)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def atomic_write_text(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _finite_or_null(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON has no NaN, and other readers reject it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (NaN / inf written as null), atomically."""
    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(dest, text + "\n")


def _json_depth_ok(obj: Any, max_depth: int) -> bool:
    """True when ``obj`` nests at most ``max_depth`` containers deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > max_depth:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def parse_json(text: str | bytes, source: str, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON (an artifact of an earlier stage, a model file's metadata) with limits.

    Args:
        text: the JSON text (bytes must be UTF-8).
        source: what the text is, for messages (a path, "model file X's metadata").
        max_bytes, max_depth: refuse larger or deeper documents.
    Raises:
        CacheError: ``"<source>: <problem>"`` for text that is too big, too deep, not UTF-8, not
            JSON (a truncated file) or holds NaN / infinity (strict JSON has none).
    """
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > max_bytes:
        raise CacheError(f"{source}: {size} bytes of JSON, above the limit of {max_bytes}")
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise CacheError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        # The parser stopped at the end of the text (or in a string it never saw closed): the file
        # was cut short, e.g. copied while an earlier stage wrote it, or a disk filled up.
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        what = "truncated" if cut else "not valid"
        raise CacheError(f"{source}: {what} JSON ({e.msg}: line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise CacheError(f"{source}: not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not _json_depth_ok(obj, max_depth):
        raise CacheError(f"{source}: JSON nested deeper than {max_depth} levels")
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read a JSON artifact (see :func:`parse_json`).

    Raises:
        CacheError: naming the file: missing, not a regular file, unreadable, too big, too deep,
            truncated or otherwise not JSON.
    """
    path = Path(path)
    # Checked before opening: opening a FIFO would wait forever for a writer.
    if not path.is_file():
        raise CacheError(f"{path}: {describe_missing(path)}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise CacheError(f"{path}: {os_reason(e)}") from None
    return parse_json(data, str(path), max_bytes, max_depth)


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
# itself, and characters a file system or a terminal treats specially (NUL, controls, Windows'
# reserved set). Everything else (letters of any script, spaces, dots) is kept.
_UNSAFE_CHARS = re.compile(r'[%/\\\x00-\x1f\x7f<>:"|?*]')


def safe_file_part(name: str, what: str = "name") -> str:
    """A file-name part for a name read from data (class name, image id) that cannot leave its folder.

    Names made of safe characters are returned unchanged (``comp4_det_test_dog.txt`` stays the
    devkit's name); others are escaped like a URL (``%2F`` for ``/``), which is one-to-one, so two
    names never share a file. ``.`` and ``..`` alone are escaped too. The result never contains a
    path separator, so ``folder / f"{prefix}{part}{suffix}"`` stays in ``folder``.

    Raises:
        DetectionError: an empty name, one that is not valid Unicode, or one longer than
            :data:`MAX_FILE_PART_BYTES` once escaped.
    """
    if not isinstance(name, str) or not name:
        raise DetectionError(f"{what} {name!r} cannot name a file: it is empty or not text")
    part = _UNSAFE_CHARS.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), name)
    if part in (".", ".."):
        part = part.replace(".", "%2E")
    try:
        size = len(part.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate (a file name that was not UTF-8)
        raise DetectionError(f"{what} {name!r} cannot name a file: it is not valid Unicode") from None
    if size > MAX_FILE_PART_BYTES:
        raise DetectionError(f"{what} {name[:40]!r}... cannot name a file: {size} bytes once escaped, above "
                             f"the limit of {MAX_FILE_PART_BYTES}")
    return part


def check_class_name(name: str) -> None:
    """Refuse a class name read from data (an XML file, a model file) that cannot be used: it
    becomes a file name (:func:`safe_file_part`) and is printed, so a control character (a
    newline would forge output lines) or an over-long name is a DetectionError showing its repr."""
    if isinstance(name, str) and any(unicodedata.category(ch) == "Cc" for ch in name):
        raise DetectionError(f"class name {name[:60]!r} holds a control character")
    safe_file_part(name, "class name")


def path_in_folder(folder: str | os.PathLike, file_name: str) -> Path:
    """``folder / file_name``, checked to be a direct child of ``folder`` (a last line of defence
    behind :func:`safe_file_part`: raises StorageError otherwise)."""
    folder = Path(folder)
    path = folder / file_name
    if (os.sep in file_name or (os.altsep and os.altsep in file_name) or file_name in ("", ".", "..")
            or path.parent != folder):
        raise StorageError(f"{folder}: refusing to write {file_name!r}, which would leave the folder")
    return path


def atomic_save_npz(dest: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``dest`` atomically. Arrays must not be object arrays (no pickles)."""
    for name, a in arrays.items():
        if np.asarray(a).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; caches never hold pickles")
    with atomic_path(dest, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def atomic_torch_save(dest: str | os.PathLike, obj: Any) -> None:
    """``torch.save(obj)`` to ``dest`` atomically, byte-reproducibly.

    Saved through a file object: given a path, torch names the zip archive inside after the
    file, so the random temporary name made two saves of the same object differ in bytes.
    """
    import torch

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            writer = _WriteErrorKeeper(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                # torch's C++ writer turns a failed write into a RuntimeError ("unexpected
                # pos ..."): give the OSError (disk full, ...) back so it is reported as one.
                if writer.error is not None:
                    raise writer.error from None
                raise


class _WriteErrorKeeper:
    """A binary file wrapper that remembers the OSError of a failed write."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file into memory, refusing pickled objects."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def settings_key(settings: dict[str, Any], length: int = 16) -> str:
    """A short stable hash of a JSON-able settings dict: the name of a cache made with them."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]
