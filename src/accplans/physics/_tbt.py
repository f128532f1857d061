"""Turn-by-turn (TbT) optics: tunes, phases, beta from phase, beta-beating, bad-BPM detection.

Input: a BPM x turn matrix per plane (m), one row per BPM in lattice order, as a pinger shot
gives it. The tunes come from NAFF (nafflib) per BPM, combined by the median. The phase of
each BPM is the phase of its Hann-windowed projection on ``exp(-2 pi i Q n)`` at the combined
tune ``Q`` (one projection: NAFF's own per-BPM frequency would add its scatter to the phase).
Beta from phase is the 3-BPM method (Castro-Garcia; Skripka et al. for the N-BPM
generalisation): for a BPM ``i`` and two others ``j``, ``k``::

    beta_i = beta_i^model (cot phi_ij - cot phi_ik) / (cot phi_ij^m - cot phi_ik^m)

averaged over the three combinations ``(i, i+1, i+2)``, ``(i-1, i, i+1)``, ``(i-2, i-1, i)``
of good BPMs (ring wrap-around included), each weighted by the inverse square of its
sensitivity to phase errors, combinations whose model denominator is small (phase advances
near multiples of pi) left out.

The 3-BPM method assumes the model's transport between neighbouring BPMs, which errors between
them break (on the EBS twin it is off by ~2.8 % with exact phases). A model fitted to the phases
does better: :func:`phase_response` is the analytic first-order response of the phases to
gradients and :func:`phase_fit_step` one Tikhonov step with each plane's phase offset free;
``accplans.model.fit_phase_model`` iterates them on pyAT's optics. Coupling shows in each
mode's line in the other plane: :func:`coupling_ratios` (a lattice property per BPM) and
:func:`coupling_fit_step` are what ``accplans.model.fit_coupled_phase_model`` fits skew
gradients with.

Bad BPMs (:func:`find_bad_bpms`) are found from the SVD of the centred BPM x turn matrix: a
betatron oscillation is rank 2 (a cos and a sin spatial vector sharing their turn dependence,
whatever its decoherence; rank 4 with the other plane's tune that coupling adds), so a BPM
that owns a singular vector of its own (a spatial vector concentrated on it), that is silent,
whose noise floor (residual after the rank-4 betatron part) is an outlier, or whose
amplitude of the main (rank-2) mode over the model's ``sqrt(beta)`` is an outlier (a gain
jump) is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nafflib
import numpy as np

__all__ = [
    "BadBpms",
    "TbtOptics",
    "amplitude_outliers",
    "analyze_tbt",
    "beta_beating",
    "beta_from_phase",
    "coupling_fit_step",
    "coupling_ratios",
    "find_bad_bpms",
    "phase_advances",
    "phase_fit_step",
    "phase_response",
    "tbt_phases",
    "tbt_tunes",
    "zero_amplitude_tunes",
]

#: Cut on the model denominator |cot phi_ij - cot phi_ik| of a 3-BPM combination.
_MIN_DENOMINATOR = 0.1


def _centred(data: np.ndarray) -> np.ndarray:
    arr = np.asarray(data, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"TbT data must be a (BPMs, turns) matrix, got shape {arr.shape}")
    return arr - arr.mean(axis=1, keepdims=True)


def tbt_tunes(data: np.ndarray, *, good: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Fractional tune of one plane from NAFF per BPM (nafflib, Hann window of order 2).

    Args:
        data: (n_bpm, n_turns) positions (m).
        good: (n_bpm,) BPMs to use for the combined tune (all by default).

    Returns:
        The combined tune (median of the good BPMs, in [0, 0.5] for a real signal) and the
        tune of each BPM (NaN for a silent BPM).
    """
    x = _centred(data)
    tunes = np.full(x.shape[0], np.nan)
    for i, row in enumerate(x):
        if np.any(row != 0):
            q = abs(float(nafflib.tune(row, window_order=2)))
            tunes[i] = min(q % 1.0, 1.0 - q % 1.0)
    use = np.isfinite(tunes) if good is None else np.isfinite(tunes) & np.asarray(good, bool)
    if not np.any(use):
        raise ValueError("tbt_tunes: no BPM with a signal")
    return float(np.median(tunes[use])), tunes


