"""Every tool, run as the user runs it (a subprocess), on a copy of the synthetic dataset with
exactly one thing broken: the tool exits with status 2 and one ``error:`` line on stderr that
names the broken image (or file, or says the image set is empty), and never prints a traceback.
The files real datasets get wrong but that are fine (a PNG named .jpg, a greyscale JPEG, an XML
saying 0x0) just work.

Cost control: every bad case runs against one cheap tool (compute_proposals.py, in-process
selective search on two images), and every tool runs against two cases -- one caught while the
dataset is read (random bytes instead of a JPEG) and one caught only when the pixels are decoded
(a truncated JPEG). Splits are cut to two images so the reading step comes within seconds. The
tool runs (their start-up dominates) are all started by one fixture, two at a time with one
thread each, and each test checks its run's outcome.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.backbones import build_backbone
from detection.data.voc import VOCDataset
from detection.detector import DetectorSettings, SPPDetector
from detection.features import CONVMAP_FORMAT_VERSION, ConvMapCache
from detection.io.jsonfile import write_json
from detection.proposals import SelectiveSearchConfig
from detection.timing import random_detector

# Every test reads the outcome of tool runs in subprocesses (the module fixture runs): the slow
# tier (-m slow, or -m "" for every tier).
pytestmark = pytest.mark.slow

TOOLS = Path(__file__).resolve().parents[1] / "tools"


# Two tools run at a time: one thread each, or torch starts a thread per core in both.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / tool), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=CHILD_ENV)


def assert_refused(proc: subprocess.CompletedProcess, needle: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line and it contains ``needle``."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert needle in errors[0], errors[0]
    return errors[0]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr


# --------------------------------------------------------------------------------------------
# the dataset and the ways to break it


@pytest.fixture(scope="module")
def base(synthetic_voc, tmp_path_factory) -> Path:
    """The synthetic dataset with both splits cut to their first two images."""
    root = tmp_path_factory.mktemp("bad_input") / "voc"
    shutil.copytree(synthetic_voc, root)
    for split in ("trainval", "test"):
        f = root / "ImageSets" / "Main" / f"{split}.txt"
        f.write_text("\n".join(f.read_text().split()[:2]) + "\n")
    return root


def first_id(root: Path, split: str) -> str:
    return (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]


def _edit_xml(root: Path, image_id: str, old_tag: str, new_text: str) -> None:
    """Replace the text of the first ``<old_tag>`` element."""
    path = root / "Annotations" / f"{image_id}.xml"
    xml = path.read_text()
    start = xml.index(f"<{old_tag}>") + len(old_tag) + 2
    end = xml.index(f"</{old_tag}>", start)
    path.write_text(xml[:start] + new_text + xml[end:])


def _xml_value(root: Path, image_id: str, tag: str) -> str:
    xml = (root / "Annotations" / f"{image_id}.xml").read_text()
    start = xml.index(f"<{tag}>") + len(tag) + 2
    return xml[start:xml.index(f"</{tag}>", start)]


def truncated_jpeg(root, i):
    p = root / "JPEGImages" / f"{i}.jpg"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])   # header intact: fails on decoding
    return f"{i}.jpg"


def random_bytes(root, i):
    (root / "JPEGImages" / f"{i}.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    return f"{i}.jpg"


def missing_file(root, i):
    (root / "JPEGImages" / f"{i}.jpg").unlink()
    return f"{i}.jpg"


def malformed_xml(root, i):
    p = root / "Annotations" / f"{i}.xml"
    p.write_text(p.read_text()[:-40])
    return f"{i}.xml"


def non_numeric_box(root, i):
    _edit_xml(root, i, "xmin", "12px")
    return f"{i}.xml"


def inverted_box(root, i):
    _edit_xml(root, i, "xmin", str(float(_xml_value(root, i, "xmax")) + 5))
    return f"{i}.xml"


def id_outside_the_dataset(root, i):
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(f"{i}\n../../etc/passwd\n")
    return "'../../etc/passwd'"


def empty_image_set(root, i):
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n")
    return "lists no images"


BAD_CASES = [truncated_jpeg, random_bytes, missing_file, malformed_xml, non_numeric_box, inverted_box,
             id_outside_the_dataset, empty_image_set]


def broken(base: Path, tmp_path: Path, case, split: str = "trainval") -> tuple[Path, str]:
    """A copy of ``base`` with ``case`` applied to the first image of ``split``; returns the
    copy and what the error message must contain."""
    root = tmp_path / "data"
    shutil.copytree(base, root)
    return root, case(root, first_id(root, split))


# --------------------------------------------------------------------------------------------
# the tool runs


@pytest.fixture(scope="module")
def tiny_model(base, tmp_path_factory) -> Path:
    """A random detector for the dataset's classes (ZF-5 trunk, 8-wide fc layers, one small
    scale): what demo.py and eval_voc.py --model need to reach the images."""
    classes = VOCDataset(base, "test").classes
    settings = DetectorSettings(scales=(96,), feature_layer="fc7", proposals=SelectiveSearchConfig(max_boxes=50))
    det = random_detector(build_backbone("zf5"), len(classes), settings, hidden=(8, 8))
    det = SPPDetector(det.backbone, det.head, det.svms, det.regressors, classes, settings)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    det.save(path)
    return path


def _features_for(root: Path, out: Path, fingerprint: str = "") -> Path:
    """The --features folder train_svm.py opens before it reads the dataset: a conv-map cache
    (its meta.json only) and features_summary.json pointing to it."""
    cache = ConvMapCache.create(out, {"format_version": CONVMAP_FORMAT_VERSION, "flipped": False, "split": "trainval",
                                      "dataset_fingerprint": fingerprint, "backbone": "zf5", "weights_id": "random:0"})
    write_json(out / "features_summary.json", {"cache": str(cache.root)})
    return out


TOOL_RUNS = {
    "extract_features": lambda root, tmp, model: (
        "extract_features.py", "--data", root, "--split", "trainval", "--out", tmp / "feat", "--scales", "64",
        "--workers", "0"),
    "train_svm": lambda root, tmp, model: (
        "train_svm.py", "--data", root, "--split", "trainval", "--features", _features_for(root, tmp / "feat"),
        "--out", tmp / "model.pt", "--workers", "1"),
    "eval_voc_results": lambda root, tmp, model: (
        "eval_voc.py", "--data", root, "--split", "trainval", "--results", tmp, "--out", tmp / "m.json"),
    "eval_voc_model": lambda root, tmp, model: (
        "eval_voc.py", "--data", root, "--split", "trainval", "--model", model, "--out", tmp / "eval" / "m.json",
        "--quiet"),
    "run_pipeline": lambda root, tmp, model: (
        "run_pipeline.py", "--data", root, "--out", tmp / "run", "--quiet", "--set", "proposal_workers=1"),
    "compare_rcnn": lambda root, tmp, model: (
        "compare_rcnn.py", "--data", root, "--split", "trainval", "--num-images", "1", "--out", tmp / "t.json"),
    "demo": lambda root, tmp, model: (
        "demo.py", "--model", model, "--images", root / "JPEGImages" / f"{first_id(root, 'trainval')}.jpg",
        "--out", tmp / "demo"),
}

# The decoding step is where a truncated JPEG is caught; eval_voc --results never decodes (it
# only needs image sizes: exit 0 is right), and train_svm's conv-map cache cannot exist for an
# image that does not decode (a file truncated afterwards changes the dataset fingerprint, and
# train_svm says the cache was made for another dataset). eval_voc --model decodes in a pool of
# selective-search workers (15 s of start-up here) through the same compute_proposals as the
# tools above, so it is left out to keep this file near two minutes.
DECODING_TOOLS = [t for t in TOOL_RUNS if t not in ("eval_voc_results", "train_svm", "eval_voc_model")]


def _fine_dataset(base: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A PNG named .jpg and a greyscale JPEG (the training images), an XML saying 0x0 (the
    first test image)."""
    root = tmp / "data"
    shutil.copytree(base, root)
    a, b = (root / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    with Image.open(root / "JPEGImages" / f"{a}.jpg") as im:
        im.save(root / "JPEGImages" / f"{a}.jpg", format="PNG")
    with Image.open(root / "JPEGImages" / f"{b}.jpg") as im:
        im.convert("L").save(root / "JPEGImages" / f"{b}.jpg", format="JPEG")
    t = first_id(root, "test")
    _edit_xml(root, t, "width", "0")
    _edit_xml(root, t, "height", "0")
    return root, [a, b]


def _jobs(base: Path, tmp_path_factory, model: Path) -> dict[str, tuple[tuple, str | None]]:
    """name -> (tool command, what its error line must contain; None: it must succeed)."""
    jobs = {}
    for case in BAD_CASES:
        tmp = tmp_path_factory.mktemp(case.__name__)
        root, needle = broken(base, tmp, case)
        jobs[f"compute_proposals/{case.__name__}"] = (
            ("compute_proposals.py", "--data", root, "--split", "trainval", "--out", tmp / "props",
             "--workers", "1", "--no-progress"), needle)
    for case, tools in ((random_bytes, list(TOOL_RUNS)), (truncated_jpeg, DECODING_TOOLS)):
        for tool in tools:
            tmp = tmp_path_factory.mktemp(tool)
            root, needle = broken(base, tmp, case)
            jobs[f"{tool}/{case.__name__}"] = (TOOL_RUNS[tool](root, tmp, model), needle)
    tmp = tmp_path_factory.mktemp("missing")
    jobs["demo/missing_file"] = (("demo.py", "--model", model, "--images", tmp / "nosuch.jpg", "--out", tmp / "demo"),
                                 "nosuch.jpg")
    tmp = tmp_path_factory.mktemp("fine")
    root, ids = _fine_dataset(base, tmp)
    (tmp / "results").mkdir()
    jobs["fine/compute_proposals"] = (("compute_proposals.py", "--data", root, "--split", "trainval", "--out",
                                       tmp / "props", "--workers", "1", "--no-progress"), None)
    jobs["fine/eval_voc"] = (("eval_voc.py", "--data", root, "--split", "test", "--results", tmp / "results",
                              "--out", tmp / "metrics.json", "--quiet"), None)
    jobs["fine/demo"] = (("demo.py", "--model", model, "--images", *(root / "JPEGImages" / f"{i}.jpg" for i in ids),
                          "--out", tmp / "demo", "--quiet"), None)
    return jobs


@pytest.fixture(scope="module")
def runs(base, tiny_model, tmp_path_factory):
    """Every tool run of this file, started at once, two at a time (slowest first): name ->
    (future of the CompletedProcess, needle)."""
    jobs = _jobs(base, tmp_path_factory, tiny_model)
    order = sorted(jobs, key=lambda n: not n.startswith(("fine", "run_pipeline", "eval_voc_model")))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        yield {name: (pool.submit(run_tool, *jobs[name][0]), jobs[name][1]) for name in order}


def outcome(runs, name: str) -> tuple[subprocess.CompletedProcess, str | None]:
    future, needle = runs[name]
    return future.result(), needle


# --------------------------------------------------------------------------------------------
# every bad case against one tool; every tool against an unreadable and a truncated image


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.__name__)
def test_compute_proposals_names_the_bad_input(runs, case):
    assert_refused(*outcome(runs, f"compute_proposals/{case.__name__}"))


@pytest.mark.parametrize("tool", sorted(TOOL_RUNS))
def test_every_tool_names_an_unreadable_image(runs, tool):
    assert_refused(*outcome(runs, f"{tool}/random_bytes"))


@pytest.mark.parametrize("tool", DECODING_TOOLS)
def test_every_tool_names_a_truncated_image(runs, tool):
    assert_refused(*outcome(runs, f"{tool}/truncated_jpeg"))


def test_demo_names_a_missing_image(runs):
    assert_refused(*outcome(runs, "demo/missing_file"))


@pytest.mark.parametrize("tool", ["compute_proposals", "eval_voc", "demo"])
def test_files_real_datasets_get_wrong_but_are_fine(runs, tool):
    """A PNG named .jpg, a greyscale JPEG and an XML saying 0x0: every tool that reads them works."""
    proc, _ = outcome(runs, f"fine/{tool}")
    assert_ok(proc)
    if tool == "demo":
        assert proc.stdout.count("_det.png") == 2
