"""Turn-by-turn BPM buffers of a BPM family and the pinger that kicks the beam for them.

PV names follow :data:`accplans.config.TBT_PVS` (``<prefix><FAMILY>:TBT:``) and
:data:`accplans.config.PINGER_PVS` (``<prefix>PINGER:``). The buffers hold ``n_bpm * NTURNS``
values (mm, BPM-major); :meth:`TbtBuffers.read_buffers` gives them as (n_bpm, turns) in m.
Both default to PVA: a buffer of 320 BPMs x 1024 turns is 2.6 MB, beyond CA's default
``EPICS_CA_MAX_ARRAY_BYTES``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated as A
from typing import cast

import numpy as np
from ophyd_async.core import Array1D, SignalR, SignalRW, StandardReadable, observe_signals_value
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import EpicsDevice, PvSuffix

from accplans.config import MachineDescription

from ._bpms import length_scale
from ._calibrated import EpicsProtocol

__all__ = ["Pinger", "TbtBuffers", "TbtData"]

_READ_ATTEMPTS = 5


@dataclass
class TbtData:
    """One shot's buffers in SI.

    Attributes:
        x: (n_bpm, turns) horizontal positions (m), BPMs in family order.
        y: (n_bpm, turns) vertical positions (m).
        counter: buffer counter of the shot.
        time: epoch (s) of the shot.
    """

    x: np.ndarray
    y: np.ndarray
    counter: int
    time: float


class TbtBuffers(StandardReadable, EpicsDevice):
    """Turn-by-turn buffers of a BPM family (built with :meth:`for_family`).

    Args:
        prefix: PV prefix with the transport (``"pva://SR:BPM:TBT:"``).
        bpm_names: the family's BPMs, in the order of the buffers.
        unit: unit of the buffers' PVs.
        name: device name.
        description: the machine description (plans take the machine from it).

    Signals: ``x_hw``, ``y_hw`` (mm, BPM-major), ``turns`` (turns to acquire at the next
    shot, writable), ``nturns`` (turns in the present buffers), ``counter``, ``timestamp``
    (epoch of the shot, s).
    """

    x_hw: A[SignalR[Array1D[np.float64]], PvSuffix("X")]
    y_hw: A[SignalR[Array1D[np.float64]], PvSuffix("Y")]
    turns: A[SignalRW[int], PvSuffix("TURNS"), Format.CONFIG_SIGNAL]
    nturns: A[SignalR[int], PvSuffix("NTURNS"), Format.CONFIG_SIGNAL]
    counter: A[SignalR[int], PvSuffix("COUNTER"), Format.UNCACHED_SIGNAL]
    timestamp: A[SignalR[float], PvSuffix("TIME"), Format.UNCACHED_SIGNAL]

    def __init__(
        self,
        prefix: str,
        bpm_names: tuple[str, ...],
        unit: str = "mm",
        name: str = "",
        description: MachineDescription | None = None,
    ) -> None:
        self.description = description
        self.bpm_names = tuple(bpm_names)
        self.n_bpm = len(self.bpm_names)
        self._scale = length_scale(unit, f"TbT buffers {prefix}")
        super().__init__(prefix=prefix, name=name)

    @classmethod
    def for_family(
        cls,
        family: str,
        description: MachineDescription,
        *,
        protocol: EpicsProtocol = "pva",
        name: str | None = None,
    ) -> TbtBuffers:
        """The buffers of BPM family ``family`` (PVs ``<prefix><FAMILY>:TBT:*``)."""
        spec = description.family(family)
        if spec.kind != "bpm":
            raise ValueError(f"family {family} is a {spec.kind} family, not a bpm family")
        units = {s.unit or "mm" for s in description.family_devices(family)}
        if len(units) != 1:
            raise ValueError(f"family {family}: BPMs in different units {sorted(units)}")
        prefix = f"{protocol}://{description.machine.prefix}{family.upper()}:TBT:"
        return cls(
            prefix,
            tuple(spec.devices),
            units.pop(),
            name=name or f"{family}_tbt",
            description=description,
        )

    async def read_buffers(self) -> TbtData:
        """The present buffers in SI, consistent (the counter did not move while reading)."""
        for _ in range(_READ_ATTEMPTS):
            before = await self.counter.get_value()
            x, y, turns, t = await asyncio.gather(
                self.x_hw.get_value(),
                self.y_hw.get_value(),
                self.nturns.get_value(),
                self.timestamp.get_value(),
            )
            after = await self.counter.get_value()
            if before != after:
                continue
            shape = (self.n_bpm, int(turns))
            x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
            if x.size != self.n_bpm * int(turns) or y.size != x.size:
                raise ValueError(
                    f"{self.name}: buffers of {x.size}/{y.size} values, expected "
                    f"{self.n_bpm} BPMs x {turns} turns"
                )
            return TbtData(
                x=x.reshape(shape) * self._scale,
                y=y.reshape(shape) * self._scale,
                counter=int(after),
                time=float(t),
            )
        raise RuntimeError(f"{self.name}: buffers change faster than they can be read")

    async def wait_for_buffers(self, counter: int, timeout: float = 30.0) -> TbtData:
        """Wait (on a monitor of ``COUNTER``, never polling) for buffers newer than ``counter``.

        Raises:
            TimeoutError: none in ``timeout`` s.
        """
        last = None
        try:
            signals = cast("list[SignalR[int]]", [self.counter])
            async for _, value in observe_signals_value(*signals, done_timeout=timeout):
                last = int(value)
                if last > counter:
                    data = await self.read_buffers()
                    if data.counter > counter:
                        return data
        except TimeoutError:
            pass
        raise TimeoutError(
            f"{self.name}: no TbT buffers with COUNTER > {counter} within {timeout} s (last "
            f"{last}; PV {self.counter.source}): did the pinger fire?"
        )


class Pinger(StandardReadable, EpicsDevice):
    """The pinger: kicks of both planes (PVs in urad; ``set_kicks`` takes rad) and a trigger.

    Signals: ``kick_x``, ``kick_y`` (urad, writable), ``kick_max`` (urad), ``fire`` (write 1),
    ``busy`` (1 while the last shot's buffers are being acquired).
    """

    kick_x: A[SignalRW[float], PvSuffix("KICK_X"), Format.CONFIG_SIGNAL]
    kick_y: A[SignalRW[float], PvSuffix("KICK_Y"), Format.CONFIG_SIGNAL]
    kick_max: A[SignalR[float], PvSuffix("KICK_MAX"), Format.CONFIG_SIGNAL]
    fire: A[SignalRW[int], PvSuffix("FIRE")]
    busy: A[SignalR[int], PvSuffix("BUSY")]

    @classmethod
    def for_machine(
        cls, description: MachineDescription, *, protocol: EpicsProtocol = "pva", name: str = ""
    ) -> Pinger:
        """The pinger of a machine (PVs ``<prefix>PINGER:*``)."""
        prefix = f"{protocol}://{description.machine.prefix}PINGER:"
        return cls(prefix=prefix, name=name or "pinger")
