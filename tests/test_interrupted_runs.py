"""Reliability (issue 8, parts 1 and 2): interrupted runs and a hostile environment.

Part 1. Every stage runs as a subprocess (the real tool, ``--workers 0``) on the tiny synthetic
dataset, is killed with SIGKILL at five points, is rerun to completion, and its artifacts must
equal those of an uninterrupted run:

    stage        tool                                      kill points (then a seeded delay)
    proposals    compute_proposals.py                      shard 1, 2, 3, 5, 6 of 8 written
    conv maps    extract_features.py --no-proposals        meta.json, record 2, 4, 5, 6 of 8 done
    training     train_svm.py --finetune 24                checkpoint 4, 12, 20; SVMs; box regressors
    evaluation   eval_voc.py --model                       detection start, image 1..3, results written

A kill point is a sign of progress the stage leaves (a file, a checkpoint's iteration, a line on
stderr); after it the harness sleeps a seeded-random 5-60 % of the time the uninterrupted run
took from that point to the next one, so the kills spread over the whole stage (its duration is
measured in the reference run; not more than 60 %: a run can be faster than the reference, which
shared the machine with another, and must still be killed). After every kill, every artifact under its final name must read
completely (no partial file is ever trusted); after the final run no temporary file may be left.

"Identical" is byte-identical, except these JSON files, which legitimately hold a wall time or
the path of their own output folder and are compared with those keys dropped / the folder
replaced: proposals ``summary.json`` (``seconds``, ``images_per_second``), the conv-map
``meta.json`` (``created``), ``features_summary.json`` (``seconds``; ``cache`` is a path) and
``metrics.json`` (``results_dir`` is a path).

Part 2. Disk full (``RLIMIT_FSIZE`` in the child, SIGXFSZ ignored: writes past the limit fail with
EFBIG as they would with ENOSPC), an output path under a regular file (we run as root, so a
chmod would not stop a write), and caches / model files of another version or other settings:
the tool must exit 2 with one ``error: ...`` line naming the file, no traceback, and every file
written before must be left as it was.

The stages' tools run two at a time, one thread each (the file takes about half the time);
set SPP_KILL_SEED to draw other delays (default 0).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from detection.features import CONVMAP_FORMAT_VERSION, ConvMapCache

# Tools killed and resumed in subprocesses: the slow tier (-m slow, or -m "" for every tier).
pytestmark = pytest.mark.slow

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SEED = int(os.environ.get("SPP_KILL_SEED", "0"))
TIMEOUT = 300  # seconds any one tool run may take before the test fails
# Tools run two at a time here, each on one thread (torch would otherwise start a thread per
# core in each, and the two would fight over a 2-core machine).
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# ------------------------------------------------------------------------------------------------
# Running, watching and killing a tool
# ------------------------------------------------------------------------------------------------

def tool(name: str, *args: object) -> list[str]:
    return [sys.executable, str(TOOLS / name), *map(str, args)]


def is_temp(path: Path) -> bool:
    """A temporary file of detection.io.files.atomic_path: never read by anything."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def artifacts(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of the files under ``root`` that are not temporary, minus ``skip`` prefixes."""
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not is_temp(p) and not rel.startswith(skip):
            out.append(rel)
    return sorted(out)


@dataclasses.dataclass
class Trigger:
    """A kill point: a sign of progress that, once seen, stays seen."""

    name: str
    files: tuple[str, int] | None = None       # (glob under the output folder, at least this many)
    checkpoint: tuple[str, int] | None = None  # (file under the output folder, iteration >= this)
    log: str | None = None                     # regex on the run's stderr

    def seen(self, out: Path, stderr: str) -> bool:
        if self.files:
            pattern, n = self.files
            return sum(1 for p in out.glob(pattern) if not is_temp(p)) >= n
        if self.checkpoint:
            name, it = self.checkpoint
            return _checkpoint_iteration(out / name) >= it
        return re.search(self.log, stderr) is not None


_ckpt_cache: dict[Path, tuple[tuple[int, int], int]] = {}


