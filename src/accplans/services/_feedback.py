"""The slow orbit feedback as a service: its own process, an EPICS interface, claims.

``accplans feedback serve`` connects to the machine (twin or real) like any client, serves its
own PVs (:data:`accplans.config.FEEDBACK_PVS`, under ``<machine prefix>SOFB:``) over CA and
PVA, and corrects the orbit at a set rate with :class:`~accplans.physics.OrbitFeedbackController`:

1. wait for a BPM frame taken after its last write had settled;
2. drop invalid BPMs, the operator's exclusions and claimed BPMs and correctors;
3. compute the kick change of each plane (PI in velocity form on the regularised inverse of
   the model's, or a stored, orbit response matrix);
4. refuse to write anything beyond a corrector's limits (state ``FAULT``, feedback disabled);
5. write each plane with one family put (one put per member while an ``exclude`` claim is held,
   so a claimed member is never written) and wait for the readbacks;
6. log the write (time, iteration, members written, active claims) to its write log.

Claims (:mod:`accplans.devices._feedback`): a request is handled under the same lock as an
iteration, so its put completes only once the iteration in progress has finished writing;
from then on nothing claimed is written. Heartbeats keep a claim alive; the watchdog releases
a claim whose heartbeat has been silent for ``CLAIM:TIMEOUT`` s. Claims of different owners
on the same resource are refused (two writers never share a magnet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from accplans.config import FEEDBACK_PVS, MachineDescription
from accplans.devices import (
    CLAIM_MODES,
    EpicsProtocol,
    LimitError,
    Machine,
    MagnetFamily,
    default_feedback_prefix,
)
from accplans.physics import FeedbackGains, OrbitFeedbackController

__all__ = ["FeedbackService", "FeedbackSettings", "model_response_blocks"]

_log = logging.getLogger(__name__)

STATES = ("DISABLED", "RUNNING", "PAUSED", "FAULT", "NO_BEAM")
_STRING_LENGTH = 16384
_MESSAGE_LENGTH = 1024
_AVERAGE_FRAMES = 5


@dataclass(frozen=True)
class FeedbackSettings:
    """Start-up settings of the service (each can be changed later through its PVs).

    Attributes:
        rate_hz: iterations per second.
        gains_x, gains_y: PI gains per plane.
        alpha: Tikhonov parameter as a fraction of each plane's largest singular value.
        claim_timeout_s: watchdog: a claim without heartbeat for this long is released.
        enable: start correcting at once (default: wait for ``ENABLE``).
        frame_timeout_s: seconds to wait for a fresh BPM frame before reporting a fault.
        frames: BPM frames averaged per iteration (consecutive fresh frames).
    """

    rate_hz: float = 2.0
    gains_x: FeedbackGains = field(default_factory=FeedbackGains)
    gains_y: FeedbackGains = field(default_factory=FeedbackGains)
    alpha: float = 0.02
    claim_timeout_s: float = 10.0
    enable: bool = False
    frame_timeout_s: float = 5.0
    frames: int = 1

    def __post_init__(self) -> None:
        if not (np.isfinite(self.rate_hz) and 0.0 < self.rate_hz <= 100.0):
            raise ValueError(f"feedback rate must be in (0, 100] Hz, got {self.rate_hz!r}")
        if not 1 <= self.frames <= 100:
            raise ValueError(f"frames averaged per iteration must be 1..100, got {self.frames}")
        if not (np.isfinite(self.claim_timeout_s) and self.claim_timeout_s > 0):
            raise ValueError(f"claim timeout must be > 0 s, got {self.claim_timeout_s!r}")


def model_response_blocks(machine: Machine) -> tuple[np.ndarray, np.ndarray]:
    """The diagonal ORM blocks (x/h, y/v) [m/rad] of the online model at design setpoints.

    Rows and columns follow the machine's ``bpms``, ``hcorr`` and ``vcorr`` families.
    """
    from accplans.model import plane_response_blocks

    if machine.bpms is None or machine.hcorr is None or machine.vcorr is None:
        raise ValueError("the feedback needs BPMs and correctors of both planes")
    return plane_response_blocks(
        machine.description, machine.bpms.names, machine.hcorr.names, machine.vcorr.names
    )


@dataclass
class _Claim:
    id: str
    owner: str
    mode: str
    resources: tuple[str, ...]
    devices: frozenset[str]
    since: float
    heartbeat: float
    orbit: tuple[np.ndarray, np.ndarray] | None = None

    def summary(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "mode": self.mode,
            "resources": list(self.resources[:20]),
            "n_resources": len(self.resources),
            "since": self.since,
            "heartbeat_age_s": round(now - self.heartbeat, 3),
        }


class FeedbackService:
    """The orbit feedback loop and its EPICS records (one per process: pythonSoftIOC).

    Args:
        machine: the connected machine (its ``bpms``, ``hcorr``, ``vcorr`` are used).
        response: ``(Rx, Ry)`` diagonal ORM blocks [m/rad] in the families' order.
        settings: start-up settings.
        prefix: PV prefix of the service (default ``<machine prefix>SOFB:``).
        log_path: the write log (JSON lines); default ``feedback-writes.jsonl`` in the cwd.
    """

    def __init__(
        self,
        machine: Machine,
        response: tuple[np.ndarray, np.ndarray],
        settings: FeedbackSettings | None = None,
        *,
        prefix: str | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.machine = machine
        self.description = machine.description
        self.settings = settings or FeedbackSettings()
        self.prefix = prefix or default_feedback_prefix(self.description)
        self.bpms = machine.bpms
        self.hcorr: MagnetFamily = machine.hcorr
        self.vcorr: MagnetFamily = machine.vcorr
        if self.bpms is None or self.hcorr is None or self.vcorr is None:
            raise ValueError("the feedback needs BPMs and correctors of both planes")
        self.controller = OrbitFeedbackController(
            *response,
            gains_x=self.settings.gains_x,
            gains_y=self.settings.gains_y,
            alpha=self.settings.alpha,
        )
        self.nbpm, self.nh, self.nv = len(self.bpms.names), len(self.hcorr), len(self.vcorr)
        if response[0].shape != (self.nbpm, self.nh) or response[1].shape != (self.nbpm, self.nv):
            raise ValueError(
                f"response blocks {response[0].shape}, {response[1].shape} do not match "
                f"{self.nbpm} BPMs, {self.nh} + {self.nv} correctors"
            )
        self.log_path = Path(log_path or "feedback-writes.jsonl")
        self.enabled = self.settings.enable
        self.rate = self.settings.rate_hz
        self.claim_timeout = self.settings.claim_timeout_s
        self.frames = self.settings.frames
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self.exclude_bpm = np.zeros(self.nbpm, bool)
        self.exclude_h = np.zeros(self.nh, bool)
        self.exclude_v = np.zeros(self.nv, bool)
        self.claims: dict[str, _Claim] = {}
        self.iteration = 0
        self.state = "DISABLED"
        self.message = ""
        self._heartbeat = 0
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._last_counter: int | None = None
        self._settled_after: float | None = None
        self._records: dict[str, Any] = {}
        self._log_file: Any = None
        self._index = {
            "bpm": {n: i for i, n in enumerate(self.bpms.names)},
            "h": {n: i for i, n in enumerate(self.hcorr.names)},
            "v": {n: i for i, n in enumerate(self.vcorr.names)},
        }
        self._families = {
            name.upper(): tuple(spec.devices) for name, spec in self.description.families.items()
        }
        self._devices = {d.name for d in self.description.devices}

    # -- EPICS records ------------------------------------------------------------------------
    def create_records(self) -> None:
        """Create the service's records (before ``iocInit``)."""
        from softioc import builder

        builder.SetDeviceName(self.prefix.rstrip(":"))
        rec = self._records
        g = self.settings

        def suffix(key: str) -> str:
            return FEEDBACK_PVS[key][0]

        rec["enable"] = builder.boolOut(
            suffix("enable"),
            ZNAM="OFF",
            ONAM="ON",
            initial_value=self.enabled,
            on_update=self._on_enable,
            blocking=True,
        )
        rec["state"] = builder.mbbIn(suffix("state"), *STATES, initial_value=0)
        rec["message"] = builder.longStringIn(
            suffix("message"), length=_MESSAGE_LENGTH, initial_value=""
        )
        rec["rate"] = builder.aOut(
            suffix("rate"),
            initial_value=self.rate,
            EGU="Hz",
            DRVL=0.01,
            DRVH=100.0,
            on_update=self._on_rate,
        )
        for key, plane, value in (
            ("gain_x", "x", g.gains_x.ki),
            ("gain_y", "y", g.gains_y.ki),
            ("pgain_x", "x", g.gains_x.kp),
            ("pgain_y", "y", g.gains_y.kp),
        ):
            rec[key] = builder.aOut(
                suffix(key),
                initial_value=value,
                DRVL=0.0,
                DRVH=1.0,
                PREC=3,
                on_update=lambda v, k=key, p=plane: self._on_gain(k, p, v),
                validate=lambda _r, v, k=key: self._valid_gain(k, v),
            )
        rec["frames"] = builder.longOut(
            suffix("frames"),
            initial_value=self.frames,
            DRVL=1,
            DRVH=100,
            on_update=self._on_frames,
        )
        rec["iteration"] = builder.longIn(suffix("iteration"), initial_value=0)
        rec["heartbeat"] = builder.longIn(suffix("heartbeat"), initial_value=0)
        rec["error_x"] = builder.aIn(suffix("error_x"), initial_value=0.0, EGU="mm", PREC=6)
        rec["error_y"] = builder.aIn(suffix("error_y"), initial_value=0.0, EGU="mm", PREC=6)
        for key in ("ref_x", "ref_y"):
            rec[key] = builder.WaveformOut(
                suffix(key),
                initial_value=np.zeros(self.nbpm),
                EGU="mm",
                on_update=lambda v, k=key: self._on_reference(k, v),
                validate=lambda _r, v: bool(np.all(np.isfinite(v))),
            )
        rec["ref_capture"] = builder.boolOut(
            suffix("ref_capture"), initial_value=False, on_update=self._on_capture, blocking=True
        )
        for key, n in (("exclude_bpm", self.nbpm), ("exclude_h", self.nh), ("exclude_v", self.nv)):
            rec[key] = builder.WaveformOut(
                suffix(key),
                initial_value=np.zeros(n, np.int32),
                on_update=lambda v, k=key: self._on_exclude(k, v),
            )
        rec["claim_request"] = builder.longStringOut(
            suffix("claim_request"),
            length=_STRING_LENGTH,
            initial_value="",
            on_update=self._on_claim,
            blocking=True,
        )
        rec["claim_release"] = builder.longStringOut(
            suffix("claim_release"),
            length=1024,
            initial_value="",
            on_update=self._on_release,
            blocking=True,
        )
        rec["claim_heartbeat"] = builder.longStringOut(
            suffix("claim_heartbeat"), length=256, initial_value="", on_update=self._on_beat
        )
        rec["claim_ack"] = builder.longStringIn(
            suffix("claim_ack"), length=_STRING_LENGTH, initial_value=""
        )
        rec["claims"] = builder.longStringIn(
            suffix("claims"), length=_STRING_LENGTH, initial_value="[]"
        )
        rec["claim_timeout"] = builder.aOut(
            suffix("claim_timeout"),
            initial_value=self.claim_timeout,
            EGU="s",
            DRVL=0.1,
            on_update=self._on_claim_timeout,
        )

    # -- record handlers -------------------------------------------------------------------------
    async def _on_enable(self, value: int) -> None:
        async with self._lock:  # a disabling put completes after the last write
            self.enabled = bool(value)
        self.controller.reset()
        self._log_event("enable" if self.enabled else "disable")
        if self.enabled and self.state == "FAULT":
            self._set_state("RUNNING", "")

    async def _on_frames(self, value: int) -> None:
        self.frames = int(value)

    async def _on_rate(self, value: float) -> None:
        self.rate = float(value)

    def _valid_gain(self, key: str, value: float) -> bool:
        low_ok = value > 0.0 if key.startswith("gain") else value >= 0.0
        return bool(np.isfinite(value)) and low_ok and value <= 1.0

    async def _on_gain(self, key: str, plane: str, value: float) -> None:
        gains = self.controller.gains(plane)
        if key.startswith("gain"):
            gains = FeedbackGains(ki=float(value), kp=gains.kp)
        else:
            gains = FeedbackGains(ki=gains.ki, kp=float(value))
        self.controller.set_gains(plane, gains)

    async def _on_reference(self, key: str, value: np.ndarray) -> None:
        v = np.asarray(value, float) * 1e-3
        if v.size != self.nbpm:
            self._set_state(self.state, f"{key.upper()} needs {self.nbpm} values, got {v.size}")
            return
        x, y = self.reference or (np.zeros(self.nbpm), np.zeros(self.nbpm))
        self.reference = (v, y) if key == "ref_x" else (x, v)
        self.controller.reset()

    async def _on_capture(self, value: int) -> None:
        if not value:
            return
        async with self._lock:
            orbit = await self._average_orbit()
            self._set_reference(orbit)
            self._log_event("reference captured")
        self._records["ref_capture"].set(False, process=False)

    async def _on_exclude(self, key: str, value: np.ndarray) -> None:
        flags = np.asarray(value).astype(bool)
        n = {"exclude_bpm": self.nbpm, "exclude_h": self.nh, "exclude_v": self.nv}[key]
        if flags.size != n:
            self._set_state(self.state, f"{key.upper()} needs {n} flags, got {flags.size}")
            return
        setattr(self, key, flags)
        self.controller.reset()

    async def _on_claim_timeout(self, value: float) -> None:
        self.claim_timeout = float(value)

    async def _on_claim(self, text: str) -> None:
        try:
            request = json.loads(text)
            claim_id, owner, mode = request["id"], request["owner"], request["mode"]
            resources = tuple(str(r) for r in request["resources"])
        except (ValueError, KeyError, TypeError) as exc:
            self._ack("", "refused", f"malformed claim request ({exc}): {text[:200]!r}")
            return
        if mode not in CLAIM_MODES:
            self._ack(claim_id, "refused", f"unknown mode {mode!r}; use one of {CLAIM_MODES}")
            return
        try:
            devices = self._expand(resources)
        except ValueError as exc:
            self._ack(claim_id, "refused", str(exc))
            return
        async with self._lock:  # the iteration in progress finishes its writes first
            for other in self.claims.values():
                shared = devices & other.devices
                if shared and other.owner != owner:
                    self._ack(
                        claim_id,
                        "refused",
                        f"{sorted(shared)[:5]} already claimed by {other.owner!r} ({other.id})",
                    )
                    return
            now = time.monotonic()
            held = _Claim(claim_id, owner, mode, resources, devices, time.time(), now)
            if mode == "fold":
                held.orbit = await self._average_orbit()
            self.claims[claim_id] = held
            self.controller.reset()
            self._log_event("claim", claim=claim_id, owner=owner, mode=mode, resources=resources)
            self._publish_claims()
            self._ack(claim_id, "granted", "")

    async def _on_release(self, text: str) -> None:
        try:
            message = json.loads(text)
            claim_id, keep = message["id"], bool(message.get("keep", False))
        except (ValueError, KeyError, TypeError) as exc:
            self._ack("", "refused", f"malformed release ({exc}): {text[:200]!r}")
            return
        async with self._lock:
            held = self.claims.pop(claim_id, None)
            if held is None:
                self._ack(claim_id, "released", "not held (already released by the watchdog?)")
                return
            if held.mode == "fold" and keep and held.orbit is not None:
                now = await self._average_orbit()
                (rx, ry), (ox, oy) = self.reference or held.orbit, held.orbit
                self._set_reference((rx + now[0] - ox, ry + now[1] - oy))
            self.controller.reset()
            self._log_event("release", claim=claim_id, keep=keep)
            self._publish_claims()
            self._ack(claim_id, "released", "")

    async def _on_beat(self, claim_id: str) -> None:
        held = self.claims.get(claim_id)
        if held is not None:
            held.heartbeat = time.monotonic()

    def _expand(self, resources: tuple[str, ...]) -> frozenset[str]:
        devices: set[str] = set()
        unknown = []
        for name in resources:
            if name.upper() in self._families:
                devices.update(self._families[name.upper()])
            elif name in self._devices:
                devices.add(name)
            else:
                unknown.append(name)
        if unknown:
            raise ValueError(
                f"unknown resources {unknown[:5]} (not a device or family of "
                f"{self.description.machine.name})"
            )
        return frozenset(devices)

    # -- publishing ------------------------------------------------------------------------------
    def _ack(self, claim_id: str, status: str, message: str) -> None:
        if status == "refused":
            _log.warning("claim %s refused: %s", claim_id, message)
        message = _fit(message, _MESSAGE_LENGTH)
        self._records["claim_ack"].set(
            json.dumps({"id": claim_id, "status": status, "message": message})
        )

    def _publish_claims(self) -> None:
        now = time.monotonic()
        self._records["claims"].set(json.dumps([c.summary(now) for c in self.claims.values()]))

    def _set_state(self, state: str, message: str) -> None:
        if state != self.state or message != self.message:
            if state == "FAULT":
                _log.error("feedback fault: %s", message)
            self.state, self.message = state, message
            self._records["message"].set(
                _fit(message, _MESSAGE_LENGTH)
            )  # first: a client that sees the state
            self._records["state"].set(STATES.index(state))  # then reads the message

    def _set_reference(self, orbit: tuple[np.ndarray, ...]) -> None:
        x, y = (np.asarray(v, float).copy() for v in orbit)
        self.reference = (x, y)
        self._records["ref_x"].set(x * 1e3, process=False)
        self._records["ref_y"].set(y * 1e3, process=False)

    def _log_event(self, event: str, **fields: Any) -> None:
        self._write_log({"t": time.time(), "event": event, **fields})

    def _write_log(self, entry: dict[str, Any]) -> None:
        if self._log_file is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("a", encoding="utf-8")
        self._log_file.write(json.dumps(entry) + "\n")
        self._log_file.flush()

    # -- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Correct at :attr:`rate` until :meth:`stop`."""
        self._set_state("RUNNING" if self.enabled else "DISABLED", "")
        next_time = time.monotonic()
        while not self._stop.is_set():
            self._heartbeat += 1
            self._records["heartbeat"].set(self._heartbeat)
            self._expire_claims()
            try:
                async with self._lock:
                    await self._iterate()
            except Exception as exc:  # a lost connection or a bad frame: report, retry
                self._set_state("FAULT", f"{type(exc).__name__}: {exc}")
                self._settled_after = None
            next_time = max(next_time + 1.0 / self.rate, time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), next_time - time.monotonic())

    async def stop(self) -> None:
        """End :meth:`run` after the iteration in progress."""
        self._stop.set()
        async with self._lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _expire_claims(self) -> None:
        now = time.monotonic()
        for claim_id, held in list(self.claims.items()):
            if now - held.heartbeat > self.claim_timeout:
                del self.claims[claim_id]
                self.controller.reset()
                _log.warning("claim %s of %s expired: no heartbeat", claim_id, held.owner)
                self._log_event("expire", claim=claim_id, owner=held.owner)
                self._publish_claims()

    def _claimed(self, kind: str) -> np.ndarray:
        names = {"bpm": self.bpms.names, "h": self.hcorr.names, "v": self.vcorr.names}[kind]
        taken = set().union(*(c.devices for c in self.claims.values())) if self.claims else set()
        return np.array([n in taken for n in names], bool)

    async def _average_orbit(self) -> tuple[np.ndarray, np.ndarray]:
        frames = []
        counter = None
        for _ in range(_AVERAGE_FRAMES):
            frame = await self.bpms.wait_for_frame(
                counter=counter, timeout=self.settings.frame_timeout_s
            )
            counter = frame.counter
            frames.append(np.where(frame.valid, 1.0, np.nan) * np.stack([frame.x, frame.y]))
        mean = np.nanmean(np.stack(frames), axis=0)
        return mean[0], mean[1]

    async def _iterate(self) -> None:
        if not self.enabled:
            self._set_state("DISABLED", self.message if self.state == "FAULT" else "")
            return
        if any(c.mode in ("pause", "fold") for c in self.claims.values()):
            owners = sorted({c.owner for c in self.claims.values()})
            self._set_state("PAUSED", f"claimed by {', '.join(owners)}")
            self._settled_after = None
            return
        t_start = time.perf_counter()
        samples = []
        for _ in range(self.frames):
            frame = await self.bpms.wait_for_frame(
                after=self._settled_after if not samples else None,
                counter=self._last_counter if samples or self._settled_after is None else None,
                timeout=self.settings.frame_timeout_s,
            )
            self._last_counter = frame.counter
            if not np.any(frame.valid):
                self._set_state("NO_BEAM", "no valid BPM reading")
                self.controller.reset()
                return
            samples.append(np.where(frame.valid, 1.0, np.nan) * np.stack([frame.x, frame.y]))
        t_acquired = time.perf_counter()
        if self.reference is None:
            self._set_reference(await self._average_orbit())
            self._log_event("reference captured", why="first iteration without a reference")
        assert self.reference is not None
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a BPM invalid in every frame: NaN
            x, y = np.nanmean(np.stack(samples), axis=0)
        bpm_mask = ~self.exclude_bpm & ~self._claimed("bpm")
        masks = (~self.exclude_h & ~self._claimed("h"), ~self.exclude_v & ~self._claimed("v"))
        t_frame = time.perf_counter()
        step = self.controller.step(
            (x, y), self.reference, bpm_mask=bpm_mask, corrector_masks=masks
        )
        self._records["error_x"].set(step.error_rms_m[0] * 1e3)
        self._records["error_y"].set(step.error_rms_m[1] * 1e3)
        writes = []
        for family, delta, mask in (
            (self.hcorr, step.dtheta_x_rad, masks[0]),
            (self.vcorr, step.dtheta_y_rad, masks[1]),
        ):
            if not np.any(delta):
                continue
            current = await family.setpoint_strengths()
            target = current + delta
            try:
                family.check_strengths(target)
            except LimitError as exc:
                self.enabled = False
                self._records["enable"].set(False, process=False)
                self._set_state("FAULT", f"stopped before writing: {exc}")
                self._log_event("limit", family=family.name, message=str(exc))
                return
            writes.append((family, target, mask, current))
        members = any(c.mode == "exclude" for c in self.claims.values())
        t_compute = time.perf_counter()
        await asyncio.gather(*(self._write(f, t, m, members) for f, t, m, _ in writes))
        stamps = [await f.stamped_readbacks() for f, *_ in writes]
        self._settled_after = max((t for _, t in stamps), default=None)
        t_end = time.perf_counter()
        timing = {
            "acquire_s": t_acquired - t_start,  # waiting for the BPMs' fresh frames
            "read_s": t_frame - t_acquired,
            "compute_s": t_compute - t_frame,
            "write_s": t_end - t_compute,
        }
        self.iteration += 1
        self._records["iteration"].set(self.iteration)
        self._set_state("RUNNING", "")
        for family, target, mask, current in writes:
            changed = np.flatnonzero(mask & (target != current))
            written = [family.names[i] for i in (changed if members else range(len(family)))]
            self._write_log(
                {
                    "t": time.time(),
                    "event": "write",
                    "iteration": self.iteration,
                    "family": family.name,
                    "written": written,
                    "max_step_rad": float(np.max(np.abs(target - current))),
                    "claims": sorted(self.claims),
                    "error_rms_m": list(step.error_rms_m),
                    **timing,
                }
            )

    async def _write(
        self, family: MagnetFamily, target: np.ndarray, mask: np.ndarray, members: bool
    ) -> None:
        if not members:
            await family.set_strengths(target)
            return
        idx = np.flatnonzero(mask)
        await asyncio.gather(*(family[int(i)].set(float(target[i])) for i in idx))


