"""Closed orbit bumps: corrector kicks that make a position/angle at one point and nothing outside.

A bump is an equality-constrained least-squares problem on the kick changes ``k`` [rad] of a
few correctors (and optionally the RF frequency step as one more unknown, in Hz)::

    inside @ k  = target            (position [m] and/or angle [rad] at the bump point)
    extra  @ k  = 0                 (e.g. the path-length / energy row of a horizontal bump)
    min | w * (outside @ k - outside_target) |    over the BPMs outside the bump

solved in the null space of the constraints (``k = k_p + N z``), the minimum-norm ``z`` when
the closure leaves freedom. With three correctors in one plane and a position target this is
the classic three-corrector bump (its outside rows have rank 2: the bump closes exactly). With
limits, the same problem is solved by a bounded least squares with the constraints as heavily
weighted rows (:func:`scipy.optimize.lsq_linear`); a bump that cannot meet its constraints
within the limits is refused (:class:`BumpError`), never clipped.

Reference: the 3-corrector bump, e.g. S.Y. Lee, *Accelerator Physics*, sect. 2.IV (closed
orbit bumps): ``theta2 = -theta1 sqrt(b1/b2) sin(mu31)/sin(mu32)``,
``theta3 = theta1 sqrt(b1/b3) sin(mu21)/sin(mu32)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import lsq_linear

__all__ = ["BumpError", "BumpSolution", "bump_kicks", "bump_span", "nearest_correctors"]

#: relative error of a constraint (amplitude, path length) the solve accepts
_CONSTRAINT_RTOL = 1e-6
#: weight of the constraint rows (relative to the outside rows) in the bounded solve
_HEAVY = 1e6


class BumpError(ValueError):
    """The bump cannot be made: too few or degenerate correctors, or limits in the way."""


@dataclass(frozen=True)
class BumpSolution:
    """Kicks of a bump and what the model predicts for them.

    Attributes:
        kicks: (n,) kick changes [rad] (and the RF step [Hz] as the last entry when the RF
            column was given as an unknown).
        inside: (ni,) predicted values of the constrained quantities (``inside @ kicks``).
        outside: (no,) predicted orbit change at the outside BPMs [m] (the leakage).
        at_limit: (n,) ``True`` where the bounded solve stopped at a limit.
    """

    kicks: np.ndarray
    inside: np.ndarray
    outside: np.ndarray
    at_limit: np.ndarray


def _matrix(value: np.ndarray | Sequence[Sequence[float]], n: int | None, what: str) -> np.ndarray:
    a = np.atleast_2d(np.asarray(value, dtype=float))
    if a.ndim != 2:
        raise ValueError(f"{what} must be a 2D matrix, got shape {a.shape}")
    if n is not None and a.shape[1] != n:
        raise ValueError(f"{what} has {a.shape[1]} columns; the bump has {n} unknowns")
    if not np.all(np.isfinite(a)):
        rows = np.flatnonzero(~np.all(np.isfinite(a), axis=1))
        raise ValueError(f"{what} is not finite at rows {rows[:10].tolist()}")
    return a


def _vector(value: object, n: int, what: str, default: float) -> np.ndarray:
    if value is None:
        return np.full(n, default)
    v = np.asarray(value, dtype=float)
    if v.ndim == 0:
        return np.full(n, float(v))
    if v.shape != (n,):
        raise ValueError(f"{what} has shape {v.shape}, expected ({n},)")
    return v


def bump_kicks(
    inside: np.ndarray | Sequence[Sequence[float]],
    outside: np.ndarray | Sequence[Sequence[float]],
    target: np.ndarray | Sequence[float],
    *,
    extra: np.ndarray | Sequence[Sequence[float]] | None = None,
    outside_target: np.ndarray | Sequence[float] | None = None,
    weights: np.ndarray | Sequence[float] | None = None,
    lower: np.ndarray | Sequence[float] | float | None = None,
    upper: np.ndarray | Sequence[float] | float | None = None,
    rcond: float = 1e-9,
    leakage_tolerance: float | None = 0.0,
) -> BumpSolution:
    """Kicks of a closed bump (module docstring): constraints met exactly, leakage minimised.

    Args:
        inside: (ni, n) response of the constrained quantities at the bump point to each
            unknown: position [m/rad] and/or angle [rad/rad] rows (m/Hz, rad/Hz for an RF
            column).
        outside: (no, n) orbit response [m/rad] of the BPMs outside the bump (the plane of
            the bump; m/Hz for an RF column).
        target: (ni,) values of the constrained quantities [m, rad].
        extra: (ne, n) more constraint rows whose value must stay 0 (the change of the beam
            energy or path length of a horizontal bump).
        outside_target: (no,) orbit change wanted outside [m]; default 0 (a closed bump; a
            closure iteration gives minus the measured leakage).
        weights: (no,) weights >= 0 of the outside rows (0 ignores a BPM); default 1.
        lower: lower limits of the kick changes [rad] (and RF step [Hz]); ``-inf``: none.
        upper: upper limits, as ``lower``.
        rcond: relative cut-off of the singular values of the constraints and of the
            closure (smaller ones count as zero).
        leakage_tolerance: when limits are active, the bounded bump may leak this much more
            (weighted rms over the outside rows, m) than the unbounded one, else it is refused;
            ``None``: any (a best effort within the limits, e.g. for a closure step).

    Returns:
        The kicks and their predicted effect.

    Raises:
        BumpError: fewer unknowns than independent constraints, constraints the unknowns
            cannot meet (degenerate correctors), or limits that do not leave room for the bump.
        ValueError: bad shapes, NaN, negative weights, ``lower > upper``.
    """
    a_in = _matrix(inside, None, "inside")
    n = a_in.shape[1]
    a_out = _matrix(outside, n, "outside") if np.size(outside) else np.zeros((0, n))
    t_in = _vector(target, a_in.shape[0], "target", 0.0)
    if not np.all(np.isfinite(t_in)):
        raise ValueError(f"target must be finite, got {t_in}")
    rows = [a_in]
    values = [t_in]
    if extra is not None and np.size(extra):
        a_ex = _matrix(extra, n, "extra")
        rows.append(a_ex)
        values.append(np.zeros(a_ex.shape[0]))
    c = np.vstack(rows)
    d = np.concatenate(values)
    t_out = _vector(outside_target, a_out.shape[0], "outside_target", 0.0)
    w = _vector(weights, a_out.shape[0], "weights", 1.0)
    if not np.all(np.isfinite(t_out)):
        raise ValueError("outside_target must be finite")
    if np.any(~np.isfinite(w) | (w < 0)):
        raise ValueError("weights must be finite and >= 0")
    lo = _vector(lower, n, "lower", -np.inf)
    hi = _vector(upper, n, "upper", np.inf)
    if np.any(np.isnan(lo) | np.isnan(hi) | (lo > hi)):
        raise ValueError("limits need lower <= upper (no NaN)")
    wa = a_out * w[:, None]
    wt = t_out * w
    # unknowns scaled to unit-norm columns (kicks in rad and an RF step in Hz differ by 1e12)
    g = np.linalg.norm(wa, axis=0) if wa.shape[0] else np.zeros(n)
    g = np.where(g > 0, g, np.linalg.norm(c, axis=0))
    g = np.where(g > 0, g, 1.0)
    cs, was = c / g, wa / g
    # constraints: each row normalised (positions, angles and energy have different units)
    norms = np.linalg.norm(cs, axis=1)
    if np.any(norms == 0):
        raise BumpError(
            f"constraint rows {np.flatnonzero(norms == 0).tolist()} do not depend on the chosen "
            "correctors: choose correctors that act on the bump point"
        )
    cn, dn = cs / norms[:, None], d / norms
    u, s, vt = np.linalg.svd(cn, full_matrices=True)
    rank = int(np.sum(s > rcond * s[0]))
    if rank < c.shape[0]:
        raise BumpError(
            f"{n} unknowns cannot meet {c.shape[0]} independent constraints (rank {rank}): "
            "use more correctors, or correctors at other phases"
        )
    y = vt[:rank].T @ ((u[:, :rank].T @ dn) / s[:rank])
    null = vt[rank:].T  # (n, n - rank)
    if null.shape[1] and was.shape[0]:
        z = np.linalg.lstsq(was @ null, wt - was @ y, rcond=rcond)[0]
        y = y + null @ z
    at_limit = np.zeros(n, bool)
    if np.any(y < lo * g) or np.any(y > hi * g):
        free = float(np.linalg.norm(was @ y - wt))
        y, at_limit = _bounded(cn, dn, was, wt, lo * g, hi * g)
        miss = float(np.max(np.abs(cn @ y - dn)))
        scale = max(float(np.max(np.abs(dn))), float(np.max(np.abs(y))), np.finfo(float).tiny)
        worse = (float(np.linalg.norm(was @ y - wt)) - free) / np.sqrt(max(wa.shape[0], 1))
        size = float(np.linalg.norm(was, 2) * np.linalg.norm(y)) if was.size else 0.0
        rounding = 1e-9 * size / np.sqrt(max(wa.shape[0], 1))
        allowed = None if leakage_tolerance is None else leakage_tolerance + rounding
        if miss > 1e-3 * scale or (allowed is not None and worse > allowed):
            raise BumpError(
                f"the bump needs kicks beyond the limits (unknowns "
                f"{np.flatnonzero(at_limit).tolist()} at their limits would miss its constraints "
                f"by {miss:.3g} (normalised) or leak {worse:.3g} m rms more): reduce the "
                "amplitude or use more or other correctors"
            )
    kicks = y / g
    return BumpSolution(kicks=kicks, inside=a_in @ kicks, outside=a_out @ kicks, at_limit=at_limit)


def _bounded(
    cn: np.ndarray, dn: np.ndarray, wa: np.ndarray, wt: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The bump within limits: constraints as heavily weighted rows, BVLS."""
    scale = max(float(np.linalg.norm(wa, 2)) if wa.size else 0.0, 1.0) * _HEAVY
    a = np.vstack([cn * scale, wa])
    b = np.concatenate([dn * scale, wt])
    col = np.linalg.norm(a, axis=0)
    col[col == 0] = 1.0
    res = lsq_linear(a / col, b, bounds=(lo * col, hi * col), method="bvls", tol=1e-14)
    kicks = res.x / col
    span = np.where(np.isfinite(hi - lo), hi - lo, 1.0)
    at_limit = (np.abs(kicks - lo) < 1e-9 * span) | (np.abs(kicks - hi) < 1e-9 * span)
    return kicks, at_limit


