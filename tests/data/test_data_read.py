"""Runs written by BackgroundTiledWriter read back with the Tiled client and databroker 2."""

from __future__ import annotations

import bluesky.plans as bp
import numpy as np
import pytest
from databroker.client import CatalogOfBlueskyRuns
from databroker.v2 import Broker
from ophyd_async.core import Array1D, init_devices, soft_signal_rw
from tiled.queries import Key

from accplans.config import load_description
from accplans.data import bluesky_catalog, open_run, run_metadata


@pytest.fixture
def uid(RE, writer):
    with init_devices():
        current = soft_signal_rw(float, 0.2, units="A")
        orbit = soft_signal_rw(Array1D[np.float64], np.linspace(0, 1e-3, 32), units="m")
    (uid,) = RE(bp.count([current, orbit], num=4, md={"sample_tag": "readback"}))
    writer.flush(timeout=60)
    return uid


def test_tiled_client_reads_data_metadata_and_searches(client, uid):
    run = open_run(client, uid)
    ds = run["primary"].read()
    assert ds["orbit"].shape == (4, 32)
    np.testing.assert_array_equal(ds["orbit"].values[2], np.linspace(0, 1e-3, 32))
    np.testing.assert_array_equal(ds["current"].values, [0.2] * 4)
    assert run.metadata["start"]["uid"] == uid
    assert run.metadata["start"]["plan_name"] == "count"
    assert run.metadata["stop"]["exit_status"] == "success"
    assert list(client.search(Key("start.sample_tag") == "readback")) == [uid]


def test_databroker_reads_the_run(client, uid):
    catalog = bluesky_catalog(client)
    assert isinstance(catalog, CatalogOfBlueskyRuns) and Broker is CatalogOfBlueskyRuns
    assert catalog[uid].metadata["start"]["uid"] == uid
    v2_run = catalog.v2[uid]
    ds = v2_run.primary.read()
    assert ds["orbit"].shape == (4, 32)
    np.testing.assert_array_equal(ds["current"].values, [0.2] * 4)
    assert v2_run.metadata["stop"]["num_events"] == {"primary": 4}
    assert uid in list(catalog.search(Key("start.sample_tag") == "readback"))


def test_open_run_names_a_missing_uid(client):
    with pytest.raises(KeyError, match="no run with uid 'nope' in Tiled container"):
        open_run(client, "nope")


def test_run_metadata_reaches_tiled_and_is_searchable(RE, writer, client):
    small = load_description("small")
    with init_devices():
        tune = soft_signal_rw(float, 0.21)
    md = run_metadata(small, plan_name="count_tune", plan_args={"num": 2}, twin_seed=11)
    (uid,) = RE(bp.count([tune], num=2, md=md))
    writer.flush(timeout=60)
    start = open_run(client, uid).metadata["start"]
    assert start["machine"]["name"] == small.machine.name
    assert start["config_hash"] == small.config_hash
    found = client.search(Key("start.config_hash") == small.config_hash).search(
        Key("start.twin_seed") == 11
    )
    assert uid in list(found)
