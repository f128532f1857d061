"""Orbit response from measured data: bipolar differences, noise, agreement figures."""

from __future__ import annotations

import numpy as np

__all__ = [
    "chi2_per_dof",
    "orm_from_bipolar",
    "orm_relative_difference",
    "orbit_statistics",
]


def orm_from_bipolar(
    orbit_plus_m: np.ndarray,
    orbit_minus_m: np.ndarray,
    kick_plus_rad: np.ndarray,
    kick_minus_rad: np.ndarray,
    *,
    noise_m: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Response matrix from orbits measured at +kick and -kick of each corrector.

    Args:
        orbit_plus_m: (nrows, ncorr) orbit [m] with corrector j at its plus kick, column j.
        orbit_minus_m: (nrows, ncorr) orbit [m] with corrector j at its minus kick.
        kick_plus_rad: (ncorr,) kick [rad] read back at the plus step.
        kick_minus_rad: (ncorr,) kick [rad] read back at the minus step.
        noise_m: standard error [m] of one orbit reading (scalar or (nrows, ncorr)).

    Returns:
        ``(matrix, sigma)``: the response [m/rad] (nrows, ncorr) and, when ``noise_m`` is
        given, the standard error of each element [m/rad] (else ``None``).
    """
    dk = np.asarray(kick_plus_rad, float) - np.asarray(kick_minus_rad, float)
    if np.any(dk == 0) or not np.all(np.isfinite(dk)):
        bad = np.flatnonzero((dk == 0) | ~np.isfinite(dk))
        raise ValueError(f"corrector columns {bad.tolist()} have no kick difference")
    matrix = (np.asarray(orbit_plus_m, float) - np.asarray(orbit_minus_m, float)) / dk
    sigma = None
    if noise_m is not None:
        sigma = (
            np.sqrt(2.0) * np.broadcast_to(np.asarray(noise_m, float), matrix.shape) / np.abs(dk)
        )
    return matrix, sigma


def orm_relative_difference(
    measured: np.ndarray, reference: np.ndarray, scale: float | None = None
) -> float:
    """``max |measured - reference| / scale``: the agreement figure of an ORM (or a block).

    Args:
        measured: the measured matrix (or block), m/rad.
        reference: the reference of the same shape, m/rad.
        scale: the normaliser; default ``max |reference|``. Give the largest element of the
            whole matrix for a cross-plane block, which is zero on an uncoupled lattice.
    """
    reference = np.asarray(reference, float)
    scale = float(np.max(np.abs(reference))) if scale is None else float(scale)
    if scale == 0:
        raise ValueError("reference matrix is zero: give the scale of the whole matrix")
    return float(np.max(np.abs(np.asarray(measured, float) - reference)) / scale)


def chi2_per_dof(measured: np.ndarray, reference: np.ndarray, sigma: np.ndarray | float) -> float:
    """Chi-square per degree of freedom of ``measured`` against a noise-free ``reference``."""
    r = (np.asarray(measured, float) - np.asarray(reference, float)) / sigma
    r = r[np.isfinite(r)]
    return float(np.sum(r**2) / r.size)


def orbit_statistics(
    samples_m: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation and count of orbit samples, ignoring invalid readings.

    Args:
        samples_m: (nsamples, nbpm) readings [m].
        valid: (nsamples, nbpm) booleans; invalid readings are left out.

    Returns:
        ``(mean, std, n)`` per BPM; ``mean`` and ``std`` are NaN where no reading was valid and
        ``std`` is NaN where only one was.
    """
    x = np.asarray(samples_m, float)
    ok = np.isfinite(x) if valid is None else (np.asarray(valid, bool) & np.isfinite(x))
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(ok, x, 0.0).sum(axis=0) / n
        dev = np.where(ok, x - mean, 0.0)
        std = np.sqrt((dev**2).sum(axis=0) / (n - 1))
    mean = np.where(n > 0, mean, np.nan)
    std = np.where(n > 1, std, np.nan)
    return mean, std, n
