"""Conv feature maps, computed once per image per scale, and pooled features of any windows.

This is the SPP-net stage that replaces R-CNN's per-window conv passes: every image is resized
to each scale (shorter side ``s``), the conv trunk runs once on the whole image, and the conv
map is kept — on disk in a :class:`ConvMapCache` for training, in memory
(:func:`conv_maps_for_image`) at test time. Features of a window are then a spatial pyramid
pooling of the window's projection onto the map of one scale (:func:`pooled_window_features`),
so training never materialises an R-CNN-sized per-window cache (~200 GB for VOC07): the conv
maps are ~20x smaller and any window set (proposals, ground truth, jittered boxes) can be
pooled from them.

Cache layout (see docs/formats.md, "Conv-map cache")::

    <out>/convmaps_<key>/meta.json              settings, format version, creation time
    <out>/convmaps_<key>/maps/<record.key>/s<k>.npy   conv map of scale index k, [C, H, W]
    <out>/convmaps_<key>/maps/<record.key>/done.json  written last: factors and shapes
    <out>/convmaps_<key>/index.json              all done.json contents, written at the end
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .boxes import flip_boxes
from .data.records import ImageRecord
from .data.images import load_image
from .errors import CacheError, DetectionError
from .io import atomic_path, make_dirs, read_json, settings_key, write_json
from .spp import (DEFAULT_LEVELS, DEFAULT_MAX_SIZE, DEFAULT_SCALES_1, choose_scale, pool_windows, project_boxes,
                  scale_factors)
from .workers import init_worker_process

__all__ = [
    "CONVMAP_FORMAT_VERSION",
    "DEFAULT_LEVELS",
    "ConvMapCache",
    "ImageConvMaps",
    "cache_records",
    "conv_maps_for_image",
    "convmap_settings",
    "extract_conv_maps",
    "pooled_window_features",
    "select_scales",
]

log = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout or the meaning of a stored value changes; part of the key.
CONVMAP_FORMAT_VERSION = 1
#: Largest finite float16 (65,504): a float16 cache refuses maps beyond it instead of storing inf.
FP16_MAX = float(np.finfo(np.float16).max)


# Record keys become folder names when they are plain, portable names (all VOC ids are);
# other keys are hashed.
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,100}$")


# --------------------------------------------------------------------------------------------
# Pooling windows from a set of per-scale maps (shared by the cache and the in-memory path)
# --------------------------------------------------------------------------------------------

def select_scales(boxes: torch.Tensor, factors: Sequence[float], scale_rule: str | int = "area",
                  generator: torch.Generator | None = None, target: int | None = None) -> torch.Tensor:
    """Scale index for every window.

    Args:
        boxes: Tensor[N, 4] internal boxes in original-image pixels.
        factors: resize factor of each scale (scaled size = factor * original size).
        scale_rule: "area" — the scale at which the window's area is closest to ``target``²
            (the paper's best scale, used at test time; ``spp.choose_scale``); "code" — the SPP
            code's rule (scaled window side closest to ``target``, default 208); "random" — a
            uniformly random scale per window (the SPP code's multi-scale fine-tuning); an
            int — that scale index for every window.
        generator: torch.Generator for "random" (pass one: results are then reproducible).
        target: window side the "area"/"code" rules aim at (default: ``spp.choose_scale``'s,
            224 for "area", 208 for "code").
    Returns:
        LongTensor[N] of indices into ``factors``.
    """

    n, num_scales = len(boxes), len(factors)
    if num_scales == 0:
        raise ValueError("no scales")
    if isinstance(scale_rule, (int, np.integer)) and not isinstance(scale_rule, bool):
        if not 0 <= int(scale_rule) < num_scales:
            raise ValueError(f"scale index {scale_rule} out of range for {num_scales} scales")
        return torch.full((n,), int(scale_rule), dtype=torch.long)
    if scale_rule in ("area", "code"):
        if num_scales == 1:
            return torch.zeros(n, dtype=torch.long)
        return torch.as_tensor(choose_scale(boxes, list(factors), target=target, rule=scale_rule),
                               dtype=torch.long).reshape(n)
    if scale_rule == "random":
        return torch.randint(num_scales, (n,), generator=generator, dtype=torch.long)
    raise ValueError(f"unknown scale_rule {scale_rule!r}: use 'area', 'code', 'random' or a scale index")


def pooled_window_features(maps: Sequence[torch.Tensor | np.ndarray], factors: Sequence[float],
                           boxes: torch.Tensor | np.ndarray, stride: int,
                           levels: Sequence[int] = DEFAULT_LEVELS, rule: str = "paper",
                           scale_rule: str | int = "area", generator: torch.Generator | None = None,
                           device: torch.device | str | None = None,
                           scale_index: torch.Tensor | None = None,
                           first_cell_center: float = 0.5, scale_target: int | None = None) -> torch.Tensor:
    """SPP features of windows given the conv maps of one image at several scales.

    Each window is pooled from the map of one scale (see :func:`select_scales`): its box is
    multiplied by that scale's factor, projected onto the map (``spp.project_boxes`` with
    ``rule``) and pooled into ``sum(n*n for n in levels)`` bins per channel. Windows are grouped
    by scale (one ``spp.pool_windows`` call per scale) and returned in the input order.

    Args:
        maps: per scale, the conv map [C, H_k, W_k] (Tensor, or numpy array / memmap of any float
            dtype; fp16 maps are pooled in fp32, max pooling of fp16 values is exact).
        factors: per scale, the resize factor used to compute the map.
        boxes: [N, 4] internal (x1, y1, x2, y2) boxes in original-image pixels.
        stride: total stride of the trunk (16 for ZF-5).
        levels: pyramid levels.
        rule: window projection rule ("paper" or "code").
        scale_rule, generator, scale_target: see :func:`select_scales` (its ``target``).
        device: where to pool (default: the device of a tensor map, else CPU).
        scale_index: precomputed scale index per window (overrides ``scale_rule``).
        first_cell_center: image coordinate of conv cell 0's centre,
            ``Backbone.first_cell_center`` (0.5 for ZF-5; see ``spp.project_boxes``).
    Returns:
        float32 Tensor[N, C * sum(n^2)] (C * 50 for the default levels).
    """

    if len(maps) != len(factors) or len(maps) == 0:
        raise ValueError(f"{len(maps)} maps but {len(factors)} scale factors")
    boxes_t = _boxes_tensor(boxes)
    if scale_index is None:
        scale_index = select_scales(boxes_t, factors, scale_rule, generator, scale_target)
    scale_index = torch.as_tensor(scale_index, dtype=torch.long).reshape(-1)
    if len(scale_index) != len(boxes_t):
        raise ValueError(f"{len(scale_index)} scale indices for {len(boxes_t)} boxes")
    used = torch.unique(scale_index).tolist()
    first = maps[used[0] if used else 0]
    if device is None:
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    bins = sum(int(n) * int(n) for n in levels)
    out = torch.zeros((len(boxes_t), int(first.shape[0]) * bins), dtype=torch.float32, device=device)
    for k in used:
        sel = torch.nonzero(scale_index == k).flatten()
        fmap = _as_float_tensor(maps[k], device)
        scaled = boxes_t[sel] * float(factors[k])
        cells = project_boxes(scaled, stride, (int(fmap.shape[1]), int(fmap.shape[2])), rule=rule,
                              first_cell_center=first_cell_center)
        out[sel.to(device)] = pool_windows(fmap, cells.to(device), levels=tuple(levels)).to(torch.float32)
    return out


def _as_float_tensor(fmap: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    if isinstance(fmap, torch.Tensor):
        t = fmap
    else:
        # np.array copies out of a (read-only) memmap; torch.from_numpy needs a writable array.
        t = torch.from_numpy(np.array(fmap))
    return t.to(device=device, dtype=torch.float32)


@dataclasses.dataclass
class ImageConvMaps:
    """The conv maps of one image at every scale, in memory.

    Attributes:
        maps: per scale, Tensor[C, H_k, W_k] (float32).
        factors: per scale, the resize factor (scaled = factor * original pixels).
        stride: total stride of the trunk that made the maps.
        image_size: (height, width) of the original image.
        first_cell_center: image coordinate of conv cell 0's centre (``spp.project_boxes``).
    """

    maps: list[torch.Tensor]
    factors: list[float]
    stride: int
    image_size: tuple[int, int]
    first_cell_center: float = 0.5

    def window_features(self, boxes: torch.Tensor | np.ndarray, levels: Sequence[int] = DEFAULT_LEVELS,
                        rule: str = "paper", scale_rule: str | int = "area",
                        generator: torch.Generator | None = None, scale_target: int | None = None) -> torch.Tensor:
        """Pooled features [N, C * sum(n^2)] of internal boxes [N, 4] in original pixels
        (arguments as :func:`pooled_window_features`)."""
        return pooled_window_features(self.maps, self.factors, boxes, self.stride, levels, rule,
                                      scale_rule, generator, first_cell_center=self.first_cell_center,
                                      scale_target=scale_target)


# --------------------------------------------------------------------------------------------
# One conv pass per image per scale
# --------------------------------------------------------------------------------------------

def _image_name(record: ImageRecord | None, image: np.ndarray | None = None) -> str:
    if record is not None:
        return f"image {record.key} ({record.path})"
    return f"image of size {image.shape[1]}x{image.shape[0]}" if image is not None else "image"


def _forward_scales(backbone: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device,
                    name: str) -> list[torch.Tensor]:
    """Run the trunk on each preprocessed input [1, 3, H', W'] -> list of maps [C, H, W] (float32).

    Raises DetectionError naming the image when the input is too small for the trunk.
    """
    maps = []
    for x in inputs:
        try:
            y = backbone(x.to(device, non_blocking=True))
        except (DetectionError, torch.cuda.OutOfMemoryError):
            raise
        except RuntimeError as e:  # e.g. "Output size is too small" from a pooling layer
            raise DetectionError(f"{name}: the conv trunk failed on the resized input of "
                                 f"{x.shape[-1]}x{x.shape[-2]} px: {str(e).splitlines()[0]}") from None
        if y.shape[0] != 1 or y.shape[-1] < 1 or y.shape[-2] < 1:
            raise DetectionError(f"{name}: empty conv map {tuple(y.shape)} for input {tuple(x.shape)}")
        maps.append(y[0].float())
    return maps


def conv_maps_for_image(backbone: torch.nn.Module, image: np.ndarray, scales: Sequence[int],
                        max_size: int, device: torch.device | str = "cpu") -> ImageConvMaps:
    """Conv maps of one image at every scale, in memory (the detector's test-time path).

    Args:
        backbone: a ``detection.backbones.Backbone`` (uses ``preprocess``, ``forward``,
            ``stride``); it is run in eval mode under ``torch.inference_mode``.
        image: uint8 array[H, W, 3] RGB.
        scales: shorter-side lengths, e.g. ``spp.DEFAULT_SCALES_1`` = (688,).
        max_size: cap on the longer side after resizing.
        device: where to run the trunk.
    Returns:
        ImageConvMaps with float32 maps on ``device``.
    """

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DetectionError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    factors = [float(f) for f in scale_factors(h, w, tuple(scales), max_size)]
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            inputs = [backbone.preprocess(image, f) for f in factors]
            maps = _forward_scales(backbone, inputs, device, _image_name(None, image))
    finally:
        backbone.train(was_training)
    return ImageConvMaps(maps=maps, factors=factors, stride=int(backbone.stride), image_size=(h, w),
                         first_cell_center=float(backbone.first_cell_center))


# --------------------------------------------------------------------------------------------
# The on-disk cache
# --------------------------------------------------------------------------------------------

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
    def channels(self) -> int:
        return int(self.settings["channels"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.settings["dtype"])

    def __repr__(self) -> str:
        s = self.settings
        return (f"ConvMapCache(root={str(self.root)!r}, backbone={s['backbone']!r}, scales={s['scales']}, "
                f"dtype={s['dtype']}, records={s['num_records']})")

    # ---- per-record files ---------------------------------------------------------------------

    def record_dir(self, key: str) -> Path:
        """``maps/<key>``; a key that is not a plain file name (spaces, slashes, ...) becomes
        ``maps/id-<sha256 of the key>``."""
        if _SAFE_KEY.match(key):
            return self.root / "maps" / key
        return self.root / "maps" / ("id-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32])

    def map_path(self, key: str, k: int) -> Path:
        """File of the map of scale index ``k`` of record ``key``."""
        return self.record_dir(key) / f"s{k}.npy"

    def record_info(self, record_or_key: ImageRecord | str) -> dict[str, Any]:
        """The done marker of a record: ``factors`` [S], ``map_shapes`` [S][3] (C, H, W),
        ``input_shapes`` [S][2] (H', W' of the resized image), ``image_size`` [2] (H, W).

        Raises:
            CacheError: the record is not (completely) in the cache.
        """
        key = _key(record_or_key)
        info = self._index.get(key)
        if info is None:
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
        try:  # a damaged marker means "not done" (tests/test_fuzz.py: null or 5 leaked a TypeError)
            ok = (isinstance(info, dict) and len(info["factors"]) == len(info["map_shapes"]) == len(self.scales)
                  and all(float(f) > 0 for f in info["factors"])
                  and all(len(s) == 3 and all(type(d) is int for d in s) for s in info["map_shapes"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        return info if ok else None

    def is_complete(self, key: str, check_files: bool = True) -> bool:
        """Whether the record's done marker exists and (``check_files``) every map file's header
        has the recorded shape and the cache's dtype and the file is not truncated."""
        info = self._read_done(key)
        if info is None:
            return False
        if not check_files:
            return True
        for k, shape in enumerate(info["map_shapes"]):
            try:
                self._load_map(key, k, tuple(shape))
            except CacheError as e:
                log.warning("%s; recomputing record %s", e, key)
                return False
        return True

    def _load_map(self, key: str, k: int, shape: tuple[int, ...] | None) -> np.ndarray:
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
        return arr

    def maps(self, record_or_key: ImageRecord | str) -> list[np.ndarray]:
        """Memory-mapped conv maps of a record, one read-only array [C, H_k, W_k] per scale."""
        key = _key(record_or_key)
        info = self.record_info(key)
        return [self._load_map(key, k, tuple(s)) for k, s in enumerate(info["map_shapes"])]

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
        for k, m in enumerate(maps):
            arr = np.ascontiguousarray(m, dtype=self.dtype)
            with atomic_path(self.map_path(key, k), suffix=".npy") as tmp:
                with open(tmp, "wb") as f:  # a file object: np.save(path) would append ".npy"
                    np.save(f, arr, allow_pickle=False)
        write_json(rdir / self.DONE, info)

    def write_index(self, keys: Iterable[str]) -> None:
        """Write ``index.json``: every record's done marker in one file (read at open)."""
        records = {k: self.record_info(k) for k in keys}
        write_json(self.root / self.INDEX, {"version": CONVMAP_FORMAT_VERSION, "records": records})
        self._index = dict(records)

    def nbytes(self) -> int:
        """Bytes of every file under the cache folder."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    # ---- features -----------------------------------------------------------------------------

    def window_features(self, record_or_key: ImageRecord | str, boxes_orig_px: torch.Tensor | np.ndarray,
                        levels: Sequence[int] = DEFAULT_LEVELS, rule: str = "paper",
                        scale_rule: str | int = "area", generator: torch.Generator | None = None,
                        device: torch.device | str = "cpu", scale_target: int | None = None) -> torch.Tensor:
        """Pooled SPP features of windows of a cached record.

        Args:
            record_or_key: the record (or its ``key``); boxes are in that record's pixels (a
                flipped record's boxes are in the mirrored image, as the record's own boxes).
            boxes_orig_px: [N, 4] internal boxes in original-image pixels.
            levels: pyramid levels (default 6, 3, 2, 1 -> 50 bins).
            rule: projection rule, "paper" or "code" (``spp.project_boxes``).
            scale_rule: "area" (best scale, for testing), "code" (the SPP code's best-scale rule),
                "random" (a random scale per window, for fine-tuning; draws from ``generator``) or
                a scale index; ``scale_target`` overrides the rule's window side (224 / 208).
            device: where to pool.
        Returns:
            float32 Tensor[N, C * sum(n^2)] on ``device``, rows in the order of the boxes.
        """
        key = _key(record_or_key)
        info = self.record_info(key)
        factors = [float(f) for f in info["factors"]]
        boxes_t = _boxes_tensor(boxes_orig_px)
        scale_index = select_scales(boxes_t, factors, scale_rule, generator, scale_target)
        # Lazy: only the scales some window uses are read from disk.
        maps = _LazyMaps(self, key, [tuple(s) for s in info["map_shapes"]])
        return pooled_window_features(maps, factors, boxes_t, self.stride, levels, rule,
                                      scale_index=scale_index, device=device,
                                      first_cell_center=self.first_cell_center)


class _LazyMaps(Sequence):
    """The maps of one cached record, each loaded (memory-mapped) on first access."""

    def __init__(self, cache: ConvMapCache, key: str, shapes: list[tuple[int, ...]]) -> None:
        self.cache, self.key, self.shapes = cache, key, shapes
        self._loaded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= k < len(self.shapes):
            raise IndexError(k)
        if k not in self._loaded:
            self._loaded[k] = self.cache._load_map(self.key, k, self.shapes[k])
        return self._loaded[k]


def _is_temp(path: Path) -> bool:
    """A temporary file of ``detection.io.atomic_path`` (``.<name>.<pid>.<random>.tmp``)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _key(record_or_key: ImageRecord | str) -> str:
    return record_or_key if isinstance(record_or_key, str) else record_or_key.key


def _boxes_tensor(boxes: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(boxes, torch.Tensor):
        return boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    return torch.from_numpy(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

class _ResizedImages(Dataset):
    """Decodes and resizes records in DataLoader workers.

    Item i -> ``(i, inputs, factors, (H, W), error)``: ``inputs`` one Tensor[1, 3, H', W'] per
    scale. A DetectionError (unreadable image) is returned, not raised, so that the main process
    re-raises it with its own message instead of DataLoader's worker traceback text.
    """

    def __init__(self, records: Sequence[ImageRecord], preprocess: Any, scales: Sequence[int],
                 max_size: int) -> None:
        self.records = list(records)
        self.preprocess = preprocess
        self.scales = tuple(int(s) for s in scales)
        self.max_size = int(max_size)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor], list[float], tuple[int, int],
                                           DetectionError | None]:

        record = self.records[i]
        try:
            image = load_image(record)
            h, w = image.shape[:2]
            factors = [float(f) for f in scale_factors(h, w, self.scales, self.max_size)]
            with torch.inference_mode():
                inputs = [self.preprocess(image, f) for f in factors]
        except DetectionError as e:
            # Name the image: preprocess's message says what is wrong, not with which file.
            msg = str(e) if str(record.path) in str(e) else f"{_image_name(record)}: {e}"
            return i, [], [], (0, 0), type(e)(msg)
        return i, inputs, factors, (h, w), None


def _worker_init(worker_id: int) -> None:
    # One OpenCV thread per worker: workers already run in parallel, and OpenCV's own pool on
    # top of them only oversubscribes the cores (torch sets 1 thread in workers itself).
    import cv2

    cv2.setNumThreads(1)
    init_worker_process()


def _first(batch: list[Any]) -> Any:
    # batch_size=1: images of different sizes cannot be stacked, so take the one item as is.
    return batch[0]


def extract_conv_maps(dataset: Any, backbone: torch.nn.Module, out_dir: str | Path,
                      scales: Sequence[int] | None = None, max_size: int | None = None, fp16: bool = False,
                      include_flipped: bool | None = None, device: torch.device | str = "cpu",
                      num_workers: int = 2, progress: bool = True, rebuild: bool = False) -> ConvMapCache:
    """Compute (or resume computing) the conv maps of every record of ``dataset`` into a cache.

    Images are decoded and resized by ``num_workers`` DataLoader workers (batch size 1: sizes
    differ); the trunk runs in eval mode under ``torch.inference_mode`` on ``device``. Records
    already complete in the cache are skipped, so an interrupted run resumes where it stopped.
    A flipped record gets its own conv pass on the mirrored image (a conv trunk is not
    flip-equivariant), as the SPP code does.

    Args:
        dataset: a VOCDataset (``records``, ``split``, ``fingerprint()``).
        backbone: a ``detection.backbones.Backbone``; it is moved to ``device``.
        out_dir: parent folder; the cache is ``out_dir/convmaps_<key>``.
        scales: shorter sides (default ``spp.DEFAULT_SCALES_1`` = (688,)).
        max_size: cap on the longer side (default ``spp.DEFAULT_MAX_SIZE`` = 2000).
        fp16: store maps as float16 (half the bytes; computed in float32 and rounded).
        include_flipped: see :func:`cache_records` (default: as the dataset's records).
        device: where the trunk runs ("cpu" or "cuda").
        num_workers: DataLoader worker processes for decoding + resizing (0: in this process).
        progress: show a tqdm bar.
        rebuild: delete an existing cache folder of these settings first.
    Returns:
        The filled ConvMapCache.
    Raises:
        DetectionError: an image cannot be read or is too small for the trunk (named).
        CacheError: the cache folder holds other settings / another format version.
    """
    scales = tuple(DEFAULT_SCALES_1 if scales is None else scales)
    if max_size is None:
        max_size = DEFAULT_MAX_SIZE
    records = cache_records(dataset, include_flipped)
    settings = convmap_settings(dataset, backbone, scales, max_size, fp16, records)
    cache = ConvMapCache.create(out_dir, settings, rebuild=rebuild)
    todo = [i for i, r in enumerate(records) if not cache.is_complete(r.key)]
    log.info("conv-map cache %s: %d of %d records to compute (%s, scales %s, %s)", cache.root, len(todo),
             len(records), settings["backbone"], list(scales), settings["dtype"])
    if todo:
        _run_extraction(cache, [records[i] for i in todo], backbone, scales, max_size, device, num_workers,
                        progress)
    cache.write_index([r.key for r in records])
    return cache


def _run_extraction(cache: ConvMapCache, records: list[ImageRecord], backbone: torch.nn.Module,
                    scales: Sequence[int], max_size: int, device: torch.device | str, num_workers: int,
                    progress: bool) -> None:
    from tqdm.auto import tqdm

    device = torch.device(device)
    # preprocess (cv2 resize + normalise) only uses plain Python attributes of the backbone, never
    # its parameters, so workers can call it wherever the trunk lives.
    images = _ResizedImages(records, backbone.preprocess, scales, max_size)
    loader = DataLoader(images, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=_first,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if num_workers else None,
                        # spawn, not fork: a child forked from a parent whose OpenCV/OpenMP thread
                        # pools already ran can deadlock (seen here in the test suite).
                        multiprocessing_context="spawn" if num_workers else None,
                        persistent_workers=False)
    was_training = backbone.training
    backbone.to(device).eval()
    t0, done = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for i, inputs, factors, (h, w), error in tqdm(loader, total=len(records), disable=not progress,
                                                          desc="conv maps", unit="img"):
                if error is not None:
                    raise error
                record = records[i]
                maps = _forward_scales(backbone, inputs, device, _image_name(record))
                arrays = [m.cpu().numpy() for m in maps]
                info = {
                    "factors": factors,
                    "map_shapes": [list(a.shape) for a in arrays],
                    "input_shapes": [list(x.shape[-2:]) for x in inputs],
                    "image_size": [int(h), int(w)],
                }
                cache.write_record(record.key, arrays, info, name=_image_name(record))
                done += 1
    finally:
        backbone.train(was_training)
        if done:
            dt = time.perf_counter() - t0
            log.info("computed conv maps of %d records in %.1f s (%.3f s/record)", done, dt, dt / done)

