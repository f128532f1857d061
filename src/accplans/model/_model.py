"""The online model: the description's pyAT lattice, set from live readbacks through calibrations.

:class:`OnlineModel` holds a fresh lattice built from a machine description
(:func:`accplans.config.build_lattice`) and the hardware value (A, Hz) of every settable device.
Hardware values go to the lattice through each device's calibration and, for multi-channel
magnets, the description's cross-talk matrices. Everything is computed at the fixed RF
frequency (never at dp = 0): closed orbit, ORM with its RF column, dispersion, optics, tunes,
chromaticity and their responses to knobs. It is never the twin's truth: it only knows what the
description and the readbacks say.

Long computations are pure functions of the model's state (no asyncio, no I/O); plans run them
in a worker process. An :class:`OnlineModel` pickles as its description and the hardware values
set on it, and rebuilds its lattice on unpickling.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import at
import numpy as np
from at.constants import clight

from ..config import CrosstalkSpec, DeviceSpec, MachineDescription, build_lattice, parse_field
from ._orbit import ClosedOrbitSolver, Linearization, dct_for_frequency
from ._orm import FieldDrive, OrbitResponse, _rows, exact_response

__all__ = ["OnlineModel", "Optics", "UnstableMotion"]

_MAGNETS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")
#: momentum step of the chromaticity (pyAT's DPStep)
_DP_STEP = 3e-6
#: relative knob step of the tune and chromaticity responses
_REL_STEP = 1e-4


class UnstableMotion(RuntimeError):
    """The closed orbit exists but linear motion around it is unstable: no tunes, no optics."""


@dataclass(frozen=True)
class Optics:
    """Linear optics at the fixed RF frequency (pyAT ``linopt6`` at the model's closed orbit).

    Attributes:
        refpts: (n,) element indices (values at each element's entrance).
        s: (n,) longitudinal position [m].
        beta: (n, 2) beta functions [m] (normal modes, ~ x and y).
        alpha: (n, 2) alpha functions.
        mu: (n, 2) betatron phase advance from the ring entrance [rad].
        dispersion: (n, 4) ``(Dx [m], Dx', Dy [m], Dy')``, d orbit / d delta.
        closed_orbit: (n, 6) closed orbit ``(x [m], px, y [m], py, delta, ct [m])``.
        tunes: (2,) fractional tunes.
        rf_frequency: RF frequency [Hz] the optics was computed at.
    """

    refpts: np.ndarray
    s: np.ndarray
    beta: np.ndarray
    alpha: np.ndarray
    mu: np.ndarray
    dispersion: np.ndarray
    closed_orbit: np.ndarray
    tunes: np.ndarray
    rf_frequency: float


@dataclass(frozen=True)
class _Magnet:
    spec: DeviceSpec
    drives: tuple[FieldDrive, ...]  # the fields this device's strength is written to
    group: tuple[str, ...]  # the devices of its cross-talk group (itself alone if none)
    crosstalk: CrosstalkSpec | None


def _tunes_of(one_turn: np.ndarray) -> np.ndarray:
    try:
        _, vps = at.a_matrix(one_turn[:4, :4])
    except at.AtError as exc:
        raise UnstableMotion(f"linear motion is unstable at the current settings: {exc}") from None
    return np.mod(np.angle(vps) / (2.0 * np.pi), 1.0)


def _wrap(dq: np.ndarray) -> np.ndarray:
    """Tune differences folded into [-0.5, 0.5)."""
    return (dq + 0.5) % 1.0 - 0.5


class OnlineModel:
    """The online model of one machine (see the module docstring).

    Args:
        description: the machine description; the lattice is ``build_lattice(description)``.
            It needs exactly one ``rf`` device (the model computes at its frequency).

    Attributes:
        description: the machine description.
        lattice: the model's pyAT lattice (4D). Change it through :meth:`set_hardware`; direct
            changes are not seen by the cached closed orbit and are lost on pickling.
    """

    def __init__(self, description: MachineDescription) -> None:
        self.description = description
        self.lattice = build_lattice(description)
        ring = self.lattice
        magnets: dict[str, _Magnet] = {}
        owner: dict[tuple[int, str, int], str] = {}
        for dev in description.devices:
            if dev.kind not in _MAGNETS:
                continue
            assert dev.field is not None  # checked by the description
            attr, index = parse_field(dev.field)
            if index is None:
                raise ValueError(
                    f"device {dev.name}: field {dev.field!r} is not an array field; a magnet "
                    "drives KickAngle[i], PolynomB[n] or PolynomA[n]"
                )
            drives = []
            for e in dev.elements:
                key = (e, attr, index)
                if key in owner:
                    raise ValueError(
                        f"devices {owner[key]} and {dev.name} both drive {attr}[{index}] of "
                        f"element {e}: the online model needs one device per lattice field"
                    )
                owner[key] = dev.name
                drive = FieldDrive(e, attr, index)
                arr = getattr(ring[e], attr, None)
                if not isinstance(arr, np.ndarray) or arr.dtype != np.float64 or arr.size <= index:
                    raise ValueError(
                        f"device {dev.name}: element {e} has no float64 {attr}[{index}]"
                    )
                drives.append(drive)
            ct = description.crosstalk_of(dev.name)
            group = tuple(ct.devices) if ct is not None else (dev.name,)
            magnets[dev.name] = _Magnet(dev, tuple(drives), group, ct)
        self._magnets = magnets
        for m in magnets.values():
            strangers = [n for n in m.group if n not in magnets]
            if strangers:
                raise ValueError(
                    f"cross-talk of {m.spec.name}: {strangers} are not magnets; a cross-talk "
                    "matrix couples magnet channels only"
                )
        rfs = [d for d in description.devices if d.kind == "rf"]
        if len(rfs) != 1 or not rfs[0].elements:
            raise ValueError(
                f"machine {description.machine.name!r} has {len(rfs)} rf devices with cavities: "
                "the online model needs exactly one (it computes at the RF frequency)"
            )
        self._rf = rfs[0]
        self._rf_frequency = float(ring[self._rf.elements[0]].Frequency)
        self._harmonic = int(ring.harmonic_number)
        # nominal strengths (each device's calibration output) from the lattice's design values
        self._nominal: dict[str, float] = {}
        for m in magnets.values():
            if m.spec.name in self._nominal:
                continue
            beam = np.array([self._read(magnets[n].drives[0]) for n in m.group])
            nominal = m.crosstalk.invert(beam) if m.crosstalk is not None else beam
            self._nominal.update(zip(m.group, (float(v) for v in nominal), strict=True))
        self._hardware = {
            n: float(self._calibration(n).to_hardware(self._nominal[n])) for n in magnets
        }
        self._explicit: dict[str, float] = {}
        # BPMs, in family order, then any BPM outside families
        self._bpm_names = self._ordered("bpm")
        self._bpm_element = {n: description.device(n).elements[0] for n in self._bpm_names}
        self._bpm_row = {n: k for k, n in enumerate(self._bpm_names)}
        self._bpm_row_of_element = {self._bpm_element[n]: k for n, k in self._bpm_row.items()}
        self._corrector_names = self._ordered("corrector")
        self._solver = ClosedOrbitSolver(ring, [self._bpm_element[n] for n in self._bpm_names])
        self._orbit: np.ndarray | None = None  # (nbpm, 6) at the current settings
        self._pending_kicks: dict[int, np.ndarray] = {}

    # -- pickling: description + the hardware values set --------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"description": self.description, "hardware": dict(self._explicit)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["description"])
        if state["hardware"]:
            self.set_hardware(state["hardware"])

    # -- helpers -----------------------------------------------------------------------------
    def _ordered(self, kind: str) -> list[str]:
        names: list[str] = []
        for fam in self.description.families_of_kind(kind):  # type: ignore[arg-type]
            names += [n for n in self.description.family(fam).devices if n not in names]
        seen = set(names)
        names += [d.name for d in self.description.devices if d.kind == kind and d.name not in seen]
        return names

    def _calibration(self, name: str) -> Any:
        cal = self._magnets[name].spec.calibration
        assert cal is not None  # magnets have calibrations (checked by the description)
        return cal

    def _read(self, drive: FieldDrive) -> float:
        return float(getattr(self.lattice[drive.element], drive.attr)[drive.index])

    def _magnet(self, name: str) -> _Magnet:
        dev = self.description.device(name)
        if dev.kind not in _MAGNETS:
            raise ValueError(f"{name} is a {dev.kind}, not a magnet")
        return self._magnets[name]

    # -- settings ----------------------------------------------------------------------------
    @property
    def rf_frequency(self) -> float:
        """RF frequency [Hz] the model computes at (default: the lattice's cavity frequency)."""
        return self._rf_frequency

    @rf_frequency.setter
    def rf_frequency(self, value: float) -> None:
        self.set_hardware({self._rf.name: value})

    @property
    def dct(self) -> float:
        """Path lengthening [m] of the closed orbit at the RF frequency."""
        return dct_for_frequency(self.lattice, self._rf_frequency)

    def set_hardware(self, values: Mapping[str, float]) -> None:
        """Set devices to hardware values (A for magnets, Hz for the RF) and update the lattice.

        A magnet's value goes through its calibration to its nominal strength; the strengths
        the beam sees are the cross-talk matrix times the nominal strengths of its group (or the
        nominal strength if it has none), written to every element of the device (series
        powering). The RF device sets the RF frequency. Limits are not checked (the devices do
        that); every value is validated before anything changes.

        Raises:
            KeyError: unknown device.
            ValueError: a device without a setpoint (BPM, DCCT, tune), or a non-finite value.
        """
        checked: dict[str, float] = {}
        for name, value in values.items():
            dev = self.description.device(name)
            if dev.kind != "rf" and dev.kind not in _MAGNETS:
                raise ValueError(f"{name} is a {dev.kind}: it has no setpoint in the model")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: hardware value {value!r} is not a number") from None
            if not np.isfinite(v) or (dev.kind == "rf" and v <= 0.0):
                raise ValueError(f"{name}: hardware value {v!r} {dev.unit} is not valid")
            checked[name] = v
        for name, v in checked.items():
            self._explicit[name] = v
            if name == self._rf.name:
                self._rf_frequency = v
                for e in self._rf.elements:
                    self.lattice[e].Frequency = v  # IdentityPass in 4D: not seen by tracking
                self._orbit = None
            else:
                self._hardware[name] = v
                self._nominal[name] = float(self._calibration(name).to_strength(v))
        self._write({n for n in checked if n in self._magnets})

    def _write(self, names: set[str], deltas: Mapping[str, float] | None = None) -> None:
        """Write the beam strengths of the groups of ``names`` (nominal + ``deltas``)."""
        deltas = deltas or {}
        groups = {self._magnets[n].group for n in names}
        optics = False
        for group in groups:
            ct = self._magnets[group[0]].crosstalk
            nominal = np.array([self._nominal[n] + deltas.get(n, 0.0) for n in group])
            beam = ct.apply(nominal) if ct is not None else nominal
            for n, value in zip(group, beam, strict=True):
                for d in self._magnets[n].drives:
                    arr = getattr(self.lattice[d.element], d.attr)
                    old = float(arr[d.index])
                    if old == value:
                        continue
                    arr[d.index] = value  # in place: the reused C lattice sees it
                    if d.attr == "KickAngle":
                        kick = self._pending_kicks.setdefault(d.element, np.zeros(2))
                        kick[d.index] += value - old
                    elif d.index > 0:
                        optics = True
                    self._orbit = None
        if optics:
            self._solver.invalidate(lattice=False)
            self._pending_kicks.clear()
            self._orbit = None

    @contextmanager
    def _perturbed(self, deltas: Mapping[str, float]) -> Iterator[None]:
        """Nominal strengths changed by ``deltas`` inside the block, restored after."""
        names = set(deltas)
        self._write(names, deltas)
        try:
            yield
        finally:
            self._write(names)

    def hardware(self, name: str) -> float:
        """Current hardware value of a device (A, or Hz for the RF)."""
        if name == self._rf.name:
            return self._rf_frequency
        return self._hardware[self._magnet(name).spec.name]

    def hardware_values(self) -> dict[str, float]:
        """Hardware values of every settable device (magnets and RF)."""
        return {**self._hardware, self._rf.name: self._rf_frequency}

    def strength(self, name: str) -> float:
        """Current strength the beam sees in a device's field (rad, m^-n; Hz for the RF).

        With cross-talk this is the lattice value (matrix @ nominal), not the device's own
        calibrated strength; see :meth:`nominal_strength`.
        """
        if name == self._rf.name:
            return self._rf_frequency
        return self._read(self._magnet(name).drives[0])

    def nominal_strength(self, name: str) -> float:
        """The device's own calibrated strength (before cross-talk) [rad, m^-n]."""
        return self._nominal[self._magnet(name).spec.name]

    # -- closed orbit ------------------------------------------------------------------------
    def _ensure_orbit(self) -> np.ndarray:
        if self._orbit is None:
            kicks = None
            if self._pending_kicks:
                elems = np.fromiter(self._pending_kicks, dtype=np.int64)
                kicks = (elems, np.array([self._pending_kicks[e] for e in elems]))
            self._pending_kicks.clear()
            self._orbit = self._solver.solve(self.dct, kick_changes=kicks)
        return self._orbit

    def _select(self, names: Sequence[str] | None, kind: str, default: list[str]) -> list[str]:
        if names is None:
            return list(default)
        if isinstance(names, str):
            raise TypeError(f"give a sequence of {kind} names, not the string {names!r}")
        out = list(names)
        for n in out:
            dev = self.description.device(n)
            if dev.kind != kind:
                raise ValueError(f"{n} is a {dev.kind}, not a {kind}")
        return out

    def closed_orbit(self, bpms: Sequence[str] | None = None) -> np.ndarray:
        """Closed orbit at the BPMs at the fixed RF frequency: (2 * nbpm,) ``[x; y]`` [m].

        Raises:
            NoClosedOrbit: no closed orbit exists at the current settings.
        """
        names = self._select(bpms, "bpm", self._bpm_names)
        orbit = self._ensure_orbit()
        rows = [self._bpm_row[n] for n in names]
        return np.concatenate([orbit[rows, 0], orbit[rows, 2]])

    def _linearize(self, refpts: Sequence[int]) -> Linearization:
        self._ensure_orbit()
        return self._solver.linearize(np.asarray(refpts, dtype=np.int64))

    def _ddct_df(self) -> float:
        """Derivative of dct by the RF frequency [m/Hz]."""
        return -self._harmonic * float(self.lattice.beta) * clight / self._rf_frequency**2

    # -- ORM ---------------------------------------------------------------------------------
    def _columns(self, name: str) -> list[FieldDrive]:
        """Fields moved by one unit of ``name``'s nominal strength (cross-talk included)."""
        m = self._magnets[name]
        if m.crosstalk is None:
            return list(m.drives)
        j = m.group.index(name)
        matrix = np.asarray(m.crosstalk.matrix, dtype=float)
        drives = []
        for i, other in enumerate(m.group):
            if matrix[i, j] != 0.0:
                drives += [
                    FieldDrive(d.element, d.attr, d.index, float(matrix[i, j]))
                    for d in self._magnets[other].drives
                ]
        return drives

    def orm(
        self,
        bpms: Sequence[str] | None = None,
        correctors: Sequence[str] | None = None,
        *,
        rf: bool = True,
        method: str = "exact",
        kick: float = 1e-6,
        one_sided: bool = False,
    ) -> OrbitResponse:
        """Orbit response matrix at the fixed RF frequency.

        Args:
            bpms: BPM names (rows); default all BPMs in family order.
            correctors: corrector names (columns, any mix of planes); default all correctors.
            rf: also compute the RF column [m/Hz].
            method: ``"exact"``: the exact linear response at the current closed orbit from
                tracking (see :mod:`accplans.model._orm`; ~1e-6 relative to two-sided
                finite differences); ``"difference"``: finite differences of the closed orbit
                with ``kick`` [rad] (two-sided unless ``one_sided``), what a measurement with
                such kicks sees; ``"analytic"``: thin-kick, uncoupled optics formula with the
                fixed-RF dispersion term ``-D_b D_c / (alpha_c C)`` from ``avlinopt`` at the
                closed orbit (kicks at element centres, coupling ignored, only ``KickAngle``
                fields): measured 3.5e-4 of the largest element on the small ring, 1.3e-3
                (x) and 4e-4 (y) on EBS; cross-plane blocks only through dispersion, so with
                an orbit in the sextupoles they miss the coupling (3 % on EBS with a 2 urad rms
                corrector pattern).
            kick: kick [rad] of ``method="difference"``.
            one_sided: one-sided differences for ``method="difference"``.

        Returns:
            The response: matrix (2 * nbpm, ncorr) [m/rad], rows ``[x; y]``, columns per
            corrector's nominal strength (rad); RF column (2 * nbpm,) [m/Hz] or ``None``.

        Raises:
            NoClosedOrbit: no closed orbit at the current settings.
        """
        bpm_names = self._select(bpms, "bpm", self._bpm_names)
        corr = self._select(correctors, "corrector", self._corrector_names)
        bpm_elems = np.array([self._bpm_element[n] for n in bpm_names], dtype=np.int64)
        self._ensure_orbit()
        columns = [self._columns(n) for n in corr]
        if method == "exact":
            m6, per_dct, _ = exact_response(self._solver, bpm_elems, columns)
            matrix = _rows(m6)
            rf_col = _rows(per_dct) * self._ddct_df() if rf else None
        elif method == "analytic":
            matrix, rf_col = self._analytic_orm(bpm_elems, columns, rf)
        elif method == "difference":
            matrix, rf_col = self._difference_orm(bpm_elems, corr, rf, kick, one_sided)
        else:
            raise ValueError(
                f"orm: unknown method {method!r}; use 'exact', 'analytic' or 'difference'"
            )
        return OrbitResponse(
            bpms=tuple(bpm_names),
            correctors=tuple(corr),
            matrix=matrix,
            rf_column=rf_col,
            rf_frequency=self._rf_frequency,
            method=method,
        )

    def quadrupole_orm(
        self, quadrupoles: Sequence[str], correctors: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Response of the beam's position in quadrupoles to the correctors and the RF.

        The position in a quadrupole is the mean of the closed orbit at its entrance and exit
        (the first and past the last of its elements): zero relative to its magnetic centre
        exactly when a change of its gradient does not kick the beam (the orbit inside is then
        odd about its middle). The exact linear response, like :meth:`orm`.

        Args:
            quadrupoles: quadrupole device names (rows).
            correctors: corrector names (columns); default all correctors.

        Returns:
            ``(matrix, rf_column)``: (2 * nq, ncorr) [m/rad], rows ``[x of all; y of all]``,
            and (2 * nq,) [m/Hz].
        """
        corr = self._select(correctors, "corrector", self._corrector_names)
        ends = []
        for name in quadrupoles:
            elements = self.description.device(name).elements
            ends += [min(elements), max(elements) + 1]
        n_ring = len(self.lattice)
        refs = np.array([e % n_ring for e in ends], dtype=np.int64)
        self._ensure_orbit()
        m6, per_dct, _ = exact_response(self._solver, refs, [self._columns(n) for n in corr])
        # a quadrupole ending the lattice exits at the entrance of element 0, a turn later:
        # the closed orbit and its response are periodic
        matrix = _rows(m6)
        rf_col = _rows(per_dct) * self._ddct_df()
        nq = len(quadrupoles)
        mean = np.zeros((2 * nq, 2 * 2 * nq))
        for p in range(2):
            for q in range(nq):
                mean[p * nq + q, p * 2 * nq + 2 * q : p * 2 * nq + 2 * q + 2] = 0.5
        return mean @ matrix, mean @ rf_col

    def _orbit_rows(self, bpm_elems: np.ndarray) -> np.ndarray:
        orbit = self._ensure_orbit()
        rows = [self._bpm_row_of_element[e] for e in bpm_elems]
        return np.concatenate([orbit[rows, 0], orbit[rows, 2]])

    def _difference_orm(
        self, bpm_elems: np.ndarray, corr: list[str], rf: bool, kick: float, one_sided: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if not np.isfinite(kick) or kick == 0.0:
            raise ValueError(f"orm: kick must be finite and non-zero, got {kick!r}")
        tol = self._solver.tol
        # orbit differences of ~kick * R: solve well below that
        self._solver.tol = min(tol, max(1e-13, 1e-6 * abs(kick)))
        self._orbit = None
        try:
            return self._difference_columns(bpm_elems, corr, rf, kick, one_sided)
        finally:
            self._solver.tol = tol
            self._orbit = None

    def _difference_columns(
        self, bpm_elems: np.ndarray, corr: list[str], rf: bool, kick: float, one_sided: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        base = self._orbit_rows(bpm_elems)
        steps = (kick,) if one_sided else (kick, -kick)
        matrix = np.empty((2 * len(bpm_elems), len(corr)))
        for j, name in enumerate(corr):
            orbits = []
            for s in steps:
                with self._perturbed({name: s}):
                    orbits.append(self._orbit_rows(bpm_elems))
            matrix[:, j] = (
                (orbits[0] - base) / kick if one_sided else (orbits[0] - orbits[1]) / (2 * kick)
            )
        rf_col = None
        if rf:
            df = 10.0  # Hz
            f0 = self._rf_frequency
            orbits = []
            try:
                for s in (df,) if one_sided else (df, -df):
                    self._rf_frequency = f0 + s
                    self._orbit = None
                    orbits.append(self._orbit_rows(bpm_elems))
            finally:
                self._rf_frequency = f0
                self._orbit = None
            rf_col = (orbits[0] - base) / df if one_sided else (orbits[0] - orbits[1]) / (2 * df)
        return matrix, rf_col

    def _analytic_orm(
        self, bpm_elems: np.ndarray, columns: list[list[FieldDrive]], rf: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        ring = self.lattice
        kick_elems = sorted({d.element for col in columns for d in col if d.attr == "KickAngle"})
        refs = np.array(sorted(set(bpm_elems.tolist()) | set(kick_elems)), dtype=np.int64)
        try:
            lindata, avebeta, avemu, avedisp, _, tune, _ = at.avlinopt(
                ring, refpts=refs, orbit=self._solver.x0
            )
        except at.AtError as exc:
            raise UnstableMotion(f"no optics at the current settings: {exc}") from None
        if not np.all(np.isfinite(tune)):
            raise UnstableMotion("linear motion is unstable at the current settings")
        pos = {int(e): k for k, e in enumerate(refs)}
        b = np.array([pos[int(e)] for e in bpm_elems])
        beta_b = lindata.beta[b]
        mu_b = lindata.mu[b]
        disp_b = lindata.dispersion[b][:, (0, 2)]
        circ = float(ring.circumference)
        alpha_c = self.alpha_c
        q = np.asarray(tune, dtype=float)
        matrix = np.zeros((2 * len(bpm_elems), len(columns)))
        nb = len(bpm_elems)
        for j, col in enumerate(columns):
            for d in col:
                if d.attr != "KickAngle":
                    continue
                k = pos[d.element]
                p = d.index  # 0: h, 1: v
                down = bpm_elems > d.element
                dmu = np.where(down, mu_b[:, p] - avemu[k, p], avemu[k, p] - mu_b[:, p])
                betatron = (
                    np.sqrt(beta_b[:, p] * avebeta[k, p])
                    / (2.0 * np.sin(np.pi * q[p]))
                    * np.cos(dmu - np.pi * q[p])
                )
                disp_c = avedisp[k, 2 * p]
                resp = np.zeros(2 * nb)
                resp[p * nb : (p + 1) * nb] += betatron
                resp[:nb] -= disp_b[:, 0] * disp_c / (alpha_c * circ)
                resp[nb:] -= disp_b[:, 1] * disp_c / (alpha_c * circ)
                matrix[:, j] += d.coefficient * resp
        rf_col = None
        if rf:
            ddelta_df = self._ddct_df() / (alpha_c * circ)
            rf_col = np.concatenate([disp_b[:, 0], disp_b[:, 1]]) * ddelta_df
        return matrix, rf_col

    # -- optics ------------------------------------------------------------------------------
    def _refpts(self, refpts: Sequence[str] | Sequence[int] | np.ndarray | None) -> np.ndarray:
        if refpts is None:
            return np.array([self._bpm_element[n] for n in self._bpm_names], dtype=np.int64)
        items = list(refpts)
        if items and all(isinstance(r, str) for r in items):
            out = []
            for n in items:
                dev = self.description.device(n)  # type: ignore[arg-type]
                if not dev.elements:
                    raise ValueError(f"{n} is a {dev.kind} with no lattice element")
                out.append(dev.elements[0])
            return np.array(out, dtype=np.int64)
        arr = np.asarray(items)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"refpts must be device names or element indices, got {refpts!r}")
        arr = arr.astype(np.int64)
        bad = arr[(arr < 0) | (arr > len(self.lattice))]
        if bad.size:
            raise ValueError(f"refpts {bad[:5].tolist()} are outside the lattice")
        return arr

    def optics(self, refpts: Sequence[str] | Sequence[int] | np.ndarray | None = None) -> Optics:
        """Linear optics at the current RF frequency (pyAT ``linopt6`` at the closed orbit).

        Args:
            refpts: device names (their first element) or element indices; default the BPMs.
        """
        refs = self._refpts(refpts)
        self._ensure_orbit()
        # sample at least at every BPM so that the phase unwraps correctly
        bpm_elems = [self._bpm_element[n] for n in self._bpm_names]
        grid = np.union1d(refs, bpm_elems if bpm_elems else np.arange(len(self.lattice) + 1))
        try:
            _, ringdata, data = at.linopt6(
                self.lattice, refpts=grid.astype(np.uint32), orbit=self._solver.x0
            )
        except at.AtError as exc:
            raise UnstableMotion(f"no optics at the current settings: {exc}") from None
        if not np.all(np.isfinite(ringdata.tune)):
            raise UnstableMotion("linear motion is unstable at the current settings")
        k = np.searchsorted(grid, refs)
        return Optics(
            refpts=refs,
            s=np.asarray(data.s_pos[k], dtype=float),
            beta=np.asarray(data.beta[k], dtype=float),
            alpha=np.asarray(data.alpha[k], dtype=float),
            mu=np.asarray(data.mu[k], dtype=float),
            dispersion=np.asarray(data.dispersion[k], dtype=float),
            closed_orbit=np.asarray(data.closed_orbit[k], dtype=float),
            tunes=np.asarray(ringdata.tune, dtype=float)[:2],
            rf_frequency=self._rf_frequency,
        )

    def _dz_per_dct(self, lin: Linearization) -> np.ndarray:
        """(5,) change of (x, px, y, py, delta) at the entrance per metre of dct."""
        return np.linalg.solve(lin.jacobian(), np.array([0.0, 0.0, 0.0, 0.0, 1.0]))

    def dispersion(self, bpms: Sequence[str] | None = None) -> np.ndarray:
        """Dispersion at the BPMs, d orbit / d delta: (2 * nbpm,) ``[Dx; Dy]`` [m].

        Computed at the current closed orbit (fixed RF frequency); it is what an RF-frequency
        scan measures once divided by ``d delta = -df / (f alpha_c)``.
        """
        names = self._select(bpms, "bpm", self._bpm_names)
        lin = self._linearize([self._bpm_element[n] for n in names])
        dz = self._dz_per_dct(lin)
        d6 = lin.matrices @ np.append(dz, 0.0) / dz[4]
        return np.concatenate([d6[:, 0], d6[:, 2]])

    @property
    def alpha_c(self) -> float:
        """Momentum compaction factor ``(d dct / d delta) / C`` at the current closed orbit."""
        lin = self._linearize([len(self.lattice)])
        return 1.0 / (self._dz_per_dct(lin)[4] * float(self.lattice.circumference))

    def tunes(self) -> np.ndarray:
        """Fractional tunes (2,) at the current closed orbit (fixed RF frequency)."""
        lin = self._linearize([len(self.lattice)])
        return _tunes_of(lin.one_turn)

    def chromaticity(self) -> np.ndarray:
        """Unnormalized chromaticity (2,) ``dQ / d delta`` around the current closed orbit.

        Tunes on the closed orbits at path lengthenings that move delta by +-1.5e-6 around the
        current one (pyAT's ``get_chrom(ring, dct=...)`` takes the same central difference at
        fixed delta).
        """
        self._ensure_orbit()
        dct0 = self.dct
        half = 0.5 * _DP_STEP * self.alpha_c * float(self.lattice.circumference)
        tunes = []
        deltas = []
        try:
            for s in (half, -half):
                self._solver.solve(dct0 + s)
                deltas.append(self._solver.x0[4])
                tunes.append(_tunes_of(self._solver.linearize([len(self.lattice)]).one_turn))
        finally:
            self._orbit = None
        return _wrap(tunes[0] - tunes[1]) / (deltas[0] - deltas[1])

    # -- knobs -------------------------------------------------------------------------------
    def _knob(self, name: str) -> dict[str, float]:
        if name in self.description.knobs:
            return dict(self.description.knobs[name].coefficients)
        if name in self.description.device_map and name in self._magnets:
            return {name: 1.0}
        raise KeyError(
            f"machine {self.description.machine.name!r} has no knob or magnet {name!r}; "
            f"knobs: {sorted(self.description.knobs)}"
        )

    def _knob_step(self, coefficients: Mapping[str, float]) -> float:
        scale = max(
            (abs(self._nominal[n]) / abs(c) for n, c in coefficients.items() if c != 0.0),
            default=0.0,
        )
        if scale == 0.0:
            scale = 1.0 / max(abs(c) for c in coefficients.values())
        return _REL_STEP * scale

    def _knob_response(
        self, knobs: Sequence[str], quantity: Any, step: float | None, wrap: bool
    ) -> np.ndarray:
        if isinstance(knobs, str):
            raise TypeError(f"give a sequence of knob names, not the string {knobs!r}")
        out = np.empty((2, len(knobs)))
        for k, name in enumerate(knobs):
            coefficients = self._knob(name)
            h = self._knob_step(coefficients) if step is None else float(step)
            values = []
            for s in (h, -h):
                with self._perturbed({n: s * c for n, c in coefficients.items()}):
                    values.append(quantity())
            diff = values[0] - values[1]
            out[:, k] = (_wrap(diff) if wrap else diff) / (2.0 * h)
        return out

    def tune_response(self, knobs: Sequence[str], *, step: float | None = None) -> np.ndarray:
        """Tune change per knob unit: (2, nknobs), central differences.

        Args:
            knobs: knob names of the description (a magnet's name is a knob of coefficient 1).
            step: knob step (knob units); default 1e-4 of the knob's current scale.
        """
        return self._knob_response(knobs, self.tunes, step, wrap=True)

    def chromaticity_response(
        self, knobs: Sequence[str], *, step: float | None = None
    ) -> np.ndarray:
        """Chromaticity change per knob unit: (2, nknobs), as :meth:`tune_response`."""
        return self._knob_response(knobs, self.chromaticity, step, wrap=False)
