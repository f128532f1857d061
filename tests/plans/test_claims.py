"""Arbitration: a plan claims what it moves from the running orbit feedback, and gives it back.

The feedback service runs in its own process against the test's small twin (noise on, so it
writes every iteration). ``measure_orm`` measured while it runs gives the matrix measured
without it; with nobody to claim from (the control experiment) the feedback fights the kicks
and the matrix is wrong. The service's write log shows no write between the plan's claim and
its release.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from ophyd_async.core import wait_for_value

from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import FeedbackClient, Machine
from accplans.physics import chi2_per_dof, orm_relative_difference
from accplans.plans import current_arbiter, measure_orm, orbit_bump, orbit_feedback, use_arbiter
from accplans.services import FeedbackProcess, run_feedback
from accplans.sim import TwinPorts, TwinProcess
from tests.plans.helpers import (
    assert_same_setpoints,
    drop_ca_channels,
    machine_setpoints,
    run_plan,
    written_run,
)


@pytest.fixture
def feedback(
    machine: Machine,
    fresh_small_twin: TwinProcess,
    service_ports: TwinPorts,
    tmp_path: Path,
) -> Iterator[tuple[FeedbackProcess, FeedbackClient]]:
    """The feedback service at 10 Hz, enabled, and its client (connected in the RunEngine's
    loop) as the process's arbiter."""
    with run_feedback(
        "small",
        address=f"127.0.0.1:{fresh_small_twin.ports.ca}",
        ca_port=service_ports.ca,
        pva_port=service_ports.pva,
        pva_broadcast_port=service_ports.pva_broadcast,
        log_path=tmp_path / "writes.jsonl",
        rate_hz=10.0,
        gain=0.5,
        enable=True,
    ) as process:
        client = FeedbackClient(machine.description, heartbeat_period=0.2)
        call_in_bluesky_event_loop(client.connect(timeout=10))
        call_in_bluesky_event_loop(wait_for_value(client.iteration, lambda n: n >= 3, timeout=30))
        try:
            yield process, client
        finally:
            use_arbiter(None)
            drop_ca_channels()  # before the service stops (its disconnects need a live loop)


def _set(signal: Any, value: Any) -> None:
    """Set a signal from the test's thread, in the RunEngine's loop."""

    async def put() -> None:
        await signal.set(value)

    call_in_bluesky_event_loop(put())


def _orm(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    *,
    restored: bool = True,
    settle: float = 0.0,
) -> np.ndarray:
    """measure_orm on every corrector; check it restored them (unless another writer ran)."""
    before = machine_setpoints(machine)
    plan = measure_orm(machine.bpms, [machine.hcorr, machine.vcorr], settle=settle)
    result = run_plan(run_engine, plan)
    assert result.exit_status == "success"
    if restored:
        assert_same_setpoints(machine_setpoints(machine), before)
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    return np.asarray(load_result(client, uid, "orm").data["matrix"])


def test_measure_orm_under_a_running_feedback(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    feedback: tuple[FeedbackProcess, FeedbackClient],
) -> None:
    process, fb = feedback
    # control experiment: nobody claims, the feedback fights the kicks; the settling time
    # gives its 10 Hz loop a few iterations per step however loaded the machine is (without
    # it, how many fall between a kick and its frame is left to timing)
    assert current_arbiter() is None
    fought = _orm(run_engine, writer, client, machine, restored=False, settle=0.3)

    use_arbiter(fb)
    # (the feedback resumes at once after the release: the setpoints it leaves are its own)
    claimed = _orm(run_engine, writer, client, machine, restored=False)
    claims = [e for e in process.entries() if e["event"] in ("claim", "release")]
    assert [e["event"] for e in claims] == ["claim", "release"]
    assert claims[0]["owner"] == "measure_orm" and claims[1]["claim"] == claims[0]["claim"]
    t0, t1 = claims[0]["t"], claims[1]["t"]
    writes = [e for e in process.entries() if e["event"] == "write"]
    assert [e for e in writes if t0 <= e["t"] <= t1] == [], "the feedback wrote while claimed"
    # it resumes after the release
    call_in_bluesky_event_loop(wait_for_value(fb.state, "RUNNING", timeout=10))

    use_arbiter(None)
    _set(fb.enable, False)
    alone = _orm(run_engine, writer, client, machine)

    # each element is (x(+k) - x(-k)) / 2k from single frames with 1 um BPM noise: the
    # difference of two measurements has sigma = sqrt(2) * sqrt(2) * 1 um / (2 * 40 urad)
    sigma = 2e-6 / (2 * 40e-6)
    same = chi2_per_dof(claimed, alone, sigma)
    spoiled = chi2_per_dof(fought, alone, sigma)
    print(
        f"\nORM claimed vs alone: chi2/dof {same:.2f}, max diff "
        f"{orm_relative_difference(claimed, alone):.1e}; unclaimed: chi2/dof {spoiled:.3g}, "
        f"max diff {orm_relative_difference(fought, alone):.1e}"
    )
    assert same < 1.5, f"the claimed run differs from the run alone beyond noise: {same:.2f}"
    # 10x the acceptance bound: a fight, not noise
    assert spoiled > 10, f"the control shows no fight ({spoiled:.3g}): the test cannot fail"


