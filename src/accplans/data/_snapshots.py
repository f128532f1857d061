"""Setpoint snapshots and loaded optics as results, a setpoint diff, a default Tiled client.

A snapshot (``save_setpoints``) is the result kind ``"snapshot"``: the hardware setpoint of
every device of some families (A, Hz: ADR 2, restores are in hardware units), with the device
names, their families and units, the machine identity, the config hash, the operator and a
comment. :func:`setpoint_diff` compares two sets of setpoints (pure; ``restore_setpoints`` and
``accplans snapshot diff`` use it) and :func:`format_diff` prints the comparison as a table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._results import FieldSpec, Result, ResultSchema, register_result_kind

__all__ = [
    "SetpointChange",
    "format_diff",
    "setpoint_diff",
    "snapshot_setpoints",
    "tiled_client_from_env",
]


def _check_snapshot(values: Mapping[str, Any]) -> None:
    names = [str(n) for n in values["device_names"]]
    if len(set(names)) != len(names):
        raise ValueError("'device_names' must be unique")
    if not np.all(np.isfinite(values["setpoints"])):
        raise ValueError("'setpoints' must be finite")


register_result_kind(
    ResultSchema(
        kind="snapshot",
        version=1,
        description=(
            "Hardware setpoints of some families (what save_setpoints read; what "
            "restore_setpoints writes back): one value per device in family order, in the "
            "hardware unit of each device (``units``: A, Hz)."
        ),
        fields={
            # several hardware units in one array: the unit of each value is in 'units'
            "setpoints": FieldSpec("", "(ndev,)"),
            "device_names": FieldSpec("", "(ndev,)", "str"),
            "family_names": FieldSpec("", "(ndev,)", "str"),
            "units": FieldSpec("", "(ndev,)", "str"),
            "machine_id": FieldSpec("", "()", "str"),
            "config_hash": FieldSpec("", "()", "str"),
            "operator": FieldSpec("", "()", "str"),
            "comment": FieldSpec("", "()", "str"),
            "taken": FieldSpec("s", "()"),
        },
        check=_check_snapshot,
    )
)

register_result_kind(
    ResultSchema(
        kind="setpoint_diff",
        version=1,
        description=(
            "What a restore changes: for each device, its setpoint before (``now``), the "
            "target and ``delta = target - now``, in the device's hardware unit (``units``)."
        ),
        fields={
            "device_names": FieldSpec("", "(ndev,)", "str"),
            "family_names": FieldSpec("", "(ndev,)", "str"),
            "units": FieldSpec("", "(ndev,)", "str"),
            "now": FieldSpec("", "(ndev,)"),
            "target": FieldSpec("", "(ndev,)"),
            "delta": FieldSpec("", "(ndev,)"),
        },
    )
)


def snapshot_setpoints(result: Result) -> dict[str, dict[str, float]]:
    """The setpoints of a ``"snapshot"`` result: family -> device -> value (hardware units)."""
    if result.kind != "snapshot":
        raise ValueError(f"expected a 'snapshot' result, got {result.kind!r} (run {result.uid})")
    out: dict[str, dict[str, float]] = {}
    for fam, name, value in zip(
        result["family_names"], result["device_names"], result["setpoints"], strict=True
    ):
        out.setdefault(str(fam), {})[str(name)] = float(value)
    return out


@dataclass(frozen=True)
class SetpointChange:
    """One row of a setpoint diff (hardware units).

    Attributes:
        device: device name.
        family: its family.
        unit: its hardware unit (A, Hz).
        now: the setpoint before (NaN: the device is only in the target).
        target: the setpoint after (NaN: the device is only in ``now``).
        delta: ``target - now`` (NaN where either is missing).
    """

    device: str
    family: str
    unit: str
    now: float
    target: float
    delta: float


def setpoint_diff(
    now: Mapping[str, Mapping[str, float]],
    target: Mapping[str, Mapping[str, float]],
    units: Mapping[str, str] | None = None,
    *,
    changed_only: bool = False,
) -> list[SetpointChange]:
    """Compare two sets of setpoints (family -> device -> value), device by device.

    Args:
        now: the setpoints before (e.g. the machine's, or snapshot A).
        target: the setpoints after (e.g. a snapshot to restore, or snapshot B).
        units: device -> hardware unit (``""`` where missing).
        changed_only: keep only rows whose value differs (or that one side lacks).

    Returns:
        One :class:`SetpointChange` per device, families in the order of ``now`` then those
        only in ``target``, devices in family order.
    """
    units = units or {}
    rows: list[SetpointChange] = []
    for family in list(now) + [f for f in target if f not in now]:
        a = now.get(family, {})
        b = target.get(family, {})
        for device in list(a) + [d for d in b if d not in a]:
            va = float(a.get(device, math.nan))
            vb = float(b.get(device, math.nan))
            if changed_only and va == vb:
                continue
            rows.append(SetpointChange(device, family, units.get(device, ""), va, vb, vb - va))
    return rows


def format_diff(rows: Sequence[SetpointChange], *, limit: int | None = None) -> str:
    """A fixed-width table of ``rows`` (device, family, unit, now, target, delta).

    Args:
        rows: the diff.
        limit: show at most this many rows, largest ``|delta|`` first (all, in order, if None).
    """
    shown = list(rows)
    if limit is not None and len(shown) > limit:
        shown = sorted(shown, key=lambda r: -abs(r.delta) if math.isfinite(r.delta) else -math.inf)
        shown = shown[:limit]
    lines = [
        f"{'device':12s} {'family':12s} {'unit':4s} {'now':>14s} {'target':>14s} {'delta':>12s}"
    ]
    lines += [
        f"{r.device:12s} {r.family:12s} {r.unit:4s} {r.now:14.6g} {r.target:14.6g} {r.delta:12.4g}"
        for r in shown
    ]
    if len(shown) < len(rows):
        lines.append(f"... and {len(rows) - len(shown)} more")
    return "\n".join(lines)


def tiled_client_from_env() -> Any:
    """A Tiled client from ``$TILED_URI`` and ``$TILED_API_KEY`` (as the profile sets them).

    Raises:
        RuntimeError: ``TILED_URI`` is not set.
    """
    from tiled.client import from_uri

    uri = os.environ.get("TILED_URI") or None
    if uri is None:
        raise RuntimeError(
            "no Tiled client: give client= or set TILED_URI (and TILED_API_KEY) as the profile does"
        )
    return from_uri(uri, api_key=os.environ.get("TILED_API_KEY") or None)


register_result_kind(
    ResultSchema(
        kind="optics",
        version=1,
        description=(
            "Magnet strengths an optics sets (load_optics): each device's nominal strength "
            "(SI, unit in ``strength_units``) and hardware value (``hardware_units``), with the "
            "optics's fractional tunes and beta functions at the BPMs; ``source`` names the "
            "lattice file or run it came from. Every channel of a multi-channel magnet some "
            "of whose channels were loaded is listed (the optics's values, all channels "
            "together); the currents written are the run's primary events."
        ),
        fields={
            "device_names": FieldSpec("", "(ndev,)", "str"),
            "strengths": FieldSpec("", "(ndev,)"),
            "strength_units": FieldSpec("", "(ndev,)", "str"),
            "hardware": FieldSpec("", "(ndev,)"),
            "hardware_units": FieldSpec("", "(ndev,)", "str"),
            "tunes": FieldSpec("", "(2,)"),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "beta": FieldSpec("m", "(nbpm, 2)"),
            "source": FieldSpec("", "()", "str"),
        },
    )
)
