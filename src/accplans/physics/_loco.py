"""LOCO: fit a lattice model and the BPM and corrector calibrations to a measured ORM.

The measured response of BPM ``b`` (rows ``[x of all bpms; y of all bpms]``) to corrector
``j`` is modelled as::

    [mx]          [ cos r_b   sin r_b] [x_bj]
    [my] = G_b    [-sin r_b   cos r_b] [y_bj]     G_b = diag(gx_b, gy_b)

    (x, y)_j = c_j (cos psi_j M_j(K) + sin psi_j O_j(K))

with ``M(K)`` the model ORM at gradients ``K`` [m/rad], ``O(K)`` the response to the same
corrector's kick rotated by +90 degrees (a horizontal kick turned into a vertical one, a
vertical kick into minus a horizontal one), ``c_j`` the corrector gain and ``psi_j`` its roll,
``gx, gy, r`` the BPM gains and roll (the twin's BPM convention: a rolled BPM reads the beam in
its own rotated frame). The RF column, when given, is the response to the RF frequency: it is
read through the BPM calibration but has no corrector gain (the frequency step is known), which
is what removes the degeneracy between BPM and corrector gains (scaling every BPM gain by ``a``
and every corrector gain by ``1/a`` changes nothing else). Without it, a constraint row holds
the mean corrector gain at 1.

:func:`fit_loco` minimises the weighted residual by Levenberg-Marquardt on the normal equations
with column scaling, an SVD cut and Tikhonov regularization. The model's dependence on the
gradients is its Jacobian ``dM/dK`` (from the model layer); between model evaluations ``M(K)``
is linearised. The Jacobian of the calibration parameters is linear algebra on the ORM and
sparse (a BPM gain touches one row, a corrector gain one column): it is built here as a scipy
sparse matrix, and the normal equations are accumulated block by block over BPMs so that the
dense gradient Jacobian (``npar x 2 nbpm x ncorr``) is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

__all__ = ["LocoFit", "LocoModelData", "compensate_gradients", "fit_loco", "loco_forward"]

#: BPMs per block when the normal equations are accumulated.
_CHUNK_BPMS = 16


@dataclass(frozen=True)
class LocoModelData:
    """The model side of a LOCO fit at one set of gradients.

    Attributes:
        matrix: (2 nbpm, ncorr) model ORM ``M`` [m/rad], rows ``[x; y]``.
        jacobian: (npar, 2 nbpm, ncorr) ``dM/dK`` [m/rad per parameter unit] (float32 or 64).
        orthogonal: (2 nbpm, ncorr) response ``O`` to each corrector's kick rotated by +90
            degrees [m/rad], or ``None`` (then corrector rolls cannot be fitted).
        rf_column: (2 nbpm,) response to the RF frequency [m/Hz], or ``None``.
        jacobian_rf: (npar, 2 nbpm) ``d rf_column / dK``, or ``None``.
    """

    matrix: np.ndarray
    jacobian: np.ndarray
    orthogonal: np.ndarray | None = None
    rf_column: np.ndarray | None = None
    jacobian_rf: np.ndarray | None = None

    def linearized(self, dk: np.ndarray) -> LocoModelData:
        """``M + J dk`` (and the RF column alike), the Jacobian unchanged."""
        dk = np.asarray(dk, dtype=float)
        m = self.matrix + np.tensordot(dk, self.jacobian, axes=1)
        rf = self.rf_column
        if rf is not None and self.jacobian_rf is not None:
            rf = rf + dk @ self.jacobian_rf
        return LocoModelData(m, self.jacobian, self.orthogonal, rf, self.jacobian_rf)


@dataclass(frozen=True)
class LocoFit:
    """Result of :func:`fit_loco`.

    Attributes:
        gradients: (npar,) fitted change of each gradient parameter from the model's starting
            values [parameter units, m^-2 for a gradient].
        bpm_gain: (nbpm, 2) BPM gains (x, y), 1 = perfect.
        bpm_roll: (nbpm,) BPM rolls [rad].
        corrector_gain: (ncorr,) corrector gains, 1 = perfect (kick seen / kick intended).
        corrector_roll: (ncorr,) corrector rolls [rad].
        chi2: weighted sum of squared residuals after each accepted iteration (index 0: start).
        chi2_per_dof: final chi2 over (number of data - number of fitted parameters).
        residual_rms: rms of the final unweighted residual [m/rad] (ORM block).
        iterations: model evaluations made (accepted and rejected steps).
        singular_values: singular values of the scaled Jacobian at the last step.
        kept: how many of them passed the SVD cut.
        converged: the relative chi2 decrease fell below the tolerance, or chi2 reached the
            rounding floor (1e-24 of the starting chi2).
        gradient_sigma: (npar,) one-sigma statistical error of ``gradients`` (from the
            weights, within the kept singular vectors).
    """

    gradients: np.ndarray
    bpm_gain: np.ndarray
    bpm_roll: np.ndarray
    corrector_gain: np.ndarray
    corrector_roll: np.ndarray
    chi2: list[float]
    chi2_per_dof: float
    residual_rms: float
    iterations: int
    singular_values: np.ndarray
    kept: int
    converged: bool
    gradient_sigma: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def calibrate(self, measured: np.ndarray) -> np.ndarray:
        """Remove the fitted BPM and corrector calibrations from a measured ORM.

        Returns the (2 nbpm, ncorr) response the ideal BPMs would have read for the intended
        kicks, to first order in the rolls (corrector rolls are not undone).
        """
        m = np.asarray(measured, dtype=float)
        nb = self.bpm_gain.shape[0]
        mx = m[:nb] / self.bpm_gain[:, :1]
        my = m[nb:] / self.bpm_gain[:, 1:]
        c, s = np.cos(self.bpm_roll)[:, None], np.sin(self.bpm_roll)[:, None]
        x = c * mx - s * my
        y = s * mx + c * my
        return np.vstack([x, y]) / self.corrector_gain[None, :]


def _bpm_apply(
    x: np.ndarray, y: np.ndarray, gain: np.ndarray, roll: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Readings of BPMs (axis 0 of x, y) with gains (nb, 2) and rolls (nb,)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    c, s = np.cos(roll).reshape(shape), np.sin(roll).reshape(shape)
    gx, gy = gain[:, 0].reshape(shape), gain[:, 1].reshape(shape)
    return gx * (c * x + s * y), gy * (-s * x + c * y)


def loco_forward(
    model: LocoModelData,
    bpm_gain: np.ndarray,
    bpm_roll: np.ndarray,
    corrector_gain: np.ndarray,
    corrector_roll: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The ORM (and RF column) the BPMs read, from the model and the calibrations.

    Returns:
        ``(matrix, rf)``: (2 nbpm, ncorr) [m/rad] and (2 nbpm,) [m/Hz] or ``None``.
    """
    nb = model.matrix.shape[0] // 2
    cols = np.cos(corrector_roll) * model.matrix
    if model.orthogonal is not None:
        cols = cols + np.sin(corrector_roll) * model.orthogonal
    cols = cols * corrector_gain
    x, y = _bpm_apply(cols[:nb], cols[nb:], bpm_gain, bpm_roll)
    rf = None
    if model.rf_column is not None:
        rx, ry = _bpm_apply(model.rf_column[:nb], model.rf_column[nb:], bpm_gain, bpm_roll)
        rf = np.concatenate([rx, ry])
    return np.vstack([x, y]), rf


