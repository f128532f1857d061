"""Fast orbit feedback (FOFB) design: mode-space PI loops, slow/fast hand-over, loop analysis.

One plane of the fast feedback runs at ``f_s`` (e.g. 10 kHz) with this loop, per sample ``n``::

    y[n]      = d[n] + R_f theta_f[n] + R_s theta_s[n]          orbit at the BPMs [m]
    e[n]      = diag(g phi) U^T y[n - latency]                  mode-space error [rad]
    I[n]      = I[n-1] + e[n]                                   integrator
    c_f[n]    = -V (kp e[n] + ki I[n])                          fast setpoints [rad]
    theta_f[n+1] = a_f theta_f[n] + (1 - a_f) c_f[n]            fast corrector, low-pass f_c
    c_s[n+1]  = c_s[n] + h T c_f[n]                             hand-over (mid-ranging)
    theta_s[n+1] = a_s theta_s[n] + (1 - a_s) c_s[n]            slow corrector, low-pass f_slow

``R_f = U S V^T`` is the SVD of the fast correctors' response (one plane), ``phi`` the inverse
filter of the regularisation (truncated SVD ``1/s``, Tikhonov ``s/(s^2 + alpha^2)``), ``g``
per-mode gains, so ``K = V diag(g phi) U^T`` is the regularised inverse (equal to
:func:`~accplans.physics.correction_matrix` for unit gains). The correctors are first-order
low-passes discretised with a zero-order hold, ``A(z) = (1 - a) z^-1 / (1 - a z^-1)``,
``a = exp(-2 pi f_c / f_s)``; the PI is ``C(z) = kp + ki / (1 - z^-1)``; BPM and processing
latency is ``z^-latency``.

Slow/fast separation (the choice made here: frequency separation by *hand-over*, the
"mid-ranging" of Diamond-II and the DC offloading to slow correctors of ESRF-EBS and SLS 2.0):
the slow correctors are driven by an integrator of the fast setpoints through
``T = K_s R_f`` (``K_s`` a Tikhonov inverse of the slow correctors' response), the slow
pattern that makes the same orbit as a fast pattern. Below the crossover
``f_x = h f_s / (2 pi)`` the slow correctors hold the orbit and the fast correctors' DC output
goes to zero (on the patterns the slow correctors can reproduce); above it the fast correctors
act alone. The slow orbit feedback must then not integrate the same orbit on its own (pause it,
or let it only apply the hand-over): two integrators on one orbit drift against each other.

Closed loop: ``y = S(z) d`` with the sensitivity
``S(z) = (I + (R_f A_f(z) + R_s T A_s(z) H(z)) C(z) z^-latency K)^-1``,
``H(z) = h z^-1 / (1 - z^-1)``. Without hand-over it is diagonal in the modes:
``S_k = 1 / (1 + L_k)``, ``L_k = g_k s_k phi_k C(z) A_f(z) z^-latency``. With hand-over the
per-mode loop ``L_k = g_k s_k phi_k C z^-latency (A_f + m_k A_s H)``, ``m_k = (U^T P_s U)_kk``
(``P_s`` the projector on the slow correctors' orbit patterns) is exact when the slow correctors
reproduce every fast pattern and serves the margins; the attenuation tables use the full
matrix ``S``, and stability is decided from the eigenvalues of the closed loop's state matrix.

References:
    M. G. Abbott, J. A. Dobbing, G. Rehm et al., "Performance and future development of the
    Diamond fast orbit feedback system", EPAC'08 (mode-space gains, latency budget).
    S. Gayadeen, M. T. Heron, G. Rehm, "A unified approach to the design of orbit feedback with
    fast and slow correctors", ICALEPCS'17 (mid-ranging of slow and fast correctors).
    E. Plouviez, F. Uberto, "The ESRF fast orbit correction", EPAC'04 (DC hand-over to the slow
    correctors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy import signal

from ._correction import correction_matrix

__all__ = [
    "DisturbanceSpectrum",
    "FofbLoop",
    "FofbPlane",
    "FofbUnstable",
    "LoopMargins",
    "design_fofb_plane",
    "identify_sensitivity",
    "measured_attenuation",
    "realize_disturbance",
    "simulate_fofb",
]


class FofbUnstable(ValueError):
    """The fast feedback loop is unstable (or its margins are below what was asked)."""


@dataclass(frozen=True)
class FofbLoop:
    """Timing and controller of the fast loop (one set for both planes).

    Attributes:
        sampling_hz: loop rate f_s [Hz].
        latency: BPM-to-corrector latency in samples (``z^-latency``, >= 0), on top of the
            one-sample delay of the corrector's zero-order hold.
        corrector_bandwidth_hz: -3 dB bandwidth of the fast corrector (power supply, magnet and
            vacuum chamber) as a first-order low-pass [Hz].
        kp: proportional gain of the PI (>= 0), per unit mode-space error.
        ki: integral gain per sample (> 0); the loop's 0 dB crossover is near
            ``ki f_s / (2 pi)`` for a unit mode.
        handover_hz: crossover f_x of the hand-over to the slow correctors [Hz]; 0: none.
        slow_bandwidth_hz: -3 dB bandwidth of the slow correctors [Hz].
    """

    sampling_hz: float = 10e3
    latency: int = 2
    corrector_bandwidth_hz: float = 1e3
    kp: float = 0.0
    ki: float = 0.1
    handover_hz: float = 0.0
    slow_bandwidth_hz: float = 20.0

    def __post_init__(self) -> None:
        fs = self.sampling_hz
        if not (np.isfinite(fs) and fs > 0):
            raise ValueError(f"sampling_hz must be > 0, got {fs!r}")
        if isinstance(self.latency, bool) or int(self.latency) != self.latency or self.latency < 0:
            raise ValueError(
                f"latency must be an integer number of samples >= 0, got {self.latency!r}"
            )
        for name in ("corrector_bandwidth_hz", "slow_bandwidth_hz"):
            value = getattr(self, name)
            if not (np.isfinite(value) and 0 < value):
                raise ValueError(f"{name} must be > 0 Hz, got {value!r}")
        if not (np.isfinite(self.ki) and self.ki > 0):
            raise ValueError(f"ki must be > 0 (the loop needs an integrator), got {self.ki!r}")
        if not (np.isfinite(self.kp) and self.kp >= 0):
            raise ValueError(f"kp must be >= 0, got {self.kp!r}")
        if not (np.isfinite(self.handover_hz) and 0 <= self.handover_hz < fs / 2):
            raise ValueError(
                f"handover_hz must be in [0, f_s/2 = {fs / 2:g}) Hz, got {self.handover_hz!r}"
            )

    @property
    def a_fast(self) -> float:
        """Pole of the discretised fast corrector."""
        return float(np.exp(-2 * np.pi * self.corrector_bandwidth_hz / self.sampling_hz))

    @property
    def a_slow(self) -> float:
        """Pole of the discretised slow corrector."""
        return float(np.exp(-2 * np.pi * self.slow_bandwidth_hz / self.sampling_hz))

    @property
    def handover_gain(self) -> float:
        """Hand-over integrator gain per sample ``h = 2 pi f_x / f_s``."""
        return 2 * np.pi * self.handover_hz / self.sampling_hz

    def z(self, frequency_hz: np.ndarray) -> np.ndarray:
        """``z = exp(2 pi j f / f_s)`` at these frequencies."""
        return np.exp(2j * np.pi * np.asarray(frequency_hz, float) / self.sampling_hz)

    def controller(self, z: np.ndarray) -> np.ndarray:
        """The PI ``C(z) = kp + ki / (1 - z^-1)``."""
        return self.kp + self.ki / (1 - 1 / z)

    def fast_corrector(self, z: np.ndarray) -> np.ndarray:
        """``A_f(z) = (1 - a_f) z^-1 / (1 - a_f z^-1)``."""
        a = self.a_fast
        return (1 - a) / z / (1 - a / z)

    def slow_path(self, z: np.ndarray) -> np.ndarray:
        """Hand-over integrator times slow corrector, ``H(z) A_s(z)`` (0 without hand-over)."""
        h, a = self.handover_gain, self.a_slow
        return h / z / (1 - 1 / z) * (1 - a) / z / (1 - a / z)

    def delay(self, z: np.ndarray) -> np.ndarray:
        """The latency ``z^-latency``."""
        return z ** (-int(self.latency))


@dataclass(frozen=True)
class LoopMargins:
    """Stability figures of one plane (worst over its modes).

    Attributes:
        gain_margin_db: smallest gain margin [dB] (inf: the phase never reaches -180 deg where
            ``|L| < 1``).
        phase_margin_deg: smallest phase margin [deg] (180 - |phase of L| at ``|L| = 1``).
        peak_sensitivity_db: largest ``|1 / (1 + L_k)|`` [dB] over frequency and modes
            (noise amplification; its inverse is the modulus margin).
        max_pole: largest modulus of the closed loop's poles (< 1: stable).
        worst_mode: the mode of the smallest phase margin.
    """

    gain_margin_db: float
    phase_margin_deg: float
    peak_sensitivity_db: float
    max_pole: float
    worst_mode: int


@dataclass(frozen=True)
class FofbPlane:
    """The fast feedback of one plane: matrices, modes, loop (from :func:`design_fofb_plane`).

    Attributes:
        response_fast: (nbpm, nf) orbit response to the fast correctors [m/rad].
        response_slow: (nbpm, ns) orbit response to the slow correctors [m/rad] (ns may be 0).
        loop: the loop's timing and controller.
        u: (nbpm, nm) orbit patterns of the modes (left singular vectors of ``R_f``).
        singular_values: (nm,) singular values s_k [m/rad].
        v: (nf, nm) corrector patterns of the modes (right singular vectors).
        mode_filter: (nm,) regularised inverse filter phi_k [rad/m] (0 for a dropped mode).
        mode_gains: (nm,) per-mode gains g_k.
        inverse: (nf, nbpm) ``K = V diag(g phi) U^T`` [rad/m]: the fast correction matrix.
        handover: (ns, nf) ``T = K_s R_f`` [rad/rad]: slow kicks that make the orbit of a fast
            pattern (zeros with no slow corrector or no hand-over).
        handover_overlap: (nm,) ``m_k = (U^T P_s U)_kk`` in [0, 1]: how much of mode k the slow
            correctors can hold.
        handed_over: (nm,) the modes handed over to the slow correctors (overlap at least
            ``min_overlap``); the others stay on the fast correctors at DC too.
        method: ``"tikhonov"`` or ``"svd"``.
        alpha: Tikhonov parameter [m/rad] (0 for ``"svd"``).
    """

    response_fast: np.ndarray
    response_slow: np.ndarray
    loop: FofbLoop
    u: np.ndarray
    singular_values: np.ndarray
    v: np.ndarray
    mode_filter: np.ndarray
    mode_gains: np.ndarray
    inverse: np.ndarray
    handover: np.ndarray
    handover_overlap: np.ndarray
    handed_over: np.ndarray
    method: str
    alpha: float
    _basis: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    _w_rows: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    @property
    def nbpm(self) -> int:
        """Number of BPMs."""
        return self.response_fast.shape[0]

    @property
    def n_modes(self) -> int:
        """Number of modes ``min(nbpm, nf)``."""
        return self.singular_values.size

    @property
    def loop_weights(self) -> np.ndarray:
        """``g_k s_k phi_k``: the static loop gain of each mode relative to ``C(z)``."""
        return self.mode_gains * self.singular_values * self.mode_filter

    @property
    def has_handover(self) -> bool:
        """Whether slow correctors take over the DC part."""
        return self.loop.handover_hz > 0 and self.response_slow.shape[1] > 0

    # -- frequency domain -------------------------------------------------------------------

    def loop_gain(self, frequency_hz: np.ndarray) -> np.ndarray:
        """Per-mode loop transfer function ``L_k(f)`` (nm, nfreq), complex.

        Exact without hand-over; with it, uses the overlap ``m_k`` (exact when the slow
        correctors reproduce every fast pattern).
        """
        lp = self.loop
        z = lp.z(frequency_hz)
        path = lp.fast_corrector(z)[None, :]
        if self.has_handover:
            m = np.where(self.handed_over, self.handover_overlap, 0.0)
            path = path + m[:, None] * lp.slow_path(z)[None, :]
        return self.loop_weights[:, None] * (lp.controller(z) * lp.delay(z))[None, :] * path

    def sensitivity_matrix(self, frequency_hz: float) -> np.ndarray:
        """The closed-loop sensitivity ``S`` (nbpm, nbpm) at one frequency, in the mode basis.

        Rows and columns are the modes, then (if nbpm > nf) the orbit patterns no fast
        corrector reaches (``S = 1`` there without hand-over).
        """
        lp = self.loop
        z = lp.z(np.array([frequency_hz]))
        plant = self.response_fast * lp.fast_corrector(z)[0]
        if self.has_handover:
            plant = plant + (self.response_slow @ self.handover) * lp.slow_path(z)[0]
        open_loop = plant @ self.inverse * (lp.controller(z) * lp.delay(z))[0]
        s_bpm = np.linalg.inv(np.eye(self.nbpm) + open_loop)
        return self._basis.T @ s_bpm @ self._basis

    def sensitivity(self, frequency_hz: np.ndarray) -> np.ndarray:
        """``|S_kk(f)|`` per mode (nm, nfreq): the attenuation of a disturbance in mode k."""
        f = np.asarray(frequency_hz, float)
        if not self.has_handover:
            return np.abs(1.0 / (1.0 + self.loop_gain(f)))
        out = np.empty((self.n_modes, f.size))
        for i, fi in enumerate(f):
            out[:, i] = np.abs(np.diag(self.sensitivity_matrix(float(fi)))[: self.n_modes])
        return out

    def orbit_attenuation(self, frequency_hz: np.ndarray, mode_power: np.ndarray) -> np.ndarray:
        """Attenuation of the whole orbit (amplitude ratio) for independent mode disturbances.

        Args:
            frequency_hz: (nfreq,) frequencies [Hz].
            mode_power: (nm,) relative power of the disturbance in each mode (its shape in
                frequency is the same for every mode).

        Returns:
            (nfreq,) ``sqrt(sum_k P_k |S e_k|^2 / sum_k P_k)``.
        """
        f = np.asarray(frequency_hz, float)
        p = np.asarray(mode_power, float)
        if not self.has_handover:
            return np.sqrt(np.sum(p[:, None] * self.sensitivity(f) ** 2, 0) / p.sum())
        out = np.empty(f.size)
        for i, fi in enumerate(f):
            cols = self.sensitivity_matrix(float(fi))[:, : self.n_modes]
            out[i] = np.sqrt(np.sum(p * np.sum(np.abs(cols) ** 2, 0)) / p.sum())
        return out

    # -- time domain --------------------------------------------------------------------------

    def _sizes(self) -> tuple[int, int, int, int, int]:
        kept = int(np.count_nonzero(self.loop_weights))
        ns = self.response_slow.shape[1] if self.has_handover else 0
        rank = self._w_rows.shape[0] if self.has_handover else 0
        return self.loop.latency * self.nbpm, kept, self.response_fast.shape[1], rank, ns

    def step(self, state: np.ndarray, disturbance: np.ndarray) -> tuple[np.ndarray, ...]:
        """One sample of the loop's difference equations, for column-stacked states.

        The single definition of the loop in the time domain: :attr:`system` (and so the
        simulations and the poles) is built from it.

        Args:
            state: (nstate, ncol) loop states (see :meth:`state_size`).
            disturbance: (nbpm, ncol) orbit disturbance d[n] [m].

        Returns:
            ``(next_state, y, c_f, theta_s)``: the state at n+1, the orbit y[n] [m], the fast
            setpoints c_f[n] [rad] and the slow kicks theta_s[n] [rad].
        """
        nbuf, kept, nf, rank, ns = self._sizes()
        lp = self.loop
        ncol = state.shape[1]
        parts = np.split(state, np.cumsum([nbuf, kept, nf, rank])[:4], axis=0)
        buf, integ, theta_f, q, theta_s = parts
        weights = (self.mode_gains * self.mode_filter)[:kept]
        y = disturbance + self.response_fast @ theta_f
        if ns:
            y = y + self.response_slow @ theta_s
        seen = buf[: self.nbpm] if nbuf else y
        e = weights[:, None] * (self.u[:, :kept].T @ seen)
        integ = integ + e
        c_f = -(self.v[:, :kept] @ (lp.kp * e + lp.ki * integ))
        new_theta_f = lp.a_fast * theta_f + (1 - lp.a_fast) * c_f
        if ns:
            w = self._w_rows
            c_s = self.handover @ (w.T @ q)
            new_q = q + lp.handover_gain * (w @ c_f)
            new_theta_s = lp.a_slow * theta_s + (1 - lp.a_slow) * c_s
        else:
            new_q, new_theta_s = q, theta_s
        new_buf = np.concatenate([buf[self.nbpm :], y], axis=0) if nbuf else buf
        nxt = np.concatenate([new_buf, integ, new_theta_f, new_q, new_theta_s], axis=0)
        return nxt, y, c_f, theta_s if ns else np.zeros((0, ncol))

    def state_size(self) -> int:
        """Number of states of the loop: latency buffer, integrators, correctors, hand-over."""
        return int(sum(self._sizes()))

    @cached_property
    def system(self) -> dict[str, np.ndarray]:
        """The loop as a state-space system, built column by column from :meth:`step`.

        ``x[n+1] = A x[n] + B d[n]``; orbit ``y = Cy x + Dy d``; fast setpoints
        ``c_f = Cf x + Df d``; slow kicks ``theta_s = Cs x`` (keys ``A, B, Cy, Dy, Cf, Df,
        Cs``).
        """
        n = self.state_size()
        a, cy, cf, cs = self.step(np.eye(n), np.zeros((self.nbpm, n)))
        b, dy, df, _ = self.step(np.zeros((n, self.nbpm)), np.eye(self.nbpm))
        return {"A": a, "B": b, "Cy": cy, "Dy": dy, "Cf": cf, "Df": df, "Cs": cs}

    def state_matrix(self) -> np.ndarray:
        """The closed loop's state matrix (states at n+1 from states at n, no disturbance)."""
        return self.system["A"]

    def poles(self) -> np.ndarray:
        """Closed-loop poles (eigenvalues of :meth:`state_matrix`)."""
        return np.linalg.eigvals(self.state_matrix())

    def margins(self, f_min_hz: float = 1e-2, points: int = 4000) -> LoopMargins:
        """Gain and phase margins of each mode's loop, worst over the modes, and the poles.

        Args:
            f_min_hz: lowest frequency of the search grid [Hz].
            points: log-spaced grid points up to f_s / 2 (crossings are interpolated).
        """
        lp = self.loop
        f = np.geomspace(f_min_hz, lp.sampling_hz / 2 * (1 - 1e-9), points)
        loop = self.loop_gain(f)
        gm, pm, worst = np.inf, np.inf, 0
        for k in np.flatnonzero(self.loop_weights):
            mag, ph = np.abs(loop[k]), np.angle(loop[k])
            # gain crossovers: |L| through 1
            for i in np.flatnonzero(np.diff(np.sign(np.log(mag))) != 0):
                w = np.log(mag[i]) / (np.log(mag[i]) - np.log(mag[i + 1]))
                phase = ph[i] + w * np.angle(np.exp(1j * (ph[i + 1] - ph[i])))
                margin = 180.0 - abs(np.degrees(np.angle(np.exp(1j * phase))))
                if margin < pm:
                    pm, worst = float(margin), int(k)
            # phase crossovers: the phase wraps through +-180 deg where |L| < 1
            imag = loop[k].imag
            for i in np.flatnonzero((np.diff(np.sign(imag)) != 0) & (loop[k].real[:-1] < 0)):
                w = imag[i] / (imag[i] - imag[i + 1])
                m = mag[i] * (mag[i + 1] / mag[i]) ** w
                if m < 1:
                    gm = min(gm, float(-20 * np.log10(m)))
        kept = self.loop_weights > 0
        s = np.abs(1.0 / (1.0 + loop[kept]))
        poles = self.poles()
        return LoopMargins(
            gain_margin_db=gm,
            phase_margin_deg=pm,
            peak_sensitivity_db=float(20 * np.log10(s.max())),
            max_pole=float(np.abs(poles).max()) if poles.size else 0.0,
            worst_mode=worst,
        )


