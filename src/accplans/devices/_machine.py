"""The machine: every device of a description, and ``connect()`` to the twin or the machine.

``connect`` reads ``<prefix>MACHINE:ID`` before anything else and refuses a machine whose
identity differs from the description's. ``mode="twin"`` only changes where the EPICS client
looks (the twin's loopback address and port); the devices are the same.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, Literal

from bluesky.run_engine import (
    call_in_bluesky_event_loop,
    get_bluesky_event_loop,
    in_bluesky_event_loop,
)
from ophyd_async.core import (
    DEFAULT_TIMEOUT,
    Device,
    DeviceMap,
    DeviceMock,
    NotConnectedError,
    Signal,
    default_mock_class,
    set_mock_value,
)
from ophyd_async.epics.core import epics_signal_r

from accplans.config import MachineDescription

from ._bpms import Bpm, BpmFamily
from ._calibrated import EpicsProtocol, pv
from ._knobs import Knob
from ._magnets import MAGNET_CLASSES, MagnetFamily
from ._monitors import Dcct, Rf, TuneMonitor

__all__ = [
    "Machine",
    "MachineConnectionError",
    "MachineIdentityError",
    "configure_twin_client",
    "connect",
    "connect_sync",
]

Mode = Literal["twin", "epics"]
_DEFAULT_PORTS = {"ca": 5064, "pva": 5076}
_ADDRESS_RE = re.compile(r"^[A-Za-z0-9_.\-]+(:[0-9]{1,5})?$")
_MAX_LISTED = 10


class MachineIdentityError(RuntimeError):
    """The control system answering is not the machine the description describes."""


class MachineConnectionError(ConnectionError):
    """Devices could not connect; the message names the PVs and devices."""


class _MachineMock(DeviceMock["Machine"]):
    """Mock mode: the mock machine serves its description's identity."""

    async def connect(self, device: Machine) -> None:
        set_mock_value(device.identity, device.description.machine.id)


