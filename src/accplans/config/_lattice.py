"""Loading the lattice a description names, and checking it against the description."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import at
import numpy as np

from ._models import LatticeSource, MachineDescription

__all__ = ["BUILTIN_LATTICES", "LatticeError", "load_lattice", "prepare_lattice"]

_HERE = Path(__file__).parent / "lattices"


class LatticeError(ValueError):
    """The lattice cannot be loaded, or does not match the description."""


def _ebs() -> at.Lattice:
    # hmba.mat is pyAT's example ESRF-EBS cell (accelerator-toolbox 0.9.0,
    # machine_data/hmba.mat, BSD-3-Clause), shipped here so it cannot move under us.
    path = _HERE / "hmba.mat"
    if not path.exists():
        raise LatticeError(f"the shipped EBS cell {path} is missing: reinstall accplans")
    cell = at.load_lattice(str(path))
    ring = cell.repeat(32)
    ring.disable_6d()
    return ring


def _small() -> at.Lattice:
    from .lattices._small_ring import small_ring

    return small_ring()


#: Lattices shipped with accplans: name -> function building a fresh (4D) ring.
BUILTIN_LATTICES: dict[str, Callable[[], at.Lattice]] = {"ebs": _ebs, "small": _small}


def load_lattice(source: LatticeSource, base_dir: str | Path | None = None) -> at.Lattice:
    """Load the lattice ``source`` names, as a 4D ring (cavities on IdentityPass).

    Args:
        source: the description's lattice entry.
        base_dir: folder that a relative ``file`` is relative to (the YAML file's folder).
    """
    if source.builtin is not None:
        try:
            build = BUILTIN_LATTICES[source.builtin]
        except KeyError:
            raise LatticeError(
                f"lattice.builtin: unknown lattice {source.builtin!r}; "
                f"known: {sorted(BUILTIN_LATTICES)}"
            ) from None
        return build()
    assert source.file is not None
    path = Path(source.file)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        raise LatticeError(f"lattice.file: {path} does not exist")
    kwargs = {"use": source.use} if source.use else {}
    try:
        ring = at.load_lattice(str(path), **kwargs)
    except Exception as exc:  # pyAT raises many kinds; say which file failed and why
        raise LatticeError(f"lattice.file: pyAT cannot read {path}: {exc}") from exc
    if source.repeat > 1:
        ring = ring.repeat(source.repeat)
    ring.disable_6d()
    return ring


_FIELD = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


def parse_field(field: str) -> tuple[str, int | None]:
    """``'KickAngle[1]'`` -> ``('KickAngle', 1)``; ``'Frequency'`` -> ``('Frequency', None)``."""
    m = _FIELD.match(field)
    if m is None:
        raise LatticeError(f"cannot parse lattice field {field!r}")
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def prepare_lattice(ring: at.Lattice, description: MachineDescription) -> at.Lattice:
    """Check the lattice against the description and give elements the fields it drives.

    Every element a device names must exist and carry the expected ``FamName``. Elements that a
    corrector or skew winding drives but that lack the field (a sextupole without ``KickAngle``,
    ``PolynomA`` too short) are given it, zeroed, in place. Arrays are made float64 so that
    in-place updates reach pyAT's C tracking.
    """
    n = len(ring)
    for dev in description.devices:
        for k, idx in enumerate(dev.elements):
            if not 0 <= idx < n:
                raise LatticeError(
                    f"device {dev.name}: element {idx} is outside the lattice (0..{n - 1})"
                )
            if dev.element_names and ring[idx].FamName != dev.element_names[k]:
                raise LatticeError(
                    f"device {dev.name}: element {idx} is {ring[idx].FamName!r}, the description "
                    f"expects {dev.element_names[k]!r}: lattice and description do not match"
                )
            if dev.field is None:
                continue
            name, i = parse_field(dev.field)
            elem = ring[idx]
            if i is None:
                if not hasattr(elem, name):
                    raise LatticeError(f"device {dev.name}: element {idx} has no {name}")
                continue
            arr = np.asarray(getattr(elem, name, np.zeros(0)), dtype=float)
            if name in ("PolynomA", "PolynomB"):
                other = "PolynomB" if name == "PolynomA" else "PolynomA"
                size = max(i + 1, len(arr), len(getattr(elem, other, ())))
                for attr in (name, other):
                    cur = np.asarray(getattr(elem, attr, np.zeros(0)), dtype=float)
                    new = np.zeros(size)
                    new[: len(cur)] = cur
                    setattr(elem, attr, new)
                elem.MaxOrder = max(int(getattr(elem, "MaxOrder", 0)), i)
            elif name == "KickAngle":
                new = np.zeros(2)
                new[: len(arr)] = arr[:2]
                elem.KickAngle = new
    return ring
