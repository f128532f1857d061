"""The model side of turn-by-turn optics: phase advances, their response to gradients, a fit.

:class:`PhaseModel` is a copy of the online model's lattice (4D, on momentum) whose gradients
can be changed: quadrupoles (one parameter per quadrupole device) and, for a fit, the
gradients that the closed orbit makes in the sextupoles (``2 K2 x``, one per sextupole
element: with an uncorrected orbit they beat beta more than the quadrupole errors do). The
response of the phases at the BPMs to every parameter is analytic
(:func:`accplans.physics.phase_response`, from the optics at the entrance, middle and exit of
each parameter's elements, Simpson's rule): one optics of a copy with those elements halved,
against one optics per parameter for finite differences (EBS: 0.3 s for 700 parameters).

:func:`fit_phase_model` fits the parameters to measured phases (Gauss-Newton, Tikhonov,
the model's phases evaluated exactly by pyAT at every iteration), and gives the fitted model's
beta at the BPMs: beta from phase without the 3-BPM method's assumption that the transport
between neighbouring BPMs is the model's. :func:`phase_correction` gives the quadrupole
changes that bring measured phases to target phases.

:func:`fit_coupled_phase_model` adds the coupling: one skew gradient per sextupole element
(the vertical orbit's feed-down ``2 K2 y``), which changes the mode phases only at second
order, determined by the coupling ratios of the TbT lines
(:func:`accplans.physics.coupling_ratios`; the model's from ``linopt6``'s normalising matrix,
:meth:`PhaseModel.coupling`), with a roll per BPM and a common x/y amplitude ratio of the
lines as nuisance parameters. Its beta is the fitted model's normal-mode beta. The response
of the ratios to the skews is by finite differences (one ``linopt6`` per sextupole: ~1 min on
EBS), computed once at the start model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import at
import numpy as np
from scipy.optimize import minimize_scalar

from ..physics import coupling_fit_step, phase_fit_step, phase_response
from ._model import OnlineModel

__all__ = [
    "PhaseFit",
    "PhaseModel",
    "fit_coupled_phase_model",
    "fit_phase_model",
    "phase_correction",
]

_SIMPSON = np.array([1.0, 4.0, 1.0]) / 6.0


@dataclass(frozen=True)
class PhaseFit:
    """A model fitted to measured phases.

    Attributes:
        parameters: parameter names (quadrupole devices, then ``FamName[element]``).
        gradients: (m,) fitted gradient changes (m^-2).
        beta: (2, n) beta (m) of the fitted model at the BPMs.
        phase: (2, n) phase (rad) of the fitted model at the BPMs.
        tunes: (2,) total tunes of the fitted model.
        residual_rms: (iterations + 1,) rms of measured minus model phase (rad, offsets
            removed, good BPMs), before the first step and after each.
        skew_parameters: skew parameter names (``FamName[element]``; coupled fit only).
        skew_gradients: fitted skew gradients (m^-2) of those parameters.
        coupling_residual_rms: (iterations + 1,) rms of measured minus model coupling ratios
            (good BPMs), before the first step and after each (coupled fit only).
    """

    parameters: list[str]
    gradients: np.ndarray
    beta: np.ndarray
    phase: np.ndarray
    tunes: np.ndarray
    residual_rms: np.ndarray
    skew_parameters: list[str] = field(default_factory=list)
    skew_gradients: np.ndarray = field(default_factory=lambda: np.zeros(0))
    coupling_residual_rms: np.ndarray = field(default_factory=lambda: np.zeros(0))


class PhaseModel:
    """A lattice copy of an online model with adjustable gradients (module docstring).

    Args:
        model: the online model, at the machine's settings.
        bpms: BPM device names (default: the model's BPMs).
        quadrupoles: quadrupole device names that are parameters (default: every one).
        sextupoles: also one gradient parameter per sextupole element (orbit feed-down).
        sextupole_orbit_m: expected orbit in the sextupoles (m): their parameters' scale is
            ``2 |K2| sextupole_orbit_m``.
        quadrupole_error: expected relative gradient error: the quadrupoles' scale is
            ``quadrupole_error |K|``.
        skews: also one skew gradient per sextupole element (:meth:`add_skew`; separate from
            :attr:`parameters`).
        sextupole_vertical_orbit_m: expected vertical orbit in the sextupoles (m): the skews'
            scale is ``2 |K2| sextupole_vertical_orbit_m``.
    """

    def __init__(
        self,
        model: OnlineModel,
        *,
        bpms: Sequence[str] | None = None,
        quadrupoles: Sequence[str] | None = None,
        sextupoles: bool = False,
        sextupole_orbit_m: float = 5e-4,
        quadrupole_error: float = 1e-3,
        skews: bool = False,
        sextupole_vertical_orbit_m: float = 1e-4,
    ) -> None:
        description = model.description
        ring = model.lattice.deepcopy()
        ring.disable_6d()
        self.lattice = ring
        names = (
            list(bpms)
            if bpms is not None
            else [d.name for d in description.devices if d.kind == "bpm"]
        )
        self.bpm_names = names
        self.bpm_elements = np.array([description.device(n).elements[0] for n in names])
        quads = (
            list(quadrupoles)
            if quadrupoles is not None
            else [d.name for d in description.devices if d.kind == "quadrupole"]
        )
        self.quadrupoles = quads
        self.parameters: list[str] = list(quads)
        self.elements: list[tuple[int, ...]] = [
            tuple(description.device(n).elements) for n in quads
        ]
        scale = [quadrupole_error * abs(float(ring[e[0]].PolynomB[1])) for e in self.elements]
        if sextupoles:
            for i, elem in enumerate(ring):
                if isinstance(elem, at.Sextupole):
                    self.parameters.append(f"{elem.FamName}[{i}]")
                    self.elements.append((i,))
                    scale.append(2 * abs(float(elem.PolynomB[2])) * sextupole_orbit_m)
        sext = [i for i, elem in enumerate(ring) if skews and isinstance(elem, at.Sextupole)]
        self.skew_parameters = [f"{ring[i].FamName}[{i}]" for i in sext]
        self.skew_elements = sext
        self.skew_scale = np.array(
            [2 * abs(float(ring[i].PolynomB[2])) * sextupole_vertical_orbit_m or 1e-3 for i in sext]
        )
        self.skew_gradients = np.zeros(len(sext))
        for elems in [*self.elements, *((i,) for i in sext)]:
            for e in elems:
                pb = np.zeros(max(2, len(ring[e].PolynomB)))
                pb[: len(ring[e].PolynomB)] = ring[e].PolynomB
                ring[e].PolynomB = pb
                if len(getattr(ring[e], "PolynomA", [])) < pb.size:
                    pa = np.zeros(pb.size)
                    pa[: len(ring[e].PolynomA)] = ring[e].PolynomA
                    ring[e].PolynomA = pa
        self.scale = np.array([s if s > 0 else 1e-3 for s in scale])
        self.gradients = np.zeros(len(self.parameters))

    def add(self, dk: np.ndarray) -> None:
        """Add gradient changes (m^-2), one per parameter."""
        dk = np.asarray(dk, float)
        for elems, v in zip(self.elements, dk, strict=True):
            for e in elems:
                self.lattice[e].PolynomB[1] += v
        self.gradients = self.gradients + dk

    def add_skew(self, dks: np.ndarray) -> None:
        """Add skew gradient changes (m^-2, ``PolynomA[1]``), one per skew parameter."""
        dks = np.asarray(dks, float)
        for e, v in zip(self.skew_elements, dks, strict=True):
            self.lattice[e].PolynomA[1] += v
        self.skew_gradients = self.skew_gradients + dks

    def coupling(self) -> np.ndarray:
        """(2, n) complex coupling ratios at the BPMs (:func:`~accplans.physics.coupling_ratios`).

        From ``linopt6``'s normalising matrix ``A``: mode 1's ``v[y] / v[x]``, mode 2's
        ``v[x] / v[y]``, with ``v_k = A[:, 2k] + i A[:, 2k+1]``.
        """
        _, _, data = at.linopt6(self.lattice, refpts=self.bpm_elements.astype(np.uint32))
        a = np.asarray(data.A, float)
        v1 = a[:, :, 0] + 1j * a[:, :, 1]
        v2 = a[:, :, 2] + 1j * a[:, :, 3]
        return np.array([v1[:, 2] / v1[:, 0], v2[:, 0] / v2[:, 2]])

    def skew_jacobian(self) -> np.ndarray:
        """(4 n, m_skew) d coupling ratio / d skew gradient at the present gradients.

        Rows: real then imaginary part of mode 1's ratio, then of mode 2's. Finite differences
        (one ``linopt6`` per skew parameter, a step of its scale): the ratios are linear in
        weak skew gradients.
        """
        base = self.coupling()
        jac = np.zeros((4 * base.shape[1], len(self.skew_elements)))
        for k, (e, h) in enumerate(zip(self.skew_elements, self.skew_scale, strict=True)):
            self.lattice[e].PolynomA[1] += h
            change = (self.coupling() - base) / h
            self.lattice[e].PolynomA[1] -= h
            jac[:, k] = _coupling_rows(change)
        return jac

    def optics(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Phase (2, n) rad and beta (2, n) m at the BPMs, and the total tunes (2,)."""
        refs = np.append(self.bpm_elements, len(self.lattice)).astype(np.uint32)
        _, _, data = at.linopt6(self.lattice, refpts=refs)
        mu = np.asarray(data.mu, float)
        return mu[:-1].T.copy(), np.asarray(data.beta, float)[:-1].T.copy(), mu[-1] / (2 * np.pi)

    def jacobian(self) -> np.ndarray:
        """(2 n, m) d phase / d gradient at the present gradients: x rows, then y rows."""
        ring = self.lattice
        halves = {e for elems in self.elements for e in elems}
        index = np.zeros(len(ring) + 1, dtype=np.int64)
        sliced = []
        for i, elem in enumerate(ring):
            index[i] = len(sliced)
            sliced.extend(elem.divide([0.5, 0.5]) if i in halves else [elem])
        index[len(ring)] = len(sliced)
        copy = at.Lattice(sliced, energy=ring.energy, periodicity=1)
        flat = [e for elems in self.elements for e in elems]
        points = np.array([index[e] + k for e in flat for k in range(3)], dtype=np.int64)
        bpm_points = index[self.bpm_elements]
        refs = np.unique(np.concatenate([points, bpm_points, [len(sliced)]]))
        _, _, data = at.linopt6(copy, refpts=refs.astype(np.uint32))
        beta = np.asarray(data.beta, float)
        mu = np.asarray(data.mu, float)
        tunes = mu[-1] / (2 * np.pi)
        at_pts = np.searchsorted(refs, points)
        at_bpm = np.searchsorted(refs, bpm_points)
        lengths = np.array([float(ring[e].Length) for e in flat])
        owner = np.repeat(np.arange(len(self.elements)), [len(e) for e in self.elements])
        rows = []
        for plane, sign in ((0, 1.0), (1, -1.0)):
            b = beta[at_pts, plane].reshape(-1, 3)
            p = mu[at_pts, plane].reshape(-1, 3)
            w = sign * b * lengths[:, None] * _SIMPSON
            per_element = phase_response(mu[at_bpm, plane], float(tunes[plane]), p, w)
            jac = np.zeros((len(self.bpm_elements), len(self.elements)))
            np.add.at(jac.T, owner, per_element.T)
            rows.append(jac)
        return np.vstack(rows)


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def _rows(measured: np.ndarray, sigma: np.ndarray, good: np.ndarray | None) -> tuple:
    meas = np.asarray(measured, float)
    sig = np.broadcast_to(np.asarray(sigma, float), meas.shape).copy()
    if good is not None:
        sig[:, ~np.asarray(good, bool)] = np.nan
    return meas, sig


def fit_phase_model(
    model: OnlineModel,
    measured_phase: np.ndarray,
    sigma: np.ndarray,
    good: np.ndarray | None = None,
    *,
    bpms: Sequence[str] | None = None,
    sextupoles: bool = True,
    iterations: int = 5,
    alpha: float = 1e-3,
) -> PhaseFit:
    """Fit the model's gradients to measured phases; the fitted model's beta (module docstring).

    Args:
        model: the online model at the machine's settings (the fit starts there).
        measured_phase: (2, n) measured phase at the BPMs (rad, any offset per plane).
        sigma: (2, n) uncertainty of each phase (rad; relative values suffice).
        good: (n,) BPMs to use.
        bpms: BPM names of the columns (default: the model's BPMs).
        sextupoles: fit the orbit's gradients in the sextupoles too.
        iterations: Gauss-Newton steps.
        alpha: Tikhonov parameter (relative to the largest scaled singular value).
    """
    pm = PhaseModel(model, bpms=bpms, sextupoles=sextupoles)
    meas, sig = _rows(measured_phase, sigma, good)
    n = meas.shape[1]
    offsets = np.repeat([0, 1], n)
    history = []
    for k in range(iterations + 1):
        mu, _, _ = pm.optics()
        residual = _wrap(meas - mu)
        ok = np.isfinite(sig) & np.isfinite(residual)
        centred = (
            residual
            - np.array(
                [np.average(residual[p][ok[p]], weights=sig[p][ok[p]] ** -2.0) for p in range(2)]
            )[:, None]
        )
        history.append(float(np.sqrt(np.mean(_wrap(centred[ok]) ** 2))))
        if k == iterations:
            break
        residual = np.where(ok, residual, np.nan)
        dk, _ = phase_fit_step(
            pm.jacobian(),
            residual.ravel(),
            sig.ravel(),
            offsets=offsets,
            alpha=alpha,
            scale=pm.scale,
        )
        pm.add(dk)
    mu, beta, tunes = pm.optics()
    return PhaseFit(pm.parameters, pm.gradients, beta, mu, tunes, np.array(history))


def phase_correction(
    model: OnlineModel,
    measured_phase: np.ndarray,
    target_phase: np.ndarray,
    sigma: np.ndarray,
    good: np.ndarray | None = None,
    *,
    quadrupoles: Sequence[str] | None = None,
    bpms: Sequence[str] | None = None,
    alpha: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray]:
    """Quadrupole strength changes (m^-2) that move measured phases to target phases.

    The response at the model's present settings (:meth:`PhaseModel.jacobian`), a Tikhonov
    solve of ``J dk = target - measured`` with each plane's offset free, the quadrupoles
    scaled by their strength (relative changes are what is regularised).

    Args:
        model: the online model at the machine's settings.
        measured_phase: (2, n) measured phases (rad, any offset per plane).
        target_phase: (2, n) the phases to reach (rad, e.g. the design model's).
        sigma: (2, n) phase uncertainties (rad; relative values suffice).
        good: (n,) BPMs to use.
        quadrupoles: quadrupole device names to change (default: every one).
        bpms: BPM names of the columns (default: the model's BPMs).
        alpha: Tikhonov parameter (relative to the largest scaled singular value).

    Returns:
        ``(dk, predicted)``: strength changes (m^-2), one per quadrupole, and the phase error
        (2, n) rad they are predicted to leave (offsets removed; NaN at bad BPMs).
    """
    pm = PhaseModel(model, bpms=bpms, quadrupoles=quadrupoles, sextupoles=False)
    meas, sig = _rows(measured_phase, sigma, good)
    residual = _wrap(np.asarray(target_phase, float) - meas)
    ok = np.isfinite(sig)
    residual = np.where(ok, residual, np.nan)
    n = meas.shape[1]
    dk, fitted = phase_fit_step(
        pm.jacobian(),
        residual.ravel(),
        sig.ravel(),
        offsets=np.repeat([0, 1], n),
        alpha=alpha,
        scale=pm.scale,
    )
    left = residual.ravel() - fitted
    return dk, left.reshape(2, n)


def _coupling_rows(ratios: np.ndarray) -> np.ndarray:
    return np.concatenate([ratios[0].real, ratios[0].imag, ratios[1].real, ratios[1].imag])


def _mode_scale(g: float, n: int) -> np.ndarray:
    """(4 n,) ``e^g`` on mode 1's rows, ``e^-g`` on mode 2's."""
    return np.repeat(np.exp([g, -g]), 2 * n)


def _best_mode_scale(observed: np.ndarray, predicted: np.ndarray, sigma: np.ndarray) -> float:
    """The ``g`` (|g| <= 2) that best scales ``predicted`` onto ``observed`` (weighted)."""
    ok = np.isfinite(observed) & np.isfinite(predicted) & np.isfinite(sigma)
    w = sigma[ok] ** -2.0
    n = observed.size // 4

    def cost(g: float) -> float:
        return float(np.sum(w * (observed[ok] - _mode_scale(g, n)[ok] * predicted[ok]) ** 2))

    return float(minimize_scalar(cost, bounds=(-2.0, 2.0), method="bounded").x)


def fit_coupled_phase_model(
    model: OnlineModel,
    measured_phase: np.ndarray,
    measured_coupling: np.ndarray,
    sigma: np.ndarray,
    good: np.ndarray | None = None,
    *,
    bpms: Sequence[str] | None = None,
    iterations: int = 5,
    alpha: float = 1e-3,
    bpm_roll_rad: float = 1e-3,
) -> PhaseFit:
    """Fit normal and skew gradients to measured phases and coupling ratios (module docstring).

    Each iteration takes a phase step in the normal gradients (quadrupoles and the sextupoles'
    ``2 K2 x``, as :func:`fit_phase_model`) and a coupling step in the skew gradients (one per
    sextupole element), the BPM rolls (each adds ``-roll`` to mode 1's ratio, ``+roll`` to mode
    2's) and ``g``, the log of a common scale of the ratios (``e^g`` on mode 1's, ``e^-g`` on
    mode 2's: x/y gains of the BPM system or a decoherence that differs between the planes);
    the model's phases and ratios are pyAT's at every iteration. The skews' response is
    computed once (:meth:`PhaseModel.skew_jacobian`).

    Args:
        model: the online model at the machine's settings (the fit starts there).
        measured_phase: (2, n) measured phase at the BPMs (rad, any offset per plane).
        measured_coupling: (2, n) complex measured coupling ratios
            (:func:`accplans.physics.coupling_ratios`).
        sigma: (2, n) uncertainty of each phase (rad; relative values suffice); row ``k`` also
            weighs mode ``k``'s ratios (the noise of both over that mode's amplitude).
        good: (n,) BPMs to use.
        bpms: BPM names of the columns (default: the model's BPMs).
        iterations: Gauss-Newton steps.
        alpha: Tikhonov parameter of both steps (relative to the largest scaled singular
            value).
        bpm_roll_rad: prior width of the BPM rolls (rad).
    """
    pm = PhaseModel(model, bpms=bpms, sextupoles=True, skews=True)
    meas, sig = _rows(measured_phase, sigma, good)
    n = meas.shape[1]
    coupling = np.asarray(measured_coupling, complex).copy()
    coupling[:, ~np.isfinite(sig).all(axis=0)] = np.nan
    observed = _coupling_rows(coupling)
    sig_c = np.concatenate([sig[0], sig[0], sig[1], sig[1]])
    skew_jac = pm.skew_jacobian()
    m = skew_jac.shape[1]
    roll_cols = np.zeros((4 * n, n))
    roll_cols[:n] = -np.eye(n)
    roll_cols[2 * n : 3 * n] = np.eye(n)
    scale = np.concatenate([pm.skew_scale, np.full(n, bpm_roll_rad)])
    roll, g = np.zeros(n), 0.0
    offsets = np.repeat([0, 1], n)
    history, coupling_history = [], []
    for k in range(iterations + 1):
        mu, _, _ = pm.optics()
        residual = _wrap(meas - mu)
        ok = np.isfinite(sig) & np.isfinite(residual)
        centred = (
            residual
            - np.array(
                [np.average(residual[p][ok[p]], weights=sig[p][ok[p]] ** -2.0) for p in range(2)]
            )[:, None]
        )
        history.append(float(np.sqrt(np.mean(_wrap(centred[ok]) ** 2))))
        base = _coupling_rows(pm.coupling())
        c_res = observed - _mode_scale(g, n) * base - roll_cols @ roll
        c_ok = np.isfinite(c_res) & np.isfinite(sig_c)
        coupling_history.append(float(np.sqrt(np.mean(c_res[c_ok] ** 2))))
        if k == iterations:
            break
        residual = np.where(ok, residual, np.nan)
        dk, _ = phase_fit_step(
            pm.jacobian(),
            residual.ravel(),
            sig.ravel(),
            offsets=offsets,
            alpha=alpha,
            scale=pm.scale,
        )
        # bilinear in g and the skews: alternate the linear solve and the 1D one in g
        step = np.zeros(m + n)
        for _ in range(10):
            fs = _mode_scale(g, n)
            jac = np.hstack([skew_jac * fs[:, None], roll_cols])
            step = coupling_fit_step(jac, observed - fs * base, sig_c, alpha=alpha, scale=scale)
            g = _best_mode_scale(observed - roll_cols @ step[m:], base + skew_jac @ step[:m], sig_c)
        pm.add(dk)
        pm.add_skew(step[:m])
        roll = step[m:]
    mu, beta, tunes = pm.optics()
    return PhaseFit(
        pm.parameters,
        pm.gradients,
        beta,
        mu,
        tunes,
        np.array(history),
        skew_parameters=pm.skew_parameters,
        skew_gradients=pm.skew_gradients,
        coupling_residual_rms=np.array(coupling_history),
    )