@default_mock_class(_MachineMock)
class Machine(Device):
    """Every device of a machine description, built from its PV names.

    Attributes:
        description: the machine description.
        families: every family by name (a ``DeviceMap``: :class:`BpmFamily` and
            :class:`MagnetFamily`, members in lattice order).
        knobs: every knob of the description (:class:`Knob`).
        identity: the ``MACHINE:ID`` signal.
        rf, dcct, tune: the RF system, DCCT and tune monitor (``None`` if absent).
        others: devices in no family (``DeviceMap`` by device name).

    The usual families are properties: ``bpms``, ``hcorr``, ``vcorr``, ``quadrupoles``,
    ``sextupoles``, ``skew`` (``None`` if absent). Each resolves to the family of that
    conventional name or, failing that, to the only family of the kind (and plane).

    Build and connect with :func:`connect`; in tests,
    ``async with init_devices(mock=True): machine = Machine(description)``.

    Args:
        description: the machine description.
        protocol: EPICS transport of every signal (``"ca"`` or ``"pva"``).
        name: device name (default: the machine's name).
    """

    def __init__(
        self,
        description: MachineDescription,
        *,
        protocol: EpicsProtocol = "ca",
        name: str | None = None,
    ) -> None:
        self.description = description
        self.protocol: EpicsProtocol = protocol
        self.identity = epics_signal_r(str, pv(description.pvs["id"], protocol))
        families: dict[str, BpmFamily | MagnetFamily] = {}
        for fname, fam in description.families.items():
            if fam.kind == "bpm":
                families[fname] = BpmFamily(fname, description, protocol=protocol)
            elif fam.kind in MAGNET_CLASSES:
                families[fname] = MagnetFamily(fname, description, protocol=protocol)
        self.families: DeviceMap[BpmFamily | MagnetFamily] = DeviceMap(families)
        in_family: dict[str, Device] = {}
        members: dict[str, tuple[MagnetFamily, int]] = {}
        for family in families.values():
            for i, member in family.members.items():
                spec_name = family.specs[i].name
                in_family.setdefault(spec_name, member)
                if isinstance(family, MagnetFamily):
                    members.setdefault(spec_name, (family, i))
        rf: Rf | None = None
        dcct: Dcct | None = None
        tune: TuneMonitor | None = None
        others: dict[str, Device] = {}
        for spec in description.devices:
            if spec.name in in_family:
                continue
            if spec.kind == "rf" and rf is None:
                rf = Rf(spec, protocol=protocol, description=description)
            elif spec.kind == "dcct" and dcct is None:
                dcct = Dcct(spec, protocol=protocol)
            elif spec.kind == "tune" and tune is None:
                tune = TuneMonitor(spec, protocol=protocol)
            elif spec.kind == "bpm":
                others[spec.name] = Bpm(spec, protocol=protocol)
            elif spec.kind in MAGNET_CLASSES:
                others[spec.name] = MAGNET_CLASSES[spec.kind](
                    spec, protocol=protocol, description=description
                )
            elif spec.kind == "rf":
                others[spec.name] = Rf(spec, protocol=protocol, description=description)
            elif spec.kind == "dcct":
                others[spec.name] = Dcct(spec, protocol=protocol)
            else:
                others[spec.name] = TuneMonitor(spec, protocol=protocol)
        self.rf = rf
        self.dcct = dcct
        self.tune = tune
        self.others: DeviceMap[Device] = DeviceMap(others)
        self._by_name: dict[str, Device] = {**in_family}
        for single in (self.rf, self.dcct, self.tune):
            if single is not None:
                self._by_name[single.spec.name] = single
        self._by_name.update(others)
        self.knobs: dict[str, Knob] = {
            kname: Knob(kname, spec, members) for kname, spec in description.knobs.items()
        }
        self._roles = {
            "bpms": self._role("bpms", "bpm", None),
            "hcorr": self._role("hcorr", "corrector", "h"),
            "vcorr": self._role("vcorr", "corrector", "v"),
            "quadrupoles": self._role("quadrupoles", "quadrupole", None),
            "sextupoles": self._role("sextupoles", "sextupole", None),
            "skew": self._role("skew", "skew_quadrupole", None),
        }
        super().__init__(name=description.machine.name if name is None else name)

    def _role(self, conventional: str, kind: str, plane: str | None) -> str | None:
        fams = self.description.families
        if conventional in fams and fams[conventional].kind == kind:
            return conventional
        found = [
            n for n, f in fams.items() if f.kind == kind and (plane is None or f.plane == plane)
        ]
        return found[0] if len(found) == 1 else None

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        """Name the machine; families keep their own names, devices their description names."""
        super().set_name(name, child_name_separator=child_name_separator)
        for fname, family in self.families.items():
            family.set_name(fname)
        for single in (self.rf, self.dcct, self.tune):
            if single is not None:
                single.set_name(single.spec.name)
        for dname, device in self.others.items():
            device.set_name(dname)

    # -- lookups ---------------------------------------------------------------------------
    def _family(self, role: str) -> Any:
        key = self._roles[role]
        if key is None:
            raise AttributeError(
                f"machine {self.description.machine.name!r} has no single {role} family; "
                f"families: {sorted(self.description.families)} (use machine.families[...])"
            )
        return self.families[key]

    @property
    def bpms(self) -> BpmFamily:
        """The BPM family."""
        return self._family("bpms")

    @property
    def hcorr(self) -> MagnetFamily:
        """The horizontal corrector family."""
        return self._family("hcorr")

    @property
    def vcorr(self) -> MagnetFamily:
        """The vertical corrector family."""
        return self._family("vcorr")

    @property
    def quadrupoles(self) -> MagnetFamily:
        """The quadrupole family."""
        return self._family("quadrupoles")

    @property
    def sextupoles(self) -> MagnetFamily:
        """The sextupole family."""
        return self._family("sextupoles")

    @property
    def skew(self) -> MagnetFamily | None:
        """The skew quadrupole family, or ``None`` if the machine has none."""
        return self._family("skew") if self._roles["skew"] is not None else None

    def device(self, name: str) -> Device:
        """The device called ``name`` (a BPM, magnet, RF, DCCT or tune monitor)."""
        try:
            return self._by_name[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"machine {self.description.machine.name!r} has no device {name!r}{hint}"
            ) from None

    # -- identity --------------------------------------------------------------------------
    async def check_identity(self) -> str:
        """Read ``MACHINE:ID``; :class:`MachineIdentityError` if it is not the described id."""
        served = await self.identity.get_value()
        expected = self.description.machine.id
        if served != expected:
            raise MachineIdentityError(
                f"refusing to use the control system at {self.description.pvs['id']}: it "
                f"serves machine id {served!r}, but the description of machine "
                f"{self.description.machine.name!r} expects {expected!r}. "
                "Check the EPICS address (or the twin's port) and the description."
            )
        return served

    # -- connection errors -----------------------------------------------------------------
    def _walk(self, error: NotConnectedError, device: Device | None, path: str) -> Iterator[str]:
        for key, sub in error.sub_errors.items():
            child: Device | None = None
            if device is not None:
                child = dict(device.children()).get(key)
            where = f"{path}.{key}" if path else key
            if isinstance(sub, NotConnectedError) and sub.sub_errors:
                yield from self._walk(sub, child, where)
            else:
                owner = _owner_name(child) if child is not None else where
                source = child.source if isinstance(child, Signal) else where
                text = str(sub).strip()
                detail = f" ({type(sub).__name__}: {text})" if text and text not in source else ""
                yield f"{source.split('://')[-1]} (device {owner}){detail}"

    def connection_error(self, error: NotConnectedError, timeout: float) -> MachineConnectionError:
        """A :class:`MachineConnectionError` listing the PVs (and devices) that failed."""
        failed = list(self._walk(error, self, ""))
        listed = "\n  ".join(failed[:_MAX_LISTED])
        more = f"\n  ... and {len(failed) - _MAX_LISTED} more" if len(failed) > _MAX_LISTED else ""
        return MachineConnectionError(
            f"machine {self.description.machine.name!r}: {len(failed)} PV(s) did not connect "
            f"over {self.protocol.upper()} within {timeout} s:\n  {listed}{more}\n"
            f"{_environment_text(self.protocol)}"
        )


