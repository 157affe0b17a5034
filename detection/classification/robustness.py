"""Scale robustness: is the same object recognised when the test image is rescaled?

SPP gives a fixed-length vector for any size, which does not make the network scale-invariant.
This measures accuracy (or mAP) of one view while every side the view uses is multiplied by a
factor (0.5x .. 2x): the ``full`` view at shorter side ``f * full_side`` for SPP models, the
``center`` crop of the image at shorter side ``f * resize`` for the no-SPP baseline (a window
larger than the shrunken image is filled with the mean colour around it).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")   # files only: no display on servers or under torchrun
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen first

from ..io.files import atomic_path  # noqa: E402
from .config import TestConfig  # noqa: E402
from .data import ClassificationSet  # noqa: E402
from .model import SPPClassifier  # noqa: E402
from .views import evaluate  # noqa: E402

__all__ = ["scale_curve", "headline", "plot_scale_curves"]


def headline(metrics: Mapping[str, Any]) -> float:
    """The one number of a metrics dict: mAP (multi-label) or top-1."""
    return float(metrics["map"] if "map" in metrics else metrics["top1"])


def scale_curve(model: SPPClassifier, data: ClassificationSet, view: str, cfg: TestConfig, factors: Sequence[float],
                device: str = "cpu") -> dict[str, Any] | None:
    """``{"view", "factors", "values", "metric"}``: the headline metric at each factor (rank 0;
    None on the other ranks)."""
    values = []
    for f in factors:
        m = evaluate(model, data, view, cfg, rescale=float(f), device=device)
        if m is not None:
            values.append(headline(m))
    if not values and factors:
        return None
    return {"view": view, "factors": [float(f) for f in factors], "values": values,
            "metric": "map" if data.multilabel else "top1"}


def plot_scale_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """One line per curve (label -> :func:`scale_curve` result), factor on a log axis; PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "top-1"
    for label, c in curves.items():
        ax.plot(c["factors"], c["values"], marker="o", label=label)
        metric = "mAP" if c.get("metric") == "map" else "top-1"
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test image rescaled by")
    ax.set_ylabel(metric)
    ax.set_title(title or "accuracy vs test scale")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
