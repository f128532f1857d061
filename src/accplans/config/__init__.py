"""Machine descriptions: pydantic models, YAML loading and validation, ``from_lattice``.

A description is the only thing a facility writes to run accplans on its machine.
"""

from ._calibration import (
    Calibration,
    CrosstalkSpec,
    HysteresisSpec,
    LinearCalibration,
    PolynomialCalibration,
    TableCalibration,
    magnetic_rigidity,
)
from ._from_lattice import Selector, from_lattice, select_elements
from ._lattice import BUILTIN_LATTICES, LatticeError, load_lattice, parse_field, prepare_lattice
from ._load import (
    BUILTIN_MACHINES,
    DescriptionError,
    build_lattice,
    dump_description,
    load_description,
)
from ._models import (
    TWIN_PREFIX,
    DeviceKind,
    DeviceSpec,
    FamilySpec,
    KnobSpec,
    LatticeSource,
    MachineDescription,
    MachineInfo,
    SectionSpec,
)
from ._pvs import (
    EMITTANCE_PVS,
    FEEDBACK_PVS,
    PINGER_PVS,
    TBT_PVS,
    device_pvs,
    emittance_pvs,
    family_pvs,
    feedback_pvs,
    machine_pvs,
    pinger_pvs,
    tbt_pvs,
)

__all__ = [
    "FEEDBACK_PVS",
    "BUILTIN_LATTICES",
    "BUILTIN_MACHINES",
    "TWIN_PREFIX",
    "Calibration",
    "CrosstalkSpec",
    "DescriptionError",
    "DeviceKind",
    "DeviceSpec",
    "FamilySpec",
    "HysteresisSpec",
    "KnobSpec",
    "LatticeError",
    "LatticeSource",
    "LinearCalibration",
    "MachineDescription",
    "MachineInfo",
    "PolynomialCalibration",
    "SectionSpec",
    "TableCalibration",
    "Selector",
    "build_lattice",
    "device_pvs",
    "feedback_pvs",
    "dump_description",
    "family_pvs",
    "from_lattice",
    "load_description",
    "load_lattice",
    "machine_pvs",
    "PINGER_PVS",
    "TBT_PVS",
    "EMITTANCE_PVS",
    "emittance_pvs",
    "pinger_pvs",
    "tbt_pvs",
    "magnetic_rigidity",
    "parse_field",
    "prepare_lattice",
    "select_elements",
]