def _checkpoint_iteration(path: Path) -> int:
    """The iteration a fine-tuning checkpoint was saved at (0: none), loaded once per version."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    stamp = (st.st_mtime_ns, st.st_size)
    if path in _ckpt_cache and _ckpt_cache[path][0] == stamp:
        return _ckpt_cache[path][1]
    # The file is replaced atomically, so it always loads completely.
    it = int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])
    _ckpt_cache[path] = (stamp, it)
    return it


@dataclasses.dataclass
class Run:
    returncode: int
    stderr: str
    seconds: float
    seen_at: dict[str, float]   # trigger name -> seconds after the start when it was first seen
    killed: bool = False


def run(cmd: list[str], out: Path, triggers: list[Trigger] = (), kill_after: Trigger | None = None,
        delay: float = 0.0, preexec: Callable[[], None] | None = None) -> Run:
    """Run ``cmd`` in its own process group, polling ``triggers`` every few ms.

    With ``kill_after``: once it is seen, wait ``delay`` seconds and SIGKILL the whole group
    (``killed`` is False if the tool finished first). Without it: run to the end.
    """
    errfile = out.parent / f".{out.name}.stderr"
    errfile.parent.mkdir(parents=True, exist_ok=True)
    watch = list(triggers) + ([kill_after] if kill_after else [])
    seen_at: dict[str, float] = {}
    kill_at = None
    t0 = time.monotonic()
    with open(errfile, "w+") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=CHILD_ENV, start_new_session=True, preexec_fn=preexec)
        try:
            while proc.poll() is None:
                now = time.monotonic() - t0
                if now > TIMEOUT:
                    raise AssertionError(f"{cmd} ran for more than {TIMEOUT} s")
                if kill_at is not None and now >= kill_at:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                stderr = errfile.read_text(errors="replace")
                for t in watch:
                    if t.name not in seen_at and t.seen(out, stderr):
                        seen_at[t.name] = now
                        if t is kill_after:
                            kill_at = now + delay
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = errfile.read_text(errors="replace")
    errfile.unlink()
    return Run(proc.returncode, stderr, time.monotonic() - t0, seen_at, killed=proc.returncode == -signal.SIGKILL)


def run_ok(cmd: list[str], out: Path, triggers: list[Trigger] = ()) -> Run:
    r = run(cmd, out, triggers)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}"
    missing = [t.name for t in triggers if t.name not in r.seen_at]
    assert not missing, f"kill points never reached in the reference run: {missing}"
    return r


# ------------------------------------------------------------------------------------------------
# Checking artifacts
# ------------------------------------------------------------------------------------------------

def assert_complete(root: Path) -> None:
    """Every artifact under its final name reads completely: a kill never exposes a partial file."""
    for rel in artifacts(root):
        p = root / rel
        try:
            if p.suffix == ".npy":
                np.load(p, allow_pickle=False)
            elif p.suffix == ".npz":
                with np.load(p, allow_pickle=False) as z:
                    [z[k] for k in z.files]
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".pt":
                torch.load(p, map_location="cpu", weights_only=True)
            elif p.suffix == ".txt":  # devkit result lines: id score x1 y1 x2 y2
                text = p.read_text()
                assert text == "" or text.endswith("\n")
                assert all(len(line.split()) == 6 for line in text.splitlines())
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{p} is incomplete or damaged after a kill: {type(e).__name__}: {e}") from None


def normalized_json(path: Path, root: Path, drop: set[str]) -> object:
    """A JSON file with its output folder's path replaced and the ``drop`` keys removed."""
    data = json.loads(path.read_text().replace(str(root), "<OUT>"))
    return {k: v for k, v in data.items() if k not in drop}


def assert_same_artifacts(ref: Path, got: Path, json_drop: dict[str, set[str]], skip: tuple[str, ...] = ()) -> None:
    names = artifacts(ref, skip)
    assert artifacts(got, skip) == names
    for rel in names:
        pattern = next((p for p in json_drop if Path(rel).match(p)), None)
        if pattern is not None:
            assert normalized_json(ref / rel, ref, json_drop[pattern]) == \
                normalized_json(got / rel, got, json_drop[pattern]), f"{rel} differs"
        else:
            assert (ref / rel).read_bytes() == (got / rel).read_bytes(), f"{rel} differs from the uninterrupted run"
    leftovers = [p for p in got.rglob("*") if is_temp(p)]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def digest(root: Path) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in artifacts(root)}


# ------------------------------------------------------------------------------------------------
# The stages
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    name: str
    command: Callable[[Path], list[str]]   # output folder -> command line
    kill_points: list[Trigger]
    json_drop: dict[str, set[str]]
    skip: tuple[str, ...] = ()             # inputs copied into the output folder, not compared
    prepare: Callable[[Path], None] = lambda out: None
    resumable: bool = True                 # keeps finished work (else every run starts over)


