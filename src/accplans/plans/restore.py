"""``restore_setpoints``: apply a snapshot or a pending restore journaled by a plan."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.data import run_metadata
from accplans.devices import SettableFamily

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

__all__ = ["restore_setpoints"]


def restore_setpoints(
    families: Sequence[SettableFamily],
    pending: PendingRestore | Snapshot | str | Path,
    *,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Set ``families`` back to the setpoints of a snapshot or a journaled pending restore.

    The snapshot must come from this machine (same ``MACHINE:ID``) and the same description
    (config hash); every value is checked against the limits before anything moves. Families
    the snapshot does not cover are left alone. If the restore fails part-way, the families
    return to the state they had before it started. A pending restore whose file was given is
    moved to ``applied/`` beside it once it succeeded.

    Args:
        families: the families to restore (e.g. ``[machine.hcorr, machine.vcorr]``).
        pending: a :class:`PendingRestore`, a :class:`Snapshot`, or the path of a journaled
            pending restore (JSON).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run.
    """
    if isinstance(pending, (str, Path)):
        pending = PendingRestore.load(pending)
    snapshot = pending.snapshot if isinstance(pending, PendingRestore) else pending
    if not families:
        raise ValueError("restore_setpoints needs at least one family")
    description = description_of(*families)
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
        plan_args={"families": [f.name for f in families], "snapshot_taken": snapshot.taken},
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        before = yield from take_snapshot(description, chosen)

        # one record per family, all read in every event (bluesky wants the same objects in
        # every event of a stream): each event holds every family's setpoints after that step
        records = {
            fam.name: Record(
                fam.name,
                {"setpoint": np.array([before.setpoints[fam.name][n] for n in fam.names])},
                {"setpoint": description.device(fam.names[0]).unit},
            )
            for fam in chosen
        }

        @bpp.run_decorator(md=_md)
        def apply() -> MsgGenerator[None]:
            for fam in chosen:
                yield from bps.checkpoint()
                yield from set_family_hardware(fam, targets[fam.name])
                records[fam.name].update(setpoint=targets[fam.name])
                yield from bps.create("primary")
                for record in records.values():
                    yield from bps.read(record)
                yield from bps.save()

        uid = yield from restore_on_exit(apply(), chosen, before, policy="correction")
        if isinstance(pending, PendingRestore) and pending.path.exists():
            done = pending.path.parent / "applied"
            done.mkdir(exist_ok=True)
            pending.path.replace(done / pending.path.name)
        return uid

    return (yield from plan())
