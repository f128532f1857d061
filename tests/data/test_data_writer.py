"""BackgroundTiledWriter: every event arrives, arrays keep shape and values, failures are loud."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from bluesky import RunEngine
from event_model import compose_run
from ophyd_async.core import Array1D, init_devices, soft_signal_rw

from accplans.data import BackgroundTiledWriter, TiledWriteError, open_run


@pytest.fixture
def sigs(RE: RunEngine) -> dict[str, Any]:
    with init_devices():
        current = soft_signal_rw(float, 0.0, units="A")
        orbit = soft_signal_rw(Array1D[np.float64], np.zeros(40), units="m")
        short = soft_signal_rw(Array1D[np.float64], np.zeros(5), units="m")
    return {"current": current, "orbit": orbit, "short": short}


def _frame(i: int) -> tuple[float, np.ndarray, np.ndarray]:
    return 0.1 * i, np.linspace(-1e-3, 1e-3, 40) * (i + 1), np.arange(5.0) + 10 * i


def _steps(sigs: dict[str, Any], n: int, *, fail_after: int | None = None):
    dets = list(sigs.values())
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise RuntimeError(f"beam lost at step {i}")
        current, orbit, short = _frame(i)
        yield from bps.mv(sigs["current"], current, sigs["orbit"], orbit, sigs["short"], short)
        yield from bps.trigger_and_read(dets)


def test_all_events_arrive_with_shapes_and_values(RE, sigs, writer, client):
    n = 25
    (uid,) = RE(bpp.run_wrapper(_steps(sigs, n), md={"purpose": "count"}))
    writer.flush(timeout=60)
    run = open_run(client, uid)
    ds = run["primary"].read()
    assert ds.sizes["time"] == n
    assert run.metadata["stop"]["num_events"] == {"primary": n}
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run.metadata["start"]["purpose"] == "count"
    orbit = np.asarray(ds[sigs["orbit"].name].values)
    short = np.asarray(ds[sigs["short"].name].values)
    assert orbit.shape == (n, 40)  # > 16 elements: zarr
    assert short.shape == (n, 5)  # small arrays keep their shape too
    for i in range(n):
        current, o, s = _frame(i)
        np.testing.assert_array_equal(orbit[i], o)
        np.testing.assert_array_equal(short[i], s)
        assert float(ds[sigs["current"].name].values[i]) == current
    stats = writer.stats()
    assert stats["documents"] == n + 3  # start, descriptor, events, stop
    assert stats["batches"] <= stats["documents"]


def test_data_are_live_before_the_run_ends(RE, sigs, writer, client):
    seen: dict[str, Any] = {}

    def plan():
        uid = yield from bps.open_run()
        yield from _steps(sigs, 3)
        writer.flush(timeout=60)  # the writer thread, not the RunEngine, does the writing
        run = open_run(client, uid)
        seen["events"] = run["primary"].read().sizes["time"]
        seen["stopped"] = "stop" in run.metadata
        yield from _steps(sigs, 2)
        yield from bps.close_run()

    RE(plan())
    assert seen == {"events": 3, "stopped": False}
    writer.flush(timeout=60)


def test_failed_run_keeps_its_stop_reason_and_partial_data(RE, sigs, writer, client):
    uids: list[str] = []
    RE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
    with pytest.raises(RuntimeError, match="beam lost at step 4"):
        RE(bpp.run_wrapper(_steps(sigs, 10, fail_after=4)))
    writer.flush(timeout=60)
    run = open_run(client, uids[-1])
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert "beam lost at step 4" in stop["reason"]
    ds = run["primary"].read()
    assert ds.sizes["time"] == 4
    np.testing.assert_array_equal(ds[sigs["orbit"].name].values[3], _frame(3)[1])


def test_write_failure_is_raised_by_flush_and_run_still_gets_its_stop(client, caplog):
    writer = BackgroundTiledWriter(client)
    bundle = compose_run(metadata={"plan_name": "breaks_the_writer"})
    uid = bundle.start_doc["uid"]
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={"x": {"dtype": "array", "shape": [20], "source": "test"}},
    )
    writer("start", bundle.start_doc)
    writer("descriptor", desc.descriptor_doc)
    for i in range(2):
        writer("event", desc.compose_event(data={"x": np.full(20, i)}, timestamps={"x": 0.0}))
    writer.flush(timeout=60)  # the float array node exists now
    bad = np.array(["not a number"] * 20)  # cannot be appended to a float array
    writer("event", desc.compose_event(data={"x": bad}, timestamps={"x": 0.0}))
    writer("stop", bundle.compose_stop(exit_status="success"))
    with pytest.raises(TiledWriteError, match=uid):
        writer.flush(timeout=60)
    assert writer.failures[-1].run_uid == uid
    logged = [r for r in caplog.records if r.levelname == "ERROR" and uid in r.getMessage()]
    assert logged, "the failure must be logged when it happens"
    writer.flush(timeout=60)  # reported once
    writer.close(timeout=60)
    run = open_run(client, uid)
    assert run.metadata["stop"]["exit_status"] == "success"
    assert any("writing failed" in note for note in run.metadata["notes"])
    np.testing.assert_array_equal(run["primary"].read()["x"].values, [np.zeros(20), np.ones(20)])


def test_unreported_failure_is_recorded_in_the_next_run(RE, sigs, writer, client):
    (first,) = RE(bpp.run_wrapper(_steps(sigs, 1)))
    writer.flush(timeout=60)
    # Replaying the same start document makes Tiled refuse it (the run already exists).
    start = dict(open_run(client, first).metadata["start"])
    writer("start", start)
    (second,) = RE(bpp.run_wrapper(_steps(sigs, 1)))
    with pytest.raises(TiledWriteError, match=first):
        writer.flush(timeout=60)
    before = open_run(client, second).metadata["writer_failures_before_run"]
    assert len(before) == 1 and first in before[0]


def test_close_stops_open_runs_and_refuses_documents(client):
    writer = BackgroundTiledWriter(client)
    bundle = compose_run(metadata={"plan_name": "interrupted"})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={"x": {"dtype": "number", "shape": [], "source": "test"}},
    )
    writer("start", bundle.start_doc)
    writer("descriptor", desc.descriptor_doc)
    for i in range(3):
        writer("event", desc.compose_event(data={"x": float(i)}, timestamps={"x": 0.0}))
    writer.close(timeout=60)
    with pytest.raises(RuntimeError, match="closed"):
        writer("event", desc.compose_event(data={"x": 3.0}, timestamps={"x": 0.0}))
    run = open_run(client, bundle.start_doc["uid"])
    assert run.metadata["stop"]["exit_status"] == "fail"
    assert "closed" in run.metadata["stop"]["reason"]
    assert run.metadata["stop"]["num_events"] == {"primary": 3}
    np.testing.assert_array_equal(run["primary"].read()["x"].values, [0.0, 1.0, 2.0])


def test_bad_options_are_refused(client):
    with pytest.raises(ValueError, match="max_array_size"):
        BackgroundTiledWriter(client, max_array_size=-1)
    with pytest.raises(ValueError, match="batch_size"):
        BackgroundTiledWriter(client, batch_size=0)
