"""Benchmarks a user can rerun (docs/benchmarks.md), one library call per tool:

- :func:`bench_spp_core`: the conv pass of one image at one scale and the pooling of many random
  windows of its map (``tools/bench_spp.py``);
- :func:`bench_train_stage`: time and peak memory of the train stage alone (SVMs + box
  regressors) on the first images of a finished pipeline run (``tools/bench_train_memory.py``);
- :func:`bench_accounting`: the pipeline run with 1 process and with N (``torchrun``), each
  stage's CPU seconds summed over the ranks and on the slowest rank against 1 process
  (``tools/bench_accounting.py``).

Times are medians of repeated runs after one warm-up; memory is the process's peak RSS, which only
grows, so measure one image count per process.
"""
from __future__ import annotations

import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import build_backbone
from .config import load_config
from .data.records import ImageRecord
from .data.voc import VOCDataset
from .errors import DetectionError
from .io.jsonfile import read_json
from .features import FeatureSettings, extract_conv_maps, make_featurizer, pool5_dim
from .features.pooling import DEFAULT_LEVELS, pool_windows, project_boxes
from .features.scales import scale_factors
from .pipeline import PipelineConfig, detector_settings
from .proposals import compute_proposals
from .training.detector_training import train_detector

__all__ = ["bench_spp_core", "bench_train_stage", "first_image_of_shape", "peak_rss_gb", "peak_rss_bytes", "bench_accounting",
           "accounting_table", "format_accounting_table", "read_accounting"]

log = logging.getLogger(__name__)


def _median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    fn()                                                # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_image_of_shape(data: str | Path, split: str = "test", aspect: tuple[float, float] = (1.28, 1.4)
                         ) -> ImageRecord:
    """The first image of a VOC-layout split whose longer / shorter side ratio is within
    ``aspect`` (default: VOC's usual 4:3, 688 x ~917 at scale 688)."""
    for record in VOCDataset(data, split).records:
        if aspect[0] <= max(record.width, record.height) / min(record.width, record.height) <= aspect[1]:
            return record
    raise DetectionError(f"{data}: no image of split {split!r} has a side ratio in {list(aspect)}")


