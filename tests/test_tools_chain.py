"""The chain a user runs: extract_features.py -> train_svm.py -> eval_voc.py --model, as
subprocesses on the tiny synthetic dataset (real selective search, real trunk, real SVMs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_extract_train_evaluate_chain(synthetic_voc, tmp_path):
    feat, model = tmp_path / "feat", tmp_path / "model.pt"
    common = ["--data", str(synthetic_voc), "--workers", "0"]
    run(str(TOOLS / "extract_features.py"), *common, "--split", "trainval", "--out", str(feat),
        "--backbone", "alexnet", "--scales", "224")
    run(str(TOOLS / "train_svm.py"), *common, "--split", "trainval", "--features", str(feat), "--out", str(model),
        "--quiet")
    out = tmp_path / "eval" / "metrics.json"
    run(str(TOOLS / "eval_voc.py"), "--data", str(synthetic_voc), "--split", "test", "--model", str(model),
        "--out", str(out), "--quiet")
    metrics = json.loads(out.read_text())
    assert metrics["metric"] == "voc10"
    assert set(metrics["AP"]) == {"circle", "square", "star", "triangle"}
    # Random conv features on a few training images: the chain must run end to end and score.
    assert 0.0 < metrics["mAP"] <= 1.0
    assert len(list((tmp_path / "eval" / "results").glob("comp4_det_test_*.txt"))) == 4


def test_train_svm_refuses_a_cache_of_other_weights(synthetic_voc, tmp_path):
    feat = tmp_path / "feat"
    run(str(TOOLS / "extract_features.py"), "--data", str(synthetic_voc), "--split", "trainval", "--out", str(feat),
        "--backbone", "alexnet", "--scales", "96", "--workers", "0")
    proc = subprocess.run([sys.executable, str(TOOLS / "train_svm.py"), "--data", str(synthetic_voc), "--split",
                           "trainval", "--features", str(feat), "--out", str(tmp_path / "m.pt"), "--seed", "7"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "weights" in proc.stderr
