"""Adapters: a facility's existing ophyd (v1) devices as an orbit source and a magnet family.

They implement :class:`~accplans.devices.OrbitSource` and
:class:`~accplans.devices.SettableFamily` over ophyd v1 objects (``EpicsSignal``,
``EpicsMotor``, ``PVPositioner``, ``ophyd.sim`` devices), duck-typed: ophyd itself is not
imported. ophyd v1 reports completion through its ``Status`` objects and value changes through
``subscribe`` callbacks, possibly from other threads; both are bridged to the asyncio loop the
plan runs in, so nothing polls. ophyd v1 ``get()`` calls are synchronous: with EPICS signals
they return the monitored value and do not block for long.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from ophyd_async.core import AsyncStatus

from accplans.config import DeviceSpec, MachineDescription

from ._bpms import length_scale
from ._calibrated import FamilyCalibration
from ._protocols import OrbitFrame
from ._select import Select, resolve_select

__all__ = ["OphydV1MagnetFamily", "OphydV1OrbitSource"]


def _status_done(status: Any) -> asyncio.Future[None]:
    """An asyncio future that completes (or fails) with an ophyd v1 ``Status``."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if future.done():
            return
        exc = status.exception() if hasattr(status, "exception") else None
        if exc is None and getattr(status, "success", True):
            future.set_result(None)
        else:
            future.set_exception(exc or RuntimeError(f"{status!r} failed"))

    status.add_callback(lambda *_: loop.call_soon_threadsafe(settle))
    return future


def _value(obj: Any) -> Any:
    """The readback of a v1 positioner (``position``) or signal (``get()``)."""
    if hasattr(obj, "position"):
        return obj.position
    return obj.get()


def _setpoint(obj: Any) -> float:
    """The setpoint of a v1 positioner or signal."""
    for attr in ("user_setpoint", "setpoint"):
        sp = getattr(obj, attr, None)
        if sp is not None:
            return float(sp.get() if hasattr(sp, "get") else sp)
    return float(obj.get())


def _values(objs: Any) -> np.ndarray:
    """One array from a v1 array signal, or from a sequence of scalar signals."""
    if isinstance(objs, (list, tuple)):
        return np.asarray([_value(o) for o in objs], dtype=float)
    return np.asarray(_value(objs), dtype=float)


