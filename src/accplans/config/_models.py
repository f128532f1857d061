"""The machine description: pydantic models, validated as a whole on load.

One description per machine. It names the machine (and the identity its control system serves),
the lattice it is modelled by, its sections, devices (each with PV names, the lattice element(s)
it drives and its calibration), device families (in lattice order), multi-channel magnets and
knobs. PV names follow the scheme of :mod:`accplans.config._pvs`; PVs carry hardware units.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._calibration import (
    ELECTRON_REST_ENERGY_EV,
    Calibration,
    CrosstalkSpec,
    TableCalibration,
    magnetic_rigidity,
)

__all__ = [
    "DeviceKind",
    "DeviceSpec",
    "FamilySpec",
    "KnobSpec",
    "LatticeSource",
    "MachineDescription",
    "MachineInfo",
    "SectionSpec",
    "TWIN_PREFIX",
]

#: Prefix (before the machine prefix) of the twin's truth and control PVs. No description may
#: reference a PV that starts with it: plans never see twin internals.
TWIN_PREFIX = "TWIN:"

DeviceKind = Literal[
    "bpm", "corrector", "quadrupole", "sextupole", "skew_quadrupole", "rf", "dcct", "tune"
]

#: Lattice fields a device may drive. ``KickAngle[0]``/``[1]`` are rad, ``PolynomB[n]`` and
#: ``PolynomA[n]`` are pyAT's normalized multipole strengths (m^-n), ``Frequency`` Hz,
#: ``Voltage`` V.
_FIELD_RE = re.compile(
    r"^(KickAngle\[[01]\]|PolynomB\[[0-9]\]|PolynomA\[[0-9]\]|Frequency|Voltage)$"
)

#: Signals a device of each kind must have PVs for (more are allowed).
REQUIRED_PVS: dict[str, tuple[str, ...]] = {
    "bpm": ("x", "y", "valid"),
    "corrector": ("setpoint", "readback"),
    "quadrupole": ("setpoint", "readback"),
    "sextupole": ("setpoint", "readback"),
    "skew_quadrupole": ("setpoint", "readback"),
    "rf": ("frequency_setpoint", "frequency_readback", "voltage_setpoint", "voltage_readback"),
    "dcct": ("current", "lifetime"),
    "tune": ("x", "y"),
}
#: Array PVs a family of each kind must have.
REQUIRED_FAMILY_PVS: dict[str, tuple[str, ...]] = {
    "bpm": ("x", "y", "valid", "counter", "timestamp"),
    "corrector": ("setpoint", "readback"),
    "quadrupole": ("setpoint", "readback"),
    "sextupole": ("setpoint", "readback"),
    "skew_quadrupole": ("setpoint", "readback"),
}
_MAGNETS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatticeSource(_Strict):
    """Where the lattice comes from: a built-in lattice, or any file pyAT reads."""

    builtin: str | None = Field(default=None, description="name of a lattice shipped with accplans")
    file: str | None = Field(
        default=None, description="path of a lattice file (.mat, .m, .json, ...)"
    )
    repeat: int = Field(
        default=1, ge=1, description="number of times the file's cells are repeated"
    )
    use: str | None = Field(
        default=None, description="variable name in a .mat file holding the ring"
    )

    @model_validator(mode="after")
    def _one_source(self) -> LatticeSource:
        if (self.builtin is None) == (self.file is None):
            raise ValueError("give exactly one of 'builtin' and 'file'")
        return self


class MachineInfo(_Strict):
    """Identity of the machine."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    id: str = Field(description="identity served at <prefix>MACHINE:ID; connect() checks it")
    prefix: str = Field(pattern=r"^[A-Za-z0-9_-]+:$", description="PV prefix, ends with ':'")
    description: str = ""
    energy_ev: float | None = Field(
        default=None,
        gt=0,
        description="beam energy (eV); needed by integrated_field calibrations (Brho)",
    )
    rest_energy_ev: float = Field(
        default=ELECTRON_REST_ENERGY_EV, gt=0, description="particle rest energy (eV)"
    )

    @property
    def brho(self) -> float | None:
        """Magnetic rigidity ``p / e`` (T m) at :attr:`energy_ev`, if the energy is given."""
        if self.energy_ev is None:
            return None
        return magnetic_rigidity(self.energy_ev, self.rest_energy_ev)


