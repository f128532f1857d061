"""Non-linear optics: amplitude-dependent tune shift (ADTS) from pinger shots, and its correction.

Amplitude detuning makes the betatron tunes depend on the actions ``J = (Jx, Jy)``::

    Q_u(J) = Q_u0 + (dQu/dJx) Jx + (dQu/dJy) Jy (+ second order)

A pinger kick ``theta`` at a point where the beam sits on the closed orbit (``x = 0``) gives
``J = beta theta^2 / 2`` (the Courant-Snyder invariant ``(gamma x^2 + 2 alpha x x' + beta
x'^2) / 2`` at ``x = 0``): :func:`kick_actions`. The tune of each shot comes from NAFF
(nafflib) on the leading temporal singular vectors of the BPM x turn matrix of each plane
(:func:`line_tune`): the SVD sums the BPMs (their noise averages out) and keeps the betatron
part; NAFF then gives a few lines per vector and the one nearest the plane's reference tune is
the plane's tune, so that the other plane's line, which coupling puts into every BPM and which
dominates a plane barely kicked, is never taken for it. :func:`fit_adts` fits the four
coefficients (pyAT's layout ``[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]]``) by weighted least
squares with their standard errors.

The correction (:func:`constrained_step`) minimizes a weighted objective vector (e.g. the
detuning coefficients of the model) by Gauss-Newton steps restricted to the null space of a
constraint response (the chromaticity, and the tunes, per knob): the constraints do not move to
first order, whatever the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import nafflib
import numpy as np
import numpy.typing as npt

__all__ = [
    "AdtsFit",
    "ConstrainedStep",
    "constrained_step",
    "fit_adts",
    "kick_actions",
    "line_tune",
    "null_space",
    "tbt_actions",
]


def kick_actions(kick_rad: npt.ArrayLike, beta_m: npt.ArrayLike) -> np.ndarray:
    """Actions (m) of kicks on the closed orbit: ``J = beta theta^2 / 2`` per plane.

    Args:
        kick_rad: (..., 2) kicks (x, y) (rad).
        beta_m: (2,) beta functions (m) at the kicker.
    """
    k = np.asarray(kick_rad, dtype=float)
    b = np.asarray(beta_m, dtype=float)
    if b.shape != (2,) or not np.all(b > 0):
        raise ValueError(f"kick_actions: beta_m must be two positive betas, got {beta_m!r}")
    return 0.5 * b * k**2


def tbt_actions(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    beta_m: npt.ArrayLike,
    tunes: npt.ArrayLike,
    *,
    window: int = 8,
    windows: int = 4,
    good: npt.ArrayLike | None = None,
) -> np.ndarray:
    """Actions (Jx, Jy) (m) of a shot from its first turns and the model beta at the BPMs.

    Per window of ``window`` turns (``windows`` of them from turn 0), each BPM's oscillation is
    fitted by ``cos``/``sin`` at both tunes (the other plane's line, which coupling adds, is
    fitted apart); ``J(n) = median_i(A_i^2 / (2 beta_i))`` over the BPMs (beta-beating and gain
    errors average out, bad BPMs do not pull a median). Decoherence shrinks the centroid's
    amplitude as ``exp(-c n^2)`` at first (chromatic and amplitude-detuning envelopes alike), so
    ``ln J`` is fitted by ``ln J0 - c n^2`` over the windows and ``J0`` (turn 0) returned.

    Args:
        x: (n_bpm, n_turns) horizontal positions (m).
        y: (n_bpm, n_turns) vertical positions (m).
        beta_m: (2, n_bpm) model beta at the BPMs (m).
        tunes: (2,) fractional tunes of the shot.
        window: turns per window.
        windows: windows used (``window * windows`` turns at most).
        good: (n_bpm,) BPMs to use (default all).

    Returns:
        (2,) actions at turn 0 (m).
    """
    data = [np.asarray(x, dtype=float), np.asarray(y, dtype=float)]
    beta = np.asarray(beta_m, dtype=float)
    q = np.asarray(tunes, dtype=float)
    n_turns = data[0].shape[1]
    windows = max(1, min(windows, n_turns // window))
    if windows < 1 or window < 4:
        raise ValueError(f"tbt_actions: need >= 4 turns per window, got {window} of {n_turns}")
    ok = np.ones(data[0].shape[0], bool) if good is None else np.asarray(good, dtype=bool)
    ok &= np.all(np.isfinite(data[0]) & np.isfinite(data[1]), axis=1) & np.all(beta > 0, axis=0)
    out = np.zeros(2)
    for p in range(2):
        d = data[p][ok] - data[p][ok].mean(axis=1, keepdims=True)
        centres, js = [], []
        for k in range(windows):
            n = np.arange(k * window, (k + 1) * window)
            cols = [f(2 * np.pi * qq * n) for qq in (q[p], q[1 - p]) for f in (np.cos, np.sin)]
            coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), d[:, n].T, rcond=None)
            amp2 = coef[0] ** 2 + coef[1] ** 2
            js.append(float(np.median(amp2 / (2 * beta[p, ok]))))
            centres.append(float(n.mean()))
        js_arr = np.array(js)
        if windows == 1 or np.any(js_arr <= 0):
            out[p] = float(js_arr[0])
            continue
        slope, intercept = np.polyfit(np.array(centres) ** 2, np.log(js_arr), 1)
        out[p] = float(np.exp(intercept)) if slope <= 0 else float(np.exp(np.mean(np.log(js_arr))))
    return out


def _fold(q: np.ndarray) -> np.ndarray:
    f = np.abs(np.asarray(q, dtype=float)) % 1.0
    return np.minimum(f, 1.0 - f)


def line_tune(
    data: npt.ArrayLike,
    reference: float,
    *,
    modes: int = 4,
    harmonics: int = 2,
    window: float = 0.05,
    good: npt.ArrayLike | None = None,
) -> tuple[float, float]:
    """Fractional tune of the line nearest ``reference`` in a BPM x turn matrix (NAFF on SVD).

    The centred matrix (good BPMs) is decomposed by SVD; NAFF (nafflib, Hann window of order 2)
    takes ``harmonics`` lines of each of the first ``modes`` temporal vectors (scaled by their
    singular values). Lines are folded into [0, 0.5]; those within ``window`` of the folded
    reference are kept and the tune is their amplitude-weighted mean (the cos and sin vectors
    of one betatron line give the same frequency), unfolded to the side of ``reference``.

    Args:
        data: (n_bpm, n_turns) positions (m).
        reference: expected fractional tune (e.g. the model's, or a small-kick shot's).
        modes: temporal singular vectors analysed.
        harmonics: NAFF lines per vector.
        window: largest |line - reference| accepted (tune units).
        good: (n_bpm,) BPMs to use (default all).

    Returns:
        ``(tune, amplitude)``: the tune (in [0, 1), on the side of ``reference``) and the
        summed amplitude of the lines used (m, a measure of how strong the line is).

    Raises:
        ValueError: no line within ``window`` of the reference.
    """
    x = np.asarray(data, dtype=float)
    if x.ndim != 2 or x.shape[1] < 8:
        raise ValueError(f"line_tune: need a (BPMs, >= 8 turns) matrix, got shape {x.shape}")
    if good is not None:
        x = x[np.asarray(good, dtype=bool)]
    x = x[np.all(np.isfinite(x), axis=1)]
    x = x - x.mean(axis=1, keepdims=True)
    x = x[np.any(x != 0, axis=1)]
    if x.shape[0] == 0:
        raise ValueError("line_tune: no BPM with a signal")
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    ref = float(_fold(np.array(reference)))
    freqs, amps = [], []
    for k in range(min(modes, s.size)):
        a, f = nafflib.harmonics(s[k] * vt[k], num_harmonics=harmonics, window_order=2)
        freqs.extend(_fold(np.real(f)).tolist())
        amps.extend(np.abs(a).tolist())
    fr, am = np.array(freqs), np.array(amps)
    near = np.abs(fr - ref) <= window
    if not np.any(near):
        raise ValueError(
            f"line_tune: no line within {window:g} of the reference tune {ref:.4f} "
            f"(lines found: {np.round(np.sort(fr), 4).tolist()})"
        )
    # the strongest line near the reference, and the lines that are the same line
    best = fr[near][np.argmax(am[near])]
    same = near & (np.abs(fr - best) <= 1e-3)
    tune = float(np.sum(am[same] * fr[same]) / np.sum(am[same]))
    if abs(float(reference) % 1.0 - (1.0 - tune)) < abs(float(reference) % 1.0 - tune):
        tune = 1.0 - tune
    return tune, float(np.sum(am[same]))


@dataclass(frozen=True)
class AdtsFit:
    """Amplitude detuning fitted to shots.

    Attributes:
        detuning: (2, 2) ``[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]]`` (1/m, pyAT's layout:
            row = the action, column = the tune).
        std: (2, 2) standard errors (1/m).
        tunes0: (2,) tunes at zero amplitude.
        std_tunes0: (2,) their standard errors.
        second_order: (2, 3) second-order terms per tune ``(Jx^2, Jx Jy, Jy^2)`` (1/m^2; zeros
            for a linear fit).
        residual_rms: (2,) rms residual of the fit per tune.
        order: 1 (linear in J) or 2 (with the second-order terms).
    """

    detuning: np.ndarray
    std: np.ndarray
    tunes0: np.ndarray
    std_tunes0: np.ndarray
    second_order: np.ndarray
    residual_rms: np.ndarray
    order: int


def fit_adts(
    actions: npt.ArrayLike,
    tunes: npt.ArrayLike,
    *,
    order: int = 1,
    sigma: npt.ArrayLike | None = None,
) -> AdtsFit:
    """Fit ``Q_u = Q_u0 + sum_v (dQu/dJv) J_v`` (+ second order) to shots, each tune apart.

    Least squares per tune on all shots together (an x scan at a small vertical kick and a y
    scan at a small horizontal kick both constrain every coefficient). Standard errors from
    the covariance scaled by the residuals (``sigma`` given: by its weights, scaled by the
    reduced chi-square when larger than 1).

    Args:
        actions: (n, 2) actions (Jx, Jy) of the shots (m).
        tunes: (n, 2) measured tunes (x, y); NaN: that tune left out of its fit.
        order: 1 (linear) or 2 (adds ``Jx^2``, ``Jx Jy``, ``Jy^2``).
        sigma: (n, 2) uncertainties of the tunes (default: equal weights).

    Raises:
        ValueError: bad shapes, too few shots, or actions that cannot separate the planes.
    """
    j = np.asarray(actions, dtype=float)
    q = np.asarray(tunes, dtype=float)
    if j.ndim != 2 or j.shape[1] != 2 or q.shape != j.shape:
        raise ValueError(f"fit_adts: actions {j.shape} and tunes {q.shape} must be (n, 2)")
    if order not in (1, 2):
        raise ValueError(f"fit_adts: order must be 1 or 2, got {order!r}")
    if not np.all(np.isfinite(j)) or np.any(j < 0):
        raise ValueError("fit_adts: actions must be finite and >= 0")
    cols = [np.ones(len(j)), j[:, 0], j[:, 1]]
    if order == 2:
        # the Jx Jy term only when the shots separate it (two 1D scans do not)
        cols += [j[:, 0] ** 2, j[:, 1] ** 2]
        with_cross = np.column_stack([*cols, j[:, 0] * j[:, 1]])
        if np.linalg.matrix_rank(with_cross / np.max(np.abs(with_cross), axis=0)) == 6:
            cols.append(j[:, 0] * j[:, 1])
    design = np.stack(cols, axis=1)
    # scale the columns: actions are ~1e-8 m
    scale = np.max(np.abs(design), axis=0)
    scale[scale == 0] = 1.0
    sig = np.ones_like(q) if sigma is None else np.asarray(sigma, dtype=float)
    if sig.shape != q.shape or np.any(~(sig > 0)):
        raise ValueError("fit_adts: sigma must be (n, 2) and > 0")
    npar = design.shape[1]
    coef = np.full((2, npar), np.nan)
    std = np.full((2, npar), np.nan)
    rms = np.full(2, np.nan)
    for u in range(2):
        ok = np.isfinite(q[:, u])
        if np.count_nonzero(ok) < npar + 1:
            raise ValueError(
                f"fit_adts: tune {'xy'[u]}: {np.count_nonzero(ok)} shots for {npar} "
                "parameters (need at least one more)"
            )
        a = design[ok] / scale / sig[ok, u, None]
        b = q[ok, u] / sig[ok, u]
        if np.linalg.matrix_rank(a) < npar:
            raise ValueError("fit_adts: the shots' actions do not separate the coefficients")
        c, *_ = np.linalg.lstsq(a, b, rcond=None)
        resid = b - a @ c
        dof = max(np.count_nonzero(ok) - npar, 1)
        chi2 = float(resid @ resid) / dof
        cov = np.linalg.inv(a.T @ a) * (chi2 if sigma is None else max(chi2, 1.0))
        coef[u] = c / scale
        std[u] = np.sqrt(np.diag(cov)) / scale
        rms[u] = float(np.sqrt(np.mean((resid * sig[ok, u]) ** 2)))
    second = np.zeros((2, 3))
    if order == 2:
        second[:, 0], second[:, 2] = coef[:, 3], coef[:, 4]
        if npar == 6:
            second[:, 1] = coef[:, 5]
    return AdtsFit(
        detuning=coef[:, 1:3].T.copy(),
        std=std[:, 1:3].T.copy(),
        tunes0=coef[:, 0].copy(),
        std_tunes0=std[:, 0].copy(),
        second_order=second,
        residual_rms=rms,
        order=order,
    )


def null_space(constraints: npt.ArrayLike, *, svd_cut: float = 1e-3) -> np.ndarray:
    """Orthonormal basis (nknobs, k) of the knob steps the constraint rows do not see.

    Singular values below ``svd_cut`` times the largest count as zero: a constraint row the
    knobs barely move (e.g. the tunes for sextupoles on a zero orbit) uses up no knob.
    """
    c = np.asarray(constraints, dtype=float)
    if c.ndim != 2:
        raise ValueError(f"null_space: constraints must be (m, nknobs), got shape {c.shape}")
    _, s, vt = np.linalg.svd(c, full_matrices=True)
    rank = int(np.count_nonzero(s > svd_cut * (s[0] if s.size else 0.0))) if s.size else 0
    return vt[rank:].T.copy()


@dataclass(frozen=True)
class ConstrainedStep:
    """A knob step in the null space of the constraints.

    Attributes:
        steps: (nknobs,) knob changes.
        predicted: (nobj,) objective vector predicted after the step (linear).
        free: number of free directions (the null space's dimension).
    """

    steps: np.ndarray
    predicted: np.ndarray
    free: int


def constrained_step(
    jacobian: npt.ArrayLike,
    objective: npt.ArrayLike,
    constraints: npt.ArrayLike,
    *,
    target: npt.ArrayLike | None = None,
    weights: npt.ArrayLike | None = None,
    regularization: float = 0.0,
    knob_scale: npt.ArrayLike | None = None,
    svd_cut: float = 1e-3,
) -> ConstrainedStep:
    """Knob step minimizing ``|W (objective + J s - target)|^2 + r^2 |s / scale|^2``, ``C s = 0``.

    ``s = N z`` with ``N`` the :func:`null_space` of ``constraints``; ``z`` from Tikhonov least
    squares (``regularization`` relative to the largest singular value of ``W J``; directions
    of ``W J N`` below 1e-3 of it, the precision of a differenced Jacobian, are left out).

    Args:
        jacobian: (nobj, nknobs) objective change per knob unit.
        objective: (nobj,) present objective values.
        constraints: (m, nknobs) response of the held quantities per knob unit (rows scaled
            to a common tolerance, e.g. chromaticity / 0.1 and tunes / 1e-3).
        target: (nobj,) objective wanted (default 0).
        weights: (nobj,) weights (default 1).
        regularization: relative Tikhonov parameter (0: minimum-norm least squares).
        knob_scale: (nknobs,) scale of each knob (the regularization and the null space work
            on ``s / scale``); default 1.
        svd_cut: relative cut of the constraints' singular values.
    """
    jac = np.asarray(jacobian, dtype=float)
    obj = np.asarray(objective, dtype=float)
    con = np.asarray(constraints, dtype=float)
    nobj, nk = jac.shape
    if obj.shape != (nobj,) or con.ndim != 2 or con.shape[1] != nk:
        raise ValueError(
            f"constrained_step: jacobian {jac.shape}, objective {obj.shape}, constraints "
            f"{con.shape} do not match"
        )
    if not (np.all(np.isfinite(jac)) and np.all(np.isfinite(obj)) and np.all(np.isfinite(con))):
        raise ValueError("constrained_step: non-finite input")
    tgt = np.zeros(nobj) if target is None else np.asarray(target, dtype=float)
    w = np.ones(nobj) if weights is None else np.asarray(weights, dtype=float)
    sc = np.ones(nk) if knob_scale is None else np.asarray(knob_scale, dtype=float)
    if np.any(~(sc > 0)) or np.any(~(w > 0)):
        raise ValueError("constrained_step: weights and knob_scale must be > 0")
    basis = null_space(con * sc, svd_cut=svd_cut)  # in scaled knobs
    if basis.shape[1] == 0:
        raise ValueError(
            f"constrained_step: the {con.shape[0]} constraints leave no free direction of "
            f"the {nk} knobs"
        )
    full = w[:, None] * jac * sc
    a = full @ basis
    b = -w * (obj - tgt)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    # relative to the unconstrained response: free directions the objective does not see
    # (e.g. two magnets of the same symmetry moved against each other) stay at zero
    ref = float(np.linalg.norm(full, 2)) or 1.0
    lam = regularization * ref
    keep = s > 1e-3 * ref
    f = np.zeros_like(s)
    f[keep] = s[keep] / (s[keep] ** 2 + lam**2)
    z = vt.T @ (f * (u.T @ b))
    steps = sc * (basis @ z)
    return ConstrainedStep(steps=steps, predicted=obj + jac @ steps, free=basis.shape[1])
