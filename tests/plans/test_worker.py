"""``compute``: long computations run in a worker process while the RunEngine stays live."""

import math
import os
import time

import pytest
from bluesky import RunEngine

from accplans.config import load_description
from accplans.model import OnlineModel
from accplans.plans import compute, shutdown_workers
from accplans.plans.orm import momentum_compaction

# the worker imports what it runs by name: only library functions here (a test module is not
# importable from the worker process)


@pytest.fixture(scope="module")
def engine():
    engine = RunEngine({}, call_returns_result=True)
    yield engine
    shutdown_workers()


def test_compute_runs_in_a_worker_process_and_returns_its_result(engine):
    description = load_description("small")

    def plan():
        pid = yield from compute(os.getpid)
        alpha_c = yield from compute(momentum_compaction, description)
        return pid, alpha_c

    pid, alpha_c = engine(plan()).plan_result
    assert pid != os.getpid()
    assert alpha_c == pytest.approx(OnlineModel(description).alpha_c, rel=1e-12)


def test_the_run_engine_loop_stays_live_while_the_worker_computes(engine):
    fired: list[float] = []

    def plan():
        start = time.monotonic()
        engine.loop.call_soon_threadsafe(
            engine.loop.call_later, 0.05, lambda: fired.append(time.monotonic() - start)
        )
        yield from compute(time.sleep, 1.0)  # stands for a long, GIL-holding pyAT call
        return time.monotonic() - start

    elapsed = engine(plan()).plan_result
    assert elapsed >= 1.0
    # the loop ran its 50 ms timer during the computation (in-process it would wait 1 s)
    assert len(fired) == 1 and fired[0] < 0.9


def test_compute_raises_the_workers_error_in_the_plan(engine):
    def plan():
        yield from compute(math.sqrt, -1.0)

    with pytest.raises(ValueError, match="math domain error"):
        engine(plan())
