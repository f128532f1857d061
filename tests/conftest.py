"""Session-wide test setup: a loopback EPICS environment and digital twins on demand.

EPICS on loopback
    At import time (before any test can create a CA or PVA client context) this file reserves
    a pool of loopback ports for the twins of the session and puts, into ``os.environ``, the
    loopback variables of ECOSYSTEM.md with ``EPICS_CA_ADDR_LIST``/``EPICS_PVA_ADDR_LIST``
    listing every port of the pool. Client contexts (libca for ``ca://``/aioca, p4p for
    ``pva://``) read the environment once per process, so every twin of the session must use a
    port trio from this pool: the fixtures below do; a test that starts its own twin or server
    takes ports from the ``twin_ports`` fixture.

Twins
    ``small_twin`` and ``ebs_twin`` are session fixtures: each starts one twin process
    (``python -m accplans.sim serve``) the first time a test asks for it, and stops it at the
    end of the session. They yield an :class:`accplans.sim.TwinProcess` (``prefix``,
    ``control``, ``environment``, ...). Tests that need a known state use the function-scoped
    ``fresh_small_twin`` / ``fresh_ebs_twin`` instead: they reset the twin first (new errors
    from the seed, design setpoints, beam refilled, drift stopped, startup ramp rate and noise).
    Choose the seed and the noise with a marker::

        @pytest.mark.twin(seed=3, noise=False)
        async def test_something(fresh_small_twin): ...

Every twin runs with errors (``ErrorModel()`` defaults) and noise, seed 1, default ramp rate.

CA channels
    aioca keeps one channel cache per event loop, and pytest-asyncio gives every test its own
    loop: a channel left open would get its disconnect callback (when a twin stops) on a closed
    loop. ``_close_ca_channels`` closes aioca's channels after every test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from aioca import _catools

from accplans.sim import TwinPorts, TwinProcess, client_environment, reserve_ports, run_twin

#: Port trios of the session: [0] small twin, [1] EBS twin, the rest for tests' own twins.
TWIN_PORT_POOL: list[TwinPorts] = reserve_ports(6)
os.environ.update(client_environment(TWIN_PORT_POOL))
# aioca keeps the first CA context it sees and attaches every other thread to it: create it
# here, in the main thread, before any RunEngine thread does CA (a module whose first test runs
# plans would otherwise own it from a RunEngine thread; later main-thread tests then warn
# "There is already a CA context for this thread").
_catools._Context._ensure_context()

_SPARE = TWIN_PORT_POOL[2:]
_DEFAULT_SEED = 1


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "twin(seed=1, noise=None): state of fresh_small_twin / fresh_ebs_twin"
    )


@pytest.fixture(scope="session")
def small_twin() -> Iterator[TwinProcess]:
    """The small ring's twin, started once per session on the first request."""
    with run_twin("small", seed=_DEFAULT_SEED, ports=TWIN_PORT_POOL[0]) as twin:
        yield twin


@pytest.fixture(scope="session")
def ebs_twin() -> Iterator[TwinProcess]:
    """The EBS-size ring's twin, started once per session on the first request."""
    with run_twin("ebs", seed=_DEFAULT_SEED, ports=TWIN_PORT_POOL[1]) as twin:
        yield twin


def _reset(twin: TwinProcess, request: pytest.FixtureRequest) -> TwinProcess:
    marker = request.node.get_closest_marker("twin")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    unknown = set(kwargs) - {"seed", "noise"}
    if unknown:
        raise pytest.UsageError(f"@pytest.mark.twin: unknown arguments {sorted(unknown)}")
    twin.control.reset(int(kwargs.get("seed", _DEFAULT_SEED)))
    if kwargs.get("noise") is not None:
        twin.control.set_noise(bool(kwargs["noise"]))
    return twin


@pytest.fixture
def fresh_small_twin(small_twin: TwinProcess, request: pytest.FixtureRequest) -> TwinProcess:
    """``small_twin`` reset for this test (seed and noise from ``@pytest.mark.twin``)."""
    return _reset(small_twin, request)


@pytest.fixture
def fresh_ebs_twin(ebs_twin: TwinProcess, request: pytest.FixtureRequest) -> TwinProcess:
    """``ebs_twin`` reset for this test (seed and noise from ``@pytest.mark.twin``)."""
    return _reset(ebs_twin, request)


@pytest.fixture(autouse=True)
def _close_ca_channels() -> Iterator[None]:
    """Close the CA channels a test opened through aioca (see the module docstring)."""
    yield
    aioca = sys.modules.get("aioca")
    if aioca is not None:
        aioca.purge_channel_caches()


@pytest.fixture
def twin_ports() -> Iterator[TwinPorts]:
    """A port trio of the session pool for a test's own twin (free again after the test)."""
    if not _SPARE:
        raise RuntimeError("the session's twin port pool is exhausted (tests/conftest.py)")
    ports = _SPARE.pop(0)
    try:
        yield ports
    finally:
        _SPARE.append(ports)


@pytest.fixture
def service_ports() -> Iterator[TwinPorts]:
    """Another port trio of the pool, for a service (the orbit feedback) a test starts."""
    if not _SPARE:
        raise RuntimeError("the session's twin port pool is exhausted (tests/conftest.py)")
    ports = _SPARE.pop(0)
    try:
        yield ports
    finally:
        _SPARE.append(ports)