def bench_spp_core(image: np.ndarray, backbone: str = "zf5", weights: str | None = None, scale: int = 688,
                   windows: int = 2000, levels: Sequence[int] = DEFAULT_LEVELS, repeat: int = 5,
                   device: str = "cpu", seed: int = 0, roi_pool: bool = True) -> dict[str, Any]:
    """Time the SPP core on one image.

    Windows are random (seeded): log-uniform sides between 16 px and the image size, like selective
    search's mix of small and large boxes. Timed: the conv pass at ``scale``, :func:`pool_windows`
    of the windows (its default sparse-table method and ``method="roi_pool"``), and, with
    ``roi_pool``, torchvision's ``roi_pool`` run at every pyramid level for comparison.

    Args:
        image: uint8 RGB [H, W, 3].
    Returns:
        A JSON-able dict of the settings, the map size and the median seconds of each step.
    """
    device_t = torch.device(device)
    levels = tuple(int(v) for v in levels)
    trunk = build_backbone(backbone, weights=weights, seed=seed).to(device_t)
    h, w = image.shape[:2]
    f = scale_factors(h, w, (scale,))[0]
    x = trunk.preprocess(image, f).to(device_t)
    sync = torch.cuda.synchronize if device_t.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(seed)
    bw = np.exp(rng.uniform(np.log(16), np.log(w), windows))
    bh = np.exp(rng.uniform(np.log(16), np.log(h), windows))
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    boxes = torch.from_numpy(np.stack([x1, y1, x1 + bw, y1 + bh], 1) * f)

    def conv() -> torch.Tensor:
        out = trunk(x)
        sync()
        return out

    def timed_pool(method: str) -> Callable[[], None]:
        def run() -> None:
            pool_windows(fmap, cells, levels, method=method)
            sync()
        return run

    with torch.inference_mode():
        t_conv = _median_seconds(conv, repeat)
        fmap = conv()[0]
        cells = project_boxes(boxes, trunk.stride, tuple(fmap.shape[1:]),
                              first_cell_center=trunk.first_cell_center).to(device_t)
        t_pool = _median_seconds(timed_pool("table"), repeat)
        t_pool_roi = _median_seconds(timed_pool("roi_pool"), repeat)
        t_roi = None
        if roi_pool:
            from torchvision.ops import roi_pool as tv_roi_pool

            rois = torch.cat([torch.zeros(len(cells), 1, dtype=torch.long, device=device_t), cells], 1).float()

            def torchvision_levels() -> None:
                torch.cat([tv_roi_pool(fmap[None], rois, n, 1.0).flatten(1) for n in levels], 1)
                sync()

            t_roi = _median_seconds(torchvision_levels, repeat)
    return {
        "backbone": backbone, "weights_id": trunk.weights_id, "image_size": [h, w],
        "input_size": list(x.shape[2:]), "map_size": list(fmap.shape[1:]), "channels": int(fmap.shape[0]),
        "windows": windows, "levels": list(levels), "threads": torch.get_num_threads(), "device": str(device_t),
        "repeat": repeat, "conv_s": t_conv, "pool_windows_s": t_pool, "pool_windows_roi_pool_method_s": t_pool_roi,
        "roi_pool_s": t_roi, "pool_windows_per_s": windows / t_pool,
        "roi_pool_windows_per_s": None if t_roi is None else windows / t_roi, "torch": torch.__version__,
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes: ``VmHWM`` of /proc/self/status.

    Not ``ru_maxrss``: Linux carries the parent's high-water mark over fork and exec, so a process
    started from a large one (a test under pytest, a tool under a big driver) would report its
    parent's peak. ``ru_maxrss`` is the fallback where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_gb() -> float:
    """:func:`peak_rss_bytes` in GiB."""
    return peak_rss_bytes() / 2**30


def bench_train_stage(run: str | Path, images: int, progress: bool = False) -> dict[str, Any]:
    """Train SVMs and box regressors on the first ``images`` training images of a finished
    pipeline run (with their flipped copies when the run used flips), reusing its proposals and
    conv maps and every setting of its ``config.yaml``; time it and measure the peak memory.

    Raises:
        DetectionError: the run is not an SPP-net run on a data folder without fine-tuning.
    """
    run = Path(run)
    cfg = load_config(PipelineConfig, run / "config.yaml")
    if cfg.method != "spp" or cfg.data.root is None or cfg.conv_finetune.enabled or cfg.train.finetune.enabled:
        raise DetectionError(f"{run}: the train-stage benchmark measures SPP runs on a data folder without "
                             "fine-tuning")
    ds = VOCDataset(cfg.data.root, cfg.data.train_split, classes=cfg.data.classes, use_flipped=cfg.data.flip)
    ids = set(list(dict.fromkeys(r.image_id for r in ds.records))[:images])
    records = [r for r in ds.records if r.image_id in ids]
    props = compute_proposals(ds, run / "proposals", cfg.proposals, num_workers=0, progress=False)
    backbone = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, seed=cfg.backbone.seed)
    settings = detector_settings(cfg)
    cache = extract_conv_maps(ds, backbone, run / "features", scales=settings.scales, max_size=settings.max_size,
                              fp16=cfg.features.fp16, num_workers=0, progress=False)
    tcfg = cfg.train
    before = peak_rss_gb()
    t0 = time.perf_counter()
    detector = train_detector(records, ds.classes, props.proposals_for_record, backbone,
                              make_featurizer(settings.method, settings, cache=cache),
                              pool5_dim(backbone.out_channels, settings.levels), settings, tcfg, progress=progress)
    return {"run": str(run), "images": len(ids), "records": len(records),
            "objects": int(sum(len(r.boxes) for r in records)), "train_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gb_before_training": round(before, 3), "peak_rss_gb": round(peak_rss_gb(), 3),
            "svm_stats": detector.svms.meta["stats"],
            "bbox_samples": {k: v["num_samples"] for k, v in detector.regressors.meta["stats"].items()}
            if detector.regressors is not None else None}



#: The variables a launcher sets: a benchmark's own runs start from none of them.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


