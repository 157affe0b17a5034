"""The pipeline as it runs at scale, against one process on the same small config (computed once
for the module): 2 nodes of 1 process each (two ``torchrun`` launchers meeting through a c10d
rendezvous, node ranks assigned by it), a rank killed under ``torchrun --max-restarts 1`` (the
launcher restarts the group, which resumes from the stage caches), and the run without the
conv-map cache (``features.cache=false``). Each gives the model and mAP of the one-process run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.model import load_model

from test_distributed import SMALL_CONFIG, TOOLS, _env, _free_port, _results

# Pipelines and launchers in subprocesses: the slow tier (CI runs every tier).
pytestmark = pytest.mark.slow

#: The small config of tests/test_distributed.py without the R-CNN timing (rank 0 alone times;
#: nothing distributed in it, and it is the slowest stage of this config).
CONFIG = SMALL_CONFIG.replace("timing: {num_images: 1, rcnn_windows: 10}", "timing: {enabled: false}")
TIMEOUT = 900


def _pipeline_args(data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return [str(TOOLS / "run_pipeline.py"), "--data", str(data), "--out", str(out), "--config", str(config),
            "--device", "cpu", "--threads", "1", "--quiet", *extra]


def _finished(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-2000:] + err[-5000:]
    return out, err


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(CONFIG)
    assert "timing: {enabled: false}" in CONFIG
    return path


@pytest.fixture(scope="module")
def one_process(synthetic_voc, config, tmp_path_factory) -> Path:
    """The output folder of the one-process run every test compares with."""
    out = tmp_path_factory.mktemp("one") / "run"
    proc = subprocess.run([sys.executable, *_pipeline_args(synthetic_voc, out, config)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def _assert_same_run(reference: Path, run: Path) -> None:
    """The same model (SVMs, box regressors), detections and mAP as the reference run."""
    (ma, meta_a), (mb, meta_b) = load_model(reference / "model.pt"), load_model(run / "model.pt")
    assert set(ma) == set(mb) and meta_a["settings"] == meta_b["settings"]
    for name, value in ma.items():
        torch.testing.assert_close(mb[name], value, rtol=1e-5, atol=1e-6, msg=name)
    ra, rb = _results(reference / "results"), _results(run / "results")
    assert list(ra) == list(rb) and len(ra) == 4
    for name in ra:
        assert [d[0] for d in ra[name]] == [d[0] for d in rb[name]], name
        np.testing.assert_allclose([d[1] for d in ra[name]], [d[1] for d in rb[name]], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([d[2] for d in ra[name]], [d[2] for d in rb[name]], rtol=1e-4, atol=1e-3)
    metrics_a = json.loads((reference / "metrics.json").read_text())
    metrics_b = json.loads((run / "metrics.json").read_text())
    assert metrics_b["mAP"] == pytest.approx(metrics_a["mAP"], abs=1e-6)
    assert metrics_b["AP"] == pytest.approx(metrics_a["AP"], abs=1e-6)


# ---- 2 nodes -------------------------------------------------------------------------------------

def test_two_nodes_through_a_c10d_rendezvous_give_the_run_of_one_process(synthetic_voc, config, one_process,
                                                                          tmp_path):
    # Two launchers on this machine stand for two machines: the same command on each, no node
    # rank given (the rendezvous assigns them), one process per node, one shared output folder.
    port, out = _free_port(), tmp_path / "two_nodes"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
                "--rdzv-id", f"test-nodes-{os.getpid()}-{port}"]
    nodes = [subprocess.Popen([*launcher, *_pipeline_args(synthetic_voc, out, config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for _ in range(2)]
    printed = [_finished(node)[0] for node in nodes]
    # Rank 0 alone prints the result: the rendezvous gave the nodes different ranks.
    assert sorted(p.count("mAP") for p in printed) == [0, 1], printed
    _assert_same_run(one_process, out)


# ---- a rank killed and restarted by the launcher -------------------------------------------------

def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The process id of the launcher's worker of global rank ``rank`` (None: not started yet)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            if parent != launcher_pid:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):     # gone meanwhile
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def _made(folder: Path) -> dict[str, int | bytes]:
    """Each file under ``folder``: its modification time, or the bytes of a conv-map index (which
    rank 0 writes again on every run from the records' done markers: the same bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.name == "index.json" else p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the launcher's workers through /proc")
def test_a_rank_killed_under_max_restarts_is_restarted_and_resumes_from_the_caches(synthetic_voc, config,
                                                                                    one_process, tmp_path):
    out = tmp_path / "restarted"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
         "--monitor-interval", "0.1", *_pipeline_args(synthetic_voc, out, config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    # Kill point: the conv-map stage done (its index written by rank 0 after every rank's maps),
    # the train stage not (no model file yet). Rank 1 dies as a machine or an OOM kill would stop it.
    deadline, victim = time.monotonic() + TIMEOUT, None
    while not list(out.glob("features/convmaps_*/index.json")):
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        victim = victim or _worker_pid(launcher.pid, 1)
        time.sleep(0.02)
    victim = victim or _worker_pid(launcher.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    done_before = {stage: _made(out / stage) for stage in ("proposals", "features")}
    assert not (out / "model.pt").exists(), "the run passed the kill point before the kill: nothing was restarted"
    assert done_before["proposals"] and done_before["features"]

    # Exit status 0 although a worker died: the launcher restarted the group (with
    # --max-restarts 0 it exits 1 on the same kill), and the restarted group finished.
    _finished(launcher)
    # Resumed: the proposals and conv maps of the first attempt were read, none rewritten or added.
    for stage, files in done_before.items():
        assert _made(out / stage) == files, stage
    _assert_same_run(one_process, out)


# ---- without the conv-map cache -------------------------------------------------------------------

def test_without_the_conv_map_cache_the_run_is_the_cached_run(synthetic_voc, config, one_process, tmp_path):
    out = tmp_path / "no_cache"
    proc = subprocess.run([sys.executable, *_pipeline_args(synthetic_voc, out, config, "--set",
                                                           "features.cache=false")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not (out / "features").exists() and list((one_process / "features").glob("convmaps_*/index.json"))
    # Bit for bit: the maps are computed as the cache's are, in the same thread count.
    (cached, _), (computed, _) = load_model(one_process / "model.pt"), load_model(out / "model.pt")
    assert set(cached) == set(computed)
    for name, value in cached.items():
        assert torch.equal(computed[name], value), name
    _assert_same_run(one_process, out)