@dataclass
class _State:
    dk: np.ndarray
    gain: np.ndarray  # (nb, 2)
    roll: np.ndarray  # (nb,)
    cgain: np.ndarray  # (nc,)
    croll: np.ndarray  # (nc,)

    def copy(self) -> _State:
        return _State(
            self.dk.copy(), self.gain.copy(), self.roll.copy(), self.cgain.copy(), self.croll.copy()
        )


class _Problem:
    """Data, weights and the parameter layout of one fit."""

    def __init__(
        self,
        measured: np.ndarray,
        sigma: np.ndarray,
        measured_rf: np.ndarray | None,
        sigma_rf: np.ndarray | None,
        npar: int,
        flags: dict[str, bool],
        constraint_weight: float,
    ) -> None:
        self.nrow, self.nc = measured.shape
        self.nb = self.nrow // 2
        self.npar = npar
        self.rf = measured_rf is not None
        self.ncx = self.nc + (1 if self.rf else 0)  # extended columns (RF last)
        data = measured
        w = 1.0 / sigma
        if measured_rf is not None:
            assert sigma_rf is not None
            data = np.hstack([measured, measured_rf[:, None]])
            w = np.hstack([w, 1.0 / sigma_rf[:, None]])
        ok = np.isfinite(data) & np.isfinite(w)
        self.data = np.where(ok, data, 0.0)
        self.w = np.where(ok, w, 0.0)
        self.ndata = int(np.count_nonzero(self.w))
        self.flags = flags
        self.constraint_weight = constraint_weight
        # parameter layout: [dk, gx, gy, roll, cgain, croll] (only the fitted blocks)
        sizes = {
            "gradients": npar,
            "bpm_gain_x": self.nb,
            "bpm_gain_y": self.nb,
            "bpm_roll": self.nb,
            "corrector_gain": self.nc,
            "corrector_roll": self.nc,
        }
        self.slices: dict[str, slice] = {}
        start = 0
        for name, n in sizes.items():
            if flags[name]:
                self.slices[name] = slice(start, start + n)
                start += n
        self.nparams = start

    # -- forward and residual ----------------------------------------------------------------
    def predicted(self, model: LocoModelData, st: _State) -> np.ndarray:
        m, rf = loco_forward(model, st.gain, st.roll, st.cgain, st.croll)
        if self.rf:
            if rf is None:
                raise ValueError("fit_loco: a measured RF column needs the model's RF column")
            return np.hstack([m, rf[:, None]])
        return m

    def residual(self, model: LocoModelData, st: _State) -> np.ndarray:
        """Weighted residual (2 nb, ncx)."""
        return (self.data - self.predicted(model, st)) * self.w

    def chi2(self, model: LocoModelData, st: _State) -> float:
        r = self.residual(model, st)
        out = float(np.sum(r**2))
        if self.constraint_weight > 0.0:
            out += (self.constraint_weight * (1.0 - float(np.mean(st.cgain)))) ** 2
        return out

    # -- the sparse Jacobian of the calibration parameters -------------------------------------
    def calibration_jacobian(self, model: LocoModelData, st: _State) -> sp.csr_matrix:
        """(2 nb * ncx, ncal) weighted derivative of the prediction by the calibrations."""
        nb, nc, ncx = self.nb, self.nc, self.ncx
        cols = np.cos(st.croll) * model.matrix
        if model.orthogonal is not None:
            cols = cols + np.sin(st.croll) * model.orthogonal
        before_cal = cols * st.cgain  # corrector-transformed model
        if self.rf:
            assert model.rf_column is not None
            before_cal = np.hstack([before_cal, model.rf_column[:, None]])
        x, y = before_cal[:nb], before_cal[nb:]
        c, s = np.cos(st.roll)[:, None], np.sin(st.roll)[:, None]
        gx, gy = st.gain[:, :1], st.gain[:, 1:]
        wx, wy = self.w[:nb], self.w[nb:]
        rows_x = np.arange(nb)[:, None] * ncx + np.arange(ncx)[None, :]  # flat index of x rows
        rows_y = rows_x + nb * ncx
        r_list: list[np.ndarray] = []
        c_list: list[np.ndarray] = []
        v_list: list[np.ndarray] = []
        off = 0
        bcol = np.broadcast_to(np.arange(nb)[:, None], (nb, ncx))

        def add(rows: np.ndarray, cols_: np.ndarray, vals: np.ndarray) -> None:
            r_list.append(rows.ravel())
            c_list.append(cols_.ravel())
            v_list.append(vals.ravel())

        if self.flags["bpm_gain_x"]:
            add(rows_x, off + bcol, (c * x + s * y) * wx)
            off += nb
        if self.flags["bpm_gain_y"]:
            add(rows_y, off + bcol, (-s * x + c * y) * wy)
            off += nb
        if self.flags["bpm_roll"]:
            add(rows_x, off + bcol, gx * (-s * x + c * y) * wx)
            add(rows_y, off + bcol, gy * (-c * x - s * y) * wy)
            off += nb
        need_corr = self.flags["corrector_gain"] or self.flags["corrector_roll"]
        if need_corr:
            jcol = np.broadcast_to(np.arange(nc)[None, :], (nb, nc))
            rx, ry = rows_x[:, :nc], rows_y[:, :nc]
            if self.flags["corrector_gain"]:
                base = np.cos(st.croll) * model.matrix
                if model.orthogonal is not None:
                    base = base + np.sin(st.croll) * model.orthogonal
                dx, dy = _bpm_apply(base[:nb], base[nb:], st.gain, st.roll)
                add(rx, off + jcol, dx * wx[:, :nc])
                add(ry, off + jcol, dy * wy[:, :nc])
                off += nc
            if self.flags["corrector_roll"]:
                if model.orthogonal is None:
                    raise ValueError(
                        "fit_loco: fitting corrector rolls needs the model's orthogonal response"
                    )
                base = st.cgain * (
                    -np.sin(st.croll) * model.matrix + np.cos(st.croll) * model.orthogonal
                )
                dx, dy = _bpm_apply(base[:nb], base[nb:], st.gain, st.roll)
                add(rx, off + jcol, dx * wx[:, :nc])
                add(ry, off + jcol, dy * wy[:, :nc])
                off += nc
        ncal = off
        if not r_list:
            return sp.csr_matrix((2 * nb * ncx, 0))
        return sp.csr_matrix(
            (np.concatenate(v_list), (np.concatenate(r_list), np.concatenate(c_list))),
            shape=(2 * nb * ncx, ncal),
        )

    # -- normal equations --------------------------------------------------------------------
    def normal_equations(self, model: LocoModelData, st: _State) -> tuple[np.ndarray, np.ndarray]:
        """``(J^T J, J^T r)`` of the weighted problem, in the parameter layout."""
        nb, nc, ncx = self.nb, self.nc, self.ncx
        r = self.residual(model, st)
        r_flat = r.ravel()
        js = self.calibration_jacobian(model, st)
        ncal = js.shape[1]
        ng = self.npar if self.flags["gradients"] else 0
        a = np.zeros((ng + ncal, ng + ncal))
        g = np.zeros(ng + ncal)
        if ncal:
            a[ng:, ng:] = (js.T @ js).toarray()
            g[ng:] = js.T @ r_flat
        if ng:
            jac = model.jacobian
            jrf = model.jacobian_rf
            if self.rf and jrf is None:
                raise ValueError("fit_loco: a measured RF column needs the model's jacobian_rf")
            colf = st.cgain * np.cos(st.croll)  # the K-dependence of O is neglected
            for b0 in range(0, nb, _CHUNK_BPMS):
                b1 = min(nb, b0 + _CHUNK_BPMS)
                jx = np.asarray(jac[:, b0:b1, :], dtype=float) * colf
                jy = np.asarray(jac[:, nb + b0 : nb + b1, :], dtype=float) * colf
                if self.rf:
                    assert jrf is not None
                    jx = np.concatenate([jx, np.asarray(jrf[:, b0:b1, None], float)], axis=2)
                    jy = np.concatenate(
                        [jy, np.asarray(jrf[:, nb + b0 : nb + b1, None], float)], axis=2
                    )
                tx, ty = _bpm_apply(
                    np.moveaxis(jx, 1, 0), np.moveaxis(jy, 1, 0), st.gain[b0:b1], st.roll[b0:b1]
                )
                tx = np.moveaxis(tx, 0, 1) * self.w[b0:b1]
                ty = np.moveaxis(ty, 0, 1) * self.w[nb + b0 : nb + b1]
                chunk = np.concatenate([tx, ty], axis=1).reshape(ng, -1)
                idx = np.concatenate(
                    [np.arange(b0 * ncx, b1 * ncx), np.arange((nb + b0) * ncx, (nb + b1) * ncx)]
                )
                a[:ng, :ng] += chunk @ chunk.T
                g[:ng] += chunk @ r_flat[idx]
                if ncal:
                    cross = (js[idx].T @ chunk.T).T  # (ng, ncal)
                    a[:ng, ng:] += cross
            a[ng:, :ng] = a[:ng, ng:].T
        if self.constraint_weight > 0.0 and "corrector_gain" in self.slices:
            sl = self.slices["corrector_gain"]
            row = np.zeros(ng + ncal)
            row[sl] = self.constraint_weight / nc
            a += np.outer(row, row)
            g += row * self.constraint_weight * (1.0 - float(np.mean(st.cgain)))
        return a, g

    def step_state(self, st: _State, dp: np.ndarray) -> _State:
        new = st.copy()
        sl = self.slices
        if "gradients" in sl:
            new.dk = new.dk + dp[sl["gradients"]]
        if "bpm_gain_x" in sl:
            new.gain[:, 0] += dp[sl["bpm_gain_x"]]
        if "bpm_gain_y" in sl:
            new.gain[:, 1] += dp[sl["bpm_gain_y"]]
        if "bpm_roll" in sl:
            new.roll = new.roll + dp[sl["bpm_roll"]]
        if "corrector_gain" in sl:
            new.cgain = new.cgain + dp[sl["corrector_gain"]]
        if "corrector_roll" in sl:
            new.croll = new.croll + dp[sl["corrector_roll"]]
        return new


