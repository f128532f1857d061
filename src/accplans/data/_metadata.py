"""Standard run metadata: what every accplans run records in its start document."""

from __future__ import annotations

import getpass
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from accplans import __version__ as _accplans_version

if TYPE_CHECKING:
    from accplans.config import MachineDescription

__all__ = ["STANDARD_METADATA_KEYS", "jsonable", "run_metadata"]

#: Keys :func:`run_metadata` always sets (``**extra`` may not replace them).
STANDARD_METADATA_KEYS = (
    "plan_name",
    "plan_args",
    "machine",
    "sections",
    "config_hash",
    "lattice",
    "twin_seed",
    "operator",
    "accplans_version",
    "units",
)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: numpy scalars/arrays to Python, other objects to ``repr``.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has none).
    """
    if value is None or isinstance(value, bool | str | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return repr(value)


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no $USER/$LOGNAME and no passwd entry (some containers)
        return "unknown"


def run_metadata(
    description: MachineDescription,
    *,
    plan_name: str,
    plan_args: Mapping[str, Any],
    operator: str | None = None,
    twin_seed: int | None = None,
    units: Mapping[str, str] | None = None,
    sections: str | Sequence[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The standard start-document metadata of an accplans run (a pure function).

    Args:
        description: The machine the plan runs on.
        plan_name: Name of the plan (``"measure_orm"``).
        plan_args: The plan's arguments; stored JSON-safe (devices and other objects as
            ``repr``).
        operator: Who runs it; default: the login name.
        twin_seed: Error seed of the digital twin, or ``None`` on the real machine (stored as
            ``"machine"``).
        units: Unit of every field the run records (data key -> unit, SI except on PVs).
        sections: Section(s) the plan acts on; default: all sections of the description.
        **extra: More metadata (may not replace the standard keys).

    Returns:
        A JSON-safe dict: ``plan_name``, ``plan_args``, ``machine`` (``name``, ``id``,
        ``prefix``), ``sections``, ``config_hash``, ``lattice``, ``twin_seed`` (int or
        ``"machine"``), ``operator``, ``accplans_version``, ``units``, then ``extra``.

    Raises:
        ValueError: Empty plan name, unknown section, bad units or seed, or an ``extra`` key
            that would replace a standard one.
    """
    if not isinstance(plan_name, str) or not plan_name:
        raise ValueError(f"run_metadata: plan_name must be a non-empty string, got {plan_name!r}")
    known = {s.name: s for s in description.sections}
    if sections is None:
        chosen = list(known)
    else:
        chosen = [sections] if isinstance(sections, str) else list(sections)
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise ValueError(
                f"run_metadata: machine {description.machine.name!r} has no section(s) "
                f"{unknown}; sections: {list(known)}"
            )
    if twin_seed is not None and (isinstance(twin_seed, bool) or not isinstance(twin_seed, int)):
        raise ValueError(f"run_metadata: twin_seed must be an int or None, got {twin_seed!r}")
    units = dict(units or {})
    bad = {k: v for k, v in units.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"run_metadata: units must map field names to unit strings; got {bad}")
    clash = sorted(set(extra) & set(STANDARD_METADATA_KEYS))
    if clash:
        raise ValueError(f"run_metadata: extra metadata may not replace standard key(s) {clash}")
    md: dict[str, Any] = {
        "plan_name": plan_name,
        "plan_args": jsonable(dict(plan_args)),
        "machine": {
            "name": description.machine.name,
            "id": description.machine.id,
            "prefix": description.machine.prefix,
        },
        "sections": chosen,
        "config_hash": description.config_hash,
        "lattice": description.lattice.model_dump(mode="json"),
        "twin_seed": twin_seed if twin_seed is not None else "machine",
        "operator": operator if operator is not None else _login_name(),
        "accplans_version": _accplans_version,
        "units": units,
    }
    md.update(jsonable(extra))
    return md
