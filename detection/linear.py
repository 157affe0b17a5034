"""The linear models the detector applies to window features: one SVM per class
(:class:`LinearSVMs`) and one box regressor per class (:class:`BoxRegressors`), with the box-delta
parametrisation they predict (:func:`encode` / :func:`decode`).

They are trained by :mod:`detection.training` (SVMs with hard-negative mining, box regressors by
ridge regression) and stored in the model file; detection needs only this module.

Box deltas (R-CNN appendix C). For a proposal ``P`` and its target box ``G``, with widths,
heights and centres in the library's continuous convention (``w = x2 - x1``, ``cx = x1 + w / 2``;
no ``+ 1``: a box covering pixels ``a..b`` has ``x1 = a, x2 = b + 1``, see :mod:`detection.boxes`)::

    dx = (Gcx - Pcx) / Pw      dy = (Gcy - Pcy) / Ph
    dw = log(Gw / Pw)          dh = log(Gh / Ph)

(R-CNN's MATLAB code adds ``eps`` = 2.2e-16 to every width and height; that changes nothing at
float precision, so it is left out. Degenerate boxes are rejected instead.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from .errors import DetectionError, ModelError

__all__ = ["LinearSVMs", "BoxRegressors", "encode", "decode", "MAX_LOG_SCALE", "UNTRAINED_BIAS"]

#: Bias of a class left untrained (no positives): with zero weights every window scores this,
#: far below any score threshold (the detector's is -1.5), so the class never detects.
UNTRAINED_BIAS = -1e4

#: Largest log-scale delta :func:`decode` applies: a box grows at most 1000/16 = 62.5 times per
#: side (the clamp torchvision and Detectron use) so a wild prediction cannot overflow ``exp``.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def _wh_ctr(boxes: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    if not (np.isfinite(b).all() and (w > 0).all() and (h > 0).all()):
        bad = np.flatnonzero(~(np.isfinite(b).all(axis=1) & (w > 0) & (h > 0)))
        raise DetectionError(f"bbox regression: {len(bad)} {what} box(es) are empty or not finite, "
                             f"e.g. {b[bad[0]].tolist()}")
    return w, h, b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h


def encode(proposals: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Regression targets that move ``proposals`` onto ``gt``.

    Args:
        proposals: array[N, 4] (x1, y1, x2, y2), positive width and height.
        gt: array[N, 4], the matched target boxes.
    Returns:
        float64 array[N, 4] ``(dx, dy, dw, dh)``.
    Raises:
        DetectionError: an empty or non-finite box.
    """
    pw, ph, pcx, pcy = _wh_ctr(proposals, "proposal")
    gw, gh, gcx, gcy = _wh_ctr(gt, "target")
    if len(pw) != len(gw):
        raise ValueError(f"encode: {len(pw)} proposals but {len(gw)} targets")
    return np.stack([(gcx - pcx) / pw, (gcy - pcy) / ph, np.log(gw / pw), np.log(gh / ph)], axis=1)


