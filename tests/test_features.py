"""Conv-map cache and pooled window features (detection/features/)."""
from __future__ import annotations


import copy
import importlib.util
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.boxes import flip_boxes
from detection.data.records import ImageRecord
from detection.data.images import load_image
from detection.data.voc import VOCDataset
from detection.errors import CacheError, DetectionError
from detection.features import (
    CONVMAP_FORMAT_VERSION,
    DEFAULT_LEVELS,
    ConvMapCache,
    FeatureSettings,
    cache_records,
    conv_maps_for_image,
    convmap_settings,
    extract_conv_maps,
    make_featurizer,
    pooled_window_features,
    select_scales,
)
from detection.features.pooling import pool_windows, project_boxes
from detection.features.scales import choose_scale

SCALES = (96,)       # small shorter side: the tests are about the cache, not about accuracy
MAX_SIZE = 192       # caps the longer side of the synthetic 320x240 images
NUM_RECORDS = 3      # each conv pass costs ~0.3 s on a busy 2-core machine: keep few images
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _project_and_pool(fmap, boxes_scaled_px, stride, levels=(6, 3, 2, 1), rule="paper", first_cell_center=0.5):
    """Windows of one scaled image pooled straight from its map: the two public ops, no cache."""
    cells = project_boxes(torch.as_tensor(boxes_scaled_px), stride, tuple(fmap.shape[-2:]), rule=rule,
                          first_cell_center=first_cell_center)
    return pool_windows(fmap, cells, levels)


def _subset(dataset: VOCDataset, n: int) -> VOCDataset:
    """The first n records of a dataset (a real VOCDataset; the cache keys on the record list)."""
    sub = copy.copy(dataset)
    sub.records = list(dataset.records[:n])
    return sub


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("zf5", weights=None, seed=0)


@pytest.fixture(scope="module")
def dataset(synthetic_voc):
    return _subset(VOCDataset(synthetic_voc, "trainval"), NUM_RECORDS)


@pytest.fixture(scope="module")
def base(dataset, backbone, tmp_path_factory):
    """The fp32 cache at SCALES of ``dataset``, extracted once (tests must not modify it)."""
    return _extract(dataset, backbone, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def in_memory(dataset, backbone):
    """Reference: conv maps of every record computed in memory, no cache involved."""
    return {r.key: conv_maps_for_image(backbone, load_image(r), SCALES, MAX_SIZE) for r in dataset.records}


def _extract(dataset, backbone, out, **kw):
    kw.setdefault("scales", SCALES)
    kw.setdefault("max_size", MAX_SIZE)
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    return extract_conv_maps(dataset, backbone, out, **kw)


def _cached(cache, record, boxes, levels=DEFAULT_LEVELS, rule="paper", scale_rule="area", generator=None):
    """Features of a record's windows from the cache, as training reads them (the featurizer)."""
    settings = FeatureSettings(scales=tuple(cache.scales), max_size=int(cache.settings["max_size"]),
                               levels=tuple(levels), projection_rule=rule)
    return make_featurizer("spp", settings, cache=cache).pool5(record, boxes, scale_rule=scale_rule,
                                                               generator=generator)


def _in_memory(mem, boxes, levels=DEFAULT_LEVELS, **kw):
    """Features of windows pooled from conv maps computed in memory."""
    return pooled_window_features(mem.maps, mem.factors, boxes, mem.stride, levels,
                                  first_cell_center=mem.first_cell_center, **kw)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under a cache folder except meta.json (it holds a creation time)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def _random_boxes(record, n: int, seed: int) -> np.ndarray:
    """Random internal boxes inside the record's image (some tiny, some whole-image)."""
    rng = np.random.default_rng(seed)
    w, h = record.width, record.height
    xy = rng.uniform(0, 1, size=(n, 4)) * [w, h, w, h]
    boxes = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:]) + 1], axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    boxes[0] = [0, 0, w, h]
    return boxes.astype(np.float32)


