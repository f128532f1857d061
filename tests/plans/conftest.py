"""Fixtures of the plan tests: a RunEngine, Tiled and its writer, a connected twin, a journal.

- ``run_engine``: a RunEngine (``call_returns_result=True``) whose event loop is stopped and
  closed when the test ends. Devices are connected in its loop (``connect_sync`` after it
  exists), so every device fixture depends on it.
- ``tiled`` / ``client`` (module scope: an embedded server takes ~5 s to start) and ``writer``,
  a :class:`~accplans.data.BackgroundTiledWriter` subscribed to the test's RunEngine.
- ``machine``: the small ring connected to ``fresh_small_twin`` (tests/conftest.py; reset for
  the test, ``@pytest.mark.twin(...)`` chooses seed and noise).
- ``journal``: a per-test pending-restore journal (``$ACCPLANS_JOURNAL``).

Helpers shared by the modules of this folder live in ``tests/plans/helpers.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bluesky import RunEngine

from accplans.config import MachineDescription, load_description
from accplans.data import BackgroundTiledWriter, LocalTiled
from accplans.devices import Machine
from accplans.sim import TwinProcess
from tests.plans.helpers import connect_to


@pytest.fixture(scope="session")
def small() -> MachineDescription:
    return load_description("small")


@pytest.fixture
def run_engine() -> Iterator[RunEngine]:
    """A RunEngine whose event loop is stopped (and closed) when the test ends."""
    engine = RunEngine({}, call_returns_result=True)
    yield engine
    if engine.state != "idle":
        engine.halt()
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=5)
    engine.loop.close()


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTiled]:
    with LocalTiled(tmp_path_factory.mktemp("tiled")) as server:
        yield server


@pytest.fixture(scope="module")
def client(tiled: LocalTiled) -> Iterator[Any]:
    c = tiled.client()
    yield c
    c.context.close()


@pytest.fixture
def writer(client: Any, run_engine: RunEngine) -> Iterator[BackgroundTiledWriter]:
    """A writer subscribed to ``run_engine``; closing it fails the test on unreported errors."""
    w = BackgroundTiledWriter(client)
    token = run_engine.subscribe(w)
    yield w
    run_engine.unsubscribe(token)
    w.close(timeout=60)


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's pending-restore journal folder (``$ACCPLANS_JOURNAL``; not created)."""
    path = tmp_path / "journal"
    monkeypatch.setenv("ACCPLANS_JOURNAL", str(path))
    return path


@pytest.fixture
def machine(
    run_engine: RunEngine, fresh_small_twin: TwinProcess, small: MachineDescription
) -> Machine:
    """The small ring, connected to the freshly reset session twin in the RunEngine's loop."""
    return connect_to(fresh_small_twin, small)
