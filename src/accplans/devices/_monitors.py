"""RF system, beam current (DCCT), tune monitor and emittance monitor."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated as A

import numpy as np
import numpy.typing as npt
from event_model import DataKey
from ophyd_async.core import SignalR, StandardReadable, WatchableAsyncStatus
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import EpicsDevice, PvSuffix, epics_signal_r, epics_signal_rw

from accplans.config import DeviceSpec, MachineDescription

from ._calibrated import CalibratedMovable, EpicsProtocol, LimitError, fill_units, pv
from ._select import Select, resolve_select

__all__ = ["Dcct", "EmittanceMonitor", "EmittanceReading", "Rf", "RfFrequency", "TuneMonitor"]


def _check_kind(spec: DeviceSpec, kind: str) -> None:
    if spec.kind != kind:
        raise ValueError(f"device {spec.name} is a {spec.kind}, not a {kind}")


class RfFrequency(CalibratedMovable):
    """The RF frequency (Hz): ``FREQ:SP``/``FREQ:RB``, movable with limits and tolerance.

    ``set(f)`` checks ``DeviceSpec.limits`` (Hz) first, writes ``FREQ:SP`` and completes when
    ``FREQ:RB`` is within ``DeviceSpec.tolerance`` (Hz) of it; its timeout is the change over
    the ramp rate (Hz/s) plus 10 s.
    """

    default_ramp_rate = 100.0
    default_tolerance = 1e-3

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        protocol: EpicsProtocol = "ca",
        ramp_rate: float | None = None,
        name: str | None = None,
    ) -> None:
        _check_kind(spec, "rf")
        super().__init__(
            spec,
            protocol=protocol,
            ramp_rate=ramp_rate,
            setpoint_key="frequency_setpoint",
            readback_key="frequency_readback",
            name=name,
        )


class Rf(StandardReadable):
    """The RF system: ``frequency`` (an :class:`RfFrequency`, Hz) and ``voltage`` (V).

    ``voltage`` reads ``VOLT:RB`` and writes ``VOLT:SP`` (put with completion).

    The RF frequency is also a one-member :class:`~accplans.devices.SettableFamily` (its
    "strength" and hardware value are both Hz), so plans that step it (the RF column of an
    ORM, dispersion, chromaticity) snapshot, check and restore it as they do magnets.

    Args:
        spec: the RF device's description.
        protocol: EPICS transport.
        name: device name (default: ``spec.name``).
        description: the machine description the device belongs to.
    """

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        protocol: EpicsProtocol = "ca",
        name: str | None = None,
        description: MachineDescription | None = None,
    ) -> None:
        _check_kind(spec, "rf")
        self.spec = spec
        self.description = description
        self.specs = (spec,)
        with self.add_children_as_readables():
            self.frequency = RfFrequency(spec, protocol=protocol)
        self.voltage = epics_signal_rw(
            float,
            pv(spec.pvs["voltage_readback"], protocol),
            pv(spec.pvs["voltage_setpoint"], protocol),
        )
        self.add_readables([self.voltage])
        self._units = ((self.voltage, "V"),)
        super().__init__(name=spec.name if name is None else name)

    async def describe(self) -> dict[str, DataKey]:
        """As StandardReadable, with units where the PVs state none."""
        return fill_units(await super().describe(), self._units)

    # -- the RF frequency as a one-member settable family (Hz) -----------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """``(spec.name,)``."""
        return (self.spec.name,)

    def _one(self, values: npt.ArrayLike, select: Select) -> float:
        resolve_select(select, self.names, owner=self.name)
        arr = np.atleast_1d(np.asarray(values, dtype=float))
        if arr.size != 1:
            raise ValueError(f"{self.name}: one RF frequency expected, got {arr.size} values")
        return float(arr[0])

    def limits(self, select: Select = None) -> tuple[np.ndarray, np.ndarray]:
        """Frequency limits (Hz)."""
        resolve_select(select, self.names, owner=self.name)
        low, high = self.spec.limits or (-np.inf, np.inf)
        return np.array([low]), np.array([high])

    def check_strengths(self, values: npt.ArrayLike, select: Select = None) -> None:
        """Raise ``LimitError`` if the frequency (Hz) is outside the limits or NaN."""
        value = self._one(values, select)
        try:
            self.spec.check_limits(value)
        except ValueError as exc:
            raise LimitError(str(exc)) from None

    def set_strengths(
        self, values: npt.ArrayLike, select: Select = None
    ) -> WatchableAsyncStatus[float]:
        """Set the RF frequency (Hz); limits checked first; done when the readback settled."""
        value = self._one(values, select)
        self.check_strengths(value)
        return self.frequency.set(value)

    set_hardware = set_strengths

    async def strengths(self, select: Select = None) -> np.ndarray:
        """The frequency readback (Hz)."""
        resolve_select(select, self.names, owner=self.name)
        return np.array([await self.frequency.readback.get_value()])

    hardware_readbacks = strengths

    async def hardware_setpoints(self, select: Select = None) -> np.ndarray:
        """The frequency setpoint (Hz)."""
        resolve_select(select, self.names, owner=self.name)
        return np.array([await self.frequency.setpoint.get_value()])

    async def stamped_readbacks(self, select: Select = None) -> tuple[np.ndarray, float]:
        """The frequency readback (Hz) and the time the IOC stamped it (epoch, s)."""
        resolve_select(select, self.names, owner=self.name)
        reading = (await self.frequency.readback.read())[self.frequency.readback.name]
        return np.array([float(reading["value"])]), float(reading["timestamp"])


class Dcct(StandardReadable):
    """Stored beam current ``current`` (mA, as served) and ``lifetime`` (h).

    Args:
        spec: the DCCT's description.
        protocol: EPICS transport.
        name: device name (default: ``spec.name``).
    """

    def __init__(
        self, spec: DeviceSpec, *, protocol: EpicsProtocol = "ca", name: str | None = None
    ) -> None:
        _check_kind(spec, "dcct")
        self.spec = spec
        self.current = epics_signal_r(float, pv(spec.pvs["current"], protocol))
        self.lifetime = epics_signal_r(float, pv(spec.pvs["lifetime"], protocol))
        self.add_readables([self.current], Format.HINTED_SIGNAL)
        self.add_readables([self.lifetime])
        self._units = ((self.current, spec.unit or "mA"), (self.lifetime, "h"))
        super().__init__(name=spec.name if name is None else name)

    async def describe(self) -> dict[str, DataKey]:
        """As StandardReadable, with units where the PVs state none."""
        return fill_units(await super().describe(), self._units)


class TuneMonitor(StandardReadable):
    """Fractional tunes ``x`` and ``y`` (dimensionless).

    Args:
        spec: the tune monitor's description.
        protocol: EPICS transport.
        name: device name (default: ``spec.name``).
    """

    def __init__(
        self, spec: DeviceSpec, *, protocol: EpicsProtocol = "ca", name: str | None = None
    ) -> None:
        _check_kind(spec, "tune")
        self.spec = spec
        self.x = epics_signal_r(float, pv(spec.pvs["x"], protocol))
        self.y = epics_signal_r(float, pv(spec.pvs["y"], protocol))
        self.add_readables([self.x, self.y], Format.HINTED_SIGNAL)
        super().__init__(name=spec.name if name is None else name)


@dataclass(frozen=True)
class EmittanceReading:
    """One publication of the emittance monitor, in SI.

    Attributes:
        emittance: (2,) equilibrium emittances (x, y) [m rad].
        size: (2,) rms beam sizes (x, y) at the source point [m].
        time: epoch of the magnet readbacks the values belong to (s).
        counter: the publication counter.
    """

    emittance: np.ndarray
    size: np.ndarray
    time: float
    counter: int


class EmittanceMonitor(StandardReadable, EpicsDevice):
    """Equilibrium emittances (``x``, ``y``: pm rad) and beam sizes (``size_x``/``size_y``: um).

    PVs follow :data:`accplans.config.EMITTANCE_PVS` (``<prefix>EMIT:``); build it with
    :meth:`for_machine`. ``timestamp`` is the epoch of the magnet readbacks the values belong
    to, ``counter`` increments at every publication (written last). :meth:`wait_for_reading`
    gives the first publication for readbacks at or after a time, in SI.
    """

    x: A[SignalR[float], PvSuffix("X"), Format.HINTED_SIGNAL]
    y: A[SignalR[float], PvSuffix("Y"), Format.HINTED_SIGNAL]
    size_x: A[SignalR[float], PvSuffix("SIZE_X")]
    size_y: A[SignalR[float], PvSuffix("SIZE_Y")]
    timestamp: A[SignalR[float], PvSuffix("TIME"), Format.UNCACHED_SIGNAL]
    counter: A[SignalR[int], PvSuffix("COUNTER"), Format.UNCACHED_SIGNAL]
    busy: A[SignalR[int], PvSuffix("BUSY")]

    def __init__(
        self, prefix: str, name: str = "", description: MachineDescription | None = None
    ) -> None:
        self.description = description
        super().__init__(prefix=prefix, name=name)

    @classmethod
    def for_machine(
        cls, description: MachineDescription, *, protocol: EpicsProtocol = "ca", name: str = ""
    ) -> EmittanceMonitor:
        """The emittance monitor of a machine (PVs ``<prefix>EMIT:*``)."""
        prefix = f"{protocol}://{description.machine.prefix}EMIT:"
        return cls(prefix=prefix, name=name or "emittance", description=description)

    async def read_reading(self) -> EmittanceReading:
        """The present values in SI, consistent (the counter did not move while reading)."""
        for _ in range(5):
            before = await self.counter.get_value()
            values = await asyncio.gather(
                self.x.get_value(),
                self.y.get_value(),
                self.size_x.get_value(),
                self.size_y.get_value(),
                self.timestamp.get_value(),
            )
            after = await self.counter.get_value()
            if before == after:
                ex, ey, sx, sy, t = (float(v) for v in values)
                return EmittanceReading(
                    emittance=np.array([ex, ey]) * 1e-12,
                    size=np.array([sx, sy]) * 1e-6,
                    time=t,
                    counter=int(after),
                )
        raise RuntimeError(f"{self.name}: values change faster than they can be read")

    async def wait_for_reading(
        self, *, after: float, newer_than: int = -1, timeout: float = 30.0
    ) -> EmittanceReading:
        """The first publication with ``time >= after`` and ``counter > newer_than``.

        Raises:
            TimeoutError: none within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            reading = await self.read_reading()
            if reading.time >= after - 1e-6 and reading.counter > newer_than:
                return reading
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no emittance reading for readbacks at or after "
                    f"{time.ctime(after)} within {timeout} s (last: counter {reading.counter}, "
                    f"time {reading.time:.3f})"
                )
            await asyncio.sleep(0.02)
