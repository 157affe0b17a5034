"""detection.runtime and the package's OpenMP wait policy: --device auto, --threads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detection.errors import DetectionError
from detection.runtime import cores_per_machine, rank_share, resolve_device, resource_plan, set_threads

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_and_unknown_devices_are_refused():
    with pytest.raises(DetectionError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    with pytest.raises(DetectionError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(DetectionError, match="not supported"):
        resolve_device("meta")


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == 1 == torch.get_num_threads()   # the user's OMP_NUM_THREADS is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads(None) == cores_per_machine() == torch.get_num_threads()    # one process: every core
        # Under a launcher its OMP_NUM_THREADS=1 default gives way to this rank's share of the cores.
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("WORLD_SIZE", "4")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert set_threads(None) == max(1, cores_per_machine() // 2) == torch.get_num_threads()
        with pytest.raises(DetectionError, match="--threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_rank_share_divides_the_cores_and_keeps_an_explicit_value(caplog, monkeypatch):
    assert [rank_share(None, "x", cores=16, local_world=n) for n in (1, 2, 3, 4, 16, 32)] == [16, 8, 5, 4, 1, 1]
    assert rank_share(None, "x", cores=1, local_world=1) == 1
    assert rank_share(None, "x", cores=2, local_world=4, minimum=0) == 0
    with caplog.at_level("WARNING", logger="detection.runtime"):
        assert rank_share(3, "features.workers", cores=8, local_world=2) == 3          # 6 of 8 cores: fine
        assert not caplog.records
        assert rank_share(6, "features.workers", cores=8, local_world=2) == 6          # kept, with a warning
        assert rank_share(0, "features.workers", cores=8, local_world=2) == 0
    assert len(caplog.records) == 1
    assert "features.workers=6 in each of 2 process(es) on this machine asks for 12 of its 8 cores" in caplog.text
    assert "leave it unset for 4 each" in caplog.text
    # The defaults come from the affinity mask and the launcher's LOCAL_WORLD_SIZE.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert rank_share(None, "x") == max(1, cores_per_machine() // 2)
    plan = resource_plan(None, 1)
    assert (plan.local_world, plan.loader_workers, plan.proposal_workers) == (2, max(1, plan.cores // 2), 1)
    assert "selective-search" in plan.describe()


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(extra)
    return env


def test_the_package_makes_openmp_threads_sleep_unless_the_user_chose():
    code = "import detection, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(OMP_WAIT_POLICY="ACTIVE"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


@pytest.mark.slow
def test_every_tool_takes_threads(tmp_path):
    # make_synthetic_voc.py is the quickest tool; --threads is a common argument of run_tool.
    proc = subprocess.run([sys.executable, str(TOOLS / "make_synthetic_voc.py"), "--out", str(tmp_path / "voc"),
                           "--num-trainval", "1", "--num-test", "1", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run([sys.executable, str(TOOLS / "make_synthetic_voc.py"), "--out", str(tmp_path / "v2"),
                          "--threads", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--threads must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