def test_orbit_feedback_plan_pauses_the_service_and_corrects(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    feedback: tuple[FeedbackProcess, FeedbackClient],
) -> None:
    """``orbit_feedback`` (the study plan) steers a distorted orbit back to zero readings."""
    process, fb = feedback
    _set(fb.enable, False)
    use_arbiter(fb)
    result = run_plan(
        run_engine,
        orbit_feedback(
            machine.bpms,
            machine.hcorr,
            machine.vcorr,
            iterations=8,
            gain=0.6,
            alpha=1e-3,
            reference="zero",
        ),
    )
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    steps = written_run(client, writer, uid)["primary"].read()
    rms_x = np.asarray(steps["step-error_rms_x"])
    rms_y = np.asarray(steps["step-error_rms_y"])
    truth = fresh_small_twin.control.export_truth()
    readings = truth.readings(truth.closed_orbit()).T  # (2, nbpm), noise-free
    print(f"\norbit_feedback rms x {rms_x * 1e6} um, y {rms_y * 1e6} um")
    assert rms_x[-1] < 0.2 * rms_x[0] and rms_y[-1] < 0.2 * rms_y[0]
    # the twin's own (noise-free) BPM readings agree: the orbit is steered, not the noise
    assert np.sqrt(np.mean(readings[0] ** 2)) < 0.25 * rms_x[0]
    assert np.sqrt(np.mean(readings[1] ** 2)) < 0.25 * rms_y[0]
    assert [e["owner"] for e in process.entries() if e["event"] == "claim"] == ["orbit_feedback"]


def test_a_bump_made_under_the_feedback_stays(
    run_engine: RunEngine,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    feedback: tuple[FeedbackProcess, FeedbackClient],
) -> None:
    """``orbit_bump`` claims in ``fold`` mode: the running feedback pauses while the bump is
    made, then adds it to its reference and keeps it (without the fold it would remove it)."""
    process, fb = feedback
    use_arbiter(fb)
    before = _true_y(fresh_small_twin)
    result = run_plan(
        run_engine,
        orbit_bump(
            machine.bpms, machine.hcorr, machine.vcorr, at="BPM005", plane="y", position_m=0.2e-3
        ),
    )
    assert result.exit_status == "success"
    made = _true_y(fresh_small_twin) - before
    start = call_in_bluesky_event_loop(fb.iteration.get_value())
    call_in_bluesky_event_loop(wait_for_value(fb.iteration, lambda n: n >= start + 10, timeout=30))
    kept = _true_y(fresh_small_twin) - before
    i = machine.bpms.names.index("BPM005")
    print(
        f"\nbump at BPM005: {made[i] * 1e6:.1f} um made, {kept[i] * 1e6:.1f} um after 10 iterations"
    )
    assert abs(made[i] - 0.2e-3) < 0.01e-3
    assert abs(kept[i] - made[i]) < 0.02 * made[i]
    modes = [e["mode"] for e in process.entries() if e["event"] == "claim"]
    assert modes == ["fold"]


def _true_y(twin: TwinProcess) -> np.ndarray:
    """The true vertical beam position at the BPMs (m)."""
    return np.asarray(twin.control.get(f"{twin.twin_prefix}BPMS:TRUE_Y"), float) * 1e-3