class _StepSolver:
    """Levenberg-Marquardt steps from the normal equations, gradients by their Schur complement.

    The columns are scaled to unit norm. The calibration parameters (well determined, no SVD
    cut) are eliminated: the SVD cut and the Tikhonov term act on the Schur complement of the
    gradients, ``S = A_gg - A_gc A_cc^-1 A_cg``, whose eigenvalues are the squared singular
    values of the gradient Jacobian with the calibrations marginalised. The damping ``lambda``
    is added to every scaled diagonal element.
    """

    def __init__(
        self, a: np.ndarray, g: np.ndarray, ng: int, svd_cut: float, regularization: float
    ) -> None:
        d = np.sqrt(np.clip(np.diag(a), 0.0, None))
        live = d > 0.0
        self.dinv = np.where(live, 1.0 / np.where(live, d, 1.0), 0.0)
        a_s = a * self.dinv[:, None] * self.dinv[None, :]
        self.a_s = a_s
        self.g_s = g * self.dinv
        self.ng = ng
        self.cut = svd_cut
        self.reg2 = regularization**2
        self.dead = ~live
        self.singular_values = np.zeros(0)
        self.kept = 0
        self._lam = np.nan
        self._cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def _factor(self, lam: float) -> None:
        ng = self.ng
        a_s = self.a_s
        acc = a_s[ng:, ng:] + (lam + 1e-12) * np.eye(a_s.shape[0] - ng)
        acc[self.dead[ng:], self.dead[ng:]] = 1.0
        self._cho = sla.cho_factor(acc, lower=True, check_finite=False)
        if ng:
            x = sla.cho_solve(self._cho, a_s[ng:, :ng], check_finite=False)
            schur = a_s[:ng, :ng] - a_s[:ng, ng:] @ x
            schur[self.dead[:ng], self.dead[:ng]] = 0.0
            ev, vec = np.linalg.eigh(0.5 * (schur + schur.T))
            ev = np.clip(ev, 0.0, None)
            top = ev.max() if ev.size else 0.0
            keep = ev >= self.cut**2 * top if top > 0 else np.zeros(ev.shape, bool)
            self._cache = (ev, vec, keep)
            self.singular_values = np.sqrt(ev[::-1])
            self.kept = int(np.count_nonzero(keep))
        self._lam = lam

    def step(self, lam: float) -> np.ndarray:
        """The scaled-back parameter step at damping ``lam``."""
        if lam != self._lam:
            self._factor(lam)
        ng = self.ng
        gs_c = self.g_s[ng:]
        dp = np.zeros_like(self.g_s)
        if ng:
            assert self._cache is not None
            ev, vec, keep = self._cache
            rhs = self.g_s[:ng] - self.a_s[:ng, ng:] @ sla.cho_solve(
                self._cho, gs_c, check_finite=False
            )
            filt = np.where(keep, 1.0 / (ev + lam + self.reg2 + (~keep)), 0.0)
            dp[:ng] = vec @ (filt * (vec.T @ rhs))
        dp[ng:] = sla.cho_solve(self._cho, gs_c - self.a_s[ng:, :ng] @ dp[:ng], check_finite=False)
        return dp * self.dinv

    def gradient_sigma(self) -> np.ndarray:
        """One-sigma errors of the gradients (unit weights), within the kept subspace."""
        if self._cache is None:
            return np.zeros(self.ng)
        ev, vec, keep = self._cache
        var = (vec[:, keep] ** 2) @ (1.0 / ev[keep])
        return np.sqrt(var) * self.dinv[: self.ng]


