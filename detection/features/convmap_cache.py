"""The on-disk conv-map cache: the conv maps of every record of a split at every scale.

This is the SPP-net stage that replaces R-CNN's per-window conv passes: every image is resized
to each scale (shorter side ``s``), the conv trunk runs once on the whole image, and the conv
map is kept — on disk in a :class:`ConvMapCache` for training, in memory
(:func:`detection.features.conv_pass.conv_maps_for_image`) at test time. Features of a window are
then a spatial pyramid pooling of the window's projection onto the map of one scale
(:mod:`detection.features.featurizer`), so training never materialises an R-CNN-sized per-window cache (~200 GB for VOC07): the conv
maps are ~20x smaller and any window set (proposals, ground truth, jittered boxes) can be
pooled from them.

Cache layout (see docs/formats.md, "Conv-map cache")::

    <out>/convmaps_<key>/meta.json              settings, format version, creation time
    <out>/convmaps_<key>/maps/<record.key>/s<k>.npy   conv map of scale index k, [C, H, W]
    <out>/convmaps_<key>/maps/<record.key>/done.json  written last: factors, shapes, checksums
    <out>/convmaps_<key>/index.json              all done.json contents, written at the end

Every map's content checksum (CRC-32 of its array bytes) is in the record's done marker: a map
is verified the first time a cache object reads it, and at resume by :meth:`ConvMapCache.is_complete`,
so a flipped byte, a truncated file or another node's half-written file is named and recomputed,
never pooled into features.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..boxes import flip_boxes
from ..data.records import ImageRecord
from ..errors import CacheError
from ..io.files import atomic_path, content_checksum, make_dirs, verify_checksum
from ..io.jsonfile import read_json, settings_key, write_json
from ..io.paths import safe_file_part

__all__ = ["CONVMAP_FORMAT_VERSION", "FP16_MAX", "ConvMapCache", "cache_records", "convmap_settings"]

log = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout or the meaning of a stored value changes; part of the key.
CONVMAP_FORMAT_VERSION = 3  # 3: done.json holds every map's checksum
#: Largest finite float16 (65,504): a float16 cache refuses maps beyond it instead of storing inf.
FP16_MAX = float(np.finfo(np.float16).max)


def cache_records(dataset: Any, include_flipped: bool | None = None) -> list[ImageRecord]:
    """The records a conv-map cache of ``dataset`` holds, in order.

    Args:
        dataset: anything with ``.records`` (a VOCDataset).
        include_flipped: None — keep the dataset's records as they are (flipped ones included
            when it has them); True — originals plus a flipped record for each (the dataset's own
            flipped records when present, else made here); False — originals only.
    """
    records = list(dataset.records)
    if include_flipped is None:
        return records
    originals = [r for r in records if not r.flipped]
    if not include_flipped:
        return originals
    flipped = [r for r in records if r.flipped]
    if not flipped:
        flipped = [dataclasses.replace(r, flipped=True, boxes=flip_boxes(r.boxes, r.width))
                   for r in originals]
    return originals + flipped


def convmap_settings(dataset: Any, backbone: Any, scales: Sequence[int], max_size: int,
                     fp16: bool, records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Everything that changes the content of a conv-map cache (hashed into its folder name)."""
    keys = [r.key for r in records]
    return {
        "format_version": CONVMAP_FORMAT_VERSION,
        "dataset_fingerprint": str(dataset.fingerprint()),
        "split": str(dataset.split),
        # The exact record list (covers flipped/not and subsets of a split).
        "records_hash": settings_key({"keys": keys}),
        "num_records": len(keys),
        "flipped": any(r.flipped for r in records),
        "backbone": str(backbone.name),
        "weights_id": str(backbone.weights_id),
        "stride": int(backbone.stride),
        "first_cell_center": float(backbone.first_cell_center),
        "channels": int(backbone.out_channels),
        "scales": [int(s) for s in scales],
        "max_size": int(max_size),
        "dtype": "float16" if fp16 else "float32",
    }


