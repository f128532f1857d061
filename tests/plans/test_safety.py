"""restore_on_exit's policies on a tiny stepping plan, on the twin.

DESIGN.md: a measurement plan restores everything however it ends; a correction plan keeps its
result when it succeeds, keeps its last completed step when the user stops it (``RE.stop()``),
and restores the starting state when it fails or is aborted.
"""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.utils import MsgGenerator, RunEngineInterrupted

from accplans.data import BackgroundTiledWriter
from accplans.devices import Machine
from accplans.plans import restore_on_exit, set_family_hardware, take_snapshot
from tests.plans.faults import InjectedFault, fail_after_sets, pause_after_sets
from tests.plans.helpers import hardware_setpoints, primary_events, written_run

#: hcorr members the steps move, and the current (A) each step adds to them
MOVED = [1, 6, 13]
STEP_A = 0.2
STEPS = 4


def _steps(start: np.ndarray) -> list[np.ndarray]:
    out = []
    for k in range(1, STEPS + 1):
        values = start.copy()
        values[MOVED] += k * STEP_A
        out.append(values)
    return out


def stepping_plan(machine: Machine, steps: list[np.ndarray], policy: Any) -> MsgGenerator[str]:
    """Set hcorr to each of ``steps`` in turn (checkpoint -> set -> read), under ``policy``."""
    family = machine.hcorr
    snapshot = yield from take_snapshot(machine.description, [family])

    @bpp.run_decorator(md={"plan_name": "stepping_plan", "policy": policy})
    def inner() -> MsgGenerator[None]:
        for values in steps:
            yield from bps.checkpoint()
            yield from set_family_hardware(family, values)
            yield from bps.trigger_and_read([family])

    return (yield from restore_on_exit(inner(), [family], snapshot, policy=policy))


def _end(run_engine: RunEngine, plan: MsgGenerator[str], ending: str) -> None:
    """Run ``plan`` and end it as ``ending`` says, during or right after its second step."""
    if ending == "success":
        run_engine(plan)
    elif ending == "failure":  # fails right after the second set
        with pytest.raises(InjectedFault):
            run_engine(fail_after_sets(plan, 2))
    else:  # paused at the end of the second step (deferred pause), then stopped or aborted
        with pytest.raises(RunEngineInterrupted):
            run_engine(pause_after_sets(plan, 2, defer=True))
        assert run_engine.state == "paused"
        if ending == "stop":
            run_engine.stop()
        else:
            run_engine.abort(reason="test")


#: (policy, ending) -> which setpoints the plan leaves: "start", "last" or "second" step
EXPECTED = {
    ("correction", "success"): "last",
    ("correction", "stop"): "second",
    ("correction", "failure"): "start",
    ("correction", "abort"): "start",
    ("measurement", "success"): "start",
    ("measurement", "stop"): "start",
    ("measurement", "failure"): "start",
    ("measurement", "abort"): "start",
}


@pytest.mark.parametrize(("policy", "ending"), list(EXPECTED), ids="-".join)
def test_restore_policy(
    policy: str,
    ending: str,
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
) -> None:
    uids: list[str] = []
    run_engine.subscribe(lambda name, doc: uids.append(doc["uid"]), "start")
    start = hardware_setpoints([machine.hcorr])["hcorr"]
    steps = _steps(start)
    _end(run_engine, stepping_plan(machine, steps, policy), ending)
    left = hardware_setpoints([machine.hcorr])["hcorr"]
    expected = {"start": start, "last": steps[-1], "second": steps[1]}[EXPECTED[policy, ending]]
    np.testing.assert_array_equal(left, expected)
    (uid,) = uids
    run = written_run(client, writer, uid)
    events = primary_events(run)
    assert events == {"success": STEPS, "stop": 2, "failure": 1, "abort": 2}[ending]
    exit_status = {"success": "success", "stop": "success", "failure": "fail", "abort": "abort"}
    assert run.metadata["stop"]["exit_status"] == exit_status[ending]
    # the events recorded the steps' readbacks (A)
    readbacks = np.asarray(run["primary"].read()["hcorr-readback"])
    np.testing.assert_allclose(readbacks[-1], steps[events - 1], atol=1e-4)