def _row_basis(matrix: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the row space of ``matrix`` (the reachable hand-over states)."""
    if matrix.size == 0:
        return np.zeros((0, matrix.shape[1]))
    _, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return vt[s > s[0] * 1e-9]  # directions below are numerically unreachable


def _mode_gains(gains: Any, nm: int) -> np.ndarray:
    g = np.ones(nm) if gains is None else np.asarray(gains, float)
    if g.ndim == 0:
        g = np.full(nm, float(g))
    if g.shape != (nm,):
        raise ValueError(f"mode_gains has shape {g.shape}; this plane has {nm} modes")
    if not np.all(np.isfinite(g) & (g >= 0)):
        raise ValueError(f"mode_gains must be finite and >= 0, got {g}")
    return g


def design_fofb_plane(
    response_fast: np.ndarray,
    response_slow: np.ndarray | None,
    loop: FofbLoop,
    *,
    method: str = "tikhonov",
    alpha: float | None = None,
    n_singular: int | None = None,
    mode_gains: np.ndarray | float | None = None,
    min_gain_margin_db: float = 0.0,
    min_phase_margin_deg: float = 0.0,
    min_overlap: float = 0.9,
) -> FofbPlane:
    """Design the fast feedback of one plane and refuse an unstable one.

    Args:
        response_fast: (nbpm, nf) orbit response to the fast correctors [m/rad].
        response_slow: (nbpm, ns) orbit response to the slow correctors [m/rad], or ``None``.
        loop: timing and controller.
        method: ``"tikhonov"`` (filter ``s/(s^2 + alpha^2)``) or ``"svd"`` (truncated).
        alpha: Tikhonov parameter [m/rad]; default 1 % of the largest singular value.
        n_singular: modes kept (both methods); default all.
        mode_gains: per-mode gains g_k (scalar or (nm,)); default 1.
        min_gain_margin_db: refuse a design whose gain margin is smaller [dB].
        min_phase_margin_deg: refuse a design whose phase margin is smaller [deg].
        min_overlap: hand over only the modes whose orbit pattern the slow correctors
            reproduce at least this well (``m_k``, 0..1): handing over a pattern they cannot
            make would only move the error to other modes, which the fast loop then fights.

    Returns:
        The plane's design (matrices, modes, loop).

    Raises:
        FofbUnstable: a closed-loop pole on or outside the unit circle, or a margin below the
            minimum asked; the message gives the pole, the margins and what to lower.
        ValueError: bad shapes, NaN in a response, bad settings.
    """
    rf = np.asarray(response_fast, float)
    if rf.ndim != 2 or 0 in rf.shape:
        raise ValueError(f"response_fast must be (nbpm, nf) and non-empty, got {rf.shape}")
    if not np.all(np.isfinite(rf)):
        bad = np.argwhere(~np.isfinite(rf))[:5].tolist()
        raise ValueError(f"response_fast holds NaN/inf at (row, column) {bad}")
    nbpm, nf = rf.shape
    rs = np.zeros((nbpm, 0)) if response_slow is None else np.asarray(response_slow, float)
    if rs.ndim != 2 or rs.shape[0] != nbpm:
        raise ValueError(f"response_slow must be ({nbpm}, ns), got {rs.shape}")
    if not np.all(np.isfinite(rs)):
        bad = np.argwhere(~np.isfinite(rs))[:5].tolist()
        raise ValueError(f"response_slow holds NaN/inf at (row, column) {bad}")
    if method not in ("tikhonov", "svd"):
        raise ValueError(f"unknown method {method!r}; use 'tikhonov' or 'svd'")
    u_full, s, vt = np.linalg.svd(rf, full_matrices=True)
    nm = s.size
    rank = int(np.sum(s > s[0] * max(rf.shape) * np.finfo(float).eps))
    if rank == 0:
        raise ValueError("response_fast is zero: no fast corrector moves the orbit")
    keep = rank if n_singular is None else int(n_singular)
    if not 1 <= keep <= rank:
        raise ValueError(f"n_singular={n_singular} out of range: 1 <= n_singular <= {rank}")
    if method == "tikhonov":
        a = 0.01 * float(s[0]) if alpha is None else float(alpha)
        if not (np.isfinite(a) and a >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        phi = s / (s**2 + a**2)
    else:
        if alpha is not None:
            raise ValueError("alpha is only used by method='tikhonov'")
        a = 0.0
        phi = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
    phi[keep:] = 0.0
    gains = _mode_gains(mode_gains, nm)
    u, v = u_full[:, :nm], vt[:nm].T
    inverse = (v * (gains * phi)) @ u.T
    order = np.argsort(~(gains * phi * s > 0), kind="stable")  # kept modes first
    u, v, s, phi, gains = u[:, order], v[:, order], s[order], phi[order], gains[order]
    u_full = np.column_stack([u, u_full[:, nm:]])
    ns = rs.shape[1]
    if ns and loop.handover_hz > 0:
        kept = gains * phi * s > 0
        # slow patterns whose orbit the fast loop sees (inside the span of its kept modes):
        # anything else the hand-over made would be orbit the fast loop cannot correct
        outside = rs - u[:, kept] @ (u[:, kept].T @ rs)
        _, sv, vt_out = np.linalg.svd(outside, full_matrices=True)
        sv = np.concatenate([sv, np.zeros(vt_out.shape[0] - sv.size)])
        null = vt_out[sv <= 1e-9 * np.linalg.norm(rs, 2)].T  # (ns, r)
        overlap = np.zeros(nm)
        handed = np.zeros(nm, bool)
        handover = np.zeros((ns, nf))
        if null.shape[1]:
            rsn = rs @ null
            alpha_slow = 0.01 * float(np.linalg.norm(rsn, 2))
            k_slow = correction_matrix(rsn, method="tikhonov", alpha=alpha_slow)
            proj = rsn @ k_slow  # ~ projector on the orbit patterns the slow correctors make
            overlap = np.clip(np.einsum("ik,ij,jk->k", u, proj, u), 0.0, 1.0)
            handed = (overlap >= min_overlap) & kept
            handover = null @ k_slow @ rf @ v[:, handed] @ v[:, handed].T
    else:
        handover = np.zeros((ns, nf))
        overlap = np.zeros(nm)
        handed = np.zeros(nm, bool)
    plane = FofbPlane(
        response_fast=rf,
        response_slow=rs,
        loop=loop,
        u=u,
        singular_values=s,
        v=v,
        mode_filter=phi,
        mode_gains=gains,
        inverse=inverse,
        handover=handover,
        handover_overlap=overlap,
        handed_over=handed,
        method=method,
        alpha=a,
        _basis=u_full,
        _w_rows=_row_basis(handover),
    )
    margins = plane.margins()
    problems = []
    if not margins.max_pole < 1 - 1e-12:
        problems.append(f"a closed-loop pole has modulus {margins.max_pole:.6f} >= 1")
    if margins.gain_margin_db < min_gain_margin_db:
        problems.append(f"gain margin {margins.gain_margin_db:.2f} dB < {min_gain_margin_db:g} dB")
    if margins.phase_margin_deg < min_phase_margin_deg:
        problems.append(
            f"phase margin {margins.phase_margin_deg:.1f} deg < {min_phase_margin_deg:g} deg"
        )
    if problems:
        raise FofbUnstable(
            "fast orbit feedback refused: " + "; ".join(problems) + f" (mode "
            f"{margins.worst_mode}, kp={loop.kp:g}, ki={loop.ki:g}, latency={loop.latency} "
            f"samples at {loop.sampling_hz:g} Hz, corrector bandwidth "
            f"{loop.corrector_bandwidth_hz:g} Hz, hand-over {loop.handover_hz:g} Hz, gain "
            f"margin {margins.gain_margin_db:.2f} dB, phase margin "
            f"{margins.phase_margin_deg:.1f} deg): lower ki, kp or the mode gains, or the "
            "hand-over crossover"
        )
    return plane


@dataclass(frozen=True)
class DisturbanceSpectrum:
    """A model orbit disturbance: ground motion ``~ 1/f^2`` plus spectral lines.

    The one-sided PSD of the continuous part is
    ``psd(f) = rms_1hz^2 (1 + f_low^2) / (f^2 + f_low^2) + white^2`` (``1/f^2`` above
    ``f_low``, flat below, a white floor), in m^2/Hz per mode at mode weight 1; lines add
    sinusoids.

    Attributes:
        rms_1hz_m: square root of the PSD at 1 Hz [m/sqrt(Hz)].
        f_low_hz: corner below which the PSD is flat [Hz].
        lines_hz: frequencies of spectral lines [Hz] (e.g. mains, girder modes).
        lines_rms_m: rms amplitude of each line [m].
        white_m: flat PSD floor [m/sqrt(Hz)] (keeps every frequency excited).
    """

    rms_1hz_m: float = 1e-6
    f_low_hz: float = 0.1
    lines_hz: tuple[float, ...] = (25.0, 50.0)
    lines_rms_m: tuple[float, ...] = (2e-7, 1e-7)
    white_m: float = 2e-9

    def psd(self, frequency_hz: np.ndarray) -> np.ndarray:
        """One-sided PSD of the continuous part [m^2/Hz] at mode weight 1."""
        f = np.asarray(frequency_hz, float)
        fl2 = self.f_low_hz**2
        return self.rms_1hz_m**2 * (1 + fl2) / (f**2 + fl2) + self.white_m**2


def realize_disturbance(
    plane: FofbPlane,
    spectrum: DisturbanceSpectrum,
    n_samples: int,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A time series of orbit disturbance in the plane's corrected modes.

    Each corrected mode gets an independent realisation of ``spectrum`` (random phases,
    Gaussian amplitudes), scaled by ``s_k / s_max`` (a disturbance from kick-like sources, as
    ground motion moving quadrupoles, projects on the modes as the response does).

    Args:
        plane: the plane's design (its modes).
        spectrum: the disturbance spectrum.
        n_samples: number of samples at the loop rate.
        seed: random seed.

    Returns:
        ``(d, mode_power)``: (n_samples, nbpm) orbit disturbance [m] and (nm,) the relative
        power per mode (0 for modes the feedback does not correct).
    """
    rng = np.random.default_rng(seed)
    fs = plane.loop.sampling_hz
    f = np.fft.rfftfreq(n_samples, 1 / fs)
    asd = np.sqrt(
        spectrum.psd(np.where(f > 0, f, f[1] if f.size > 1 else 1.0)) * fs * n_samples / 2
    )
    kept = plane.loop_weights > 0
    weight = np.where(kept, plane.singular_values / plane.singular_values.max(), 0.0)
    spec = rng.normal(size=(f.size, weight.size)) + 1j * rng.normal(size=(f.size, weight.size))
    spec *= asd[:, None] / np.sqrt(2)
    spec[0] = 0.0
    modes = np.fft.irfft(spec, n=n_samples, axis=0)
    t = np.arange(n_samples) / fs
    for fl, amp in zip(spectrum.lines_hz, spectrum.lines_rms_m, strict=True):
        phase = rng.uniform(0, 2 * np.pi, weight.size)
        modes += np.sqrt(2) * amp * np.sin(2 * np.pi * fl * t[:, None] + phase[None, :])
    modes *= weight[None, :]
    return modes @ plane.u.T, weight**2


def simulate_fofb(plane: FofbPlane, disturbance: np.ndarray) -> dict[str, np.ndarray]:
    """Run the closed loop sample by sample on the full matrices, from rest.

    The recursion is the state-space form of the loop's difference equations
    (:attr:`FofbPlane.system`, built from :meth:`FofbPlane.step` on the full ORM blocks and
    the correction and hand-over matrices), one matrix-vector product per sample.

    Args:
        plane: the plane's design.
        disturbance: (n_samples, nbpm) orbit disturbance [m].

    Returns:
        ``orbit`` (n_samples, nbpm) [m], ``fast`` (n_samples, nf) fast setpoints [rad],
        ``slow`` (n_samples, ns) slow corrector kicks [rad] (ns = 0 without hand-over).
    """
    d = np.asarray(disturbance, float)
    if d.ndim != 2 or d.shape[1] != plane.nbpm:
        raise ValueError(f"disturbance must be (n_samples, {plane.nbpm}), got {d.shape}")
    sys = plane.system
    a, b = sys["A"], sys["B"]
    n = d.shape[0]
    states = np.empty((n, a.shape[0]))
    x = np.zeros(a.shape[0])
    drive = d @ b.T  # B d[n] for every n at once
    for i in range(n):  # the recursion itself: one matrix-vector product per sample
        states[i] = x
        x = a @ x + drive[i]
    orbit = states @ sys["Cy"].T + d @ sys["Dy"].T
    fast = states @ sys["Cf"].T + d @ sys["Df"].T
    slow = states @ sys["Cs"].T
    return {"orbit": orbit, "fast": fast, "slow": slow}


def measured_attenuation(
    plane: FofbPlane,
    disturbance: np.ndarray,
    orbit: np.ndarray,
    *,
    nperseg: int = 1024,
    lines_hz: Sequence[float] = (),
    min_coherence: float = 0.99,
) -> dict[str, np.ndarray]:
    """Attenuation versus frequency measured from a simulation (or a machine) record.

    Per mode, the transfer function from the disturbance to the residual orbit by the
    cross-spectral (H1) estimate ``P_dy / P_dd`` (Welch, Hann window), with its coherence; for
    the whole orbit, the Welch PSD ratio ``sqrt(sum P_yy / sum P_dd)`` of residual to
    uncorrected orbit.

    Args:
        plane: the plane's design (its modes and f_s).
        disturbance: (n_samples, nbpm) uncorrected orbit [m].
        orbit: (n_samples, nbpm) residual orbit with the feedback on [m].
        nperseg: Welch segment length (frequency resolution ``f_s / nperseg``).
        lines_hz: frequencies of spectral lines in the disturbance [Hz]: the bins within the
            Hann window's main lobe (2 bins) of a line measure ``S`` at the line, not at the
            bin, and are not valid.
        min_coherence: bins of a mode whose coherence is lower are not valid (noise or
            leakage from the steep low-frequency spectrum dominate them).

    Returns:
        ``frequency`` (nfreq,) [Hz] without DC, ``mode`` (nm, nfreq) ``|S_kk|``,
        ``coherence`` (nm, nfreq), ``valid`` (nm, nfreq) the bins where the estimate holds,
        ``orbit`` (nfreq,) the PSD-ratio attenuation.
    """
    fs = plane.loop.sampling_hz
    dm = np.asarray(disturbance, float) @ plane.u
    ym = np.asarray(orbit, float) @ plane.u
    f, pdd = signal.welch(dm, fs=fs, nperseg=nperseg, axis=0)
    _, pyy = signal.welch(ym, fs=fs, nperseg=nperseg, axis=0)
    _, pdy = signal.csd(dm, ym, fs=fs, nperseg=nperseg, axis=0)
    _, pdd_bpm = signal.welch(np.asarray(disturbance, float), fs=fs, nperseg=nperseg, axis=0)
    _, pyy_bpm = signal.welch(np.asarray(orbit, float), fs=fs, nperseg=nperseg, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h1 = np.abs(pdy / pdd)
        coherence = np.abs(pdy) ** 2 / (pdd * pyy)
        total = np.sqrt(pyy_bpm.sum(1) / pdd_bpm.sum(1))
    sl = slice(1, None)
    near_line = np.zeros(f.size, bool)
    for line in lines_hz:
        near_line |= np.abs(f - line) <= 2 * fs / nperseg
    valid = (coherence >= min_coherence) & ~near_line[:, None]
    return {
        "frequency": f[sl],
        "mode": h1[sl].T,
        "coherence": coherence[sl].T,
        "valid": valid[sl].T,
        "orbit": total[sl],
    }


def identify_sensitivity(
    plane: FofbPlane, *, n_period: int = 4096, n_frequencies: int = 40, seed: int = 0
) -> dict[str, np.ndarray]:
    """Measure ``S`` in the time domain: a periodic multisine in each mode, loop by loop.

    Each corrected mode is excited (in its own column of the state, all at once) by a
    multisine of ``n_frequencies`` log-spaced FFT bins of period ``n_period`` with random
    phases. The loop is run sample by sample on the full matrices (:attr:`FofbPlane.system`,
    built from :meth:`FofbPlane.step`) for one period, from the periodic steady state (solved
    from the state matrix, so no transient is left), and the ratio of the residual orbit's FFT
    to the excitation's, per mode, is the sensitivity at those bins: no window, no leakage, no
    noise. The time-domain counterpart of :meth:`FofbPlane.sensitivity`, which it must match to
    numerical precision.

    Args:
        plane: the plane's design.
        n_period: samples per period (frequency resolution ``f_s / n_period``).
        n_frequencies: number of excited bins (fewer when the log spacing repeats a bin).
        seed: random seed of the phases.

    Returns:
        ``frequency`` (nfreq,) [Hz]; ``mode`` (nm, nfreq) ``|S_kk|`` of the corrected modes
        (NaN for dropped modes); ``cross`` (nfreq,) the largest ``|S_jk|``, ``j != k``.
    """
    n = int(n_period)
    if n < 16:
        raise ValueError(f"n_period must be >= 16 samples, got {n_period!r}")
    bins = np.unique(np.round(np.geomspace(1, n // 2 - 1, n_frequencies)).astype(int))
    kept = int(np.count_nonzero(plane.loop_weights))
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, (kept, bins.size))
    t = np.arange(n)
    x = np.cos(2 * np.pi * bins[None, None, :] * t[:, None, None] / n + phase[None]).sum(-1)
    x /= np.sqrt(bins.size)  # (n, kept): excitation of mode k in column k
    u = plane.u[:, :kept]
    sys = plane.system
    a, b = sys["A"], sys["B"]
    nstate = a.shape[0]
    drive = np.einsum("sb,bk,nk->nsk", b, u, x)  # B d[n], column k excites mode k
    state = np.zeros((nstate, kept))
    for i in range(n):  # one period from rest: the forced response
        state = a @ state + drive[i]
    # the periodic steady state x0 = A^n x0 + forced(n)
    state = np.linalg.solve(np.eye(nstate) - np.linalg.matrix_power(a, n), state)
    orbit_modes = u.T @ sys["Cy"]
    direct = u.T @ sys["Dy"] @ u
    modes = np.empty((n, kept, kept))
    for i in range(n):
        modes[i] = orbit_modes @ state + direct * x[i][None, :]
        state = a @ state + drive[i]
    ratio = np.fft.rfft(modes, axis=0)[bins] / np.fft.rfft(x, axis=0)[bins][:, None, :]
    diag = np.abs(np.einsum("fkk->kf", ratio))
    off = np.abs(ratio)
    idx = np.arange(kept)
    off[:, idx, idx] = 0.0
    mode = np.full((plane.n_modes, bins.size), np.nan)
    mode[:kept] = diag
    return {
        "frequency": bins * plane.loop.sampling_hz / n,
        "mode": mode,
        "cross": off.max(axis=(1, 2)) if kept > 1 else np.zeros(bins.size),
    }
