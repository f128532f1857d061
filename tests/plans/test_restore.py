"""restore_setpoints on the twin: several families from a journaled pending restore."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine

from accplans.data import BackgroundTiledWriter
from accplans.devices import Machine
from accplans.plans import PendingRestore, Snapshot, restore_setpoints
from tests.plans.helpers import (
    assert_same_setpoints,
    machine_setpoints,
    primary_events,
    run_plan,
    written_run,
)


def test_a_pending_restore_of_three_families_sets_them_exactly(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    journal: Path,
) -> None:
    """Correctors of both planes and the RF frequency, one event per family (each event holds
    every family's setpoints after that step); the applied file moves to ``applied/``."""
    assert machine.rf is not None
    families = [machine.hcorr, machine.vcorr, machine.rf]
    start = machine_setpoints(machine)
    rng = np.random.default_rng(3)
    target = {
        "hcorr": np.round(rng.uniform(-2, 2, 24), 4),
        "vcorr": np.round(rng.uniform(-2, 2, 24), 4),
        "RF": start["RF"] + 123.0,
    }
    snapshot = Snapshot(
        machine.description.machine.id,
        machine.description.config_hash,
        {f.name: dict(zip(f.names, target[f.name].tolist(), strict=True)) for f in families},
    )
    pending = PendingRestore.write(snapshot, "test", journal)
    t0 = time.perf_counter()
    result = run_plan(run_engine, restore_setpoints(families, pending.path))
    print(f"\nrestore_setpoints, 3 families: {time.perf_counter() - t0:.2f} s")
    assert result.exit_status == "success"
    untouched = {k: start[k] for k in ("quadrupoles", "sextupoles")}  # not in the snapshot
    assert_same_setpoints(machine_setpoints(machine), {**target, **untouched})
    assert not pending.path.exists()
    assert (journal / "applied" / pending.path.name).exists()
    run = written_run(client, writer, result.run_start_uids[0])
    assert primary_events(run) == 3
    events = run["primary"].read()
    for k, family in enumerate(families):
        recorded = np.asarray(events[f"{family.name}-setpoint"])
        np.testing.assert_array_equal(recorded[k:].reshape(3 - k, -1)[0], target[family.name])
        if k:
            np.testing.assert_array_equal(recorded[k - 1].ravel(), start[family.name])
