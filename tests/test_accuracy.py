"""Accuracy floors: the whole pipeline on a small synthetic set must keep its VOC07 mAP.

Real selective search, a randomly initialised (seeded) AlexNet trunk, real SVMs with hard-negative
mining, real box regressors and the devkit's AP. Random conv features are enough to tell the
synthetic shapes apart when the objects span several conv cells (a 320-px shorter side), so a
change that breaks the recipe (the SVM positives' weight, the window projection, the scale
choice, box regression, the evaluation) shows up as a drop of mAP, which ``0 <= mAP <= 1``
elsewhere cannot catch.

The floors sit about 0.1 below what these exact settings measured (one torch thread):
SPP-net 0.775, R-CNN 0.799 (docs/benchmarks.md, "Accuracy floors"). R-CNN runs on at most 10
proposals per training image and 40 per test image, so that its crops stay few.
"""
from __future__ import annotations

import pytest

from detection.config import merge
from detection.data.synthetic import make_synthetic_voc
from detection.pipeline import PipelineConfig, run_pipeline

# Long training: the slow tier (-m slow, or -m "" for every tier).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

#: Measured mAP minus a margin for float-order effects of other thread counts and machines.
FLOORS = {"spp": 0.67, "rcnn": 0.69}


def accuracy_config(root, method: str) -> PipelineConfig:
    """The floor run's settings (also used by docs/benchmarks.md to measure the floors)."""
    return merge(PipelineConfig(), {
        "method": method,
        "data": {"root": str(root), "flip": False},
        "proposals": {"max_boxes": 40, "resize_to": 240},
        "proposal_workers": 0,
        "backbone": {"name": "alexnet", "weights": None, "seed": 0},
        "features": {"scales": [320], "workers": 0},
        "train": {"svm": {"norm_images": 4}, "max_train_windows": 10 if method == "rcnn" else None},
        "metric": "voc07",
        "timing": {"enabled": False},
    })


@pytest.fixture(scope="module")
def accuracy_voc(tmp_path_factory):
    """24 trainval + 12 test synthetic images (320x240, seed 0), made once for both methods."""
    return make_synthetic_voc(tmp_path_factory.mktemp("accuracy") / "voc", num_trainval=24, num_test=12, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One output folder for both methods: the proposals are computed once."""
    return tmp_path_factory.mktemp("accuracy_run")


@pytest.mark.parametrize("method", ["spp", "rcnn"])
def test_map_stays_above_its_floor(accuracy_voc, run_dir, method):
    metrics = run_pipeline(accuracy_config(accuracy_voc, method), run_dir, progress=False)
    assert metrics["metric"] == "voc07" and len(metrics["AP"]) == 4
    assert metrics["mAP"] >= FLOORS[method], (
        f"{method} VOC07 mAP {metrics['mAP']:.3f} fell below its floor {FLOORS[method]}: per class {metrics['AP']}")
    # The score calibration is fitted on held-out training windows and checked on the test split's
    # detections (measured ECE: 0.009 SPP-net, 0.040 R-CNN over ~900 detections).
    cal = metrics["calibration"]
    assert cal["num_detections"] > 100 and cal["ece"] <= 0.1, cal
    assert "## Score calibration" in (run_dir / "report.md").read_text()
