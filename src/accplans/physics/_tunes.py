"""Tunes and chromaticity: averaging tune readings, chromaticity fits, knob solves (pure numpy).

A tune monitor reads fractional tunes (in [0, 1)); differences of tunes are taken modulo 1 into
[-0.5, 0.5) (:func:`wrap_tune`), and a series of readings is unwrapped around its first one
before it is averaged or fitted, so a tune near an integer does not average to 0.5.

The chromaticity is the unnormalized ``xi = dQ / d(dp/p)``: :func:`fit_chromaticity` fits a
polynomial ``Q(dp) = Q0 + xi dp + xi2 dp**2`` through tunes measured at several momentum offsets
(an RF-frequency scan, ``dp = -df / (f alpha_c)``), with standard errors from the residuals.

Tune and chromaticity corrections are linear least-squares problems in knob units:
:func:`solve_knobs` returns the knob changes that move the measured values by ``-error`` through
a response matrix (the online model's ``tune_response`` or ``chromaticity_response``), with
optional weights and an SVD cut (numpy's pseudo-inverse does the work).

Reference:
    A. Wolski, "Beam Dynamics in High Energy Particle Accelerators" (2014), ch. 3 and 11
    (chromaticity, its correction with sextupoles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ChromaticityFit",
    "KnobSolution",
    "TuneAverage",
    "average_tunes",
    "fit_chromaticity",
    "solve_knobs",
    "unwrap_tunes",
    "wrap_tune",
]


def wrap_tune(dq: npt.ArrayLike) -> np.ndarray:
    """Tune differences modulo 1, in [-0.5, 0.5)."""
    return np.mod(np.asarray(dq, float) + 0.5, 1.0) - 0.5


def unwrap_tunes(tunes: npt.ArrayLike, reference: npt.ArrayLike | None = None) -> np.ndarray:
    """Fractional tunes made continuous around ``reference`` (default: the first row).

    Args:
        tunes: (n, ...) fractional tunes, rows in time order.
        reference: (...) the tunes each row is unwrapped around; default ``tunes[0]``.

    Returns:
        ``reference + wrap_tune(tunes - reference)``: within 0.5 of the reference.
    """
    q = np.asarray(tunes, float)
    ref = q[0] if reference is None else np.asarray(reference, float)
    return ref + wrap_tune(q - ref)


@dataclass(frozen=True)
class TuneAverage:
    """Mean of tune readings (see :func:`average_tunes`).

    Attributes:
        tunes: (2,) mean fractional tunes (x, y) in [0, 1).
        std: (2,) standard deviation of one reading.
        std_mean: (2,) standard error of the mean (``std / sqrt(n)``; NaN for one reading).
        n_samples: number of readings.
    """

    tunes: np.ndarray
    std: np.ndarray
    std_mean: np.ndarray
    n_samples: int


def average_tunes(samples: npt.ArrayLike) -> TuneAverage:
    """Average fractional tune readings (``(n, 2)``), unwrapped around the first one.

    Raises:
        ValueError: not (n, 2) with n >= 1, or a reading that is not finite.
    """
    q = np.asarray(samples, float)
    if q.ndim != 2 or q.shape[1] != 2 or q.shape[0] < 1:
        raise ValueError(f"average_tunes: need (n, 2) readings with n >= 1, got {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("average_tunes: tune readings must be finite (is there beam?)")
    q = unwrap_tunes(q)
    n = q.shape[0]
    std = q.std(axis=0, ddof=1) if n > 1 else np.full(2, np.nan)
    return TuneAverage(np.mod(q.mean(axis=0), 1.0), std, std / np.sqrt(n), n)


@dataclass(frozen=True)
class ChromaticityFit:
    """The outcome of :func:`fit_chromaticity` (planes x then y).

    Attributes:
        order: polynomial order of the fit (1 or 2).
        coefficients: (order + 1, 2) ``[Q0, xi, (xi2)]`` per plane (``Q0`` unwrapped, may lie
            outside [0, 1)).
        std_coefficients: (order + 1, 2) their standard errors from the residuals (NaN with no
            degree of freedom left).
        residual_rms: (2,) rms of the residuals (tune units).
    """

    order: int
    coefficients: np.ndarray
    std_coefficients: np.ndarray
    residual_rms: np.ndarray

    @property
    def chromaticity(self) -> np.ndarray:
        """(2,) ``xi = dQ / d(dp/p)`` (unnormalized) at ``dp = 0``."""
        return self.coefficients[1]

    @property
    def std_chromaticity(self) -> np.ndarray:
        """(2,) standard error of :attr:`chromaticity`."""
        return self.std_coefficients[1]

    @property
    def second_order(self) -> np.ndarray | None:
        """(2,) ``xi2 = (1/2) d2Q / d(dp/p)2``, ``None`` for a linear fit."""
        return self.coefficients[2] if self.order == 2 else None


def fit_chromaticity(dp: npt.ArrayLike, tunes: npt.ArrayLike, *, order: int = 1) -> ChromaticityFit:
    """Fit ``Q(dp) = Q0 + xi dp (+ xi2 dp**2)`` per plane by least squares.

    The tunes are unwrapped around the reading nearest ``dp = 0`` first. Standard errors are
    ``sqrt(diag((A^T A)^-1) * RSS / (n - order - 1))``: from the scatter of the points about the
    fit, so they include the tune monitor's noise and any misfit of the model.

    Args:
        dp: (npoints,) relative momentum offsets ``dp/p``.
        tunes: (npoints, 2) fractional tunes (x, y) measured at them.
        order: 1 or 2.

    Returns:
        The fit (see :class:`ChromaticityFit`).

    Raises:
        ValueError: bad shapes, order not 1 or 2, non-finite values, or fewer distinct ``dp``
            than coefficients.
    """
    x = np.asarray(dp, float)
    q = np.asarray(tunes, float)
    if x.ndim != 1 or q.shape != (x.size, 2):
        raise ValueError(
            f"fit_chromaticity: dp has shape {x.shape}, tunes {q.shape}: need (n,) and (n, 2)"
        )
    if order not in (1, 2):
        raise ValueError(f"fit_chromaticity: order must be 1 or 2, got {order!r}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(q))):
        raise ValueError("fit_chromaticity: dp and tunes must be finite")
    ncoef = order + 1
    if np.unique(x).size < ncoef:
        raise ValueError(
            f"fit_chromaticity: order {order} needs at least {ncoef} distinct dp values, got "
            f"{np.unique(x).size}"
        )
    q = unwrap_tunes(q, q[int(np.argmin(np.abs(x)))])
    a = np.vander(x, ncoef, increasing=True)  # 1, dp, dp^2
    coef, *_ = np.linalg.lstsq(a, q, rcond=None)
    res = q - a @ coef
    dof = x.size - ncoef
    cov = np.linalg.inv(a.T @ a)
    if dof > 0:
        s2 = np.sum(res**2, axis=0) / dof
        std = np.sqrt(np.outer(np.diag(cov), s2))
    else:
        std = np.full_like(coef, np.nan)
    return ChromaticityFit(order, coef, std, np.sqrt(np.mean(res**2, axis=0)))


@dataclass(frozen=True)
class KnobSolution:
    """The outcome of :func:`solve_knobs`.

    Attributes:
        steps: (nknobs,) knob changes (knob units) that cancel the error.
        predicted: (nvalues,) what the values move by, ``response @ steps``.
        residual: (nvalues,) the error the response predicts after the steps,
            ``error + predicted``.
        singular_values: all singular values of the weighted response.
        n_used: singular values kept.
    """

    steps: np.ndarray
    predicted: np.ndarray
    residual: np.ndarray
    singular_values: np.ndarray
    n_used: int


def solve_knobs(
    response: npt.ArrayLike,
    error: npt.ArrayLike,
    *,
    weights: npt.ArrayLike | None = None,
    svd_cut: float | None = None,
    n_singular: int | None = None,
) -> KnobSolution:
    """Knob changes ``s`` minimizing ``|W (error + response @ s)|`` with the smallest ``|s|``.

    Args:
        response: (nvalues, nknobs) change of each value per knob unit (e.g. tunes per
            m^-2 of a quadrupole knob).
        error: (nvalues,) measured minus target (same units as the values).
        weights: (nvalues,) weight of each value (default 1: e.g. ``1 / tolerance``).
        svd_cut: drop singular values below ``svd_cut`` times the largest (default: keep all
            above numerical noise, 1e-10).
        n_singular: keep at most this many singular values.

    Returns:
        The solution (see :class:`KnobSolution`).

    Raises:
        ValueError: bad shapes, non-finite values, or non-positive weights.
    """
    r = np.asarray(response, float)
    e = np.asarray(error, float)
    if r.ndim != 2 or e.shape != (r.shape[0],) or r.shape[1] < 1:
        raise ValueError(
            f"solve_knobs: response has shape {r.shape}, error {e.shape}: need (m, k), (m,)"
        )
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(e))):
        raise ValueError("solve_knobs: response and error must be finite")
    w = np.ones(r.shape[0]) if weights is None else np.asarray(weights, float)
    if w.shape != e.shape or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"solve_knobs: weights must be (m,) finite and > 0, got {w!r}")
    if svd_cut is not None and not 0 <= svd_cut < 1:
        raise ValueError(f"solve_knobs: svd_cut must be in [0, 1), got {svd_cut!r}")
    rw = w[:, None] * r
    u, s, vt = np.linalg.svd(rw, full_matrices=False)
    cut = 1e-10 if svd_cut is None else max(svd_cut, 1e-10)
    keep = s > cut * (s[0] if s.size else 0.0)
    if n_singular is not None:
        keep &= np.arange(s.size) < int(n_singular)
    n_used = int(np.sum(keep))
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    steps = -(vt.T * inv) @ (u.T @ (w * e))
    predicted = r @ steps
    return KnobSolution(steps, predicted, e + predicted, s, n_used)
