"""detection.runtime and the package's OpenMP wait policy: --device auto, --threads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detection.errors import DetectionError
from detection.runtime import resolve_device, set_threads

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


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)                                # keeps the current count
        assert torch.get_num_threads() == 1
        with pytest.raises(DetectionError, match="--threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


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
