"""Knobs: named linear combinations of magnet strength changes, applied through the families."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import numpy as np
from ophyd_async.core import AsyncStatus

from accplans.config import KnobSpec

from ._calibrated import LimitError
from ._magnets import MagnetFamily

__all__ = ["Knob"]


class Knob:
    """A knob of the description: a linear combination of magnet strength changes.

    Turning it by ``delta`` changes each of its magnets' strength by ``coefficient * delta``
    (SI strength units per knob unit).
    A knob holds no value (devices hold no state): :meth:`apply` adds a change to the present
    strength readbacks. It is applied as one :meth:`MagnetFamily.set_strengths` per family it
    touches, after every family's limits were checked (nothing is written if one fails).

    Args:
        name: knob name.
        spec: the knob's description.
        members: for each magnet of the knob, its family and index in it.
    """

    def __init__(
        self, name: str, spec: KnobSpec, members: Mapping[str, tuple[MagnetFamily, int]]
    ) -> None:
        missing = [n for n in spec.coefficients if n not in members]
        if missing:
            raise KeyError(f"knob {name}: magnets {missing[:5]} belong to no magnet family")
        self.name = name
        self.spec = spec
        self.unit = spec.unit
        self.names = tuple(spec.coefficients)
        self.coefficients = np.array([spec.coefficients[n] for n in self.names], dtype=float)
        groups: dict[int, tuple[MagnetFamily, list[int], list[float]]] = {}
        for device, coefficient in spec.coefficients.items():
            family, index = members[device]
            entry = groups.setdefault(id(family), (family, [], []))
            entry[1].append(index)
            entry[2].append(coefficient)
        self._groups = [
            (family, np.asarray(idx, dtype=np.intp), np.asarray(c, dtype=float))
            for family, idx, c in groups.values()
        ]

    def __repr__(self) -> str:
        return f"Knob({self.name!r}, {len(self.names)} magnets, unit={self.unit!r})"

    @property
    def families(self) -> tuple[MagnetFamily, ...]:
        """The families the knob writes to."""
        return tuple(f for f, _, _ in self._groups)

    async def targets(self, delta: float) -> list[tuple[MagnetFamily, np.ndarray, np.ndarray]]:
        """For each family: (family, indices, new strengths) for a change ``delta``."""
        current = await asyncio.gather(*(f.strengths(idx) for f, idx, _ in self._groups))
        return [
            (family, idx, now + c * float(delta))
            for (family, idx, c), now in zip(self._groups, current, strict=True)
        ]

    @AsyncStatus.wrap
    async def apply(self, delta: float) -> None:
        """Change the knob by ``delta`` (knob units): one family put per family.

        Raises:
            LimitError: a magnet would leave its limits (all families checked first; nothing
                written).
        """
        plan = await self.targets(delta)
        errors = []
        for family, idx, values in plan:
            try:
                family.check_strengths(values, idx)
            except LimitError as exc:
                errors.append(str(exc))
        if errors:
            raise LimitError(f"knob {self.name} by {delta:g} {self.unit}: " + "\n".join(errors))
        await asyncio.gather(*(f.set_strengths(v, idx) for f, idx, v in plan))
