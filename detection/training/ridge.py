"""The ridge solver of box regression: one class's targets, whitened as the reference does,
fitted by ridge regression (:func:`fit_class_regressor`) in bounded memory
(:func:`regression_memory_bytes`). The recipe is in :mod:`detection.training.bbox_regression`.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from ..errors import DetectionError

__all__ = ["ridge", "fit_class_regressor", "regression_memory_bytes", "SOLVE_CHUNK"]

#: Rows / columns converted to float64 at a time by the ridge solver.
SOLVE_CHUNK = 2048

#: Added to the eigenvalues of the target covariance before whitening (the reference's 0.001):
#: keeps the transform finite when a target coordinate barely varies (e.g. a single sample).
_WHITEN_EPS = 1e-3


def regression_memory_bytes(num_samples: int, dim: int) -> int:
    """Bytes one class's box-regression fit holds at most: its float32 features [N, D], the
    solve's float64 matrix (``min(N, D + 1)`` square: primal or dual, whichever is smaller) and
    two float64 blocks of ``SOLVE_CHUNK`` rows or columns."""
    m = min(num_samples, dim + 1)
    return 4 * num_samples * dim + 8 * m * m + 2 * 8 * SOLVE_CHUNK * max(num_samples, dim + 1)


def _add_gram(out: np.ndarray, a: np.ndarray) -> None:
    """``out += a.T @ a`` in place, a block of rows of ``out`` at a time: no second N x N
    temporary beside ``out``."""
    for lo in range(0, out.shape[0], SOLVE_CHUNK):
        out[lo:lo + SOLVE_CHUNK] += a[:, lo:lo + SOLVE_CHUNK].T @ a


def _solve_spd(matrix: np.ndarray, rhs: np.ndarray, lam: float) -> np.ndarray:
    """Solve ``matrix @ x = rhs``. With ``lam > 0`` the matrix is positive definite: Cholesky,
    overwriting it (``np.linalg.solve`` would copy the N x N matrix first). With ``lam = 0`` it
    may be singular: least squares."""
    if lam == 0:
        return np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    try:
        factor = scipy.linalg.cho_factor(matrix, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        raise DetectionError(f"bbox_regression: the ridge system is not positive definite at lam={lam} "
                             "(features too large for float64?); raise bbox.lam") from None
    return scipy.linalg.cho_solve(factor, rhs, check_finite=False)


def ridge(x: np.ndarray, y: np.ndarray, lam: float, regularize_bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """``min ||A b - y||^2 + lam ||b||^2`` with ``A = [x, 1]`` (``regularize_bias``: the bias
    column is penalised, as SPP-net's code does) or an unpenalised intercept (x and y centred).

    Memory is one ``min(N, D)^2`` float64 matrix plus float64 chunks of ``x``, never a float64
    copy of ``x``: pool5 features are 25,600 wide, and sklearn's Ridge on a float64 copy of 9,000
    of them (copied again for centring) took ~6 GB. The Gram matrix is accumulated in float64
    (the normal equations lose digits in float32) block by block in place, and solved by an
    in-place Cholesky factorisation (it is positive definite for lam > 0): ``(A'A + lam I) b =
    A'y`` when N > D, else the kernel form ``b = A' (A A' + lam I)^-1 y``.

    Returns ``(weight [D, k], bias [k])``.
    """
    n, d = x.shape
    x_mean = np.zeros(d) if regularize_bias else x.mean(axis=0, dtype=np.float64)
    y_mean = np.zeros(y.shape[1]) if regularize_bias else y.mean(axis=0)
    yc = y - y_mean

    def cols(lo: int, hi: int) -> np.ndarray:      # float64 (centred) columns lo:hi of A
        return x[:, lo:hi].astype(np.float64) - x_mean[lo:hi]

    def rows(lo: int, hi: int) -> np.ndarray:      # float64 (centred) rows lo:hi of A
        return x[lo:hi].astype(np.float64) - x_mean

    ones = 1.0 if regularize_bias else 0.0         # the bias column of A (absent: centred)
    if n > d:
        gram = np.zeros((d + 1, d + 1))
        rhs = np.zeros((d + 1, y.shape[1]))
        for lo in range(0, n, SOLVE_CHUNK):
            a = np.concatenate([rows(lo, lo + SOLVE_CHUNK), np.full((min(SOLVE_CHUNK, n - lo), 1), ones)], axis=1)
            _add_gram(gram, a)
            rhs += a.T @ yc[lo:lo + SOLVE_CHUNK]
        gram[np.diag_indices_from(gram)] += lam
        if not regularize_bias:
            gram[d, d] = 1.0                       # no bias column: a dummy unknown fixed at 0
        beta = _solve_spd(gram, rhs, lam)
        weight, b = beta[:d], beta[d]
    else:
        kernel = np.full((n, n), ones)
        for lo in range(0, d, SOLVE_CHUNK):
            _add_gram(kernel, cols(lo, lo + SOLVE_CHUNK).T)
        kernel[np.diag_indices_from(kernel)] += lam
        alpha = _solve_spd(kernel, yc, lam)
        weight = np.concatenate([cols(lo, lo + SOLVE_CHUNK).T @ alpha for lo in range(0, d, SOLVE_CHUNK)])
        b = ones * alpha.sum(axis=0)
    if not regularize_bias:
        b = y_mean - x_mean @ weight
    return weight, b


def fit_class_regressor(x: np.ndarray, y: np.ndarray, lam: float,
                        regularize_bias: bool = True) -> tuple[np.ndarray, ...]:
    """Ridge fit of one class. x: [N, D] scaled features; y: [N, 4] raw targets; ``lam`` and
    ``regularize_bias`` as in :func:`ridge` (``BBoxRegressionConfig.lam`` / ``.regularize_bias``).

    Returns ``(weight [D, 4], bias [4], mean [4], unwhiten [4, 4], train_mse [4])``.
    """
    mean = y.mean(axis=0)
    yc = y - mean
    cov = yc.T @ yc / len(yc)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, 0.0) + _WHITEN_EPS
    whiten = evecs @ np.diag(1.0 / np.sqrt(evals)) @ evecs.T
    unwhiten = evecs @ np.diag(np.sqrt(evals)) @ evecs.T
    yn = yc @ whiten
    weight, bias = ridge(x, yn, lam, regularize_bias)
    pred = (x.astype(np.float64) @ weight + bias) @ unwhiten + mean if len(x) <= SOLVE_CHUNK else \
        np.concatenate([(x[i:i + SOLVE_CHUNK].astype(np.float64) @ weight + bias) @ unwhiten + mean
                        for i in range(0, len(x), SOLVE_CHUNK)])
    mse = ((pred - y) ** 2).mean(axis=0)
    return weight, bias, mean, unwhiten, mse
