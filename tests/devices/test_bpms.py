"""BPMs: mm PVs -> metres, consistent frames, waiting for a frame newer than a time."""

import asyncio

import numpy as np
import pytest
from ophyd_async.core import set_mock_value

from accplans.devices import OrbitFrame


async def _drain() -> None:
    """Run the loop until every ready callback and task step has run (mock monitors are
    synchronous, so this lets a waiter see an update and react to it; it never waits on time)."""
    for _ in range(50):
        await asyncio.sleep(0)


def _publish(bpms, counter: int, time: float, x_mm=None) -> None:
    """Publish a frame as the twin does: arrays, then TIME, then COUNTER."""
    if x_mm is not None:
        set_mock_value(bpms.x_hw, np.asarray(x_mm, dtype=float))
    set_mock_value(bpms.timestamp, time)
    set_mock_value(bpms.counter, counter)


async def test_single_bpm_reads_metres_from_millimetres(machine):
    bpm = machine.bpms["BPM003"]
    set_mock_value(bpm.x_hw, 1.25)
    set_mock_value(bpm.y_hw, -0.5)
    set_mock_value(bpm.valid_hw, 1)
    reading = await bpm.read()
    assert reading["BPM003-x"]["value"] == pytest.approx(1.25e-3)
    assert reading["BPM003-y"]["value"] == pytest.approx(-0.5e-3)
    assert reading["BPM003-valid"]["value"] is True
    described = await bpm.describe()
    assert described["BPM003-x"].get("units") == "m"


async def test_read_orbit_is_one_frame_in_si(machine):
    bpms = machine.bpms
    n = len(bpms)
    x_mm = np.linspace(-1, 1, n)
    set_mock_value(bpms.y_hw, 2 * x_mm)
    valid = np.ones(n, dtype=np.int32)
    valid[5] = 0
    set_mock_value(bpms.valid_hw, valid)
    _publish(bpms, 7, 1000.5, x_mm)
    frame = await bpms.read_orbit()
    assert isinstance(frame, OrbitFrame)
    np.testing.assert_allclose(frame.x, x_mm * 1e-3)
    np.testing.assert_allclose(frame.y, 2 * x_mm * 1e-3)
    assert frame.valid.dtype == bool
    assert frame.valid.tolist() == [i != 5 for i in range(n)]
    assert (frame.counter, frame.time) == (7, 1000.5)
    reading = await bpms.read()
    np.testing.assert_allclose(reading["bpms-x"]["value"], x_mm * 1e-3)
    described = await bpms.describe()
    assert described["bpms-x"].get("units") == "m"
    assert described["bpms-timestamp"].get("units") == "s"


async def test_wait_for_frame_returns_only_a_frame_taken_after_the_given_time(machine):
    bpms = machine.bpms
    n = len(bpms)
    _publish(bpms, 10, 100.0, np.zeros(n))
    settled = 100.7  # e.g. when the correctors settled
    waiter = asyncio.create_task(bpms.wait_for_frame(after=settled, timeout=5))
    # frames computed from readbacks older than `settled` must be skipped
    for counter, t in ((11, 100.2), (12, 100.7)):
        _publish(bpms, counter, t, np.full(n, float(counter)))
        await _drain()
        assert not waiter.done()
    _publish(bpms, 13, 100.9, np.full(n, 13.0))
    frame = await waiter
    assert (frame.counter, frame.time) == (13, 100.9)
    np.testing.assert_allclose(frame.x, 13e-3)


async def test_wait_for_frame_by_counter_and_for_the_next_frame(machine):
    bpms = machine.bpms
    _publish(bpms, 4, 50.0)
    assert (await bpms.wait_for_frame(counter=3)).counter == 4  # already newer: at once
    assert (await bpms.wait_for_frame(after=49.0)).counter == 4
    nxt = asyncio.create_task(bpms.wait_for_frame())  # neither: the next frame
    await _drain()
    assert not nxt.done()
    _publish(bpms, 5, 50.1)
    assert (await nxt).counter == 5


async def test_wait_for_frame_times_out_naming_the_last_frame(machine):
    bpms = machine.bpms
    _publish(bpms, 2, 10.0)
    with pytest.raises(
        TimeoutError, match=r"bpms: no BPM frame with TIME > 20.000000 within 0.1 s"
    ):
        await bpms.wait_for_frame(after=20.0, timeout=0.1)


async def test_a_frame_of_the_wrong_length_is_named(machine):
    set_mock_value(machine.bpms.x_hw, np.zeros(3))
    with pytest.raises(ValueError, match=r"array PV mock\+ca://SMALL:BPMS:X has 3 elements, .* 16"):
        await machine.bpms.read_orbit()
