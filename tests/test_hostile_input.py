"""Untrusted files and hostile conditions (issue 17), each built the way an attacker or an unlucky
user would: a model file written by hand, JSON artifacts cut short or nested too deep, paths that
exist but are not regular files, ids with invisible characters or spaces.

In-process tests of the library; the tool runs (subprocesses) are in
``tests/test_tools_hostile.py``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.backbones import build_backbone
from detection.detector import DetectorSettings, SPPDetector
from detection.errors import CacheError, DatasetError, ModelError, StorageError
from detection.evaluation import ClassDetections, read_result_dir, result_file_name, write_result_files
from detection.evaluation.plots import plot_pr_curves
from detection.io.jsonfile import MAX_JSON_DEPTH, parse_json, read_json, write_json
from detection.io.paths import MAX_FILE_PART_BYTES, describe_missing, path_in_folder, safe_file_part
from detection.model import MAX_CLASSES, MODEL_FORMAT, MODEL_VERSION
from detection.proposals import SelectiveSearchConfig
from detection.timing import random_detector

#: Class names built to leave the results folder, or to collide after a careless escaping.
ESCAPING_NAMES = ["../../escaped", "/tmp/absolute_evil", "..", ".", "sub/../../x", "a\\b", "C:evil", "%2F",
                  "a/b", "a%2Fb", "with space", "\u202eexe.txt", "caf\u00e9", "x" * 150]


@pytest.fixture(scope="module")
def model_parts(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a valid tiny model file (ZF-5 trunk, 8-wide fc layers), read
    back the way an attacker starts: from a real file."""
    settings = DetectorSettings(scales=(64,), feature_layer="fc7", proposals=SelectiveSearchConfig(max_boxes=20))
    det = random_detector(build_backbone("zf5"), 2, settings, hidden=(8, 8))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    det.save(path)
    blob = torch.load(path, weights_only=True)
    return blob["tensors"], json.loads(blob["meta"])


