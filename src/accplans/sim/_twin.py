"""The twin's physics: the true machine (pyAT lattice with errors), its beam and its readings.

No EPICS here: :class:`Twin` takes readbacks in hardware units (A, Hz, V), applies them to the
lattice through the description's calibrations (and cross-talk matrices) times its own true
calibration errors, and computes a :class:`Frame` (what BPMs, DCCT and tune monitor read).
Everything is computed at the served RF frequency (the closed orbit at the path lengthening
``dct`` that frequency imposes), never at ``dp = 0``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import at
import numpy as np

from accplans.config import MachineDescription, build_lattice, parse_field
from accplans.model import (
    ClosedOrbitSolver,
    NoClosedOrbit,
    dct_for_frequency,
    frequency_for_dct,
)

from ._errors import ErrorModel, TwinErrors, bpm_readings, draw_errors
from ._tbt import BAD_BPM_KINDS, ShotRequest, ShotResult, TbtSettings

if TYPE_CHECKING:
    from ._emittance import EmittanceResult
    from ._truth import Truth

__all__ = ["BeamSettings", "Frame", "Twin"]

_log = logging.getLogger(__name__)

_MAGNET_KINDS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")


@dataclass(frozen=True)
class BeamSettings:
    """The beam of the twin.

    Attributes:
        current_ma: current right after a refill (mA).
        lifetime_h: exponential lifetime (h); the current decays as ``exp(-t / lifetime)``.
        aperture_m: radius of the elliptic physical aperture given to every element (m), when
            the lattice has no apertures of its own; beam beyond it is lost.
    """

    current_ma: float = 200.0
    lifetime_h: float = 10.0
    aperture_m: float = 10e-3

    def __post_init__(self) -> None:
        for name in ("current_ma", "lifetime_h", "aperture_m"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"BeamSettings.{name}: must be finite and > 0, got {value!r}")


@dataclass
class Frame:
    """One model tick: what the diagnostics read (hardware units) and the beam state.

    Attributes:
        x_mm: (n,) horizontal BPM readings (mm); 0 where invalid, never NaN.
        y_mm: (n,) vertical BPM readings (mm).
        valid: (n,) 1 where the reading is valid, 0 without beam.
        beam_m: (n, 2) true beam position at the BPMs (m), zeros without beam.
        current_ma: stored current (mA).
        lifetime_h: lifetime (h), 0 without beam.
        tune: (2,) fractional tunes (x, y), zeros without beam.
        beam: whether there is beam.
        loss_reason: why the beam was lost ("" while there is beam).
        dct_m: path lengthening at the served RF frequency (m).
        solved: whether this frame recomputed the closed orbit.
        compute_s: time the computation took (s).
    """

    x_mm: np.ndarray
    y_mm: np.ndarray
    valid: np.ndarray
    beam_m: np.ndarray
    current_ma: float
    lifetime_h: float
    tune: np.ndarray
    beam: bool
    loss_reason: str
    dct_m: float
    solved: bool
    compute_s: float


@dataclass
class _Target:
    """Where one magnet writes: an element's array, an index and the true strength scale."""

    element: int
    array: np.ndarray
    index: int
    scale: float
    kick: bool  # KickAngle (the solver can predict its effect) or an optics field