def _fit(text: str, length: int) -> str:
    """``text`` cut to fit a string record of ``length`` bytes (with its terminating NUL)."""
    data = text.encode()
    return text if len(data) < length else data[: length - 4].decode(errors="ignore") + "..."


def serve(
    description: MachineDescription,
    *,
    address: str | None,
    protocol: EpicsProtocol = "ca",
    settings: FeedbackSettings | None = None,
    prefix: str | None = None,
    log_path: str | Path | None = None,
    ready: Any = None,
) -> int:
    """Connect, serve the records and run the loop until SIGTERM/SIGINT (the CLI's body)."""
    from softioc import asyncio_dispatcher, builder, softioc

    from accplans.devices import connect

    dispatcher = asyncio_dispatcher.AsyncioDispatcher()

    async def connected() -> Machine:
        mode: Literal["twin", "epics"] = "twin" if address else "epics"
        return await connect(description, mode, address=address, protocol=protocol)

    machine = asyncio.run_coroutine_threadsafe(connected(), dispatcher.loop).result(60)
    response = model_response_blocks(machine)
    service = FeedbackService(machine, response, settings, prefix=prefix, log_path=log_path)
    service.create_records()
    builder.LoadDatabase()
    softioc.iocInit(dispatcher)
    task = asyncio.run_coroutine_threadsafe(service.run(), dispatcher.loop)
    if ready is not None:
        ready({"prefix": service.prefix, "pid": os.getpid(), "log": str(service.log_path)})
    _log.info("orbit feedback serving %s for %s", service.prefix, description.machine.name)
    dispatcher.wait_for_quit()
    try:
        asyncio.run_coroutine_threadsafe(service.stop(), dispatcher.loop).result(timeout=10)
        task.result(timeout=10)
    except Exception:
        _log.exception("feedback: stopping failed; exiting anyway")
    finally:
        softioc.safeEpicsExit(0)
    return 0
