"""``save_setpoints``: record the setpoints of families (or the whole machine) as a snapshot."""

from __future__ import annotations

from typing import Any, cast

import bluesky.preprocessors as bpp
from bluesky.utils import MsgGenerator

from accplans.data import Result, load_result, record_result, run_metadata, snapshot_setpoints
from accplans.devices import Machine, SettableFamily

from ._safety import Snapshot, description_of, take_snapshot

__all__ = ["load_snapshot", "save_setpoints", "settable_families"]


def settable_families(*items: SettableFamily | Machine) -> list[SettableFamily]:
    """The families ``items`` name (duplicates dropped).

    A :class:`~accplans.devices.Machine` stands for every magnet family and the RF frequency.
    """
    out: list[SettableFamily] = []
    for item in items:
        if isinstance(item, Machine):
            found: list[SettableFamily] = [
                f for f in item.families.values() if isinstance(f, SettableFamily)
            ]
            if item.rf is not None:
                found.append(item.rf)
        elif isinstance(item, SettableFamily):
            found = [item]
        else:
            raise TypeError(f"{item!r} is neither a settable family (magnets, RF) nor a Machine")
        out += [f for f in found if all(f is not g for g in out)]
    return out


def snapshot_of(result: Result) -> Snapshot:
    """The :class:`Snapshot` a ``"snapshot"`` result holds (hardware setpoints)."""
    return Snapshot(
        machine_id=str(result["machine_id"]),
        config_hash=str(result["config_hash"]),
        setpoints=snapshot_setpoints(result),
        taken=float(result["taken"]),
    )


def load_snapshot(client: Any, uid: str) -> tuple[Snapshot, Result]:
    """Load the snapshot recorded by run ``uid`` (``save_setpoints``) from Tiled.

    Returns:
        The :class:`Snapshot` and the stored result (with its comment and operator).
    """
    result = load_result(client, uid, "snapshot")
    return snapshot_of(result), result


def save_setpoints(
    *families: SettableFamily,
    comment: str = "",
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Record the hardware setpoints of ``families`` as a snapshot in Tiled (nothing moves).

    The run holds one ``"snapshot"`` result (``load_result(client, uid, "snapshot")``): every
    member's setpoint in its hardware unit (A, Hz), device and family names, units, the
    machine identity, the config hash, the operator and ``comment``. Give the run's uid to
    :func:`~accplans.plans.restore_setpoints` to go back to it, or compare snapshots with
    ``accplans snapshot diff``.

    Args:
        families: the families to save (e.g. ``hcorr, vcorr, quadrupoles, rf``); the
            :class:`~accplans.devices.Machine` itself saves every magnet family and the RF
            frequency.
        comment: free text stored with the snapshot (why it was taken).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run.
    """
    chosen = settable_families(*families)
    if not chosen:
        raise ValueError("save_setpoints needs at least one family (or the machine)")
    description = description_of(*chosen)
    _md = run_metadata(
        description,
        plan_name="save_setpoints",
        plan_args={"families": [f.name for f in chosen], "comment": comment},
        comment=comment,
        families=[f.name for f in chosen],
    )
    _md.update(md or {})

    @bpp.run_decorator(md=_md)
    def plan() -> MsgGenerator[None]:
        snap = yield from take_snapshot(description, chosen)
        names, fams, units, values = [], [], [], []
        for fam in chosen:
            for name, value in snap.setpoints[fam.name].items():
                names.append(name)
                fams.append(fam.name)
                units.append(description.device(name).unit)
                values.append(value)
        yield from record_result(
            "snapshot",
            setpoints=values,
            device_names=names,
            family_names=fams,
            units=units,
            machine_id=snap.machine_id,
            config_hash=snap.config_hash,
            operator=str(_md["operator"]),
            comment=comment,
            taken=snap.taken,
        )

    return cast(str, (yield from plan()))  # run_decorator returns the run's uid