class Twin:
    """The true machine: a pyAT lattice with a seeded error model, a beam and its diagnostics.

    Magnets are addressed by position in :attr:`magnet_names` (every corrector, quadrupole,
    sextupole and skew-quadrupole device of the description, in description order). Their
    hardware values (A) go through the device's calibration (nominal strength), the cross-talk
    matrix of a multi-channel magnet, then the twin's true error (corrector calibration error,
    quadrupole gradient error per element), and are written in place into the lattice. A
    magnet whose calibration has ``hysteresis`` keeps a backlash state: its true strength is
    the calibration (the descending branch) at :attr:`effective_hardware` (see
    :meth:`_on_calibrated_branch`); after :meth:`reset` the state is ascending.

    Args:
        description: the machine description.
        errors: error amplitudes (default: :class:`ErrorModel`'s moderate defaults).
        seed: error seed.
        beam: beam settings.
        noise: whether BPM and tune readings are noisy (the error model's noise amplitudes).
        tbt: turn-by-turn settings (pinger shots, see :mod:`accplans.sim._tbt`).
    """

    def __init__(
        self,
        description: MachineDescription,
        *,
        errors: ErrorModel | None = None,
        seed: int = 0,
        beam: BeamSettings | None = None,
        noise: bool = True,
        tbt: TbtSettings | None = None,
    ) -> None:
        self.description = description
        self.tbt_settings = tbt if tbt is not None else TbtSettings()
        self.bad_bpms: dict[str, tuple[str, float]] = {}
        self.last_shot: dict[str, Any] = {}
        self._resets = 0
        self.error_model = errors if errors is not None else ErrorModel()
        self.beam_settings = beam if beam is not None else BeamSettings()
        self.noise = noise
        self.magnets = [d for d in description.devices if d.kind in _MAGNET_KINDS]
        self.magnet_names = [d.name for d in self.magnets]
        self.magnet_index = {n: i for i, n in enumerate(self.magnet_names)}
        self.bpms = [d for d in description.devices if d.kind == "bpm"]
        self.bpm_names = [d.name for d in self.bpms]
        self.bpm_elements = np.array([d.elements[0] for d in self.bpms], dtype=np.int64)
        rf = [d for d in description.devices if d.kind == "rf"]
        if len(rf) > 1:
            raise ValueError(
                f"machine {description.machine.name!r}: the twin drives one RF device, the "
                f"description has {len(rf)}: {[d.name for d in rf]}"
            )
        self.rf = rf[0] if rf else None
        self.corrector_names = [d.name for d in self.magnets if d.kind == "corrector"]
        # calibrations, vectorized where linear
        n = len(self.magnets)
        self._lin = np.zeros(n, dtype=bool)
        self._lin_gain = np.ones(n)
        self._lin_offset = np.zeros(n)
        self._hyst_half = np.zeros(n)  # half backlash width (A), 0: no hysteresis
        for i, d in enumerate(self.magnets):
            cal = d.calibration
            if cal is not None and cal.type == "linear":
                self._lin[i] = True
                self._lin_gain[i] = cal.gain * cal.factor
                self._lin_offset[i] = cal.offset * cal.factor
            if cal is not None and cal.hysteresis is not None:
                self._hyst_half[i] = 0.5 * cal.hysteresis.width
        self._hyst = np.flatnonzero(self._hyst_half > 0)
        self._hyst_frozen = False
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []
        self._group_of = np.full(n, -1, dtype=np.int64)
        for ct in description.crosstalk:
            members = np.array([self.magnet_index[m] for m in ct.devices], dtype=np.int64)
            self._group_of[members] = len(self._groups)
            self._groups.append((members, np.asarray(ct.matrix, dtype=float)))
        self._drift_rate = 0.0
        self._drift_velocity: np.ndarray | None = None
        self._drift_count = 0
        self.circumference_error_m = 0.0
        self.reset(seed)

    # -- construction ------------------------------------------------------------------------
    def reset(self, seed: int, now: float | None = None) -> None:
        """New errors from ``seed`` on a fresh lattice, design setpoints, beam refilled.

        Drift stops. Hardware values go back to :attr:`design_hardware`.
        """
        now = time.time() if now is None else now
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        ring = build_lattice(self.description)
        quad_el = sorted({e for d in self.magnets if d.kind == "quadrupole" for e in d.elements})
        sext_el = sorted({e for d in self.magnets if d.kind == "sextupole" for e in d.elements})
        self.seed = int(seed)
        self.errors: TwinErrors = draw_errors(
            self.error_model,
            self.seed,
            quad_elements=np.array(quad_el, dtype=np.int64),
            sext_elements=np.array(sext_el, dtype=np.int64),
            bpm_names=self.bpm_names,
            bpm_elements=self.bpm_elements,
            corrector_names=self.corrector_names,
        )
        self.design_hardware = self._design_hardware(ring)
        self._misalign(ring)
        self._add_apertures(ring)
        self.ring = ring
        self._targets = self._build_targets(ring)
        self._nominal = np.zeros(len(self.magnets))
        self._beam_strength = np.zeros(len(self.magnets))
        self._hardware = np.full(len(self.magnets), np.nan)
        self._backlash = np.full(len(self.magnets), np.nan)  # play-operator state (A)
        self._pending_kicks: dict[int, np.ndarray] = {}
        self._cavities = list(self.rf.elements) if self.rf is not None else []
        self.design_rf_frequency = (
            float(ring[self._cavities[0]].Frequency) if self._cavities else float("nan")
        )
        self.design_rf_voltage = float(sum(ring[i].Voltage for i in self._cavities))
        self.rf_frequency = self.design_rf_frequency
        self.rf_voltage = self.design_rf_voltage
        self.circumference_error_m = 0.0
        self.dct = self._dct(self.rf_frequency)
        self.solver = ClosedOrbitSolver(ring, self.bpm_elements)
        self._noise_rng = np.random.default_rng([self.seed, 0xB0B])
        self._drift_rate = 0.0
        self._drift_velocity = None
        self._drift_count = 0
        self._drift_time = now
        self._orbit: np.ndarray | None = None  # (n, 2) m at the BPMs, None: no closed orbit
        self._orbit_reason = ""
        self._orbit_dirty = True
        self._optics_dirty = True
        self._good: tuple[np.ndarray, float] | None = None  # settings of the last orbit found
        self._tune = np.zeros(2)
        self._tune_optics_stale = True
        self._tune_orbit_stale = True
        self._beam_on = True
        self._loss_reason = ""
        self._fill_time = now
        self._fill_current = self.beam_settings.current_ma
        self.bad_bpms = {}
        self.last_shot = {}
        self._resets += 1
        self._tbt_rng = np.random.default_rng([self.seed, 0x7B7])
        self.set_magnets(self.design_hardware)

    def _design_hardware(self, ring: at.Lattice) -> np.ndarray:
        """Hardware values that give the lattice's design strengths (calibration inverse)."""
        energy = self.description.machine.energy_ev
        if energy is not None and abs(float(ring.energy) - energy) > 1e-9 * energy:
            raise ValueError(
                f"machine.energy_ev {energy:.9g} eV of the description differs from the "
                f"lattice's energy {float(ring.energy):.9g} eV (Brho of the calibrations)"
            )
        strengths = np.empty(len(self.magnets))
        for i, d in enumerate(self.magnets):
            assert d.field is not None
            name, k = parse_field(d.field)
            value = getattr(ring[d.elements[0]], name)
            strengths[i] = float(value if k is None else value[k])
        nominal = strengths.copy()
        for members, matrix in self._groups:
            nominal[members] = np.linalg.solve(matrix, strengths[members])
        hardware = np.empty(len(self.magnets))
        for i, d in enumerate(self.magnets):
            assert d.calibration is not None
            hardware[i] = float(d.calibration.to_hardware(nominal[i]))
        return hardware

    def _misalign(self, ring: at.Lattice) -> None:
        """Shift and roll quadrupoles and sextupoles (pyAT ``transform_elem`` semantics).

        Every such element gets ``T1``/``T2``/``R1``/``R2`` arrays, even when its errors are
        zero, so that drift can later move it in place.
        """
        e = self.errors
        for elems, shifts, rolls in (
            (e.quad_elements, e.quad_shift_m, e.quad_roll_rad),
            (e.sext_elements, e.sext_shift_m, e.sext_roll_rad),
        ):
            for i, (dx, dy), roll in zip(elems, shifts, rolls, strict=True):
                at.transform_elem(ring[i], dx=float(dx), dy=float(dy), tilt=float(roll))
        for i in e.quad_elements:
            for attr in ("T1", "T2", "R1", "R2"):
                setattr(ring[i], attr, np.ascontiguousarray(getattr(ring[i], attr), dtype=float))

    def _add_apertures(self, ring: at.Lattice) -> None:
        """Give every element an elliptic aperture, unless the lattice has apertures already."""
        if any(hasattr(e, "EApertures") or hasattr(e, "RApertures") for e in ring):
            return
        a = self.beam_settings.aperture_m
        for elem in ring:
            elem.EApertures = np.array([a, a])

    def _build_targets(self, ring: at.Lattice) -> list[list[_Target]]:
        grad = dict(
            zip(self.errors.quad_elements.tolist(), self.errors.quad_gradient_rel, strict=True)
        )
        cor = dict(zip(self.errors.corrector_names, self.errors.corrector_gain_rel, strict=True))
        targets: list[list[_Target]] = []
        for d in self.magnets:
            assert d.field is not None
            name, k = parse_field(d.field)
            if k is None:
                raise ValueError(f"device {d.name}: magnet field {d.field!r} has no index")
            scale = 1.0 + float(cor.get(d.name, 0.0))
            row = []
            for el in d.elements:
                arr = getattr(ring[el], name)
                if not (isinstance(arr, np.ndarray) and arr.dtype == np.float64):
                    arr = np.ascontiguousarray(arr, dtype=float)
                    setattr(ring[el], name, arr)
                s = scale
                if d.kind == "quadrupole" and name == "PolynomB" and k == 1:
                    s *= 1.0 + float(grad.get(el, 0.0))
                row.append(_Target(el, arr, k, s, kick=name == "KickAngle"))
            targets.append(row)
        return targets

    def _dct(self, frequency_hz: float) -> float:
        """Path lengthening (m) of the closed orbit, relative to the true ring's design orbit.

        The true ring is ``circumference_error_m`` longer than the lattice: the beam's path at
        ``frequency_hz`` is ``h c / f``, so the lattice's orbit is lengthened by that minus
        ``C + circumference_error_m``.
        """
        if not self._cavities:
            return 0.0
        return float(dct_for_frequency(self.ring, frequency_hz)) - self.circumference_error_m

    def set_circumference_error(self, dl_m: float) -> None:
        """Make the true ring ``dl_m`` (m) longer than its lattice (0: as designed).

        The design RF frequency then no longer centres the beam energy; the orbit is
        recomputed at the served frequency. :meth:`reset` sets it back to 0.
        """
        if not np.isfinite(dl_m) or abs(dl_m) > 0.1:
            raise ValueError(f"circumference error must be finite and within 0.1 m, got {dl_m!r}")
        if not self._cavities:
            raise ValueError(f"machine {self.description.machine.name!r} has no RF cavity")
        self.circumference_error_m = float(dl_m)
        self.dct = self._dct(self.rf_frequency)
        self._orbit_dirty = True
        self._tune_optics_stale = True

    def energy_offset(self) -> float:
        """The beam's true relative energy offset at the served RF frequency (pyAT ``dp``)."""
        orbit, _ = at.find_orbit4(self.ring, dct=self.dct)
        return float(orbit[4])

    def centred_rf_frequency(self) -> float:
        """The RF frequency (Hz) at which the beam's energy offset is zero.

        The closed orbit at ``dp = 0`` with the present magnets and errors has its own path
        lengthening (tracked over one turn); the frequency whose path ``h c / f`` equals the
        true ring's length plus it centres the energy.
        """
        orbit, _ = at.find_orbit4(self.ring, dp=0.0)
        out = at.lattice_pass(self.ring, orbit.reshape(6, 1).copy(), 1)
        dct0 = float(np.squeeze(out)[5] - orbit[5])
        return float(frequency_for_dct(self.ring, dct0 + self.circumference_error_m))

    # -- inputs ------------------------------------------------------------------------------
    @property
    def hardware(self) -> np.ndarray:
        """Hardware values currently applied to the magnets (A), in :attr:`magnet_names` order."""
        return self._hardware.copy()

    def set_magnets(self, hardware: Sequence[float] | np.ndarray) -> int:
        """Apply magnet readbacks (A, one per :attr:`magnet_names`); only changes cost time.

        Returns:
            The number of magnets whose value changed.
        """
        h = np.asarray(hardware, dtype=float)
        if h.shape != self._hardware.shape:
            raise ValueError(f"set_magnets: expected {len(self._hardware)} values, got {h.shape}")
        if not np.all(np.isfinite(h)):
            bad = [self.magnet_names[i] for i in np.flatnonzero(~np.isfinite(h))[:5]]
            raise ValueError(f"set_magnets: non-finite values for {bad}")
        changed = np.flatnonzero(h != self._hardware)
        if changed.size == 0:
            return 0
        self._hardware[changed] = h[changed]
        x = self._on_calibrated_branch(changed, h)
        lin = self._lin[changed]
        self._nominal[changed[lin]] = (
            self._lin_gain[changed[lin]] * x[lin] + self._lin_offset[changed[lin]]
        )
        for i, xi in zip(changed[~lin].tolist(), x[~lin].tolist(), strict=True):
            cal = self.magnets[i].calibration
            assert cal is not None
            self._nominal[i] = float(cal.to_strength(xi))
        affected = changed
        self._beam_strength[changed] = self._nominal[changed]
        groups = np.unique(self._group_of[changed])
        groups = groups[groups >= 0]
        if groups.size:
            extra = []
            for g in groups:
                members, matrix = self._groups[g]
                self._beam_strength[members] = matrix @ self._nominal[members]
                extra.append(members)
            affected = np.union1d(changed, np.concatenate(extra))
        pending = self._pending_kicks
        optics = False
        for i in affected.tolist():
            value = self._beam_strength[i]
            for t in self._targets[i]:
                new = value * t.scale
                if t.kick:
                    dk = pending.get(t.element)
                    if dk is None:
                        dk = pending[t.element] = np.zeros(2)
                    dk[t.index] += new - t.array[t.index]
                else:
                    optics = True
                t.array[t.index] = new
        self._orbit_dirty = True
        self._tune_orbit_stale = True
        if optics:
            self._optics_dirty = True
            self._tune_optics_stale = True
        return int(changed.size)

    def _on_calibrated_branch(self, changed: np.ndarray, h: np.ndarray) -> np.ndarray:
        """Hardware values of magnets ``changed`` on their calibration curve (hysteresis).

        A magnet with hysteresis of width ``w`` keeps the output ``y`` of a play operator of
        half-width ``r = w / 2``: ``y = clip(y, h - r, h + r)`` at each new current ``h``.
        Its true strength is the calibration (the descending branch) at ``y - r``: ``h`` on a
        descending approach, ``h - w`` on an ascending one. The state starts unknown after a
        reset ("after a power cut"), taken as ascending: ``y = h - r``. While the orbit solver
        approaches new settings in steps, the state is frozen (the steps are not a path the
        magnets take).
        """
        x = h[changed].copy()
        if self._hyst.size == 0:
            self._backlash[changed] = x
            return x
        r = self._hyst_half[changed]
        prev = self._backlash[changed]
        y = np.where(np.isnan(prev), x - r, np.clip(prev, x - r, x + r))
        if not self._hyst_frozen:
            self._backlash[changed] = y
        return y - r

    @property
    def effective_hardware(self) -> np.ndarray:
        """Currents (A) on the calibration curve that give the true strengths (hysteresis).

        Equal to :attr:`hardware` for magnets without hysteresis and for magnets on the
        descending branch; ``hardware - width`` on the ascending branch.
        """
        return self._backlash - self._hyst_half

    def set_rf(self, frequency_hz: float | None = None, voltage_v: float | None = None) -> None:
        """Set the RF frequency (Hz) and/or the total voltage (V, shared equally by cavities)."""
        if self.rf is None:
            raise ValueError(f"machine {self.description.machine.name!r} has no RF device")
        if frequency_hz is not None and frequency_hz != self.rf_frequency:
            dct = self._dct(float(frequency_hz))  # raises on a bad frequency
            self.rf_frequency = float(frequency_hz)
            for i in self._cavities:
                self.ring[i].Frequency = self.rf_frequency
            self.dct = dct
            self._orbit_dirty = True
            self._tune_optics_stale = True
        if voltage_v is not None and voltage_v != self.rf_voltage:
            if not np.isfinite(voltage_v) or voltage_v < 0:
                raise ValueError(f"RF voltage must be finite and >= 0, got {voltage_v!r} V")
            self.rf_voltage = float(voltage_v)
            for i in self._cavities:
                self.ring[i].Voltage = self.rf_voltage / len(self._cavities)

    def set_noise(self, on: bool) -> None:
        """Turn BPM and tune noise on or off."""
        self.noise = bool(on)

    # -- beam --------------------------------------------------------------------------------
    @property
    def has_beam(self) -> bool:
        """Whether there is beam (it stays lost until :meth:`refill`)."""
        return self._beam_on

    @property
    def loss_reason(self) -> str:
        """Why the beam was lost ("" while there is beam)."""
        return self._loss_reason

    def kill_beam(self, reason: str = "beam killed by the twin's control") -> None:
        """Dump the beam: current 0, BPM readings invalid, until :meth:`refill`."""
        if self._beam_on:
            _log.info("beam lost: %s", reason)
        self._beam_on = False
        self._loss_reason = reason

    def refill(self, now: float | None = None) -> None:
        """Inject to :attr:`BeamSettings.current_ma`; lost again at once if no orbit exists."""
        self._beam_on = True
        self._loss_reason = ""
        self._fill_time = time.time() if now is None else now
        self._fill_current = self.beam_settings.current_ma
        self._tune_orbit_stale = True

    def current_ma(self, now: float) -> float:
        """Stored current at ``now`` (mA)."""
        if not self._beam_on:
            return 0.0
        dt = max(0.0, now - self._fill_time)
        return float(self._fill_current * np.exp(-dt / (3600.0 * self.beam_settings.lifetime_h)))

    # -- drift -------------------------------------------------------------------------------
    @property
    def drift_rate(self) -> float:
        """Speed of the quadrupole drift (m/s rms per plane), 0 when still."""
        return self._drift_rate

    def inject_drift(self, rate_m_per_s: float, now: float | None = None) -> None:
        """Make the quadrupoles move slowly, as ground motion and thermal drift do.

        From ``now`` on, every quadrupole moves at a constant velocity, drawn per plane from a
        Gaussian of rms ``rate_m_per_s`` (seeded by the error seed and the number of calls), on
        top of its misalignment; the orbit follows at every model tick. ``0`` stops the motion
        where it is. :meth:`reset` puts the quadrupoles back to their seeded misalignment.

        Args:
            rate_m_per_s: rms speed per plane (m/s), >= 0.
            now: time (s, epoch) the new motion starts.
        """
        if not np.isfinite(rate_m_per_s) or rate_m_per_s < 0:
            raise ValueError(f"drift rate must be finite and >= 0, got {rate_m_per_s!r} m/s")
        now = time.time() if now is None else now
        self._advance_drift(now)
        self._drift_rate = float(rate_m_per_s)
        if self._drift_rate == 0.0:
            self._drift_velocity = None
            return
        self._drift_count += 1
        rng = np.random.default_rng([self.seed, 0xD41F7, self._drift_count])
        self._drift_velocity = self._drift_rate * rng.standard_normal(
            (len(self.errors.quad_elements), 2)
        )

    def _advance_drift(self, now: float) -> None:
        dt = now - self._drift_time
        self._drift_time = now
        if self._drift_velocity is None or dt <= 0:
            return
        shift = self.errors.quad_shift_m
        shift += self._drift_velocity * dt
        for i, (dx, dy) in zip(self.errors.quad_elements.tolist(), shift, strict=True):
            elem = self.ring[i]
            # at.shift_elem of a straight element about its centre: T1 = -T2 = -(dx, 0, dy, ...);
            # written in place so that the reused C lattice sees it
            elem.T1[0], elem.T1[2] = -dx, -dy
            elem.T2[0], elem.T2[2] = dx, dy
        self._orbit_dirty = True
        self._tune_orbit_stale = True

    # -- computation -------------------------------------------------------------------------
    @property
    def tune_stale(self) -> bool:
        """Whether the tunes have not been recomputed since the last change."""
        return self._tune_optics_stale or self._tune_orbit_stale

    def compute(self, now: float | None = None, *, refresh_tune: bool = False) -> Frame:
        """Recompute what changed and return what the diagnostics read at ``now``.

        The closed orbit is solved only if something changed since the last computation (new
        noise is drawn every time). Tunes are recomputed after optics or RF changes, and after
        orbit-only changes when ``refresh_tune`` is true.

        Args:
            now: time of the readbacks used (s, epoch); drift and current decay use it.
            refresh_tune: also recompute tunes that only the orbit made stale.
        """
        t0 = time.perf_counter()
        now = time.time() if now is None else now
        self._advance_drift(now)
        solved = False
        if self._orbit_dirty:
            solved = True
            self._solve()
        if self._orbit is None and self._beam_on:
            self.kill_beam(f"no closed orbit: {self._orbit_reason}")
        if self._beam_on and (self._tune_optics_stale or (refresh_tune and self._tune_orbit_stale)):
            self._compute_tune()
        return self._frame(now, solved, time.perf_counter() - t0)

    def _solve(self) -> None:
        """Closed orbit after the changes; if none is found, approach the new settings in steps.

        The tracker enforces the apertures, so a Newton iterate far from the solution can be
        lost although a closed orbit exists. On failure, the change since the last good orbit
        is applied in fractions (a continuation): the beam is lost only if no path of small
        steps reaches the new settings.
        """
        self._orbit_dirty = False
        if self._solve_once(self.dct):
            return
        good = self._good
        if good is None:
            return
        self._hyst_frozen = True
        try:
            self._continue_to(good)
        finally:
            self._hyst_frozen = False

    def _continue_to(self, good: tuple[np.ndarray, float]) -> None:
        """Approach the present settings from the ``good`` ones in steps (see :meth:`_solve`)."""
        good_h, good_dct = good
        target_h, target_dct = self._hardware.copy(), self.dct
        reason = self._orbit_reason
        lo, step = 0.0, 0.5
        while step >= 1.0 / 64:
            frac = min(1.0, lo + step)
            if frac == 1.0:
                self.set_magnets(target_h)
                dct = target_dct
            else:
                self.set_magnets(good_h + frac * (target_h - good_h))
                dct = good_dct + frac * (target_dct - good_dct)
            if self._solve_once(dct):
                lo = frac
                if lo == 1.0:
                    self._orbit_dirty = False
                    return
                step *= 2.0
            else:
                step /= 2.0
        self.set_magnets(target_h)
        self._orbit = None
        self._orbit_reason = reason
        self._orbit_dirty = False  # nothing changed since this failure: do not retry each tick

    def _solve_once(self, dct: float) -> bool:
        if self._optics_dirty:
            self.solver.invalidate(lattice=False)
        kicks = None
        if self._pending_kicks and not self._optics_dirty:
            elems = np.fromiter(self._pending_kicks, dtype=np.int64)
            kicks = (elems, np.array(list(self._pending_kicks.values())))
        self._optics_dirty = False
        try:
            orbit = self.solver.solve(dct, kick_changes=kicks)
        except NoClosedOrbit as exc:
            self._orbit = None
            self._orbit_reason = str(exc)
            return False
        self._pending_kicks = {}
        xy = orbit[:, (0, 2)]
        if not np.all(np.isfinite(xy)):
            self._orbit = None
            self._orbit_reason = "the orbit is not finite"
            return False
        a = self.beam_settings.aperture_m
        outside = np.flatnonzero(np.any(np.abs(xy) > a, axis=1))
        if outside.size:
            self._orbit = None
            self._orbit_reason = (
                f"orbit beyond the {a * 1e3:g} mm aperture at {self.bpm_names[outside[0]]}"
            )
            return False
        self._orbit = xy
        self._orbit_reason = ""
        self._good = (self._hardware.copy(), dct)
        return True

    def _compute_tune(self) -> None:
        self._tune_optics_stale = False
        self._tune_orbit_stale = False
        try:
            lin = self.solver.linearize([len(self.ring)])
            m44 = lin.one_turn[:4, :4]
            vals = np.linalg.eigvals(m44)
            if np.any(np.abs(np.abs(vals) - 1.0) > 1e-6):
                raise NoClosedOrbit("unstable optics (one-turn eigenvalues off the unit circle)")
            _, modes = at.physics.a_matrix(m44)
            tune = np.mod(np.angle(modes) / (2 * np.pi), 1.0)
        except (NoClosedOrbit, ValueError, np.linalg.LinAlgError) as exc:
            self._tune = np.zeros(2)
            self.kill_beam(f"no stable optics: {exc}")
            return
        if not np.all(np.isfinite(tune)):
            self._tune = np.zeros(2)
            self.kill_beam("no stable optics: tunes are not finite")
            return
        self._tune = np.asarray(tune, dtype=float)[:2]

    def _frame(self, now: float, solved: bool, elapsed: float) -> Frame:
        n = len(self.bpms)
        if not self._beam_on or self._orbit is None:
            zeros = np.zeros(n)
            return Frame(
                x_mm=zeros,
                y_mm=zeros.copy(),
                valid=np.zeros(n, dtype=np.int32),
                beam_m=np.zeros((n, 2)),
                current_ma=0.0,
                lifetime_h=0.0,
                tune=np.zeros(2),
                beam=False,
                loss_reason=self._loss_reason or "no beam",
                dct_m=self.dct,
                solved=solved,
                compute_s=elapsed,
            )
        e = self.errors
        noise: np.ndarray | float = 0.0
        tune = self._tune.copy()
        if self.noise and e.model.bpm_noise_m > 0:
            noise = self._noise_rng.normal(0.0, e.model.bpm_noise_m, (n, 2))
        if self.noise and e.model.tune_noise > 0:
            tune = np.mod(tune + self._noise_rng.normal(0.0, e.model.tune_noise, 2), 1.0)
        reading = bpm_readings(self._orbit, e.bpm_offset_m, e.bpm_gain, e.bpm_roll_rad, noise)
        if not np.all(np.isfinite(reading)):
            self.kill_beam("BPM readings are not finite")
            return self._frame(now, solved, elapsed)
        valid = np.ones(n, dtype=np.int32)
        if self.bad_bpms:
            reading = self._spoil(reading[:, :, None], self._noise_rng)[:, :, 0]
            for name, (kind, _) in self.bad_bpms.items():
                if kind == "dead":
                    valid[self.bpm_names.index(name)] = 0
        return Frame(
            x_mm=reading[:, 0] * 1e3,
            y_mm=reading[:, 1] * 1e3,
            valid=valid,
            beam_m=self._orbit.copy(),
            current_ma=self.current_ma(now),
            lifetime_h=self.beam_settings.lifetime_h,
            tune=tune,
            beam=True,
            loss_reason="",
            dct_m=self.dct,
            solved=solved,
            compute_s=elapsed,
        )

    # -- turn by turn -----------------------------------------------------------------------
    def set_bad_bpm(self, name: str, kind: str, value: float = 0.0) -> None:
        """Make BPM ``name`` bad (:data:`~accplans.sim._tbt.BAD_BPM_KINDS`), or ``"good"`` again.

        Applies to its turn-by-turn buffers and to its closed-orbit readings (a dead BPM's
        orbit reading is invalid). :meth:`reset` makes every BPM good.

        Args:
            name: BPM device name.
            kind: ``"dead"``, ``"noisy"`` (value: rms noise, m), ``"gain"`` (value: factor),
                ``"swapped"`` (x and y exchanged) or ``"good"``.
            value: the kind's parameter.
        """
        if name not in self.bpm_names:
            raise ValueError(f"set_bad_bpm: no BPM named {name!r}")
        if kind == "good":
            self.bad_bpms.pop(name, None)
            return
        if kind not in BAD_BPM_KINDS:
            raise ValueError(
                f"set_bad_bpm: kind must be 'good' or one of {sorted(BAD_BPM_KINDS)}, got {kind!r}"
            )
        value = float(value)
        if not np.isfinite(value) or (kind == "noisy" and value < 0):
            raise ValueError(f"set_bad_bpm: bad value {value!r} for a {kind} BPM")
        self.bad_bpms[name] = (kind, value)

    def _spoil(self, reading: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply the bad BPMs to readings of shape (n_bpm, 2, turns) (m); returns a copy."""
        out = reading.copy()
        for name, (kind, value) in self.bad_bpms.items():
            i = self.bpm_names.index(name)
            if kind == "dead":
                out[i] = 0.0
            elif kind == "noisy":
                out[i] += rng.normal(0.0, value, out[i].shape)
            elif kind == "gain":
                out[i] *= value
            elif kind == "swapped":
                out[i] = out[i, ::-1].copy()
        return out

    def tbt_request(self, kick_x_rad: float, kick_y_rad: float, turns: int) -> ShotRequest:
        """A pinger shot of the present machine, for :func:`~accplans.sim._tbt.track_shot`.

        The true lattice is pickled now: the worker tracks the machine as it was at the shot.
        """
        import pickle

        turns = int(turns)
        if not 1 <= turns <= self.tbt_settings.max_turns:
            raise ValueError(f"turns must be in [1, {self.tbt_settings.max_turns}], got {turns}")
        for k in (kick_x_rad, kick_y_rad):
            if not np.isfinite(k):
                raise ValueError(f"pinger kick must be finite, got {k!r}")
        return ShotRequest(
            ring_pickle=pickle.dumps(self.ring, protocol=pickle.HIGHEST_PROTOCOL),
            bpm_elements=self.bpm_elements.copy(),
            dct_m=self.dct,
            kick_rad=(float(kick_x_rad), float(kick_y_rad)),
            turns=turns,
            cache_key=(self.description.config_hash, self.seed, self._resets),
            settings=self.tbt_settings,
        )

    def tbt_readings(self, shot: ShotResult) -> tuple[np.ndarray, np.ndarray]:
        """What the BPMs' TbT buffers read for a tracked shot: ``(x, y)`` (n_bpm, turns) (m).

        The closed-orbit reading model (gain, roll, offset) at every turn, the TbT noise, the
        bad BPMs. Without beam, zeros; a particle lost during the shot dumps the beam and
        the buffers read 0 from that turn on.
        """
        n, turns = len(self.bpms), shot.beam_m.shape[2]
        self.last_shot = dict(shot.info)
        if not self._beam_on:
            return np.zeros((n, turns)), np.zeros((n, turns))
        beam = np.nan_to_num(shot.beam_m.transpose(1, 2, 0).reshape(n * turns, 2), nan=0.0)
        e = self.errors
        reading = bpm_readings(
            beam,
            np.repeat(e.bpm_offset_m, turns, axis=0),
            np.repeat(e.bpm_gain, turns, axis=0),
            np.repeat(e.bpm_roll_rad, turns),
        )
        reading = reading.reshape(n, turns, 2).transpose(0, 2, 1)  # (n, 2, turns)
        if self.noise and self.tbt_settings.noise_m > 0:
            reading = reading + self._tbt_rng.normal(0.0, self.tbt_settings.noise_m, reading.shape)
        if self.bad_bpms:
            reading = self._spoil(reading, self._tbt_rng)
        if shot.lost_turn >= 0:
            reading[:, :, shot.lost_turn :] = 0.0
            self.kill_beam(f"beam lost at turn {shot.lost_turn} after the pinger kick")
        return reading[:, 0, :], reading[:, 1, :]

    # -- truth -------------------------------------------------------------------------------
    def truth(self) -> Truth:
        """The twin's truth: a copy of the true lattice and every injected error."""
        from ._truth import Truth

        e = self.errors
        meta: dict[str, Any] = {
            "machine": self.description.machine.name,
            "machine_id": self.description.machine.id,
            "prefix": self.description.machine.prefix,
            "config_hash": self.description.config_hash,
            "seed": self.seed,
            "error_model": self.error_model.to_dict(),
            "noise": self.noise,
            "rf_frequency_hz": self.rf_frequency,
            "rf_voltage_v": self.rf_voltage,
            "dct_m": self.dct,
            "circumference_error_m": self.circumference_error_m,
            "beam": self._beam_on,
            "loss_reason": self._loss_reason,
            "drift_rate_m_per_s": self._drift_rate,
            "bad_bpms": {k: list(v) for k, v in self.bad_bpms.items()},
            "tbt_last_shot": self.last_shot,
            "time": time.time(),
        }
        arrays = {
            f.name: np.array(getattr(e, f.name))
            for f in dataclasses.fields(e)
            if f.name not in ("seed", "model")
        }
        arrays["magnet_names"] = np.array(self.magnet_names)
        arrays["magnet_hardware"] = self._hardware.copy()
        arrays["magnet_scale"] = np.array([t[0].scale for t in self._targets])
        arrays["magnet_effective_hardware"] = self.effective_hardware
        arrays["magnet_hysteresis_width"] = 2.0 * self._hyst_half
        try:  # the beam's true energy offset and the RF frequency that centres it
            meta["energy_offset"] = self.energy_offset()
            meta["centred_rf_frequency_hz"] = self.centred_rf_frequency()
        except Exception as exc:  # no closed orbit: the truth says so
            meta["energy_offset"] = meta["centred_rf_frequency_hz"] = float("nan")
            _log.warning("truth: no energy offset or centred RF frequency (%s)", exc)
        ring = self.ring.deepcopy()
        # drift writes T1/T2 in place for the C tracker; pyAT also keeps the shifts it made
        # (and rebuilds T1/T2 from them when a lattice is saved and loaded): set them too
        for i, (dx, dy) in zip(e.quad_elements.tolist(), e.quad_shift_m, strict=True):
            at.shift_elem(ring[i], dx=float(dx), dy=float(dy))
        return Truth(ring=ring, meta=meta, arrays=arrays)

    def emittances(self, source_element: int = 0) -> EmittanceResult:
        """Equilibrium emittances and beam sizes of the true lattice now (pyAT, ~1 s on EBS).

        What the emittance monitor serves, without its noise (see :mod:`accplans.sim._emittance`).
        """
        from ._emittance import EmittanceSettings, compute_emittances, emittance_request

        settings = EmittanceSettings(source_element=source_element)
        return compute_emittances(emittance_request(self, settings))

    def c_minus(self) -> float:
        """``|C-|`` of the true lattice at the served RF frequency (closest tune approach)."""
        from ._emittance import true_c_minus

        return true_c_minus(self.ring, self.dct)

    def export_truth(self, directory: str | Path) -> Path:
        """Write the truth to ``directory`` (see :class:`~accplans.sim.Truth`); return it."""
        return self.truth().save(directory)