def write_model_by_hand(path: Path, tensors: dict, meta: dict | str) -> Path:
    """A model file as an attacker writes it: torch.save of the documented layout, any metadata."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    torch.save({"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": text, "tensors": tensors}, path)
    return path


def hostile_classes_model(path: Path, model_parts, classes: list) -> Path:
    tensors, meta = model_parts
    k = len(classes)
    t = dict(tensors)
    # Per-class tensors resized to the class count (an attacker makes them fit).
    t["svm.weight"] = tensors["svm.weight"][:1].repeat(k, 1)
    t["svm.bias"] = tensors["svm.bias"][:1].repeat(k)
    for name in ("weight", "bias", "target_mean", "target_unwhiten"):
        v = tensors[f"bbox.{name}"]
        t[f"bbox.{name}"] = v[:1].repeat(k, *([1] * (v.dim() - 1)))
    return write_model_by_hand(path, t, dict(meta, classes=classes))


def files_under(folder: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(folder) for f in fs}


# --------------------------------------------------------------------------------------------
# class names from a model file never leave the output folder


def test_class_names_built_to_escape_stay_in_the_results_folder(tmp_path, model_parts):
    path = hostile_classes_model(tmp_path / "evil.pt", model_parts, ESCAPING_NAMES)
    detector = SPPDetector.from_file(path)
    assert detector.classes == tuple(ESCAPING_NAMES)

    work = tmp_path / "work"
    results = work / "deep" / "results"
    dets = [ClassDetections(np.array(["img1"]), np.array([0.5 + k / 100]), np.array([[1.0, 2.0, 30.0, 40.0]]))
            for k in range(len(ESCAPING_NAMES))]
    paths = write_result_files(results, "test", ESCAPING_NAMES, dets)
    assert all(p.parent == results for p in paths)
    assert files_under(work) == set(paths)                     # nothing beside or above results/
    assert len(set(paths)) == len(ESCAPING_NAMES)              # one file per class: no collision
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute_evil.txt").exists()
    back = read_result_dir(results, "test", ESCAPING_NAMES, ["img1"])
    assert [float(d.scores[0]) for d in back] == pytest.approx([float(d.scores[0]) for d in dets])

    metrics = {"metric": "voc10", "AP": {n: 0.5 for n in ESCAPING_NAMES},
               "pr_curves": {n: {"recall": [0.5], "precision": [1.0]} for n in ESCAPING_NAMES}}
    pngs = plot_pr_curves(metrics, work / "plots")
    assert len(set(pngs)) == len(ESCAPING_NAMES) and all(p.parent == work / "plots" for p in pngs)
    assert files_under(work) == set(paths) | set(pngs)


def test_safe_file_part_is_one_to_one_and_keeps_plain_names():
    parts = [safe_file_part(n) for n in ESCAPING_NAMES]
    assert len(set(parts)) == len(parts)
    assert all("/" not in p and "\\" not in p and p not in (".", "..") for p in parts)
    assert safe_file_part("diningtable") == "diningtable"      # devkit names unchanged
    assert result_file_name("test", "../../x") == "comp4_det_test_..%2F..%2Fx.txt"
    # Too long once escaped (300 bytes): the escaped start, "~" and 32 hex digits of its SHA-256.
    long = [safe_file_part("/" * 100), safe_file_part("/" * 101), safe_file_part("x" * 300)]
    assert len(set(long)) == 3 and all(len(p.encode()) <= MAX_FILE_PART_BYTES and "/" not in p for p in long)
    assert long[2] == "x" * (MAX_FILE_PART_BYTES - 33) + "~" + hashlib.sha256(b"x" * 300).hexdigest()[:32]
    assert safe_file_part("a~b") == "a%7Eb"                     # "~" marks only a hashed name
    with pytest.raises(StorageError, match="leave the folder"):
        path_in_folder(Path("out"), "../x.txt")


@pytest.mark.parametrize("classes, needle", [
    (["cat", "dog\nerror: forged line"], "control character"),
    (["cat", "\x1b[2Jdog"], "control character"),
    (["cat", ""], "cannot name a file"),
    (["cat", "d" * 300], "cannot name a file"),
    (["cat", 7], "list of names"),
    ({"cat": 1}, "list of names"),
    ([], "1 to"),
    (["cat", "cat"], "more than once"),
])
def test_class_names_that_cannot_be_used_are_refused(tmp_path, model_parts, classes, needle):
    path = write_model_by_hand(tmp_path / "m.pt", model_parts[0], dict(model_parts[1], classes=classes))
    with pytest.raises(ModelError) as err:
        SPPDetector.from_file(path)
    msg = str(err.value)
    assert needle in msg and "m.pt" in msg and "\n" not in msg and "\x1b" not in msg


def test_too_many_classes_are_refused_before_anything_is_built(tmp_path, model_parts):
    names = [f"c{k}" for k in range(MAX_CLASSES + 1)]
    path = write_model_by_hand(tmp_path / "m.pt", model_parts[0], dict(model_parts[1], classes=names))
    with pytest.raises(ModelError, match=f"{MAX_CLASSES + 1} classes"):
        SPPDetector.from_file(path)


@pytest.mark.parametrize("edit, needle", [
    ({"scales": [100_000]}, "setting scales = 100000"),
    ({"max_size": 10 ** 9}, "setting max_size"),
    ({"proposals": {"max_boxes": 10 ** 9}}, "setting proposals.max_boxes"),
    ({"proposals": {"resize_to": 10 ** 6}}, "setting proposals.resize_to"),
    ({"proposals": {"sigma": 1e12}}, "setting proposals.sigma"),
    ({"rcnn_batch_size": 10 ** 7}, "setting rcnn_batch_size"),
    ({"scales": [64] * 1000}, "setting num_scales"),
    ({"nms_iou": 7.0}, "nms_iou"),
    ({"proposals": {"mode": "../../x"}}, "proposals.mode"),
    # Files written before the settings held every proposal setting: the same bounds.
    ({"proposals": None, "max_proposals": 10 ** 9}, "setting proposals.max_boxes"),
    ({"proposals": None, "proposal_mode": "../../x"}, "proposals.mode"),
    ({"max_proposals": 50}, "max_proposals .* and proposals cannot both be given"),
])
def test_settings_that_size_allocations_are_bounded(tmp_path, model_parts, edit, needle):
    tensors, meta = model_parts
    settings = {k: v for k, v in dict(meta["settings"], **edit).items() if v is not None}
    path = write_model_by_hand(tmp_path / "m.pt", tensors, dict(meta, settings=settings))
    with pytest.raises(ModelError, match=needle):
        SPPDetector.from_file(path)


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "not valid JSON|nested deeper"),   # RecursionError in json
    ('{"a": ' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1), "nested deeper"),
    ('{"classes": ["a"], "settings": {"nms_iou": NaN}}', "not strict JSON"),
    ('{"classes": ["a"], "settin', "truncated JSON"),
])
def test_model_metadata_json_with_limits(tmp_path, model_parts, text, needle):
    path = write_model_by_hand(tmp_path / "m.pt", model_parts[0], text)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=needle) as err:
        SPPDetector.from_file(path)
    assert "m.pt" in str(err.value) and time.perf_counter() - t0 < 5


def test_metadata_that_is_not_text_is_refused(tmp_path, model_parts):
    path = write_model_by_hand(tmp_path / "m.pt", model_parts[0], "{}")
    blob = torch.load(path, weights_only=True)
    blob["meta"] = {"classes": ["a"]}                           # a dict where JSON text belongs
    torch.save(blob, path)
    with pytest.raises(ModelError, match="not JSON text"):
        SPPDetector.from_file(path)


# --------------------------------------------------------------------------------------------
# JSON artifacts of earlier stages


@pytest.mark.parametrize("content, needle", [
    (b'{"cache": "/x/convmaps_1", "images": 1', "truncated JSON"),
    (b"", "truncated JSON"),
    (b'{"a": NaN}', "not strict JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 50 + b"]" * 50, "nested deeper"),
])
def test_damaged_json_artifact_is_one_error_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "features_summary.json"
    path.write_bytes(content)
    with pytest.raises(CacheError, match=needle) as err:
        read_json(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_json_size_limit():
    with pytest.raises(CacheError, match="above the limit"):
        parse_json("[" + "1," * 600 + "1]", "x.json", max_bytes=1000)


def test_paths_that_exist_but_are_not_files_are_not_called_missing(tmp_path):
    (tmp_path / "folder.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "link.json").symlink_to(tmp_path / "gone")
    (tmp_path / "file").write_text("x")
    cases = {"folder.json": "is a folder", "fifo.json": "is a FIFO", "link.json": "broken symbolic link",
             "file/x.json": "a parent folder is a regular file", "nothing.json": "does not exist"}
    for name, needle in cases.items():
        assert needle in describe_missing(tmp_path / name), name
        t0 = time.perf_counter()
        with pytest.raises(CacheError, match=needle):
            read_json(tmp_path / name)                          # never blocks on the FIFO
        assert time.perf_counter() - t0 < 2
    with pytest.raises(ModelError, match="the path is a folder"):
        SPPDetector.from_file(tmp_path / "folder.json")


def test_damaged_stage_book_is_forgotten_not_fatal(tmp_path, caplog):
    from detection.pipeline import StageBook

    (tmp_path / "stages.json").write_text('{"proposals": {"key": "ab')
    stages = StageBook(tmp_path)
    assert stages.state == {} and "stages.json" in caplog.text and "not done" in caplog.text
    stages.mark("proposals", "k", 1.0)
    assert read_json(tmp_path / "stages.json")["proposals"]["key"] == "k"
    write_json(tmp_path / "stages.json", [1, 2])
    assert StageBook(tmp_path).state == {}


# --------------------------------------------------------------------------------------------
# image ids: any character a file name may hold, shown unambiguously


def _dataset_with_id(synthetic_voc: Path, tmp_path: Path, new_id: str, split_text: str | None = None,
                     encoding: str = "utf-8") -> Path:
    """A copy of the synthetic dataset whose trainval split is one image renamed to ``new_id``."""
    import shutil

    root = tmp_path / "voc"
    shutil.copytree(synthetic_voc, root)
    old = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    if new_id:
        (root / "Annotations" / f"{old}.xml").rename(root / "Annotations" / f"{new_id}.xml")
        (root / "JPEGImages" / f"{old}.jpg").rename(root / "JPEGImages" / f"{new_id}.jpg")
    text = split_text if split_text is not None else f"{new_id}\n"
    (root / "ImageSets" / "Main" / "trainval.txt").write_bytes(text.encode(encoding))
    return root


@pytest.mark.parametrize("image_id", ["img..1", "caf\u00e9", "zero\u200bwidth", "-1", "dash-and.dots"])
def test_legal_ids_with_unusual_characters_work(synthetic_voc, tmp_path, image_id):
    from detection.data.voc import VOCDataset

    ds = VOCDataset(_dataset_with_id(synthetic_voc, tmp_path, image_id), "trainval")
    assert [r.image_id for r in ds] == [image_id]


def test_byte_order_mark_is_not_part_of_the_first_id(synthetic_voc, tmp_path):
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\n000002\n", encoding="utf-8-sig")
    assert [r.image_id for r in VOCDataset(root, "trainval")] == ["000001", "000002"]


def test_invisible_character_is_shown_not_reported_as_a_plain_missing_file(synthetic_voc, tmp_path):
    """The split says '000001\\u200b' (copied from a web page), the files are 000001.*: the message
    shows the invisible character instead of naming a file that visibly exists."""
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\u200b\n")
    with pytest.raises(DatasetError) as err:
        VOCDataset(root, "trainval")
    assert "'000001\\u200b.xml' does not exist" in str(err.value)


@pytest.mark.parametrize("image_id", ["my image", "two  spaces", "a b c", "nb\u00a0sp", "dog 1"])
def test_ids_with_whitespace_are_refused_not_cut(synthetic_voc, tmp_path, image_id):
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, image_id)
    with pytest.raises(DatasetError) as err:
        VOCDataset(root, "trainval")
    msg = str(err.value)
    assert "trainval.txt:1" in msg and repr(image_id) in msg and "whitespace" in msg


def test_files_that_exist_but_are_not_regular_files(synthetic_voc, tmp_path):
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\n")
    (root / "JPEGImages" / "000001.jpg").unlink()
    (root / "JPEGImages" / "000001.jpg").mkdir()
    with pytest.raises(DatasetError, match=r"000001\.jpg is a folder"):
        VOCDataset(root, "trainval")
    (root / "JPEGImages" / "000001.jpg").rmdir()
    (root / "JPEGImages" / "000001.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    with pytest.raises(DatasetError, match=r"000001\.jpg is a broken symbolic link"):
        VOCDataset(root, "trainval")
    (root / "ImageSets" / "Main" / "trainval.txt").unlink()
    (root / "ImageSets" / "Main" / "trainval.txt").mkdir()
    with pytest.raises(DatasetError, match=r"trainval\.txt is a folder"):
        VOCDataset(root, "trainval")


# --------------------------------------------------------------------------------------------
# imperfect but decodable images; undecodable ones skipped by choice


def _cut(path: Path, nbytes: int) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])
    return data


@pytest.mark.parametrize("nbytes", [2, 40])
def test_jpeg_a_few_bytes_short_loads_with_a_warning(synthetic_voc, tmp_path, caplog, nbytes):
    """The public-dataset case: a JPEG a few bytes short (viewers show it) loads, naming the file."""
    from detection.data.images import read_image

    path = tmp_path / "short.jpg"
    path.write_bytes((synthetic_voc / "JPEGImages" / "000001.jpg").read_bytes())
    intact = read_image(path)
    _cut(path, nbytes)
    with caplog.at_level("WARNING", logger="detection.data.images"):
        pixels = read_image(path)
    assert pixels.shape == intact.shape and pixels.dtype == np.uint8
    assert "short.jpg: truncated JPEG" in caplog.text
    same_rows = (pixels == intact).all(axis=(1, 2))
    assert same_rows[: intact.shape[0] - 16].all()           # all but the last row of blocks intact


def test_real_photo_a_few_bytes_short(shared_dir, tmp_path, caplog):
    from detection.data.images import read_image

    src = sorted((shared_dir / "data" / "raccoon" / "JPEGImages").glob("*.jpg"))[5]
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[:-5])
    with caplog.at_level("WARNING", logger="detection.data.images"):
        pixels = read_image(path)
    intact = read_image(src)
    assert "the last 8 of its" in caplog.text and src.name in caplog.text
    np.testing.assert_array_equal(pixels[:-8], intact[:-8])


def test_jpeg_cut_in_half_is_an_error_or_skipped(synthetic_voc, tmp_path, caplog):
    from detection.data.images import read_image
    from detection.data.voc import VOCDataset, report_images

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\n000002\n000003\n000004\n")
    images = root / "JPEGImages"
    data = (images / "000001.jpg").read_bytes()
    (images / "000001.jpg").write_bytes(data[: len(data) // 2])        # undecodable: half is missing
    (images / "000002.jpg").write_bytes(b"\x00" * 3000)                 # not an image at all
    _cut(images / "000003.jpg", 3)                                      # a few bytes short: used
    with pytest.raises(DatasetError, match=r"000001\.jpg: truncated JPEG, \d+ of its 240 rows"):
        read_image(images / "000001.jpg")
    with pytest.raises(DatasetError, match=r"000002\.jpg"):
        VOCDataset(root, "trainval")                                    # default: an error naming it
    with caplog.at_level("WARNING", logger="detection.data.voc"):
        ds = VOCDataset(root, "trainval", skip_bad=True)
        lines = report_images(ds)
    assert [r.image_id for r in ds] == ["000003", "000004"]
    assert set(ds.skipped) == {"000001", "000002"} and set(ds.imperfect) == {"000003"}
    assert len(lines) == 2 and "1 image(s) imperfect but used" in lines[0] and "000003.jpg" in lines[0]
    assert "2 image(s) skipped" in lines[1] and "000001.jpg" in lines[1] and "000002.jpg" in lines[1]
    assert ds.fingerprint() != VOCDataset(_dataset_with_id(synthetic_voc, tmp_path / "b", "",
                                                           split_text="000003\n000004\n"), "trainval").fingerprint()


def test_every_image_undecodable_is_one_error(synthetic_voc, tmp_path):
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\n")
    (root / "JPEGImages" / "000001.jpg").write_bytes(b"junk" * 100)
    with pytest.raises(DatasetError, match="none of its 1 images can be decoded"):
        VOCDataset(root, "trainval", skip_bad=True)


def test_wrong_suffix_and_odd_colour_modes_are_reported_and_read(synthetic_voc, tmp_path):
    from PIL import Image

    from detection.data.images import load_image
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\n000002\n000003\n")
    images = root / "JPEGImages"
    with Image.open(images / "000001.jpg") as im:
        im.save(images / "000001.jpg", format="PNG")                        # a PNG named .jpg
    with Image.open(images / "000002.jpg") as im:
        im.convert("P").save(images / "000002.jpg", format="PNG")           # palette, and a PNG
    with Image.open(images / "000003.jpg") as im:
        im.convert("CMYK").save(images / "000003.jpg", format="JPEG")       # CMYK JPEG
    ds = VOCDataset(root, "trainval")
    assert "a PNG file named .jpg" in ds.imperfect["000001"]
    assert "colour mode P" in ds.imperfect["000002"] and "colour mode CMYK" in ds.imperfect["000003"]
    assert all(load_image(r).shape == (240, 320, 3) for r in ds)


@pytest.mark.parametrize("name", ["ca\tt", "d" * 300])
def test_class_names_a_model_could_not_hold_are_refused_when_the_dataset_is_read(synthetic_voc, tmp_path, name):
    """Refused before training, not when the trained model is loaded."""
    from detection.data.voc import VOCDataset

    root = _dataset_with_id(synthetic_voc, tmp_path, "", split_text="000001\n")
    for xml in ("000001.xml", "000002.xml"):      # the split's own annotation, and another one
        path = root / "Annotations" / xml
        text = path.read_text()
        start = text.index("<name>") + len("<name>")
        path.write_text(text[:start] + name + text[text.index("</name>", start):])
        with pytest.raises(DatasetError) as err:
            VOCDataset(root, "trainval")
        assert "Annotations" in str(err.value) and "class name" in str(err.value)
        path.write_text(text)


def test_weights_and_results_paths_that_are_not_what_they_should_be(tmp_path):
    from detection.evaluation import read_result_dir

    os.mkfifo(tmp_path / "w.pth")
    (tmp_path / "wdir.pth").mkdir()
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="w.pth for zf5 is a FIFO"):
        build_backbone("zf5", weights=tmp_path / "w.pth")          # torch.load would block forever
    with pytest.raises(ModelError, match="wdir.pth for zf5 is a folder"):
        build_backbone("zf5", weights=tmp_path / "wdir.pth")
    assert time.perf_counter() - t0 < 20
    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(DatasetError, match="results folder is not a folder"):
        read_result_dir(tmp_path / "results", "test", ["a"], ["img"])
    with pytest.raises(DatasetError, match="results folder does not exist"):
        read_result_dir(tmp_path / "nothing", "test", ["a"], ["img"])


@pytest.mark.parametrize("metadata, needle", [("[" * 100_000 + "]" * 100_000, "not valid JSON"),
                                              ('{"format_version": 1, "sett', "truncated JSON"),
                                              ("[" * 40 + "]" * 40, "nested deeper")])
def test_proposal_cache_metadata_is_parsed_with_limits(tmp_path, metadata, needle):
    from detection.io.files import atomic_save_npz
    from detection.proposals import ProposalSet

    path = tmp_path / "p.npz"
    atomic_save_npz(path, image_ids=np.array(["a"]), boxes=np.zeros((1, 4), np.float32),
                    offsets=np.array([0, 1], np.int64), metadata=np.array(metadata))
    with pytest.raises(CacheError, match=needle) as err:
        ProposalSet.load(path)
    assert str(err.value).startswith(f"{path}: metadata")
