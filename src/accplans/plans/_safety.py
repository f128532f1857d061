"""The safety net every machine-changing plan uses: limit checks, restore, pending restores.

DESIGN.md: a measurement plan restores everything it changed however it ends; a correction plan
keeps its result when it succeeds, keeps its last completed step when the user stops it, and
restores the starting state when it fails or is aborted. If the machine cannot be reached to
restore, the plan journals a *pending restore* that :func:`restore_setpoints` applies later.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator, RequestStop, RunEngineControlException

from accplans.config import MachineDescription
from accplans.devices import ClaimMode, SettableFamily, call_async

from ._claims import Claim, claim, release, resources_of
from ._stubs import set_family_hardware

__all__ = [
    "PendingRestore",
    "PendingRestoreError",
    "description_of",
    "Snapshot",
    "check_hardware_limits",
    "journal_dir",
    "restore_on_exit",
    "take_snapshot",
]

logger = logging.getLogger(__name__)

Policy = Literal["measurement", "correction"]


def journal_dir() -> Path:
    """Folder of pending restores: ``$ACCPLANS_JOURNAL`` or ``~/.accplans/pending``."""
    return Path(os.environ.get("ACCPLANS_JOURNAL", Path.home() / ".accplans" / "pending"))


@dataclass
class Snapshot:
    """Hardware setpoints (A, Hz) of some families, in family order, taken before a plan moved."""

    machine_id: str
    config_hash: str
    setpoints: dict[str, dict[str, float]] = field(default_factory=dict)  # family -> name -> value
    taken: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "machine_id": self.machine_id,
            "config_hash": self.config_hash,
            "setpoints": self.setpoints,
            "taken": self.taken,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        """Inverse of :meth:`to_json`."""
        return cls(data["machine_id"], data["config_hash"], data["setpoints"], data["taken"])


@dataclass
class PendingRestore:
    """A restore that could not be applied: the snapshot, why, and where it is journaled."""

    snapshot: Snapshot
    reason: str
    path: Path

    @classmethod
    def load(cls, path: str | Path) -> PendingRestore:
        """Read a journaled pending restore."""
        path = Path(path)
        data = json.loads(path.read_text())
        return cls(Snapshot.from_json(data["snapshot"]), data["reason"], path)

    @classmethod
    def write(
        cls, snapshot: Snapshot, reason: str, directory: Path | None = None
    ) -> PendingRestore:
        """Journal ``snapshot`` as a pending restore (one JSON file, written atomically)."""
        directory = directory or journal_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{id(snapshot):x}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"snapshot": snapshot.to_json(), "reason": reason}, indent=1))
        tmp.replace(path)
        return cls(snapshot, reason, path)


class PendingRestoreError(RuntimeError):
    """A plan could not restore the machine: a pending restore was journaled.

    Raised from the plan's own error (its ``__cause__``), if any.

    Attributes:
        pending: the journaled :class:`PendingRestore` (``pending.path`` is the file to give
            :func:`~accplans.plans.restore_setpoints`).
    """

    def __init__(self, message: str, pending: PendingRestore) -> None:
        super().__init__(message)
        self.pending = pending


def take_snapshot(
    description: MachineDescription, families: Sequence[SettableFamily]
) -> MsgGenerator[Snapshot]:
    """Read the hardware setpoints of ``families`` (nothing moves)."""
    snap = Snapshot(description.machine.id, description.config_hash)
    for fam in families:
        values = yield from call_async(fam.hardware_setpoints)
        snap.setpoints[fam.name] = dict(zip(fam.names, map(float, values), strict=True))
    return snap


def description_of(*devices: Any) -> MachineDescription:
    """The machine description the devices share; a clear error if they lack one or differ."""
    found = {id(d.description): d.description for d in devices if d is not None}
    if None in found.values() or not found:
        names = [getattr(d, "name", repr(d)) for d in devices if d is not None]
        raise ValueError(f"devices {names} carry no machine description: build them from one")
    if len({desc.config_hash for desc in found.values()}) > 1:
        raise ValueError("the devices were built from different machine descriptions")
    return next(iter(found.values()))


def check_hardware_limits(
    description: MachineDescription, names: Sequence[str], values: np.ndarray
) -> None:
    """Raise ``ValueError`` naming every device whose target is outside its limits or NaN.

    Call it with every value a plan will set, before the plan moves anything.
    """
    problems = []
    for name, value in zip(names, np.asarray(values, float), strict=True):
        try:
            description.device(name).check_limits(float(value))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("refused before any move: " + "; ".join(problems[:5]) + more)


def _restore(families: Sequence[SettableFamily], snapshot: Snapshot) -> MsgGenerator[None]:
    for fam in families:
        saved = snapshot.setpoints[fam.name]
        yield from set_family_hardware(fam, np.array([saved[n] for n in fam.names]))


def restore_on_exit(
    plan: MsgGenerator[Any],
    families: Sequence[SettableFamily],
    snapshot: Snapshot,
    *,
    policy: Policy = "measurement",
    claim_mode: ClaimMode | None = "pause",
    owner: str = "accplans",
    also_claim: Sequence[str] = (),
) -> MsgGenerator[Any]:
    """Claim ``families``, run ``plan``, restore as the policy says, release the claim.

    The claim (:func:`~accplans.plans.claim`, from the arbiter set by
    :func:`~accplans.plans.use_arbiter`; nothing when there is none) is acknowledged before
    ``plan`` starts, so the orbit feedback never writes what the plan moves; it is released after
    the restore, with ``keep`` true when the plan's changes stay. A refused claim raises
    :class:`~accplans.plans.ClaimError` before anything moves.

    - ``"measurement"``: restore on success, failure, abort and stop.
    - ``"correction"``: keep the result on success and the last completed step on a user stop
      (``RE.stop()``); restore on failure and abort.

    If the restore itself fails (the machine cannot be reached), a pending restore is journaled
    (:func:`journal_dir`) and :class:`PendingRestoreError` is raised (from the plan's error, if
    any) saying where; after an abort or a stop, the RunEngine's own exception is kept, with a
    note saying where.

    Args:
        plan: the plan's body (moves and reads).
        families: what it moves (restored from ``snapshot``, claimed).
        snapshot: hardware setpoints taken before any move.
        policy: ``"measurement"`` or ``"correction"`` (above).
        claim_mode: ``"pause"``, ``"exclude"``, ``"fold"``, or ``None`` to claim nothing.
        owner: the plan's name, shown by the arbiter.
        also_claim: more resource names to claim (e.g. BPMs whose reference the plan changes).
    """
    outcome: dict[str, Any] = {"error": None}
    held: Claim | None = None
    if claim_mode is not None:
        held = yield from claim(resources_of(families) + tuple(also_claim), claim_mode, owner=owner)

    def on_error(exc: Exception) -> MsgGenerator[None]:
        outcome["error"] = exc
        yield from []

    def final() -> MsgGenerator[None]:
        exc = outcome["error"]
        keep = policy == "correction" and (exc is None or isinstance(exc, RequestStop))
        failure: Exception | None = None
        if not keep:
            try:
                yield from restore()
            except Exception as restore_failure:  # release the claim first, then raise it
                failure = restore_failure
        yield from release_claim(keep)
        if failure is not None:
            raise failure

    def release_claim(keep: bool) -> MsgGenerator[None]:
        try:
            yield from release(held, keep=keep)
        except Exception as exc:  # the watchdog releases it: the heartbeat has stopped
            logger.error("releasing claim %s failed (%s): the arbiter's watchdog will", held, exc)

    def restore() -> MsgGenerator[None]:
        exc = outcome["error"]
        try:
            yield from _restore(families, snapshot)
        except Exception as restore_error:
            reason = f"restore failed ({type(restore_error).__name__}: {restore_error})"
            if exc is not None:
                reason += f" after the plan ended with {type(exc).__name__}: {exc}"
            pending = PendingRestore.write(snapshot, reason)
            logger.error("%s; pending restore journaled at %s", reason, pending.path)
            if isinstance(exc, RunEngineControlException):
                # the RunEngine needs its own abort/stop back; it passes these on unchanged
                exc.add_note(f"accplans: {reason}; pending restore journaled at {pending.path}")
                return
            # a new exception, not a note on the plan's error: the RunEngine hands errors to the
            # caller through a concurrent future, which replaces a TimeoutError (the usual error
            # of an unreachable machine) by a new instance and so drops its notes
            raise PendingRestoreError(
                f"{reason}; pending restore journaled at {pending.path}: apply it with "
                f"restore_setpoints(families, {str(pending.path)!r})",
                pending,
            ) from exc

    return (yield from bpp.contingency_wrapper(plan, except_plan=on_error, final_plan=final))