class SectionSpec(_Strict):
    """A section of the machine (transfer line, booster, storage ring)."""

    name: str
    kind: Literal["storage_ring", "booster", "transfer_line", "linac"]


class DeviceSpec(_Strict):
    """One device: its PVs (hardware units), the lattice element(s) it drives, its calibration."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    kind: DeviceKind
    section: str
    elements: list[int] = Field(
        default_factory=list,
        description="lattice indices (a power supply may drive several elements in series)",
    )
    element_names: list[str] = Field(
        default_factory=list, description="FamName of each element, checked against the lattice"
    )
    field: str | None = Field(default=None, description="lattice field driven, e.g. 'KickAngle[0]'")
    plane: Literal["h", "v"] | None = None
    pvs: dict[str, str]
    unit: str = Field(default="", description="hardware unit of the main value PVs (A, Hz, mm, mA)")
    calibration: Calibration | None = None
    limits: tuple[float, float] | None = Field(
        default=None, description="hardware limits (low, high)"
    )
    tolerance: float | None = Field(
        None, gt=0, description="readback tolerance (hardware units) for set completion"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DeviceSpec:
        missing = [s for s in REQUIRED_PVS[self.kind] if s not in self.pvs]
        if missing:
            raise ValueError(f"a {self.kind} needs PVs for {missing}")
        if self.element_names and len(self.element_names) != len(self.elements):
            raise ValueError("element_names must have one name per element")
        if self.kind in _MAGNETS:
            if not self.elements or self.field is None or self.calibration is None:
                raise ValueError(f"a {self.kind} needs 'elements', 'field' and 'calibration'")
            if not _FIELD_RE.match(self.field):
                raise ValueError(f"unknown lattice field {self.field!r}")
            if self.limits is None or self.tolerance is None:
                raise ValueError(f"a {self.kind} needs 'limits' and 'tolerance'")
        if self.kind == "corrector" and self.plane is None:
            raise ValueError("a corrector needs 'plane' (h or v)")
        if self.kind == "bpm" and len(self.elements) != 1:
            raise ValueError("a bpm sits at exactly one lattice element")
        if self.limits is not None and not self.limits[0] < self.limits[1]:
            raise ValueError(f"limits must be (low, high), got {self.limits}")
        self._check_calibration()
        return self

    def _check_calibration(self) -> None:
        cal = self.calibration
        if cal is None:
            return
        if cal.quantity == "integrated_field":
            field = self.field or ""
            if field.startswith("Polynom") and cal.magnetic_length is None:
                raise ValueError(
                    f"{self.name}: an integrated_field calibration of {field} needs "
                    "'magnetic_length' (strength = int B dl / (Brho * magnetic_length))"
                )
            if field.startswith("KickAngle") and cal.magnetic_length is not None:
                raise ValueError(
                    f"{self.name}: a kick is int B dl / Brho; 'magnetic_length' is not used"
                )
            if not field.startswith(("Polynom", "KickAngle")):
                raise ValueError(f"{self.name}: integrated_field needs a magnet field")
        if isinstance(cal, TableCalibration) and self.limits is not None:
            lo, hi = cal.hardware_range
            if self.limits[0] < lo or self.limits[1] > hi:
                raise ValueError(
                    f"{self.name}: limits {self.limits} reach beyond its calibration table "
                    f"[{lo:g}, {hi:g}] {self.unit}"
                )
        if cal.hysteresis is not None and self.limits is not None:
            if cal.hysteresis.width >= self.limits[1] - self.limits[0]:
                raise ValueError(
                    f"{self.name}: hysteresis width {cal.hysteresis.width:g} {self.unit} is not "
                    "smaller than its limits' span (standardization could not cycle it)"
                )

    def check_limits(self, hardware: float) -> None:
        """Raise ``ValueError`` naming the device if ``hardware`` is outside its limits."""
        if self.limits is None:
            return
        if not (self.limits[0] <= hardware <= self.limits[1]):  # NaN fails here too
            raise ValueError(
                f"{self.name}: {hardware:.6g} {self.unit} is outside its limits "
                f"[{self.limits[0]:.6g}, {self.limits[1]:.6g}] {self.unit}"
            )


class FamilySpec(_Strict):
    """An ordered family of devices of one kind (lattice order: ORM rows and columns follow it)."""

    kind: DeviceKind
    devices: list[str] = Field(min_length=1)
    plane: Literal["h", "v"] | None = None
    pvs: dict[str, str] = Field(default_factory=dict, description="family array PVs")


class KnobSpec(_Strict):
    """A named linear combination of magnet strengths.

    Setting the knob to ``v`` changes each device's strength by ``coefficients[device] * v``
    (strength units of that device per knob unit).
    """

    description: str = ""
    unit: str = ""
    coefficients: dict[str, float] = Field(min_length=1)


class MachineDescription(_Strict):
    """A whole machine description. Build it with :func:`load_description` or ``from_lattice``."""

    schema_version: Literal[1] = 1
    machine: MachineInfo
    lattice: LatticeSource
    sections: list[SectionSpec] = Field(min_length=1)
    devices: list[DeviceSpec] = Field(min_length=1)
    families: dict[str, FamilySpec]
    crosstalk: list[CrosstalkSpec] = Field(default_factory=list)
    knobs: dict[str, KnobSpec] = Field(default_factory=dict)
    pvs: dict[str, str] = Field(default_factory=dict, description="machine-wide PVs (id)")

    @model_validator(mode="before")
    @classmethod
    def _fill_brho(cls, data: Any) -> Any:
        """Give every integrated_field calibration without ``brho`` the machine's Brho."""
        if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
            return data
        machine = data.get("machine")
        if isinstance(machine, dict):
            try:
                machine = MachineInfo.model_validate(machine)
            except ValueError:
                return data  # reported by the normal validation
        if not isinstance(machine, MachineInfo) or machine.energy_ev is None:
            return data
        try:
            brho = machine.brho
        except ValueError:
            return data
        devices = []
        for dev in data["devices"]:
            if isinstance(dev, dict) and isinstance(dev.get("calibration"), dict):
                cal = dev["calibration"]
                if cal.get("quantity") == "integrated_field" and cal.get("brho") is None:
                    dev = {**dev, "calibration": {**cal, "brho": brho}}
            elif isinstance(dev, DeviceSpec) and dev.calibration is not None:
                cal = dev.calibration
                if cal.quantity == "integrated_field" and cal.brho is None:
                    new_cal = cal.model_copy(update={"brho": brho})
                    dev = dev.model_copy(update={"calibration": new_cal})
            devices.append(dev)
        return {**data, "devices": devices}

    @model_validator(mode="after")
    def _cross_references(self) -> MachineDescription:
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {dupes[:5]}")
        by_name = {d.name: d for d in self.devices}
        sections = {s.name for s in self.sections}
        for d in self.devices:
            if d.section not in sections:
                raise ValueError(f"device {d.name}: unknown section {d.section!r}")
        for fname, fam in self.families.items():
            unknown = [n for n in fam.devices if n not in by_name]
            if unknown:
                raise ValueError(f"family {fname}: unknown devices {unknown[:5]}")
            wrong = [n for n in fam.devices if by_name[n].kind != fam.kind]
            if wrong:
                raise ValueError(
                    f"family {fname} ({fam.kind}): devices of another kind {wrong[:5]}"
                )
            missing = [s for s in REQUIRED_FAMILY_PVS.get(fam.kind, ()) if s not in fam.pvs]
            if missing:
                raise ValueError(f"family {fname}: needs array PVs for {missing}")
        brho = self.machine.brho
        for d in self.devices:
            cal = d.calibration
            if cal is None or cal.quantity != "integrated_field":
                continue
            if brho is None:
                raise ValueError(
                    f"device {d.name}: an integrated_field calibration needs machine.energy_ev "
                    "(Brho converts the field to a normalized strength)"
                )
            if cal.brho is None or abs(cal.brho - brho) > 1e-12 * brho:
                raise ValueError(
                    f"device {d.name}: calibration brho {cal.brho} T m disagrees with "
                    f"machine.energy_ev ({brho:.12g} T m); remove it or fix the energy"
                )
        for i, ct in enumerate(self.crosstalk):
            unknown = [n for n in ct.devices if n not in by_name]
            if unknown:
                raise ValueError(f"crosstalk[{i}]: unknown devices {unknown}")
            elems = {tuple(by_name[n].elements) for n in ct.devices}
            if len(elems) != 1:
                raise ValueError(f"crosstalk[{i}]: devices must drive the same element(s)")
        for kname, knob in self.knobs.items():
            for n in knob.coefficients:
                if n not in by_name or by_name[n].kind not in _MAGNETS:
                    raise ValueError(f"knob {kname}: {n!r} is not a magnet of this machine")
        if "id" not in self.pvs:
            raise ValueError("pvs needs 'id' (the MACHINE:ID PV)")
        pv_owner: dict[str, str] = {}
        all_pvs = [(f"pvs.{k}", v) for k, v in self.pvs.items()]
        all_pvs += [(f"device {d.name}.{k}", v) for d in self.devices for k, v in d.pvs.items()]
        all_pvs += [
            (f"family {f}.{k}", v) for f, fam in self.families.items() for k, v in fam.pvs.items()
        ]
        for where, pv in all_pvs:
            if pv.startswith(TWIN_PREFIX):
                raise ValueError(f"{where}: {pv!r} is a twin truth/control PV; none may be used")
            if len(pv) > 60:
                raise ValueError(f"{where}: PV name {pv!r} is longer than 60 characters")
            if pv in pv_owner:
                raise ValueError(f"{where}: PV {pv!r} is already used by {pv_owner[pv]}")
            pv_owner[pv] = where
        return self

    # -- lookups ---------------------------------------------------------------------------
    @cached_property
    def device_map(self) -> dict[str, DeviceSpec]:
        """Devices by name."""
        return {d.name: d for d in self.devices}

    def device(self, name: str) -> DeviceSpec:
        """The device called ``name``; ``KeyError`` naming the machine if there is none."""
        try:
            return self.device_map[name]
        except KeyError:
            raise KeyError(f"machine {self.machine.name!r} has no device {name!r}") from None

    def family(self, name: str) -> FamilySpec:
        """The family called ``name``; ``KeyError`` listing the families if there is none."""
        try:
            return self.families[name]
        except KeyError:
            raise KeyError(
                f"machine {self.machine.name!r} has no family {name!r}; "
                f"families: {sorted(self.families)}"
            ) from None

    def family_devices(self, name: str) -> list[DeviceSpec]:
        """The devices of family ``name`` in family (lattice) order."""
        return [self.device_map[n] for n in self.family(name).devices]

    def families_of_kind(self, kind: DeviceKind) -> list[str]:
        """Names of the families of one kind."""
        return [n for n, f in self.families.items() if f.kind == kind]

    def single(self, kind: DeviceKind) -> DeviceSpec:
        """The one device of ``kind`` (rf, dcct, tune); error if there is not exactly one."""
        found = [d for d in self.devices if d.kind == kind]
        if len(found) != 1:
            raise KeyError(f"machine {self.machine.name!r} has {len(found)} devices of kind {kind}")
        return found[0]

    def crosstalk_of(self, name: str) -> CrosstalkSpec | None:
        """The multi-channel calibration ``name`` belongs to, if any."""
        for ct in self.crosstalk:
            if name in ct.devices:
                return ct
        return None

    @cached_property
    def config_hash(self) -> str:
        """A short stable hash of the description (goes into every run's metadata)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
