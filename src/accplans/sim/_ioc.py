"""The twin's soft IOC: every PV of the description, served over CA and PVA by pythonSoftIOC.

Time behaviour (DESIGN.md, "The twin and the hardware switch"):

- Magnet setpoints (``SP``) ramp to readbacks (``RB``) at ``ramp_rate`` A/s (0: at once); the
  RF frequency and voltage follow their setpoints at once.
- A *model tick* applies a snapshot of all readbacks to the :class:`~accplans.sim.Twin` and
  publishes one BPM frame: the family waveforms ``X``, ``Y``, ``VALID``, ``TIME`` (epoch of the
  readback snapshot, s) and, last, ``COUNTER``. In ``event`` mode a tick runs a short
  coalescing ``window`` after the first change of a batch (and every ``idle_period`` without
  changes, with fresh noise); in ``periodic`` mode every ``period``.
- A put with completion (CA put-callback, PVA put with wait) on a setpoint completes once its
  readback has reached the setpoint *and* a tick that used that readback has been published:
  a client that reads the BPMs after a completed put sees its effect. A completed per-device
  put also has its own ``RB`` record current; a completed family put its ``RB`` waveform.
- Per-device scalar PVs (BPM ``X``/``Y``/``VALID``, the other magnets' ``RB``, the ``SP``
  mirrors of family puts) follow within a few ms (BPMs every ``scalar_period``): setting
  hundreds of scalar records costs tens of ms, so a tick never waits for them.

Twin controls and truth live under ``TWIN:<machine prefix>`` (no description may use them):
``RESET`` (put a seed), ``SEED``, ``KILL_BEAM``, ``REFILL``, ``BEAM``, ``LOSS_REASON``,
``DRIFT`` (um/s), ``RAMP_RATE`` (A/s), ``NOISE`` (0/1), ``EXPORT`` (put a directory; empty:
the startup export directory), ``EXPORT:PATH``, ``EXPORT:ERROR``, ``DCT`` (m), ``TICK_MS``
(duration of the last tick that recomputed the orbit, ms), and per BPM
family ``<FAMILY>:OFFSET_X``/``OFFSET_Y`` (mm), ``GAIN_X``/``GAIN_Y``, ``ROLL`` (rad),
``TRUE_X``/``TRUE_Y`` (true beam position, mm), per corrector family ``<FAMILY>:GAIN_ERR``,
and ``BAD_BPM`` (put ``"NAME KIND [VALUE]"``: see ``Twin.set_bad_bpm``; errors on
``BAD_BPM:ERROR``).

Turn by turn (``accplans.sim._tbt``; PV names from ``accplans.config.tbt_pvs`` and
``pinger_pvs``): a put of 1 to ``<prefix>PINGER:FIRE`` kicks the beam with ``KICK_X``/``KICK_Y``
(urad) and completes at once; the shot is tracked in a worker process (the IOC keeps serving)
and its buffers are published on every BPM family's ``<FAMILY>:TBT:X``/``Y`` (mm, BPM-major,
``NTURNS`` turns each), then ``TIME`` (epoch of the shot) and, last, ``COUNTER``. A shot fired
while the previous one is being tracked is refused (``PINGER:BUSY`` is 1).

Emittance monitor (``accplans.sim._emittance``; PV names from ``accplans.config.emittance_pvs``):
``<prefix>EMIT:X``/``Y`` (pm rad), ``SIZE_X``/``SIZE_Y`` (um), recomputed in a worker process
once the magnets have been still for a moment, stamped in ``TIME`` with the readback snapshot
they belong to, ``COUNTER`` last.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from accplans.config import (
    TWIN_PREFIX,
    DeviceSpec,
    MachineDescription,
    pinger_pvs,
    tbt_pvs,
)

from ._emittance import EmittanceServer
from ._tbt import track_shot
from ._twin import Frame, Twin
from ._workers import stop_pool, worker_pool

__all__ = ["IocSettings", "TwinIoc"]

_log = logging.getLogger(__name__)

_MAX_NAME = 60
#: signals the twin knows how to serve, by device kind and for families
_DEVICE_SIGNALS = {
    "bpm": {"x", "y", "valid"},
    "corrector": {"setpoint", "readback"},
    "quadrupole": {"setpoint", "readback"},
    "sextupole": {"setpoint", "readback"},
    "skew_quadrupole": {"setpoint", "readback"},
    "rf": {"frequency_setpoint", "frequency_readback", "voltage_setpoint", "voltage_readback"},
    "dcct": {"current", "lifetime"},
    "tune": {"x", "y"},
}
_FAMILY_SIGNALS = {
    "bpm": {"x", "y", "valid", "counter", "timestamp"},
    "corrector": {"setpoint", "readback"},
    "quadrupole": {"setpoint", "readback"},
    "sextupole": {"setpoint", "readback"},
    "skew_quadrupole": {"setpoint", "readback"},
}
_MAGNET_KINDS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")


@dataclass(frozen=True)
class IocSettings:
    """Timing of the twin's IOC.

    Attributes:
        ramp_rate: magnet ramp rate (A/s); 0 makes readbacks follow setpoints at once.
        tick: ``"event"`` (a tick per batch of changes) or ``"periodic"``.
        window: coalescing window of event ticks (s).
        period: tick period in periodic mode (s).
        idle_period: in event mode, a tick with fresh noise after this long without changes (s).
        scalar_period: refresh period of the per-BPM scalar PVs (s).
        export_dir: directory ``EXPORT`` writes to when given an empty path (default: a new
            temporary directory, created on first use).
    """

    ramp_rate: float = 1000.0
    tick: Literal["event", "periodic"] = "event"
    window: float = 0.002
    period: float = 0.1
    idle_period: float = 0.1
    scalar_period: float = 0.5
    export_dir: str | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.ramp_rate) or self.ramp_rate < 0:
            raise ValueError(f"ramp rate must be finite and >= 0 A/s, got {self.ramp_rate!r}")
        if self.tick not in ("event", "periodic"):
            raise ValueError(f"tick must be 'event' or 'periodic', got {self.tick!r}")
        for name in ("window", "period", "idle_period", "scalar_period"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0 or (name != "window" and value == 0):
                raise ValueError(f"IocSettings.{name}: bad duration {value!r} s")


@dataclass
class _Waiter:
    channels: np.ndarray
    versions: np.ndarray
    future: asyncio.Future[None]
    scalar: bool  # a per-device put: its RB record is refreshed before completion


@dataclass
class _MagnetFamily:
    name: str
    channels: np.ndarray
    low: np.ndarray
    high: np.ndarray
    sp: Any = None
    rb: Any = None


@dataclass
class _BpmFamily:
    name: str
    index: np.ndarray  # positions in twin.bpm_names
    records: dict[str, Any] = field(default_factory=dict)
    truth: dict[str, Any] = field(default_factory=dict)


def _check_name(name: str, where: str) -> str:
    if len(name) > _MAX_NAME:
        raise ValueError(f"{where}: PV name {name!r} is longer than {_MAX_NAME} characters")
    return name


class TwinIoc:
    """Serves a :class:`Twin` as a soft IOC (module docstring for the semantics).

    Create it, call :meth:`create_records` before ``iocInit``, then run :meth:`start` on the
    dispatcher's event loop.

    Args:
        twin: the twin to serve.
        settings: timing settings.
    """

    def __init__(self, twin: Twin, settings: IocSettings | None = None) -> None:
        self.twin = twin
        self.settings = settings if settings is not None else IocSettings()
        self.description: MachineDescription = twin.description
        self.prefix = self.description.machine.prefix
        self.twin_prefix = TWIN_PREFIX + self.prefix
        self.ramp_rate = self.settings.ramp_rate
        nmag = len(twin.magnet_names)
        self._nmag = nmag
        self._has_rf = twin.rf is not None
        nch = nmag + (2 if self._has_rf else 0)
        self._rf_f = nmag  # channel of the RF frequency
        self._rf_v = nmag + 1  # channel of the RF voltage
        self.sp = np.zeros(nch)
        self.rb = np.zeros(nch)
        self._ramp_from = np.zeros(nch)
        self._ramp_t0 = np.zeros(nch)
        self._moving = np.zeros(nch, dtype=bool)
        self._rampable = np.zeros(nch, dtype=bool)
        self._rampable[:nmag] = True
        self._sp_ver = np.zeros(nch, dtype=np.int64)
        self._reached_ver = np.zeros(nch, dtype=np.int64)
        self._version = 0
        self._waiters: list[_Waiter] = []
        self._counter = 0
        self._frame: Frame | None = None
        self._published_rb = np.full(nch, np.nan)
        self._rb_time = time.time()  # snapshot time of the tick that published _published_rb
        self._mirror_rb: set[int] = set()
        self._mirror_sp: set[int] = set()
        self._mirror_family_sp: set[str] = set()
        self._scalar_counter = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: asyncio.Event | None = None
        self._ramp_wake: asyncio.Event | None = None
        self._mirror_wake: asyncio.Event | None = None
        self._tick_done: asyncio.Event | None = None
        self._ramp_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._export_dir = self.settings.export_dir
        self._noise_default = twin.noise
        # records, filled by create_records
        self._sp_rec: list[Any] = [None] * nch
        self._rb_rec: list[Any] = [None] * nch
        self._bpm_x: list[Any] = []
        self._bpm_y: list[Any] = []
        self._bpm_valid: list[Any] = []
        self._magnet_families: dict[str, _MagnetFamily] = {}
        self._families_of: list[set[str]] = [set() for _ in range(nch)]
        self._bpm_families: dict[str, _BpmFamily] = {}
        self._corrector_truth: dict[str, Any] = {}
        self._dcct: dict[str, Any] = {}
        self._tune: dict[str, Any] = {}
        self._ctl: dict[str, Any] = {}
        self._tbt: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        self._pinger: dict[str, Any] = {}
        self._tbt_counter = 0
        self._pool: Any = None
        self._shot: asyncio.Task[None] | None = None
        self.emittance = EmittanceServer(twin, self.prefix)
        self.record_count = 0
        self._reset_channels()

    # -- records -----------------------------------------------------------------------------
    def create_records(self) -> None:
        """Create every record (before ``LoadDatabase``/``iocInit``)."""
        from softioc import builder

        desc = self.description
        twin = self.twin
        created: list[str] = []

        def name(pv: str, where: str) -> str:
            created.append(_check_name(pv, where))
            return pv

        for dev in desc.devices:
            unknown = set(dev.pvs) - _DEVICE_SIGNALS[dev.kind]
            if unknown:
                raise ValueError(
                    f"device {dev.name}: the twin cannot serve signals {sorted(unknown)} "
                    f"(a {dev.kind} has {sorted(_DEVICE_SIGNALS[dev.kind])})"
                )
        bpm_pos = {n: i for i, n in enumerate(twin.bpm_names)}
        nb = len(twin.bpm_names)
        self._bpm_x = [None] * nb
        self._bpm_y = [None] * nb
        self._bpm_valid = [None] * nb
        for dev in desc.devices:
            where = f"device {dev.name}"
            pvs = dev.pvs
            if dev.kind == "bpm":
                i = bpm_pos[dev.name]
                if "x" in pvs:
                    self._bpm_x[i] = builder.aIn(
                        name(pvs["x"], where), initial_value=0.0, PREC=6, EGU="mm"
                    )
                if "y" in pvs:
                    self._bpm_y[i] = builder.aIn(
                        name(pvs["y"], where), initial_value=0.0, PREC=6, EGU="mm"
                    )
                if "valid" in pvs:
                    self._bpm_valid[i] = builder.longIn(name(pvs["valid"], where), initial_value=0)
            elif dev.kind in _MAGNET_KINDS:
                ch = twin.magnet_index[dev.name]
                self._magnet_records(builder, dev, ch, name)
            elif dev.kind == "rf":
                self._rf_records(builder, dev, name)
            elif dev.kind == "dcct":
                if "current" in pvs:
                    self._dcct["current"] = builder.aIn(
                        name(pvs["current"], where), initial_value=0.0, PREC=4, EGU="mA"
                    )
                if "lifetime" in pvs:
                    self._dcct["lifetime"] = builder.aIn(
                        name(pvs["lifetime"], where), initial_value=0.0, PREC=3, EGU="h"
                    )
            elif dev.kind == "tune":
                for sig in ("x", "y"):
                    if sig in pvs:
                        self._tune[sig] = builder.aIn(
                            name(pvs[sig], where), initial_value=0.0, PREC=6
                        )
        for fname, fam in desc.families.items():
            self._family_records(builder, fname, fam.kind, fam.devices, fam.pvs, name)
        for key, pv in desc.pvs.items():
            if key != "id":
                raise ValueError(f"pvs.{key}: the twin only serves the machine 'id' PV")
            ident = desc.machine.id
            where = "pvs.id"
            if len(ident) < 40:
                builder.stringIn(name(pv, where), initial_value=ident)
            else:
                builder.longStringIn(name(pv, where), initial_value=ident, length=len(ident) + 1)
        self._control_records(builder, name)
        self._tbt_records(builder, name)
        self.emittance.create_records(builder, name)
        self.record_count = len(created)
        if len(set(created)) != len(created):
            dupes = sorted({n for n in created if created.count(n) > 1})
            raise ValueError(f"PV names used twice: {dupes[:5]}")

    def _magnet_records(
        self, builder: Any, dev: DeviceSpec, ch: int, name: Callable[[str, str], str]
    ) -> None:
        where = f"device {dev.name}"
        low, high = dev.limits if dev.limits is not None else (None, None)
        if "setpoint" in dev.pvs:
            self._sp_rec[ch] = builder.aOut(
                name(dev.pvs["setpoint"], where),
                initial_value=float(self.sp[ch]),
                DRVL=low,
                DRVH=high,
                PREC=6,
                EGU=dev.unit,
                always_update=True,
                blocking=True,
                validate=_finite_scalar,
                on_update=partial(self._on_channel_put, ch),
            )
        if "readback" in dev.pvs:
            self._rb_rec[ch] = builder.aIn(
                name(dev.pvs["readback"], where),
                initial_value=float(self.rb[ch]),
                PREC=6,
                EGU=dev.unit,
                TSE=-2,  # stamped with the snapshot time of the tick that published it
            )

    def _rf_records(self, builder: Any, dev: DeviceSpec, name: Callable[[str, str], str]) -> None:
        where = f"device {dev.name}"
        low, high = dev.limits if dev.limits is not None else (None, None)
        vmax = max(10.0 * self.twin.design_rf_voltage, 1.0)
        for ch, sp, rb, lo, hi, unit, prec in (
            (self._rf_f, "frequency_setpoint", "frequency_readback", low, high, "Hz", 3),
            (self._rf_v, "voltage_setpoint", "voltage_readback", 0.0, vmax, "V", 1),
        ):
            if sp in dev.pvs:
                self._sp_rec[ch] = builder.aOut(
                    name(dev.pvs[sp], where),
                    initial_value=float(self.sp[ch]),
                    DRVL=lo,
                    DRVH=hi,
                    PREC=prec,
                    EGU=unit,
                    always_update=True,
                    blocking=True,
                    validate=_finite_scalar,
                    on_update=partial(self._on_channel_put, ch),
                )
            if rb in dev.pvs:
                self._rb_rec[ch] = builder.aIn(
                    name(dev.pvs[rb], where),
                    initial_value=float(self.rb[ch]),
                    PREC=prec,
                    EGU=unit,
                    TSE=-2,  # stamped with the snapshot time of the tick that published it
                )

    def _family_records(
        self,
        builder: Any,
        fname: str,
        kind: str,
        devices: list[str],
        pvs: dict[str, str],
        name: Callable[[str, str], str],
    ) -> None:
        where = f"family {fname}"
        known = _FAMILY_SIGNALS.get(kind, set())
        unknown = set(pvs) - known
        if unknown:
            raise ValueError(f"{where}: the twin cannot serve array signals {sorted(unknown)}")
        twin = self.twin
        tp = self.twin_prefix + fname.upper() + ":"
        if kind == "bpm":
            pos = {n: i for i, n in enumerate(twin.bpm_names)}
            fam = _BpmFamily(fname, np.array([pos[d] for d in devices], dtype=np.int64))
            n = len(devices)
            for sig, dtype, egu in (
                ("x", float, "mm"),
                ("y", float, "mm"),
                ("valid", np.int32, ""),
            ):
                if sig in pvs:
                    fam.records[sig] = builder.WaveformIn(
                        name(pvs[sig], where), initial_value=np.zeros(n, dtype=dtype), EGU=egu
                    )
            if "counter" in pvs:
                fam.records["counter"] = builder.longIn(
                    name(pvs["counter"], where), initial_value=0
                )
            if "timestamp" in pvs:
                fam.records["timestamp"] = builder.aIn(
                    name(pvs["timestamp"], where), initial_value=0.0, PREC=6, EGU="s"
                )
            for sig, egu in (
                ("OFFSET_X", "mm"),
                ("OFFSET_Y", "mm"),
                ("GAIN_X", ""),
                ("GAIN_Y", ""),
                ("ROLL", "rad"),
                ("TRUE_X", "mm"),
                ("TRUE_Y", "mm"),
            ):
                fam.truth[sig] = builder.WaveformIn(
                    name(tp + sig, f"{where} (twin truth)"), initial_value=np.zeros(n), EGU=egu
                )
            self._bpm_families[fname] = fam
            return
        if kind not in _MAGNET_KINDS:
            return
        channels = np.array([twin.magnet_index[d] for d in devices], dtype=np.int64)
        specs = [self.description.device(d) for d in devices]
        low = np.array([s.limits[0] if s.limits else -np.inf for s in specs])
        high = np.array([s.limits[1] if s.limits else np.inf for s in specs])
        fam = _MagnetFamily(fname, channels, low, high)
        unit = specs[0].unit
        if "setpoint" in pvs:
            fam.sp = builder.WaveformOut(
                name(pvs["setpoint"], where),
                initial_value=self.sp[channels].copy(),
                EGU=unit,
                always_update=True,
                blocking=True,
                validate=partial(_valid_array, len(channels)),
                on_update=partial(self._on_family_put, fname),
            )
        if "readback" in pvs:
            fam.rb = builder.WaveformIn(
                name(pvs["readback"], where),
                initial_value=self.rb[channels].copy(),
                EGU=unit,
                TSE=-2,  # stamped with the snapshot time of the tick that published it
            )
        if kind == "corrector":
            self._corrector_truth[fname] = builder.WaveformIn(
                name(tp + "GAIN_ERR", f"{where} (twin truth)"), initial_value=np.zeros(len(devices))
            )
        self._magnet_families[fname] = fam
        for ch in channels.tolist():
            self._families_of[ch].add(fname)

    def _control_records(self, builder: Any, name: Callable[[str, str], str]) -> None:
        tp = self.twin_prefix
        where = "twin control"
        c = self._ctl
        c["reset"] = builder.longOut(
            name(tp + "RESET", where),
            initial_value=self.twin.seed,
            DRVL=0,
            always_update=True,
            blocking=True,
            on_update=self._on_reset,
        )
        c["seed"] = builder.longIn(name(tp + "SEED", where), initial_value=self.twin.seed)
        c["kill"] = builder.longOut(
            name(tp + "KILL_BEAM", where),
            initial_value=0,
            always_update=True,
            blocking=True,
            on_update=self._on_kill,
        )
        c["refill"] = builder.longOut(
            name(tp + "REFILL", where),
            initial_value=0,
            always_update=True,
            blocking=True,
            on_update=self._on_refill,
        )
        c["beam"] = builder.longIn(name(tp + "BEAM", where), initial_value=1)
        c["reason"] = builder.longStringIn(
            name(tp + "LOSS_REASON", where), initial_value="", length=256
        )
        c["drift"] = builder.aOut(
            name(tp + "DRIFT", where),
            initial_value=0.0,
            DRVL=0.0,
            DRVH=1e6,
            PREC=6,
            EGU="um/s",
            always_update=True,
            blocking=True,
            validate=_finite_scalar,
            on_update=self._on_drift,
        )
        c["circumference_error"] = builder.aOut(
            name(tp + "CIRCUMFERENCE_ERROR", where),
            initial_value=0.0,
            DRVL=-1e5,
            DRVH=1e5,
            PREC=3,
            EGU="um",
            always_update=True,
            blocking=True,
            validate=_finite_scalar,
            on_update=self._on_circumference_error,
        )
        c["ramp_rate"] = builder.aOut(
            name(tp + "RAMP_RATE", where),
            initial_value=self.ramp_rate,
            DRVL=0.0,
            DRVH=1e9,
            PREC=3,
            EGU="A/s",
            always_update=True,
            blocking=True,
            validate=_finite_scalar,
            on_update=self._on_ramp_rate,
        )
        c["noise"] = builder.longOut(
            name(tp + "NOISE", where),
            initial_value=int(self.twin.noise),
            DRVL=0,
            DRVH=1,
            always_update=True,
            blocking=True,
            on_update=self._on_noise,
        )
        c["export"] = builder.longStringOut(
            name(tp + "EXPORT", where),
            initial_value="",
            length=1024,
            always_update=True,
            blocking=True,
            on_update=self._on_export,
        )
        c["export_path"] = builder.longStringIn(
            name(tp + "EXPORT:PATH", where), initial_value="", length=1024
        )
        c["export_error"] = builder.longStringIn(
            name(tp + "EXPORT:ERROR", where), initial_value="", length=1024
        )
        c["dct"] = builder.aIn(name(tp + "DCT", where), initial_value=0.0, PREC=12, EGU="m")
        c["bad_bpm"] = builder.longStringOut(
            name(tp + "BAD_BPM", where),
            initial_value="",
            length=1024,
            always_update=True,
            blocking=True,
            on_update=self._on_bad_bpm,
        )
        c["bad_bpm_error"] = builder.longStringIn(
            name(tp + "BAD_BPM:ERROR", where), initial_value="", length=1024
        )
        c["tick_ms"] = builder.aIn(name(tp + "TICK_MS", where), initial_value=0.0, PREC=3, EGU="ms")

    def _tbt_records(self, builder: Any, name: Callable[[str, str], str]) -> None:
        """Turn-by-turn buffers of every BPM family and the pinger (module docstring)."""
        twin = self.twin
        s = twin.tbt_settings
        prefix = self.prefix
        for fname, fam in self.description.families.items():
            if fam.kind != "bpm":
                continue
            where = f"family {fname} (turn by turn)"
            pos = {n: i for i, n in enumerate(twin.bpm_names)}
            index = np.array([pos[d] for d in fam.devices], dtype=np.int64)
            pvs = tbt_pvs(prefix, fname)
            length = len(index) * s.max_turns
            rec: dict[str, Any] = {}
            for sig in ("x", "y"):
                rec[sig] = builder.WaveformIn(
                    name(pvs[sig], where), length=length, datatype=float, EGU="mm"
                )
            rec["turns"] = builder.longOut(
                name(pvs["turns"], where),
                initial_value=s.turns,
                DRVL=1,
                DRVH=s.max_turns,
                always_update=True,
            )
            rec["nturns"] = builder.longIn(name(pvs["nturns"], where), initial_value=0)
            rec["counter"] = builder.longIn(name(pvs["counter"], where), initial_value=0)
            rec["timestamp"] = builder.aIn(
                name(pvs["timestamp"], where), initial_value=0.0, PREC=6, EGU="s"
            )
            self._tbt[fname] = (index, rec)
        where = "pinger"
        pvs = pinger_pvs(prefix)
        kmax = s.kick_max_rad * 1e6
        p = self._pinger
        for sig in ("kick_x", "kick_y"):
            p[sig] = builder.aOut(
                name(pvs[sig], where),
                initial_value=0.0,
                DRVL=-kmax,
                DRVH=kmax,
                PREC=3,
                EGU="urad",
                always_update=True,
                validate=_finite_scalar,
            )
        p["kick_max"] = builder.aIn(
            name(pvs["kick_max"], where), initial_value=kmax, PREC=3, EGU="urad"
        )
        p["busy"] = builder.longIn(name(pvs["busy"], where), initial_value=0)
        p["fire"] = builder.longOut(
            name(pvs["fire"], where),
            initial_value=0,
            always_update=True,
            blocking=True,
            validate=self._can_fire,
            on_update=self._on_fire,
        )

    def _can_fire(self, _record: Any, value: int) -> bool:
        if int(value) != 1:
            return False
        if self._pinger["busy"].get():
            _log.warning("pinger: a shot is still being tracked; FIRE refused")
            return False
        self._pinger["busy"].set(1)  # at once: a second FIRE before the shot starts is refused
        return True

    async def _on_fire(self, _value: int) -> None:
        """Kick now: the machine as it is goes to the worker; the buffers come later.

        ``_can_fire`` set BUSY; from the start of :meth:`_track` on, that task clears it. A
        failure before (a refused tracking request) clears it here and is raised again, so that
        a shot that never started does not refuse every later FIRE.
        """
        twin = self.twin
        try:
            turns = (
                min(int(rec["turns"].get()) for _, rec in self._tbt.values()) if self._tbt else 1
            )
            kick = (self._pinger["kick_x"].get() * 1e-6, self._pinger["kick_y"].get() * 1e-6)
            now = time.time()
            request = twin.tbt_request(kick[0], kick[1], turns)
            self._pinger["busy"].set(1)
            self._shot = asyncio.get_running_loop().create_task(self._track(request, now))
        except BaseException:
            self._pinger["busy"].set(0)
            raise

    async def _track(self, request: Any, shot_time: float) -> None:
        try:
            if self._pool is None:
                self._pool = worker_pool()
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._pool, track_shot, request)
            x, y = self.twin.tbt_readings(result)
            self._tbt_counter += 1
            turns = x.shape[1]
            for index, rec in self._tbt.values():
                rec["x"].set((x[index] * 1e3).ravel())
                rec["y"].set((y[index] * 1e3).ravel())
                rec["nturns"].set(turns)
                rec["timestamp"].set(shot_time)
            if result.lost_turn >= 0:
                await self._next_tick()
            # ready for the next shot before the counters say this one is done: a client that
            # fires as soon as it sees the buffers is not refused
            self._pinger["busy"].set(0)
            for _, rec in self._tbt.values():
                rec["counter"].set(self._tbt_counter)
        except Exception:  # never let a shot kill the IOC
            _log.exception("pinger shot failed")
        finally:
            self._pinger["busy"].set(0)

    async def _on_bad_bpm(self, text: str) -> None:
        try:
            words = text.split()
            if len(words) not in (2, 3):
                raise ValueError(f"expected 'NAME KIND [VALUE]', got {text!r}")
            value = float(words[2]) if len(words) == 3 else 0.0
            self.twin.set_bad_bpm(words[0], words[1], value)
        except ValueError as exc:
            self._ctl["bad_bpm_error"].set(f"{exc}"[:1000])
            return
        self._ctl["bad_bpm_error"].set("")
        await self._next_tick()

    # -- channels ----------------------------------------------------------------------------
    def _reset_channels(self) -> None:
        """Setpoints and readbacks to the twin's current (design) values."""
        twin = self.twin
        self.sp[: self._nmag] = twin.design_hardware
        if self._has_rf:
            self.sp[self._rf_f] = twin.rf_frequency
            self.sp[self._rf_v] = twin.rf_voltage
        self.rb[:] = self.sp
        self._moving[:] = False
        self._version += 1
        self._sp_ver[:] = self._version
        self._reached_ver[:] = self._version

    def _request(self, channels: np.ndarray, values: np.ndarray) -> np.ndarray:
        """New setpoints; start ramps (or set readbacks at once). Returns the versions to await."""
        now = time.monotonic()
        self._version += 1
        self.sp[channels] = values
        self._sp_ver[channels] = self._version
        ramp = self._rampable[channels] & (self.ramp_rate > 0)
        instant = channels[~ramp]
        self.rb[instant] = self.sp[instant]
        self._reached_ver[instant] = self._version
        self._moving[instant] = False
        slow = channels[ramp]
        if slow.size:
            self._advance_ramps(now)
            self._ramp_from[slow] = self.rb[slow]
            self._ramp_t0[slow] = now
            moving = self.rb[slow] != self.sp[slow]
            self._moving[slow] = moving
            done = slow[~moving]
            self._reached_ver[done] = self._version
            if np.any(moving):
                self._start_ramp()
        self._mark_dirty()
        return self._sp_ver[channels].copy()

    def _advance_ramps(self, now: float) -> bool:
        """Move ramping readbacks to where they are at ``now``; True if any moved."""
        idx = np.flatnonzero(self._moving)
        if idx.size == 0:
            return False
        rate = self.ramp_rate
        target = self.sp[idx]
        start = self._ramp_from[idx]
        if rate <= 0:
            remaining = np.zeros(idx.size)
        else:
            remaining = np.abs(target - start) - rate * (now - self._ramp_t0[idx])
        done = remaining <= 0
        self.rb[idx] = np.where(done, target, target - np.sign(target - start) * remaining)
        finished = idx[done]
        self._reached_ver[finished] = self._sp_ver[finished]
        self._moving[finished] = False
        return True

    def _start_ramp(self) -> None:
        assert self._ramp_wake is not None
        self._ramp_wake.set()
        if self._ramp_task is None or self._ramp_task.done():
            self._ramp_task = asyncio.get_running_loop().create_task(self._ramp_loop())

    async def _ramp_loop(self) -> None:
        assert self._ramp_wake is not None
        step = min(0.01, self.settings.period)
        while np.any(self._moving):
            idx = np.flatnonzero(self._moving)
            now = time.monotonic()
            rate = self.ramp_rate
            if rate > 0:
                left = (np.abs(self.sp[idx] - self._ramp_from[idx])) / rate - (
                    now - self._ramp_t0[idx]
                )
                delay = float(np.clip(left.min(), 0.0, step))
            else:
                delay = 0.0
            self._ramp_wake.clear()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._ramp_wake.wait(), delay)
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)
            if self._advance_ramps(time.monotonic()):
                self._mark_dirty()

    def _mark_dirty(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    async def _await_versions(
        self, channels: np.ndarray, versions: np.ndarray, *, scalar: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(channels, versions, loop.create_future(), scalar)
        self._waiters.append(waiter)
        await waiter.future

    # -- put handlers ------------------------------------------------------------------------
    async def _on_channel_put(self, ch: int, value: float) -> None:
        channels = np.array([ch])
        versions = self._request(channels, np.array([float(value)]))
        self._mirror_family_sp.update(self._families_of[ch])
        self._wake_mirrors()
        await self._await_versions(channels, versions, scalar=True)
        self._flush_sp_mirrors([], self._families_of[ch])

    async def _on_family_put(self, fname: str, value: np.ndarray) -> None:
        fam = self._magnet_families[fname]
        values = np.clip(np.asarray(value, dtype=float), fam.low, fam.high)
        clipped = bool(np.any(values != value))
        # mirror only what changed: a family put usually moves one or two of its members
        changed = fam.channels[self.sp[fam.channels] != values].tolist()
        versions = self._request(fam.channels, values)
        self._mirror_sp.update(changed)
        for ch in changed:
            self._mirror_family_sp.update(self._families_of[ch])
        if not clipped:  # its own waveform already holds the values; else write them back
            self._mirror_family_sp.discard(fname)
        self._wake_mirrors()
        await self._await_versions(fam.channels, versions, scalar=False)
        self._flush_sp_mirrors(changed, (fname,))

    async def _next_tick(self) -> None:
        """Wait for a tick that starts after now (its snapshot includes every change so far)."""
        channels = np.zeros(0, dtype=np.int64)
        self._mark_dirty()
        await self._await_versions(channels, channels, scalar=False)

    async def _on_reset(self, seed: int) -> None:
        seed = int(seed)
        _log.info("reset with seed %d", seed)
        self.twin.reset(seed)
        self.twin.set_noise(self._noise_default)
        self.ramp_rate = self.settings.ramp_rate
        self._reset_channels()
        self._ctl["seed"].set(seed)
        self._ctl["drift"].set(0.0, process=False)
        self._ctl["circumference_error"].set(0.0, process=False)
        self._ctl["ramp_rate"].set(self.ramp_rate, process=False)
        self._ctl["noise"].set(int(self.twin.noise), process=False)
        self._publish_truth()
        self.emittance.reset()
        for ch in range(len(self.sp)):
            if self._sp_rec[ch] is not None:
                self._sp_rec[ch].set(float(self.sp[ch]), process=False)
        for fam in self._magnet_families.values():
            if fam.sp is not None:
                fam.sp.set(self.sp[fam.channels], process=False)
        self._mirror_rb.update(range(len(self.rb)))
        await self._next_tick()

    async def _on_kill(self, _value: int) -> None:
        self.twin.kill_beam()
        await self._next_tick()

    async def _on_refill(self, _value: int) -> None:
        self.twin.refill()
        await self._next_tick()

    async def _on_drift(self, rate_um_per_s: float) -> None:
        self.twin.inject_drift(float(rate_um_per_s) * 1e-6)
        await self._next_tick()

    async def _on_circumference_error(self, dl_um: float) -> None:
        self.twin.set_circumference_error(float(dl_um) * 1e-6)
        await self._next_tick()

    async def _on_ramp_rate(self, rate: float) -> None:
        now = time.monotonic()
        self._advance_ramps(now)
        idx = np.flatnonzero(self._moving)
        self._ramp_from[idx] = self.rb[idx]
        self._ramp_t0[idx] = now
        self.ramp_rate = float(rate)
        if idx.size:
            self._start_ramp()

    async def _on_noise(self, on: int) -> None:
        self.twin.set_noise(bool(on))
        await self._next_tick()

    async def _on_export(self, path: str) -> None:
        target = path.strip()
        if not target:
            if self._export_dir is None:
                self._export_dir = tempfile.mkdtemp(prefix="accplans-twin-truth-")
            target = self._export_dir
        truth = self.twin.truth()
        try:
            loop = asyncio.get_running_loop()
            written = await loop.run_in_executor(None, truth.save, target)
        except Exception as exc:  # report any failure on the PV, never kill the IOC
            _log.exception("truth export to %s failed", target)
            self._ctl["export_error"].set(f"export to {target} failed: {exc}"[:1000])
            self._ctl["export_path"].set("")
            return
        self._ctl["export_error"].set("")
        self._ctl["export_path"].set(str(Path(written).resolve()))

    # -- ticks -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the tick, ramp and mirror tasks on the running loop; publish a first frame."""
        self._loop = asyncio.get_running_loop()
        self._dirty = asyncio.Event()
        self._ramp_wake = asyncio.Event()
        self._mirror_wake = asyncio.Event()
        self._tick_done = asyncio.Event()
        self._publish_truth()
        self._mirror_rb.update(range(len(self.rb)))
        self._tick(idle=True)
        self._tasks = [
            self._loop.create_task(self._tick_loop()),
            self._loop.create_task(self._mirror_loop()),
            self._loop.create_task(self._bpm_scalar_loop()),
        ]
        self.emittance.start()

    async def stop(self) -> None:
        """Cancel the tasks; fail the puts still waiting."""
        tasks = [*self._tasks, *([self._ramp_task] if self._ramp_task else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in self._waiters:
            if not w.future.done():
                w.future.cancel()
        self._waiters.clear()
        if self._shot is not None:
            self._shot.cancel()
            await asyncio.gather(self._shot, return_exceptions=True)
        if self._pool is not None:
            stop_pool(self._pool)
            self._pool = None
        await self.emittance.stop()

    async def _tick_loop(self) -> None:
        assert self._dirty is not None
        s = self.settings
        next_t = time.monotonic()
        while True:
            idle = False
            if s.tick == "periodic":
                next_t += s.period
                delay = next_t - time.monotonic()
                if delay < 0:
                    next_t = time.monotonic()
                else:
                    await asyncio.sleep(delay)
                idle = not self._dirty.is_set()
            else:
                try:
                    await asyncio.wait_for(self._dirty.wait(), s.idle_period)
                except TimeoutError:
                    idle = True
                else:
                    if s.window > 0:
                        await asyncio.sleep(s.window)
            self._dirty.clear()
            self._tick(idle=idle)
            await asyncio.sleep(0)

    def _tick(self, *, idle: bool) -> None:
        """Apply a snapshot of the readbacks, compute, publish, complete the waiting puts."""
        t0 = time.perf_counter()
        self._advance_ramps(time.monotonic())
        now = time.time()
        rb = self.rb.copy()
        reached = self._reached_ver.copy()
        waiters, self._waiters = self._waiters, []
        try:
            self.twin.set_magnets(rb[: self._nmag])
            if self._has_rf:
                self.twin.set_rf(float(rb[self._rf_f]), float(rb[self._rf_v]))
            frame = self.twin.compute(now, refresh_tune=idle)
        except Exception as exc:  # never let a bad tick kill the IOC; fail the waiting puts
            _log.exception("model tick failed")
            for w in waiters:
                if not w.future.done():
                    w.future.set_exception(RuntimeError(f"model tick failed: {exc}"))
            assert self._tick_done is not None
            self._tick_done.set()
            return
        self._publish(frame, now, rb)
        self.emittance.on_tick(now, changed=frame.solved, idle=idle)
        pending: list[_Waiter] = []
        for w in waiters:
            if w.future.done():
                continue
            if np.all(reached[w.channels] >= w.versions):
                if w.scalar:
                    for ch in w.channels.tolist():
                        self._set_rb_scalar(ch)
                w.future.set_result(None)
            else:
                pending.append(w)
        self._waiters.extend(pending)
        assert self._tick_done is not None
        self._tick_done.set()
        self._wake_mirrors()  # after the completions: they go first
        if frame.solved:
            elapsed = time.perf_counter() - t0
            self._ctl["tick_ms"].set(elapsed * 1e3)
            _log.debug(
                "tick %d: %.2f ms (model %.2f ms)",
                self._counter,
                elapsed * 1e3,
                frame.compute_s * 1e3,
            )

    def _publish(self, frame: Frame, now: float, rb: np.ndarray) -> None:
        self._counter += 1
        self._frame = frame
        for fam in self._bpm_families.values():
            r = fam.records
            i = fam.index
            if "x" in r:
                r["x"].set(frame.x_mm[i])
            if "y" in r:
                r["y"].set(frame.y_mm[i])
            if "valid" in r:
                r["valid"].set(frame.valid[i])
            fam.truth["TRUE_X"].set(frame.beam_m[i, 0] * 1e3)
            fam.truth["TRUE_Y"].set(frame.beam_m[i, 1] * 1e3)
            if "timestamp" in r:
                r["timestamp"].set(now)
            if "counter" in r:
                r["counter"].set(self._counter)
        changed = rb != self._published_rb
        if np.any(changed):
            for fam in self._magnet_families.values():
                if fam.rb is not None and np.any(changed[fam.channels]):
                    # stamped with the snapshot time: a client waits for the frame whose
                    # TIME is at or after its readbacks' time (the frame of this tick)
                    fam.rb.set(rb[fam.channels], timestamp=now)
            self._mirror_rb.update(np.flatnonzero(changed).tolist())
            self._published_rb = rb
            self._rb_time = now
        if "current" in self._dcct:
            self._dcct["current"].set(frame.current_ma)
        if "lifetime" in self._dcct:
            self._dcct["lifetime"].set(frame.lifetime_h)
        if "x" in self._tune:
            self._tune["x"].set(float(frame.tune[0]))
        if "y" in self._tune:
            self._tune["y"].set(float(frame.tune[1]))
        beam = int(frame.beam)
        if self._ctl["beam"].get() != beam:
            self._ctl["beam"].set(beam)
            self._ctl["reason"].set(frame.loss_reason[:255] if not frame.beam else "")
        if self._ctl["dct"].get() != frame.dct_m:
            self._ctl["dct"].set(frame.dct_m)

    def _publish_truth(self) -> None:
        e = self.twin.errors
        for fam in self._bpm_families.values():
            i = fam.index
            fam.truth["OFFSET_X"].set(e.bpm_offset_m[i, 0] * 1e3)
            fam.truth["OFFSET_Y"].set(e.bpm_offset_m[i, 1] * 1e3)
            fam.truth["GAIN_X"].set(e.bpm_gain[i, 0])
            fam.truth["GAIN_Y"].set(e.bpm_gain[i, 1])
            fam.truth["ROLL"].set(e.bpm_roll_rad[i])
        pos = {n: k for k, n in enumerate(e.corrector_names)}
        for fname, rec in self._corrector_truth.items():
            names = self.description.family(fname).devices
            rec.set(e.corrector_gain_rel[[pos[n] for n in names]])

    # -- scalar mirrors ----------------------------------------------------------------------
    def _set_rb_scalar(self, ch: int) -> None:
        self._write_rb(ch)
        self._mirror_rb.discard(ch)

    def _write_rb(self, ch: int) -> None:
        rec = self._rb_rec[ch]
        if rec is not None:
            rec.set(float(self._published_rb[ch]), timestamp=self._rb_time)

    def _write_sp(self, ch: int) -> None:
        rec = self._sp_rec[ch]
        if rec is not None:
            rec.set(float(self.sp[ch]), process=False)

    def _flush_sp_mirrors(self, channels: Iterable[int], families: Iterable[str]) -> None:
        """Write the setpoint mirrors of a put that the mirror loop has not written yet.

        When a put completes, every PV showing its setpoints shows them: a plan may read a
        member's setpoint right after setting its family (e.g. for cross-talk).
        """
        for ch in channels:
            if ch in self._mirror_sp:
                self._mirror_sp.discard(ch)
                self._write_sp(ch)
        for fname in families:
            if fname in self._mirror_family_sp:
                self._mirror_family_sp.discard(fname)
                fam = self._magnet_families[fname]
                if fam.sp is not None:
                    fam.sp.set(self.sp[fam.channels], process=False)

    def _wake_mirrors(self) -> None:
        if self._mirror_wake is not None:
            self._mirror_wake.set()

    async def _quiet(self) -> None:
        """Yield to the event loop; wait while a tick is due (ticks go before scalar PVs)."""
        await asyncio.sleep(0)
        assert self._dirty is not None and self._tick_done is not None
        while self._dirty.is_set():
            self._tick_done.clear()
            await self._tick_done.wait()

    async def _mirror_loop(self) -> None:
        """Refresh per-device magnet PVs in small chunks, between ticks."""
        assert self._mirror_wake is not None
        chunk = 32
        while True:
            await self._mirror_wake.wait()
            self._mirror_wake.clear()
            await self._quiet()
            while self._mirror_family_sp:
                fam = self._magnet_families[self._mirror_family_sp.pop()]
                if fam.sp is not None:
                    fam.sp.set(self.sp[fam.channels], process=False)
            for pending, write in (
                (self._mirror_rb, self._write_rb),
                (self._mirror_sp, self._write_sp),
            ):
                while pending:
                    for _ in range(min(chunk, len(pending))):
                        write(pending.pop())
                    await self._quiet()

    async def _bpm_scalar_loop(self) -> None:
        """Every ``scalar_period``, copy the latest frame to the per-BPM scalar PVs."""
        chunk = 32
        n = len(self._bpm_x)
        while True:
            await asyncio.sleep(self.settings.scalar_period)
            frame = self._frame
            if frame is None or self._counter == self._scalar_counter:
                continue
            self._scalar_counter = self._counter
            for start in range(0, n, chunk):
                await self._quiet()
                for i in range(start, min(n, start + chunk)):
                    if self._bpm_x[i] is not None:
                        self._bpm_x[i].set(float(frame.x_mm[i]))
                    if self._bpm_y[i] is not None:
                        self._bpm_y[i].set(float(frame.y_mm[i]))
                    rec = self._bpm_valid[i]
                    if rec is not None and rec.get() != int(frame.valid[i]):
                        rec.set(int(frame.valid[i]))


def _finite_scalar(_record: Any, value: float) -> bool:
    return bool(np.isfinite(value))


def _valid_array(n: int, _record: Any, value: np.ndarray) -> bool:
    arr = np.asarray(value)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        _log.warning("rejected a family put of shape %s (expected %d finite values)", arr.shape, n)
        return False
    return True