def make_stages(data: Path, ref: Path) -> dict[str, Stage]:
    shards, records = "proposals_*.shards/*.npy", "convmaps_*/maps/*/done.json"
    train_args = ["--finetune", 24, "--set", "finetune.checkpoint_every=4", "finetune.hidden=[64,64]"]

    def copy_test_proposals(out: Path) -> None:
        shutil.copytree(ref / "test_proposals", out / "proposals", dirs_exist_ok=True)

    return {s.name: s for s in [
        Stage("proposals",
              lambda out: tool("compute_proposals.py", "--data", data, "--split", "trainval", "--out", out,
                               "--workers", 0, "--no-progress"),
              [Trigger(f"shard {n}", files=(shards, n)) for n in (1, 2, 3, 5, 6)],
              {"summary.json": {"seconds", "images_per_second"}}),
        Stage("features",
              lambda out: tool("extract_features.py", "--data", data, "--split", "trainval", "--out", out,
                               "--backbone", "alexnet", "--scales", 224, "--workers", 0, "--no-proposals"),
              [Trigger("meta.json", files=("convmaps_*/meta.json", 1))]
              + [Trigger(f"record {n}", files=(records, n)) for n in (2, 4, 5, 6)],
              {"convmaps_*/meta.json": {"created"}, "features_summary.json": {"seconds"}},
              skip=("proposals/",)),
        Stage("training",
              lambda out: tool("train_svm.py", "--data", data, "--split", "trainval", "--features", ref / "features",
                               "--out", out / "model.pt", "--workers", 0, *train_args),
              [Trigger(f"checkpoint {n}", checkpoint=("finetune_checkpoint.pt", n)) for n in (4, 12, 20)]
              + [Trigger("SVMs", log=r"training \d+ linear SVMs"),
                 Trigger("box regressors", log=r"training \d+ box regressors")],
              {}),
        Stage("evaluation",
              lambda out: tool("eval_voc.py", "--data", data, "--split", "test", "--model", ref / "training" / "model.pt",
                               "--out", out / "metrics.json"),
              [Trigger("detection starts", log=r"proposals: reusing"),
               # tqdm may skip a state when images go fast: "image n" is "at least n done".
               Trigger("image 1", log=r"detect: +(25|50|75|100)%"), Trigger("image 2", log=r"detect: +(50|75|100)%"),
               Trigger("image 3", log=r"detect: +(75|100)%"), Trigger("results written", log=r"wrote \d+ result files")],
              {"metrics.json": {}}, skip=("proposals/",), prepare=copy_test_proposals, resumable=False),
    ]}


def in_parallel(*jobs: Callable[[], object]) -> list[object]:
    """Run the jobs two at a time (each tool run is one thread, see CHILD_ENV); re-raise the
    first failure."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


@pytest.fixture(scope="module")
def ref(synthetic_voc: Path, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted runs of every stage (the references, and the inputs of the next stages),
    with the time at which each kill point was reached."""
    from detection.data.voc import VOCDataset
    from detection.proposals import compute_proposals

    base = tmp_path_factory.mktemp("interrupted")
    root = base / "ref"
    stages = make_stages(synthetic_voc, root)
    timelines: dict[str, Run] = {}

    def reference(name: str) -> None:
        s, out = stages[name], root / name
        s.prepare(out)
        timelines[name] = run_ok(s.command(out), out, s.kill_points)

    # The evaluation's input (test split proposals, as eval_voc.py would compute them) is made
    # in this process: one tool start less.
    in_parallel(lambda: reference("proposals"), lambda: reference("features"),
                lambda: compute_proposals(VOCDataset(synthetic_voc, "test"), root / "test_proposals",
                                          num_workers=0, progress=False))
    # train_svm.py reads the proposals of the training split beside the conv maps.
    shutil.copytree(root / "proposals", root / "features" / "proposals")
    reference("training")
    reference("evaluation")
    return {"base": base, "root": root, "data": synthetic_voc, "stages": stages, "timelines": timelines}


# ------------------------------------------------------------------------------------------------
# Part 1: killed at five points, resumed, identical
# ------------------------------------------------------------------------------------------------

