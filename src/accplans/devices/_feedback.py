"""The orbit feedback service seen from a plan: its settings, its state, and claims.

A plan that moves correctors (or anything the feedback's orbit depends on) *claims* them from
the feedback first (DESIGN.md, "Resources and arbitration")::

    claim_id = await feedback.claim(["HCORR", "VCORR"], "pause", owner="measure_orm")
    ...                                   # move, measure
    await feedback.release(claim_id, keep=False)

``claim`` writes a JSON request to ``CLAIM:REQUEST`` with put-completion: the service
completes the put only after it has finished the iteration it was in and registered the
claim, so when ``claim`` returns, the feedback will not write a claimed resource again until
the claim is released. While the claim is held, this client writes the claim's id to
``CLAIM:HEARTBEAT`` every ``heartbeat_period`` s from a task in the caller's event loop; a claim
whose heartbeat stops (the process holding it died) is released by the service's watchdog after
``CLAIM:TIMEOUT`` s.

Modes:

- ``"pause"``: the feedback stops correcting while the claim is held (measurements).
- ``"exclude"``: the feedback keeps correcting without the claimed BPMs and correctors (and
  writes correctors one by one, never their family waveform); for plans that move what the
  feedback does not write.
- ``"fold"``: as ``"pause"``; when the claim is released with ``keep=True`` the orbit change
  made meanwhile is folded into the feedback's reference (a bump stays where the plan put it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Literal

import numpy as np
from ophyd_async.core import Array1D, StandardReadable
from ophyd_async.core import StandardReadableFormat as Format
from ophyd_async.epics.core import epics_signal_r, epics_signal_rw, epics_signal_w

from accplans.config import MachineDescription, feedback_pvs

from ._calibrated import EpicsProtocol, pv

__all__ = ["CLAIM_MODES", "ClaimError", "ClaimMode", "FeedbackClient", "default_feedback_prefix"]

ClaimMode = Literal["pause", "exclude", "fold"]
CLAIM_MODES: tuple[ClaimMode, ...] = ("pause", "exclude", "fold")

_log = logging.getLogger(__name__)


class ClaimError(RuntimeError):
    """The feedback refused a claim, or did not answer in time; nothing was moved."""


def default_feedback_prefix(description: MachineDescription) -> str:
    """The feedback service's PV prefix for a machine: ``<machine prefix>SOFB:``."""
    return f"{description.machine.prefix}SOFB:"


