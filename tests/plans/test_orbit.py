"""measure_orbit against the twin's truth: the orbit its BPMs read, and their noise."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine

from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine
from accplans.plans import measure_orbit
from accplans.sim import ErrorModel, TwinProcess
from tests.plans.helpers import machine_setpoints, primary_events, run_plan, written_run

N_SAMPLES = 20


def test_mean_orbit_is_the_true_orbit_as_read_and_spread_is_the_bpm_noise(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """Seed 1 with noise: each mean is the true beam position at the BPM as that BPM reads it
    (gain, roll, offset) within noise/sqrt(n); the spread is the configured BPM noise."""
    sigma = ErrorModel().bpm_noise_m
    before = machine_setpoints(machine)
    t0 = time.perf_counter()
    result = run_plan(run_engine, measure_orbit(machine.bpms, n_samples=N_SAMPLES))
    elapsed = time.perf_counter() - t0
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    orbit = load_result(client, uid, "orbit").data
    truth = fresh_small_twin.control.export_truth(tmp_path / "truth")
    expected = truth.readings(truth.closed_orbit())  # (nbpm, 2), m

    frames = run["primary"].read()
    assert primary_events(run) == N_SAMPLES
    counters = np.asarray(frames["orbit-counter"])
    assert np.all(np.diff(counters) > 0), "a frame was used twice"
    mean = np.concatenate([orbit["x"], orbit["y"]])
    std = np.concatenate([orbit["std_x"], orbit["std_y"]])
    z = (mean - expected.T.ravel()) / (sigma / np.sqrt(N_SAMPLES))
    pooled = float(np.sqrt(np.mean(std**2)))
    print(
        f"\nmeasure_orbit {N_SAMPLES} samples ({elapsed:.2f} s): rms orbit "
        f"{np.std(expected) * 1e6:.0f} um, max |z| {np.max(np.abs(z)):.2f}, "
        f"chi2/dof of means {np.mean(z**2):.2f}, pooled std {pooled * 1e6:.3f} um"
    )
    # the orbit is far from zero (offsets, misalignments): the comparison is not trivial
    assert np.std(expected) > 50 * sigma
    assert np.max(np.abs(z)) < 5.0
    assert 0.3 < np.mean(z**2) < 2.2  # 32 degrees of freedom
    # 32 * 19 degrees of freedom: the pooled std is known to ~3 %
    assert 0.85 * sigma < pooled < 1.15 * sigma
    assert machine_setpoints(machine).keys() == before.keys()
    for name, values in machine_setpoints(machine).items():
        np.testing.assert_array_equal(values, before[name])