def _max_over_cells(fmap: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Slow reference of 1x1 pyramid pooling: max of every channel over the window's cells
    (0-based inclusive), in float64."""
    x1, y1, x2, y2 = (int(v) for v in cell)
    return np.asarray(fmap, dtype=np.float64)[:, y1:y2 + 1, x1:x2 + 1].max(axis=(1, 2))


# ------------------------------------------------------------------------------------------------
def test_round_trip_equals_in_memory_conv_pass(dataset, backbone, base, in_memory):
    cache = base
    assert cache.root.name.startswith("convmaps_")
    meta = json.loads((cache.root / "meta.json").read_text())
    assert meta["version"] == CONVMAP_FORMAT_VERSION and meta["settings"]["scales"] == list(SCALES)
    assert meta["settings"]["dtype"] == "float32" and meta["settings"]["backbone"] == backbone.name
    assert meta["settings"]["num_records"] == NUM_RECORDS
    assert (cache.root / "index.json").is_file()
    for record in dataset.records:
        maps = cache.maps(record)
        ref = in_memory[record.key]
        assert len(maps) == 1 and isinstance(maps[0], np.memmap) and maps[0].dtype == np.float32
        assert cache.factors(record) == ref.factors
        assert maps[0].shape == tuple(ref.maps[0].shape) and maps[0].shape[0] == backbone.out_channels
        np.testing.assert_allclose(maps[0], ref.maps[0].numpy(), rtol=0, atol=1e-5)
        info = cache.record_info(record.key)
        assert info["image_size"] == [record.height, record.width]
        f = ref.factors[0]
        assert info["input_shapes"] == [[round(record.height * f), round(record.width * f)]]
    # A second call reuses the cache: nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in cache.root.rglob("*.npy")}
    again = _extract(dataset, backbone, cache.root.parent)
    assert again.root == cache.root
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*.npy")} == before
    # ConvMapCache.open reads the same folder back.
    opened = ConvMapCache.open(cache.root)
    assert opened.settings == cache.settings
    assert opened.record_info(dataset.records[1]) == cache.record_info(dataset.records[1])


@pytest.mark.slow
def test_dataloader_workers_give_the_same_files(dataset, backbone, base, tmp_path):
    two = _subset(dataset, 2)
    cache = _extract(two, backbone, tmp_path, num_workers=2)
    for record in two.records:
        for name in ("s0.npy", "done.json"):
            assert (cache.record_dir(record.key) / name).read_bytes() == (base.record_dir(record.key) / name).read_bytes()
    # Keys that are not plain file names get a hashed folder.
    assert cache.record_dir("a b/../c").parent == cache.root / "maps"
    assert cache.record_dir("a b/../c").name == "a b%2F..%2Fc"


def test_window_features_equal_pooling_the_in_memory_map(dataset, backbone, base, in_memory):
    levels = (6, 3, 2, 1)
    c0 = backbone.first_cell_center
    for record in dataset.records[:2]:
        boxes = _random_boxes(record, 40, seed=1)
        feats = _cached(base, record, boxes, levels=levels)
        assert feats.shape == (len(boxes), backbone.out_channels * 50) and feats.dtype == torch.float32
        mem = in_memory[record.key]
        scaled = torch.as_tensor(boxes, dtype=torch.float64) * mem.factors[0]
        ref = _project_and_pool(mem.maps[0], scaled, backbone.stride, levels, "paper", first_cell_center=c0)
        torch.testing.assert_close(feats, ref.float(), rtol=0, atol=1e-5)
        torch.testing.assert_close(_in_memory(mem, boxes, levels), feats, rtol=0, atol=1e-5)
        # Independent slow check of a 1x1 pyramid: the max over the projected cells.
        one = _cached(base, record, boxes, levels=(1,))
        cells = project_boxes(scaled, backbone.stride, tuple(mem.maps[0].shape[1:]), rule="paper",
                                  first_cell_center=c0).numpy()
        fmap = mem.maps[0].numpy()
        for i in range(len(boxes)):
            np.testing.assert_allclose(one[i].numpy(), _max_over_cells(fmap, cells[i]), rtol=0, atol=1e-5)
        # Input order is kept: a permutation of the boxes permutes the rows.
        perm = np.random.default_rng(0).permutation(len(boxes))
        torch.testing.assert_close(_cached(base, record, boxes[perm]), feats[perm])
        # The "code" projection rule is passed through.
        code = _cached(base, record, boxes, levels=levels, rule="code")
        ref = _project_and_pool(mem.maps[0], scaled, backbone.stride, levels, "code", first_cell_center=c0)
        torch.testing.assert_close(code, ref.float(), rtol=0, atol=1e-5)
    empty = _cached(base, dataset.records[0], np.zeros((0, 4), np.float32))
    assert empty.shape == (0, backbone.out_channels * 50)


def test_scale_choice_with_two_scales(dataset, backbone, tmp_path):
    scales, max_size = (48, 128), 400
    cache = _extract(_subset(dataset, 1), backbone, tmp_path, scales=scales, max_size=max_size)
    record = dataset.records[0]
    factors = cache.factors(record)
    assert len(factors) == 2 and factors[1] > factors[0]
    assert [m.shape[1] for m in cache.maps(record)] == [3, 8]  # 48/16 and 128/16 cells high
    boxes = _random_boxes(record, 30, seed=2)
    # "area": the scale whose scaled window area is closest to target^2 (slow reference in
    # float64). The target is 224 in the paper; 64 here, in proportion to these tiny scales.
    target = 64
    areas = (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])
    expected = np.argmin([np.abs(areas * f * f - target ** 2) for f in factors], axis=0)
    assert set(expected) == {0, 1}, "the boxes should exercise both scales"
    got = select_scales(torch.as_tensor(boxes), factors, "area", target=target)
    np.testing.assert_array_equal(got.numpy(), expected)
    big = select_scales(torch.as_tensor(boxes), factors, "area")  # paper's 224: the larger scale
    assert big.tolist() == [1] * len(boxes)
    feats = pooled_window_features(cache.maps(record), factors, boxes, cache.stride, scale_rule="area",
                                   scale_target=target, first_cell_center=cache.first_cell_center)
    per_scale = [_cached(cache, record, boxes, scale_rule=k) for k in range(2)]
    for i, k in enumerate(expected):
        torch.testing.assert_close(feats[i], per_scale[k][i])
    assert not torch.equal(per_scale[0], per_scale[1])
    for k, fmap in enumerate(cache.maps(record)):  # each scale: its own map and factor
        ref = _project_and_pool(torch.from_numpy(np.array(fmap)), torch.as_tensor(boxes, dtype=torch.float64)
                                  * factors[k], backbone.stride, first_cell_center=backbone.first_cell_center)
        torch.testing.assert_close(per_scale[k], ref, rtol=0, atol=0)
    # "random": reproducible with a seeded generator, each row from one of the scales, both used.
    r1 = _cached(cache, record, boxes, scale_rule="random", generator=torch.Generator().manual_seed(3))
    r2 = _cached(cache, record, boxes, scale_rule="random", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(r1, r2)
    which = [0 if torch.equal(r1[i], per_scale[0][i]) else 1 if torch.equal(r1[i], per_scale[1][i]) else -1
             for i in range(len(boxes))]
    assert -1 not in which and set(which) == {0, 1}
    # The in-memory path gives the same features as the cache.
    mem = conv_maps_for_image(backbone, load_image(record), scales, max_size)
    torch.testing.assert_close(_in_memory(mem, boxes, scale_rule="area", scale_target=target), feats,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="scale"):
        _cached(cache, record, boxes, scale_rule=2)


def test_random_scales_from_one_generator_per_window_do_not_depend_on_the_other_windows():
    # Fine-tuning shares an image's windows out over processes: each window's scale comes from its
    # own generator, so any subset of the windows draws what the whole set draws for them.
    boxes = torch.tensor([[0, 0, 10, 10]] * 12, dtype=torch.float32)
    factors = [0.5, 1.0, 1.5, 2.0]

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    whole = select_scales(boxes, factors, "random", gens(range(12)))
    expected = [int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(s))) for s in range(12)]
    assert whole.tolist() == expected and len(set(expected)) > 1
    assert select_scales(boxes[5:9], factors, "random", gens(range(5, 9))).tolist() == expected[5:9]
    assert select_scales(boxes[:0], factors, "random", []).tolist() == []
    with pytest.raises(ValueError, match="one per window"):
        select_scales(boxes, factors, "random", gens(range(3)))
    with pytest.raises(ValueError, match="one scale per image"):
        select_scales(boxes, factors, "random-image", gens(range(12)))


def test_resume_after_interruption_gives_identical_files(dataset, backbone, base, tmp_path):
    shutil.copytree(base.root, tmp_path / base.root.name)
    part = ConvMapCache.open(tmp_path / base.root.name)
    records = dataset.records
    # Simulate a run killed part-way: the last record has no done marker and a half-written
    # temp file, another has a truncated map file (damaged by something else than this code),
    # and the combined index was never written.
    last = part.record_dir(records[-1].key)
    (last / "done.json").unlink()
    (last / "s0.npy").unlink()
    (last / ".s0.npy.abc123.npy.tmp").write_bytes(b"\x93NUMPY partial")
    damaged = part.map_path(records[0].key, 0)
    damaged.write_bytes(damaged.read_bytes()[:200])
    (part.root / "index.json").unlink()
    reopened = ConvMapCache.open(part.root)
    with pytest.raises(CacheError, match="not in the conv-map cache"):
        reopened.record_info(records[-1].key)
    with pytest.raises(CacheError, match=f"{damaged}: corrupt"):
        _cached(reopened, records[0].key, _random_boxes(records[0], 3, seed=0))
    resumed = _extract(dataset, backbone, tmp_path)
    assert resumed.root == part.root
    assert _files(resumed.root) == _files(base.root)


def test_flipped_byte_or_truncated_map_is_named_and_recomputed(dataset, backbone, base, tmp_path, caplog):
    """A map whose bytes changed after it was written (one flipped byte inside the array data,
    which numpy reads without complaint) or a map cut short (another node's half-written file)
    is refused by name when read, and the next extraction recomputes exactly that record."""
    shutil.copytree(base.root, tmp_path / base.root.name)
    part = ConvMapCache.open(tmp_path / base.root.name)
    records = dataset.records
    flipped, cut = part.map_path(records[0].key, 0), part.map_path(records[1].key, 0)
    data = bytearray(flipped.read_bytes())
    data[len(data) - 7] ^= 0x01  # inside the array: the header and shape stay valid
    flipped.write_bytes(bytes(data))
    data = cut.read_bytes()
    cut.write_bytes(data[:len(data) - 100])
    reopened = ConvMapCache.open(part.root)
    with pytest.raises(CacheError, match=f"{flipped}: conv map is corrupt or torn"):
        reopened.maps(records[0])
    with pytest.raises(CacheError, match=f"{flipped}: conv map is corrupt or torn"):
        reopened.lazy_maps(records[0])[0]
    with pytest.raises(CacheError, match=str(cut)):
        reopened.maps(records[1])
    with caplog.at_level(logging.WARNING):
        resumed = _extract(dataset, backbone, tmp_path)
    assert str(flipped) in caplog.text and str(cut) in caplog.text
    assert _files(resumed.root) == _files(base.root)
    fresh = ConvMapCache.open(resumed.root)
    for r in records[:2]:
        for got, want in zip(fresh.maps(r), base.maps(r)):
            np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_resume_after_sigkill(dataset, tmp_path):
    """A real interrupted process: SIGKILL right after its first record, then resume here.

    The resumed cache must equal an uninterrupted run under the same settings. A conv layer's
    last bits depend on the number of threads it reduces over, so the killed process, the resume
    and the reference all run with this process's thread count, and the reference is made here
    (not taken from a fixture that another module's thread setting may have produced).
    """
    threads = torch.get_num_threads()
    reference = _extract(dataset, build_backbone("zf5", weights=None, seed=0), tmp_path / "reference")
    out = tmp_path / "killed"
    script = f"""
import copy, time, torch
torch.set_num_threads({threads})
from detection.backbones import build_backbone
from detection.boxes import flip_boxes
from detection.data.voc import VOCDataset
from detection import features
full = VOCDataset({str(dataset.root)!r}, {dataset.split!r})
ds = copy.copy(full)
ds.records = full.records[:{NUM_RECORDS}]
orig = features.ConvMapCache.write_record
def slow(self, *a, **k):
    orig(self, *a, **k)
    time.sleep(5.0)   # leave time to be killed between records
features.ConvMapCache.write_record = slow
features.extract_conv_maps(ds, build_backbone("zf5", weights=None, seed=0), {str(out)!r}, scales={SCALES!r},
                           max_size={MAX_SIZE}, num_workers=0, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None \
                and not list(out.glob("convmaps_*/maps/*/done.json")):
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(out.glob("convmaps_*/maps/*/done.json"))) == 1
    assert torch.get_num_threads() == threads
    resumed = _extract(dataset, build_backbone("zf5", weights=None, seed=0), out)
    assert _files(resumed.root) == _files(reference.root)


def test_other_settings_other_folder_and_tampered_meta(dataset, backbone, base, tmp_path):
    # Every setting that changes the maps changes the folder.
    other = {"scales": [80], "max_size": 500, "dtype": "float16", "backbone": "alexnet", "flipped": True,
             "weights_id": build_backbone("zf5", weights=None, seed=1).weights_id,
             "dataset_fingerprint": "x", "split": "test", "records_hash": "y"}
    assert other["weights_id"] != backbone.weights_id
    folders = {ConvMapCache.folder_for(tmp_path, {**base.settings, k: v}) for k, v in other.items()}
    assert len(folders) == len(other) and base.root.name not in {f.name for f in folders}
    fewer = _subset(dataset, NUM_RECORDS - 1)
    fewer_settings = convmap_settings(fewer, backbone, SCALES, MAX_SIZE, False, fewer.records)
    assert ConvMapCache.folder_for(tmp_path, fewer_settings).name != base.root.name
    # Tampered meta.json: settings no longer match the folder's key.
    root = tmp_path / base.root.name
    shutil.copytree(base.root, root)
    meta_path = root / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["settings"]["scales"] = [123]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"scales: cache has \[123\], requested \[96\]"):
        _extract(dataset, backbone, tmp_path)
    with pytest.raises(CacheError, match="folder name"):
        ConvMapCache.open(root)
    # Another format version.
    meta["settings"]["scales"] = list(SCALES)
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="version 99"):
        _extract(dataset, backbone, tmp_path)
    with pytest.raises(CacheError, match="version 99"):
        ConvMapCache.open(root)
    # rebuild=True starts over.
    rebuilt = _extract(dataset, backbone, tmp_path, rebuild=True)
    assert rebuilt.root == root and json.loads(meta_path.read_text())["version"] == CONVMAP_FORMAT_VERSION
    assert _files(rebuilt.root) == _files(base.root)


def test_fp16_halves_the_bytes(dataset, backbone, base, tmp_path):
    f32 = base
    f16 = _extract(dataset, backbone, tmp_path, fp16=True)
    assert f16.root.name != f32.root.name and f16.settings["dtype"] == "float16"
    for record in dataset.records:
        m32, m16 = f32.maps(record)[0], f16.maps(record)[0]
        assert m16.dtype == np.float16 and m16.nbytes * 2 == m32.nbytes
        np.testing.assert_array_equal(m16, m32.astype(np.float16))  # rounded once, nothing else
    npy32 = sum(p.stat().st_size for p in f32.root.rglob("*.npy"))
    npy16 = sum(p.stat().st_size for p in f16.root.rglob("*.npy"))
    header = 128  # np.save's header of a small 3-d array, per file
    assert (npy16 - header * NUM_RECORDS) * 2 == npy32 - header * NUM_RECORDS
    record = dataset.records[0]
    boxes = _random_boxes(record, 10, seed=4)
    torch.testing.assert_close(_cached(f16, record, boxes), _cached(f32, record, boxes),
                               rtol=2e-3, atol=2e-3)


def test_fp16_cache_refuses_maps_beyond_float16_range(dataset, tmp_path):
    big = build_backbone("zf5", weights=None, seed=0)
    last_conv = [m for m in big.trunk.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.weight.mul_(1e6)            # conv5 responses far beyond float16's 65,504
    record = dataset.records[0]
    with pytest.raises(CacheError, match=rf"image {record.key} \(.*{record.path.name}\): the conv map at scale 0 "
                                         r"reaches .* beyond float16's 65504: store float32 maps"):
        _extract(_subset(dataset, 1), big, tmp_path, fp16=True)
    assert not list(tmp_path.glob("convmaps_*/maps/*/done.json")) and not list(tmp_path.rglob("*.npy"))
    f32 = _extract(_subset(dataset, 1), big, tmp_path)          # float32 holds them
    assert float(np.abs(f32.maps(record)[0]).max()) > 65504


def test_cache_refuses_non_finite_maps(dataset, tmp_path):
    broken = build_backbone("zf5", weights=None, seed=0)
    first_conv = next(m for m in broken.trunk.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        first_conv.bias.fill_(float("nan"))   # what a corrupt weights file can hold
    with pytest.raises(CacheError, match="holds NaN or inf values"):
        _extract(_subset(dataset, 1), broken, tmp_path)


def test_flipped_records_get_their_own_conv_pass(dataset, backbone, tmp_path):
    two = _subset(dataset, 2)
    records = cache_records(two, include_flipped=True)
    assert [r.key for r in records] == [r.image_id for r in two.records] + [r.image_id + "_flip" for r in two.records]
    np.testing.assert_array_equal(records[2].boxes, flip_boxes(two.records[0].boxes, two.records[0].width))
    assert cache_records(two, include_flipped=False) == two.records
    cache = _extract(two, backbone, tmp_path, include_flipped=True)
    assert cache.settings["flipped"] and cache.settings["num_records"] == 4
    flipped = records[2]
    np.testing.assert_array_equal(load_image(flipped), load_image(two.records[0])[:, ::-1])
    mem = conv_maps_for_image(backbone, load_image(flipped), SCALES, MAX_SIZE)
    np.testing.assert_allclose(cache.maps(flipped.key)[0], mem.maps[0].numpy(), rtol=0, atol=1e-5)
    # Not simply the mirrored map of the original: the conv pass is not flip-equivariant.
    assert not np.allclose(cache.maps(flipped.key)[0], cache.maps(two.records[0].key)[0][:, :, ::-1], atol=1e-3)
    # A dataset that already has flipped records: they are used as they are (same keys).
    with_flips = VOCDataset(dataset.root, dataset.split, use_flipped=True)
    n = len(with_flips.records) // 2
    sub = copy.copy(with_flips)
    sub.records = with_flips.records[:2] + with_flips.records[n:n + 2]
    assert [r.key for r in cache_records(sub)] == [r.key for r in records]


def test_image_too_small_for_the_trunk_is_a_named_error(backbone, tmp_path):
    # A 2x400 strip capped to a longer side of 8 px resizes to 0x8: no conv map is possible.
    image = np.full((2, 400, 3), 128, np.uint8)
    with pytest.raises(DetectionError, match="smaller"):
        conv_maps_for_image(backbone, image, scales=(2,), max_size=8)
    path = tmp_path / "strip.png"
    cv2.imwrite(str(path), image)
    empty = np.zeros((0, 4), np.float32)
    record = ImageRecord("strip", path, 400, 2, empty, np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool))
    strip_set = types.SimpleNamespace(records=[record], split="strips", fingerprint=lambda: "strip-set")
    with pytest.raises(DetectionError, match="strip.png"):
        extract_conv_maps(strip_set, backbone, tmp_path / "out", scales=(2,), max_size=8, num_workers=0,
                          progress=False)
    assert not list(tmp_path.glob("out/convmaps_*/maps/*/done.json"))  # nothing empty was cached


def test_pooled_window_features_checks_its_inputs(backbone):
    maps = [torch.zeros(backbone.out_channels, 5, 6)]
    with pytest.raises(ValueError, match="scale factors"):
        pooled_window_features(maps, [1.0, 2.0], np.zeros((1, 4)), 16)
    with pytest.raises(ValueError, match="scale_rule"):
        pooled_window_features(maps, [1.0], np.array([[0, 0, 10, 10]]), 16, scale_rule="best")


def test_extract_features_tool(synthetic_voc, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("extract_features", TOOLS / "extract_features.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "run"
    rc = tool.main(["--data", str(synthetic_voc), "--split", "test", "--out", str(out), "--scales", "96",
                    "--max-size", "192", "--workers", "0", "--no-proposals", "--fp16"])
    assert rc == 0
    assert not (out / "proposals").exists()  # (proposals take seconds: test_proposals covers them)
    summary = json.loads((out / "features_summary.json").read_text())
    assert summary["num_images"] == len(VOCDataset(synthetic_voc, "test"))
    assert summary["bytes_on_disk"] > 0 and summary["settings"]["dtype"] == "float16"
    assert Path(summary["cache"]).is_dir()
    rc = tool.main(["--data", str(tmp_path / "missing"), "--split", "trainval", "--out", str(out),
                    "--no-proposals"])
    assert rc == 2 and "error:" in capsys.readouterr().err


def test_training_features_use_the_detectors_scale_rule(dataset, backbone, tmp_path):
    # The cached featurizer (SVM and box-regression training) pools each window at the scale the
    # detector's scale_rule picks, so training and detection see the same features.
    from detection.detector import DetectorSettings
    two = _extract(_subset(dataset, 1), backbone, tmp_path, scales=(160, 320), max_size=1000)
    record = dataset.records[0]
    # Factors 2/3 and 4/3 (240-px shorter side): "code" switches scale at a side of 208 px, "area"
    # at sqrt(2 * 224^2 / (f1^2 + f2^2)) = 212.5 px, so squares of 209-212 px pick differently.
    squares = np.array([[5, 5, 5 + side, 5 + side] for side in range(200, 221)], np.float32)
    boxes = torch.from_numpy(np.concatenate([_random_boxes(record, 20, seed=7), squares]))
    by_rule = {}
    for rule in ("area", "code"):
        settings = DetectorSettings(scales=(160, 320), max_size=1000, levels=(2, 1), scale_rule=rule)
        by_rule[rule] = make_featurizer("spp", settings, cache=two)(record, boxes)
        torch.testing.assert_close(by_rule[rule], _cached(two, record, boxes, levels=(2, 1), scale_rule=rule),
                                   rtol=0, atol=0)
    factors = two.factors(record)
    differ = choose_scale(boxes, factors, rule="area") != choose_scale(boxes, factors, rule="code")
    assert differ.any()                                    # the boxes exercise the difference
    assert not torch.equal(by_rule["area"][differ], by_rule["code"][differ])
