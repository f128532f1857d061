"""Dispersion from an RF-frequency scan, and the RF step of a momentum offset (pure numpy).

An RF frequency step ``df`` changes the beam's relative momentum by, to first order,
``dp = -df / (f * alpha_c)`` (``alpha_c`` the momentum compaction factor). The orbit at each
BPM then moves by ``D * dp + D2 * dp**2 + ...``: :func:`fit_dispersion` fits a polynomial per
BPM through the orbits measured at several ``dp`` (each point a fresh orbit) and returns the
linear coefficient (the dispersion ``D``, m) and, for ``order=2``, the second-order dispersion.

Reference:
    A. Wolski, "Beam Dynamics in High Energy Particle Accelerators" (2014), ch. 3 (dispersion,
    momentum compaction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "DispersionFit",
    "delta_for_frequency_step",
    "dispersion_standard_error",
    "fit_dispersion",
    "frequency_step_for_delta",
]


@dataclass(frozen=True)
class DispersionFit:
    """The outcome of :func:`fit_dispersion`.

    Attributes:
        dispersion: (nrows,) linear coefficient ``d orbit / d dp`` (m); NaN where fewer valid
            points than coefficients.
        second_order: (nrows,) quadratic coefficient (m), ``None`` for a linear fit.
        offset: (nrows,) orbit at ``dp = 0`` from the fit (m).
        std_dispersion: (nrows,) standard error of ``dispersion`` from the fit residuals (m);
            NaN when the fit has no degree of freedom left.
        residual_rms: (nrows,) rms of the fit residuals (m).
    """

    dispersion: np.ndarray
    second_order: np.ndarray | None
    offset: np.ndarray
    std_dispersion: np.ndarray
    residual_rms: np.ndarray


def delta_for_frequency_step(df_hz: np.ndarray | float, f_hz: float, alpha_c: float) -> np.ndarray:
    """Relative momentum offset of an RF frequency step, ``-df / (f alpha_c)`` (first order).

    Args:
        df_hz: frequency step(s) from the frequency ``f_hz`` (Hz).
        f_hz: RF frequency (Hz), > 0.
        alpha_c: momentum compaction factor (non-zero).
    """
    if not np.isfinite(f_hz) or f_hz <= 0:
        raise ValueError(f"RF frequency must be finite and > 0, got {f_hz!r} Hz")
    if not np.isfinite(alpha_c) or alpha_c == 0:
        raise ValueError(f"alpha_c must be finite and non-zero, got {alpha_c!r}")
    return -np.asarray(df_hz, float) / (f_hz * alpha_c)


def frequency_step_for_delta(dp: np.ndarray | float, f_hz: float, alpha_c: float) -> np.ndarray:
    """RF frequency step (Hz) that moves the momentum by ``dp``: ``-dp f alpha_c``."""
    if not np.isfinite(f_hz) or f_hz <= 0:
        raise ValueError(f"RF frequency must be finite and > 0, got {f_hz!r} Hz")
    if not np.isfinite(alpha_c) or alpha_c == 0:
        raise ValueError(f"alpha_c must be finite and non-zero, got {alpha_c!r}")
    return -np.asarray(dp, float) * f_hz * alpha_c


def fit_dispersion(
    dp: np.ndarray,
    orbits: np.ndarray,
    *,
    order: int = 1,
    valid: np.ndarray | None = None,
) -> DispersionFit:
    """Least-squares polynomial fit of the orbit against the momentum offset, per row.

    Args:
        dp: (npoints,) relative momentum offsets of the measured orbits.
        orbits: (npoints, nrows) orbits (m), one row per point (e.g. ``[x; y]`` of the BPMs).
        order: 1 (``orbit = offset + D dp``) or 2 (adds ``D2 dp**2``).
        valid: (npoints, nrows) booleans: the readings to use (default: the finite ones).

    Returns:
        The fit (see :class:`DispersionFit`).

    Raises:
        ValueError: bad shapes, an order other than 1 or 2, non-finite ``dp`` or fewer distinct
            ``dp`` values than coefficients.
    """
    dp = np.asarray(dp, float)
    y = np.asarray(orbits, float)
    if dp.ndim != 1 or y.ndim != 2 or y.shape[0] != dp.size:
        raise ValueError(
            f"fit_dispersion: dp has shape {dp.shape}, orbits {y.shape}: need (npoints,) and "
            "(npoints, nrows)"
        )
    if order not in (1, 2):
        raise ValueError(f"fit_dispersion: order must be 1 or 2, got {order!r}")
    if not np.all(np.isfinite(dp)):
        raise ValueError("fit_dispersion: dp must be finite")
    ncoef = order + 1
    if np.unique(dp).size < ncoef:
        raise ValueError(
            f"fit_dispersion: order {order} needs at least {ncoef} distinct dp values, got "
            f"{np.unique(dp).size}"
        )
    ok = np.isfinite(y) if valid is None else (np.asarray(valid, bool) & np.isfinite(y))
    if ok.shape != y.shape:
        raise ValueError(f"fit_dispersion: valid has shape {ok.shape}, orbits {y.shape}")
    basis = np.vander(dp, ncoef, increasing=True)  # 1, dp, dp^2
    nrows = y.shape[1]
    coef = np.full((ncoef, nrows), np.nan)
    std = np.full(nrows, np.nan)
    rms = np.full(nrows, np.nan)
    # rows with the same valid points share one solve
    patterns, inverse = np.unique(ok.T, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        cols = np.flatnonzero(inverse.ravel() == p)
        a = basis[pattern]
        if np.unique(dp[pattern]).size < ncoef:
            continue
        b = np.nan_to_num(y[np.ix_(pattern, cols)])
        c, *_ = np.linalg.lstsq(a, b, rcond=None)
        coef[:, cols] = c
        res = b - a @ c
        rms[cols] = np.sqrt(np.mean(res**2, axis=0))
        dof = a.shape[0] - ncoef
        if dof > 0:
            cov = np.linalg.inv(a.T @ a)
            sigma2 = np.sum(res**2, axis=0) / dof
            std[cols] = np.sqrt(sigma2 * cov[1, 1])
    return DispersionFit(
        dispersion=coef[1],
        second_order=coef[2] if order == 2 else None,
        offset=coef[0],
        std_dispersion=std,
        residual_rms=rms,
    )


def dispersion_standard_error(
    dp: np.ndarray, noise_m: float, *, n_samples: int | np.ndarray = 1, order: int = 1
) -> float:
    """Standard error (m) of the dispersion :func:`fit_dispersion` gets from white BPM noise.

    The noise budget of a scan: each point is the mean of ``n_samples`` readings of rms
    ``noise_m``, so the fitted slope has the error ``noise_m sqrt([(A^T W A)^-1]_11)`` with
    ``A`` the fit's basis (``1, dp[, dp^2]``) and ``W`` the samples per point. For the
    symmetric linear scan ``0, +-dp k/n`` it is ``noise / sqrt(n_samples sum(dp_i^2))``.

    Args:
        dp: (npoints,) relative momentum offsets of the scan (the reference point included).
        noise_m: rms noise of one BPM reading (m).
        n_samples: readings averaged per point (scalar or one per point).
        order: polynomial order of the fit (1 or 2).
    """
    dp = np.asarray(dp, float)
    if order not in (1, 2):
        raise ValueError(f"dispersion_standard_error: order must be 1 or 2, got {order!r}")
    if np.unique(dp).size < order + 1:
        raise ValueError(
            f"dispersion_standard_error: order {order} needs {order + 1} distinct dp values"
        )
    weights = np.broadcast_to(np.asarray(n_samples, float), dp.shape)
    if np.any(weights < 1):
        raise ValueError("dispersion_standard_error: n_samples must be >= 1")
    basis = np.vander(dp, order + 1, increasing=True)
    cov = np.linalg.inv(basis.T @ (weights[:, None] * basis))
    return float(noise_m * np.sqrt(cov[1, 1]))