def kill_and_resume(ref: dict, name: str) -> list[str]:
    """Kill the stage's tool at each kill point (each run resuming the last), then run it to the
    end. Returns one line per kill point."""
    stage, timeline = ref["stages"][name], ref["timelines"][name]
    out = ref["base"] / "run" / name
    stage.prepare(out)
    rng = random.Random(f"{name}:{SEED}")
    # The time the uninterrupted run spent from each kill point to the next (or to its end).
    marks = [timeline.seen_at[t.name] for t in stage.kill_points] + [timeline.seconds]
    log = []
    for i, point in enumerate(stage.kill_points):
        delay = rng.uniform(0.05, 0.6) * max(marks[i + 1] - marks[i], 0.05)
        if i == len(stage.kill_points) - 1:
            # The work left after the last point is the shortest: when the machine is less loaded
            # than during the reference run it can end within any fraction of the reference's gap,
            # and the run would finish instead of being killed. Kill as soon as the point is seen.
            delay = 0.0
        r = run(stage.command(out), out, kill_after=point, delay=delay)
        log.append(f"{point.name} + {delay:.2f} s: {'killed' if r.killed else f'finished (exit {r.returncode})'}"
                   f" after {r.seconds:.1f} s")
        assert r.killed or r.returncode == 0, f"{name}: run failed, not killed:\n{r.stderr[-3000:]}"
        assert_complete(out)
    final = run(stage.command(out), out)
    assert final.returncode == 0, f"{name}: the rerun after the kills failed:\n{final.stderr[-3000:]}"
    return log


@pytest.fixture(scope="module")
def resumed(ref) -> dict[str, concurrent.futures.Future]:
    """Every stage's kills and final run, two stages at a time (they only read each other's
    references). Each test then takes its stage's outcome."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return {name: pool.submit(kill_and_resume, ref, name)
                for name in ["training", "evaluation", "proposals", "features"]}  # longest first


@pytest.mark.parametrize("name", ["proposals", "features", "training", "evaluation"])
def test_killed_stage_resumes_to_identical_artifacts(ref, resumed, name):
    stage = ref["stages"][name]
    log = resumed[name].result()   # re-raises what failed in that stage's runs
    print(f"\n{name} (seed {SEED}), reference {ref['timelines'][name].seconds:.1f} s:\n  " + "\n  ".join(log))
    # Each resumable run keeps what it finished, so later kill points may already be passed when
    # a run starts (it is then killed while it starts up); a run that starts over is killed at
    # each point unless, on a loaded machine, it got past the last one faster than the reference.
    kills = sum("killed" in line for line in log)
    assert kills >= (5 if stage.resumable else 4), "\n".join(log)
    assert_same_artifacts(ref["root"] / name, ref["base"] / "run" / name, stage.json_drop, stage.skip)


# ------------------------------------------------------------------------------------------------
# Part 2: environment faults
# ------------------------------------------------------------------------------------------------

def file_size_limit(nbytes: int) -> Callable[[], None]:
    """preexec_fn: the child may write no file beyond ``nbytes`` (writes then fail with EFBIG)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def assert_one_error(r: Run, *names: str) -> str:
    """Exit 2, one ``error:`` line (the last) naming every string of ``names``, no traceback."""
    assert r.returncode == 2, f"exit {r.returncode}:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr[-3000:]
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


def test_disk_full_while_writing_conv_maps(ref, tmp_path):
    feat = tmp_path / "features"
    shutil.copytree(ref["root"] / "features", feat)
    before = digest(feat)
    # Another scale: a new cache folder beside the finished one. Its meta.json fits in 64 KiB,
    # the first 256x9x12 float32 map (110 KB) does not.
    r = run(tool("extract_features.py", "--data", ref["data"], "--split", "trainval", "--out", feat,
                 "--backbone", "alexnet", "--scales", 160, "--workers", 0, "--no-proposals"),
            feat, preexec=file_size_limit(64 * 1024))
    # numpy reports the failed write as a short write, without the errno.
    line = assert_one_error(r, "s0.npy", "cannot write")
    assert str(feat) in line
    after = digest(feat)
    assert {k: after[k] for k in before} == before, "the finished cache was modified"
    new = [k for k in after if k not in before]
    assert all(k.endswith("meta.json") for k in new), new   # no map file, no done marker
    assert not [p for p in feat.rglob("*") if is_temp(p)]


def test_disk_full_while_saving_a_checkpoint(ref, tmp_path):
    model = tmp_path / "train" / "model.pt"
    model.parent.mkdir()
    shutil.copy(ref["root"] / "training" / "model.pt", model)   # a model of an earlier run
    before = digest(model.parent)
    # The first fine-tuning checkpoint (~6.5 MB) does not fit under 1 MiB.
    r = run(tool("train_svm.py", "--data", ref["data"], "--split", "trainval", "--features",
                 ref["root"] / "features", "--out", model, "--workers", 0, "--quiet", "--finetune", 24,
                 "--set", "finetune.checkpoint_every=4", "finetune.hidden=[64,64]"),
            model.parent, preexec=file_size_limit(1 << 20))
    assert_one_error(r, str(model.parent / "finetune_checkpoint.pt"), "File too large")
    assert digest(model.parent) == before


