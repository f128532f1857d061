"""Magnet strengths (and their hardware values) that a lattice file sets, and its optics.

``load_optics`` reads a lattice file (anything ``at.load_lattice`` reads: ``.mat``, ``.m``,
``.json``, elegant ``.lte``, ...) through :func:`strengths_from_lattice`: each magnet device of
the description takes the strength of its lattice element (matched by index, checked by
``FamName``), cross-talk is undone as the online model does, and the calibrations turn the
nominal strengths into hardware values. It runs in the plan's worker process.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import at
import numpy as np

from ..config import MachineDescription, parse_field

__all__ = ["LatticeStrengths", "strengths_from_lattice"]

_MAGNETS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")


@dataclass(frozen=True)
class LatticeStrengths:
    """What a lattice file asks of the magnets, and the optics it has.

    Attributes:
        path: the file read.
        names: magnet device names (description order).
        strengths: nominal strength of each device (SI: rad, m^-2, m^-3), cross-talk undone.
        hardware: hardware value of each (A), through its calibration.
        tunes: (2,) fractional tunes of the file's lattice (4D, on its closed orbit).
        bpm_names: BPMs of the description (family order).
        beta: (nbpm, 2) beta functions (m) of the file's lattice at those BPMs.
    """

    path: str
    names: tuple[str, ...]
    strengths: np.ndarray
    hardware: np.ndarray
    tunes: np.ndarray
    bpm_names: tuple[str, ...]
    beta: np.ndarray

    def hardware_of(self, names: Sequence[str]) -> np.ndarray:
        """Hardware values (A) of the devices ``names``; ``KeyError`` naming the missing."""
        index = {n: k for k, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise KeyError(f"{self.path} sets no strength for {missing[:5]}")
        return self.hardware[[index[n] for n in names]]


def _read(elem: Any, attr: str, index: int | None) -> float:
    value = getattr(elem, attr, None)
    if value is None:
        return 0.0  # a field the file's element lacks (a KickAngle never set) is zero
    if index is None:
        return float(value)
    arr = np.asarray(value, dtype=float).ravel()
    return float(arr[index]) if index < arr.size else 0.0


def _same_name(found: str, expected: str) -> bool:
    """Whether element name ``found`` is ``expected``, or ``expected.N``.

    pyAT's elegant and MAD-X writers rename the elements of one name that differ (a fitted
    lattice's quadrupoles): ``QF``, ``QF.1``, ...
    """
    return found == expected or re.fullmatch(re.escape(expected) + r"\.[0-9]+", found) is not None


def strengths_from_lattice(
    description: MachineDescription,
    path: str | Path,
    use: str | None = None,
    *,
    kinds: Sequence[str] = _MAGNETS,
) -> LatticeStrengths:
    """Strengths and hardware values that the lattice file ``path`` sets on ``description``.

    The file must describe the same lattice as the description (same elements in the same
    order, as a file pyAT saved from it): each magnet device reads the field it drives
    (``DeviceSpec.field``) from its first element, whose ``FamName`` must be the one the
    description names (or that name with pyAT's ``.N`` suffix of elegant and MAD-X files).
    A field the file's element lacks reads as zero: elegant and MAD-X files carry no corrector
    kick or skew component on a sextupole, so load only the families they describe from them.

    Args:
        description: the machine description.
        path: the lattice file (any format ``at.load_lattice`` reads).
        use: variable of a ``.mat`` file holding the ring (pyAT's default otherwise).
        kinds: device kinds to read (default every magnet kind).

    Returns:
        The strengths (nominal, SI), their hardware values and the file's optics at the BPMs.

    Raises:
        ValueError: the file cannot be read, or does not match the description (the message
            names the file, the device and the element).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"load_optics: lattice file {path} does not exist")
    try:
        ring = at.load_lattice(str(path), **({"use": use} if use else {}))
    except Exception as exc:  # pyAT raises many kinds; say which file failed and why
        raise ValueError(f"load_optics: pyAT cannot read {path}: {exc}") from exc
    ring.disable_6d()
    n = len(ring)
    devices = [d for d in description.devices if d.kind in kinds]
    beam: dict[str, float] = {}
    for dev in devices:
        assert dev.field is not None  # magnets have a field (checked by the description)
        e = dev.elements[0]
        if e >= n:
            raise ValueError(
                f"{path}: device {dev.name} drives element {e}, the file has {n} elements: "
                "it is not the description's lattice"
            )
        if dev.element_names and not _same_name(str(ring[e].FamName), dev.element_names[0]):
            raise ValueError(
                f"{path}: element {e} is {ring[e].FamName!r}, device {dev.name} expects "
                f"{dev.element_names[0]!r}: the file is not the description's lattice"
            )
        attr, index = parse_field(dev.field)
        beam[dev.name] = _read(ring[e], attr, index)
    nominal = dict(beam)
    for ct in description.crosstalk:
        if all(name in beam for name in ct.devices):
            values = ct.invert(np.array([beam[name] for name in ct.devices]))
            nominal.update(zip(ct.devices, (float(v) for v in values), strict=True))
    names = tuple(d.name for d in devices)
    hardware = []
    for dev in devices:
        assert dev.calibration is not None
        hardware.append(float(dev.calibration.to_hardware(nominal[dev.name])))
    bpm_names = tuple(
        name
        for fam in description.families_of_kind("bpm")
        for name in description.family(fam).devices
    )
    bpm_elems = np.array([description.device(b).elements[0] for b in bpm_names], dtype=np.uint32)
    try:
        _, ringdata, data = at.linopt6(ring, refpts=bpm_elems)
    except at.AtError as exc:
        raise ValueError(f"{path}: the lattice has no stable optics: {exc}") from None
    return LatticeStrengths(
        path=str(path),
        names=names,
        strengths=np.array([nominal[n] for n in names]),
        hardware=np.array(hardware),
        tunes=np.asarray(ringdata.tune, float)[:2],
        bpm_names=bpm_names,
        beta=np.asarray(data.beta, float).reshape(len(bpm_names), 2),
    )
