"""Loading and saving machine descriptions (YAML), and the built-in machines."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import at
import yaml
from pydantic import ValidationError

from ._from_lattice import from_lattice
from ._lattice import load_lattice, prepare_lattice
from ._models import LatticeSource, MachineDescription

__all__ = [
    "BUILTIN_MACHINES",
    "DescriptionError",
    "build_lattice",
    "dump_description",
    "load_description",
]


class DescriptionError(ValueError):
    """A machine description is wrong; the message names the file, the key and the reason."""


def _ebs() -> MachineDescription:
    source = LatticeSource(builtin="ebs")
    ring = load_lattice(source)
    return from_lattice(
        ring,
        "ebs",
        "EBS:",
        source=source,
        machine_id="ebs-twin",
        # as pyAT's err.mat: correctors on the 192 sextupoles and the 96 SH multipoles
        hcorrectors=[at.Sextupole, "SH.*"],
        vcorrectors=[at.Sextupole, "SH.*"],
        skew_quadrupoles="SH.*",
        corrector_current=10.0,
        description="ESRF-EBS-like ring: pyAT's hmba.mat cell repeated 32 times",
    )


def _small() -> MachineDescription:
    source = LatticeSource(builtin="small")
    ring = load_lattice(source)
    return from_lattice(
        ring,
        "small",
        "SMALL:",
        source=source,
        machine_id="small-twin",
        skew_quadrupoles="SF",
        quadrupole_saturation=0.05,
        rf_range_hz=20000.0,
        description="8-cell 1.5 GeV test ring (accplans/config/lattices/_small_ring.py)",
    )


#: Machines known by name: ``load_description("ebs")``.
BUILTIN_MACHINES = {"ebs": _ebs, "small": _small}


def _format_validation(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid machine description ({err.error_count()} error(s))"]
    for e in err.errors()[:20]:
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of the description schema)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


@cache
def _builtin(name: str) -> MachineDescription:
    return BUILTIN_MACHINES[name]()


def load_description(source: str | Path, *, check_lattice: bool = True) -> MachineDescription:
    """Load a machine description: a built-in machine name (``"ebs"``, ``"small"``) or a YAML file.

    Raises:
        DescriptionError: unknown machine, unreadable file, a wrong or missing key, or a
            description that does not match its lattice; the message says where and why.
    """
    text = str(source)
    if text in BUILTIN_MACHINES:
        return _builtin(text)
    path = Path(text)
    if not path.exists():
        raise DescriptionError(
            f"unknown machine {text!r}: neither a built-in machine "
            f"({', '.join(sorted(BUILTIN_MACHINES))}) nor an existing file"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DescriptionError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DescriptionError(f"{path}: a description is a mapping, got {type(data).__name__}")
    try:
        desc = MachineDescription.model_validate(data)
    except ValidationError as exc:
        raise DescriptionError(_format_validation(exc, str(path))) from None
    if desc.lattice.file is not None and not Path(desc.lattice.file).is_absolute():
        absolute = (path.parent / desc.lattice.file).resolve()
        desc = desc.model_copy(
            update={"lattice": desc.lattice.model_copy(update={"file": str(absolute)})}
        )
    if check_lattice:
        try:
            build_lattice(desc)
        except ValueError as exc:
            raise DescriptionError(f"{path}: {exc}") from exc
    return desc


def build_lattice(description: MachineDescription) -> at.Lattice:
    """A fresh pyAT lattice for ``description``, checked against it and ready to be driven."""
    return prepare_lattice(load_lattice(description.lattice), description)


def dump_description(description: MachineDescription, path: str | Path) -> None:
    """Write ``description`` as YAML (it loads back equal)."""
    data = description.model_dump(mode="json", exclude_defaults=False)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False, width=100))
