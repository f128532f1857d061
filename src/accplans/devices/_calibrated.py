"""Setpoint/readback devices that convert hardware units to SI through a calibration.

A PV carries a hardware value ``h`` (A, Hz); the device's ``set`` takes a strength ``s`` in SI
(rad, m^-2, m^-3, Hz) and converts it with the description's calibration
(:class:`accplans.config.LinearCalibration` or :class:`~accplans.config.PolynomialCalibration`).
Completion is tolerance-based: a move is done when the hardware readback is within
``DeviceSpec.tolerance`` (hardware units) of the hardware setpoint it wrote. Limits
(``DeviceSpec.limits``, hardware units) are checked before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from event_model import DataKey
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    DerivedSignalFactory,
    DeviceMock,
    DeviceVector,
    MovableLogic,
    SignalR,
    SignalRW,
    StandardMovable,
    StandardReadable,
    TimeoutCalculator,
    callback_on_mock_put,
    default_mock_class,
    set_and_wait_for_other_value,
    set_mock_value,
)
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from accplans.config import Calibration, CrosstalkSpec, DeviceSpec, LinearCalibration

from ._transforms import CalibrationTransform, NonZeroTransform, ScaleTransform

__all__ = [
    "CalibratedMovable",
    "CalibrationArray",
    "EpicsProtocol",
    "FamilyCalibration",
    "LimitError",
    "calibrated_r",
    "calibrated_rw",
    "fill_units",
    "flag_r",
    "limit_problem",
    "pv",
    "scaled_r",
    "strength_unit",
]

#: EPICS transport of the device signals.
EpicsProtocol = Literal["ca", "pva"]

_IDENTITY = LinearCalibration(gain=1.0)
_POLY_RE = re.compile(r"^Polynom[AB]\[([0-9])\]$")


class LimitError(ValueError):
    """A requested value is outside a device's limits; nothing was written."""


def calibrated_r(raw: SignalR[float], calibration: Calibration, units: str) -> SignalR[float]:
    """A read-only SI signal derived from hardware signal ``raw``."""
    factory = DerivedSignalFactory(
        CalibrationTransform, raw=raw, calibration=calibration.model_dump_json()
    )
    return factory.derived_signal_r(float, "value", units=units)


def calibrated_rw(
    raw: SignalRW[float],
    calibration: Calibration,
    units: str,
    write: Callable[[float], Awaitable[None]],
) -> SignalRW[float]:
    """A read-write SI signal over hardware signal ``raw``; ``write(value)`` does the put."""
    factory = DerivedSignalFactory(
        CalibrationTransform, set_derived=write, raw=raw, calibration=calibration.model_dump_json()
    )
    return factory.derived_signal_rw(float, "value", units=units)


def scaled_r(raw: SignalR[float], scale: float, units: str) -> SignalR[float]:
    """A read-only signal ``raw * scale``."""
    factory = DerivedSignalFactory(ScaleTransform, raw=raw, scale=float(scale))
    return factory.derived_signal_r(float, "value", units=units)


def flag_r(raw: SignalR[int]) -> SignalR[bool]:
    """A read-only bool signal ``raw != 0``."""
    return DerivedSignalFactory(NonZeroTransform, raw=raw).derived_signal_r(bool, "value")


def pv(name: str, protocol: EpicsProtocol) -> str:
    """The ophyd-async address of PV ``name`` over ``protocol`` (``ca://NAME``, ``pva://NAME``)."""
    if protocol not in ("ca", "pva"):
        raise ValueError(f"protocol must be 'ca' or 'pva', got {protocol!r}")
    return f"{protocol}://{name}"


def strength_unit(field_name: str | None) -> str:
    """SI unit of the lattice field a device drives (``KickAngle[0]`` -> ``rad``, ...)."""
    if field_name is None:
        return ""
    if field_name.startswith("KickAngle"):
        return "rad"
    if field_name == "Frequency":
        return "Hz"
    if field_name == "Voltage":
        return "V"
    match = _POLY_RE.match(field_name)
    if match:
        return f"m^-{int(match.group(1)) + 1}"
    return ""


def fill_units(
    datakeys: dict[str, DataKey], units: Sequence[tuple[SignalR[Any], str]]
) -> dict[str, DataKey]:
    """Give each signal of ``units`` its unit in ``datakeys`` where the PV did not state one."""
    for signal, unit in units:
        key = datakeys.get(signal.name)
        if key is not None and unit and not key.get("units"):
            key["units"] = unit
    return datakeys


