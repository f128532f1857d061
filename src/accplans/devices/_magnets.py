"""Magnets (correctors, quadrupoles, sextupoles, skew quadrupoles) and magnet families.

A magnet's PVs carry amperes; ``set(strength)`` takes its strength in SI (rad for a corrector
kick, m^-2 for a quadrupole or skew quadrupole K1, m^-3 for a sextupole K2). A family writes
all its members with one waveform put to its ``SP`` array PV (one put of 288 values costs
~3 ms, 288 scalar puts ~75 ms) and waits on its ``RB`` array PV.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import numpy.typing as npt
from event_model import DataKey
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    Array1D,
    AsyncStatus,
    DeviceMock,
    DeviceVector,
    SignalR,
    StandardReadable,
    callback_on_mock_put,
    default_mock_class,
    derived_signal_r,
    set_and_wait_for_other_value,
    set_mock_value,
)
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw

from accplans.config import DeviceSpec, MachineDescription

from ._calibrated import (
    CalibratedMovable,
    EpicsProtocol,
    FamilyCalibration,
    fill_units,
    pv,
)
from ._select import FamilyMembers, Select

__all__ = [
    "MAGNET_CLASSES",
    "Corrector",
    "Magnet",
    "MagnetFamily",
    "Quadrupole",
    "Sextupole",
    "SkewQuadrupole",
]

_MAX_LISTED = FamilyCalibration.max_listed


class Magnet(CalibratedMovable):
    """A magnet power supply: ``SP``/``RB`` in A, ``set(strength)`` in SI.

    ``set`` checks the limits first (a :class:`LimitError` names the device, the requested and
    current strengths and the limits; nothing is written), writes the current, and completes
    when the readback current is within ``DeviceSpec.tolerance`` (A) of it. Its timeout is the
    current change over the ramp rate (A/s) plus 10 s. ``read()`` gives the strength readback
    (SI, under the device's name) and the readback and setpoint currents (A).

    Args:
        spec: the magnet's description.
        protocol: EPICS transport (``"ca"`` or ``"pva"``).
        ramp_rate: power-supply ramp rate (A/s), for the move timeout (default per class).
        name: device name (default: ``spec.name``).
        description: the machine description, for a channel of a multi-channel magnet: its
            ``set`` then gives the beam the requested strength (see
            :class:`~accplans.devices.CalibratedMovable`).
    """

    #: The description kind this class drives (``None``: any magnet kind).
    kind: ClassVar[str | None] = None

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        protocol: EpicsProtocol = "ca",
        ramp_rate: float | None = None,
        name: str | None = None,
        description: MachineDescription | None = None,
    ) -> None:
        if spec.kind not in MAGNET_KINDS:
            raise ValueError(f"device {spec.name} is a {spec.kind}, not a magnet")
        if self.kind is not None and spec.kind != self.kind:
            raise ValueError(f"device {spec.name} is a {spec.kind}, not a {self.kind}")
        ct = description.crosstalk_of(spec.name) if description is not None else None
        partners = [description.device(n) for n in ct.devices] if ct and description else []
        super().__init__(
            spec,
            protocol=protocol,
            ramp_rate=ramp_rate,
            name=name,
            crosstalk=ct,
            partners=partners,
        )


class Corrector(Magnet):
    """A steering corrector: strength is the kick angle (rad)."""

    kind = "corrector"
    default_ramp_rate = 10.0


class Quadrupole(Magnet):
    """A quadrupole: strength is the normalized gradient K1 (m^-2)."""

    kind = "quadrupole"
    default_ramp_rate = 5.0


class Sextupole(Magnet):
    """A sextupole: strength is the normalized K2 (m^-3)."""

    kind = "sextupole"
    default_ramp_rate = 5.0


class SkewQuadrupole(Magnet):
    """A skew quadrupole winding: strength is the normalized skew gradient (m^-2)."""

    kind = "skew_quadrupole"
    default_ramp_rate = 10.0


#: Device class for each magnet kind of the description.
MAGNET_CLASSES: dict[str, type[Magnet]] = {
    "corrector": Corrector,
    "quadrupole": Quadrupole,
    "sextupole": Sextupole,
    "skew_quadrupole": SkewQuadrupole,
}
MAGNET_KINDS = frozenset(MAGNET_CLASSES)


class _FamilyMock(DeviceMock["MagnetFamily"]):
    """Mock mode: arrays start at zero; a put (family or member) updates setpoints and readbacks.

    This mirrors the twin: a put to the family ``SP`` sets every member, and a member's put
    shows up in the family arrays.
    """

    async def connect(self, device: MagnetFamily) -> None:
        n = len(device)
        set_mock_value(device.setpoint, np.zeros(n))
        set_mock_value(device.readback, np.zeros(n))

        def family_put(value: np.ndarray) -> None:
            values = np.asarray(value, dtype=float)
            set_mock_value(device.readback, values.copy())
            for i, member in device.members.items():
                set_mock_value(member.setpoint, float(values[i]))
                set_mock_value(member.readback, float(values[i]))

        callback_on_mock_put(device.setpoint, family_put)
        for i, member in device.members.items():
            callback_on_mock_put(member.setpoint, _member_put(device, i))


def _member_put(device: MagnetFamily, i: int):
    async def put(value: float) -> None:
        set_mock_value(device.members[i].readback, value)
        for signal in (device.setpoint, device.readback):
            array = np.array(await signal.get_value(), dtype=float)
            if array.shape == (len(device),):
                array[i] = value
                set_mock_value(signal, array)

    return put


@default_mock_class(_FamilyMock)
class MagnetFamily(FamilyMembers[Magnet], StandardReadable):
    """An ordered family of magnets (lattice order) with its ``SP``/``RB`` array PVs.

    Members are in ``members`` (a ``DeviceVector`` indexed 0..n-1, each named after its
    device); ``names`` lists them. Strengths are SI (rad, m^-2, m^-3), the array PVs amperes.
    ``select=`` takes names, integer indices or a boolean mask (see
    :func:`accplans.devices.resolve_select`).

    ``set_strengths`` (alias ``set``, so ``bps.mv(family, values, select=...)`` works)
    checks every selected member's limits first, then writes ONE waveform put to the family
    ``SP`` (members not selected keep their current setpoints) and completes when every selected
    readback is within its tolerance. ``read()`` gives the strength readbacks (SI) and the
    readback and setpoint currents (A) as arrays.

    Members that are channels of a multi-channel magnet (the description's ``crosstalk``) are
    set to the strength the beam sees: their currents are solved with the other channels'
    currents held, and :meth:`strengths`/:meth:`setpoint_strengths` apply the matrix (the
    ``strength_readback`` array stays each member's own calibration).

    Args:
        family: name of the family in the description.
        description: the machine description.
        protocol: EPICS transport.
        ramp_rate: power-supply ramp rate (A/s) of every member (default per magnet class).
        name: device name (default: ``family``).
    """

    def __init__(
        self,
        family: str,
        description: MachineDescription,
        *,
        protocol: EpicsProtocol = "ca",
        ramp_rate: float | None = None,
        name: str | None = None,
    ) -> None:
        spec = description.family(family)
        if spec.kind not in MAGNET_KINDS:
            raise ValueError(f"family {family} is a {spec.kind} family, not a magnet family")
        for key in ("setpoint", "readback"):
            if key not in spec.pvs:
                raise KeyError(f"family {family}: no array PV {key!r} in the description")
        self.family_spec = spec
        self.description = description
        self.specs: tuple[DeviceSpec, ...] = tuple(description.family_devices(family))
        cls = MAGNET_CLASSES[spec.kind]
        self.members = DeviceVector(
            {
                i: cls(s, protocol=protocol, ramp_rate=ramp_rate, description=description)
                for i, s in enumerate(self.specs)
            }
        )
        #: members that are channels of a multi-channel magnet (cross-talk)
        self._coupled = np.array(
            [description.crosstalk_of(s.name) is not None for s in self.specs], dtype=bool
        )
        n = len(self.specs)
        self._names = tuple(s.name for s in self.specs)
        self._calib = FamilyCalibration(self.specs)
        self._cals = self._calib.cals
        self._ramp = np.array([m.ramp_rate for m in self.members.values()], dtype=float)
        self.si_unit = self._calib.si_unit
        self.hardware_unit = self._calib.hardware_unit
        self.setpoint = epics_signal_rw(Array1D[np.float64], pv(spec.pvs["setpoint"], protocol))
        self.readback = epics_signal_r(Array1D[np.float64], pv(spec.pvs["readback"], protocol))
        cals = self._cals
        every = np.arange(n, dtype=np.intp)

        def strengths_of(readback: Array1D[np.float64]) -> Array1D[np.float64]:
            rb = np.asarray(readback, dtype=float)
            if rb.shape != (n,):
                return np.full(n, np.nan)
            return cals.to_strength(rb, every)

        self.strength_readback = derived_signal_r(
            strengths_of, derived_units=self.si_unit, readback=self.readback
        )
        self._hardware_units = (
            (self.setpoint, self.hardware_unit),
            (self.readback, self.hardware_unit),
        )
        self.add_readables([self.strength_readback], Format.HINTED_SIGNAL)
        self.add_readables([self.readback, self.setpoint])
        super().__init__(name=family if name is None else name)

    def limits(self, select: Select = None) -> tuple[np.ndarray, np.ndarray]:
        """Strength limits (low, high) in SI of the selected members."""
        return self._calib.limits(self.select(select))

    # -- conversions -----------------------------------------------------------------------
    def to_strength(self, hardware: npt.ArrayLike, select: Select = None) -> np.ndarray:
        """Hardware values (A) of the selected members -> strengths (SI)."""
        idx = self.select(select)
        return self._cals.to_strength(self._calib.values(hardware, idx, self.name), idx)

    def to_hardware(self, strength: npt.ArrayLike, select: Select = None) -> np.ndarray:
        """Strengths (SI) of the selected members -> hardware values (A)."""
        idx = self.select(select)
        return self._cals.to_hardware(self._calib.values(strength, idx, self.name), idx)

    def check_strengths(self, values: npt.ArrayLike, select: Select = None) -> None:
        """Raise :class:`LimitError` listing every selected member that cannot take ``values``.

        Args:
            values: strengths (SI) of the selected members, in the order of ``select`` (a
                scalar is applied to all of them).
            select: the members (default: all).
        """
        idx = self.select(select)
        values = self._calib.values(values, idx, self.name)
        _, problems = self._calib.problems(values, idx, hardware=False)
        if problems:
            raise self._calib.limit_error(self.name, problems, idx.size)

    # -- reading ---------------------------------------------------------------------------
    async def _array(self, signal: SignalR[Array1D[np.float64]], what: str) -> np.ndarray:
        value = np.asarray(await signal.get_value(), dtype=float)
        if value.shape != (len(self),):
            raise ValueError(
                f"{self.name}: the {what} array PV {signal.source} has {value.size} "
                f"elements, the family has {len(self)} members"
            )
        return value

    async def strengths(self, select: Select = None) -> np.ndarray:
        """Strength readbacks (SI) of the selected members, from one array read."""
        idx = self.select(select)
        rb = await self._array(self.readback, "readback")
        return await self._beam(self._cals.to_strength(rb[idx], idx), idx, readback=True)

    async def setpoint_strengths(self, select: Select = None) -> np.ndarray:
        """Strength setpoints (SI) of the selected members, from one array read."""
        idx = self.select(select)
        sp = await self._array(self.setpoint, "setpoint")
        return await self._beam(self._cals.to_strength(sp[idx], idx), idx, readback=False)

    async def _beam(
        self, nominal: np.ndarray, idx: npt.NDArray[np.intp], *, readback: bool
    ) -> np.ndarray:
        """Strengths the beam sees from the nominal ones (cross-talk of coupled members)."""
        coupled = np.flatnonzero(self._coupled[idx])
        if coupled.size == 0:
            return nominal
        out = nominal.copy()
        for k in coupled.tolist():
            member = self.members[int(idx[k])]
            out[k] = await member.beam_strength(float(nominal[k]), readback=readback)
        return out

    async def _nominal(self, values: np.ndarray, idx: npt.NDArray[np.intp]) -> np.ndarray:
        """Nominal strengths that give the beam ``values`` (other channels' currents held).

        Selected channels of one magnet (a family holding its H and V windings) are solved
        together: ``M[S, S] n_S = values_S - M[S, O] n_O``, the channels ``O`` not selected
        held at their present setpoints.
        """
        coupled = np.flatnonzero(self._coupled[idx])
        if coupled.size == 0:
            return values
        out = values.copy()
        groups: dict[tuple[str, ...], list[int]] = {}
        for k in coupled.tolist():
            crosstalk = self.members[int(idx[k])].crosstalk
            assert crosstalk is not None  # coupled members have one
            groups.setdefault(tuple(crosstalk.devices), []).append(k)
        for devices, ks in groups.items():
            first = self.members[int(idx[ks[0]])]
            assert first.crosstalk is not None
            held = await first.partner_nominal()  # the selected channels' entries are ignored
            channels = [devices.index(self._names[int(idx[k])]) for k in ks]
            out[ks] = first.crosstalk.nominal_for(values[ks], channels, held)
        return out

    async def hardware_setpoints(self, select: Select = None) -> np.ndarray:
        """Setpoint currents (A) of the selected members: what to write back to restore."""
        idx = self.select(select)
        return (await self._array(self.setpoint, "setpoint"))[idx]

    async def hardware_readbacks(self, select: Select = None) -> np.ndarray:
        """Readback currents (A) of the selected members."""
        idx = self.select(select)
        return (await self._array(self.readback, "readback"))[idx]

    async def stamped_readbacks(self, select: Select = None) -> tuple[np.ndarray, float]:
        """Readback currents (A) of the selected members and the time the IOC stamped them.

        The time (epoch, s) is when the readbacks last changed: an orbit frame whose time is
        at or after it was taken with these readbacks.
        """
        idx = self.select(select)
        reading = (await self.readback.read())[self.readback.name]
        value = np.asarray(reading["value"], dtype=float)
        if value.shape != (len(self),):
            raise ValueError(
                f"{self.name}: the readback array PV {self.readback.source} has {value.size} "
                f"elements, the family has {len(self)} members"
            )
        return value[idx], float(reading["timestamp"])

    # -- writing ---------------------------------------------------------------------------
    @AsyncStatus.wrap
    async def set_strengths(
        self, values: npt.ArrayLike, select: Select = None, *, timeout: float | None = None
    ) -> None:
        """Set the selected members' strengths (SI) with one family put; wait for the readbacks.

        Args:
            values: strengths (SI: rad, m^-2, m^-3) of the selected members, in the order of
                ``select`` (a scalar is applied to all of them).
            select: the members to set (default: all); the others keep their setpoints.
            timeout: seconds to wait for the readbacks (default: largest current change over
                the ramp rate, plus 10 s).

        Raises:
            LimitError: a value is out of limits (every offending member is listed, with its
                requested and current strengths); nothing was written.
            TimeoutError: readbacks not within tolerance in time (the members are listed).
        """
        await self._write(values, select, timeout, hardware=False)

    def set(
        self, value: npt.ArrayLike, select: Select = None, *, timeout: float | None = None
    ) -> AsyncStatus:
        """Alias of :meth:`set_strengths`, so the family is a bluesky ``Movable``."""
        return self.set_strengths(value, select, timeout=timeout)

    @AsyncStatus.wrap
    async def set_hardware(
        self, values: npt.ArrayLike, select: Select = None, *, timeout: float | None = None
    ) -> None:
        """Write setpoint currents (A) exactly, e.g. to restore :meth:`hardware_setpoints`.

        Same single put, limit check and completion as :meth:`set_strengths`.
        """
        await self._write(values, select, timeout, hardware=True)

    async def _write(
        self, values: npt.ArrayLike, select: Select, timeout: float | None, *, hardware: bool
    ) -> None:
        idx = self.select(select)
        requested = self._calib.values(values, idx, self.name)
        if not hardware:  # what each member's own calibration must give (cross-talk)
            requested = await self._nominal(requested, idx)
        hw, problems = self._calib.problems(requested, idx, hardware=hardware)
        if problems:
            try:
                rb = (await self._array(self.readback, "readback"))[idx]
                current = rb if hardware else self._cals.to_strength(rb, idx)
            except ValueError:  # the limit error matters more than the current value
                current = None
            unit = self.hardware_unit if hardware else self.si_unit
            raise self._calib.limit_error(self.name, problems, idx.size, current, unit)
        if idx.size == 0:
            return
        current_sp = await self._array(self.setpoint, "setpoint")
        target = current_sp.copy()
        target[idx] = hw
        if timeout is None:
            timeout = (
                float(np.max(np.abs(hw - current_sp[idx]) / self._ramp[idx])) + DEFAULT_TIMEOUT
            )
        tol = self._calib.tolerance[idx]
        n = len(self)

        def settled(readback: np.ndarray) -> bool:
            rb = np.asarray(readback, dtype=float)
            return rb.shape == (n,) and bool(np.all(np.abs(rb[idx] - hw) <= tol))

        try:
            await set_and_wait_for_other_value(
                self.setpoint, target, self.readback, settled, timeout=timeout
            )
        except TimeoutError:
            rb = np.asarray(await self.readback.get_value(), dtype=float)
            if rb.shape != (n,):
                raise TimeoutError(
                    f"{self.name}: readback array has {rb.size} elements, expected {n}"
                ) from None
            off = np.flatnonzero(np.abs(rb[idx] - hw) > tol)
            listed = ", ".join(
                f"{self._names[idx[k]]} (setpoint {hw[k]:.6g}, readback {rb[idx[k]]:.6g} "
                f"{self.hardware_unit})"
                for k in off[:_MAX_LISTED]
            )
            raise TimeoutError(
                f"{self.name}: {off.size} of {idx.size} readbacks did not come within tolerance "
                f"of their setpoints in {timeout:.3g} s: {listed}"
            ) from None

    async def describe(self) -> dict[str, DataKey]:
        """As StandardReadable, with the hardware unit where the PV states none."""
        return fill_units(await super().describe(), self._hardware_units)

    # convenience ---------------------------------------------------------------------------
    def specs_of(self, select: Select = None) -> Sequence[DeviceSpec]:
        """Descriptions of the selected members."""
        return [self.specs[int(i)] for i in self.select(select)]
