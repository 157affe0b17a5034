"""The chain a user runs: extract_features.py -> train_svm.py -> eval_voc.py --model, as
subprocesses on the tiny synthetic dataset (real selective search, real trunk, real SVMs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from references import reference_voc_ap

TOOLS = Path(__file__).resolve().parents[1] / "tools"

# Subprocess pipelines: the slow tier (-m slow, or -m "" for every tier).
pytestmark = pytest.mark.slow


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
        "--quiet", "--set", "svm.C=0.002", "--set", "bbox.lam=3000", "head_seed=4")
    # Every --set is kept (before, a second --set replaced the first), and each is a TrainConfig key.
    from detection.model import load_model
    train_config = load_model(model)[1]["train_config"]
    assert (train_config["svm"]["C"], train_config["bbox"]["lam"], train_config["head_seed"]) == (0.002, 3000.0, 4)
    out = tmp_path / "eval" / "metrics.json"
    run(str(TOOLS / "eval_voc.py"), "--data", str(synthetic_voc), "--split", "test", "--model", str(model),
        "--out", str(out), "--quiet")
    metrics = json.loads(out.read_text())
    assert metrics["metric"] == "voc10"
    assert set(metrics["AP"]) == {"circle", "square", "star", "triangle"}
    # Random conv features on a few training images: the chain must run end to end, and its AP is
    # the model file's detections scored by the devkit loop (tests/references.py).
    ref = reference_voc_ap(model, synthetic_voc, "voc10")
    assert {k: v for k, v in metrics["AP"].items() if v is not None} == pytest.approx(ref, abs=1e-9)  # null: no GT
    assert metrics["mAP"] == pytest.approx(sum(ref.values()) / len(ref), abs=1e-9) and metrics["mAP"] > 0
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


def test_train_svm_takes_the_weights_extract_features_recorded(synthetic_voc, tmp_path):
    # extract_features.py --weights W -> train_svm.py with no option repeated; a changed or
    # missing W is refused by name.
    import torch

    from detection.backbones import build_backbone
    from detection.detector import SPPDetector
    from detection.io.files import file_sha256

    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision_alexnet(seed=3).state_dict(), weights)
    feat = tmp_path / "feat"
    run(str(TOOLS / "extract_features.py"), "--data", str(synthetic_voc), "--split", "trainval", "--out", str(feat),
        "--backbone", "alexnet", "--weights", str(weights), "--scales", "96", "--workers", "0", "--quiet")
    model = tmp_path / "m.pt"
    run(str(TOOLS / "train_svm.py"), "--data", str(synthetic_voc), "--split", "trainval", "--features", str(feat),
        "--out", str(model), "--no-bbox", "--workers", "0", "--quiet")
    assert SPPDetector.from_file(model).backbone.weights_id == f"sha256:{file_sha256(weights)}"
    assert build_backbone("alexnet", weights=weights).weights_id == f"sha256:{file_sha256(weights)}"

    def refused() -> str:
        proc = subprocess.run([sys.executable, str(TOOLS / "train_svm.py"), "--data", str(synthetic_voc), "--split",
                               "trainval", "--features", str(feat), "--out", str(tmp_path / "m2.pt"), "--quiet"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        return proc.stderr

    torch.save(torchvision_alexnet(seed=4).state_dict(), weights)            # the file changed
    assert "the file changed since" in refused()
    weights.unlink()                                                           # the file is gone
    assert "cannot be loaded now" in refused() and "no such file" in refused()


def torchvision_alexnet(seed: int):
    import torch
    import torchvision
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.alexnet()