def read_accounting(run: str | Path) -> list[dict[str, Any]]:
    """The per-rank accounting of a pipeline run (``OUT/accounting/rank<k>.json``), in rank
    order, as many ranks as rank 0's file says the run had."""
    folder = Path(run) / "accounting"
    first = read_json(folder / "rank0.json")
    world = first.get("info", {}).get("world_size") if isinstance(first, dict) else None
    if not isinstance(world, int) or world < 1:
        raise DetectionError(f"{folder / 'rank0.json'}: no world_size in its info; not a pipeline accounting file")
    ranks = [first] + [read_json(folder / f"rank{r}.json") for r in range(1, world)]
    for r, rank in enumerate(ranks):
        if not isinstance(rank, dict) or not isinstance(rank.get("stages"), dict):
            raise DetectionError(f"{folder / f'rank{r}.json'}: no stages; not a pipeline accounting file")
    return ranks


def accounting_table(one: dict[str, Any], many: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage of the 1-process run ``one`` (its accounting file) and the N ranks ``many``:
    CPU seconds of 1 process, summed over the N ranks and the ratio, the slowest rank's (most
    CPU) and the ratio, and the wall seconds of both runs (the N-process run's: its longest rank).
    A stage that only rank 0 runs (evaluation, timing, report) shows the others' waiting."""
    stages = [s for run in (one, *many) for s in run.get("order", run["stages"])]
    rows = []
    for stage in dict.fromkeys(stages):
        base = one["stages"].get(stage, {"cpu_s": 0.0, "wall_s": 0.0})
        cpu = [rank["stages"].get(stage, {}).get("cpu_s", 0.0) for rank in many]
        wall = [rank["stages"].get(stage, {}).get("wall_s", 0.0) for rank in many]
        ratio = (lambda x: round(x / base["cpu_s"], 3) if base["cpu_s"] > 0 else None)
        rows.append({"stage": stage, "cpu_1": round(base["cpu_s"], 2), "cpu_sum_n": round(sum(cpu), 2),
                     "sum_ratio": ratio(sum(cpu)), "cpu_slowest_n": round(max(cpu), 2),
                     "slowest_ratio": ratio(max(cpu)), "wall_1": round(base["wall_s"], 2),
                     "wall_n": round(max(wall), 2), "cpu_per_rank": [round(c, 2) for c in cpu]})
    return rows


def format_accounting_table(rows: Sequence[dict[str, Any]], processes: int) -> str:
    """:func:`accounting_table` as a Markdown table."""
    n = processes
    lines = [f"| stage | CPU s, 1 proc | CPU s, {n} procs summed | ratio (<= 1.15) | slowest rank CPU s | ratio (<= 0.6) "
             f"| wall s, 1 proc | wall s, {n} procs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['cpu_1']:.2f} | {r['cpu_sum_n']:.2f} | {_ratio(r['sum_ratio'])} | "
                     f"{r['cpu_slowest_n']:.2f} | {_ratio(r['slowest_ratio'])} | {r['wall_1']:.2f} | {r['wall_n']:.2f} |")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def bench_accounting(pipeline_script: str | Path, out: str | Path, *, processes: int = 2, data: str | None = None,
                     config: str | None = None, overrides: Sequence[str] = (), timeout: float | None = None
                     ) -> dict[str, Any]:
    """Run the pipeline (``pipeline_script``: ``tools/run_pipeline.py``) with 1 process in
    ``out/1proc`` and with ``processes`` under ``torchrun --standalone`` in ``out/<N>proc``, each
    from an empty folder (every stage computed), and compare each stage's CPU seconds (of the
    process and its workers, :class:`detection.timer.StageAccount`).

    Each run sizes its threads and workers itself (:func:`detection.runtime.rank_share`: a
    rank's share of the cores), so both use the machine's cores. Returns
    ``{"processes", "command_1", "command_n", "rows": accounting_table(...), "ranks_n": resources}``.

    Raises:
        DetectionError: ``out/1proc`` or ``out/<N>proc`` exists (a benchmark starts from nothing),
            or a run fails (its last lines of output quoted).
    """
    if processes < 2:
        raise DetectionError(f"--processes {processes}: the benchmark compares 1 process with 2 or more")
    out = Path(out)
    runs = {1: out / "1proc", processes: out / f"{processes}proc"}
    for folder in runs.values():
        if folder.exists():
            raise DetectionError(f"{folder} exists: the benchmark measures every stage from an empty folder; "
                                 "give another --out or delete it")
    extra = [*(["--data", data] if data else []), *(["--config", config] if config else []),
             *(["--set", *overrides] if overrides else []), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    commands = {}
    for n, folder in runs.items():
        launcher = [] if n == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
        commands[n] = [sys.executable, *launcher, str(pipeline_script), "--out", str(folder), *extra]
        log.info("accounting: %s", " ".join(commands[n]))
        proc = subprocess.run(commands[n], env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise DetectionError(f"the {n}-process run failed (exit {proc.returncode}): " + " | ".join(tail))
    one, many = read_accounting(runs[1]), read_accounting(runs[processes])
    if len(many) != processes:
        raise DetectionError(f"{runs[processes]}: {len(many)} ranks recorded, {processes} launched")
    return {"processes": processes, "command_1": commands[1], "command_n": commands[processes],
            "rows": accounting_table(one[0], many),
            "resources_1": one[0]["info"].get("resources"), "resources_n": [r["info"].get("resources") for r in many]}
class _FirstRecords:
    """The first records of a dataset, as :func:`extract_conv_maps` reads a dataset."""

    def __init__(self, dataset: VOCDataset, n: int) -> None:
        self.records, self.split, self._dataset = list(dataset.records[:n]), dataset.split, dataset

    def fingerprint(self) -> str:
        return self._dataset.fingerprint()


def bench_mining_cost(data: str | Path, out_dir: str | Path, backbone: str = "zf5", weights: str | None = None,
                      scales: Sequence[int] = (480, 576, 688, 864, 1200), windows: int = 2000, images: int = 8,
                      num_classes: int = 20, split: str = "trainval", seed: int = 0) -> dict[str, Any]:
    """Seconds per image of one SVM mining pass on real conv maps: the features read (the
    windows of an image pooled from the conv-map cache, :class:`WindowFeatureSource`) and the
    whole per-image step of :class:`~detection.training.hard_negatives.SVMTrainer` (read, scale,
    IoU with the GT, scores of every class, hard rows), with ``num_classes`` random SVMs.

    The first ``images`` records of ``split`` get their conv maps cached in ``out_dir`` (untimed)
    and ``windows`` random boxes each (the cost depends on their number, not on where they come
    from). Each image is timed twice; the second time counts (the cache files are in the page
    cache, as on a machine whose memory holds them, and each map's checksum is verified once per
    process, at the first read).
    """
    from .training.hard_negatives import SVMTrainer
    from .training.window_source import WindowFeatureSource

    ds = VOCDataset(data, split)
    subset = _FirstRecords(ds, images)
    net = build_backbone(backbone, weights=weights, seed=seed)
    settings = FeatureSettings(scales=tuple(scales))
    cache = extract_conv_maps(subset, net, Path(out_dir), scales=settings.scales, max_size=settings.max_size,
                              num_workers=0, progress=False)
    rng = np.random.default_rng(seed)
    boxes = {}
    for r in subset.records:
        xy = rng.uniform(0, 1, (windows, 2)) * [r.width - 16, r.height - 16]
        wh = 16 + rng.uniform(0, 1, (windows, 2)) * (np.array([r.width, r.height]) - xy - 16)
        boxes[r.key] = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    dim = pool5_dim(net.out_channels, settings.levels)
    source = WindowFeatureSource(subset.records, lambda r: boxes[r.key], make_featurizer("spp", settings, cache=cache),
                                 None, "pool5", dim)
    trainer = SVMTrainer(source, num_classes)
    weights_ = (rng.standard_normal((num_classes, dim)) * 1e-3).astype(np.float32)
    biases = np.full(num_classes, -0.5, np.float32)
    read, step = [], []
    for repeat in range(2):
        for i in range(len(subset.records)):
            t0 = time.perf_counter()
            source.image(i)
            t1 = time.perf_counter()
            # The trainer's own per-image step (it reads the image again).
            trainer._mine_image(i, dim, 1.0, weights_, biases, list(range(num_classes)))
            t2 = time.perf_counter()
            if repeat:
                read.append(t1 - t0)
                step.append(t2 - t1)
    return {"data": str(data), "backbone": backbone, "scales": list(scales), "dim": dim, "windows": windows,
            "images": len(subset.records), "classes": num_classes, "threads": torch.get_num_threads(),
            "read_seconds_per_image": round(statistics.median(read), 4),
            "mining_step_seconds_per_image": round(statistics.median(step), 4),
            "read_seconds_each": [round(t, 4) for t in read], "step_seconds_each": [round(t, 4) for t in step]}