def _as_sigma(sigma: np.ndarray | float | None, shape: tuple[int, ...], what: str) -> np.ndarray:
    if sigma is None:
        return np.ones(shape)
    s = np.broadcast_to(np.asarray(sigma, dtype=float), shape).copy()
    if np.any(s <= 0.0):
        raise ValueError(f"fit_loco: {what} must be positive (use NaN to mask an element)")
    return s


def _check_model(model: LocoModelData, shape: tuple[int, int], npar: int | None) -> int:
    if model.matrix.shape != shape:
        raise ValueError(
            f"fit_loco: model matrix has shape {model.matrix.shape}, the measured ORM {shape}"
        )
    if model.jacobian.ndim != 3 or model.jacobian.shape[1:] != shape:
        raise ValueError(
            f"fit_loco: jacobian must be (npar, {shape[0]}, {shape[1]}), got {model.jacobian.shape}"
        )
    if npar is not None and model.jacobian.shape[0] != npar:
        raise ValueError("fit_loco: the number of gradient parameters changed between evaluations")
    return int(model.jacobian.shape[0])


#: chi2 relative to the starting chi2 below which a fit is at the rounding floor
_ROUNDING_FLOOR = 1e-24


def fit_loco(
    measured: np.ndarray,
    model: LocoModelData,
    *,
    sigma: np.ndarray | float | None = None,
    measured_rf: np.ndarray | None = None,
    sigma_rf: np.ndarray | float | None = None,
    fit_gradients: bool = True,
    fit_bpm_gain: bool = True,
    fit_bpm_roll: bool = True,
    fit_corrector_gain: bool = True,
    fit_corrector_roll: bool = False,
    gain_constraint: Literal["auto", "mean_corrector", "none"] = "auto",
    svd_cut: float = 1e-4,
    regularization: float = 0.0,
    max_iterations: int = 10,
    tolerance: float = 1e-4,
    evaluate: Callable[[np.ndarray], LocoModelData] | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> LocoFit:
    """Fit gradients, BPM gains and rolls, corrector gains and rolls to a measured ORM.

    Levenberg-Marquardt on the normal equations of the weighted residual
    ``(measured - predicted) / sigma`` (module docstring for the model). Each iteration scales
    the columns of the Jacobian to unit norm and eliminates the calibration parameters (they
    are well determined); on the Schur complement of the gradients it drops the directions
    whose singular value is below ``svd_cut`` times the largest and solves
    ``(S^2 + lambda + regularization^2) x = rhs`` in the kept subspace. A step that does not
    lower chi2 is retried with ten times the damping ``lambda``.

    Args:
        measured: (2 nbpm, ncorr) measured ORM [m/rad], rows ``[x; y]`` (NaN: masked).
        model: the model at the starting gradients (``dK = 0``).
        sigma: standard error of each measured element [m/rad] (scalar or array); default 1.
        measured_rf: (2 nbpm,) measured RF column [m/Hz] to fit as well (the dispersion
            column), or ``None``.
        sigma_rf: standard error of the RF column [m/Hz]; required with ``measured_rf``.
        fit_gradients: fit the gradient parameters (else only the calibrations).
        fit_bpm_gain: fit BPM gains (x and y).
        fit_bpm_roll: fit BPM rolls.
        fit_corrector_gain: fit corrector gains.
        fit_corrector_roll: fit corrector rolls (needs ``model.orthogonal``).
        gain_constraint: ``"mean_corrector"`` holds the mean corrector gain at 1 (a weighted
            constraint row); ``"none"`` adds nothing; ``"auto"``: the constraint when BPM and
            corrector gains are both fitted and no RF column is given.
        svd_cut: relative singular value below which directions are dropped.
        regularization: Tikhonov parameter on the scaled problem (0: none).
        max_iterations: model evaluations allowed (each accepted or rejected step is one).
        tolerance: stop when an accepted step lowers chi2 by less than this fraction.
        evaluate: ``dK -> LocoModelData`` recomputing the model (ORM, Jacobian) at the starting
            gradients plus ``dK``; without it the model is linearised: ``M + J dK``.
        callback: called with ``(iteration, chi2)`` after each accepted step.

    Returns:
        The fit (:class:`LocoFit`); ``gradients`` are changes from the starting model.

    Raises:
        ValueError: inconsistent shapes, non-positive sigma, or nothing to fit.
    """
    meas = np.asarray(measured, dtype=float)
    if meas.ndim != 2 or meas.shape[0] % 2:
        raise ValueError(f"fit_loco: measured must be (2 nbpm, ncorr), got shape {meas.shape}")
    npar = _check_model(model, meas.shape, None)
    nb, nc = meas.shape[0] // 2, meas.shape[1]
    sig = _as_sigma(sigma, meas.shape, "sigma")
    rf = None
    sig_rf = None
    if measured_rf is not None:
        rf = np.asarray(measured_rf, dtype=float).reshape(-1)
        if rf.shape != (2 * nb,):
            raise ValueError(f"fit_loco: measured_rf must be ({2 * nb},), got {rf.shape}")
        if sigma_rf is None:
            raise ValueError("fit_loco: measured_rf needs sigma_rf (its standard error, m/Hz)")
        sig_rf = _as_sigma(sigma_rf, rf.shape, "sigma_rf")
        if model.rf_column is None or model.jacobian_rf is None:
            raise ValueError("fit_loco: measured_rf needs the model's rf_column and jacobian_rf")
    if gain_constraint not in ("auto", "mean_corrector", "none"):
        raise ValueError(f"fit_loco: unknown gain_constraint {gain_constraint!r}")
    if not 0.0 <= svd_cut < 1.0:
        raise ValueError(f"fit_loco: svd_cut must be in [0, 1), got {svd_cut!r}")
    if regularization < 0.0 or max_iterations < 1:
        raise ValueError("fit_loco: regularization must be >= 0 and max_iterations >= 1")
    flags = {
        "gradients": fit_gradients and npar > 0,
        "bpm_gain_x": fit_bpm_gain,
        "bpm_gain_y": fit_bpm_gain,
        "bpm_roll": fit_bpm_roll,
        "corrector_gain": fit_corrector_gain,
        "corrector_roll": fit_corrector_roll,
    }
    if not any(flags.values()):
        raise ValueError("fit_loco: nothing to fit")
    if fit_corrector_roll and model.orthogonal is None:
        raise ValueError("fit_loco: fit_corrector_roll needs model.orthogonal")
    use_constraint = gain_constraint == "mean_corrector" or (
        gain_constraint == "auto" and fit_bpm_gain and fit_corrector_gain and rf is None
    )
    # the constraint weighs like a well measured corrector column
    weight = 0.0
    if use_constraint and fit_corrector_gain:
        colnorm = np.sqrt(np.nansum((model.matrix / sig) ** 2, axis=0))
        weight = float(np.sqrt(nc) * np.max(colnorm) * 10.0)
    prob = _Problem(meas, sig, rf, sig_rf, npar, flags, weight)

    st = _State(np.zeros(npar), np.ones((nb, 2)), np.zeros(nb), np.ones(nc), np.zeros(nc))
    base = model

    def at_state(dk: np.ndarray) -> LocoModelData:
        if evaluate is None:
            return base.linearized(dk)
        new = evaluate(dk)
        _check_model(new, meas.shape, npar)
        return new

    current = model
    chi2 = prob.chi2(current, st)
    history = [chi2]
    lam = 1e-3
    iterations = 0
    converged = False
    svals = np.zeros(0)
    kept = 0
    sigma_g = np.zeros(npar)
    while iterations < max_iterations:
        a, g = prob.normal_equations(current, st)
        ng = npar if "gradients" in prob.slices else 0
        solver = _StepSolver(a, g, ng, svd_cut, regularization)
        accepted = False
        stalled = False
        while iterations < max_iterations:
            dp = solver.step(lam)
            trial = prob.step_state(st, dp)
            iterations += 1
            try:
                trial_model = at_state(trial.dk)
                trial_chi2 = prob.chi2(trial_model, trial)
            except (ArithmeticError, np.linalg.LinAlgError, RuntimeError):
                trial_chi2 = np.inf
                trial_model = current
            if np.isfinite(trial_chi2) and trial_chi2 < chi2:
                accepted = True
                decrease = (chi2 - trial_chi2) / chi2 if chi2 > 0 else 0.0
                st, current, chi2 = trial, trial_model, trial_chi2
                history.append(chi2)
                lam = max(lam / 10.0, 1e-7)
                if callback is not None:
                    callback(iterations, chi2)
                # converged: chi2 stopped falling, or the data are fitted to rounding (residuals
                # 1e-12 of the start's: below that the decrease is rounding noise, never small)
                if decrease < tolerance or chi2 <= _ROUNDING_FLOOR * history[0]:
                    converged = True
                break
            lam *= 10.0
            if lam > 1e6:
                stalled = True  # no step lowers chi2: a minimum (within the SVD cut)
                break
        svals, kept = solver.singular_values, solver.kept
        if ng:
            sigma_g = solver.gradient_sigma()
        if stalled:
            converged = True
        if converged or not accepted:
            break
    resid = (prob.data - prob.predicted(current, st))[:, :nc][prob.w[:, :nc] > 0]
    dof = max(prob.ndata - prob.nparams, 1)
    return LocoFit(
        gradients=st.dk,
        bpm_gain=st.gain,
        bpm_roll=st.roll,
        corrector_gain=st.cgain,
        corrector_roll=st.croll,
        chi2=history,
        chi2_per_dof=chi2 / dof,
        residual_rms=float(np.sqrt(np.mean(resid**2))) if resid.size else 0.0,
        iterations=iterations,
        singular_values=svals,
        kept=kept,
        converged=converged,
        gradient_sigma=sigma_g,
    )


def compensate_gradients(
    jacobian: np.ndarray,
    errors: np.ndarray,
    settable: np.ndarray,
    *,
    svd_cut: float = 1e-3,
    weights: np.ndarray | float | None = None,
) -> np.ndarray:
    """Changes of the settable gradients whose ORM change best cancels that of ``errors``.

    Least squares ``min |sum_s J_s x_s + sum_k J_k e_k|`` over the settable parameters ``s``
    (weighted by ``weights``), solved on the normal equations with column scaling and an SVD
    cut. When every parameter with an error is settable the answer is ``-errors`` (within the
    cut); gradient dipoles or unpowered magnets are compensated by the quadrupoles around them.

    Args:
        jacobian: (npar, nrow, ncol) ``dM/dK`` at the fitted model [m/rad per m^-2].
        errors: (npar,) fitted gradient errors [m^-2].
        settable: (npar,) booleans, the parameters that can be changed.
        svd_cut: relative singular value below which directions are dropped.
        weights: 1/sigma of each ORM element (scalar or (nrow, ncol)); default 1.

    Returns:
        (npar,) changes [m^-2], zero for the parameters that are not settable.
    """
    jac = np.asarray(jacobian)
    e = np.asarray(errors, dtype=float)
    mask = np.asarray(settable, dtype=bool)
    if jac.ndim != 3 or e.shape != (jac.shape[0],) or mask.shape != e.shape:
        raise ValueError(
            "compensate_gradients: jacobian (npar, nrow, ncol), errors and settable (npar,)"
        )
    if not np.any(mask):
        raise ValueError("compensate_gradients: no settable parameter")
    w = np.ones(jac.shape[1:]) if weights is None else np.broadcast_to(weights, jac.shape[1:])
    idx = np.flatnonzero(mask)
    ns = len(idx)
    gram = np.zeros((ns, ns))
    rhs = np.zeros(ns)
    for r0 in range(0, jac.shape[1], 2 * _CHUNK_BPMS):
        block = np.asarray(jac[:, r0 : r0 + 2 * _CHUNK_BPMS, :], dtype=float)
        block = (block * w[r0 : r0 + 2 * _CHUNK_BPMS]).reshape(jac.shape[0], -1)
        target = e @ block  # the ORM change of the errors, in this block
        js = block[idx]
        gram += js @ js.T
        rhs -= js @ target
    d = np.sqrt(np.diag(gram))
    d = np.where(d > 0.0, d, 1.0)
    ev, vec = np.linalg.eigh(gram / d[:, None] / d[None, :])
    keep = ev >= svd_cut**2 * ev.max()
    x = vec[:, keep] @ ((vec[:, keep].T @ (rhs / d)) / ev[keep]) / d
    out = np.zeros_like(e)
    out[idx] = x
    return out