def limit_problem(
    spec: DeviceSpec, strength: float, unit: str, cal: Calibration
) -> tuple[float, str]:
    """Hardware value for ``strength`` and, if it cannot be set, the reason (else ``""``)."""
    s = float(strength)
    if not np.isfinite(s):
        return float("nan"), f"{spec.name}: requested strength {s} {unit} is not a finite number"
    h = float(cal.to_hardware(s))
    if not np.isfinite(h) or abs(float(cal.to_strength(h)) - s) > 1e-9 * max(1.0, abs(s)):
        return h, (
            f"{spec.name}: requested {s:.6g} {unit} cannot be reached through its calibration"
            + _limits_text(spec, unit, cal)
        )
    if spec.limits is not None and not spec.limits[0] <= h <= spec.limits[1]:
        return h, (
            f"{spec.name}: requested {s:.6g} {unit} ({h:.6g} {spec.unit}) is outside its limits"
            + _limits_text(spec, unit, cal)
        )
    return h, ""


def _limits_text(spec: DeviceSpec, unit: str, cal: Calibration) -> str:
    if spec.limits is None:
        return ""
    lo, hi = spec.limits
    s_lo, s_hi = sorted(float(v) for v in cal.to_strength(np.asarray([lo, hi])))
    if unit == spec.unit:
        return f" [{lo:.6g}, {hi:.6g}] {spec.unit}"
    return f" [{s_lo:.6g}, {s_hi:.6g}] {unit} ([{lo:.6g}, {hi:.6g}] {spec.unit})"


class CalibrationArray:
    """Vectorised calibrations of the members of a family (members sharing one are grouped).

    Args:
        calibrations: one calibration per member, in family order (``None``: identity).
    """

    def __init__(self, calibrations: Sequence[Calibration | None]) -> None:
        self._cals: list[Calibration] = []
        keys: dict[str, int] = {}
        group_of: list[int] = []
        for cal in calibrations:
            cal = cal if cal is not None else _IDENTITY
            key = cal.model_dump_json()
            if key not in keys:
                keys[key] = len(self._cals)
                self._cals.append(cal)
            group_of.append(keys[key])
        self._group_of = np.asarray(group_of, dtype=np.intp)

    def __len__(self) -> int:
        return len(self._group_of)

    def _apply(self, values: npt.ArrayLike, indices: npt.NDArray[np.intp], to: str) -> np.ndarray:
        v = np.asarray(values, dtype=float)
        out = np.empty_like(v)
        groups = self._group_of[indices]
        for g in np.unique(groups):
            sel = groups == g
            out[sel] = getattr(self._cals[g], to)(v[sel])
        return out

    def to_strength(self, hardware: npt.ArrayLike, indices: npt.NDArray[np.intp]) -> np.ndarray:
        """Hardware values of members ``indices`` -> strengths (SI)."""
        return self._apply(hardware, indices, "to_strength")

    def to_hardware(self, strength: npt.ArrayLike, indices: npt.NDArray[np.intp]) -> np.ndarray:
        """Strengths (SI) of members ``indices`` -> hardware values."""
        return self._apply(strength, indices, "to_hardware")


