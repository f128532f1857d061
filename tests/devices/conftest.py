"""Fixtures of the device tests: descriptions, mock machines, a RunEngine."""

import pytest
from bluesky import RunEngine
from ophyd_async.core import init_devices

from accplans.config import load_description
from accplans.devices import Machine


@pytest.fixture(scope="session")
def small():
    return load_description("small")


@pytest.fixture
async def machine(small):
    """The small ring's machine, connected in mock mode (no IOC)."""
    async with init_devices(mock=True):
        machine = Machine(small)
    return machine


@pytest.fixture
def run_engine():
    """A RunEngine whose event loop is stopped when the test ends."""
    engine = RunEngine(call_returns_result=True)
    yield engine
    if engine.state != "idle":
        engine.halt()
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()
