"""Build a machine description from any pyAT lattice."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import at
import numpy as np

from ._calibration import LinearCalibration, PolynomialCalibration
from ._models import (
    DeviceKind,
    DeviceSpec,
    FamilySpec,
    KnobSpec,
    LatticeSource,
    MachineDescription,
    MachineInfo,
    SectionSpec,
)
from ._pvs import device_pvs, family_pvs, machine_pvs

__all__ = ["Selector", "from_lattice", "select_elements"]

#: What counts as a BPM, corrector, ...: an element class (``at.Monitor``), a regular
#: expression matched against ``FamName``, a predicate ``(index, element) -> bool``, a sequence
#: of such selectors (any may match), or ``None`` (nothing).
Selector = type | str | Callable[[int, Any], bool] | Sequence[Any] | None


def select_elements(ring: at.Lattice, selector: Selector) -> list[int]:
    """Indices of the elements of ``ring`` that ``selector`` picks, in lattice order."""
    if selector is None:
        return []
    if isinstance(selector, (list, tuple)):
        picked: set[int] = set()
        for s in selector:
            picked.update(select_elements(ring, s))
        return sorted(picked)
    if isinstance(selector, type):
        return [i for i, e in enumerate(ring) if isinstance(e, selector)]
    if isinstance(selector, str):
        pattern = re.compile(selector)
        return [i for i, e in enumerate(ring) if pattern.fullmatch(e.FamName)]
    if callable(selector):
        return [i for i, e in enumerate(ring) if selector(i, e)]
    raise TypeError(f"cannot select elements with {selector!r}")


def _has_kick_angle(_: int, elem: Any) -> bool:
    return hasattr(elem, "KickAngle")


def _is_quadrupole(_: int, elem: Any) -> bool:
    return type(elem) is at.Quadrupole  # exactly: subclasses (combined magnets) are not


def _is_sextupole(_: int, elem: Any) -> bool:
    return type(elem) is at.Sextupole


def _names(tag: str, n: int) -> list[str]:
    width = max(3, len(str(n)))
    return [f"{tag}{k + 1:0{width}d}" for k in range(n)]


def _magnet_calibration(
    design: np.ndarray, nominal_current: float, default_gain: float, saturation: float
) -> tuple[Any, tuple[float, float]]:
    """Calibration with the largest design strength at 80 % of ``nominal_current``."""
    peak = float(np.max(np.abs(design))) if design.size else 0.0
    gain = peak / (0.8 * nominal_current) if peak > 0 else default_gain
    limits = (-nominal_current, nominal_current)
    if saturation > 0:
        # s = g I (1 - a (I/Inom)^2): a relative saturation at the nominal current, monotonic
        # on the limits for a < 1/3
        a = saturation
        coeffs = [0.0, gain, 0.0, -gain * a / nominal_current**2]
        return PolynomialCalibration(coefficients=coeffs, valid_range=limits), limits
    return LinearCalibration(gain=gain), limits


def from_lattice(
    lattice: at.Lattice,
    name: str,
    prefix: str,
    *,
    source: LatticeSource | None = None,
    machine_id: str | None = None,
    section: str = "SR",
    bpms: Selector = at.Monitor,
    hcorrectors: Selector = _has_kick_angle,
    vcorrectors: Selector = _has_kick_angle,
    quadrupoles: Selector = _is_quadrupole,
    sextupoles: Selector = _is_sextupole,
    skew_quadrupoles: Selector = None,
    corrector_gain: float = 1e-4,
    corrector_current: float = 5.0,
    magnet_current: float = 100.0,
    skew_gain: float = 1e-2,
    skew_current: float = 10.0,
    quadrupole_saturation: float = 0.0,
    rf_range_hz: float = 2000.0,
    description: str = "",
) -> MachineDescription:
    """Build a machine description from a pyAT lattice.

    Every element that a selector picks becomes a device (named ``BPM001``, ``HCM001``,
    ``VCM001``, ``Q001``, ``S001``, ``SQ001``... in lattice order), with PVs from the scheme of
    :mod:`accplans.config._pvs`. An element may carry several devices: a sextupole picked as a
    sextupole, both correctors and a skew quadrupole has four. Every RF cavity is driven by one
    ``RF`` device; a ``DCCT`` and a ``TUNE`` monitor are added.

    Args:
        lattice: the ring (cells already repeated).
        name: machine name.
        prefix: PV prefix, ending with ``:``.
        source: where the lattice comes from (defaults to the file pyAT read it from).
        machine_id: identity served at ``MACHINE:ID`` (default ``"<name>-twin"``).
        section: name of the storage-ring section.
        bpms: selector of BPMs (default: ``at.Monitor`` elements).
        hcorrectors: selector of horizontal correctors (default: elements with ``KickAngle``).
        vcorrectors: selector of vertical correctors (default: elements with ``KickAngle``).
        quadrupoles: selector of quadrupoles (default: ``at.Quadrupole`` elements).
        sextupoles: selector of sextupoles (default: ``at.Sextupole`` elements).
        skew_quadrupoles: selector of elements with a skew-quadrupole winding.
        corrector_gain: corrector calibration (rad/A).
        corrector_current: corrector current limit (A).
        magnet_current: quadrupole and sextupole current limit (A); the largest design
            strength of each kind sits at 80 % of it.
        skew_gain: skew winding calibration (m^-2/A).
        skew_current: skew winding current limit (A).
        quadrupole_saturation: relative saturation of quadrupoles at full current (0: linear
            calibration; > 0: cubic polynomial calibration).
        rf_range_hz: RF frequency limits, +- around the lattice's frequency (Hz).
        description: free text.
    """
    if source is None:
        in_file = getattr(lattice, "in_file", None)
        if in_file is None:
            raise ValueError("from_lattice: give 'source' (the lattice was not read from a file)")
        source = LatticeSource(file=str(in_file))
    devices: list[DeviceSpec] = []
    families: dict[str, FamilySpec] = {}
    knobs: dict[str, KnobSpec] = {}

    def add_family(fname: str, kind: str, names: list[str], plane: str | None = None) -> None:
        if names:
            families[fname] = FamilySpec(
                kind=cast(DeviceKind, kind),
                devices=names,
                plane=cast(Any, plane),
                pvs=family_pvs(prefix, kind, fname),
            )

    common: dict[str, Any] = {"section": section}
    # BPMs
    idx = select_elements(lattice, bpms)
    names = _names("BPM", len(idx))
    for n, i in zip(names, idx, strict=True):
        devices.append(
            DeviceSpec(
                name=n,
                kind="bpm",
                elements=[i],
                element_names=[lattice[i].FamName],
                pvs=device_pvs(prefix, "bpm", n),
                unit="mm",
                **common,
            )
        )
    add_family("bpms", "bpm", names)
    # correctors
    for tag, fname, plane, sel, k in (
        ("HCM", "hcorr", "h", hcorrectors, 0),
        ("VCM", "vcorr", "v", vcorrectors, 1),
    ):
        idx = select_elements(lattice, sel)
        names = _names(tag, len(idx))
        for n, i in zip(names, idx, strict=True):
            devices.append(
                DeviceSpec(
                    name=n,
                    kind="corrector",
                    plane=cast(Any, plane),
                    elements=[i],
                    element_names=[lattice[i].FamName],
                    field=f"KickAngle[{k}]",
                    pvs=device_pvs(prefix, "corrector", n),
                    unit="A",
                    calibration=LinearCalibration(gain=corrector_gain),
                    limits=(-corrector_current, corrector_current),
                    tolerance=1e-5,
                    **common,
                )
            )
        add_family(fname, "corrector", names, plane)
    # quadrupoles, sextupoles, skew windings
    for tag, fname, kind, sel, field, order, sat in (
        ("Q", "quadrupoles", "quadrupole", quadrupoles, "PolynomB[1]", 1, quadrupole_saturation),
        ("S", "sextupoles", "sextupole", sextupoles, "PolynomB[2]", 2, 0.0),
    ):
        idx = select_elements(lattice, sel)
        design = np.array([lattice[i].PolynomB[order] for i in idx], dtype=float)
        cal, limits = _magnet_calibration(design, magnet_current, 1e-2, sat)
        names = _names(tag, len(idx))
        for n, i in zip(names, idx, strict=True):
            devices.append(
                DeviceSpec(
                    name=n,
                    kind=cast(DeviceKind, kind),
                    elements=[i],
                    element_names=[lattice[i].FamName],
                    field=field,
                    pvs=device_pvs(prefix, kind, n),
                    unit="A",
                    calibration=cal,
                    limits=limits,
                    tolerance=1e-4,
                    **common,
                )
            )
        add_family(fname, kind, names)
        by_fam: dict[str, list[str]] = {}
        for n, i in zip(names, idx, strict=True):
            by_fam.setdefault(lattice[i].FamName, []).append(n)
        unit = "m^-2" if order == 1 else "m^-3"
        for fam, members in by_fam.items():
            knob = f"{fam}_strength"
            knobs[knob] = KnobSpec(
                description=f"strength of every {fam} {kind}",
                unit=unit,
                coefficients=dict.fromkeys(members, 1.0),
            )
    idx = select_elements(lattice, skew_quadrupoles)
    names = _names("SQ", len(idx))
    for n, i in zip(names, idx, strict=True):
        devices.append(
            DeviceSpec(
                name=n,
                kind="skew_quadrupole",
                elements=[i],
                element_names=[lattice[i].FamName],
                field="PolynomA[1]",
                pvs=device_pvs(prefix, "skew_quadrupole", n),
                unit="A",
                calibration=LinearCalibration(gain=skew_gain),
                limits=(-skew_current, skew_current),
                tolerance=1e-4,
                **common,
            )
        )
    add_family("skew", "skew_quadrupole", names)
    # RF, DCCT, tune monitor
    cavities = select_elements(lattice, at.RFCavity)
    if cavities:
        f0 = float(lattice[cavities[0]].Frequency)
        devices.append(
            DeviceSpec(
                name="RF",
                kind="rf",
                elements=cavities,
                element_names=[lattice[i].FamName for i in cavities],
                field="Frequency",
                pvs=device_pvs(prefix, "rf", "RF"),
                unit="Hz",
                limits=(f0 - rf_range_hz, f0 + rf_range_hz),
                tolerance=1e-3,
                **common,
            )
        )
    devices.append(
        DeviceSpec(
            name="DCCT", kind="dcct", pvs=device_pvs(prefix, "dcct", "DCCT"), unit="mA", **common
        )
    )
    devices.append(
        DeviceSpec(name="TUNE", kind="tune", pvs=device_pvs(prefix, "tune", "TUNE"), **common)
    )
    return MachineDescription(
        machine=MachineInfo(
            name=name, id=machine_id or f"{name}-twin", prefix=prefix, description=description
        ),
        lattice=source,
        sections=[SectionSpec(name=section, kind="storage_ring")],
        devices=devices,
        families=families,
        knobs=knobs,
        pvs=machine_pvs(prefix),
    )