def _relative(position: np.ndarray, origin: float, period: float) -> np.ndarray:
    """Positions relative to ``origin`` on a ring of length ``period``, in [-period/2, period/2)."""
    return (np.asarray(position, float) - origin + 0.5 * period) % period - 0.5 * period


def bump_span(
    point: int, corrector_elements: Sequence[int], bpm_elements: Sequence[int], n_elements: int
) -> np.ndarray:
    """Which BPMs are inside a bump: between its first and last corrector, around the point.

    Positions are element indices on the ring (``n_elements`` of them), taken relative to the
    bump point in ``[-n/2, n/2)``: a corrector at the point's element or after it is
    downstream (the orbit at an element is at its entrance).

    Args:
        point: element index of the bump point.
        corrector_elements: element indices of the bump's correctors.
        bpm_elements: element indices of the BPMs.
        n_elements: number of elements of the ring.

    Returns:
        (nbpm,) ``True`` for the BPMs inside the bump.
    """
    rc = _relative(np.asarray(corrector_elements), point, n_elements)
    rb = _relative(np.asarray(bpm_elements), point, n_elements)
    return (rb >= rc.min()) & (rb <= rc.max())


def nearest_correctors(
    point_s: float,
    corrector_s: Sequence[float],
    n: int,
    circumference: float,
    *,
    point: int | None = None,
    corrector_elements: Sequence[int] | None = None,
) -> np.ndarray:
    """The ``n`` correctors nearest to a point (by path length), balanced between its sides.

    ``n // 2`` are taken on one side and the rest on the side of the nearest corrector (a bump
    of position and angle needs two correctors on each side to close).

    Args:
        point_s: position of the bump point [m].
        corrector_s: (ncorr,) positions of the candidate correctors [m].
        n: how many to choose (>= 2).
        circumference: ring length [m].
        point: element index of the point (with ``corrector_elements``: a corrector at the same
            position counts as upstream if its element comes first).
        corrector_elements: element indices of the candidates.

    Returns:
        The chosen indices into ``corrector_s``, in ring order starting upstream of the point.

    Raises:
        BumpError: fewer candidates than ``n`` or ``n < 2``.
    """
    s = np.asarray(corrector_s, float)
    if n < 2 or n > s.size:
        raise BumpError(f"a bump needs 2 <= n <= {s.size} correctors, got {n}")
    rel = _relative(s, point_s, circumference)
    if point is not None and corrector_elements is not None:
        e = np.asarray(corrector_elements)
        rel = np.where((rel == 0) & (e < point), -1e-12, rel)
    up = np.flatnonzero(rel < 0)
    down = np.flatnonzero(rel >= 0)
    up, down = up[np.argsort(-rel[up], kind="stable")], down[np.argsort(rel[down], kind="stable")]
    # balanced: n // 2 on one side, the rest on the side of the nearest corrector
    near_up = up.size > 0 and (down.size == 0 or -rel[up[0]] < rel[down[0]])
    n_up = n - n // 2 if near_up else n // 2
    n_up = min(max(n_up, n - down.size), up.size)
    chosen = list(up[:n_up]) + list(down[: n - n_up])
    idx = np.array(chosen)
    return idx[np.argsort(rel[idx], kind="stable")]
