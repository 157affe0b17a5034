"""Shared fixtures: a tiny synthetic VOC dataset and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import detection  # noqa: F401  (first: sets OpenMP's wait policy before torch loads OpenMP)
import pytest
import torch

from detection.data.synthetic import make_synthetic_voc

#: Fixture size: enough images for per-class statistics in tests, small enough to build in
#: well under a second on a 2-core machine.
FIXTURE_TRAINVAL = 8
FIXTURE_TEST = 4


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny synthetic VOC-layout dataset (8 trainval + 4 test images, 320x240, seed 0).

    Session-scoped and shared: tests must not modify it (copy it with shutil.copytree first).
    """
    root = tmp_path_factory.mktemp("synthetic") / "voc"
    return make_synthetic_voc(root, num_trainval=FIXTURE_TRAINVAL, num_test=FIXTURE_TEST, seed=0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data/weights folder (env SPP_SHARED, else ``shared/`` beside the clone);
    skips the test when it is absent."""
    path = Path(os.environ.get("SPP_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's tests, restored after: the dev machine's 2 cores
    are shared, and one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every Hypothesis test carries the ``fuzz`` marker, so the default (fast) run leaves them
    all out and ``-m fuzz`` runs them all: an unmarked one is a collection error."""
    unmarked = [item.nodeid for item in items
                if getattr(getattr(item, "obj", None), "is_hypothesis_test", False)
                and item.get_closest_marker("fuzz") is None]
    if unmarked:
        raise pytest.UsageError(f"Hypothesis tests without @pytest.mark.fuzz: {', '.join(unmarked)}")