class FamilyCalibration:
    """Calibrations, limits and tolerances of a family's members, vectorised.

    Shared by :class:`~accplans.devices.MagnetFamily` and the ophyd v1 adapter, so both check
    limits and word their errors the same way.

    Args:
        specs: member descriptions in family order (magnets: each has calibration, limits and
            tolerance).
    """

    max_listed = 10

    def __init__(self, specs: Sequence[DeviceSpec]) -> None:
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self.cals = CalibrationArray([s.calibration for s in self.specs])
        lims = [s.limits if s.limits is not None else (-np.inf, np.inf) for s in self.specs]
        self.low = np.array([lo for lo, _ in lims], dtype=float)
        self.high = np.array([hi for _, hi in lims], dtype=float)
        self.tolerance = np.array(
            [s.tolerance if s.tolerance is not None else 1e-6 for s in self.specs], dtype=float
        )
        units = {strength_unit(s.field) if s.calibration else s.unit for s in self.specs}
        self.si_unit = units.pop() if len(units) == 1 else ""
        hw_units = {s.unit for s in self.specs}
        self.hardware_unit = hw_units.pop() if len(hw_units) == 1 else ""

    def __len__(self) -> int:
        return len(self.specs)

    def values(self, values: npt.ArrayLike, idx: npt.NDArray[np.intp], owner: str) -> np.ndarray:
        """``values`` as one float per selected member (a scalar is broadcast)."""
        v = np.asarray(values, dtype=float)
        if v.ndim == 0:
            return np.full(idx.size, float(v))
        if v.shape != idx.shape:
            raise ValueError(
                f"{owner}: {v.size} values for {idx.size} selected members "
                "(give one value per selected member, in the order of select=)"
            )
        return v

    def limits(self, idx: npt.NDArray[np.intp]) -> tuple[np.ndarray, np.ndarray]:
        """Strength limits (low, high) in SI of members ``idx``."""
        a = self.cals.to_strength(self.low[idx], idx)
        b = self.cals.to_strength(self.high[idx], idx)
        return np.minimum(a, b), np.maximum(a, b)

    def problems(
        self, values: np.ndarray, idx: npt.NDArray[np.intp], *, hardware: bool
    ) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Hardware values for ``values`` and the reasons some of them cannot be set.

        Args:
            values: SI strengths (hardware values if ``hardware``) of members ``idx``.
            idx: member indices.
            hardware: ``values`` are hardware values.

        Returns:
            The hardware values, and (position in ``idx``, reason) for each refused value.
        """
        if hardware:
            hw = values
            bad = ~np.isfinite(hw) | (hw < self.low[idx]) | (hw > self.high[idx])
        else:
            with np.errstate(all="ignore"):
                hw = self.cals.to_hardware(values, idx)
                back = self.cals.to_strength(hw, idx)
                bad = (
                    ~np.isfinite(values)
                    | ~np.isfinite(hw)
                    | (np.abs(back - values) > 1e-9 * np.maximum(1.0, np.abs(values)))
                    | (hw < self.low[idx])
                    | (hw > self.high[idx])
                )
        found: list[tuple[int, str]] = []
        for k in np.flatnonzero(bad):
            spec = self.specs[int(idx[k])]
            if hardware:
                lo, hi = spec.limits or (-np.inf, np.inf)
                text = (
                    f"{spec.name}: requested {hw[k]:.6g} {spec.unit} is outside its "
                    f"limits [{lo:.6g}, {hi:.6g}] {spec.unit}"
                )
            else:
                _, text = limit_problem(
                    spec, float(values[k]), self.si_unit, spec.calibration or _IDENTITY
                )
            found.append((int(k), text or f"{spec.name}: cannot set {values[k]:.6g}"))
        return hw, found

    def limit_error(
        self,
        owner: str,
        problems: Sequence[tuple[int, str]],
        n_requested: int,
        current: np.ndarray | None = None,
        unit: str = "",
    ) -> LimitError:
        """One :class:`LimitError` listing ``problems`` (with the current values, if given)."""
        lines = []
        for k, text in problems[: self.max_listed]:
            if current is not None:
                text += f"; current {current[k]:.6g} {unit}"
            lines.append("  " + text)
        if len(problems) > self.max_listed:
            lines.append(f"  ... and {len(problems) - self.max_listed} more")
        return LimitError(
            f"{owner}: {len(problems)} of {n_requested} requested values cannot be set; "
            "nothing was written:\n" + "\n".join(lines)
        )


@dataclass
class CalibratedLogic(MovableLogic[float]):
    """Movable logic in SI over hardware PVs: limits, ramp-rate timeout, tolerance completion."""

    owner: CalibratedMovable = field(repr=False)

    async def check_move(self, new_position: float) -> None:
        """Raise :class:`LimitError` (naming device, request, current, limits) if out of range."""
        await self.owner.check_strength(await self.owner.nominal_for(new_position))

    async def calculate_timeout(self, old_position: float, new_position: float) -> float:
        """Ramp time of the hardware change at the device's ramp rate, plus 10 s."""
        return self.owner.move_timeout(old_position, new_position)

    async def move(self, new_position: float, timeout: TimeoutCalculator) -> None:
        """Write the hardware setpoint and wait until the readback is within tolerance."""
        nominal = await self.owner.nominal_for(new_position)
        hardware, problem = limit_problem(
            self.owner.spec, nominal, self.owner.si_unit, self.owner.calibration
        )
        if problem:
            raise LimitError(problem)
        await self.owner.move_hardware(hardware, timeout())


class _FollowingMock(DeviceMock["CalibratedMovable"]):
    """In mock mode the hardware readback follows each setpoint put at once."""

    async def connect(self, device: CalibratedMovable) -> None:
        def follow(value: float) -> None:
            set_mock_value(device.readback, value)

        callback_on_mock_put(device.setpoint, follow)


