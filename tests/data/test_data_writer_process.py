"""ProcessTiledWriter: the writer in a child process writes what the thread writer writes."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
import pytest
from ophyd_async.core import Array1D, init_devices, soft_signal_rw

from accplans.data import LocalTiled, ProcessTiledWriter, TiledWriteError, open_run


@pytest.fixture
def orbit(RE):
    with init_devices():
        orbit = soft_signal_rw(Array1D[np.float64], np.zeros(40), units="m")
    return orbit


def _steps(orbit: Any, n: int, fail_after: int | None = None):
    for i in range(n):
        if i == fail_after:
            raise RuntimeError(f"beam lost at step {i}")
        yield from bps.mv(orbit, np.full(40, 1e-4 * i))
        yield from bps.trigger_and_read([orbit])


def test_runs_arrive_whole_and_failed_runs_keep_their_reason(RE, orbit, tiled, client):
    with ProcessTiledWriter(tiled.uri, tiled.api_key) as writer:
        RE.subscribe(writer)
        (uid,) = RE(bpp.run_wrapper(_steps(orbit, 12)))
        with pytest.raises(RuntimeError, match="beam lost at step 3"):
            RE(bpp.run_wrapper(_steps(orbit, 12, fail_after=3)))
        writer.flush(timeout=60)
    run = open_run(client, uid)
    values = np.asarray(run["primary"].read()[orbit.name].values)
    assert values.shape == (12, 40)
    np.testing.assert_array_equal(values[:, 0], 1e-4 * np.arange(12))
    failed = client.values().last()
    assert failed.metadata["stop"]["exit_status"] == "fail"
    assert "beam lost at step 3" in failed.metadata["stop"]["reason"]
    assert failed["primary"].read().sizes["time"] == 3


def test_write_failures_come_back_from_the_child(RE, orbit, tmp_path):
    server = LocalTiled(tmp_path / "tiled").start()
    writer = ProcessTiledWriter(server.uri, server.api_key)
    RE.subscribe(writer)
    try:
        server.close()  # Tiled goes away: the child's writes fail
        RE(bpp.run_wrapper(_steps(orbit, 2)))
        with pytest.raises(TiledWriteError, match="failure"):
            writer.flush(timeout=60)
    finally:
        writer.close(timeout=60)


def test_a_server_that_refuses_the_key_is_a_clear_error(tiled):
    with pytest.raises(ConnectionError, match="cannot write to Tiled"):
        ProcessTiledWriter(tiled.uri, "wrongkey123")