def decode(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Apply deltas to proposals: the inverse of :func:`encode`.

    Args:
        proposals: array[N, 4].
        deltas: array[N, 4] or [N, K, 4] (one set per class).
    Returns:
        float64 boxes with the shape of ``deltas`` (not clipped to the image). ``dw, dh`` are
        clamped to :data:`MAX_LOG_SCALE`.
    """
    pw, ph, pcx, pcy = _wh_ctr(proposals, "proposal")
    d = np.asarray(deltas, dtype=np.float64)
    if d.shape[0] != len(pw) or d.shape[-1] != 4 or d.ndim not in (2, 3):
        raise ValueError(f"decode: deltas of shape {d.shape} do not fit {len(pw)} proposals")
    extra = (slice(None),) + (None,) * (d.ndim - 2)          # broadcast over the class axis
    pw, ph, pcx, pcy = pw[extra], ph[extra], pcx[extra], pcy[extra]
    cx = pcx + d[..., 0] * pw
    cy = pcy + d[..., 1] * ph
    w = pw * np.exp(np.minimum(d[..., 2], MAX_LOG_SCALE))
    h = ph * np.exp(np.minimum(d[..., 3], MAX_LOG_SCALE))
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class LinearSVMs:
    """One linear SVM per class, applied to features multiplied by ``feature_scale``.

    ``score[n, k] = feature_scale * features[n] . weights[k] + biases[k]``.

    Attributes:
        weights: float32 array[K, D].
        biases: float32 array[K].
        feature_scale: the scalar applied to raw features (``target_norm / mean_norm``).
        meta: JSON-able training record: config, class names, mean norm, per-class statistics.
    """

    weights: np.ndarray
    biases: np.ndarray
    feature_scale: float
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weights, dtype=np.float32)
        b = np.ascontiguousarray(self.biases, dtype=np.float32).reshape(-1)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ModelError(f"SVM weights [K, D] and biases [K] do not fit: {w.shape} and {b.shape}")
        if not (math.isfinite(self.feature_scale) and self.feature_scale > 0):
            raise ModelError(f"SVM feature_scale must be a positive number, got {self.feature_scale}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "biases", b)
        object.__setattr__(self, "feature_scale", float(self.feature_scale))

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.weights.shape[1]

    def scores(self, features: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """SVM scores of raw (unscaled) features.

        Args:
            features: array or tensor [N, D] (a tensor stays on its device).
        Returns:
            float32 array / tensor [N, K].
        """
        if features.shape[-1] != self.dim:
            raise ModelError(f"features have {features.shape[-1]} dims, the SVMs expect {self.dim}")
        if isinstance(features, torch.Tensor):
            w = torch.from_numpy(self.weights).to(features.device, torch.float32)
            b = torch.from_numpy(self.biases).to(features.device, torch.float32)
            return (features.float() @ w.T) * self.feature_scale + b
        f = np.asarray(features, dtype=np.float32)
        return (f @ self.weights.T) * np.float32(self.feature_scale) + self.biases

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"weight": [K, D], "bias": [K]}`` for the model file (prefix them with ``svm.``)."""
        return {"weight": torch.from_numpy(self.weights.copy()), "bias": torch.from_numpy(self.biases.copy())}

    def to_meta(self) -> dict[str, Any]:
        """JSON-able metadata for the model file (feature scale + training record)."""
        return {"feature_scale": self.feature_scale, **self.meta}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "LinearSVMs":
        """Inverse of :meth:`tensors` + :meth:`to_meta`.

        Raises:
            ModelError: a tensor or the feature scale is missing or of the wrong shape.
        """
        try:
            w = tensors["weight"].detach().cpu().numpy()
            b = tensors["bias"].detach().cpu().numpy()
            scale = float(meta["feature_scale"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"SVM state is incomplete: {e!r}") from None
        rest = {k: v for k, v in meta.items() if k != "feature_scale"}
        return cls(weights=w, biases=b, feature_scale=scale, meta=rest)


@dataclasses.dataclass(frozen=True, eq=False)
class BoxRegressors:
    """Per-class linear box regressors.

    ``deltas[n, k] = ((feature_scale * features[n]) @ weights[k] + biases[k]) @ target_unwhiten[k]
    + target_mean[k]``.

    Attributes:
        weights: float32 array[K, D, 4] (on scaled features, predicting normalised targets).
        biases: float32 array[K, 4].
        target_mean: float32 array[K, 4], mean target of each class.
        target_unwhiten: float32 array[K, 4, 4], maps normalised targets back (row vectors).
        feature_scale: the scalar applied to raw features.
        meta: JSON-able training record.
    """

    weights: np.ndarray
    biases: np.ndarray
    target_mean: np.ndarray
    target_unwhiten: np.ndarray
    feature_scale: float
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {n: np.ascontiguousarray(getattr(self, n), dtype=np.float32)
                  for n in ("weights", "biases", "target_mean", "target_unwhiten")}
        w = arrays["weights"]
        if w.ndim != 3 or w.shape[2] != 4:
            raise ModelError(f"box regressor weights must be [K, D, 4], got {w.shape}")
        k = w.shape[0]
        want = {"biases": (k, 4), "target_mean": (k, 4), "target_unwhiten": (k, 4, 4)}
        for n, shape in want.items():
            if arrays[n].shape != shape:
                raise ModelError(f"box regressor {n} must be {list(shape)}, got {list(arrays[n].shape)}")
        if not (math.isfinite(self.feature_scale) and self.feature_scale > 0):
            raise ModelError(f"box regressor feature_scale must be a positive number, got {self.feature_scale}")
        for n, a in arrays.items():
            object.__setattr__(self, n, a)
        object.__setattr__(self, "feature_scale", float(self.feature_scale))

    @property
    def num_classes(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.weights.shape[1]

    def predict_deltas(self, features: np.ndarray) -> np.ndarray:
        """Deltas of every class for raw features.

        Args:
            features: array[N, D] (unscaled).
        Returns:
            float32 array[N, K, 4].
        """
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ModelError(f"features of shape {f.shape} do not fit box regressors of dimension {self.dim}")
        k, d = self.num_classes, self.dim
        w = self.weights.transpose(1, 0, 2).reshape(d, k * 4)      # one matmul for all classes
        z = ((f @ w) * np.float32(self.feature_scale)).reshape(-1, k, 4) + self.biases
        return np.einsum("nkf,kfg->nkg", z, self.target_unwhiten) + self.target_mean

    def apply(self, features: np.ndarray, boxes: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Refine boxes.

        Args:
            features: array[N, D], raw features of ``boxes``.
            boxes: array[N, 4].
            labels: optional int array[N]: refine each box for this class only.
        Returns:
            float64 array[N, K, 4] (every class), or [N, 4] with ``labels``; not clipped.
        """
        deltas = self.predict_deltas(features)
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(labels) != len(deltas) or (len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes)):
                raise ModelError(f"labels must be {len(deltas)} class indices in [0, {self.num_classes})")
            deltas = deltas[np.arange(len(deltas)), labels]
        return decode(boxes, deltas)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors for the model file (prefix them with ``bbox.``)."""
        return {"weight": torch.from_numpy(self.weights.copy()), "bias": torch.from_numpy(self.biases.copy()),
                "target_mean": torch.from_numpy(self.target_mean.copy()),
                "target_unwhiten": torch.from_numpy(self.target_unwhiten.copy())}

    def to_meta(self) -> dict[str, Any]:
        return {"feature_scale": self.feature_scale, **self.meta}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "BoxRegressors":
        """Inverse of :meth:`tensors` + :meth:`to_meta` (raises :class:`ModelError`)."""
        try:
            arrays = {n: tensors[t].detach().cpu().numpy() for n, t in
                      (("weights", "weight"), ("biases", "bias"), ("target_mean", "target_mean"),
                       ("target_unwhiten", "target_unwhiten"))}
            scale = float(meta["feature_scale"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"box regressor state is incomplete: {e!r}") from None
        rest = {k: v for k, v in meta.items() if k != "feature_scale"}
        return cls(**arrays, feature_scale=scale, meta=rest)
