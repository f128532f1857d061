"""Every plan that changes the machine, under every fault: setpoints back, data kept, reasons.

The plans come from the registry of tests/plans/faults.py (a new plan joins with one entry).
For an exception, an abort and a lost beam, every corrector, the RF frequency, the
quadrupoles, the sextupoles and the skew windings must be back at their starting setpoints
exactly, the run must be in Tiled with the events taken before the fault and a stop document
saying why it ended, and nothing is journaled. When the twin dies mid-plan, the restore cannot
reach it: a pending restore is journaled, and once a new twin serves the same ports,
``restore_setpoints`` applies it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioca
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import FailedStatus, MsgGenerator, RunEngineInterrupted
from epicscorelibs.ca import cadef

from accplans.config import load_description
from accplans.data import BackgroundTiledWriter
from accplans.devices import Machine, SettableFamily, call_async
from accplans.plans import BeamLost, PendingRestore, PendingRestoreError, restore_setpoints
from accplans.sim import TwinPorts, TwinProcess, run_twin
from tests.plans.faults import (
    MACHINE_PLANS,
    AfterEvents,
    InjectedFault,
    MachinePlan,
    fail_after_sets,
    fault_setpoints,
    pause_after_sets,
    twin_setpoints,
)
from tests.plans.helpers import (
    assert_same_setpoints,
    connect_to,
    drop_ca_channels,
    hardware_setpoints,
    primary_events,
    renamed_description,
    run_plan,
    written_run,
)


def _cases() -> Iterator[Any]:
    for entry in MACHINE_PLANS.values():
        for n in entry.fault_after_sets:
            for fault in ("exception", "abort"):
                yield pytest.param(entry, fault, n, id=f"{entry.name}-{fault}-after-set-{n}")
        if entry.reads_orbit:
            n = entry.fault_after_events
            yield pytest.param(entry, "beam_lost", n, id=f"{entry.name}-beam_lost-after-event-{n}")


def _run(
    run_engine: RunEngine,
    plan: MsgGenerator[Any],
    fault: str,
    n: int,
    machine: Machine,
    twin: TwinProcess,
    seen: dict[str, dict[str, np.ndarray]],
) -> tuple[str, str, AfterEvents]:
    """Run an entry's plan under ``fault``; return (expected exit status, reason, recorder).

    ``seen["at_fault"]`` receives the setpoints the twin served when the fault struck.
    """

    def observe() -> None:
        seen["at_fault"] = twin_setpoints(twin, machine.description)

    def kill_beam() -> None:
        observe()
        twin.control.kill_beam()

    recorder = AfterEvents(n if fault == "beam_lost" else 0, kill_beam)
    run_engine.subscribe(recorder)
    if fault == "exception":
        with pytest.raises(InjectedFault, match=f"after set {n}"):
            run_engine(fail_after_sets(plan, n, observe))
        return "fail", f"injected fault after set {n}", recorder
    if fault == "abort":
        with pytest.raises(RunEngineInterrupted):
            run_engine(pause_after_sets(plan, n, observe))
        assert run_engine.state == "paused"
        result = run_engine.abort(reason="operator abort (injected)")
        assert result.exit_status == "abort"
        # bluesky 1.15 drops RE.abort's reason from runs that bluesky's run_wrapper closes
        # (bluesky/bundlers.py close_run; blueapi#1306): exit_status "abort" says why
        return "abort", "", recorder
    with pytest.raises(BeamLost, match="beam lost"):
        run_engine(plan)
    assert recorder.fired
    assert not twin.control.beam
    return "fail", "beam lost", recorder


@pytest.mark.parametrize(("entry", "fault", "n"), list(_cases()))
def test_a_fault_mid_plan_restores_every_setpoint_and_keeps_the_data(
    entry: MachinePlan,
    fault: str,
    n: int,
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    journal: Path,
) -> None:
    plan, _ = entry.build(machine)  # may set the machine up: read the start after it
    before = fault_setpoints(machine)
    seen: dict[str, dict[str, np.ndarray]] = {}
    status, reason, recorder = _run(run_engine, plan, fault, n, machine, fresh_small_twin, seen)
    # the plan had moved something when the fault struck, and all of it is back
    at_fault = seen["at_fault"]
    assert any(np.any(at_fault[k] != before[k]) for k in before), "nothing moved before the fault"
    assert_same_setpoints(fault_setpoints(machine), before)
    assert_same_setpoints(twin_setpoints(fresh_small_twin, machine.description), before)
    (uid,) = recorder.start_uids
    run = written_run(client, writer, uid)
    stop = run.metadata["stop"]
    events = primary_events(run)
    print(f"\n{entry.name} / {fault}: {events} events, stop {stop['exit_status']!r}")
    assert stop["exit_status"] == status
    assert reason in stop["reason"]
    assert events == (n if fault == "beam_lost" else n - 1)
    assert not journal.exists() or not any(journal.iterdir())


def _families(machine: Machine, names: Any) -> list[SettableFamily]:
    by_name: dict[str, SettableFamily] = {
        "hcorr": machine.hcorr,
        "vcorr": machine.vcorr,
        "quadrupoles": machine.quadrupoles,
        "sextupoles": machine.sextupoles,
    }
    if machine.skew is not None:
        by_name["skew"] = machine.skew
    if machine.rf is not None:
        by_name[machine.rf.name] = machine.rf
    return [by_name[n] for n in names]


def _set_hardware(families: list[SettableFamily], values: dict[str, np.ndarray]) -> Any:
    for family in families:
        yield from call_async(family.set_hardware, values[family.name])


@pytest.mark.parametrize("entry", list(MACHINE_PLANS.values()), ids=lambda e: e.name)
def test_a_twin_killed_mid_plan_leaves_a_pending_restore_that_applies_later(
    entry: MachinePlan,
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    twin_ports: TwinPorts,
    journal: Path,
    tmp_path: Path,
) -> None:
    """The twin's process is killed after the N-th event: the plan fails, its restore cannot
    reach the machine and journals the starting setpoints; a new twin on the same ports starts
    at design setpoints, and ``restore_setpoints(families, path)`` sets the journaled ones.
    (The twin serves the small ring under its own prefix, not the session twin's.)"""
    recorder: AfterEvents | None = None
    yaml = renamed_description(load_description("small"), "K", tmp_path)
    small = load_description(yaml)
    with run_twin(yaml, errors=False, noise=False, ports=twin_ports) as twin:
        machine = connect_to(twin, small)
        # start away from the design setpoints, so that the new twin's differ from them
        moved = _families(machine, ["hcorr", "vcorr", "RF", "quadrupoles", "sextupoles", "skew"])
        start = fault_setpoints(machine)
        rng = np.random.default_rng(7)
        start["hcorr"] = np.round(rng.uniform(-1, 1, start["hcorr"].size), 3)
        start["vcorr"] = np.round(rng.uniform(-1, 1, start["vcorr"].size), 3)
        start["skew"] = np.round(rng.uniform(-1, 1, start["skew"].size), 3)
        start["RF"] = start["RF"] + 50.0
        for magnets in ("quadrupoles", "sextupoles"):  # 0.1 % off design, within limits
            start[magnets] = start[magnets] * (1 + 1e-3 * rng.uniform(-1, 1, start[magnets].size))
        run_engine(_set_hardware(moved, start))
        assert_same_setpoints(fault_setpoints(machine), start)
        plan, families = entry.build(machine)  # may set the machine up: read the start after it
        before = fault_setpoints(machine)

        def kill() -> None:
            twin.process.kill()
            twin.process.wait(10)

        recorder = AfterEvents(entry.fault_after_events, kill)
        run_engine.subscribe(recorder)
        t0 = time.perf_counter()
        with pytest.raises(PendingRestoreError) as failure:
            run_engine(plan)
        elapsed = time.perf_counter() - t0
        assert recorder.fired and twin.process.poll() is not None
    # the error says where the pending restore is, and comes from the plan's own error
    (path,) = journal.glob("*.json")
    print(f"\n{entry.name}: failed after {elapsed:.1f} s: {failure.value!r}")
    assert failure.value.pending.path == path
    assert str(path) in str(failure.value)
    # the dead twin's PVs: a timeout, or CA's "virtual circuit disconnect" when the put was
    # under way as the twin died (aioca's CANothing, or epicscorelibs' Disconnected when the
    # channel dropped between two calls); a put through bluesky's ``mv`` (the pinger's kicks,
    # the TbT buffers' length) wraps it in a FailedStatus
    dead = (TimeoutError, aioca.CANothing, cadef.Disconnected)
    cause = failure.value.__cause__
    if isinstance(cause, FailedStatus):
        cause = cause.__cause__
    assert isinstance(cause, dead), repr(failure.value.__cause__)
    pending = PendingRestore.load(path)
    assert pending.snapshot.machine_id == small.machine.id
    assert set(pending.snapshot.setpoints) == {f.name for f in families}
    for name, values in pending.snapshot.setpoints.items():
        np.testing.assert_array_equal(list(values.values()), before[name])
    (uid,) = recorder.start_uids
    run = written_run(client, writer, uid)
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert primary_events(run) == entry.fault_after_events

    drop_ca_channels()  # the dead twin's channels (see its docstring)
    with run_twin(yaml, errors=False, noise=False, ports=twin_ports) as twin:
        machine = connect_to(twin, small)
        restored = _families(machine, pending.snapshot.setpoints)
        fresh = hardware_setpoints(restored)
        assert all(np.any(fresh[f.name] != before[f.name]) for f in restored)
        result = run_plan(run_engine, restore_setpoints(restored, path))
        assert result.exit_status == "success"
        assert_same_setpoints(
            hardware_setpoints(restored), {f.name: before[f.name] for f in restored}
        )
        drop_ca_channels()
    assert not path.exists() and (path.parent / "applied" / path.name).exists()
