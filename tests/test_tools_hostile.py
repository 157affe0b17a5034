"""Tools run as the user runs them (subprocesses) against hostile files and conditions (issue 17):
a model file whose class names are built to escape the output folder, a truncated JSON artifact,
a file name of 300 characters, a folder or FIFO where an image belongs, a JPEG a few bytes short,
undecodable images with --skip-bad, and Ctrl-C sent to the whole process group.

Every run: no traceback, never a write outside its output folder, and either exit 0 or exit 2
with one ``error:`` line naming the file (130 after Ctrl-C). The runs are started by one fixture,
two at a time with one thread each (as tests/test_tools_bad_input.py does); the Ctrl-C test runs
alone, since it waits for the first finished image before it sends the signal.
"""
from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detection.backbones import build_backbone
from detection.detector import DetectorSettings, SPPDetector
from detection.model import MODEL_FORMAT, MODEL_VERSION
from detection.proposals import SelectiveSearchConfig
from detection.timing import random_detector

# Every test reads the outcome of tool runs in subprocesses (the module fixture runs): the slow
# tier (-m slow, or -m "" for every tier).
pytestmark = pytest.mark.slow

TOOLS = Path(__file__).resolve().parents[1] / "tools"
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
ESCAPING = ["../../escaped", "/tmp/absolute_evil_17", "..", "sub/../../x", "a\\b"]


def tool_cmd(tool: str, *args) -> list[str]:
    return [sys.executable, str(TOOLS / tool), *map(str, args)]


