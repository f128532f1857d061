"""save_setpoints and restore_setpoints from a snapshot in Tiled, on the twin."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import bluesky.preprocessors as bpp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, load_result, record_result, setpoint_diff
from accplans.devices import Machine, call_async
from accplans.plans import Snapshot, restore_setpoints, save_setpoints
from accplans.sim import TwinProcess
from tests.plans.faults import InjectedFault, fail_after_sets
from tests.plans.helpers import (
    assert_same_setpoints,
    hardware_setpoints,
    machine_setpoints,
    primary_events,
    run_plan,
    written_run,
)


def _move(machine: Machine, shift: dict[str, np.ndarray]) -> MsgGenerator[None]:
    for fam in (machine.hcorr, machine.vcorr, machine.quadrupoles):
        now = yield from call_async(fam.hardware_setpoints)
        yield from call_async(fam.set_hardware, np.asarray(now) + shift[fam.name])


def _shift(machine: Machine, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hcorr": np.round(rng.uniform(-0.5, 0.5, len(machine.hcorr.names)), 4),
        "vcorr": np.round(rng.uniform(-0.5, 0.5, len(machine.vcorr.names)), 4),
        "quadrupoles": np.round(rng.uniform(-0.2, 0.2, len(machine.quadrupoles.names)), 4),
    }


def test_the_whole_machine_is_saved_and_comes_back_in_steps(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    journal: Path,
) -> None:
    """Every setpoint of every magnet family and the RF is recorded in hardware units; after
    moving correctors and quadrupoles, a 3-step restore from the run's uid sets each one back
    exactly, records the diff it applied and one event per family and step."""
    families = [machine.hcorr, machine.vcorr, machine.quadrupoles, machine.sextupoles]
    assert machine.rf is not None and machine.skew is not None
    families += [machine.skew, machine.rf]
    saved = hardware_setpoints(families)
    result = run_plan(run_engine, save_setpoints(cast(Any, machine), comment="golden"))
    (uid,) = result.run_start_uids
    writer.flush(timeout=60)
    snap = load_result(client, uid, "snapshot")
    assert snap["machine_id"] == machine.description.machine.id
    assert snap["config_hash"] == machine.description.config_hash
    assert snap["comment"] == "golden"
    assert snap.metadata["start"]["comment"] == "golden"
    assert snap["operator"] == snap.metadata["start"]["operator"]
    assert set(snap["family_names"]) == {f.name for f in families}
    for fam in families:
        rows = [i for i, f in enumerate(snap["family_names"]) if f == fam.name]
        assert [snap["device_names"][i] for i in rows] == list(fam.names)
        np.testing.assert_array_equal(snap["setpoints"][rows], saved[fam.name])
        unit = "Hz" if fam is machine.rf else "A"
        assert {snap["units"][i] for i in rows} == {unit}

    shift = _shift(machine, 5)
    run_engine(_move(machine, shift))
    moved = hardware_setpoints(families)
    assert any(np.any(moved[k] != saved[k]) for k in saved)

    steps = 3
    result = run_plan(run_engine, restore_setpoints(families, uid, steps=steps, client=client))
    assert result.exit_status == "success"
    assert_same_setpoints(hardware_setpoints(families), saved)
    run = written_run(client, writer, result.run_start_uids[0])
    assert run.metadata["start"]["snapshot_uid"] == uid
    assert primary_events(run) == steps * len(families)
    events = run["primary"].read()
    # the first step of hcorr: one third of the way from where it was to the snapshot
    first = np.asarray(events["hcorr-setpoint"])[0]
    np.testing.assert_allclose(first, moved["hcorr"] + (saved["hcorr"] - moved["hcorr"]) / steps)
    np.testing.assert_array_equal(np.asarray(events["restore-step"]), np.repeat([1, 2, 3], 6))
    diff = load_result(client, result.run_start_uids[0], "setpoint_diff")
    expected = setpoint_diff(
        {
            k: dict(zip(f.names, moved[k], strict=True))
            for k, f in zip(moved, families, strict=True)
        },
        {
            k: dict(zip(f.names, saved[k], strict=True))
            for k, f in zip(saved, families, strict=True)
        },
    )
    assert list(diff["device_names"]) == [r.device for r in expected]
    np.testing.assert_array_equal(diff["delta"], [r.delta for r in expected])
    nonzero = {str(n) for n, d in zip(diff["device_names"], diff["delta"], strict=True) if d != 0}
    assert nonzero == {
        n for k in shift for n, s in zip(machine.families[k].names, shift[k], strict=True) if s != 0
    }


def test_a_restore_that_fails_mid_way_returns_to_where_it_started(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    journal: Path,
) -> None:
    """Saved, moved, then a restore in two steps fails after its third set: every family is
    back at the moved (pre-restore) setpoints, not at the snapshot."""
    families = [machine.hcorr, machine.vcorr, machine.quadrupoles]
    (uid,) = run_plan(run_engine, save_setpoints(*families)).run_start_uids
    writer.flush(timeout=60)
    run_engine(_move(machine, _shift(machine, 8)))
    moved = hardware_setpoints(families)
    seen: dict[str, Any] = {}

    def observe() -> None:  # in the RunEngine's thread: through the twin's own client
        seen.update(served(fresh_small_twin, machine.description, [f.name for f in families]))

    plan = restore_setpoints(families, uid, steps=2, client=client)
    with pytest.raises(InjectedFault):
        run_engine(fail_after_sets(plan, 3, observe))
    assert any(np.any(seen[k] != moved[k]) for k in moved)
    assert_same_setpoints(hardware_setpoints(families), moved)


def served(twin: TwinProcess, description: MachineDescription, families: list[str]) -> dict:
    """Setpoints (A) of magnet families as the twin serves them (callable from any thread)."""
    return {
        f: np.asarray(twin.control.get(description.families[f].pvs["setpoint"]), float)
        for f in families
    }


def _fake_snapshot(machine: Machine, **changes: str) -> MsgGenerator[str]:
    """A run holding a snapshot of the correctors as another machine or description took it."""
    names = list(machine.hcorr.names)
    values = {
        "setpoints": np.ones(len(names)),
        "device_names": names,
        "family_names": ["hcorr"] * len(names),
        "units": ["A"] * len(names),
        "machine_id": machine.description.machine.id,
        "config_hash": machine.description.config_hash,
        "operator": "test",
        "comment": "",
        "taken": 0.0,
    }
    values.update(changes)

    @bpp.run_decorator(md={"plan_name": "save_setpoints"})
    def plan() -> MsgGenerator[None]:
        yield from record_result("snapshot", **values)

    return cast(str, (yield from plan()))  # run_decorator returns the run's uid


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"machine_id": "ebs-twin"}, "snapshot is from machine 'ebs-twin'"),
        ({"config_hash": "0123456789abcdef"}, "taken with description 0123456789abcdef"),
    ],
)
def test_a_snapshot_of_another_machine_or_description_is_refused_before_any_move(
    changes: dict[str, str],
    message: str,
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    journal: Path,
) -> None:
    (uid,) = run_plan(run_engine, _fake_snapshot(machine, **changes)).run_start_uids
    writer.flush(timeout=60)
    before = machine_setpoints(machine)
    with pytest.raises(ValueError, match=message):
        run_engine(restore_setpoints([machine.hcorr], uid, client=client))
    assert_same_setpoints(machine_setpoints(machine), before)


def test_out_of_limit_targets_and_bad_steps_are_refused_before_any_move(
    run_engine: RunEngine, machine: Machine, journal: Path
) -> None:
    description = machine.description
    names = list(machine.hcorr.names)
    values = dict.fromkeys(names, 0.0)
    values[names[3]] = 99.0  # the limits are +-5 A
    snap = Snapshot(description.machine.id, description.config_hash, {"hcorr": values})
    before = machine_setpoints(machine)
    with pytest.raises(ValueError, match=f"{names[3]}: 99 A is outside its limits"):
        run_engine(restore_setpoints([machine.hcorr], snap))
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        run_engine(restore_setpoints([machine.hcorr], snap, steps=0))
    with pytest.raises(ValueError, match="holds none of"):
        run_engine(restore_setpoints([machine.vcorr], snap))
    assert_same_setpoints(machine_setpoints(machine), before)
