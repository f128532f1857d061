"""Orbit correction numerics: SVD/Tikhonov inverses, MICADO, bounded correction with RF.

All functions work on numpy arrays in SI units: orbits in m, kicks in rad, response matrices in
m/rad, the RF column in m/Hz and the RF frequency step in Hz. Rows are BPM readings (any
order, typically ``[x; y]``), columns are correctors (any mix of planes).

References:
    Y. Chung, G. Decker, K. Evans, "Closed orbit correction using singular value decomposition
    of the response matrix", PAC'93 (truncated SVD and the Tikhonov filter ``s / (s^2 + a^2)``).
    B. Autin, Y. Marti, "Closed orbit correction of A.G. machines using a small number of
    magnets", CERN ISR-MA/73-17 (MICADO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear

__all__ = ["CorrectionResult", "correction_matrix", "micado", "solve_correction"]

_METHODS = ("svd", "tikhonov")
_MAX_LISTED = 10


@dataclass(frozen=True)
class CorrectionResult:
    """The outcome of :func:`solve_correction`.

    Attributes:
        dtheta_rad: (ncorr,) kick change [rad] to add to each corrector; exactly 0 for excluded
            correctors.
        df_hz: RF frequency change [Hz] (0 when no RF column was given).
        residual_m: (nrows,) predicted orbit after the correction minus the target [m],
            ``orbit - target + R @ dtheta + rf_column * df``, on every row (masked rows too;
            NaN where the orbit or the matrix is NaN on a masked row).
        singular_values: singular values kept by the solve, of the weighted, scaled system
            (BPM rows times ``bpm_weights``, corrector columns times ``corrector_weights``, the
            RF column scaled to the median corrector column norm, the sum-of-kicks row).
        bound_active: whether any corrector ended at its lower or upper limit.
        at_bound: (ncorr,) booleans: the correctors at a limit.
    """

    dtheta_rad: np.ndarray
    df_hz: float
    residual_m: np.ndarray
    singular_values: np.ndarray
    bound_active: bool
    at_bound: np.ndarray


def _listed(indices: np.ndarray) -> str:
    """A short printable list of indices."""
    idx = [int(i) for i in indices[:_MAX_LISTED]]
    more = f" and {indices.size - _MAX_LISTED} more" if indices.size > _MAX_LISTED else ""
    return f"{idx}{more}"


def _as_matrix(response: np.ndarray) -> np.ndarray:
    r = np.asarray(response, dtype=float)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ValueError(
            f"response matrix must be 2D (nrows, ncorr) and non-empty, got shape {r.shape}"
        )
    return r


def _as_vector(value: object, size: int, what: str, axis: str) -> np.ndarray:
    v = np.asarray(value, dtype=float)
    if v.ndim == 0:
        return np.full(size, float(v))
    if v.shape != (size,):
        raise ValueError(
            f"{what} has shape {v.shape}; the response matrix has {size} {axis}, expected ({size},)"
        )
    return v


def _weights(value: object, size: int, what: str, axis: str) -> np.ndarray:
    if value is None:
        return np.ones(size)
    w = _as_vector(value, size, what, axis)
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"{what} must be finite and >= 0; bad at {axis} {_listed(bad)}")
    if not np.any(w > 0):
        raise ValueError(f"{what} are all zero: nothing left to correct with")
    return w


def _check_finite_matrix(r: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Refuse NaN/inf in the used part (weighted rows x included columns) of the matrix."""
    bad = ~np.isfinite(r) & rows[:, None] & cols[None, :]
    if np.any(bad):
        bad_rows = np.flatnonzero(bad.any(axis=1))
        bad_cols = np.flatnonzero(bad.any(axis=0))
        raise ValueError(
            f"response matrix is not finite at rows {_listed(bad_rows)}, columns "
            f"{_listed(bad_cols)}: mask those BPMs (bpm_weights=0) or exclude those correctors "
            "(corrector_weights=0)"
        )


def _check_finite_rows(v: np.ndarray, rows: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(v) & rows)
    if bad.size:
        raise ValueError(
            f"{what} is not finite at rows {_listed(bad)}: mask those BPMs (bpm_weights=0)"
        )


def _rank_tolerance(s: np.ndarray, shape: tuple[int, int]) -> float:
    return float(s[0]) * max(shape) * np.finfo(float).eps if s.size else 0.0


