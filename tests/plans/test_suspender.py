"""Beam-loss suspension on the twin: measure_orm interrupted by a beam loss, resumed after the
refill, gives the ORM of an uninterrupted run, with one event per step.

The beam is killed at two kinds of moments: right after an event (between its ``save`` and the
next step's checkpoint: a suspension there must not replay the saved event) and right after a
set (the step's orbit read then meets the dead frame, and must wait for the suspension rather
than raise ``BeamLost``). Refills come from a thread once the suspension has started.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import Msg
from ophyd_async.core import soft_signal_r_and_setter

from accplans.devices import Machine
from accplans.plans import BeamCurrentSuspender, beam_suspender_installed, measure_orm
from accplans.sim import TwinProcess
from tests.plans.faults import ORM_SELECT, AfterEvents, _after_sets
from tests.plans.helpers import assert_same_setpoints, machine_setpoints, run_plan

THRESHOLD_MA = 1.0
RESUME_MA = 10.0


class Refiller:
    """A suspender ``pre_plan``: records the suspension and has a thread refill the beam."""

    def __init__(self, twin: TwinProcess) -> None:
        self.twin = twin
        self.suspensions = 0
        self.threads: list[threading.Thread] = []

    def __call__(self) -> Generator[Msg, Any, None]:
        self.suspensions += 1
        thread = threading.Thread(target=self.twin.control.refill)
        thread.start()
        self.threads.append(thread)
        yield Msg("null")

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)


class Documents:
    """Every document of the runs, in order."""

    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        self.docs.append((name, doc))

    def primary_events(self) -> list[dict[str, Any]]:
        primary = {d["uid"] for n, d in self.docs if n == "descriptor" and d["name"] == "primary"}
        return [d for n, d in self.docs if n == "event" and d["descriptor"] in primary]

    def orm(self) -> np.ndarray:
        (desc,) = [
            d["uid"] for n, d in self.docs if n == "descriptor" and d["name"] == "result_orm"
        ]
        (event,) = [d for n, d in self.docs if n == "event" and d["descriptor"] == desc]
        data = event["data"]
        (key,) = [k for k in data if k.endswith("matrix")]
        (rf_key,) = [k for k in data if k.endswith("rf_column")]
        return np.column_stack([np.asarray(data[key]), np.asarray(data[rf_key])])

    def stop(self) -> dict[str, Any]:
        (stop,) = [d for n, d in self.docs if n == "stop"]
        return stop


@pytest.fixture
def suspender(
    run_engine: RunEngine, machine: Machine, fresh_small_twin: TwinProcess
) -> Iterator[tuple[BeamCurrentSuspender, Refiller]]:
    assert machine.dcct is not None
    refiller = Refiller(fresh_small_twin)
    s = BeamCurrentSuspender(
        machine.dcct, threshold_ma=THRESHOLD_MA, resume_ma=RESUME_MA, sleep=0.2, pre_plan=refiller
    )
    run_engine.install_suspender(s)
    yield s, refiller
    run_engine.remove_suspender(s)
    refiller.join()
    assert not beam_suspender_installed()


def _orm_plan(machine: Machine) -> Any:
    assert machine.rf is not None
    return measure_orm(
        machine.bpms, [machine.hcorr, machine.vcorr], select=ORM_SELECT, rf=machine.rf, timeout=5
    )


def _run(run_engine: RunEngine, plan: Any) -> Documents:
    docs = Documents()
    token = run_engine.subscribe(docs)
    try:
        run_plan(run_engine, plan)
    finally:
        run_engine.unsubscribe(token)
    return docs


@pytest.mark.twin(seed=1, noise=False)
@pytest.mark.parametrize("when", ["after-event-3", "after-set-5", "after-set-9"])
def test_a_beam_loss_suspends_measure_orm_and_the_result_matches_an_uninterrupted_run(
    when: str,
    run_engine: RunEngine,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    suspender: tuple[BeamCurrentSuspender, Refiller],
) -> None:
    twin = fresh_small_twin
    s, refiller = suspender
    before = machine_setpoints(machine)
    reference = _run(run_engine, _orm_plan(machine))
    assert refiller.suspensions == 0
    assert_same_setpoints(machine_setpoints(machine), before)

    kind, n = when.rsplit("-", 1)
    plan = _orm_plan(machine)
    killed: list[bool] = []

    def kill() -> None:
        twin.control.kill_beam()  # returns once a tick without beam is published
        killed.append(True)

    recorder = AfterEvents(int(n), kill)
    token = run_engine.subscribe(recorder)
    if kind == "after-set":

        def strike(msg: Msg) -> Generator[Msg, Any, Any]:
            kill()
            return (yield msg)

        plan = _after_sets(plan, int(n), strike)
        recorder.n = -1  # never
    try:
        interrupted = _run(run_engine, plan)
    finally:
        run_engine.unsubscribe(token)
    refiller.join()

    assert killed == [True]
    assert refiller.suspensions == 1, "the beam loss did not suspend the plan exactly once"
    assert twin.control.beam and not s.tripped
    assert interrupted.stop()["exit_status"] == "success"
    # one event per step, no duplicate, no half step, every frame with beam
    ref_events, events = reference.primary_events(), interrupted.primary_events()
    assert [e["seq_num"] for e in events] == list(range(1, len(ref_events) + 1))
    for e in events:
        (valid,) = [v for k, v in e["data"].items() if k.endswith("valid")]
        assert np.all(np.asarray(valid) == 1)
    steps = [(e["data"]["step-corrector"], e["data"]["step-kick"]) for e in events]
    assert steps == [(e["data"]["step-corrector"], e["data"]["step-kick"]) for e in ref_events]
    # the same matrix: without noise, the twin's orbit depends on the magnets only
    m_ref, m = reference.orm(), interrupted.orm()
    scale = np.max(np.abs(m_ref), axis=0)
    deviation = np.max(np.abs(m - m_ref), axis=0) / scale
    print(f"\n{when}: max relative ORM deviation per column {deviation}")
    assert np.all(deviation < 1e-6)
    assert_same_setpoints(machine_setpoints(machine), before)


def test_bad_levels_are_refused(machine: Machine) -> None:
    with pytest.raises(ValueError, match="resume_ma"):
        BeamCurrentSuspender(machine.dcct, threshold_ma=10, resume_ma=1)
    with pytest.raises(ValueError, match="sleep"):
        BeamCurrentSuspender(machine.dcct, threshold_ma=1, resume_ma=1, sleep=-1)
    with pytest.raises(TypeError, match="ophyd-async signal"):
        BeamCurrentSuspender(object(), threshold_ma=1, resume_ma=1)


def test_a_trip_right_after_a_save_replays_no_event(run_engine: RunEngine) -> None:
    """The trip lands between an event's ``save`` and the next checkpoint (the callback of the
    event document runs inside ``save``; the plan then works 50 ms before its next step, as
    measure_orm does when it puts a corrector back): the suspension waits for the checkpoint
    the preprocessor adds, so the rewind replays nothing that was saved."""

    async def make() -> Any:
        return soft_signal_r_and_setter(float, initial_value=200.0, name="current")

    current, set_current = call_in_bluesky_event_loop(make())
    s = BeamCurrentSuspender(current, threshold_ma=THRESHOLD_MA, resume_ma=RESUME_MA)
    suspensions: list[int] = []

    def refill_later() -> Generator[Msg, Any, None]:
        suspensions.append(1)
        run_engine.loop.call_soon(set_current, 200.0)  # runs while the RunEngine waits
        yield Msg("null")

    s._user_pre_plan = refill_later
    run_engine.install_suspender(s)
    docs = Documents()

    def on_event(name: str, doc: dict[str, Any]) -> None:
        if name == "event" and doc["seq_num"] == 2 and not suspensions:
            set_current(0.0)  # inside the save of event 2

    @bpp.run_decorator()
    def plan() -> Generator[Msg, Any, None]:
        for _ in range(4):
            yield from bps.checkpoint()
            yield from bps.trigger_and_read([current])
            yield from bps.sleep(0.05)  # work after the event, before the next checkpoint

    try:
        run_engine.subscribe(on_event)
        run_engine.subscribe(docs)
        run_plan(run_engine, plan())
    finally:
        run_engine.remove_suspender(s)
    assert suspensions == [1]
    assert [e["seq_num"] for e in docs.primary_events()] == [1, 2, 3, 4]
