"""Quadrupole beam-based alignment: the BPM reading at which a quadrupole modulation does nothing.

A quadrupole whose gradient changes by ``dK`` kicks a beam passing at ``x`` through it (centre
``x0``, length ``L``) by ``-dK L (x - x0)``: the closed orbit everywhere changes by a fixed shape
times ``(x - x0)``. BBA moves the beam through the quadrupole with a scan knob (a local bump),
measures at each scan position ``i`` the *difference orbit* ``d_i`` (all BPMs) between ``+dK``
and ``-dK``, and the reading ``r_i`` of the BPM next to the quadrupole. The scan knob moves the
beam at the BPM and in the quadrupole in proportion, so ``d_i = s (r_i - c) u`` with ``u`` the
shape: ``c``, the zero crossing, is what the BPM reads when the beam passes through the
quadrupole's magnetic centre.

:func:`fit_bba_center` projects each ``d_i`` on the dominant direction ``u`` (first right
singular vector of the stacked ``d_i``, or a given model shape), fits the straight line
``a_i = alpha + s (r_i - mean r)`` by weighted least squares with the noise of both ``a_i``
and ``r_i`` (effective variance), and returns ``c = mean r - alpha / s`` with its uncertainty by
error propagation (the covariance scaled up by the reduced chi-square when the residuals exceed
the noise). A fit is rejected, with the reason, when the slope is not significant (the
modulation barely moves the orbit, or the scan barely moves the beam), when the points are not
on a line, or when the centre lies far outside the scanned readings.

When both planes are scanned together (not in step), each plane's fit has a third term, the
other plane's reading: the machine couples the quadrupole's kick of one plane into the orbit
of the other, so a plane's zero crossing depends on where the beam is in the other plane.
:func:`combine_bba_planes` solves both zero crossings together: the readings at which the
beam passes through the centre in both planes at once.

References:
    G. Portmann, D. Robin, L. Schachinger, "Automated beam based alignment of the ALS
    quadrupoles", PAC'95 (1995); P. Roejsel, "A beam position monitor system with
    beam-based alignment", NIM A 343 (1994); W. Kewisch et al., beam-based alignment of HERA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "BasisKicks",
    "BbaFit",
    "BbaGroups",
    "GroupCentres",
    "GroupColumns",
    "bba_scan_orders",
    "combine_bba_planes",
    "decorrelated_order",
    "fit_basis_kicks",
    "fit_bba_center",
    "fit_group_centres",
    "fit_group_columns",
    "fit_group_kicks",
    "group_bba_quadrupoles",
    "knob_amplitude_at",
    "quadrupole_centring_goal",
]


@dataclass(frozen=True)
class BbaFit:
    """The outcome of :func:`fit_bba_center` (SI units).

    Attributes:
        center_m: BPM reading at which the modulation-induced orbit change vanishes (m).
        std_center_m: its standard uncertainty (m).
        slope: projected orbit change per metre of BPM reading (m/m) at the fitted ``dK``.
        std_slope: its standard uncertainty (m/m).
        chi2_red: reduced chi-square of the straight-line fit (NaN without known noise or
            without a degree of freedom).
        r_squared: fraction of the projections' variance the line explains.
        curvature: quadratic coefficient relative to the slope, times half the scanned range
            (the relative deviation from a line at the scan's ends); NaN with 3 points.
        std_curvature: its standard uncertainty.
        positions_m: (npos,) the BPM readings of the scan (m).
        projections_m: (npos,) the difference orbits projected on ``direction`` (m).
        std_projections_m: (npos,) their uncertainties (m).
        direction: (nbpm,) unit vector the difference orbits were projected on (NaN for the
            BPMs left out: NaN in any difference orbit).
        n_bpms: BPMs used.
        rejected: why the fit is rejected, ``""`` if it is accepted.
        coupling: with ``other_positions_m``: projected orbit change per metre of the other
            plane's reading (m/m), the coupled part of the other plane's kick; else 0.
        mean_m: mean of ``positions_m`` (m).
        other_mean_m: mean of the other plane's readings (m; NaN without them).
        params: (alpha [m], slope, coupling) of ``a = alpha + slope (r - mean_m) +
            coupling (r_other - other_mean_m)``.
        params_cov: (3, 3) their covariance.
    """

    center_m: float
    std_center_m: float
    slope: float
    std_slope: float
    chi2_red: float
    r_squared: float
    curvature: float
    std_curvature: float
    positions_m: np.ndarray
    projections_m: np.ndarray
    std_projections_m: np.ndarray
    direction: np.ndarray
    n_bpms: int
    rejected: str
    coupling: float = 0.0
    mean_m: float = float("nan")
    other_mean_m: float = float("nan")
    params: np.ndarray = field(default_factory=lambda: np.full(3, np.nan))
    params_cov: np.ndarray = field(default_factory=lambda: np.full((3, 3), np.nan))

    @property
    def ok(self) -> bool:
        """Whether the fit is accepted."""
        return not self.rejected


def _sigma(value: float | np.ndarray | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``value`` broadcast to ``shape`` (NaN: unknown), checked >= 0."""
    if value is None:
        return np.full(shape, np.nan)
    arr = np.asarray(value, dtype=float)
    if np.any(arr < 0) or np.any(np.isinf(arr)):
        raise ValueError(f"fit_bba_center: {what} must be finite and >= 0")
    try:
        return np.broadcast_to(arr, shape).astype(float)
    except ValueError:
        raise ValueError(
            f"fit_bba_center: {what} has shape {arr.shape}, expected {shape}"
        ) from None


def _fit(
    basis: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted linear least squares ``y = basis @ p``: coefficients, covariance, residuals."""
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(basis * sw[:, None], y * sw, rcond=None)
    cov = np.linalg.pinv(basis.T @ (basis * w[:, None]))
    return coef, cov, y - basis @ coef


def fit_bba_center(
    positions_m: np.ndarray,
    orbit_changes_m: np.ndarray,
    *,
    sigma_position_m: float | np.ndarray | None = None,
    sigma_change_m: float | np.ndarray | None = None,
    direction: np.ndarray | None = None,
    min_slope_snr: float = 10.0,
    max_chi2_red: float = 5.0,
    min_r_squared: float = 0.98,
    max_curvature: float = 0.2,
    max_extrapolation: float = 0.5,
    other_positions_m: np.ndarray | None = None,
) -> BbaFit:
    """Fit the quadrupole centre, as a BPM reading, from a BBA scan (module docstring).

    Args:
        positions_m: (npos,) reading of the BPM next to the quadrupole at each scan position
            (the mean of its readings at ``+dK`` and ``-dK``) (m).
        orbit_changes_m: (npos, nbpm) difference orbit ``orbit(+dK) - orbit(-dK)`` at each
            scan position (m); a BPM with NaN at any position is left out.
        sigma_position_m: noise (standard deviation) of ``positions_m`` (m): scalar or (npos,);
            ``None``: unknown (the uncertainties then come from the residuals alone).
        sigma_change_m: noise of ``orbit_changes_m`` (m): scalar, (nbpm,) or (npos, nbpm);
            ``None``: unknown.
        direction: (nbpm,) expected shape of the difference orbit (e.g. the model's orbit
            response to a kick at the quadrupole); default: the first right singular vector of
            the stacked difference orbits.
        min_slope_snr: reject when ``|slope| / std_slope`` is below this.
        max_chi2_red: reject when the reduced chi-square exceeds this (known noise only).
        min_r_squared: reject when the line explains less than this fraction of the variance.
        max_curvature: reject when a quadratic term changes the line by more than this
            fraction at the ends of the scan, significantly (more than 3 sigma).
        max_extrapolation: reject when the centre lies outside the scanned readings by more
            than this fraction of the scanned range.
        other_positions_m: (npos,) the same BPM's readings in the other plane (m), when both
            planes were scanned (not in step: see :func:`combine_bba_planes`). The fit then
            has a third term, the other plane's kick coupled into this plane, and the centre
            is the zero crossing at the other plane's mean reading until
            :func:`combine_bba_planes` solves both planes together.

    Returns:
        The fit; ``fit.rejected`` says why it is rejected (the numbers are still filled).

    Raises:
        ValueError: inconsistent shapes, NaN readings, negative noise.
    """
    r = np.asarray(positions_m, dtype=float).ravel()
    d = np.atleast_2d(np.asarray(orbit_changes_m, dtype=float))
    npos = r.size
    if d.shape[0] != npos:
        raise ValueError(
            f"fit_bba_center: {npos} positions but {d.shape[0]} difference orbits "
            f"(orbit_changes_m has shape {d.shape})"
        )
    if not np.all(np.isfinite(r)):
        raise ValueError("fit_bba_center: positions_m must be finite")
    sig_r = _sigma(sigma_position_m, (npos,), "sigma_position_m")
    sig_d_arg = None if sigma_change_m is None else np.asarray(sigma_change_m, float)
    if sig_d_arg is not None and sig_d_arg.ndim == 1 and sig_d_arg.size == d.shape[1] != npos:
        sig_d_arg = sig_d_arg[None, :]
    sig_d = _sigma(sig_d_arg, d.shape, "sigma_change_m")
    cols = np.all(np.isfinite(d), axis=0)
    full_direction = np.full(d.shape[1], np.nan)
    nan = float("nan")

    def rejected_early(reason: str) -> BbaFit:
        return BbaFit(
            nan, nan, nan, nan, nan, nan, nan, nan, r, np.full(npos, nan), np.full(npos, nan),
            full_direction, int(cols.sum()), reason,
        )  # fmt: skip

    if npos < 3:
        return rejected_early(f"{npos} scan positions: a line and its residuals need >= 3")
    if not np.any(cols):
        return rejected_early("no BPM has a valid difference orbit at every scan position")
    dv = d[:, cols]
    if direction is not None:
        u = np.asarray(direction, dtype=float).ravel()
        if u.size != d.shape[1]:
            raise ValueError(
                f"fit_bba_center: direction has {u.size} elements, expected {d.shape[1]}"
            )
        u = u[cols]
        norm = float(np.linalg.norm(u))
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("fit_bba_center: direction must be finite and non-zero")
        u = u / norm
    else:
        u = np.linalg.svd(dv, full_matrices=False)[2][0]
    if np.sum(u) < 0:  # a fixed sign, so the slope's sign is reproducible
        u = -u
    full_direction[cols] = u
    a = dv @ u
    sig_a = np.sqrt(np.sum(u**2 * sig_d[:, cols] ** 2, axis=1))
    known = bool(np.all(np.isfinite(sig_a)) and np.all(np.isfinite(sig_r)))
    known = known and bool(np.max(sig_a) > 0)
    if not known:
        sig_a, sig_r = np.ones(npos), np.zeros(npos)
    r_mean = float(np.mean(r))
    x = r - r_mean
    columns = [np.ones(npos), x]
    other_mean = nan
    if other_positions_m is not None:
        ro = np.asarray(other_positions_m, dtype=float).ravel()
        if ro.shape != r.shape or not np.all(np.isfinite(ro)):
            raise ValueError("fit_bba_center: other_positions_m must be finite, one per position")
        other_mean = float(np.mean(ro))
        columns.append(ro - other_mean)
    basis = np.stack(columns, axis=1)
    npar = basis.shape[1]
    if npos < npar + 1:
        return rejected_early(f"{npos} scan positions: {npar} parameters need >= {npar + 1}")
    w = 1.0 / sig_a**2
    coef, cov, res = _fit(basis, a, w)
    for _ in range(3):  # effective variance: the readings' noise enters through the slope
        w = 1.0 / (sig_a**2 + float(coef[1]) ** 2 * sig_r**2)
        coef, cov, res = _fit(basis, a, w)
    slope = float(coef[1])
    dof = npos - npar
    chi2 = float(np.sum(w * res**2))
    chi2_red = chi2 / dof if dof > 0 else nan
    if known:
        scale = max(1.0, chi2_red) if dof > 0 else 1.0
    else:
        scale = chi2_red if dof > 0 else nan
    # the slope's significance against the noise alone (known noise): a curved or noisy
    # scan is a linearity problem, reported as such below
    std_slope_noise = float(np.sqrt(cov[1, 1] * (1.0 if known else scale)))
    cov = cov * scale
    alpha, std_slope = float(coef[0]), float(np.sqrt(cov[1, 1]))
    center = r_mean - alpha / slope if slope != 0 else nan
    jac = np.zeros(npar)
    jac[:2] = [-1.0 / slope, alpha / slope**2] if slope != 0 else [nan, nan]
    std_center = float(np.sqrt(max(jac @ cov @ jac, 0.0)))
    ss_tot = float(np.sum(w * (a - np.average(a, weights=w)) ** 2))
    r_squared = 1.0 - chi2 / ss_tot if ss_tot > 0 else nan
    half = 0.5 * float(np.ptp(r))
    curvature = std_curvature = nan
    if npos >= npar + 2 and slope != 0:
        coef2, cov2, res2 = _fit(np.c_[basis, x**2], a, w)
        dof2 = npos - npar - 1
        s2 = float(np.sum(w * res2**2)) / dof2
        cov2 = cov2 * (max(1.0, s2) if known else s2)
        curvature = float(coef2[-1]) * half / slope
        std_curvature = float(np.sqrt(cov2[-1, -1])) * half / abs(slope)
    params = np.full(3, 0.0)
    params[:npar] = coef
    params_cov = np.zeros((3, 3))
    params_cov[:npar, :npar] = cov
    lo, hi = float(np.min(r)), float(np.max(r))
    margin = max_extrapolation * (hi - lo)
    snr = abs(slope) / std_slope_noise if std_slope_noise > 0 else (np.inf if slope else 0.0)
    reason = ""
    if not snr >= min_slope_snr:
        reason = (
            f"too little slope: {slope:.3g} +- {std_slope_noise:.2g} m/m ({snr:.1f} sigma < "
            f"{min_slope_snr:g}): the modulation does not move the orbit measurably, or the scan "
            f"does not move the beam at the BPM (readings span {(hi - lo) * 1e6:.1f} um)"
        )
    elif known and dof > 0 and chi2_red > max_chi2_red:
        reason = (
            f"poor linearity: reduced chi-square {chi2_red:.2f} > {max_chi2_red:g} (residuals "
            "exceed the noise: drift, a lost reading, or a nonlinear scan)"
        )
    elif not r_squared >= min_r_squared:
        reason = f"poor linearity: the line explains {r_squared:.3f} < {min_r_squared:g}"
    elif (
        np.isfinite(curvature)
        and abs(curvature) > max_curvature
        and abs(curvature) > 3 * std_curvature
    ):
        reason = (
            f"poor linearity: a quadratic term changes the line by {abs(curvature):.0%} at the "
            f"scan's ends (> {max_curvature:.0%}, {abs(curvature) / std_curvature:.1f} sigma)"
        )
    elif not lo - margin <= center <= hi + margin:
        reason = (
            f"centre {center * 1e6:.1f} um lies outside the scanned readings "
            f"[{lo * 1e6:.1f}, {hi * 1e6:.1f}] um by more than {max_extrapolation:.0%} of "
            "their range: widen or move the scan"
        )
    return BbaFit(
        center_m=float(center),
        std_center_m=std_center,
        slope=slope,
        std_slope=std_slope,
        chi2_red=chi2_red if known else nan,
        r_squared=float(r_squared),
        curvature=curvature,
        std_curvature=std_curvature,
        positions_m=r,
        projections_m=a,
        std_projections_m=np.sqrt(1.0 / w) * (1.0 if known else np.sqrt(scale)),
        direction=full_direction,
        n_bpms=int(cols.sum()),
        rejected=reason,
        coupling=float(params[2]),
        mean_m=r_mean,
        other_mean_m=other_mean,
        params=params,
        params_cov=params_cov,
    )


def combine_bba_planes(fit_x: BbaFit, fit_y: BbaFit) -> tuple[BbaFit, BbaFit]:
    """The centres of both planes at once, from fits with ``other_positions_m``.

    With both planes scanned (not in step, so that the two readings are independent
    regressors), each plane's projection is ``a_p = alpha_p + s_p (r_p - m_p) + k_p (r_q -
    m_q)``: the coupling ``k_p`` carries the other plane's kick, coupled into this plane by
    the machine (rolled quadrupoles, sextupoles off-centre). Centring the beam in the
    quadrupole means both kicks vanish: the two zero crossings are solved together (a 2x2
    linear system), and their uncertainties propagated from both fits' covariances.

    Returns:
        Both fits with ``center_m`` and ``std_center_m`` replaced; unchanged if either is
        rejected or lacks the coupling term.
    """
    fits = (fit_x, fit_y)
    if any(f.rejected or not np.isfinite(f.other_mean_m) for f in fits):
        return fit_x, fit_y
    means = np.array([fit_x.mean_m, fit_y.mean_m])

    def solve(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        m = np.array([[px[1], px[2]], [py[2], py[1]]])
        return means - np.linalg.solve(m, np.array([px[0], py[0]]))

    centre = solve(fit_x.params, fit_y.params)
    jac = np.zeros((2, 6))
    for k in range(6):
        p = np.r_[fit_x.params, fit_y.params]
        step = 1e-7 * max(abs(p[k]), 1e-9)
        p[k] += step
        jac[:, k] = (solve(p[:3], p[3:]) - centre) / step
    cov = np.zeros((6, 6))
    cov[:3, :3], cov[3:, 3:] = fit_x.params_cov, fit_y.params_cov
    std = np.sqrt(np.maximum(np.diag(jac @ cov @ jac.T), 0.0))
    return (
        replace(fit_x, center_m=float(centre[0]), std_center_m=float(std[0])),
        replace(fit_y, center_m=float(centre[1]), std_center_m=float(std[1])),
    )


@dataclass(frozen=True)
class BbaGroups:
    """The outcome of :func:`group_bba_quadrupoles`.

    Attributes:
        groups: the quadrupoles (indices into the inputs) modulated together, one tuple per
            group, in the order the inputs came.
        signs: (nq,) +1 or -1: the sign of each quadrupole's first modulation step in its
            group, chosen so that the group's tune shifts cancel as far as possible.
        inflation: (nq,) the variance inflation of each quadrupole's kick estimate in its
            group (1: its columns are orthogonal to the others'; the larger plane).
        tune_shift: (ngroups, 2) the group's residual tune shift (x, y) at the first sign
            (in the units of ``tune_shifts``; 0 without them).
    """

    groups: tuple[tuple[int, ...], ...]
    signs: np.ndarray
    inflation: np.ndarray
    tune_shift: np.ndarray


def _arcs_overlap(a: tuple[int, int], b: tuple[int, int], n: int) -> bool:
    """Whether two arcs ``(start, length)`` of a ring of ``n`` elements share an element."""
    return (b[0] - a[0]) % n <= a[1] or (a[0] - b[0]) % n <= b[1]


def _inflation(columns: np.ndarray) -> np.ndarray:
    """Variance inflation of each column's least-squares coefficient (1: orthogonal)."""
    norms = np.linalg.norm(columns, axis=0)
    u = columns / np.where(norms > 0, norms, 1.0)
    gram = u.T @ u
    try:
        return np.diag(np.linalg.inv(gram))
    except np.linalg.LinAlgError:
        return np.full(columns.shape[1], np.inf)


def group_bba_quadrupoles(
    responses: Sequence[np.ndarray],
    arcs: np.ndarray,
    n_elements: int,
    *,
    max_group: int = 8,
    max_inflation: float = 1.2,
    tune_shifts: np.ndarray | None = None,
) -> BbaGroups:
    """Groups of quadrupoles that parallel BBA can modulate at once (greedy, first fit).

    Two quadrupoles go together only if their scans do not touch (their arcs, from the first
    to the last element a scan moves the beam at: bump correctors, quadrupole, BPM, do not
    overlap: a bump then leaves the other quadrupole and its BPM alone) and if the kicks of all
    the group's quadrupoles can be told apart in the difference orbit: in each plane, the
    least-squares estimate of each kick from the model's columns of the group has a variance
    at most ``max_inflation`` times what it would have alone (columns nearly orthogonal: far
    apart in phase, not a multiple of pi). Each quadrupole, in the given order, joins the first
    group that takes it, or starts a new one.

    Args:
        responses: per plane a (nbpm, nq) matrix: the model's orbit response at the BPMs to a
            kick at each quadrupole (any unit; only the shapes matter).
        arcs: (nq, 2) integer ``(first element, number of elements after it)`` of each
            quadrupole's scan on the ring.
        n_elements: elements of the ring.
        max_group: most quadrupoles in a group.
        max_inflation: largest variance inflation allowed (>= 1).
        tune_shifts: (nq, 2) tune shift (x, y) of each quadrupole's ``+dK``: the signs of a
            group's modulations are chosen (largest first) to cancel their sum.

    Returns:
        The groups, the modulation signs, the inflation of each quadrupole and each group's
        residual tune shift.

    Raises:
        ValueError: inconsistent shapes, ``max_group < 1`` or ``max_inflation < 1``.
    """
    mats = [np.asarray(r, dtype=float) for r in responses]
    arcs = np.asarray(arcs, dtype=np.int64)
    nq = arcs.shape[0] if arcs.ndim == 2 else -1
    if arcs.shape != (nq, 2) or any(m.ndim != 2 or m.shape[1] != nq for m in mats):
        raise ValueError("group_bba_quadrupoles: responses (nbpm, nq) and arcs (nq, 2) disagree")
    if max_group < 1 or not max_inflation >= 1:
        raise ValueError("group_bba_quadrupoles: max_group >= 1 and max_inflation >= 1")
    mats = [np.where(np.isfinite(m), m, 0.0) for m in mats]
    shifts = np.zeros((nq, 2)) if tune_shifts is None else np.asarray(tune_shifts, float)
    if shifts.shape != (nq, 2):
        raise ValueError(f"group_bba_quadrupoles: tune_shifts must be ({nq}, 2)")
    arc_list = [(int(a) % n_elements, int(b)) for a, b in arcs]
    groups: list[list[int]] = []
    inflation = np.ones(nq)
    for q in range(nq):
        for g in groups:
            if len(g) >= max_group:
                continue
            if any(_arcs_overlap(arc_list[q], arc_list[m], n_elements) for m in g):
                continue
            members = [*g, q]
            infl = np.max([_inflation(m[:, members]) for m in mats], axis=0)
            if np.all(infl <= max_inflation):
                g.append(q)
                inflation[members] = infl
                break
        else:
            groups.append([q])
    signs = np.ones(nq)
    residual = np.zeros((len(groups), 2))
    for k, g in enumerate(groups):
        total = np.zeros(2)
        for q in sorted(g, key=lambda i: -float(np.max(np.abs(shifts[i])))):
            plus, minus = total + shifts[q], total - shifts[q]
            if np.max(np.abs(minus)) < np.max(np.abs(plus)):
                signs[q], total = -1.0, minus
            else:
                total = plus
        residual[k] = total
    return BbaGroups(tuple(tuple(g) for g in groups), signs, inflation, residual)


def fit_group_kicks(
    columns: np.ndarray, orbit_change_m: np.ndarray, sigma_m: np.ndarray | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Each modulated quadrupole's kick from one difference orbit (weighted least squares).

    Args:
        columns: (nrow, ncol) the model's orbit response to each kick (rows: BPMs of both
            planes, x then y; columns: each quadrupole's kick in each plane).
        orbit_change_m: (nrow,) the measured difference orbit (m); NaN rows are left out.
        sigma_m: its noise per row (m), scalar or (nrow,); ``None``: equal weights.

    Returns:
        ``(kicks, covariance)``: (ncol,) the kicks in the columns' units and their (ncol, ncol)
        covariance (from ``sigma_m``; with ``None``, scaled by the residuals' variance).
    """
    u = np.asarray(columns, dtype=float)
    d = np.asarray(orbit_change_m, dtype=float)
    rows = np.isfinite(d) & np.all(np.isfinite(u), axis=1)
    sig = (
        np.ones(d.size) if sigma_m is None else np.broadcast_to(np.asarray(sigma_m, float), d.shape)
    )
    rows &= np.isfinite(sig) & (sig > 0)
    w = 1.0 / sig[rows] ** 2
    coef, cov, res = _fit(u[rows], d[rows], w)
    if sigma_m is None:
        dof = max(int(rows.sum()) - u.shape[1], 1)
        cov = cov * float(np.sum(w * res**2)) / dof
    return coef, cov


def _centred_unit(orders: np.ndarray) -> np.ndarray:
    """Rows of ``orders`` (permutations of ``0..n-1``) centred and normalised."""
    t = np.asarray(orders, float) - 0.5 * (orders.shape[-1] - 1)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


def decorrelated_order(n: int) -> np.ndarray:
    """An order of ``n`` equally spaced amplitudes uncorrelated (or least) with the sorted one."""
    t = np.arange(n) - 0.5 * (n - 1)
    best, best_corr = np.arange(n), np.inf
    for step in range(1, n):
        if np.gcd(step, n) != 1:
            continue
        for offset in range(n):
            order = (step * np.arange(n) + offset) % n
            corr = abs(float(t @ t[order]))
            if corr < best_corr - 1e-9:
                best, best_corr = order, corr
    return best


def bba_scan_orders(
    n_members: int,
    n_positions: int,
    n_planes: int = 2,
    *,
    joint: bool = False,
    seed: int = 0,
    n_trials: int = 400,
) -> np.ndarray:
    """The order in which each member of a parallel BBA group visits the scan amplitudes.

    Member 0 visits them sorted in x and in :func:`decorrelated_order` in y (the serial
    scan). Each further member's order in each plane is the random permutation (of
    ``n_trials``, seeded: the same answer every time) that keeps the plane's orders most
    independent (largest smallest eigenvalue of their correlation matrix, centred), less its
    largest correlation with the other plane's orders; with ``joint``, that keeps all the
    orders of both planes most independent. :func:`fit_group_columns` needs the orders it
    regresses on independent, with the constant, to tell the members' columns apart:
    ``n_positions >= n_members + 2`` per plane (``2 n_members + 2`` for both planes jointly)
    leaves a degree of freedom per row for the noise.

    Returns:
        (n_members, n_planes, n_positions) integer orders (permutations of ``range(n)``).

    Raises:
        ValueError: ``n_positions < n_members + 1`` (the orders cannot be independent).
    """
    if n_members < 1 or n_planes not in (1, 2):
        raise ValueError("bba_scan_orders: n_members >= 1 and n_planes 1 or 2")
    least = max((n_planes if joint else 1) * n_members + 1, 3)
    if n_positions < least:
        raise ValueError(
            f"bba_scan_orders: {n_members} members need >= {least} positions, got {n_positions}"
        )
    rng = np.random.default_rng(seed)
    orders = np.zeros((n_members, n_planes, n_positions), np.int64)
    orders[0, 0] = np.arange(n_positions)
    if n_planes == 2:
        orders[0, 1] = decorrelated_order(n_positions)
    for m in range(1, n_members):
        for p in range(n_planes):
            same = _centred_unit(orders[:m, p])
            other = _centred_unit(orders[: m + 1 if p else m, 1 - p]) if n_planes == 2 else None
            if joint and other is not None:
                same, other = np.r_[same, other], None
            best, best_score = orders[0, p], -np.inf
            for _ in range(n_trials):
                candidate = rng.permutation(n_positions)
                u = _centred_unit(candidate[None, :])
                rows = np.r_[same, u]
                smallest = float(np.linalg.eigvalsh(rows @ rows.T)[0])
                cross = 0.0
                if other is not None and len(other):
                    cross = float(np.max(np.abs(other @ u[0])))
                score = smallest - 0.5 * cross
                if score > best_score:
                    best, best_score = candidate, score
            orders[m, p] = best
    return orders


@dataclass(frozen=True)
class GroupColumns:
    """The outcome of :func:`fit_group_columns` (SI units).

    Attributes:
        columns: (nrow, nm) each member's difference-orbit column: the change of each row's
            difference orbit per metre of the member's reading (m/m); NaN for rows left out.
        intercept: (nrow,) each row's difference orbit at the members' mean readings (m).
        std_columns: (nrow, nm) the columns' standard uncertainties (m/m).
        significance: (nm,) how far each column stands above the noise, in standard
            deviations of its chi-square (``(sum (column / std)^2 - nrow) / sqrt(2 nrow)``):
            below ~5 the modulation of that member does not move the orbit measurably.
        sigma_rows: (nrow,) the noise per row used (m): the given one, or the residuals'.
        chi2_red: reduced chi-square of the rows' regressions (NaN without a given noise).
    """

    columns: np.ndarray
    intercept: np.ndarray
    std_columns: np.ndarray
    significance: np.ndarray
    sigma_rows: np.ndarray
    chi2_red: float


def fit_group_columns(
    readings_m: np.ndarray, orbit_changes_m: np.ndarray, sigma_m: np.ndarray | float | None = None
) -> GroupColumns:
    """Each group member's difference-orbit column, from the data alone (parallel BBA).

    In parallel BBA the difference orbit at scan position ``i`` is
    ``d_i = sum_m B_m (r_mi - c_m)``: member ``m``'s column ``B_m`` (its kick's orbit shape
    times its modulation) times its beam offset, which its BPM reads as ``r_mi - c_m``. When
    the members visit the scan amplitudes in independent orders
    (:func:`bba_scan_orders`), every row of ``d`` is a straight-line regression on the
    members' readings: ``d_ji = a_j + sum_m B_jm (r_mi - mean r_m)``, which gives the columns
    from the data, with no optics model (a model's columns leak one member's kick into
    another's estimate as much as the model is wrong: the beta-beating of a real machine).
    :func:`fit_group_kicks` with these columns then splits each ``d_i`` into the members'
    offsets ``r_mi - c_m``, and :func:`fit_bba_center` finds each ``c_m``.

    Args:
        readings_m: (npos, nm) each member's BPM reading at each scan position (m).
        orbit_changes_m: (npos, nrow) the difference orbits (m); a row with NaN is left out.
        sigma_m: the difference orbit's noise per row (m): scalar or (nrow,); ``None``: from
            the regressions' residuals (needs ``npos >= nm + 2``).

    Raises:
        ValueError: inconsistent shapes, non-finite readings, too few positions.
    """
    r = np.atleast_2d(np.asarray(readings_m, float))
    d = np.atleast_2d(np.asarray(orbit_changes_m, float))
    npos, nm = r.shape
    if d.shape[0] != npos:
        raise ValueError(
            f"fit_group_columns: {npos} positions of readings but {d.shape[0]} difference orbits"
        )
    if not np.all(np.isfinite(r)):
        raise ValueError("fit_group_columns: readings_m must be finite")
    dof = npos - nm - 1
    if dof < (1 if sigma_m is None else 0):
        raise ValueError(
            f"fit_group_columns: {nm} members and {npos} positions: need >= {nm + 2} positions"
        )
    nrow = d.shape[1]
    design = np.c_[np.ones(npos), r - r.mean(axis=0)]
    inverse = np.linalg.pinv(design.T @ design)
    rows = np.all(np.isfinite(d), axis=0)
    coef = np.full((nm + 1, nrow), np.nan)
    coef[:, rows] = inverse @ design.T @ d[:, rows]
    residual = d - design @ coef
    if sigma_m is None:
        sig = np.sqrt(np.sum(residual**2, axis=0) / dof)
        chi2_red = float("nan")
    else:
        sig = np.broadcast_to(np.asarray(sigma_m, float), (nrow,)).copy()
        ok = rows & np.isfinite(sig) & (sig > 0)
        chi2_red = (
            float(np.sum((residual[:, ok] / sig[ok]) ** 2) / (dof * ok.sum()))
            if dof > 0 and ok.any()
            else float("nan")
        )
    std = np.sqrt(np.outer(np.diag(inverse)[1:], sig**2)).T
    z = coef[1:].T / np.where(std > 0, std, np.nan)
    good = rows & np.all(np.isfinite(z), axis=1)
    n = max(int(good.sum()), 1)
    significance = (np.sum(z[good] ** 2, axis=0) - n) / np.sqrt(2 * n)
    return GroupColumns(coef[1:].T, coef[0], std, significance, sig, chi2_red)


@dataclass(frozen=True)
class GroupCentres:
    """The outcome of :func:`fit_group_centres` (SI units).

    Attributes:
        center_m: (nm,) each member's BPM reading with the beam through its quadrupole's
            centre (m).
        std_center_m: (nm,) their standard uncertainties (m).
        offsets_m: (npos, nm) each member's beam offset from its centre, as its BPM reads it,
            at each scan position, from the difference orbit alone (m).
        std_offsets_m: (npos, nm) their standard uncertainties (m).
        columns: the members' columns fitted from the data (:class:`GroupColumns`).
    """

    center_m: np.ndarray
    std_center_m: np.ndarray
    offsets_m: np.ndarray
    std_offsets_m: np.ndarray
    columns: GroupColumns


def fit_group_centres(
    readings_m: np.ndarray,
    orbit_changes_m: np.ndarray,
    sigma_m: np.ndarray | float | None = None,
    sigma_position_m: np.ndarray | float | None = None,
) -> GroupCentres:
    """The centres of the quadrupoles of a parallel BBA group, from the data alone.

    The columns come from :func:`fit_group_columns`; the regressions' intercepts ``a`` (the
    difference orbit at the members' mean readings ``mean r``) are ``-sum_m B_m (c_m - mean
    r_m)``, so ``c = mean r - (B^T W B)^-1 B^T W a``, with ``W`` the rows' inverse variances.
    Its covariance, to first order in the noise of the difference orbits and of the readings,
    is ``((B^T W B)^-1 + sigma_r^2) / (1^T Q 1)``, with ``Q`` the projector off the span of the
    members' offsets ``r_m - c_m`` over the positions: ``1^T Q 1`` is ``npos`` for scans
    centred on the centres, and falls the further the centres lie outside the scans.

    Args:
        readings_m: (npos, nm) each member's BPM reading at each scan position (m).
        orbit_changes_m: (npos, nrow) the difference orbits (m); a row with NaN is left out.
        sigma_m: the difference orbit's noise per row (m), scalar or (nrow,); ``None``: from
            the regressions' residuals.
        sigma_position_m: the readings' noise (m), scalar or (nm,); ``None``: 0.

    Raises:
        ValueError: as :func:`fit_group_columns`.
    """
    r = np.atleast_2d(np.asarray(readings_m, float))
    d = np.atleast_2d(np.asarray(orbit_changes_m, float))
    npos, nm = r.shape
    found = fit_group_columns(r, d, sigma_m)
    rows = np.all(np.isfinite(found.columns), axis=1) & np.isfinite(found.intercept)
    rows &= np.isfinite(found.sigma_rows) & (found.sigma_rows > 0)
    b = found.columns[rows]
    w = 1.0 / found.sigma_rows[rows] ** 2
    normal = np.linalg.pinv(b.T @ (b * w[:, None]))
    centre = r.mean(axis=0) - normal @ (b.T @ (w * found.intercept[rows]))
    offsets = r - centre
    span = np.linalg.pinv(offsets)
    q = np.eye(npos) - offsets @ span
    weight = float(np.ones(npos) @ q @ np.ones(npos))
    sig_r = np.zeros(nm) if sigma_position_m is None else np.broadcast_to(sigma_position_m, (nm,))
    variance = (np.diag(normal) + np.asarray(sig_r, float) ** 2) / max(weight, 1e-12)
    fitted = (d[:, rows] * w) @ b @ normal  # (npos, nm): each difference orbit split
    return GroupCentres(
        center_m=centre,
        std_center_m=np.sqrt(variance),
        offsets_m=fitted,
        std_offsets_m=np.broadcast_to(np.sqrt(np.diag(normal)), (npos, nm)).copy(),
        columns=found,
    )


def knob_amplitude_at(amplitudes: np.ndarray, readings_m: np.ndarray, centre_m: float) -> float:
    """The scan knob's amplitude at which a BPM reads ``centre_m`` (NaN if unknown).

    At fixed optics a closed bump moves the reading in proportion to its amplitude: the
    straight line of the amplitudes against the readings (least squares), evaluated at the
    centre. Unknown with fewer than two finite readings, readings that do not move, or a
    non-finite centre.

    Args:
        amplitudes: (n,) the knob's amplitudes at the scan positions (the knob's unit: m of
            bump at its BPM).
        readings_m: (n,) the BPM's readings there (m), NaN for a missing one.
        centre_m: the reading wanted (m).
    """
    readings = np.asarray(readings_m, float)
    ok = np.isfinite(readings)
    if ok.sum() < 2 or not np.isfinite(centre_m) or np.ptp(readings[ok]) == 0:
        return float("nan")
    slope, intercept = np.polyfit(readings[ok], np.asarray(amplitudes, float)[ok], 1)
    return float(intercept + slope * centre_m)


def quadrupole_centring_goal(
    centres_m: np.ndarray,
    difference_response: np.ndarray,
    strengths_rad: np.ndarray,
    centre_strengths_rad: np.ndarray,
) -> np.ndarray:
    """The readings that put the beam through the quadrupoles' centres at given strengths.

    A BBA centre ``c_r`` is BPM ``r``'s reading with the beam through its quadrupole's centre,
    found with the correctors at ``k_r`` (the BBA's starting strengths plus the BPM's own scan
    knob at the centre). At fixed optics the reading minus the beam's position in the
    quadrupole changes with the correctors as ``D_r`` (the BPM's response minus the
    quadrupole's), so at strengths ``k`` the beam is through the centre exactly when the BPM
    reads ``c_r + D_r (k - k_r)``: only ``D``, the small BPM-quadrupole difference, is taken
    from a model.

    Args:
        centres_m: (nrow,) the centres ``c_r`` (m).
        difference_response: (nrow, ncorr) ``D`` (m/rad).
        strengths_rad: (ncorr,) the correctors' strengths ``k`` (rad).
        centre_strengths_rad: (nrow, ncorr) each row's ``k_r`` (rad).

    Returns:
        (nrow,) the goal readings (m).
    """
    d = np.asarray(difference_response, float)
    shift = np.asarray(strengths_rad, float)[None, :] - np.asarray(centre_strengths_rad, float)
    return np.asarray(centres_m, float) + np.einsum("rc,rc->r", d, shift)


@dataclass(frozen=True)
class BasisKicks:
    """Difference orbits split over known response shapes (:func:`fit_basis_kicks`).

    Attributes:
        coefficients: (npos, nbasis) each shape's coefficient at each scan position.
        covariance: (nbasis, nbasis) their covariance (the same at every position), scaled by
            the reduced chi-square when the residuals exceed the noise.
        chi2_red: reduced chi-square of the residuals (NaN with unknown noise).
        rows_used: (nrow,) the rows fitted.
    """

    coefficients: np.ndarray
    covariance: np.ndarray
    chi2_red: float
    rows_used: np.ndarray

    def whitened(self, index: Sequence[int]) -> np.ndarray:
        """(npos, len(index)) coefficients ``index`` with unit, uncorrelated noise.

        ``L^-1 c`` with ``L L^T`` their covariance block: a kick along a fixed direction of
        these shapes stays a kick along a fixed direction, and its noise is white, as
        :func:`fit_bba_center` expects of a difference orbit with ``sigma_change_m=1``.
        """
        idx = np.asarray(index, int)
        block = self.covariance[np.ix_(idx, idx)]
        chol = np.linalg.cholesky(block)
        return np.linalg.solve(chol, self.coefficients[:, idx].T).T


def fit_basis_kicks(
    orbit_changes_m: np.ndarray,
    basis: np.ndarray,
    sigma_m: np.ndarray | float | None = None,
    rows: np.ndarray | None = None,
) -> BasisKicks:
    """Split difference orbits over known response shapes by weighted least squares.

    In parallel BBA a modulated quadrupole kicks the beam in proportion to the beam's offset
    from its centre; outside the stretch between the two correctors that bracket it, the
    orbit that kick makes is a combination of those correctors' measured responses: exact in
    a linear uncoupled lattice at fixed energy, to ~1e-3 on the EBS twin at fixed RF
    frequency (the kick's path lengthening is not quite the correctors'). With a measured ORM the
    shapes carry the machine's optics, BPM gains and rolls: each member's kick is the
    coefficients of its two shapes, and its direction in them is fixed, so that
    :func:`fit_bba_center` on the whitened coefficients (:meth:`BasisKicks.whitened`) finds
    its centre like a serial scan's.

    Args:
        orbit_changes_m: (npos, nrow) difference orbits (m); a row NaN at any position is
            left out.
        basis: (nrow, nbasis) the shapes (any unit per shape); a row NaN in any is left out.
        sigma_m: noise of the difference orbits (m): scalar or (nrow,); ``None``: unknown
            (the covariance then comes from the residuals).
        rows: (nrow,) booleans, the rows that may be fitted (e.g. not between a member's
            bracketing correctors); all by default.

    Returns:
        The coefficients and their covariance.

    Raises:
        ValueError: inconsistent shapes, too few usable rows, or shapes that are not
            independent on them.
    """
    d = np.atleast_2d(np.asarray(orbit_changes_m, float))
    e = np.asarray(basis, float)
    npos, nrow = d.shape
    if e.ndim != 2 or e.shape[0] != nrow:
        raise ValueError(f"fit_basis_kicks: basis {e.shape} does not have {nrow} rows")
    use = np.all(np.isfinite(d), axis=0) & np.all(np.isfinite(e), axis=1)
    if rows is not None:
        use &= np.asarray(rows, bool)
    sigma = np.broadcast_to(np.asarray(1.0 if sigma_m is None else sigma_m, float), (nrow,)).copy()
    use &= np.isfinite(sigma) & (sigma > 0)
    nbasis = e.shape[1]
    if use.sum() <= nbasis:
        raise ValueError(
            f"fit_basis_kicks: {int(use.sum())} usable rows for {nbasis} shapes (need more)"
        )
    w = 1.0 / sigma[use]
    a = e[use] * w[:, None]
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    if s[-1] <= 1e-10 * s[0]:
        raise ValueError(
            f"fit_basis_kicks: the shapes are not independent on the rows used (condition "
            f"number {s[0] / max(s[-1], 1e-300):.1e})"
        )
    b = d[:, use] * w[None, :]
    coefficients = ((b @ u) / s) @ vt  # (npos, nbasis): the least-squares solution per row
    residual = b - coefficients @ a.T
    dof = residual.size - npos * nbasis
    chi2_red = float(np.sum(residual**2) / dof) if dof > 0 else float("nan")
    covariance = (vt.T / s**2) @ vt
    if sigma_m is None:
        covariance = covariance * chi2_red
        chi2_red = float("nan")
    elif chi2_red > 1.0:
        covariance = covariance * chi2_red
    return BasisKicks(coefficients, covariance, chi2_red, use)