def run(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(tool_cmd(tool, *args), capture_output=True, text=True, timeout=300, env=CHILD_ENV)


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr


def files_under(folder: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(folder) for f in fs}


# --------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def base(synthetic_voc, tmp_path_factory) -> Path:
    """The synthetic dataset, trainval cut to two images (test: its first)."""
    root = tmp_path_factory.mktemp("hostile") / "voc"
    shutil.copytree(synthetic_voc, root)
    for split, n in (("trainval", 2), ("test", 1)):
        f = root / "ImageSets" / "Main" / f"{split}.txt"
        f.write_text("\n".join(f.read_text().split()[:n]) + "\n")
    return root


def copy_of(base: Path, dest: Path) -> tuple[Path, list[str]]:
    shutil.copytree(base, dest)
    return dest, (dest / "ImageSets" / "Main" / "trainval.txt").read_text().split()


@pytest.fixture(scope="module")
def escaping_model(base, tmp_path_factory) -> Path:
    """A model file written by hand: a valid tiny detector whose class names climb out of any folder."""
    settings = DetectorSettings(scales=(64,), feature_layer="fc7", proposals=SelectiveSearchConfig(max_boxes=20))
    det = random_detector(build_backbone("zf5"), len(ESCAPING), settings, hidden=(8, 8))
    det = SPPDetector(det.backbone, det.head, det.svms, det.regressors, ESCAPING, settings)
    folder = tmp_path_factory.mktemp("evil_model")
    det.save(folder / "clean.pt")
    blob = torch.load(folder / "clean.pt", weights_only=True)
    meta = json.loads(blob["meta"])
    assert meta["classes"] == ESCAPING
    meta["svm"]["untrained"] = [ESCAPING[1]]         # as if it had no positives in training
    torch.save({"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": json.dumps(meta),
                "tensors": blob["tensors"]}, folder / "evil.pt")
    return folder / "evil.pt"


def _jobs(base: Path, model: Path, tmp) -> dict[str, tuple[list[str], Path]]:
    """name -> (command, the folder it may write in)."""
    jobs = {}
    w = tmp("escape")
    jobs["eval_voc_escaping_model"] = (tool_cmd("eval_voc.py", "--data", base, "--split", "test", "--model", model,
                                                "--results", w / "out" / "results", "--out", w / "out" / "m.json",
                                                "--quiet"), w / "out")
    w = tmp("json")
    (w / "feat").mkdir()
    (w / "feat" / "features_summary.json").write_text('{"cache": "' + str(w / "feat" / "convmaps_0"))
    jobs["train_svm_truncated_json"] = (tool_cmd("train_svm.py", "--data", base, "--split", "trainval", "--features",
                                                 w / "feat", "--out", w / "model.pt"), w)
    w = tmp("long")
    jobs["compute_proposals_long_name"] = (tool_cmd("compute_proposals.py", "--data", base, "--split", "trainval",
                                                    "--out", w / ("o" * 300), "--workers", "1", "--no-progress"), w)
    w = tmp("deep")
    deep = w.joinpath(*["d" * 60] * 6)            # a 360-character path of legal names: works
    (deep / "results").mkdir(parents=True)
    jobs["eval_voc_deep_path"] = (tool_cmd("eval_voc.py", "--data", base, "--split", "test", "--results",
                                           deep / "results", "--out", deep / "m.json", "--quiet"), w)
    w = tmp("notfile")
    (w / "folder.jpg").mkdir()
    os.mkfifo(w / "fifo.jpg")
    jobs["demo_folder_image"] = (tool_cmd("demo.py", "--model", model, "--images", w / "folder.jpg", "--out",
                                          w / "demo"), w)
    jobs["demo_fifo_image"] = (tool_cmd("demo.py", "--model", model, "--images", w / "fifo.jpg", "--out",
                                        w / "demo"), w)
    jobs["eval_voc_model_is_a_folder"] = (tool_cmd("eval_voc.py", "--data", base, "--split", "test", "--model",
                                                   w / "folder.jpg", "--out", w / "m.json"), w)
    w = tmp("short")
    root, ids = copy_of(base, w / "voc")
    img = root / "JPEGImages" / f"{ids[0]}.jpg"
    img.write_bytes(img.read_bytes()[:-20])
    # Two workers: the warning comes from a worker process, in the tools' format.
    jobs["compute_proposals_short_jpeg"] = (tool_cmd("compute_proposals.py", "--data", root, "--split", "trainval",
                                                     "--out", w / "props", "--workers", "2", "--no-progress"), w)
    w = tmp("skip")
    root, ids = copy_of(base, w / "voc")
    img = root / "JPEGImages" / f"{ids[0]}.jpg"
    img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    jobs["compute_proposals_skip_bad"] = (tool_cmd("compute_proposals.py", "--data", root, "--split", "trainval",
                                                   "--out", w / "props", "--workers", "1", "--no-progress",
                                                   "--skip-bad"), w)
    w = tmp("zw")
    root, ids = copy_of(base, w / "voc")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(f"{ids[0]}\u200b\n")
    jobs["compute_proposals_invisible_id"] = (tool_cmd("compute_proposals.py", "--data", root, "--split", "trainval",
                                                       "--out", w / "props", "--workers", "1"), w)
    return jobs


@pytest.fixture(scope="module")
def runs(base, escaping_model, tmp_path_factory):
    jobs = _jobs(base, escaping_model, tmp_path_factory.mktemp)
    # The world outside the allowed folders: the pytest temporary root and /tmp's top level.
    watched = [Path(tmp_path_factory.getbasetemp()), Path("/tmp")]
    before = {w: set(os.listdir(w)) for w in watched}
    order = sorted(jobs, key=lambda n: not n.startswith("eval_voc_escaping"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(subprocess.run, jobs[name][0], capture_output=True, text=True, timeout=300,
                                     env=CHILD_ENV) for name in order}
        results = {name: f.result() for name, f in futures.items()}
    after = {w: set(os.listdir(w)) for w in watched}
    yield results, {name: jobs[name][1] for name in jobs}, before, after


def test_model_class_names_never_write_outside_the_output_folder(runs, base, escaping_model):
    results, folders, before, after = runs
    proc = results["eval_voc_escaping_model"]
    assert_ok(proc)
    out = folders["eval_voc_escaping_model"]
    written = files_under(out.parent)
    assert all(out in p.parents for p in written), written
    names = {p.name for p in (out / "results").iterdir()}
    assert "comp4_det_test_..%2F..%2Fescaped.txt" in names and "comp4_det_test_%2Ftmp%2Fabsolute_evil_17.txt" in names
    assert len([n for n in names if n.startswith("comp4_det_test_")]) == len(ESCAPING)
    assert not Path("/tmp/absolute_evil_17.txt").exists()
    # The untrained class is marked in the table and in metrics.json.
    assert any(line.startswith(ESCAPING[1]) and "(untrained" in line for line in proc.stdout.splitlines()), proc.stdout
    assert json.loads((out / "m.json").read_text())["untrained_classes"] == [ESCAPING[1]]
    # Nothing new next to the dataset, the model, or at the top of the temporary folders.
    new_in_tmp = {n for n in after[Path("/tmp")] - before[Path("/tmp")] if "escaped" in n or "evil" in n}
    assert not new_in_tmp
    assert not list(base.parent.glob("*escaped*")) and not list(escaping_model.parent.glob("*escaped*"))


def test_truncated_json_artifact_is_one_line(runs):
    assert_refused(runs[0]["train_svm_truncated_json"], "features_summary.json", "truncated JSON")


def test_file_name_of_300_characters_is_one_line(runs):
    line = assert_refused(runs[0]["compute_proposals_long_name"], "File name too long")
    # The path named, shortened to its two ends with its length.
    assert "long0/ooo" in line and "characters): File name too long" in line and len(line) < 300


def test_path_of_360_characters_works(runs):
    assert_ok(runs[0]["eval_voc_deep_path"])


@pytest.mark.parametrize("name, needle", [("demo_folder_image", "folder.jpg is a folder"),
                                          ("demo_fifo_image", "fifo.jpg is a FIFO"),
                                          ("eval_voc_model_is_a_folder", "the path is a folder")])
def test_paths_that_exist_are_never_called_missing(runs, name, needle):
    line = assert_refused(runs[0][name], needle)
    assert "does not exist" not in line or "as a file" in line


def test_jpeg_a_few_bytes_short_is_used_with_a_warning_and_a_summary(runs):
    proc = runs[0]["compute_proposals_short_jpeg"]
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert any("WARNING detection.data.images: " in line and ".jpg: truncated JPEG: the last 8 of its 240 rows" in line
               for line in warnings), proc.stderr[-2000:]
    assert "summary:" in warnings[-1] and "imperfect but used" in warnings[-1]


def test_skip_bad_leaves_an_undecodable_image_out_and_says_so_at_the_end(runs):
    proc = runs[0]["compute_proposals_skip_bad"]
    assert_ok(proc)
    last = [line for line in proc.stderr.splitlines() if "WARNING" in line][-1]
    assert "summary:" in last and "1 image(s) skipped (--skip-bad)" in last and "truncated JPEG" in last


def test_invisible_character_in_an_id_is_shown(runs):
    assert_refused(runs[0]["compute_proposals_invisible_id"], "\\u200b", "does not exist")


# --------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.fixture(scope="module")
def many_images(synthetic_voc, tmp_path_factory) -> Path:
    """Twenty images, so that a run is still busy when the first one is done."""
    from detection.data.synthetic import make_synthetic_voc

    return make_synthetic_voc(tmp_path_factory.mktemp("many") / "voc", num_trainval=20, num_test=1, seed=3)


#: Runs a command with SIGINT at its default action. A process started in the background by a
#: non-interactive shell (``pytest ... &``, nohup) inherits SIGINT ignored, and Python then
#: installs no KeyboardInterrupt handler: the tool would rightly ignore the Ctrl-C below.
WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execv(sys.argv[1], sys.argv[1:])"]


def test_ctrl_c_to_the_process_group_stops_cleanly_and_the_rerun_resumes(many_images, tmp_path):
    out = tmp_path / "props"
    cmd = WITH_DEFAULT_SIGINT + tool_cmd("compute_proposals.py", "--data", many_images, "--split", "trainval",
                                         "--out", out, "--workers", "2", "--no-progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not glob.glob(str(out / "*.shards" / "*.npy")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the first image was done"
    os.killpg(proc.pid, signal.SIGINT)          # what a terminal's Ctrl-C does: the whole group
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted: finished work is kept" in err, err[-3000:]
    assert not list(out.glob("*.npz")) and not list(out.glob("**/.*.tmp"))   # nothing half-written
    done = len(glob.glob(str(out / "*.shards" / "*.npy")))
    rerun = run("compute_proposals.py", "--data", many_images, "--split", "trainval", "--out", out, "--workers", "1",
                "--no-progress")
    assert_ok(rerun)
    assert f"{done} done" in rerun.stderr and (out / "summary.json").is_file()
