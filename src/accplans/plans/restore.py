"""``restore_setpoints``: go back to a saved snapshot or apply a pending restore."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.data import (
    Result,
    format_diff,
    record_result,
    run_metadata,
    setpoint_diff,
    tiled_client_from_env,
)
from accplans.devices import SettableFamily, call_async

from ._record import Record
from ._safety import (
    PendingRestore,
    Snapshot,
    check_hardware_limits,
    description_of,
    restore_on_exit,
    take_snapshot,
)
from ._stubs import set_family_hardware
from .snapshots import load_snapshot, snapshot_of

__all__ = ["restore_setpoints"]

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def _resolve_source(
    source: PendingRestore | Snapshot | Result | str | Path, client: Any
) -> MsgGenerator[tuple[Snapshot, PendingRestore | None, dict[str, Any]]]:
    """The snapshot ``source`` names, the pending restore it came from, and what to record."""
    if isinstance(source, Result):
        return snapshot_of(source), None, {"snapshot_uid": source.uid}
    if isinstance(source, PendingRestore):
        return source.snapshot, source, {"pending_restore": str(source.path)}
    if isinstance(source, Snapshot):
        return source, None, {}
    text = str(source)
    if isinstance(source, str) and _UID.match(text) and not Path(text).exists():

        def load() -> tuple[Snapshot, Result]:
            if client is not None:
                return load_snapshot(client, text)
            own = tiled_client_from_env()
            try:
                return load_snapshot(own, text)
            finally:
                own.context.close()

        # Tiled is HTTP: read it in a thread, so the RunEngine's loop stays live
        snapshot, result = yield from call_async(lambda: asyncio.to_thread(load))
        return snapshot, None, {"snapshot_uid": text, "snapshot_comment": result["comment"]}
    pending = PendingRestore.load(text)
    return pending.snapshot, pending, {"pending_restore": text}


def restore_setpoints(
    families: Sequence[SettableFamily],
    source: PendingRestore | Snapshot | Result | str | Path,
    *,
    steps: int = 1,
    client: Any = None,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Set ``families`` back to the setpoints of a saved snapshot or of a pending restore.

    ``source`` is the uid of a ``save_setpoints`` run (its snapshot is read from Tiled), the
    path of a pending restore journaled by a plan that could not reach the machine, or a
    :class:`Snapshot` / :class:`PendingRestore` / ``"snapshot"`` result. The snapshot must
    come from this machine (same ``MACHINE:ID``) and the same description (config hash): any
    other is refused before anything moves. Families the snapshot does not cover are left
    alone. The diff (device, unit, now, target, delta; hardware units) is logged and recorded
    as the run's ``"setpoint_diff"`` result; every target is checked against the limits before
    anything moves.

    The families ramp to the snapshot in ``steps`` linear steps, each family set in its own
    step (checkpoint -> set -> wait for the readbacks -> one ``primary`` event holding every
    family's setpoints). A correction plan: the restore stays when it succeeds, and the last
    completed step on ``RE.stop()``; if it fails mid-way or is aborted, every family returns
    to the setpoints it had before the restore started. A pending restore whose file was given
    is moved to ``applied/`` beside it once it succeeded.

    Args:
        families: the families to restore (e.g. ``[hcorr, vcorr, quadrupoles, rf]``).
        source: a snapshot run uid, a journaled pending restore (path of its JSON file), or a
            :class:`Snapshot`, :class:`PendingRestore` or ``"snapshot"`` result.
        steps: number of linear steps from the present setpoints to the snapshot's (>= 1).
        client: the Tiled container holding the snapshot run; default a client from
            ``$TILED_URI`` and ``$TILED_API_KEY`` (as the profile sets them).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run.
    """
    if not families:
        raise ValueError("restore_setpoints needs at least one family")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"restore_setpoints: steps must be an integer >= 1, got {steps!r}")
    description = description_of(*families)
    snapshot, pending, origin = yield from _resolve_source(source, client)
    if snapshot.machine_id != description.machine.id:
        raise ValueError(
            f"refused: the snapshot is from machine {snapshot.machine_id!r}, "
            f"this is {description.machine.id!r}"
        )
    if snapshot.config_hash != description.config_hash:
        raise ValueError(
            f"refused: the snapshot was taken with description {snapshot.config_hash}, "
            f"the machine now uses {description.config_hash}"
        )
    chosen = [f for f in families if f.name in snapshot.setpoints]
    if not chosen:
        raise ValueError(
            f"the snapshot holds none of {[f.name for f in families]}; "
            f"it holds {sorted(snapshot.setpoints)}"
        )
    targets = {}
    for fam in chosen:
        saved = snapshot.setpoints[fam.name]
        missing = [n for n in fam.names if n not in saved]
        if missing:
            raise ValueError(f"snapshot of {fam.name} lacks {missing[:5]}")
        targets[fam.name] = np.array([saved[n] for n in fam.names])
        check_hardware_limits(description, fam.names, targets[fam.name])
    _md = run_metadata(
        description,
        plan_name="restore_setpoints",
        plan_args={
            "families": [f.name for f in families],
            "source": str(source) if isinstance(source, (str, Path)) else repr(source),
            "steps": steps,
            "snapshot_taken": snapshot.taken,
        },
        num_points=steps * len(chosen),
        **origin,
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        before = yield from take_snapshot(description, chosen)
        units = {n: description.device(n).unit for f in chosen for n in f.names}
        diff = setpoint_diff(
            before.setpoints, {f.name: snapshot.setpoints[f.name] for f in chosen}, units
        )
        changed = [r for r in diff if r.delta != 0]
        logger.info(
            "restore_setpoints: %d of %d setpoints change:\n%s",
            len(changed),
            len(diff),
            format_diff(changed, limit=20),
        )
        start = {f.name: np.array([before.setpoints[f.name][n] for n in f.names]) for f in chosen}

        # one record per family, all read in every event (bluesky wants the same objects in
        # every event of a stream): each event holds every family's setpoints after that step
        records = {
            fam.name: Record(
                fam.name,
                {"setpoint": start[fam.name].copy()},
                {"setpoint": description.device(fam.names[0]).unit},
            )
            for fam in chosen
        }
        progress = Record("restore", {"step": 0})

        @bpp.run_decorator(md=_md)
        def apply() -> MsgGenerator[None]:
            yield from record_result(
                "setpoint_diff",
                device_names=[r.device for r in diff],
                family_names=[r.family for r in diff],
                units=[r.unit for r in diff],
                now=[r.now for r in diff],
                target=[r.target for r in diff],
                delta=[r.delta for r in diff],
            )
            for k in range(1, steps + 1):
                for fam in chosen:
                    a, b = start[fam.name], targets[fam.name]
                    value = b if k == steps else a + (b - a) * (k / steps)
                    yield from bps.checkpoint()
                    yield from set_family_hardware(fam, value)
                    records[fam.name].update(setpoint=value)
                    yield from bps.create("primary")
                    for record in records.values():
                        yield from bps.read(record)
                    yield from bps.read(progress.update(step=k))
                    yield from bps.save()

        uid = yield from restore_on_exit(
            apply(), chosen, before, policy="correction", owner="restore_setpoints"
        )
        if pending is not None and pending.path.exists():
            done = pending.path.parent / "applied"
            done.mkdir(exist_ok=True)
            pending.path.replace(done / pending.path.name)
        return uid

    return (yield from plan())
