"""One conv pass per image per scale: the conv maps of a split into a :class:`ConvMapCache`
(DataLoader workers decode and resize), or of one image in memory (:func:`conv_maps_for_image`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import comm
from ..backbones import build_backbone
from ..data.records import ImageRecord
from ..data.images import load_image
from ..data.voc import VOCDataset, report_images
from ..errors import DetectionError
from ..io.jsonfile import write_json
from ..proposals import compute_proposals
from ..runtime import resolve_device
from ..workers import init_worker_process
from .convmap_cache import ConvMapCache, cache_records, convmap_settings
from .scales import DEFAULT_MAX_SIZE, DEFAULT_SCALES_1, scale_factors

__all__ = ["ImageConvMaps", "check_image", "conv_maps_for_image", "extract_conv_maps", "extract_split"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageConvMaps:
    """The conv maps of one image at every scale, in memory.

    Attributes:
        maps: per scale, Tensor[C, H_k, W_k] (float32), or None for a scale not computed.
        factors: per scale, the resize factor (scaled = factor * original pixels).
        stride: total stride of the trunk that made the maps.
        image_size: (height, width) of the original image.
        first_cell_center: image coordinate of conv cell 0's centre (``pooling.project_boxes``).
    """

    maps: list[torch.Tensor | None]
    factors: list[float]
    stride: int
    image_size: tuple[int, int]
    first_cell_center: float = 0.5


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


def check_image(image: np.ndarray) -> np.ndarray:
    """The image as an array, or a DetectionError unless it is uint8 RGB [H, W, 3]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DetectionError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def conv_maps_for_image(backbone: torch.nn.Module, image: np.ndarray, scales: Sequence[int],
                        max_size: int, device: torch.device | str = "cpu", only: Sequence[int] | None = None,
                        differentiable: bool = False) -> ImageConvMaps:
    """Conv maps of one image at every scale (or the scales ``only``), in memory.

    Args:
        backbone: a ``detection.backbones.Backbone`` (uses ``preprocess``, ``forward``,
            ``stride``).
        image: uint8 array[H, W, 3] RGB.
        scales: shorter-side lengths, e.g. ``scales.DEFAULT_SCALES_1`` = (688,).
        max_size: cap on the longer side after resizing.
        device: where to run the trunk.
        only: indices of the scales to compute (default: all); the others' maps are None.
        differentiable: run the trunk as it is (its train/eval mode, gradients recorded), to
            fine-tune the conv layers; by default it runs in eval mode under
            ``torch.inference_mode``.
    Returns:
        ImageConvMaps with float32 maps on ``device``.
    """
    image = check_image(image)
    h, w = image.shape[:2]
    factors = [float(f) for f in scale_factors(h, w, tuple(scales), max_size)]
    wanted = list(range(len(factors))) if only is None else sorted({int(k) for k in only})
    device = torch.device(device)
    name = _image_name(None, image)
    if differentiable:
        computed = _forward_scales(backbone, [backbone.preprocess(image, factors[k]) for k in wanted], device, name)
    else:
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.inference_mode():
                inputs = [backbone.preprocess(image, factors[k]) for k in wanted]
                computed = _forward_scales(backbone, inputs, device, name)
        finally:
            backbone.train(was_training)
    maps: list[torch.Tensor | None] = [None] * len(factors)
    for k, fmap in zip(wanted, computed):
        maps[k] = fmap
    return ImageConvMaps(maps=maps, factors=factors, stride=int(backbone.stride), image_size=(h, w),
                         first_cell_center=float(backbone.first_cell_center))


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
    flip-equivariant), as the SPP code does. Under ``torchrun`` each rank computes a contiguous
    share of the records (on its own GPU with ``device`` ``cuda:LOCAL_RANK``) and rank 0 writes
    the index; a rerun resumes with any number of ranks.

    Args:
        dataset: a VOCDataset (``records``, ``split``, ``fingerprint()``).
        backbone: a ``detection.backbones.Backbone``; it is moved to ``device``.
        out_dir: parent folder; the cache is ``out_dir/convmaps_<key>``.
        scales: shorter sides (default ``scales.DEFAULT_SCALES_1`` = (688,)).
        max_size: cap on the longer side (default ``scales.DEFAULT_MAX_SIZE`` = 2000).
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
    # Rank 0 makes (or checks, or rebuilds) the folder; then each rank fills a contiguous share
    # of the records, and rank 0 writes the index once all are done.
    if comm.is_main():
        ConvMapCache.create(out_dir, settings, rebuild=rebuild)
    comm.barrier("conv maps: waiting for rank 0 to make the cache folder")
    cache = ConvMapCache.create(out_dir, settings)
    mine = comm.shard(records)
    todo = [r for r in mine if not cache.is_complete(r.key)]
    log.info("conv-map cache %s: %d of %d records to compute%s (%s, scales %s, %s)", cache.root, len(todo),
             len(mine), "" if comm.world_size() == 1 else f" on rank {comm.rank()} ({len(records)} in all)",
             settings["backbone"], list(scales), settings["dtype"])
    if todo:
        _run_extraction(cache, todo, backbone, scales, max_size, device, num_workers, progress)
    comm.barrier("conv maps: waiting for every rank's records")
    if comm.is_main():
        cache.write_index([r.key for r in records])
    comm.barrier("conv maps: waiting for rank 0 to write the index")
    return ConvMapCache.open(cache.root) if comm.world_size() > 1 else cache