def _owner_name(device: Device) -> str:
    """Name of the device a signal belongs to (the signal's own name without its suffix)."""
    node: Device | None = device
    while node is not None and (isinstance(node, Signal) or not node.name):
        node = node.parent
    return node.name if node is not None else device.name


def _environment_text(protocol: EpicsProtocol) -> str:
    var = "EPICS_CA_ADDR_LIST" if protocol == "ca" else "EPICS_PVA_ADDR_LIST"
    auto = "EPICS_CA_AUTO_ADDR_LIST" if protocol == "ca" else "EPICS_PVA_AUTO_ADDR_LIST"
    return (
        f"Client environment: {var}={os.environ.get(var, '')!r} {auto}={os.environ.get(auto, '')!r}"
    )


# -- EPICS client environment ------------------------------------------------------------
def _client_context_exists(protocol: EpicsProtocol) -> bool:
    """Whether this process already created its CA (aioca) or PVA (p4p) client context."""
    if protocol == "ca":
        catools = sys.modules.get("aioca._catools")
        context = getattr(catools, "_Context", None)
        return bool(getattr(context, "_ca_context", None))
    p4p_backend = sys.modules.get("ophyd_async.epics.core._p4p")
    return getattr(p4p_backend, "_context", None) is not None


def _split(address: str, protocol: EpicsProtocol) -> tuple[str, int]:
    host, _, port = address.partition(":")
    return host, int(port) if port else _DEFAULT_PORTS[protocol]


def configure_twin_client(address: str | None = None, protocol: EpicsProtocol = "ca") -> None:
    """Point this process's EPICS client at a twin on ``address`` (``"127.0.0.1:PORT"``).

    The CA and PVA client contexts read their environment once, when first created in a
    process. If this process has none yet for ``protocol``, ``address`` is added to
    ``EPICS_CA_ADDR_LIST`` (or ``EPICS_PVA_ADDR_LIST``) and ``EPICS_CA_AUTO_ADDR_LIST`` (or
    ``EPICS_PVA_AUTO_ADDR_LIST``) is set to ``NO``. If the context exists already, the address
    must already be listed, or the twin cannot be reached from this process.

    Args:
        address: ``host[:port]`` of the twin's CA (UDP search) or PVA (UDP broadcast) port;
            default ``127.0.0.1`` with the protocol's default port.
        protocol: ``"ca"`` or ``"pva"``.

    Raises:
        ValueError: a malformed address, or a context that cannot reach ``address``.
    """
    if protocol not in _DEFAULT_PORTS:
        raise ValueError(f"protocol must be 'ca' or 'pva', got {protocol!r}")
    address = address or "127.0.0.1"
    if not _ADDRESS_RE.match(address) or not 0 < _split(address, protocol)[1] < 65536:
        raise ValueError(
            f"address must be 'host' or 'host:port' (e.g. '127.0.0.1:5064'), got {address!r}"
        )
    var = "EPICS_CA_ADDR_LIST" if protocol == "ca" else "EPICS_PVA_ADDR_LIST"
    auto = "EPICS_CA_AUTO_ADDR_LIST" if protocol == "ca" else "EPICS_PVA_AUTO_ADDR_LIST"
    listed = os.environ.get(var, "").split()
    wanted = _split(address, protocol)
    present = any(_split(entry, protocol) == wanted for entry in listed if _ADDRESS_RE.match(entry))
    if _client_context_exists(protocol):
        if not present:
            raise ValueError(
                f"cannot reach the twin at {address} over {protocol.upper()}: this process's "
                f"{protocol.upper()} client already exists and reads {var} only once, and "
                f"{var}={os.environ.get(var, '')!r} does not list {address}. List every twin's "
                "address before the first connection in this process, or connect from a new "
                "process."
            )
        return
    if not present:
        listed.append(address)
    os.environ[var] = " ".join(listed)
    os.environ[auto] = "NO"


