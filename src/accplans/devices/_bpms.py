"""Beam position monitors: one BPM, and a BPM family that reads and waits for orbit frames.

BPM PVs carry millimetres (the description's ``unit``); the devices give metres. A family
publishes its readings as arrays (``X``, ``Y``, ``VALID``) with a frame ``COUNTER`` that
increments with every frame and the ``TIME`` (epoch s) of the magnet readbacks the frame used,
so a plan can wait for a frame computed after its magnets settled
(:meth:`BpmFamily.wait_for_frame`).
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import numpy as np
from event_model import DataKey
from ophyd_async.core import (
    Array1D,
    DeviceMock,
    DeviceVector,
    SignalR,
    StandardReadable,
    default_mock_class,
    derived_signal_r,
    observe_signals_value,
    set_mock_value,
)
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import epics_signal_r

from accplans.config import DeviceSpec, MachineDescription

from ._calibrated import EpicsProtocol, fill_units, flag_r, pv, scaled_r
from ._protocols import OrbitFrame
from ._select import FamilyMembers

__all__ = ["Bpm", "BpmFamily", "length_scale"]

_SCALES = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "nm": 1e-9}
#: A frame read straddled by a new frame is repeated: at least this many times, and for at least
#: ``_READ_PERSIST_S`` (a client starved of CPU for a moment must not fail a long scan).
_READ_ATTEMPTS = 5
_READ_PERSIST_S = 3.0


def length_scale(unit: str, where: str) -> float:
    """Metres per ``unit`` (``mm`` -> 1e-3); ``ValueError`` naming ``where`` if unknown."""
    try:
        return _SCALES[unit]
    except KeyError:
        raise ValueError(
            f"{where}: unknown BPM unit {unit!r}; expected one of {sorted(_SCALES)}"
        ) from None


class Bpm(StandardReadable):
    """One BPM: ``x``, ``y`` in m (derived from the ``X``/``Y`` PVs in mm), ``valid`` (bool).

    Signals ``x_hw``/``y_hw``/``valid_hw`` are the PVs (mm, mm, integer 0/1).

    Args:
        spec: the BPM's description.
        protocol: EPICS transport.
        name: device name (default: ``spec.name``).
    """

    def __init__(
        self, spec: DeviceSpec, *, protocol: EpicsProtocol = "ca", name: str | None = None
    ) -> None:
        if spec.kind != "bpm":
            raise ValueError(f"device {spec.name} is a {spec.kind}, not a bpm")
        self.spec = spec
        scale = length_scale(spec.unit or "mm", f"device {spec.name}")
        self.x_hw = epics_signal_r(float, pv(spec.pvs["x"], protocol))
        self.y_hw = epics_signal_r(float, pv(spec.pvs["y"], protocol))
        self.valid_hw = epics_signal_r(int, pv(spec.pvs["valid"], protocol))

        self.x = scaled_r(self.x_hw, scale, "m")
        self.y = scaled_r(self.y_hw, scale, "m")
        self.valid = flag_r(self.valid_hw)
        self._hardware_units = ((self.x_hw, spec.unit), (self.y_hw, spec.unit))
        self.add_readables([self.x, self.y], Format.HINTED_SIGNAL)
        self.add_readables([self.valid])
        super().__init__(name=spec.name if name is None else name)

    async def describe(self) -> dict[str, DataKey]:
        """As StandardReadable, with the hardware unit where the PV states none."""
        return fill_units(await super().describe(), self._hardware_units)


class _BpmFamilyMock(DeviceMock["BpmFamily"]):
    """Mock mode: zero orbit, every BPM valid, counter 0, time 0."""

    async def connect(self, device: BpmFamily) -> None:
        n = len(device)
        set_mock_value(device.x_hw, np.zeros(n))
        set_mock_value(device.y_hw, np.zeros(n))
        set_mock_value(device.valid_hw, np.ones(n, dtype=np.int32))


@default_mock_class(_BpmFamilyMock)
class BpmFamily(FamilyMembers[Bpm], StandardReadable):
    """The BPMs of a family (lattice order) and the family's frame PVs.

    Members (``members``, a ``DeviceVector`` of :class:`Bpm` named after their devices) serve
    per-BPM reads; plans use the array PVs: :meth:`read_orbit` gives a whole frame in SI from
    one read of each array, :meth:`wait_for_frame` waits (on a monitor of ``COUNTER`` and
    ``TIME``, never polling) for the first frame computed after a given time.

    Signals: ``x_hw``, ``y_hw`` (mm arrays), ``valid_hw`` (0/1 int32 array), ``counter``
    (int), ``timestamp`` (epoch s, float); derived ``x``, ``y`` (m) and ``valid`` (bool).
    ``read()`` gives ``x``, ``y``, ``valid``, ``counter``, ``timestamp``.

    Args:
        family: name of the BPM family in the description.
        description: the machine description.
        protocol: EPICS transport.
        name: device name (default: ``family``).
    """

    def __init__(
        self,
        family: str,
        description: MachineDescription,
        *,
        protocol: EpicsProtocol = "ca",
        name: str | None = None,
    ) -> None:
        spec = description.family(family)
        if spec.kind != "bpm":
            raise ValueError(f"family {family} is a {spec.kind} family, not a bpm family")
        missing = [k for k in ("x", "y", "valid", "counter", "timestamp") if k not in spec.pvs]
        if missing:
            raise KeyError(f"family {family}: no array PVs {missing} in the description")
        self.family_spec = spec
        self.description = description
        self.specs: tuple[DeviceSpec, ...] = tuple(description.family_devices(family))
        units = {s.unit or "mm" for s in self.specs}
        if len(units) != 1:
            raise ValueError(f"family {family}: BPMs in different units {sorted(units)}")
        self.hardware_unit = units.pop()
        scale = length_scale(self.hardware_unit, f"family {family}")
        self._scale = scale
        self._names = tuple(s.name for s in self.specs)
        self.members = DeviceVector(
            {i: Bpm(s, protocol=protocol) for i, s in enumerate(self.specs)}
        )
        self.x_hw = epics_signal_r(Array1D[np.float64], pv(spec.pvs["x"], protocol))
        self.y_hw = epics_signal_r(Array1D[np.float64], pv(spec.pvs["y"], protocol))
        self.valid_hw = epics_signal_r(Array1D[np.int32], pv(spec.pvs["valid"], protocol))
        self.counter = epics_signal_r(int, pv(spec.pvs["counter"], protocol))
        self.timestamp = epics_signal_r(float, pv(spec.pvs["timestamp"], protocol))

        def x_metres(x_hw: Array1D[np.float64]) -> Array1D[np.float64]:
            return np.asarray(x_hw, dtype=float) * scale

        def y_metres(y_hw: Array1D[np.float64]) -> Array1D[np.float64]:
            return np.asarray(y_hw, dtype=float) * scale

        def valid_bool(valid_hw: Array1D[np.int32]) -> Array1D[np.bool_]:
            return np.asarray(valid_hw) != 0

        self.x = derived_signal_r(x_metres, derived_units="m", x_hw=self.x_hw)
        self.y = derived_signal_r(y_metres, derived_units="m", y_hw=self.y_hw)
        self.valid = derived_signal_r(valid_bool, valid_hw=self.valid_hw)
        self._hardware_units = (
            (self.x_hw, self.hardware_unit),
            (self.y_hw, self.hardware_unit),
            (self.timestamp, "s"),
        )
        self.add_readables([self.x, self.y], Format.HINTED_SIGNAL)
        self.add_readables([self.valid, self.counter, self.timestamp])
        super().__init__(name=family if name is None else name)

    async def describe(self) -> dict[str, DataKey]:
        """As StandardReadable, with the hardware unit where the PV states none."""
        return fill_units(await super().describe(), self._hardware_units)

    # -- frames ----------------------------------------------------------------------------
    def _array(self, value: np.ndarray, signal: SignalR) -> np.ndarray:
        array = np.asarray(value, dtype=float)
        if array.shape != (len(self),):
            raise ValueError(
                f"{self.name}: the array PV {signal.source} has {array.size} elements, "
                f"the family has {len(self)} BPMs"
            )
        return array

    async def read_orbit(self) -> OrbitFrame:
        """The latest frame in SI (x, y in m), consistent: all arrays from one counter value.

        The counter is read before and after the arrays; if a new frame arrived in between,
        the read is repeated (at least ``_READ_ATTEMPTS`` times and for ``_READ_PERSIST_S``).
        """
        give_up = time.monotonic() + _READ_PERSIST_S
        attempts = 0
        while attempts < _READ_ATTEMPTS or time.monotonic() < give_up:
            attempts += 1
            before = await self.counter.get_value()
            x, y, valid, t = await asyncio.gather(
                self.x_hw.get_value(),
                self.y_hw.get_value(),
                self.valid_hw.get_value(),
                self.timestamp.get_value(),
            )
            after = await self.counter.get_value()
            if before == after:
                return OrbitFrame(
                    x=self._array(x, self.x_hw) * self._scale,
                    y=self._array(y, self.y_hw) * self._scale,
                    valid=self._array(valid, self.valid_hw) != 0,
                    counter=int(after),
                    time=float(t),
                )
        raise RuntimeError(
            f"{self.name}: frames arrive faster than they can be read "
            f"({attempts} reads in {_READ_PERSIST_S:g} s each straddled a new frame)"
        )

    async def wait_for_frame(
        self, after: float | None = None, counter: int | None = None, timeout: float = 10.0
    ) -> OrbitFrame:
        """Wait for, and return, the first frame newer than ``after`` and ``counter``.

        Event-driven: a monitor of ``COUNTER`` and ``TIME``; the frame is then read with
        :meth:`read_orbit` and checked again.

        Args:
            after: epoch time (s); the frame's ``time`` must be later (e.g. the time the
                correctors settled, ``time.time()`` after their set completed).
            counter: the frame's counter must be larger (e.g. the last frame used).
            timeout: seconds to wait.

        Returns:
            The frame (x, y in m). If the current frame already qualifies it is returned at
            once. With neither ``after`` nor ``counter``, the next frame after the current one.

        On the twin, a completed put already guarantees that a frame computed from its
        readbacks was published: ``counter=`` (the counter of the last frame read before the
        put) returns that frame at once, while ``after=time.time()`` taken after the put waits
        for the next model tick (up to the twin's idle period, 0.1 s). ``after=`` is the form
        that also holds on a machine whose BPMs are not synchronised with the magnets.

        Raises:
            TimeoutError: no such frame in ``timeout`` s (the message gives the last frame).
        """
        if after is None and counter is None:
            counter = int(await self.counter.get_value())

        def fresh(c: int, t: float) -> bool:
            return (counter is None or c > counter) and (after is None or t > after)

        latest: dict[str, float] = {}
        try:
            signals = cast("list[SignalR[float]]", [self.counter, self.timestamp])
            async for signal, value in observe_signals_value(*signals, done_timeout=timeout):
                latest["counter" if signal is self.counter else "time"] = float(value)
                if len(latest) < 2 or not fresh(int(latest["counter"]), latest["time"]):
                    continue
                frame = await self.read_orbit()
                if fresh(frame.counter, frame.time):
                    return frame
        except TimeoutError:
            pass
        wanted = " and ".join(
            text
            for text in (
                f"TIME > {after:.6f}" if after is not None else "",
                f"COUNTER > {counter}" if counter is not None else "",
            )
            if text
        )
        raise TimeoutError(
            f"{self.name}: no BPM frame with {wanted} within {timeout} s; the last frame has "
            f"COUNTER {latest.get('counter')} and TIME {latest.get('time')} "
            f"(PV {self.counter.source}): is the machine publishing frames?"
        )
