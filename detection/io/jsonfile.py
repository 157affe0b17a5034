"""JSON artifacts: written strictly (no NaN) and atomically, read back as untrusted input with
size and depth limits, and the stable hash that names a cache after its settings."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import CacheError
from .files import atomic_write_text
from .paths import describe_missing, os_reason

__all__ = ["read_json", "parse_json", "write_json", "settings_key", "MAX_JSON_BYTES", "MAX_JSON_DEPTH"]

#: Largest JSON artifact or model metadata read, in bytes: the biggest written here (a metrics.json
#: with PR curves of 20 classes, a conv-map index of 10k images) is a few MB; a larger file is
#: damaged or hostile and is refused before it is parsed.
MAX_JSON_BYTES = 64 << 20

#: Deepest nesting accepted in JSON: ours nest 4 levels; Python's parser would hit its recursion
#: limit (a RecursionError, not a JSON error) at ~1,000 levels.
MAX_JSON_DEPTH = 32


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


def settings_key(settings: dict[str, Any], length: int = 16) -> str:
    """A short stable hash of a JSON-able settings dict: the name of a cache made with them."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:length]