# -- connect ------------------------------------------------------------------------------
async def connect(
    description: MachineDescription,
    mode: Mode = "twin",
    *,
    address: str | None = None,
    protocol: EpicsProtocol = "ca",
    timeout: float = DEFAULT_TIMEOUT,
) -> Machine:
    """Build every device of ``description``, check the machine's identity, connect them.

    ``MACHINE:ID`` is read first: a machine that serves another identity is refused before
    any other PV is touched.

    Args:
        description: the machine description.
        mode: ``"twin"`` (set the EPICS client to the twin's ``address``, see
            :func:`configure_twin_client`) or ``"epics"`` (use the environment as it is). Only
            where the client looks changes; the devices are the same.
        address: the twin's ``host:port`` for ``protocol`` (twin mode only; default
            ``127.0.0.1`` on the default port).
        protocol: ``"ca"`` or ``"pva"``.
        timeout: seconds to wait for the connections.

    Returns:
        The connected :class:`Machine`.

    Raises:
        MachineConnectionError: the identity PV or other PVs did not connect (they are named,
            with the devices they belong to and the client environment).
        MachineIdentityError: the machine serves another identity.
    """
    if mode == "twin":
        configure_twin_client(address, protocol)
    elif mode == "epics":
        if address is not None:
            raise ValueError("address= is for mode='twin'; mode='epics' uses the environment as is")
    else:
        raise ValueError(f"mode must be 'twin' or 'epics', got {mode!r}")
    machine = Machine(description, protocol=protocol)
    id_pv = description.pvs["id"]
    try:
        await machine.identity.connect(timeout=timeout)
    except NotConnectedError as exc:
        raise MachineConnectionError(
            f"cannot reach machine {description.machine.name!r}: its identity PV {id_pv} did "
            f"not connect over {protocol.upper()} within {timeout} s ({str(exc).strip()}). "
            f"Is the {'twin' if mode == 'twin' else 'IOC'} running"
            + (
                f" and serving {protocol.upper()} at {address or '127.0.0.1'}?"
                if mode == "twin"
                else "?"
            )
            + f" {_environment_text(protocol)}"
        ) from None
    await machine.check_identity()
    try:
        await machine.connect(timeout=timeout)
    except NotConnectedError as exc:
        raise machine.connection_error(exc, timeout) from None
    return machine


def connect_sync(
    description: MachineDescription,
    mode: Mode = "twin",
    *,
    address: str | None = None,
    protocol: EpicsProtocol = "ca",
    timeout: float = DEFAULT_TIMEOUT,
) -> Machine:
    """:func:`connect` from synchronous code (IPython, queueserver startup files).

    The devices are connected in the RunEngine's event loop (bluesky's
    ``call_in_bluesky_event_loop``), where plans will use them: create the RunEngine first.

    Raises:
        RuntimeError: no RunEngine event loop is running, or called from inside it (there,
            ``await connect(...)``).
    """
    if in_bluesky_event_loop():
        raise RuntimeError(
            "connect_sync() called inside the RunEngine's event loop: use await connect(...)"
        )
    loop = get_bluesky_event_loop()
    if loop is None or not loop.is_running():
        raise RuntimeError(
            "connect_sync() needs the RunEngine's event loop: create the RunEngine first "
            "(RE = RunEngine()), then connect; devices must live in the loop plans run in"
        )
    return call_in_bluesky_event_loop(
        connect(description, mode, address=address, protocol=protocol, timeout=timeout)
    )