class OphydV1MagnetFamily:
    """ophyd v1 power supplies as a :class:`~accplans.devices.SettableFamily`.

    Each member is set with its own ``set()`` (all concurrently); a set is complete when every
    ``Status`` finished and every readback is within its tolerance. Limits and calibrations come
    from the members' descriptions, checked before anything is written.

    Args:
        specs: the members' descriptions (calibration, limits in A, tolerance in A), in order.
        devices: one ophyd v1 positioner or signal per member (its value in A).
        name: name used in messages.
        description: the machine description the members belong to.
    """

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        devices: Sequence[Any],
        *,
        name: str = "",
        description: MachineDescription | None = None,
    ) -> None:
        if len(specs) != len(devices):
            raise ValueError(f"{name}: {len(specs)} descriptions for {len(devices)} devices")
        for dev in devices:
            if not callable(getattr(dev, "set", None)):
                raise TypeError(f"{name}: {dev!r} has no set(): not an ophyd v1 settable device")
        self.name = name
        self.description = description
        self.devices = tuple(devices)
        self._calib = FamilyCalibration(specs)

    @classmethod
    def from_description(
        cls, description: MachineDescription, family: str, devices: Sequence[Any]
    ) -> OphydV1MagnetFamily:
        """Adapter for family ``family`` of ``description`` over ``devices`` (same order)."""
        return cls(
            description.family_devices(family), devices, name=family, description=description
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Member names."""
        return self._calib.names

    def select(self, select: Select = None) -> npt.NDArray[np.intp]:
        """Indices of the members chosen by ``select``."""
        return resolve_select(select, self._calib.names, owner=self.name)

    def limits(self, select: Select = None) -> tuple[np.ndarray, np.ndarray]:
        """Strength limits (low, high) in SI of the selected members."""
        return self._calib.limits(self.select(select))

    def check_strengths(self, values: npt.ArrayLike, select: Select = None) -> None:
        """Raise ``LimitError`` listing every selected member that cannot take ``values`` (SI)."""
        idx = self.select(select)
        _, problems = self._calib.problems(
            self._calib.values(values, idx, self.name), idx, hardware=False
        )
        if problems:
            raise self._calib.limit_error(self.name, problems, idx.size)

    async def strengths(self, select: Select = None) -> np.ndarray:
        """Strength readbacks (SI) of the selected members."""
        idx = self.select(select)
        hw = np.asarray([_value(self.devices[i]) for i in idx], dtype=float)
        return self._calib.cals.to_strength(hw, idx)

    async def hardware_setpoints(self, select: Select = None) -> np.ndarray:
        """Setpoints (A) of the selected members."""
        return np.asarray([_setpoint(self.devices[i]) for i in self.select(select)], dtype=float)

    async def hardware_readbacks(self, select: Select = None) -> np.ndarray:
        """Readbacks (A) of the selected members."""
        return np.asarray([_value(self.devices[i]) for i in self.select(select)], dtype=float)

    async def stamped_readbacks(self, select: Select = None) -> tuple[np.ndarray, float]:
        """Readbacks (A) and their time: the latest ophyd timestamp of the members read."""
        idx = self.select(select)
        values = np.asarray([_value(self.devices[i]) for i in idx], dtype=float)
        stamps = [float(getattr(self.devices[i], "timestamp", 0.0) or 0.0) for i in idx]
        return values, (max(stamps) if stamps and all(stamps) else time.time())

    @AsyncStatus.wrap
    async def set_strengths(self, values: npt.ArrayLike, select: Select = None) -> None:
        """Set strengths (SI) of the selected members; limits checked before any write."""
        await self._write(values, select, hardware=False)

    @AsyncStatus.wrap
    async def set_hardware(self, values: npt.ArrayLike, select: Select = None) -> None:
        """Write setpoints (A) of the selected members (restore); limits checked first."""
        await self._write(values, select, hardware=True)

    async def _write(self, values: npt.ArrayLike, select: Select, *, hardware: bool) -> None:
        idx = self.select(select)
        requested = self._calib.values(values, idx, self.name)
        hw, problems = self._calib.problems(requested, idx, hardware=hardware)
        if problems:
            raise self._calib.limit_error(self.name, problems, idx.size)
        statuses = [self.devices[i].set(float(h)) for i, h in zip(idx, hw, strict=True)]
        await asyncio.gather(*(_status_done(st) for st in statuses))
        rb = np.asarray([_value(self.devices[i]) for i in idx], dtype=float)
        off = np.flatnonzero(np.abs(rb - hw) > self._calib.tolerance[idx])
        if off.size:
            listed = ", ".join(
                f"{self._calib.names[idx[k]]} (setpoint {hw[k]:.6g}, readback {rb[k]:.6g})"
                for k in off[:10]
            )
            raise RuntimeError(f"{self.name}: set completed but readbacks are off: {listed}")


class OphydV1OrbitSource:
    """ophyd v1 BPM signals as an :class:`~accplans.devices.OrbitSource`.

    Args:
        names: BPM names, in array order.
        x: horizontal positions: one array signal, or one scalar signal per BPM.
        y: vertical positions, likewise.
        valid: validity (non-zero is valid), likewise; ``None``: all valid.
        counter: a signal that increments with every frame; ``None``: frames are counted
            from the updates of ``x`` (its first signal) seen by this adapter.
        timestamp: a signal holding the epoch time (s) of each frame; ``None``: the ophyd
            timestamp of the ``counter`` (or ``x``) update.
        unit: unit of ``x``/``y`` (``mm``, ``um``, ``m``).
        name: name used in messages.
        description: the machine description the BPMs belong to.
    """

    def __init__(
        self,
        names: Sequence[str],
        x: Any,
        y: Any,
        *,
        valid: Any = None,
        counter: Any = None,
        timestamp: Any = None,
        unit: str = "mm",
        name: str = "",
        description: MachineDescription | None = None,
    ) -> None:
        self._names = tuple(names)
        self.name = name
        self.description = description
        self.x, self.y, self.valid = x, y, valid
        self.counter, self.timestamp = counter, timestamp
        self._scale = length_scale(unit, name or "OphydV1OrbitSource")
        self._trigger = (
            counter if counter is not None else (x[0] if isinstance(x, (list, tuple)) else x)
        )
        self._seen = 0
        if counter is None:
            self._trigger.subscribe(self._count, run=False)

    def _count(self, *_: Any, **__: Any) -> None:
        self._seen += 1

    @property
    def names(self) -> tuple[str, ...]:
        """BPM names, in array order."""
        return self._names

    def _frame(self) -> OrbitFrame:
        n = len(self._names)
        x, y = _values(self.x), _values(self.y)
        valid = np.ones(n, dtype=bool) if self.valid is None else _values(self.valid) > 0.5
        for what, arr in (("x", x), ("y", y), ("valid", valid)):
            if arr.shape != (n,):
                raise ValueError(f"{self.name}: {what} has {arr.size} values for {n} BPMs")
        counter = int(_value(self.counter)) if self.counter is not None else self._seen
        if self.timestamp is not None:
            t = float(_value(self.timestamp))
        else:
            t = float(getattr(self._trigger, "timestamp", time.time()))
        return OrbitFrame(
            x=x * self._scale, y=y * self._scale, valid=valid, counter=counter, time=t
        )

    async def read_orbit(self) -> OrbitFrame:
        """The latest frame (x, y in m)."""
        return self._frame()

    async def wait_for_frame(
        self, after: float | None = None, counter: int | None = None, timeout: float = 10.0
    ) -> OrbitFrame:
        """The first frame with ``time > after`` and ``counter > counter`` (monitor-driven)."""
        loop = asyncio.get_running_loop()
        updated = asyncio.Event()

        def on_update(*_: Any, **__: Any) -> None:
            loop.call_soon_threadsafe(updated.set)

        token = self._trigger.subscribe(on_update, run=False)
        try:
            if after is None and counter is None:
                counter = self._frame().counter
            deadline = loop.time() + timeout
            while True:
                updated.clear()
                frame = self._frame()
                if (counter is None or frame.counter > counter) and (
                    after is None or frame.time > after
                ):
                    return frame
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name}: no BPM frame newer than time {after} / counter "
                        f"{counter} within {timeout} s (last: counter {frame.counter}, "
                        f"time {frame.time})"
                    )
                try:
                    await asyncio.wait_for(updated.wait(), remaining)
                except TimeoutError:
                    continue
        finally:
            self._trigger.unsubscribe(token)
