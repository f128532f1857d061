"""run_metadata: the standard start-document metadata (its trip through Tiled: test_data_read)."""

from __future__ import annotations

import getpass
import json

import numpy as np
import pytest

import accplans
from accplans.config import MachineDescription, load_description
from accplans.data import STANDARD_METADATA_KEYS, run_metadata


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


class _Device:
    def __repr__(self) -> str:
        return "Bpms(name='bpms')"


def test_standard_keys_describe_machine_plan_and_provenance(small):
    md = run_metadata(
        small,
        plan_name="measure_orm",
        plan_args={"bpms": _Device(), "kick": np.float64(2e-5), "select": np.array([0, 2])},
        twin_seed=7,
        units={"orm_matrix": "m/rad"},
    )
    assert set(STANDARD_METADATA_KEYS) <= set(md)
    assert md["plan_name"] == "measure_orm"
    assert md["plan_args"] == {"bpms": "Bpms(name='bpms')", "kick": 2e-5, "select": [0, 2]}
    assert md["machine"] == {
        "name": small.machine.name,
        "id": small.machine.id,
        "prefix": small.machine.prefix,
    }
    assert md["sections"] == [s.name for s in small.sections]
    assert md["config_hash"] == small.config_hash
    assert md["lattice"] == small.lattice.model_dump(mode="json")
    assert md["twin_seed"] == 7
    assert md["operator"] == getpass.getuser()
    assert md["accplans_version"] == accplans.__version__
    assert md["units"] == {"orm_matrix": "m/rad"}
    json.dumps(md)  # plain JSON, as a start document needs


def test_machine_operator_section_and_extra(small):
    section = small.sections[0].name
    md = run_metadata(
        small, plan_name="p", plan_args={}, operator="alice", sections=section, note="after MD"
    )
    assert md["twin_seed"] == "machine"
    assert md["operator"] == "alice"
    assert md["sections"] == [section]
    assert md["note"] == "after MD"
    assert run_metadata(small, plan_name="p", plan_args={"x": float("nan")})["plan_args"] == {
        "x": "nan"
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sections": "booster"}, r"has no section\(s\) \['booster'\]"),
        ({"config_hash": "x"}, r"may not replace standard key\(s\) \['config_hash'\]"),
        ({"twin_seed": 1.5}, "twin_seed must be an int"),
        ({"units": {"x": 1}}, "units must map field names to unit strings"),
        ({"plan_name": ""}, "plan_name must be a non-empty string"),
    ],
)
def test_bad_metadata_is_refused(small, kwargs, message):
    args = {"plan_name": "p", "plan_args": {}} | kwargs
    with pytest.raises(ValueError, match=message):
        run_metadata(small, **args)
