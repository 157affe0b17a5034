"""Artifacts written atomically and read back: every cache, model and JSON file goes through here.

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
import io
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import CacheError, StorageError

__all__ = ["atomic_path", "atomic_write_text", "atomic_save_npz", "atomic_torch_save", "make_dirs", "load_npz",
           "file_sha256", "process_alive", "content_checksum", "RunningChecksum", "verify_checksum", "checksum_sidecar",
           "write_checksum_sidecar", "read_verified_bytes", "load_verified_torch"]

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


def atomic_save_npz(dest: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``dest`` atomically. Arrays must not be object arrays (no pickles)."""
    for name, a in arrays.items():
        if np.asarray(a).dtype == object:
            raise TypeError(f"array {name!r} has dtype object; caches never hold pickles")
    with atomic_path(dest, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def atomic_torch_save(dest: str | os.PathLike, obj: Any, checksum: bool = False) -> None:
    """``torch.save(obj)`` to ``dest`` atomically, byte-reproducibly.

    Saved through a file object: given a path, torch names the zip archive inside after the
    file, so the random temporary name made two saves of the same object differ in bytes.
    ``checksum``: then also write ``<dest>.crc32`` (after ``dest``), which
    :func:`read_verified_bytes` checks; for caches and checkpoints read back by this package.
    """
    import torch

    if checksum:
        # The stale sidecar goes first: a crash between the two writes leaves a file without
        # a checksum (recomputed), never an old checksum beside new bytes that happen to match.
        checksum_sidecar(dest).unlink(missing_ok=True)
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
    if checksum:
        write_checksum_sidecar(dest, Path(dest).read_bytes())


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


def file_checksum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """:func:`content_checksum` of the bytes of the file ``path``, read a chunk at a time."""
    running = RunningChecksum()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            running.update(block)
    return running.value()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


#: Prefix of every content checksum this package writes: the algorithm, so a later change of
#: algorithm is read as a mismatch (recomputed), never as a match.
_CHECKSUM_PREFIX = "crc32:"


def content_checksum(data: Any) -> str:
    """``"crc32:<8 hex digits>"`` of the bytes of ``data`` (bytes or a C-contiguous array,
    memory-mapped ones included: read through the map, nothing copied).

    CRC-32 (zlib, ~4 GB/s) rather than a cryptographic hash: it guards against flipped bits,
    torn and truncated writes, not against an attacker (docs/reliability.md); any single flipped
    byte and any burst of up to 32 bits changes it.
    """
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        data = memoryview(data.reshape(-1).view(np.uint8)) if data.size else b""
    return f"{_CHECKSUM_PREFIX}{zlib.crc32(data) & 0xFFFFFFFF:08x}"


class RunningChecksum:
    """:func:`content_checksum` of bytes that come in pieces (a file written part by part):
    :meth:`update` with each piece in order, then :meth:`value`."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Any) -> None:
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)) if data.size else b""
        self._crc = zlib.crc32(data, self._crc)

    def value(self) -> str:
        return f"{_CHECKSUM_PREFIX}{self._crc & 0xFFFFFFFF:08x}"


def verify_checksum(path: str | os.PathLike, data: Any, expected: Any, what: str) -> None:
    """Raise CacheError naming ``path`` when ``data``'s checksum is not ``expected``."""
    actual = content_checksum(data)
    if actual != expected:
        raise CacheError(f"{path}: {what} is corrupt or torn (checksum {actual}, recorded {expected!r})")


def checksum_sidecar(path: str | os.PathLike) -> Path:
    """The file holding the checksum of ``path``'s bytes: ``<path>.crc32``."""
    path = Path(path)
    return path.with_name(path.name + ".crc32")


def write_checksum_sidecar(path: str | os.PathLike, data: bytes) -> None:
    """Write ``<path>.crc32`` (atomically) with the checksum of ``data``, the bytes of ``path``."""
    atomic_write_text(checksum_sidecar(path), content_checksum(data) + "\n")


def read_verified_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of ``path`` after checking them against ``<path>.crc32``.

    Raises:
        CacheError naming the file: the sidecar is missing (a write interrupted between the two
        files, or a file of an older version), or the bytes do not match it (a flipped byte, a
        truncated file, another node's half-written file seen through a shared file system).
    """
    path = Path(path)
    sidecar = checksum_sidecar(path)
    try:
        expected = sidecar.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CacheError(f"{path}: {what} has no checksum file {sidecar.name} (interrupted write or an "
                         "older version)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CacheError(f"{sidecar}: unreadable checksum file ({e})") from None
    data = path.read_bytes()
    verify_checksum(path, data, expected, what)
    return data


def load_verified_torch(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(weights_only=True)`` of a file saved by ``atomic_torch_save(checksum=True)``,
    its bytes checked first (:func:`read_verified_bytes`; CacheError naming the file)."""
    import torch

    return torch.load(io.BytesIO(read_verified_bytes(path, what)), map_location="cpu", weights_only=True)