def _run_extraction(cache: ConvMapCache, records: list[ImageRecord], backbone: torch.nn.Module,
                    scales: Sequence[int], max_size: int, device: torch.device | str, num_workers: int,
                    progress: bool) -> None:
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


def extract_split(data: str | Path, split: str, out: str | Path, backbone: str = "zf5", weights: str | None = None,
                  seed: int = 0, scales: Sequence[int] = DEFAULT_SCALES_1, max_size: int | None = None,
                  fp16: bool = False, flip: bool = False, workers: int = 2, device: str = "auto",
                  proposals: bool = True, rebuild: bool = False, skip_bad: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """``tools/extract_features.py``: proposals of a split (into ``out/proposals``, resumed if
    partial; unless ``proposals`` is false), then its conv-map cache in ``out/convmaps_<key>/``,
    and a summary in ``out/features_summary.json`` (returned)."""
    out = Path(out)
    device = resolve_device(device)
    comm.init_distributed(device)
    dataset = VOCDataset(data, split, use_flipped=flip, skip_bad=skip_bad)
    if proposals:
        # Proposals are computed on the original images (flipped records mirror them); an
        # existing complete cache is reused, a partial one resumed.
        compute_proposals(dataset, out / "proposals", num_workers=workers, progress=progress)
    trunk = build_backbone(backbone, weights=weights, seed=seed)
    t0 = time.perf_counter()
    cache = extract_conv_maps(dataset, trunk, out, scales=scales, max_size=max_size, fp16=fp16, include_flipped=flip,
                              device=device, num_workers=workers, progress=progress, rebuild=rebuild)
    seconds = time.perf_counter() - t0
    nbytes = cache.nbytes()
    n = int(cache.settings["num_records"])
    summary = {
        "cache": str(cache.root),
        "num_images": n,
        "seconds": round(seconds, 3),
        "bytes_on_disk": nbytes,
        "bytes_per_image": round(nbytes / max(n, 1)),
        "settings": cache.settings,
        # What the next stage (train_svm.py) rebuilds the trunk from; the weights id in the
        # settings checks that the file is still the same.
        "backbone": {"name": backbone, "seed": seed,
                     "weights": None if weights is None else
                     (weights if not Path(weights).expanduser().is_file()
                      else str(Path(weights).expanduser().resolve()))},
    }
    if comm.is_main():
        write_json(out / "features_summary.json", summary)
        report_images(dataset)
    return summary
