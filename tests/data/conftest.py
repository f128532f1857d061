"""Fixtures of the data tests: one embedded Tiled server per test module, a RunEngine, a writer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from bluesky import RunEngine

from accplans.data import BackgroundTiledWriter, LocalTiled


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
def RE() -> RunEngine:
    return RunEngine({})


@pytest.fixture
def writer(client: Any, RE: RunEngine) -> Iterator[BackgroundTiledWriter]:
    """A writer subscribed to ``RE``; closing it at teardown fails the test on unreported errors."""
    w = BackgroundTiledWriter(client)
    token = RE.subscribe(w)
    yield w
    RE.unsubscribe(token)
    w.close(timeout=60)