class ConvMapCache:
    """Conv maps of every record of a split at every scale, on disk (see the module docstring).

    Open one with :meth:`create` (make or reuse the folder for given settings) or :meth:`open`
    (an existing folder); fill it with :func:`extract_conv_maps`. Maps are loaded memory-mapped.

    Attributes:
        root: the cache folder ``<out>/convmaps_<key>``.
        settings: the dict from :func:`convmap_settings`.
    """

    META = "meta.json"
    INDEX = "index.json"
    DONE = "done.json"

    def __init__(self, root: Path, settings: dict[str, Any]) -> None:
        self.root = Path(root)
        self.settings = dict(settings)
        self._index: dict[str, dict[str, Any]] = {}
        # (key, scale index) of the maps whose checksum this object has verified: each file is
        # read in full once per process, later reads stay memory-mapped and touch only what
        # pooling needs.
        self._verified: set[tuple[str, int]] = set()
        index_path = self.root / self.INDEX
        if index_path.is_file():
            try:
                self._index = dict(read_json(index_path)["records"])
            except (CacheError, ValueError, KeyError, TypeError) as e:
                log.warning("ignoring unreadable %s (%s); using per-record done markers", index_path, e)

    # ---- construction -----------------------------------------------------------------------

    @staticmethod
    def folder_for(out_dir: str | Path, settings: dict[str, Any]) -> Path:
        """``<out_dir>/convmaps_<settings_key(settings)>``."""
        return Path(out_dir) / f"convmaps_{settings_key(settings)}"

    @classmethod
    def create(cls, out_dir: str | Path, settings: dict[str, Any], rebuild: bool = False) -> "ConvMapCache":
        """Make (or reuse, when its meta.json matches) the cache folder for ``settings``.

        Raises:
            CacheError: the folder exists with other settings or another format version (unless
                ``rebuild``, which deletes and recreates it).
        """
        root = cls.folder_for(out_dir, settings)
        if rebuild and root.exists():
            log.info("rebuild: deleting %s", root)
            shutil.rmtree(root)
        meta_path = root / cls.META
        if meta_path.exists():
            cls._check_meta(meta_path, settings)
        else:
            # A run killed while writing meta.json leaves only its temporary file: not a reason
            # to refuse the folder (the next write_json makes a new one).
            if root.exists() and any(not _is_temp(p) for p in root.iterdir()):
                raise CacheError(f"{root} holds files but no {cls.META}: not a conv-map cache of this "
                                 "version (delete it or pass rebuild=True)")
            make_dirs(root)
            write_json(meta_path, {
                "format": "convmap-cache",
                "version": CONVMAP_FORMAT_VERSION,
                "key": settings_key(settings),
                "settings": settings,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            })
        return cls(root, settings)

    @classmethod
    def open(cls, root: str | Path) -> "ConvMapCache":
        """Open an existing cache folder, trusting its meta.json (validated for version and key)."""
        root = Path(root)
        meta_path = root / cls.META
        if not meta_path.is_file():
            raise CacheError(f"{root} is not a conv-map cache: {cls.META} is missing")
        meta = cls._read_meta(meta_path)
        settings = meta["settings"]
        if meta.get("version") != CONVMAP_FORMAT_VERSION or settings.get("format_version") != CONVMAP_FORMAT_VERSION:
            raise CacheError(f"{meta_path}: conv-map cache format version {meta.get('version')}, this code "
                             f"reads version {CONVMAP_FORMAT_VERSION} (re-extract the conv maps)")
        if root.name != f"convmaps_{settings_key(settings)}":
            raise CacheError(f"{meta_path}: settings do not hash to the folder name {root.name} "
                             "(the meta.json was edited?); re-extract with rebuild=True")
        return cls(root, settings)

    @classmethod
    def _read_meta(cls, meta_path: Path) -> dict[str, Any]:
        try:
            meta = read_json(meta_path)
        except CacheError as e:
            raise CacheError(f"{e} (conv-map cache metadata); delete the folder or pass rebuild=True") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("settings"), dict):
            raise CacheError(f"{meta_path}: not a conv-map cache meta.json (no 'settings')")
        return meta

    @classmethod
    def _check_meta(cls, meta_path: Path, settings: dict[str, Any]) -> None:
        meta = cls._read_meta(meta_path)
        if meta.get("version") != CONVMAP_FORMAT_VERSION:
            raise CacheError(f"{meta_path}: conv-map cache format version {meta.get('version')}, expected "
                             f"{CONVMAP_FORMAT_VERSION}; delete the folder or pass rebuild=True")
        stored = meta["settings"]
        diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if diff:
            detail = ", ".join(f"{k}: cache has {stored.get(k)!r}, requested {settings.get(k)!r}" for k in diff)
            raise CacheError(f"{meta_path}: cache was made with other settings ({detail}); "
                             "delete the folder or pass rebuild=True")

    # ---- properties ---------------------------------------------------------------------------

    @property
    def scales(self) -> list[int]:
        return list(self.settings["scales"])

    @property
    def stride(self) -> int:
        return int(self.settings["stride"])

    @property
    def first_cell_center(self) -> float:
        return float(self.settings["first_cell_center"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.settings["dtype"])

    def __repr__(self) -> str:
        s = self.settings
        return (f"ConvMapCache(root={str(self.root)!r}, backbone={s['backbone']!r}, scales={s['scales']}, "
                f"dtype={s['dtype']}, records={s['num_records']})")

    # ---- per-record files ---------------------------------------------------------------------

    def record_dir(self, key: str) -> Path:
        """``maps/<key>``, the key made a file name by :func:`detection.io.paths.safe_file_part`
        (plain keys such as every VOC id unchanged, others escaped)."""
        return self.root / "maps" / safe_file_part(key, "record key")

    def map_path(self, key: str, k: int) -> Path:
        """File of the map of scale index ``k`` of record ``key``."""
        return self.record_dir(key) / f"s{k}.npy"

    def record_info(self, record_or_key: ImageRecord | str) -> dict[str, Any]:
        """The done marker of a record: ``factors`` [S], ``map_shapes`` [S][3] (C, H, W),
        ``input_shapes`` [S][2] (H', W' of the resized image), ``image_size`` [2] (H, W),
        ``checksums`` [S] (:func:`detection.io.files.content_checksum` of each map's array).

        Raises:
            CacheError: the record is not (completely) in the cache.
        """
        key = _key(record_or_key)
        info = self._index.get(key)
        if info is None or not self._valid_info(info):
            info = self._read_done(key)
            if info is None:
                raise CacheError(f"{self.record_dir(key)}: record {key!r} is not in the conv-map cache "
                                 "(extraction incomplete? rerun extract_conv_maps to resume)")
            self._index[key] = info
        return info

    def _read_done(self, key: str) -> dict[str, Any] | None:
        path = self.record_dir(key) / self.DONE
        if not path.is_file():
            return None
        try:
            info = read_json(path)
        except CacheError:
            return None
        return info if self._valid_info(info) else None

    def _valid_info(self, info: Any) -> bool:
        """Whether a done marker (or its copy in index.json) has every field, well formed."""
        try:  # a damaged marker means "not done" (tests/test_fuzz.py: null or 5 leaked a TypeError)
            ok = (isinstance(info, dict) and len(info["factors"]) == len(info["map_shapes"]) == len(self.scales)
                  and all(float(f) > 0 for f in info["factors"])
                  and all(len(s) == 3 and all(type(d) is int for d in s) for s in info["map_shapes"])
                  and isinstance(info["checksums"], list) and len(info["checksums"]) == len(self.scales)
                  and all(isinstance(c, str) for c in info["checksums"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        return ok

    def is_complete(self, key: str, check_files: bool = True) -> bool:
        """Whether the record's done marker exists and (``check_files``) every map file has the
        recorded shape, the cache's dtype and the recorded checksum (a damaged one is named in a
        warning and the record counts as not done, so extraction recomputes it)."""
        info = self._read_done(key)
        if info is None:
            return False
        if not check_files:
            return True
        for k, shape in enumerate(info["map_shapes"]):
            try:
                self._load_map(key, k, tuple(shape), info["checksums"][k])
            except CacheError as e:
                log.warning("%s; recomputing record %s", e, key)
                return False
        return True

    def _load_map(self, key: str, k: int, shape: tuple[int, ...] | None, checksum: str | None) -> np.ndarray:
        """The memory-mapped map, its header checked against ``shape`` and the cache's dtype and,
        the first time this object reads it, its bytes against ``checksum``."""
        path = self.map_path(key, k)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise CacheError(f"{path}: conv map file is missing") from None
        # Exception: numpy parses a damaged header with Python's tokenizer, which raises
        # SyntaxError, tokenize.TokenError, ... (tests/test_fuzz.py); allow_pickle=False: no code ran.
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{path}: corrupt conv map file ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
        if arr.dtype != self.dtype or arr.ndim != 3 or (shape is not None and tuple(arr.shape) != shape):
            raise CacheError(f"{path}: conv map has dtype {arr.dtype} shape {tuple(arr.shape)}, expected "
                             f"{self.dtype} {shape}")
        if checksum is not None and (key, k) not in self._verified:
            verify_checksum(path, arr, checksum, "conv map")
            self._verified.add((key, k))
        return arr

    def maps(self, record_or_key: ImageRecord | str) -> list[np.ndarray]:
        """Memory-mapped conv maps of a record, one read-only array [C, H_k, W_k] per scale.

        Raises:
            CacheError naming the file: a map is missing, truncated or does not match its
            checksum (rerunning the extraction recomputes it).
        """
        key = _key(record_or_key)
        info = self.record_info(key)
        return [self._load_map(key, k, tuple(s), info["checksums"][k]) for k, s in enumerate(info["map_shapes"])]

    def factors(self, record_or_key: ImageRecord | str) -> list[float]:
        """Resize factor of every scale for a record."""
        return [float(f) for f in self.record_info(record_or_key)["factors"]]

    def write_record(self, key: str, maps: Sequence[np.ndarray], info: dict[str, Any], name: str | None = None) -> None:
        """Store the maps of one record (atomically, file by file), then its done marker.

        Raises:
            CacheError (naming ``name``, default the key) before anything is written when a map
            holds NaN/inf, or, in a float16 cache, a value beyond float16's range (+-65,504), which
            the cast would turn into inf and surface much later as NaN scores.
        """
        for k, m in enumerate(maps):
            peak = float(np.abs(m).max()) if np.size(m) else 0.0
            if not np.isfinite(peak):
                raise CacheError(f"{name or 'record ' + key}: the conv map at scale {k} holds NaN or inf values "
                                 "(check the weights file and the image)")
            if self.dtype == np.float16 and peak > FP16_MAX:
                raise CacheError(f"{name or 'record ' + key}: the conv map at scale {k} reaches {peak:.6g}, beyond "
                                 f"float16's {FP16_MAX:.0f}: store float32 maps (no --fp16 / features.fp16=false)")
        rdir = self.record_dir(key)
        if rdir.exists():
            # Leftovers of an interrupted write: stray temp files and a stale marker.
            for stray in rdir.glob(".*.tmp"):
                stray.unlink(missing_ok=True)
            (rdir / self.DONE).unlink(missing_ok=True)
        self._index.pop(key, None)
        checksums = []
        for k, m in enumerate(maps):
            arr = np.ascontiguousarray(m, dtype=self.dtype)
            checksums.append(content_checksum(arr))
            with atomic_path(self.map_path(key, k), suffix=".npy") as tmp:
                with open(tmp, "wb") as f:  # a file object: np.save(path) would append ".npy"
                    np.save(f, arr, allow_pickle=False)
            self._verified.add((key, k))
        write_json(rdir / self.DONE, {**info, "checksums": checksums})

    def write_index(self, keys: Iterable[str]) -> None:
        """Write ``index.json``: every record's done marker in one file (read at open)."""
        records = {k: self.record_info(k) for k in keys}
        write_json(self.root / self.INDEX, {"version": CONVMAP_FORMAT_VERSION, "records": records})
        self._index = dict(records)

    def nbytes(self) -> int:
        """Bytes of every file under the cache folder."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def lazy_maps(self, record_or_key: ImageRecord | str) -> Sequence[np.ndarray]:
        """The maps of a record, each loaded (memory-mapped) on first access: pooling reads only
        the scales some window uses."""
        key = _key(record_or_key)
        info = self.record_info(key)
        return _LazyMaps(self, key, [tuple(s) for s in info["map_shapes"]], list(info["checksums"]))


class _LazyMaps(Sequence):
    """The maps of one cached record, each loaded (memory-mapped) on first access."""

    def __init__(self, cache: ConvMapCache, key: str, shapes: list[tuple[int, ...]], checksums: list[str]) -> None:
        self.cache, self.key, self.shapes, self.checksums = cache, key, shapes, checksums
        self._loaded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= k < len(self.shapes):
            raise IndexError(k)
        if k not in self._loaded:
            self._loaded[k] = self.cache._load_map(self.key, k, self.shapes[k], self.checksums[k])
        return self._loaded[k]


def _is_temp(path: Path) -> bool:
    """A temporary file of ``detection.io.files.atomic_path`` (``.<name>.<pid>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _key(record_or_key: ImageRecord | str) -> str:
    return record_or_key if isinstance(record_or_key, str) else record_or_key.key
