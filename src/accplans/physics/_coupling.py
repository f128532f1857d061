"""Linear coupling numerics: eigen-tunes, closest tune approach, the coupling fit.

Pure numpy/scipy on arrays in SI units. The online model (or the twin) gives the one-turn
matrix and the responses; nothing here knows pyAT.

Closest tune approach ``|C-|``
    The minimum distance of the two eigen-tunes when the uncoupled tunes are brought together
    (Qx - Qy -> integer). :func:`closest_tune_approach` computes it from a coupled 4x4 one-turn
    matrix ``M``: an optics-transparent phase trombone ``T(d)`` (a rotation by ``+2 pi d`` in
    the normalized coordinates of x and by ``-2 pi d`` in those of y, built with the Twiss
    parameters of ``M``'s diagonal blocks) is put in front of ``M``, and ``d`` is chosen to
    minimize the distance of the eigen-tunes of ``T(d) M``; that distance is ``|C-|``. Unlike
    a quadrupole tune scan, the trombone changes no beta function, so the value belongs to the
    working point's optics. A tune scan on the machine (:func:`fit_tune_scan`) measures the
    same quantity with the tune knobs: the eigen-tunes follow
    ``q1,2 = (qx + qy) / 2 +- sqrt((qx - qy)^2 + |C-|^2) / 2``.

Coupling fit (:func:`fit_coupling`)
    The coupling observables are the off-diagonal blocks of the orbit response matrix (y
    response to horizontal correctors, x response to vertical ones, m/rad) and the vertical
    dispersion (m, times a weight). Their linear response to the skew windings (from the
    model) gives, by Tikhonov-regularised least squares (:func:`solve_correction`), the skew
    strength changes that cancel the measured coupling; with ``roll_columns``, BPM rolls are
    fitted at the same time (a rolled BPM mixes the planes of its own readings only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear, minimize_scalar

__all__ = [
    "ClosestApproach",
    "CouplingFit",
    "TuneScanFit",
    "bpm_roll_columns",
    "closest_tune_approach",
    "coupling_observables",
    "eigen_tunes",
    "fit_coupling",
    "fit_tune_scan",
]

_S2 = np.array([[0.0, 1.0], [-1.0, 0.0]])
_S4 = np.block([[_S2, np.zeros((2, 2))], [np.zeros((2, 2)), _S2]])


def _wrap(q: np.ndarray | float) -> np.ndarray:
    """Fold tune differences into [-0.5, 0.5)."""
    return (np.asarray(q, dtype=float) + 0.5) % 1.0 - 0.5


def eigen_tunes(m44: np.ndarray) -> np.ndarray:
    """The two eigen-tunes (fractional, in [0, 1)) of a stable 4x4 one-turn matrix.

    Each eigen-mode is taken with the orientation that makes its invariant positive
    (``Im(v^H S v) > 0``), as pyAT's ``a_matrix`` does, so a tune above 0.5 is told from one
    below it. Mode 1 is the one whose eigenvector has the larger horizontal part.

    Raises:
        ValueError: the matrix is not 4x4 or its eigenvalues leave the unit circle (unstable).
    """
    m = np.asarray(m44, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"eigen_tunes: need a 4x4 matrix, got shape {m.shape}")
    vals, vecs = np.linalg.eig(m)
    if np.any(np.abs(np.abs(vals) - 1.0) > 1e-6) or np.any(np.abs(np.imag(vals)) < 1e-12):
        raise ValueError("eigen_tunes: unstable motion (eigenvalues off the unit circle)")
    tunes, xpart = [], []
    for k in range(4):
        v = vecs[:, k]
        if np.imag(np.conj(v) @ _S4 @ v) <= 0:
            continue
        tunes.append(float(np.mod(np.angle(vals[k]) / (2 * np.pi), 1.0)))
        xpart.append(float(np.sum(np.abs(v[:2]) ** 2) / np.sum(np.abs(v) ** 2)))
    if len(tunes) != 2:
        raise ValueError("eigen_tunes: cannot separate the two eigen-modes")
    order = np.argsort(xpart)[::-1]
    return np.array(tunes)[order]


def _twiss_of_block(block: np.ndarray, plane: str) -> tuple[float, float]:
    cos_mu = 0.5 * float(np.trace(block))
    if abs(cos_mu) >= 1.0:
        raise ValueError(f"closest_tune_approach: the {plane} block of M is not stable")
    sin_mu = np.sign(block[0, 1]) * np.sqrt(1.0 - cos_mu**2)
    return float(block[0, 1] / sin_mu), float((block[0, 0] - block[1, 1]) / (2.0 * sin_mu))


def _rotation(beta: float, alpha: float, phase: float) -> np.ndarray:
    c, s = np.cos(phase), np.sin(phase)
    return np.array([[c + alpha * s, beta * s], [-(1 + alpha**2) / beta * s, c - alpha * s]])


@dataclass(frozen=True)
class ClosestApproach:
    """The closest tune approach of a one-turn matrix.

    Attributes:
        c_minus: ``|C-|``, the smallest distance of the eigen-tunes (tune units).
        shift: the trombone tune change ``d`` (x by +d, y by -d) at the closest approach.
        tunes: (2,) eigen-tunes of the matrix itself (fractional).
    """

    c_minus: float
    shift: float
    tunes: np.ndarray


def closest_tune_approach(m44: np.ndarray) -> ClosestApproach:
    """``|C-|`` of a coupled 4x4 one-turn matrix by an optics-transparent trombone (module doc).

    Raises:
        ValueError: the matrix is unstable, or the tunes cannot be brought together stably.
    """
    m = np.asarray(m44, dtype=float)
    tunes = eigen_tunes(m)
    bx, ax = _twiss_of_block(m[:2, :2], "x")
    by, ay = _twiss_of_block(m[2:, 2:], "y")
    d0 = -0.5 * float(_wrap(tunes[0] - tunes[1]))

    def split(d: float) -> float:
        t = np.zeros((4, 4))
        t[:2, :2] = _rotation(bx, ax, 2 * np.pi * d)
        t[2:, 2:] = _rotation(by, ay, -2 * np.pi * d)
        try:
            q = eigen_tunes(t @ m)
        except ValueError:
            return 1.0
        return float(abs(_wrap(q[0] - q[1])))

    span = 0.02 + 2.0 * split(d0)
    res = minimize_scalar(
        split, bounds=(d0 - span, d0 + span), method="bounded", options={"xatol": 1e-9}
    )
    best = float(res.fun)
    if best >= 1.0:
        raise ValueError("closest_tune_approach: no stable motion with the tunes together")
    return ClosestApproach(c_minus=best, shift=float(res.x), tunes=tunes)


@dataclass(frozen=True)
class TuneScanFit:
    """``|C-|`` fitted to a tune scan (:func:`fit_tune_scan`).

    Attributes:
        c_minus: ``|C-|`` (tune units).
        std: its standard error from the fit's residuals (NaN with too few points); where
            ``|C-|^2`` is below its own error, the square root of that error.
        crossing: the scan parameter where the uncoupled tunes cross.
        coefficients: ``(c0, c1, c2)`` of ``split^2 = c0 + c1 t + c2 t^2``.
    """

    c_minus: float
    std: float
    crossing: float
    coefficients: np.ndarray


def fit_tune_scan(parameter: np.ndarray, tunes: np.ndarray) -> TuneScanFit:
    """``|C-|`` from eigen-tunes measured while a knob moves the tunes through each other.

    The squared distance of the eigen-tunes is ``(qx - qy)^2 + |C-|^2`` with ``qx - qy``
    linear in the knob ``t``: a parabola in ``t`` whose minimum is ``|C-|^2``.

    Args:
        parameter: (n,) knob values ``t`` of the scan (any unit), n >= 3, spanning the crossing.
        tunes: (n, 2) measured tunes (either order).

    Raises:
        ValueError: fewer than 3 points, or a parabola that opens downwards.
    """
    t = np.asarray(parameter, dtype=float)
    q = np.asarray(tunes, dtype=float)
    if t.ndim != 1 or q.shape != (t.size, 2) or t.size < 3:
        raise ValueError("fit_tune_scan: need n >= 3 knob values and (n, 2) tunes")
    split2 = _wrap(q[:, 0] - q[:, 1]) ** 2
    a = np.column_stack([np.ones_like(t), t, t**2])
    coef, *_ = np.linalg.lstsq(a, split2, rcond=None)
    c0, c1, c2 = (float(c) for c in coef)
    if c2 <= 0:
        raise ValueError("fit_tune_scan: the scan does not show a minimum of the tune distance")
    crossing = -c1 / (2 * c2)
    cmin2 = c0 - c1**2 / (4 * c2)
    std = float("nan")
    if t.size > 3:
        resid = split2 - a @ coef
        cov = np.linalg.pinv(a.T @ a) * float(resid @ resid) / (t.size - 3)
        g = np.array([1.0, -c1 / (2 * c2), c1**2 / (4 * c2**2)])
        sigma2 = float(np.sqrt(max(float(g @ cov @ g), 0.0)))  # of |C-|^2
        # of |C-| = sqrt(|C-|^2): propagated where |C-|^2 stands above its error, else the
        # error's own square root (near zero the propagation diverges)
        std = sigma2 / (2 * np.sqrt(cmin2)) if cmin2 > sigma2 else float(np.sqrt(sigma2))
    return TuneScanFit(
        c_minus=float(np.sqrt(max(cmin2, 0.0))),
        std=std,
        crossing=float(crossing),
        coefficients=np.array([c0, c1, c2]),
    )


def coupling_observables(
    matrix: np.ndarray,
    planes: Sequence[str],
    dy: np.ndarray | None = None,
    *,
    dispersion_weight: float = 0.0,
) -> np.ndarray:
    """The coupling observables of an ORM (and vertical dispersion), as one vector.

    Args:
        matrix: (2 nbpm, ncorr) orbit response [m/rad], rows ``[x; y]``.
        planes: (ncorr,) ``"h"`` or ``"v"``: each column's corrector plane.
        dy: (nbpm,) vertical dispersion [m], or None.
        dispersion_weight: weight of the dispersion rows [1/rad]: ``w * Dy`` joins the
            m/rad rows of the matrix.

    Returns:
        ``[y rows of h columns (column-major); x rows of v columns; w * Dy]``.
    """
    r = np.asarray(matrix, dtype=float)
    nb = r.shape[0] // 2
    p = np.asarray(planes)
    if r.shape != (2 * nb, p.size):
        raise ValueError(f"coupling_observables: matrix {r.shape} vs {p.size} planes")
    parts = [r[nb:, p == "h"].ravel(order="F"), r[:nb, p == "v"].ravel(order="F")]
    if dy is not None and dispersion_weight > 0:
        parts.append(dispersion_weight * np.asarray(dy, dtype=float))
    return np.concatenate(parts)


def bpm_roll_columns(
    matrix: np.ndarray,
    planes: Sequence[str],
    dx: np.ndarray | None = None,
    *,
    dispersion_weight: float = 0.0,
) -> np.ndarray:
    """Response of :func:`coupling_observables` to each BPM's roll (rad), from a model ORM.

    A BPM rolled by ``r`` reads ``u = x + r y`` and ``v = y - r x`` (to first order), so its
    y rows of horizontal correctors change by ``-r`` times its x rows, its x rows of vertical
    correctors by ``+r`` times its y rows and its vertical dispersion by ``-r Dx``.

    Args:
        matrix: (2 nbpm, ncorr) model ORM [m/rad].
        planes: (ncorr,) corrector planes.
        dx: (nbpm,) model horizontal dispersion [m] (with ``dispersion_weight`` > 0).
        dispersion_weight: as in :func:`coupling_observables`.

    Returns:
        (nobs, nbpm) matrix.
    """
    r = np.asarray(matrix, dtype=float)
    nb = r.shape[0] // 2
    p = np.asarray(planes)
    xh, yv = r[:nb, p == "h"], r[nb:, p == "v"]
    nh, nv = xh.shape[1], yv.shape[1]
    use_d = dx is not None and dispersion_weight > 0
    out = np.zeros((nb * (nh + nv) + (nb if use_d else 0), nb))
    rows = np.arange(nb)
    for j in range(nh):
        out[j * nb + rows, rows] = -xh[:, j]
    base = nb * nh
    for j in range(nv):
        out[base + j * nb + rows, rows] = yv[:, j]
    if use_d:
        assert dx is not None
        out[nb * (nh + nv) + rows, rows] = -dispersion_weight * np.asarray(dx, dtype=float)
    return out


@dataclass(frozen=True)
class CouplingFit:
    """The outcome of :func:`fit_coupling`.

    Attributes:
        skew_change: (nskew,) skew strength changes [m^-2] that cancel the measured coupling
            (the coupling found is that of ``-skew_change`` added to the model).
        bpm_roll_rad: (nbpm,) fitted BPM rolls [rad] (zeros without roll columns).
        residual: (nobs,) predicted observables after the change.
        rms_before: rms of the observables.
        rms_after: rms of the predicted residual.
        singular_values: singular values of the weighted system.
        at_limit: (nskew,) skews whose change is at a limit.
    """

    skew_change: np.ndarray
    bpm_roll_rad: np.ndarray
    residual: np.ndarray
    rms_before: float
    rms_after: float
    singular_values: np.ndarray
    at_limit: np.ndarray


def fit_coupling(
    observed: np.ndarray,
    skew_response: np.ndarray,
    *,
    roll_columns: np.ndarray | None = None,
    alpha_rel: float = 1e-2,
    lower: np.ndarray | float | None = None,
    upper: np.ndarray | float | None = None,
) -> CouplingFit:
    """Skew strength changes (and BPM rolls) that cancel measured coupling observables.

    Solves ``min |observed + S dk + B r|^2`` (``S`` the skew response, ``B`` the BPM roll
    columns), Tikhonov-regularised at ``alpha_rel`` times the largest singular value, with
    ``dk`` within ``[lower, upper]``. The rolls found are ``-r`` (the coupling they explain).

    Args:
        observed: (nobs,) :func:`coupling_observables` of the measurement.
        skew_response: (nobs, nskew) their response to each skew strength [per m^-2].
        roll_columns: (nobs, nbpm) :func:`bpm_roll_columns`, to fit BPM rolls too.
        alpha_rel: Tikhonov parameter relative to the largest singular value.
        lower: lowest skew change [m^-2] (scalar or per skew).
        upper: highest skew change [m^-2].
    """
    b = np.asarray(observed, dtype=float)
    s = np.asarray(skew_response, dtype=float)
    if s.ndim != 2 or s.shape[0] != b.size:
        raise ValueError(f"fit_coupling: response {s.shape} vs {b.size} observables")
    if not np.isfinite(alpha_rel) or alpha_rel < 0:
        raise ValueError(f"fit_coupling: alpha_rel must be >= 0, got {alpha_rel!r}")
    ns = s.shape[1]
    a = s if roll_columns is None else np.hstack([s, np.asarray(roll_columns, dtype=float)])
    # columns scaled to unit norm so that rolls and skews are regularised alike
    norms = np.linalg.norm(a, axis=0)
    norms[norms == 0] = 1.0
    scaled = a / norms
    lo = np.full(a.shape[1], -np.inf)
    hi = np.full(a.shape[1], np.inf)
    if lower is not None:
        lo[:ns] = np.broadcast_to(np.asarray(lower, dtype=float), (ns,))
    if upper is not None:
        hi[:ns] = np.broadcast_to(np.asarray(upper, dtype=float), (ns,))
    # normal equations (the system is tall: tens of thousands of rows, a few hundred unknowns)
    gram = scaled.T @ scaled
    rhs = scaled.T @ -b
    sv = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))
    alpha = alpha_rel * float(sv[0]) if sv.size else 0.0
    reg = gram + alpha**2 * np.eye(gram.shape[0])
    y = np.linalg.solve(reg, rhs)
    x = y / norms
    if np.any((x < lo) | (x > hi)):
        # the same regularised problem with bounds, reduced: |R y - R^-T rhs|, R^T R = reg
        chol = np.linalg.cholesky(reg)  # lower: reg = L L^T, R = L^T
        target = np.linalg.solve(chol, rhs)
        fit = lsq_linear(chol.T, target, bounds=(lo * norms, hi * norms), method="bvls")
        x = np.asarray(fit.x, dtype=float) / norms
    tol = 1e-9 * np.maximum(1.0, np.abs(x))
    at_limit = (np.isfinite(lo) & (x <= lo + tol)) | (np.isfinite(hi) & (x >= hi - tol))
    x = np.clip(x, lo, hi)
    residual = b + a @ x
    return CouplingFit(
        skew_change=x[:ns].copy(),
        bpm_roll_rad=-x[ns:].copy() if roll_columns is not None else np.zeros(0),
        residual=residual,
        rms_before=float(np.sqrt(np.mean(b**2))),
        rms_after=float(np.sqrt(np.mean(residual**2))),
        singular_values=sv,
        at_limit=at_limit[:ns].copy(),
    )