def tbt_phases(data: np.ndarray, tune: float) -> tuple[np.ndarray, np.ndarray]:
    """Phase (rad) and amplitude (m) of each BPM's oscillation at ``tune``.

    ``x_n = A cos(2 pi Q n + phi)`` gives ``phi`` and ``A`` (Hann-windowed projection on
    ``exp(-2 pi i Q n)``; the amplitude is the window-weighted mean amplitude, so a decohering
    oscillation gives its mean over the buffer).

    Args:
        data: (n_bpm, n_turns) positions (m).
        tune: fractional tune of the plane.

    Returns:
        ``(phase, amplitude)``, each (n_bpm,); the phase in (-pi, pi].
    """
    z = _line(_centred(data), tune)
    return np.angle(z), 2.0 * np.abs(z)


def _line(centred: np.ndarray, tune: float) -> np.ndarray:
    """Hann-windowed projection of each row on ``exp(-2 pi i Q n)`` (complex, half amplitude)."""
    n = centred.shape[1]
    turns = np.arange(n)
    window = np.sin(np.pi * (turns + 0.5) / n) ** 2
    return centred @ (window * np.exp(-2j * np.pi * tune * turns)) / window.sum()


def coupling_ratios(x: np.ndarray, y: np.ndarray, tunes: np.ndarray) -> np.ndarray:
    """Complex ratios of each mode's line in the other plane to its line in its own plane.

    Row 0: the Q1 line of the vertical readings over that of the horizontal ones; row 1: the
    Q2 line of the horizontal readings over that of the vertical ones; per BPM, averaged over
    the shots. A ratio is a property of the lattice at the BPM, whatever the kick and the
    decoherence of the mode: with ``v_k = A[:, 2k] + i A[:, 2k+1]`` the normalising matrix of
    pyAT's ``linopt6`` at the BPM, row 0 is ``v_1[y] / v_1[x]`` and row 1 ``v_2[x] / v_2[y]``
    (0 without coupling). A BPM roll ``theta`` adds ``-theta`` to row 0 and ``+theta`` to row 1.

    Args:
        x: (n_bpm, n_turns) or (n_shots, n_bpm, n_turns) horizontal positions (m).
        y: the vertical positions (m), same shape.
        tunes: (2,) fractional tunes ``(Q1, Q2)`` (as :func:`analyze_tbt` gives them).

    Returns:
        (2, n_bpm) complex ratios (NaN where a BPM has no own-plane line).
    """
    shots = [np.asarray(x, dtype=float), np.asarray(y, dtype=float)]
    if shots[0].ndim == 2:
        shots = [s[None] for s in shots]
    out = np.zeros((2, shots[0].shape[1]), dtype=complex)
    for mode, (own, other) in enumerate(((0, 1), (1, 0))):
        q = float(tunes[mode])
        ratios = []
        for a, b in zip(shots[own], shots[other], strict=True):
            za, zb = _line(_centred(a), q), _line(_centred(b), q)
            ratios.append(np.where(za != 0, zb / np.where(za != 0, za, 1.0), np.nan))
        out[mode] = np.mean(ratios, axis=0)
    return out


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def phase_advances(phase: np.ndarray, model_phase: np.ndarray) -> np.ndarray:
    """Measured phase (rad) of every BPM from the first, unwrapped next to the model's.

    Args:
        phase: (n,) measured phases (rad) of one plane, any 2 pi offsets.
        model_phase: (n,) model phase advance from the ring start (rad, increasing).

    Returns:
        (n,) measured phase advance from BPM 0 (rad), the model's plus the wrapped difference:
        differences of it are the BPM-to-BPM phase advances.
    """
    mu = np.asarray(model_phase, dtype=float)
    d = _wrap((np.asarray(phase) - phase[0]) - (mu - mu[0]))
    return (mu - mu[0]) + d


