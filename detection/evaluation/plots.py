"""Precision/recall curves as PNG files.

Uses ``matplotlib.figure.Figure`` with an explicit Agg canvas: no pyplot, no ``matplotlib.use``
(both change process-wide state that the caller may rely on).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io.files import atomic_path, make_dirs
from ..io.paths import path_in_folder, safe_file_part

__all__ = ["plot_pr_curve", "plot_pr_curves"]

log = logging.getLogger(__name__)


def _envelope(recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotone precision envelope (VOC2010 AP is the area under it) as a step curve."""
    mrec = np.concatenate(([0.0], recall, [recall[-1] if len(recall) else 0.0]))
    mpre = np.concatenate(([precision[0] if len(precision) else 0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    return mrec, mpre


def plot_pr_curve(recall: Sequence[float], precision: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Draw one precision/recall curve (points and their monotone envelope) to a PNG, atomically.

    Args:
        recall, precision: float sequences[N] (e.g. the curve's corners at each true positive).
        path: output ``.png``.
        title: plot title.
    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    fig = Figure(figsize=(4.0, 3.5), dpi=100)   # 400 x 350 px: legible in a markdown report
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if len(rec):
        ax.plot(rec, prec, ".", markersize=3, color="tab:blue", label="at each TP")
        er, ep = _envelope(rec, prec)
        ax.step(er, ep, where="pre", color="tab:orange", linewidth=1.2, label="envelope")
        ax.legend(loc="lower left", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no true positives", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_pr_curves(metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """One ``<class>.png`` per class from the ``pr_curves`` of a metrics dict
    (:func:`detection.evaluation.devkit.evaluate_detections`).

    Returns:
        the written paths (classes without ground truth are skipped).
    """
    out_dir = make_dirs(out_dir)
    paths = []
    for name, curve in metrics["pr_curves"].items():
        ap = metrics["AP"].get(name, math.nan)
        if ap != ap:   # NaN: no ground truth, no curve
            continue
        title = f"{name}: AP {ap:.3f} ({metrics.get('metric', '')})"
        # Class names come from data: escaped so that a name like "../x" stays in out_dir.
        dest = path_in_folder(out_dir, f"{safe_file_part(str(name), 'class name')}.png")
        paths.append(plot_pr_curve(curve["recall"], curve["precision"], dest, title))
    log.info("wrote %d PR curves to %s", len(paths), out_dir)
    return paths
