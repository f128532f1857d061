"""Bad inputs to the plans: a clear error naming what is wrong, no run opened, nothing moved.

Covered elsewhere, not repeated here: a twin that is not running (tests/devices/test_machine.py
``test_connect_to_nothing_names_the_identity_pv``: ``MachineConnectionError`` naming the
identity PV), a control system serving another ``MACHINE:ID`` (tests/devices/test_on_twin.py
``test_a_wrong_identity_is_refused``), an unknown machine and a YAML file with a wrong key
(tests/config/test_description.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import MsgGenerator

from accplans.devices import Machine
from accplans.plans import Snapshot, measure_orbit, measure_orm, restore_setpoints
from tests.plans.helpers import assert_same_setpoints, machine_setpoints


def _orm(machine: Machine, **kwargs: Any) -> MsgGenerator[str]:
    return measure_orm(machine.bpms, [machine.hcorr, machine.vcorr], **kwargs)


def _snapshot(machine: Machine, **changes: Any) -> Snapshot:
    """A snapshot of hcorr at +0.1 A from the present setpoints, with ``changes`` applied."""
    hcorr = machine_setpoints(machine)["hcorr"] + 0.1
    setpoints = {"hcorr": dict(zip(machine.hcorr.names, hcorr.tolist(), strict=True))}
    snap = Snapshot(machine.description.machine.id, machine.description.config_hash, setpoints)
    for key, value in changes.items():
        setattr(snap, key, value)
    return snap


def _beyond_limits(machine: Machine) -> Snapshot:
    snap = _snapshot(machine)
    snap.setpoints["hcorr"]["HCM007"] = 12.0  # A; limits +-5 A
    return snap


CASES: dict[str, tuple[Callable[[Machine], MsgGenerator[Any]], type[Exception], str]] = {
    "unknown corrector": (
        lambda m: _orm(m, select=["HCM001", "HCM099"]),
        KeyError,
        r"correctors: no member named 'HCM099'",
    ),
    "kick beyond the limits": (
        lambda m: _orm(m, kick=1e-2),
        ValueError,
        r"refused before any move: HCM001: 100 A is outside its limits \[-5, 5\] A",
    ),
    "NaN kick": (lambda m: _orm(m, kick=float("nan")), ValueError, r"kick must be .* got nan"),
    "negative kick": (lambda m: _orm(m, kick=-1e-5), ValueError, r"kick must be a positive"),
    "BPM mask of the wrong length": (
        lambda m: _orm(m, bpm_select=np.ones(15, bool)),
        ValueError,
        r"bpms: a boolean mask needs 16 entries \(one per member\), got 15",
    ),
    "RF step beyond the RF limits": (
        lambda m: _orm(m, select=["HCM001"], rf=m.rf, rf_step=1e6),
        ValueError,
        r"refused before any move: RF: 5\.00654e\+08 Hz is outside its limits",
    ),
    "BPM noise of the wrong length": (
        lambda m: _orm(m, bpm_noise=np.ones(16) * 1e-6),
        ValueError,
        r"bpm_noise: 16 values for 32 rows",
    ),
    "no sample": (lambda m: measure_orbit(m.bpms, n_samples=0), ValueError, r"n_samples"),
    "snapshot of another machine": (
        lambda m: restore_setpoints([m.hcorr], _snapshot(m, machine_id="ebs-twin")),
        ValueError,
        r"refused: the snapshot is from machine 'ebs-twin', this is 'small-twin'",
    ),
    "snapshot of another description": (
        lambda m: restore_setpoints([m.hcorr], _snapshot(m, config_hash="0123abcd")),
        ValueError,
        r"refused: the snapshot was taken with description 0123abcd",
    ),
    "snapshot beyond the limits": (
        lambda m: restore_setpoints([m.hcorr], _beyond_limits(m)),
        ValueError,
        r"refused before any move: HCM007: 12 A is outside its limits \[-5, 5\] A",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_anything_moves(
    case: str, run_engine: RunEngine, machine: Machine
) -> None:
    build, error, match = CASES[case]
    starts: list[dict[str, Any]] = []
    run_engine.subscribe(lambda name, doc: starts.append(doc), "start")
    before = machine_setpoints(machine)
    with pytest.raises(error, match=match):
        run_engine(build(machine))
    assert starts == [], "a run was opened"
    assert_same_setpoints(machine_setpoints(machine), before)