class FeedbackClient(StandardReadable):
    """Client of the orbit feedback service (``accplans feedback serve``).

    Reading it gives the state, the iteration counter and the rms orbit errors; its settings
    (enable, rate, gains, reference, exclusions) are signals; :meth:`claim` and
    :meth:`release` implement :class:`~accplans.devices.Arbiter`.

    Args:
        description: the machine description (BPM and corrector order of the arrays).
        prefix: the service's PV prefix (default :func:`default_feedback_prefix`).
        protocol: EPICS transport.
        heartbeat_period: seconds between heartbeats of a held claim.
        name: device name (default ``"feedback"``).
    """

    def __init__(
        self,
        description: MachineDescription,
        *,
        prefix: str | None = None,
        protocol: EpicsProtocol = "ca",
        heartbeat_period: float = 1.0,
        name: str = "feedback",
    ) -> None:
        self.description = description
        self.prefix = prefix or default_feedback_prefix(description)
        self.heartbeat_period = float(heartbeat_period)
        pvs = {k: pv(v, protocol) for k, v in feedback_pvs(self.prefix).items()}
        self._heartbeats: dict[str, asyncio.Task[None]] = {}
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.error_x = epics_signal_r(float, pvs["error_x"])
            self.error_y = epics_signal_r(float, pvs["error_y"])
        with self.add_children_as_readables():
            self.state = epics_signal_r(str, pvs["state"])
            self.iteration = epics_signal_r(int, pvs["iteration"])
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.rate = epics_signal_rw(float, pvs["rate"])
            self.frames = epics_signal_rw(int, pvs["frames"])
            self.gain_x = epics_signal_rw(float, pvs["gain_x"])
            self.gain_y = epics_signal_rw(float, pvs["gain_y"])
            self.pgain_x = epics_signal_rw(float, pvs["pgain_x"])
            self.pgain_y = epics_signal_rw(float, pvs["pgain_y"])
        self.enable = epics_signal_rw(bool, pvs["enable"])
        self.message = epics_signal_r(str, pvs["message"])
        self.heartbeat = epics_signal_r(int, pvs["heartbeat"])
        self.ref_x = epics_signal_rw(Array1D[np.float64], pvs["ref_x"])
        self.ref_y = epics_signal_rw(Array1D[np.float64], pvs["ref_y"])
        self.ref_capture = epics_signal_rw(bool, pvs["ref_capture"])
        self.exclude_bpm = epics_signal_rw(Array1D[np.int32], pvs["exclude_bpm"])
        self.exclude_h = epics_signal_rw(Array1D[np.int32], pvs["exclude_h"])
        self.exclude_v = epics_signal_rw(Array1D[np.int32], pvs["exclude_v"])
        self.claim_request = epics_signal_w(str, pvs["claim_request"])
        self.claim_release = epics_signal_w(str, pvs["claim_release"])
        self.claim_heartbeat = epics_signal_w(str, pvs["claim_heartbeat"])
        self.claim_ack = epics_signal_r(str, pvs["claim_ack"])
        self.claims = epics_signal_r(str, pvs["claims"])
        self.claim_timeout = epics_signal_rw(float, pvs["claim_timeout"])
        super().__init__(name=name)

    async def active_claims(self) -> list[dict]:
        """The claims the service holds now (``id``, ``owner``, ``mode``, ``resources``, ...)."""
        return json.loads(await self.claims.get_value() or "[]")

    async def claim(
        self, resources: Sequence[str], mode: ClaimMode, owner: str, timeout: float = 10.0
    ) -> str:
        """Claim ``resources`` (device or family names); return the claim's id.

        Returns once the service has registered the claim (it will not write a claimed
        resource until :meth:`release`); from then on a heartbeat keeps the claim alive.

        Raises:
            ClaimError: an unknown mode, a refusal (unknown resources, a conflicting claim),
                or no answer within ``timeout`` s.
        """
        if mode not in CLAIM_MODES:
            raise ClaimError(f"unknown claim mode {mode!r}; use one of {CLAIM_MODES}")
        claim_id = f"{owner}-{uuid.uuid4().hex[:12]}"
        request = {"id": claim_id, "owner": owner, "mode": mode, "resources": list(resources)}
        try:
            await self.claim_request.set(json.dumps(request), timeout=timeout)
        except TimeoutError as exc:
            raise ClaimError(
                f"the orbit feedback at {self.prefix} did not acknowledge the claim of "
                f"{_short(resources)} ({mode}) by {owner!r} within {timeout} s: is "
                f"`accplans feedback serve` running? nothing was moved"
            ) from exc
        held = {c["id"] for c in await self.active_claims()}
        if claim_id not in held:
            ack = json.loads(await self.claim_ack.get_value() or "{}")
            why = ack.get("message", "") if ack.get("id") == claim_id else "no reason given"
            raise ClaimError(
                f"the orbit feedback at {self.prefix} refused the claim of {_short(resources)} "
                f"({mode}) by {owner!r}: {why}; nothing was moved"
            )
        self._heartbeats[claim_id] = asyncio.get_running_loop().create_task(
            self._beat(claim_id), name=f"feedback heartbeat {claim_id}"
        )
        return claim_id

    async def release(self, claim_id: str, keep: bool = False, timeout: float = 10.0) -> None:
        """Release a claim; ``keep``: the plan's changes stay (a ``fold`` claim folds them)."""
        task = self._heartbeats.pop(claim_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        message = json.dumps({"id": claim_id, "keep": bool(keep)})
        await self.claim_release.set(message, timeout=timeout)

    async def _beat(self, claim_id: str) -> None:
        while True:
            try:
                await self.claim_heartbeat.set(claim_id, timeout=self.heartbeat_period * 5)
            except Exception as exc:  # keep beating: the watchdog only acts after a timeout
                _log.warning("feedback heartbeat of %s failed: %s", claim_id, exc)
            await asyncio.sleep(self.heartbeat_period)


def _short(resources: Sequence[str]) -> str:
    names = list(resources)
    return f"{names[:5]}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