def _filtered_svd(
    a: np.ndarray, method: str, n_singular: int | None, alpha: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Full SVD of ``a`` and the inverse filter of the kept singular values.

    Returns:
        ``(U, s, Vt, filt, k)``: ``a = U[:, :r] diag(s) Vt[:r]``, ``Vt`` square; ``filt`` (k,)
        the inverse filter ``1/s`` (``"svd"``) or ``s/(s^2 + alpha^2)`` (``"tikhonov"``) of
        the ``k`` kept singular values ``s[:k]``.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; use 'svd' or 'tikhonov'")
    if method == "svd" and alpha is not None:
        raise ValueError("alpha is only used by method='tikhonov'")
    if method == "tikhonov":
        if alpha is None or not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"method='tikhonov' needs a finite alpha >= 0, got {alpha!r}")
    u, s, vt = np.linalg.svd(a, full_matrices=True)
    rank = int(np.sum(s > _rank_tolerance(s, a.shape)))
    if rank == 0:
        raise ValueError("the weighted response matrix is zero: nothing to correct with")
    if n_singular is None:
        k = rank
    else:
        if isinstance(n_singular, bool) or int(n_singular) != n_singular:
            raise ValueError(f"n_singular must be an integer, got {n_singular!r}")
        k = int(n_singular)
        if not 1 <= k <= rank:
            raise ValueError(
                f"n_singular={k} is out of range: the weighted system {a.shape} has rank "
                f"{rank}, so 1 <= n_singular <= {rank}"
            )
    kept = s[:k]
    filt = 1.0 / kept if method == "svd" else kept / (kept**2 + float(alpha or 0.0) ** 2)
    return u, s, vt, filt, k