@default_mock_class(_FollowingMock)
class CalibratedMovable(StandardReadable, StandardMovable[float]):
    """A setpoint/readback pair in hardware units, moved in SI through a calibration.

    Signals: ``setpoint`` and ``readback`` (hardware units, the PVs), and for calibrated devices
    ``strength`` (SI setpoint) and ``strength_readback`` (SI readback, read under the device's
    own name). ``set(value)`` takes SI, checks limits first (nothing is written when the value
    is out of range), writes the hardware setpoint and completes when the hardware readback is
    within ``tolerance`` of it.

    A channel of a multi-channel magnet (``crosstalk``) moves in the strength the beam sees on
    it: ``set(value)`` solves the cross-talk matrix for its own current, the other channels'
    currents held (:meth:`~accplans.config.CrosstalkSpec.nominal_for`), reading their setpoints
    through ``crosstalk_setpoints``; :meth:`beam_strength` gives the strength the beam sees.
    The ``strength``/``strength_readback`` signals stay the channel's *nominal* strength (its
    own calibration).

    Args:
        spec: the device's description (PVs, calibration, limits, tolerance).
        protocol: EPICS transport.
        ramp_rate: hardware units per second, for the move timeout (default per class).
        setpoint_key: key of the setpoint PV in ``spec.pvs``.
        readback_key: key of the readback PV in ``spec.pvs``.
        name: device name (default: ``spec.name``).
        crosstalk: the multi-channel calibration this device is a channel of, if any.
        partners: descriptions of ``crosstalk.devices`` (every channel, in its order).
    """

    #: Default ramp rate (hardware units per second) used for move timeouts.
    default_ramp_rate: float = 10.0
    #: Tolerance (hardware units) used when the description gives none.
    default_tolerance: float = 1e-6

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        protocol: EpicsProtocol = "ca",
        ramp_rate: float | None = None,
        setpoint_key: str = "setpoint",
        readback_key: str = "readback",
        name: str | None = None,
        crosstalk: CrosstalkSpec | None = None,
        partners: Sequence[DeviceSpec] = (),
    ) -> None:
        self.spec = spec
        self.crosstalk = crosstalk
        if crosstalk is not None:
            if [p.name for p in partners] != list(crosstalk.devices):
                raise ValueError(
                    f"{spec.name}: give the descriptions of every cross-talk channel "
                    f"{crosstalk.devices}, in order"
                )
            self._channel = crosstalk.devices.index(spec.name)
            self._partner_cals = [p.calibration or _IDENTITY for p in partners]
            self.crosstalk_setpoints = DeviceVector(
                {
                    k: epics_signal_r(float, pv(p.pvs[setpoint_key], protocol))
                    for k, p in enumerate(partners)
                    if k != self._channel
                }
            )
            self.crosstalk_readbacks = DeviceVector(
                {
                    k: epics_signal_r(float, pv(p.pvs[readback_key], protocol))
                    for k, p in enumerate(partners)
                    if k != self._channel
                }
            )
        self.calibration: Calibration = spec.calibration or _IDENTITY
        self.si_unit = strength_unit(spec.field) if spec.calibration is not None else spec.unit
        self.tolerance = spec.tolerance if spec.tolerance is not None else self.default_tolerance
        self.ramp_rate = ramp_rate if ramp_rate is not None else self.default_ramp_rate
        if not self.ramp_rate > 0:
            raise ValueError(f"{spec.name}: ramp_rate must be > 0, got {self.ramp_rate}")
        for key in (setpoint_key, readback_key):
            if key not in spec.pvs:
                raise KeyError(f"device {spec.name}: no PV {key!r} in its description")
        self.setpoint = epics_signal_rw(float, pv(spec.pvs[setpoint_key], protocol))
        self.readback = epics_signal_r(float, pv(spec.pvs[readback_key], protocol))
        self._hardware_units = ((self.setpoint, spec.unit), (self.readback, spec.unit))
        if spec.calibration is not None:
            cal = self.calibration

            async def write_strength(value: float) -> None:
                hardware, problem = limit_problem(spec, value, self.si_unit, cal)
                if problem:
                    raise LimitError(problem)
                await self.setpoint.set(hardware)

            self.strength = calibrated_rw(self.setpoint, cal, self.si_unit, write_strength)
            self.strength_readback = calibrated_r(self.readback, cal, self.si_unit)
            self.add_readables([self.strength_readback], Format.HINTED_SIGNAL)
            self.add_readables([self.readback, self.setpoint])
        else:
            self.add_readables([self.readback], Format.HINTED_SIGNAL)
            self.add_readables([self.setpoint])
        super().__init__(name=spec.name if name is None else name)

    @cached_property
    def movable_logic(self) -> CalibratedLogic:
        """Moves in SI: ``strength``/``strength_readback`` (or the hardware pair, uncalibrated)."""
        if self.spec.calibration is not None:
            return CalibratedLogic(
                setpoint=self.strength, readback=self.strength_readback, owner=self
            )
        return CalibratedLogic(setpoint=self.setpoint, readback=self.readback, owner=self)

    # -- cross-talk -------------------------------------------------------------------------
    async def partner_nominal(self, *, readback: bool = False) -> np.ndarray:
        """Nominal strengths of every channel of this magnet (``crosstalk.devices`` order).

        Each other channel's own calibration of its setpoint (``readback``: its readback); this
        channel's entry is NaN. A :class:`ValueError` if the device has no cross-talk.
        """
        if self.crosstalk is None:
            raise ValueError(f"{self.name} is not a channel of a multi-channel magnet")
        return await self._group_nominal(readback)

    async def _group_nominal(self, readback: bool) -> np.ndarray:
        """Nominal strengths of every cross-talk channel (own entry NaN), from their currents."""
        assert self.crosstalk is not None
        signals = self.crosstalk_readbacks if readback else self.crosstalk_setpoints
        out = np.full(len(self.crosstalk.devices), np.nan)
        for k, signal in signals.items():
            out[k] = float(self._partner_cals[k].to_strength(await signal.get_value()))
        return out

    async def nominal_for(self, strength: float) -> float:
        """Nominal strength (own calibration) that gives the beam ``strength`` on this channel.

        Without cross-talk, ``strength`` itself; with it, the other channels' present setpoints
        are held.
        """
        if self.crosstalk is None or not np.isfinite(strength):
            return strength
        nominal = await self._group_nominal(readback=False)
        return float(self.crosstalk.nominal_for([strength], [self._channel], nominal)[0])

    async def beam_strength(self, nominal: float, *, readback: bool = True) -> float:
        """Strength the beam sees on this channel when its nominal strength is ``nominal``.

        Args:
            nominal: this channel's nominal strength (its calibration of its current).
            readback: use the other channels' readbacks (else their setpoints).
        """
        if self.crosstalk is None:
            return nominal
        group = await self._group_nominal(readback=readback)
        group[self._channel] = nominal
        return float(self.crosstalk.apply(group)[self._channel])

    # -- conversions and checks -----------------------------------------------------------
    def to_strength(self, hardware: float) -> float:
        """Hardware value -> strength (SI)."""
        return float(self.calibration.to_strength(hardware))

    def to_hardware(self, strength: float) -> float:
        """Strength (SI) -> hardware value."""
        return float(self.calibration.to_hardware(strength))

    @property
    def limits(self) -> tuple[float, float] | None:
        """Limits in SI (low, high), from the hardware limits through the calibration."""
        if self.spec.limits is None:
            return None
        lo, hi = sorted(
            float(v) for v in self.calibration.to_strength(np.asarray(self.spec.limits))
        )
        return lo, hi

    def hardware_for(self, strength: float) -> float:
        """Hardware value for ``strength``; :class:`LimitError` if it cannot be set."""
        hardware, problem = limit_problem(self.spec, strength, self.si_unit, self.calibration)
        if problem:
            raise LimitError(problem)
        return hardware

    async def check_strength(self, strength: float) -> None:
        """Raise :class:`LimitError` naming the request, the current value and the limits."""
        _, problem = limit_problem(self.spec, strength, self.si_unit, self.calibration)
        if problem:
            current = self.to_strength(await self.readback.get_value())
            raise LimitError(f"{problem}; current {current:.6g} {self.si_unit}")

    def move_timeout(self, old_strength: float, new_strength: float) -> float:
        """Timeout (s) of a move: hardware change / ramp rate + 10 s."""
        try:
            delta = abs(self.to_hardware(new_strength) - self.to_hardware(old_strength))
        except (ValueError, FloatingPointError):
            delta = 0.0
        if not np.isfinite(delta):
            delta = 0.0
        return delta / self.ramp_rate + DEFAULT_TIMEOUT

    async def move_hardware(self, hardware: float, timeout: float | None) -> None:
        """Write ``hardware`` and wait until the readback is within tolerance of it."""
        tol = self.tolerance

        def arrived(value: float) -> bool:
            return abs(value - hardware) <= tol

        try:
            await set_and_wait_for_other_value(
                self.setpoint, hardware, self.readback, arrived, timeout=timeout
            )
        except TimeoutError:
            last = await self.readback.get_value()
            raise TimeoutError(
                f"{self.name}: readback {last:.6g} {self.spec.unit} did not come within "
                f"{tol:g} {self.spec.unit} of the setpoint {hardware:.6g} {self.spec.unit} "
                f"in {timeout} s"
            ) from None

    async def describe(self) -> dict[str, DataKey]:
        """As StandardReadable, with the hardware unit where the PV states none."""
        return fill_units(await super().describe(), self._hardware_units)