@pytest.mark.parametrize("which", ["compute_proposals", "extract_features"])
def test_output_folder_under_a_regular_file(ref, tmp_path, which):
    # As root, a chmod'ed folder stays writable; a path through a regular file cannot be made by
    # anyone (mkdir fails with ENOTDIR), as honest a "cannot create the output folder" as any.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out = blocker / "out"
    data = ref["data"]
    cmd = {
        "compute_proposals": tool("compute_proposals.py", "--data", data, "--split", "test", "--out", out,
                                  "--workers", 0, "--no-progress"),
        "extract_features": tool("extract_features.py", "--data", data, "--split", "test", "--out", out,
                                 "--backbone", "alexnet", "--scales", 96, "--workers", 0, "--no-proposals"),
    }[which]
    r = run(cmd, tmp_path / "watch", preexec=None)
    assert_one_error(r, str(blocker), "regular file")
    assert blocker.read_text() == "not a folder\n"


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change", ["version", "settings"])
def test_conv_map_cache_of_another_version_or_settings(ref, tmp_path, change):
    feat = tmp_path / "features"
    shutil.copytree(ref["root"] / "features", feat, ignore=shutil.ignore_patterns("proposals"))
    meta = next(feat.glob("convmaps_*/meta.json"))
    if change == "version":    # as a later release of this code would have written it
        _edit_json(meta, lambda m: m.update(version=CONVMAP_FORMAT_VERSION + 1))
    else:                      # the folder's key, but other settings inside (a stale/edited cache)
        _edit_json(meta, lambda m: m["settings"].update(max_size=1000))
    before = digest(feat)
    r = run(tool("extract_features.py", "--data", ref["data"], "--split", "trainval", "--out", feat,
                 "--backbone", "alexnet", "--scales", 224, "--workers", 0, "--no-proposals"), feat)
    assert_one_error(r, str(meta), f"version {CONVMAP_FORMAT_VERSION + 1}" if change == "version" else "max_size")
    assert digest(feat) == before


def test_model_file_of_another_version(ref, tmp_path):
    blob = torch.load(ref["root"] / "training" / "model.pt", map_location="cpu", weights_only=True)
    blob["version"] = 2
    model = tmp_path / "model.pt"
    torch.save(blob, model)
    r = run(tool("eval_voc.py", "--data", ref["data"], "--split", "test", "--model", model,
                 "--out", tmp_path / "eval" / "metrics.json", "--quiet"), tmp_path / "eval")
    assert_one_error(r, str(model), "version 2")
    assert not (tmp_path / "eval").exists()


def test_proposal_cache_of_another_version_is_rebuilt_not_trusted(ref, tmp_path):
    """The proposal cache is rebuilt from its shards (a warning, not an error): its key already
    covers the format version, so only a damaged or edited file can sit at the key's path."""
    from detection.io.files import atomic_save_npz, load_npz

    prop = tmp_path / "proposals"
    shutil.copytree(ref["root"] / "proposals", prop)
    npz = next(prop.glob("proposals_*.npz"))
    arrays = load_npz(npz)
    meta = json.loads(str(arrays["metadata"][()]))
    meta["format_version"] = 0
    arrays["metadata"] = np.array(json.dumps(meta))
    arrays["boxes"] = arrays["boxes"][::-1].copy()   # content a trusting reader would return
    atomic_save_npz(npz, **arrays)
    r = run(tool("compute_proposals.py", "--data", ref["data"], "--split", "trainval", "--out", prop,
                 "--workers", 0, "--no-progress"), prop)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"{re.escape(str(npz))}.*format 0", r.stderr), r.stderr[-3000:]
    assert npz.read_bytes() == (ref["root"] / "proposals" / npz.name).read_bytes()


def test_killed_meta_write_does_not_block_the_cache(tmp_path):
    """A run killed while writing a conv-map cache's meta.json leaves only the temporary file in
    the new folder; the rerun must take the folder, not refuse it as "not a conv-map cache"."""
    settings = {"format_version": CONVMAP_FORMAT_VERSION, "scales": [96], "dtype": "float32"}
    root = ConvMapCache.folder_for(tmp_path, settings)
    root.mkdir(parents=True)
    (root / ".meta.json.99999999.abc.tmp").write_text('{"format": "convmap-ca')  # cut mid-write
    cache = ConvMapCache.create(tmp_path, settings)
    assert json.loads((root / "meta.json").read_text())["settings"] == settings
    assert cache.root == root
    assert [p.name for p in root.iterdir()] == ["meta.json"]   # the dead writer's file is removed