def correction_matrix(
    response: np.ndarray,
    *,
    method: str = "svd",
    n_singular: int | None = None,
    alpha: float | None = None,
    bpm_weights: np.ndarray | Sequence[float] | None = None,
    corrector_weights: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """Regularised inverse ``K`` of a response matrix: the correction is ``dtheta = -K @ orbit``.

    ``dtheta`` minimises ``|W_b (orbit + R dtheta)|`` with ``dtheta = W_c u`` and the
    regularisation acting on ``u`` (``W_b = diag(bpm_weights)``, ``W_c =
    diag(corrector_weights)``): truncated SVD keeps the ``n_singular`` largest singular values
    of ``W_b R W_c``; Tikhonov applies the filter ``s / (s^2 + alpha^2)`` to them.

    Args:
        response: (nrows, ncorr) orbit response matrix R [m/rad].
        method: ``"svd"`` (truncated SVD) or ``"tikhonov"``.
        n_singular: number of singular values kept (both methods); default all non-zero ones
            (those above ``s_max * max(shape) * eps``).
        alpha: Tikhonov parameter [m/rad] (same units as the weighted singular values);
            required for ``"tikhonov"`` and refused for ``"svd"``.
        bpm_weights: (nrows,) row weights, >= 0; 0 masks the row (its column of ``K`` is 0 and
            the matrix may be NaN there). Default 1.
        corrector_weights: (ncorr,) column weights, >= 0; 0 excludes the corrector (its row of
            ``K`` is exactly 0). A larger weight makes a corrector cheaper to use. Default 1.

    Returns:
        (ncorr, nrows) correction matrix K [rad/m].

    Raises:
        ValueError: bad shapes, NaN in the used part of the matrix (with its rows and columns),
            negative weights, an unknown method, or ``n_singular`` out of range.
    """
    r = _as_matrix(response)
    m, n = r.shape
    wb = _weights(bpm_weights, m, "bpm_weights", "rows")
    wc = _weights(corrector_weights, n, "corrector_weights", "columns")
    rows, cols = wb > 0, wc > 0
    _check_finite_matrix(r, rows, cols)
    a = r[np.ix_(rows, cols)] * wb[rows, None] * wc[None, cols]
    u, _, vt, filt, k = _filtered_svd(a, method, n_singular, alpha)
    inverse = (vt[:k].T * filt) @ u[:, :k].T
    k_matrix = np.zeros((n, m))
    k_matrix[np.ix_(cols, rows)] = inverse * wc[cols, None] * wb[None, rows]
    return k_matrix


def _best_addition(
    r: np.ndarray, x: np.ndarray, fixed: list[int], scale: np.ndarray
) -> tuple[int, float]:
    """The column that, added to ``fixed``, leaves the smallest least-squares residual.

    Returns:
        ``(j, residual_sq)``: the column (-1 if every other column lies in the span of
        ``fixed``) and the squared residual [m^2] with it.
    """
    if fixed:
        basis, _ = np.linalg.qr(r[:, fixed])
        projected = r - basis @ (basis.T @ r)
        rest = x - basis @ (basis.T @ x)
    else:
        projected, rest = r, x
    norms = np.linalg.norm(projected, axis=0)
    usable = norms > 1e-10 * np.maximum(scale, np.finfo(float).tiny)
    usable[fixed] = False
    if not np.any(usable):
        return -1, float(rest @ rest)
    score = np.full(r.shape[1], -1.0)
    score[usable] = (projected[:, usable].T @ rest) ** 2 / norms[usable] ** 2
    j = int(np.argmax(score))
    return j, float(rest @ rest - score[j])


def micado(
    response: np.ndarray, orbit: np.ndarray, n_correctors: int, *, exchange: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """MICADO: choose ``n_correctors`` correctors greedily, least squares on the chosen set.

    At each step the corrector that, added to those already chosen, gives the smallest
    least-squares residual is chosen (Autin & Marti): each candidate column is orthogonalised
    against the chosen ones and scored by the residual reduction ``(q . r)^2 / |q|^2``. Pure
    greedy selection can take a neighbour of a kicked corrector first and never undo it, so
    by default exchange passes follow: each chosen corrector in turn is replaced by the best
    one given the others, while that lowers the residual. Written here because scipy has no
    greedy column selection.

    Args:
        response: (nrows, ncorr) orbit response matrix R [m/rad].
        orbit: (nrows,) orbit to correct [m].
        n_correctors: number of correctors to use, ``1 <= n <= rank``.
        exchange: run the exchange passes after the greedy selection.

    Returns:
        ``(dtheta, chosen)``: (ncorr,) kick change [rad] (0 outside the chosen set) that
        minimises ``|orbit + R dtheta|`` on the chosen set, and the chosen column indices
        (greedy order, exchanged ones in place).

    Raises:
        ValueError: bad shapes, NaN in the matrix or the orbit (with its rows and columns),
            ``n_correctors`` out of range.
    """
    r = _as_matrix(response)
    m, n = r.shape
    x = np.asarray(orbit, dtype=float)
    if x.shape != (m,):
        raise ValueError(f"orbit has shape {x.shape}; the response matrix has {m} rows")
    _check_finite_matrix(r, np.ones(m, bool), np.ones(n, bool))
    _check_finite_rows(x, np.ones(m, bool), "orbit")
    if isinstance(n_correctors, bool) or int(n_correctors) != n_correctors:
        raise ValueError(f"n_correctors must be an integer, got {n_correctors!r}")
    n_correctors = int(n_correctors)
    s = np.linalg.svd(r, compute_uv=False)
    rank = int(np.sum(s > _rank_tolerance(s, r.shape)))
    if not 1 <= n_correctors <= rank:
        raise ValueError(
            f"n_correctors={n_correctors} is out of range: the response matrix {r.shape} has "
            f"rank {rank}, so 1 <= n_correctors <= {rank}"
        )
    scale = np.linalg.norm(r, axis=0)
    chosen: list[int] = []
    best = float(x @ x)
    for _ in range(n_correctors):
        j, best_j = _best_addition(r, x, chosen, scale)
        if j < 0:
            break  # every remaining column lies in the span of the chosen ones
        chosen.append(j)
        best = best_j
    improved = exchange and len(chosen) > 1
    passes = 0
    while improved and passes < 10 * n_correctors:
        improved = False
        passes += 1
        for p in range(len(chosen)):
            others = chosen[:p] + chosen[p + 1 :]
            j, res_j = _best_addition(r, x, others, scale)
            if j >= 0 and j != chosen[p] and res_j < best * (1 - 1e-12):
                chosen[p] = j
                best = res_j
                improved = True
    idx = np.array(chosen, dtype=np.int64)
    dtheta = np.zeros(n)
    dtheta[idx] = np.linalg.lstsq(r[:, idx], -x, rcond=None)[0]
    return dtheta, idx


def _column_mask(value: object, n: int) -> np.ndarray:
    """A boolean mask of columns from a mask or a sequence of indices."""
    v = np.asarray(value)
    if v.dtype == bool:
        if v.shape != (n,):
            raise ValueError(f"sum_of_kicks_columns mask has shape {v.shape}, expected ({n},)")
        return v
    idx = v.astype(np.int64).ravel()
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise ValueError(f"sum_of_kicks_columns {idx.tolist()} out of range for {n} correctors")
    mask = np.zeros(n, bool)
    mask[idx] = True
    return mask


def solve_correction(
    response: np.ndarray,
    orbit: np.ndarray,
    *,
    method: str = "svd",
    n_singular: int | None = None,
    alpha: float | None = None,
    bpm_weights: np.ndarray | Sequence[float] | None = None,
    corrector_weights: np.ndarray | Sequence[float] | None = None,
    lower: np.ndarray | Sequence[float] | float | None = None,
    upper: np.ndarray | Sequence[float] | float | None = None,
    rf_column: np.ndarray | None = None,
    sum_of_kicks_weight: float | None = None,
    sum_of_kicks_columns: np.ndarray | Sequence[int] | None = None,
    target: np.ndarray | None = None,
) -> CorrectionResult:
    """Orbit correction: kicks (and an RF step) that bring the orbit to a target, within limits.

    Solves ``min |W_b (orbit - target + R dtheta + rf_column df)|`` with ``dtheta = W_c u``,
    optionally with the row ``w_s * sum(dtheta[sum_of_kicks_columns]) = 0`` appended, regularised
    as in :func:`correction_matrix` (truncated SVD or Tikhonov, on ``u`` and the scaled RF
    unknown). With limits, the same regularised system is solved with bounds by
    :func:`scipy.optimize.lsq_linear` (BVLS), not clipped afterwards: in the basis of the
    right singular vectors the regularised problem is ``min |D V^T (y - y0)|`` where ``y0`` is
    the unbounded solution, ``D`` is ``sqrt(s^2 + alpha^2)`` on the kept directions and
    ``sqrt(s_k^2 + alpha^2)`` (``s_k`` the smallest kept value) on the discarded ones, so a
    discarded direction is never cheaper than a kept one. Without an active limit the result
    is the unbounded one exactly.

    Args:
        response: (nrows, ncorr) orbit response matrix R [m/rad].
        orbit: (nrows,) measured orbit [m]; may be NaN on masked rows.
        method: ``"svd"`` or ``"tikhonov"``.
        n_singular: singular values kept; default all non-zero ones.
        alpha: Tikhonov parameter [m/rad], for ``"tikhonov"`` only.
        bpm_weights: (nrows,) row weights >= 0; 0 masks a BPM reading.
        corrector_weights: (ncorr,) column weights >= 0; 0 excludes a corrector (kick 0).
        lower: lower limit of ``dtheta`` [rad], scalar or (ncorr,); ``-inf`` for none.
        upper: upper limit of ``dtheta`` [rad], scalar or (ncorr,); ``inf`` for none.
        rf_column: (nrows,) orbit response to the RF frequency [m/Hz]; when given, the RF
            frequency step is an extra unknown (its column is scaled to the median norm of
            the weighted corrector columns before regularisation).
        sum_of_kicks_weight: weight [m/rad] of the sum-of-kicks row; larger drives the sum of
            the kick changes closer to 0. ``None`` or 0: no constraint.
        sum_of_kicks_columns: correctors summed (mask or indices); default all included ones
            (give the horizontal ones on a mixed-plane matrix).
        target: (nrows,) target (golden) orbit [m]; default 0.

    Returns:
        The kicks, RF step, predicted residual, singular values and active limits.

    Raises:
        ValueError: bad shapes, NaN in the used rows/columns of the matrix, the orbit, the
            target or the RF column (with their indices), negative weights, ``lower >=
            upper`` on an included corrector, an unknown method, or ``n_singular`` out of
            range.
    """
    r = _as_matrix(response)
    m, n = r.shape
    x = np.asarray(orbit, dtype=float)
    if x.shape != (m,):
        raise ValueError(f"orbit has shape {x.shape}; the response matrix has {m} rows")
    wb = _weights(bpm_weights, m, "bpm_weights", "rows")
    wc = _weights(corrector_weights, n, "corrector_weights", "columns")
    rows, cols = wb > 0, wc > 0
    _check_finite_matrix(r, rows, cols)
    _check_finite_rows(x, rows, "orbit")
    goal = np.zeros(m) if target is None else _as_vector(target, m, "target", "rows")
    _check_finite_rows(goal, rows, "target")
    rf = None
    if rf_column is not None:
        rf = _as_vector(rf_column, m, "rf_column", "rows")
        _check_finite_rows(rf, rows, "rf_column")
    lo = np.full(n, -np.inf) if lower is None else _as_vector(lower, n, "lower", "columns")
    hi = np.full(n, np.inf) if upper is None else _as_vector(upper, n, "upper", "columns")
    bad = np.flatnonzero(cols & (np.isnan(lo) | np.isnan(hi) | (lo >= hi)))
    if bad.size:
        raise ValueError(
            f"corrector limits need lower < upper; not so at columns {_listed(bad)} "
            "(exclude a corrector with corrector_weights=0 instead)"
        )
    w_sum = 0.0 if sum_of_kicks_weight is None else float(sum_of_kicks_weight)
    if not np.isfinite(w_sum) or w_sum < 0:
        raise ValueError(f"sum_of_kicks_weight must be finite and >= 0, got {w_sum!r}")

    # the weighted system in the unknowns y = [u (included correctors); v (scaled RF)]
    wr, wi = wb[rows], wc[cols]
    a = r[np.ix_(rows, cols)] * wr[:, None] * wi[None, :]
    b = -wr * (x[rows] - goal[rows])
    rf_scale = 0.0
    if rf is not None:
        rf_w = wr * rf[rows]
        rf_norm = float(np.linalg.norm(rf_w))
        if rf_norm == 0:
            raise ValueError("rf_column is zero on every unmasked row")
        rf_scale = float(np.median(np.linalg.norm(a, axis=0))) / rf_norm
        if rf_scale == 0:
            rf_scale = 1.0 / rf_norm
        a = np.column_stack([a, rf_w * rf_scale])
    if w_sum > 0:
        summed = cols if sum_of_kicks_columns is None else _column_mask(sum_of_kicks_columns, n)
        row = np.where(summed[cols], w_sum * wi, 0.0)
        if rf is not None:
            row = np.append(row, 0.0)
        a = np.vstack([a, row])
        b = np.append(b, 0.0)

    u_svd, s, vt, filt, k = _filtered_svd(a, method, n_singular, alpha)
    beta = u_svd[:, :k].T @ b
    y = vt[:k].T @ (filt * beta)

    def kicks(y: np.ndarray) -> np.ndarray:
        dtheta = np.zeros(n)
        dtheta[cols] = wi * y[: wi.size]
        return dtheta

    dtheta = kicks(y)
    bounded = bool(np.any(np.isfinite(lo[cols]) | np.isfinite(hi[cols])))
    if bounded and np.any((dtheta[cols] < lo[cols]) | (dtheta[cols] > hi[cols])):
        a2 = float(alpha or 0.0) ** 2
        d = np.full(vt.shape[0], np.sqrt(s[k - 1] ** 2 + a2))
        d[:k] = np.sqrt(s[:k] ** 2 + a2)
        metric = d[:, None] * vt  # |metric (y - y0)| is the regularised misfit
        lb = np.full(vt.shape[0], -np.inf)
        ub = np.full(vt.shape[0], np.inf)
        lb[: wi.size] = lo[cols] / wi
        ub[: wi.size] = hi[cols] / wi
        fit = lsq_linear(metric, metric @ y, bounds=(lb, ub), method="bvls")
        y = np.asarray(fit.x, dtype=float)
        dtheta = kicks(y)
    at_bound = np.zeros(n, bool)
    if bounded:
        span = np.where(np.isfinite(hi - lo), hi - lo, np.abs(dtheta) + 1.0)
        tol = 1e-12 * np.where(np.isfinite(span), span, 1.0)
        at_lo = cols & np.isfinite(lo) & (dtheta <= lo + tol)
        at_hi = cols & np.isfinite(hi) & (dtheta >= hi - tol)
        dtheta = np.where(at_lo, lo, np.where(at_hi, hi, dtheta))
        at_bound = at_lo | at_hi
    df = float(y[-1] * rf_scale) if rf is not None else 0.0

    used = np.flatnonzero(cols)
    residual = x - goal + r[:, used] @ dtheta[used]
    if rf is not None:
        residual = residual + rf * df
    return CorrectionResult(
        dtheta_rad=dtheta,
        df_hz=df,
        residual_m=residual,
        singular_values=s[:k].copy(),
        bound_active=bool(np.any(at_bound)),
        at_bound=at_bound,
    )
