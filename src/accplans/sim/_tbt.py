"""Turn-by-turn BPM buffers of the twin: a pinger shot tracked in a worker, with decoherence.

A shot (:meth:`Twin.tbt_request` -> :func:`track_shot` in a worker process ->
:meth:`Twin.tbt_readings`):

1. The pinger kicks the beam by ``(kick_x, kick_y)`` (rad) at the start of the lattice
   (``s = 0``), on top of the closed orbit at the served RF frequency.
2. One particle is tracked (pyAT ``lattice_pass``, 4D, the true lattice with its errors and
   apertures) for ``turns`` turns, recorded at the BPMs. pyAT's tracking holds the GIL, so the
   twin runs it in a worker *process* and its IOC stays responsive.
3. A single particle does not decohere; the beam's centroid does. The oscillation about the
   closed orbit is multiplied by the analytic envelope of a Gaussian beam, per plane ``u`` (the
   other plane ``v``)::

       E_u(n) = C_u(n) A_uu(n) A_uv(n)
       C_u(n) = exp(-2 (xi_u sigma_delta / Q_s)^2 sin^2(pi Q_s n))          chromatic
       A_uu(n) = 1/(1 + t^2) exp(-Z_u^2 t^2 / (2 (1 + t^2))),  t = 2 pi (dQu/dJu) eps_u n
       A_uv(n) = 1/sqrt(1 + t^2) exp(-Z_v^2 t^2 / (2 (1 + t^2))), t = 2 pi (dQu/dJv) eps_v n

   with ``xi`` the (unnormalized) chromaticity ``dQ/d(dp/p)``, ``sigma_delta`` the energy
   spread, ``Q_s`` the synchrotron tune, ``eps`` the emittances and ``Z_u^2 = 2 J_u / eps_u``
   the kick amplitude in beam sizes (``J_u`` the action the kick gives). ``C`` is the
   classic chromatic decoherence of a beam with synchrotron motion (recoherence after
   ``1/Q_s`` turns); ``A`` is the amplitude-detuning decoherence of a kicked Gaussian beam
   (Meller, Chao, Lee, Ruth, Ziemann, SSC-N-360, 1987): for ``dQ/dJ`` constant, the exact
   centroid modulus of a displaced Gaussian whose particles have the tune ``Q0 + (dQ/dJ) J``.
   The centroid's small extra phase drift (a tune shift of order ``(dQ/dJ) eps``) is left out.
   On EBS at its design chromaticity (5.7, 3.9; sigma_delta 9.3e-4, Q_s 3.5e-3) the chromatic
   factor falls to 0.28 at turn 50 and 0.03 at turn 100: about 100 turns are usable,
   as on the real machine.
4. The readings are those of the closed orbit (``bpm_readings``: gain, roll, offset) at each
   turn, plus the TbT noise (``TbtSettings.noise_m``, 10 um rms per turn by default) and the
   bad BPMs the twin's control injected (:data:`BAD_BPM_KINDS`).

Parameters: ``xi`` from ``at.get_chrom`` of the true lattice at the beam's energy offset (every
shot); ``dQ/dJ`` from ``at.physics.detuning`` of the true lattice (first shot after a reset,
cached; the cross term symmetrised as the smaller of pyAT's two fits); ``sigma_delta``, the
horizontal emittance and ``Q_s`` from ``Lattice.radiation_parameters`` of the true lattice
(first shot after a reset, cached);
``eps_y = TbtSettings.emittance_ratio * eps_x``. Any of them can be fixed in
:class:`TbtSettings`.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass, field
from typing import Any

import at
import numpy as np

__all__ = [
    "BAD_BPM_KINDS",
    "ShotRequest",
    "ShotResult",
    "TbtSettings",
    "decoherence_envelope",
    "track_shot",
]

#: Bad-BPM kinds the twin can inject, and what their ``value`` is.
BAD_BPM_KINDS: dict[str, str] = {
    "dead": "reads 0 (value unused); its closed-orbit reading is invalid",
    "noisy": "adds Gaussian noise of rms value (m) to every reading",
    "gain": "multiplies its readings by value",
    "swapped": "swaps its x and y readings (value unused)",
}

# worker-process cache of the slow, reset-scoped parameters: {key: (detuning, radiation)}
_CACHE: dict[Any, tuple[np.ndarray, dict[str, float]]] = {}


@dataclass(frozen=True)
class TbtSettings:
    """Turn-by-turn settings of the twin.

    Attributes:
        turns: default buffer length (turns).
        max_turns: longest buffer the IOC serves (its waveforms hold ``n_bpm * max_turns``).
        noise_m: rms noise of each TbT reading (m), independent of the closed-orbit noise.
        emittance_ratio: ``eps_y / eps_x`` of the beam.
        sigma_delta: energy spread; None: from the lattice's radiation integrals.
        emittance_x: horizontal emittance (m); None: from the radiation integrals.
        synchrotron_tune: ``Q_s``; None: from the lattice's RF and momentum compaction.
        detuning: ``[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]]`` (1/m); None: pyAT's.
        chromaticity: ``(xi_x, xi_y)``; None: pyAT's at every shot.
        kick_max_rad: largest |kick| of the pinger (rad).
    """

    turns: int = 1024
    max_turns: int = 2048
    kick_max_rad: float = 1e-3
    noise_m: float = 10e-6
    emittance_ratio: float = 0.01
    sigma_delta: float | None = None
    emittance_x: float | None = None
    synchrotron_tune: float | None = None
    detuning: tuple[tuple[float, float], tuple[float, float]] | None = None
    chromaticity: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.turns <= self.max_turns:
            raise ValueError(f"TbtSettings: need 1 <= turns <= max_turns, got {self.turns}")
        if not np.isfinite(self.noise_m) or self.noise_m < 0:
            raise ValueError(f"TbtSettings.noise_m must be finite and >= 0: {self.noise_m!r}")
        if not self.emittance_ratio > 0:
            raise ValueError(f"TbtSettings.emittance_ratio must be > 0: {self.emittance_ratio!r}")


@dataclass
class ShotRequest:
    """Everything a worker needs to track one shot (picklable; the lattice pickled at request).

    Attributes:
        ring_pickle: the true lattice at the time of the shot (pickled).
        bpm_elements: lattice index of each BPM.
        dct_m: path lengthening of the closed orbit at the served RF frequency (m).
        kick_rad: ``(kick_x, kick_y)`` (rad).
        turns: turns to record.
        cache_key: key of the reset-scoped parameters cached by the worker.
        settings: the TbT settings.
    """

    ring_pickle: bytes
    bpm_elements: np.ndarray
    dct_m: float
    kick_rad: tuple[float, float]
    turns: int
    cache_key: Any
    settings: TbtSettings


@dataclass
class ShotResult:
    """The beam at the BPMs for one shot (m), and the parameters of its envelope.

    Attributes:
        beam_m: (2, n_bpm, turns) centroid position (x, y) at the BPMs, envelope applied (m);
            NaN from the turn the particle was lost.
        orbit_m: (2, n_bpm) closed orbit at the BPMs (m).
        lost_turn: first turn the particle was lost at, or -1.
        info: envelope parameters, tunes and actions (JSON-friendly; exported with the truth).
    """

    beam_m: np.ndarray
    orbit_m: np.ndarray
    lost_turn: int
    info: dict[str, Any] = field(default_factory=dict)


def decoherence_envelope(
    turns: int,
    *,
    chromaticity: np.ndarray,
    sigma_delta: float,
    synchrotron_tune: float,
    detuning: np.ndarray,
    emittances: np.ndarray,
    actions: np.ndarray,
) -> np.ndarray:
    """The centroid envelope ``E_u(n)`` of both planes (module docstring), shape (2, turns).

    Args:
        turns: number of turns.
        chromaticity: ``(xi_x, xi_y)``, unnormalized ``dQ/d(dp/p)``.
        sigma_delta: rms relative energy spread.
        synchrotron_tune: ``Q_s``.
        detuning: ``[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]]`` (1/m, pyAT's layout).
        emittances: ``(eps_x, eps_y)`` (m).
        actions: ``(J_x, J_y)`` of the kick (m).
    """
    n = np.arange(turns, dtype=float)
    q1 = np.asarray(detuning, dtype=float)
    eps = np.asarray(emittances, dtype=float)
    z2 = 2.0 * np.asarray(actions, dtype=float) / eps
    out = np.empty((2, turns))
    for u in range(2):
        v = 1 - u
        chrom = np.exp(
            -2.0
            * (chromaticity[u] * sigma_delta / synchrotron_tune) ** 2
            * np.sin(np.pi * synchrotron_tune * n) ** 2
        )
        t = 2 * np.pi * q1[u, u] * eps[u] * n
        direct = np.exp(-z2[u] * t**2 / (2 * (1 + t**2))) / (1 + t**2)
        t = 2 * np.pi * q1[v, u] * eps[v] * n
        cross = np.exp(-z2[v] * t**2 / (2 * (1 + t**2))) / np.sqrt(1 + t**2)
        out[u] = chrom * direct * cross
    return out


def _slow_parameters(ring: at.Lattice, key: Any, dp: float) -> tuple[np.ndarray, dict]:
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    # small amplitudes: linear in J, and the plane without a kick keeps its own tune line
    # (at 0.1 mm with coupling, NAFF of x in a y scan can pick Qy and return nonsense)
    _, q1, *_ = at.physics.detuning(ring, xm=3e-5, ym=3e-5, npoints=3, nturns=256, dp=dp)
    q1 = np.asarray(q1, dtype=float)
    # dQx/dJy = dQy/dJx in theory: keep the smaller of the two fits (a wrong line is large)
    off = q1[0, 1] if abs(q1[0, 1]) <= abs(q1[1, 0]) else q1[1, 0]
    q1[0, 1] = q1[1, 0] = off
    params = ring.radiation_parameters()
    radiation = {
        "sigma_delta": float(params.sigma_e),
        "emittance_x": float(params.emittances[0]),
        "synchrotron_tune": float(params.f_s / ring.revolution_frequency),
    }
    _CACHE.clear()
    _CACHE[key] = (q1, radiation)
    return _CACHE[key]


def track_shot(request: ShotRequest) -> ShotResult:
    """Track one pinger shot and apply the decoherence envelope (runs in a worker process)."""
    ring: at.Lattice = pickle.loads(request.ring_pickle)
    s = request.settings
    bpms = np.asarray(request.bpm_elements, dtype=np.int64)
    orbit0, orbit = at.find_orbit4(ring, dct=request.dct_m, refpts=bpms)
    dp = float(orbit0[4])
    start = orbit0.copy()
    start[1] += request.kick_rad[0]
    start[3] += request.kick_rad[1]
    out = at.lattice_pass(ring, start.reshape(6, 1).copy(), request.turns, refpts=bpms)
    xy = np.asarray(out[(0, 2), 0, :, :], dtype=float)  # (2, n_bpm, turns)
    co = np.asarray(orbit[:, (0, 2)].T, dtype=float)  # (2, n_bpm)
    lost = ~np.all(np.isfinite(xy), axis=(0, 1))
    lost_turn = int(np.argmax(lost)) if np.any(lost) else -1

    detuning_pyat, radiation = _slow_parameters(ring, request.cache_key, dp)
    detuning = np.asarray(s.detuning, float) if s.detuning is not None else detuning_pyat
    sigma_delta = s.sigma_delta if s.sigma_delta is not None else radiation["sigma_delta"]
    eps_x = s.emittance_x if s.emittance_x is not None else radiation["emittance_x"]
    qs = s.synchrotron_tune if s.synchrotron_tune is not None else radiation["synchrotron_tune"]
    if s.chromaticity is not None:
        chrom = np.asarray(s.chromaticity, dtype=float)
    else:
        chrom = np.asarray(at.get_chrom(ring, dp=dp), dtype=float)[:2]
    _, _, linear = at.get_optics(ring, refpts=[0], dp=dp)
    beta0 = np.asarray(linear.beta[0], dtype=float)[:2]
    actions = 0.5 * beta0 * np.asarray(request.kick_rad, dtype=float) ** 2
    emittances = np.array([eps_x, s.emittance_ratio * eps_x])
    envelope = decoherence_envelope(
        request.turns,
        chromaticity=chrom,
        sigma_delta=sigma_delta,
        synchrotron_tune=qs,
        detuning=detuning,
        emittances=emittances,
        actions=actions,
    )
    beam = co[:, :, None] + envelope[:, None, :] * (xy - co[:, :, None])
    tunes = np.asarray(at.get_tune(ring, dp=dp), dtype=float)[:2]
    info = {
        "kick_rad": list(map(float, request.kick_rad)),
        "turns": int(request.turns),
        "dp": dp,
        "tunes": tunes.tolist(),
        "chromaticity": chrom.tolist(),
        "detuning": detuning.tolist(),
        "sigma_delta": float(sigma_delta),
        "emittances_m": emittances.tolist(),
        "synchrotron_tune": float(qs),
        "actions_m": actions.tolist(),
        "beta_at_pinger_m": beta0.tolist(),
        "lost_turn": lost_turn,
        "settings": asdict(s),
    }
    return ShotResult(beam_m=beam, orbit_m=co, lost_turn=lost_turn, info=info)