def beta_from_phase(
    phase: np.ndarray,
    model_phase: np.ndarray,
    model_beta: np.ndarray,
    tune: float,
    *,
    good: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Beta functions (m) at the BPMs from measured phases (3-BPM method, module docstring).

    Args:
        phase: (n,) measured phases (rad) of one plane (:func:`tbt_phases`).
        model_phase: (n,) model phase advance at the BPMs from the ring start (rad).
        model_beta: (n,) model beta at the BPMs (m).
        tune: the model's total tune of the plane (integer part included): the phase advance
            over one turn is ``2 pi tune``.
        good: (n,) BPMs to use (bad ones are skipped; their beta is NaN).

    Returns:
        ``(beta, error)``: beta (m) per BPM and the spread of its combinations (m; 0 when a
        single combination was usable), NaN where none was.
    """
    n = len(phase)
    ok = np.ones(n, bool) if good is None else np.asarray(good, bool)
    idx = np.flatnonzero(ok)
    m = idx.size
    beta = np.full(n, np.nan)
    err = np.full(n, np.nan)
    if m < 3:
        return beta, err
    meas = phase_advances(phase, model_phase)
    mu_model = np.asarray(model_phase, dtype=float) - model_phase[0]
    turn = 2 * np.pi * tune

    def adv(values: np.ndarray, a: int, b: int) -> float:
        """Phase advance from good BPM a to good BPM b (positions in idx, may wrap)."""
        wa, wb = a // m, b // m
        return float(values[idx[b % m]] + wb * turn - values[idx[a % m]] - wa * turn)

    for p in range(m):
        estimates, weights = [], []
        for j_off, k_off in ((1, 2), (-1, 1), (-2, -1)):
            a, b = p + j_off, p + k_off
            mij, mik = adv(mu_model, p, a), adv(mu_model, p, b)
            qij, qik = adv(meas, p, a), adv(meas, p, b)
            den = 1 / np.tan(mij) - 1 / np.tan(mik)
            if abs(den) < _MIN_DENOMINATOR:
                continue
            num = 1 / np.tan(qij) - 1 / np.tan(qik)
            # sensitivity to phase errors: d(num)/d(phi) ~ 1/sin^2
            sens = np.hypot(1 / np.sin(mij) ** 2, 1 / np.sin(mik) ** 2) / abs(den)
            estimates.append(num / den)
            weights.append(1.0 / sens**2)
        if estimates:
            i = idx[p]
            e, w = np.array(estimates), np.array(weights)
            ratio = float(np.sum(w * e) / np.sum(w))
            beta[i] = model_beta[i] * ratio
            err[i] = model_beta[i] * float(np.std(e)) if e.size > 1 else 0.0
    return beta, err


def beta_beating(beta: np.ndarray, model_beta: np.ndarray) -> tuple[np.ndarray, float]:
    """Relative beta-beating ``beta / beta_model - 1`` per BPM and its rms over finite values."""
    bb = np.asarray(beta, dtype=float) / np.asarray(model_beta, dtype=float) - 1.0
    finite = bb[np.isfinite(bb)]
    return bb, float(np.sqrt(np.mean(finite**2))) if finite.size else float("nan")


@dataclass
class BadBpms:
    """The bad BPMs of one plane and why.

    Attributes:
        flagged: (n,) True for a bad BPM.
        reasons: reason(s) per flagged BPM index ("silent", "own singular vector", "noise
            floor", "amplitude").
        noise_m: (n,) rms residual after the rank-2 betatron part (m).
        amplitude_ratio: (n,) betatron amplitude over ``sqrt(beta_model)``, relative to its
            median (NaN without a model beta).
    """

    flagged: np.ndarray
    reasons: dict[int, list[str]] = field(default_factory=dict)
    noise_m: np.ndarray = field(default_factory=lambda: np.zeros(0))
    amplitude_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _robust_z(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    med = np.median(values[ok])
    mad = 1.4826 * np.median(np.abs(values[ok] - med))
    return (values - med) / max(mad, 1e-300)


def find_bad_bpms(
    data: np.ndarray,
    *,
    model_beta: np.ndarray | None = None,
    threshold: float = 6.0,
    localized: float = 0.7,
    amplitude_tolerance: float = 0.1,
    noise_excess: float = 0.5,
    modes: int = 8,
    rank: int = 4,
) -> BadBpms:
    """Flag the bad BPMs of one plane from the SVD of its BPM x turn matrix (module docstring).

    Tests, in order: silent BPMs (no variation); BPMs owning one of the first ``modes``
    singular vectors (``u_i^2 > localized`` of a spatial vector, iterated after removing
    them); a noise floor (rms residual after the first ``rank`` singular vectors: both tune
    lines, as coupling puts the other plane's tune in every BPM) more than ``threshold`` robust
    standard deviations and ``noise_excess`` (relative) above the median; with ``model_beta``, a
    betatron amplitude over ``sqrt(beta_model)`` off the median by more than ``threshold``
    robust standard deviations and more than ``amplitude_tolerance`` (relative), which a
    gain jump gives and beta-beating of a few percent does not.

    Args:
        data: (n_bpm, n_turns) positions (m).
        model_beta: (n_bpm,) model beta (m) for the amplitude test.
        threshold: robust z-score above which a statistic is an outlier.
        localized: share of a spatial singular vector's norm on one BPM that makes it its own.
        amplitude_tolerance: smallest relative amplitude anomaly flagged.
        noise_excess: smallest relative excess of a noise floor over the median flagged.
        modes: how many leading singular vectors are checked for localisation.
        rank: singular vectors of the betatron motion removed before the noise floor.
    """
    x = _centred(data)
    n = x.shape[0]
    flagged = np.zeros(n, bool)
    reasons: dict[int, list[str]] = {}

    def flag(i: int | np.integer, why: str) -> None:
        flagged[i] = True
        reasons.setdefault(int(i), []).append(why)

    rms = np.sqrt(np.mean(x**2, axis=1))
    scale = np.median(rms[rms > 0]) if np.any(rms > 0) else 1.0
    for i in np.flatnonzero(rms <= 1e-6 * scale):
        flag(i, "silent")
    for _ in range(n):
        use = np.flatnonzero(~flagged)
        u, _s, _vt = np.linalg.svd(x[use], full_matrices=False)
        k = min(modes, u.shape[1])
        share = u[:, :k] ** 2
        hit = np.argwhere(share > localized)
        if hit.size == 0:
            break
        for row in hit[:, 0].tolist():
            if not flagged[use[row]]:
                flag(int(use[row]), "own singular vector")
    noise = np.full(n, np.nan)
    while True:  # a very noisy BPM takes a singular vector from the betatron part: repeat
        use = np.flatnonzero(~flagged)
        u, s, vt = np.linalg.svd(x[use], full_matrices=False)
        betatron = (u[:, :rank] * s[:rank]) @ vt[:rank]
        noise[use] = np.sqrt(np.mean((x[use] - betatron) ** 2, axis=1))
        log_noise = np.log(noise[use])
        z = _robust_z(log_noise, np.ones(use.size, bool))
        excess = log_noise - np.median(log_noise) > np.log1p(noise_excess)
        rows = np.flatnonzero((z > threshold) & excess)
        if rows.size == 0:
            break
        # the worst first: the others may be its side effect
        flag(int(use[rows[np.argmax(log_noise[rows])]]), "noise floor")
    ratio = np.full(n, np.nan)
    if model_beta is not None:
        amp = np.hypot(u[:, 0] * s[0], u[:, 1] * s[1])
        r = np.log(amp / np.sqrt(np.asarray(model_beta, dtype=float)[use]))
        r -= np.median(r)
        ratio[use] = np.exp(r)
        zr = _robust_z(r, np.ones(use.size, bool))
        for row in np.flatnonzero((np.abs(zr) > threshold) & (np.abs(r) > amplitude_tolerance)):
            flag(int(use[row]), "amplitude")
    return BadBpms(flagged=flagged, reasons=reasons, noise_m=noise, amplitude_ratio=ratio)


@dataclass
class TbtOptics:
    """Optics of one pinger shot, per plane (index 0: x, 1: y).

    Attributes:
        tunes: (2,) combined fractional tunes.
        bpm_tunes: (2, n) tune of each BPM.
        phases: (2, n) phase of each BPM at the combined tune (rad).
        amplitudes: (2, n) oscillation amplitude (m).
        phase_advance: (2, n) measured phase advance from the first BPM (rad; NaN if bad).
        beta: (2, n) beta from phase (m; NaN where not measured).
        beta_error: (2, n) spread of the 3-BPM combinations (m).
        beta_beating: (2, n) ``beta / beta_model - 1``.
        beating_rms: (2,) rms beta-beating.
        bad: (n,) BPMs flagged bad in either plane.
        bad_reasons: reasons per plane: ``{"x": {i: [...]}, "y": {...}}``.
        coupling: (2, n) complex coupling ratios (:func:`coupling_ratios`).
    """

    tunes: np.ndarray
    bpm_tunes: np.ndarray
    phases: np.ndarray
    amplitudes: np.ndarray
    phase_advance: np.ndarray
    beta: np.ndarray
    beta_error: np.ndarray
    beta_beating: np.ndarray
    beating_rms: np.ndarray
    bad: np.ndarray
    bad_reasons: dict[str, dict[int, list[str]]]
    coupling: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), dtype=complex))


def amplitude_outliers(
    amplitude: np.ndarray,
    beta: np.ndarray,
    *,
    threshold: float = 6.0,
    tolerance: float = 0.1,
) -> np.ndarray:
    """BPMs whose oscillation amplitude disagrees with ``sqrt(beta)``: gain jumps.

    ``amplitude / sqrt(beta)`` is the same at every BPM for a well-calibrated BPM and a beta
    from phase (which a BPM's gain does not change); a ratio more than ``threshold`` robust
    standard deviations and ``tolerance`` (relative, in log) off the median is an outlier.

    Args:
        amplitude: (n,) oscillation amplitudes (m).
        beta: (n,) beta functions (m), NaN where unknown (never flagged).
        threshold: robust z-score above which a ratio is an outlier.
        tolerance: smallest relative (log) deviation flagged.
    """
    amp = np.asarray(amplitude, dtype=float)
    b = np.asarray(beta, dtype=float)
    ok = np.isfinite(b) & (b > 0) & (amp > 0)
    out = np.zeros(amp.size, bool)
    if np.count_nonzero(ok) < 3:
        return out
    r = np.full(amp.size, np.nan)
    r[ok] = np.log(amp[ok] / np.sqrt(b[ok]))
    r -= np.median(r[ok])
    z = _robust_z(np.where(ok, r, 0.0), ok)
    out[ok] = (np.abs(z[ok]) > threshold) & (np.abs(r[ok]) > tolerance)
    return out


def analyze_tbt(
    x: np.ndarray,
    y: np.ndarray,
    *,
    model_phase: np.ndarray,
    model_beta: np.ndarray,
    model_tunes: np.ndarray,
    threshold: float = 6.0,
) -> TbtOptics:
    """The whole analysis of one or more shots: bad BPMs, tunes, phases, beta, beating.

    Bad BPMs are flagged per shot and plane (:func:`find_bad_bpms`: silent, own singular
    vector, noise floor; the union is kept), then by their amplitude against beta from phase
    (:func:`amplitude_outliers`, a gain jump; beta-beating would hide it from a test against
    the model's beta). The tunes are the mean of the shots' combined tunes; each BPM's phase is
    the circular mean of its phases over the shots (all shots of a pinger start alike) and its
    amplitude the mean; the coupling ratios are :func:`coupling_ratios` at the tunes.

    Args:
        x: (n_bpm, n_turns) or (n_shots, n_bpm, n_turns) horizontal positions (m).
        y: the vertical positions (m), same shape.
        model_phase: (2, n_bpm) model phase advance at the BPMs from the ring start (rad).
        model_beta: (2, n_bpm) model beta at the BPMs (m).
        model_tunes: (2,) model total tunes (integer part included).
        threshold: outlier threshold (robust standard deviations) of the bad-BPM tests.
    """
    shots = [np.asarray(x, dtype=float), np.asarray(y, dtype=float)]
    if shots[0].ndim == 2:
        shots = [s[None] for s in shots]
    if shots[0].ndim != 3 or shots[0].shape != shots[1].shape:
        raise ValueError(f"analyze_tbt: x {shots[0].shape} and y {shots[1].shape} differ")
    model_beta = np.asarray(model_beta, dtype=float)
    model_phase = np.asarray(model_phase, dtype=float)
    n = shots[0].shape[1]
    reasons: dict[str, dict[int, list[str]]] = {"x": {}, "y": {}}

    def note(key: str, i: int | np.integer, why: list[str]) -> None:
        have = reasons[key].setdefault(int(i), [])
        have.extend(w for w in why if w not in have)

    bad = np.zeros(n, bool)
    for plane, key in enumerate(("x", "y")):
        for data in shots[plane]:
            found = find_bad_bpms(data, threshold=threshold)
            bad |= found.flagged
            for i, why in found.reasons.items():
                note(key, i, why)
    tunes, bpm_tunes, phases, amps = [], [], [], []
    for plane in range(2):
        frac_model = float(model_tunes[plane]) % 1.0
        qs, per_bpm, zs, amp = [], [], [], []
        for data in shots[plane]:
            q, q_bpm = tbt_tunes(data, good=~bad)
            # the model decides whether the fractional tune is q or 1 - q (a real signal)
            if abs(frac_model - (1 - q)) < abs(frac_model - q):
                q, q_bpm = 1 - q, 1 - q_bpm
            ph, a = tbt_phases(data, q)
            qs.append(q)
            per_bpm.append(q_bpm)
            zs.append(np.exp(1j * ph))
            amp.append(a)
        tunes.append(float(np.mean(qs)))
        bpm_tunes.append(np.mean(per_bpm, axis=0))
        phases.append(np.angle(np.mean(zs, axis=0)))
        amps.append(np.mean(amp, axis=0))

    def betas(good: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [
            beta_from_phase(
                phases[p], model_phase[p], model_beta[p], float(model_tunes[p]), good=good
            )
            for p in range(2)
        ]

    beta = betas(~bad)
    jumped = np.zeros(n, bool)
    for plane, key in enumerate(("x", "y")):
        hit = amplitude_outliers(amps[plane], beta[plane][0], threshold=threshold) & ~bad
        for i in np.flatnonzero(hit):
            note(key, i, ["amplitude"])
        jumped |= hit
    if np.any(jumped):
        bad |= jumped
        beta = betas(~bad)
    good = ~bad
    adv, bb, rms = [], [], []
    for plane in range(2):
        p = np.full(n, np.nan)
        p[good] = phase_advances(phases[plane][good], model_phase[plane][good])
        beat, r = beta_beating(beta[plane][0], model_beta[plane])
        adv.append(p)
        bb.append(beat)
        rms.append(r)
    return TbtOptics(
        tunes=np.array(tunes),
        bpm_tunes=np.array(bpm_tunes),
        phases=np.array(phases),
        amplitudes=np.array(amps),
        phase_advance=np.array(adv),
        beta=np.array([b for b, _ in beta]),
        beta_error=np.array([e for _, e in beta]),
        beta_beating=np.array(bb),
        beating_rms=np.array(rms),
        bad=bad,
        bad_reasons=reasons,
        coupling=coupling_ratios(shots[0], shots[1], np.array(tunes)),
    )


def zero_amplitude_tunes(kick_rad: np.ndarray, tunes: np.ndarray) -> np.ndarray:
    """Tunes extrapolated to zero oscillation amplitude from shots of different kicks.

    Amplitude detuning makes the tune linear in the actions, ``Q = Q0 + sum_v (dQ/dJ_v) J_v``;
    shots whose kicks keep one ratio between the planes scale both actions alike, as
    ``kick^2``: a straight line of ``Q`` against ``kick^2`` gives ``Q0`` at 0. Needs no model.

    Args:
        kick_rad: (n_shots,) kick of each shot (rad; any one plane's, the ratio held).
        tunes: (n_shots, 2) measured fractional tunes.

    Returns:
        (2,) the intercepts.
    """
    k2 = np.asarray(kick_rad, dtype=float) ** 2
    q = np.asarray(tunes, dtype=float)
    if k2.size < 2 or np.unique(k2).size < 2:
        raise ValueError("zero_amplitude_tunes: need shots of at least two kick amplitudes")
    design = np.stack([np.ones_like(k2), k2], axis=1)
    coef, *_ = np.linalg.lstsq(design, q, rcond=None)
    return coef[0]


def phase_response(
    bpm_phase: np.ndarray,
    tune: float,
    source_phase: np.ndarray,
    source_weight: np.ndarray,
) -> np.ndarray:
    """First-order change of the betatron phase at the BPMs per unit of gradient (one plane).

    A thin gradient error ``dk`` (m^-1, focusing in this plane) at phase ``phi_w`` where the
    beta function is ``beta_w`` beats beta as ``dbeta/beta = -dk beta_w cos(2 pi Q -
    2 |phi - phi_w|) / (2 sin 2 pi Q)``; integrating ``-dbeta / beta^2`` gives the phase change
    at a BPM of phase ``phi_b`` (up to a constant common to all BPMs)::

        dphi_b = dk beta_w / (4 sin 2 pi Q) g(phi_b - phi_w),
        g(d) = cos(2 pi Q) sin 2d + sin(2 pi Q) (cos 2d if d < 0 else 2 - cos 2d)

    (the step ``2 sin 2 pi Q`` across the error is its tune change, ``dQ = dk beta_w / 4 pi``).
    A thick element is a sum of thin slices: ``source_weight`` holds, per parameter and sample
    point, ``sign * beta(s) * ds`` (quadrature weights times the beta function; sign +1 where a
    positive gradient focuses this plane, -1 where it defocuses), ``source_phase`` the phase
    there. Written here because pyAT offers only finite differences (one optics per gradient).

    Args:
        bpm_phase: (n,) model phase at the BPMs from the ring start (rad).
        tune: the model's tune of this plane (the fractional part is what counts).
        source_phase: (m, k) phase (rad) at ``k`` sample points of each of ``m`` parameters.
        source_weight: (m, k) quadrature weights ``sign * beta * ds`` (m^2).

    Returns:
        (n, m) d phi_b / d K_p (rad per m^-2 of gradient).
    """
    c, s = np.cos(2 * np.pi * tune), np.sin(2 * np.pi * tune)
    d = np.asarray(bpm_phase, float)[:, None, None] - np.asarray(source_phase, float)[None]
    g = c * np.sin(2 * d) + s * np.where(d < 0, np.cos(2 * d), 2.0 - np.cos(2 * d))
    return np.einsum("nmk,mk->nm", g, np.asarray(source_weight, float)) / (4 * s)


def phase_fit_step(
    jacobian: np.ndarray,
    residual: np.ndarray,
    sigma: np.ndarray,
    *,
    offsets: np.ndarray,
    alpha: float = 1e-3,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradient step (Tikhonov) that best removes a phase residual, each plane's offset free.

    Solves ``min |W (r - J dk - o)|^2 + (alpha s_1)^2 |dk / scale|^2`` over the gradient
    changes ``dk`` and one free phase offset ``o`` per plane (measured phases have an
    arbitrary origin): the offsets are projected out with the weights first, then a Tikhonov
    SVD solve (``s_1`` the largest singular value of the scaled system).

    Args:
        jacobian: (n_rows, m) d phase / d gradient (rad per m^-2).
        residual: (n_rows,) measured minus model phase (rad), NaN rows ignored.
        sigma: (n_rows,) uncertainty of each row (rad).
        offsets: (n_rows,) integer plane label of each row (its offset group).
        alpha: Tikhonov parameter relative to the largest singular value.
        scale: (m,) expected size of each parameter (prior widths; default 1).

    Returns:
        ``(dk, fitted)``: the step (m^-2) and the fitted residual ``J dk + o`` (rad).
    """
    j = np.asarray(jacobian, float)
    r = np.asarray(residual, float)
    w = 1.0 / np.asarray(sigma, float)
    groups = np.asarray(offsets)
    ok = np.isfinite(r) & np.isfinite(w) & np.all(np.isfinite(j), axis=1)
    sc = np.ones(j.shape[1]) if scale is None else np.asarray(scale, float)
    a = j[ok] * sc
    b = r[ok].copy()
    ww = w[ok]
    g = groups[ok]
    for label in np.unique(g):
        rows = g == label
        wt = ww[rows] ** 2 / np.sum(ww[rows] ** 2)
        a[rows] -= wt @ a[rows]
        b[rows] -= wt @ b[rows]
    u, sv, vt = np.linalg.svd(a * ww[:, None], full_matrices=False)
    lam = alpha * sv[0]
    x = vt.T @ (sv / (sv**2 + lam**2) * (u.T @ (b * ww)))
    dk = x * sc
    fitted = np.full(r.shape, np.nan)
    model = j[ok] @ dk
    for label in np.unique(g):
        rows = g == label
        wt = ww[rows] ** 2 / np.sum(ww[rows] ** 2)
        model[rows] += wt @ (r[ok][rows] - model[rows])
    fitted[ok] = model
    return dk, fitted


def coupling_fit_step(
    jacobian: np.ndarray,
    residual: np.ndarray,
    sigma: np.ndarray,
    *,
    alpha: float = 1e-3,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Parameter step (Tikhonov) that best removes a coupling-ratio residual.

    Solves ``min |W (r - J p)|^2 + (alpha s_1)^2 |p / scale|^2`` (``s_1`` the largest singular
    value of the scaled, weighted system); rows with a NaN are ignored.

    Args:
        jacobian: (n_rows, m) d observable / d parameter.
        residual: (n_rows,) measured minus model observables.
        sigma: (n_rows,) uncertainty of each row.
        alpha: Tikhonov parameter relative to the largest singular value.
        scale: (m,) expected size of each parameter (prior widths; default 1).

    Returns:
        (m,) the step.
    """
    j = np.asarray(jacobian, float)
    r = np.asarray(residual, float)
    w = 1.0 / np.asarray(sigma, float)
    ok = np.isfinite(r) & np.isfinite(w) & np.all(np.isfinite(j), axis=1)
    sc = np.ones(j.shape[1]) if scale is None else np.asarray(scale, float)
    a = j[ok] * sc * w[ok, None]
    u, sv, vt = np.linalg.svd(a, full_matrices=False)
    lam = alpha * sv[0]
    return vt.T @ (sv / (sv**2 + lam**2) * (u.T @ (r[ok] * w[ok]))) * sc
