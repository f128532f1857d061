"""measure_tunes and correct_tunes on the small-ring twin, against pyAT on its true lattice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import at
import numpy as np
import pytest
from bluesky import RunEngine

from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine
from accplans.physics import wrap_tune
from accplans.plans import correct_tunes, measure_tunes
from accplans.sim import Truth, TwinProcess
from tests.plans.helpers import assert_same_setpoints, hardware_setpoints, run_plan, written_run


def true_tunes(truth: Truth) -> np.ndarray:
    """Fractional tunes (x, y) of the twin's true lattice at the RF frequency it serves."""
    _, ringdata, _ = at.get_optics(truth.ring, dct=truth.dct_m)
    return np.mod(np.asarray(ringdata.tune, float)[:2], 1.0)


def _truth(twin: TwinProcess, tmp_path: Path, tag: str) -> Truth:
    return twin.control.export_truth(tmp_path / tag)


@pytest.mark.twin(seed=1, noise=True)
def test_measured_tunes_are_the_true_lattice_tunes(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """Seed-1 errors, 1e-5 monitor noise, 16 readings: within 5 standard errors (2e-5) of
    pyAT's tunes of the true lattice; the reported spread is the monitor's noise."""
    assert machine.tune is not None
    result = run_plan(run_engine, measure_tunes(machine.tune, n_samples=16))
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    tunes = load_result(client, uid, "tunes")
    reference = true_tunes(_truth(fresh_small_twin, tmp_path, "truth"))
    error = wrap_tune(np.asarray(tunes["tunes"]) - reference)
    print(f"\nmeasured {tunes['tunes']}, true {reference}, error {error}, std {tunes['std']}")
    assert np.all(np.abs(error) < 2e-5)
    assert np.all((0.5e-5 < tunes["std"]) & (tunes["std"] < 2e-5))
    assert tunes["n_samples"] == 16 and tunes["method"] == "monitor"
    # 16 distinct readings, each a fresh update of the monitor
    xs = run["primary"].read()["tune-x"].values
    assert xs.size == 16 and np.unique(xs).size == 16


@pytest.mark.twin(seed=2, noise=True)
def test_correct_tunes_reaches_the_target_in_the_true_lattice(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """A move of (+0.012, -0.009) with the QF/QD knobs: the true lattice's tunes end within
    1e-4 of the target (5e-5 tolerance); the quadrupoles keep the new setpoints."""
    assert machine.tune is not None
    start = true_tunes(_truth(fresh_small_twin, tmp_path, "before"))
    target = np.mod(start + np.array([0.012, -0.009]), 1.0)
    before = hardware_setpoints([machine.quadrupoles])
    result = run_plan(
        run_engine,
        correct_tunes(machine.tune, machine.quadrupoles, target=target.tolist()),
    )
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    after = true_tunes(_truth(fresh_small_twin, tmp_path, "after"))
    error = wrap_tune(after - target)
    steps = run["primary"].read()["step-knob_steps"].values
    print(f"\ntarget {target}, true after {after}, error {error}; steps {steps.tolist()}")
    assert np.all(np.abs(error) < 1e-4)
    assert 1 <= steps.shape[0] <= 5
    stored = load_result(client, uid, "tunes")
    np.testing.assert_allclose(stored["target"], target)
    assert np.all(np.abs(wrap_tune(np.asarray(stored["tunes"]) - target)) <= 5e-5)
    moved = hardware_setpoints([machine.quadrupoles])["quadrupoles"]
    assert np.any(moved != before["quadrupoles"])


@pytest.mark.twin(seed=3, noise=True)
def test_a_correction_that_does_not_converge_restores_the_quadrupoles(
    run_engine: RunEngine, machine: Machine
) -> None:
    """One step at gain 0.3 cannot reach the target: the plan fails and every quadrupole is
    back at its starting setpoint exactly."""
    assert machine.tune is not None
    before = hardware_setpoints([machine.quadrupoles])
    start = run_plan(run_engine, measure_tunes(machine.tune))
    del start
    target = [0.40, 0.65]
    with pytest.raises(RuntimeError, match="did not reach"):
        run_engine(
            correct_tunes(machine.tune, machine.quadrupoles, target=target, iterations=1, gain=0.3)
        )
    assert_same_setpoints(hardware_setpoints([machine.quadrupoles]), before)


@pytest.mark.twin(seed=1, noise=True)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"knobs": ["QF_strength", "QX_strength"]}, "unknown knob"),
        ({"knobs": ["SF_strength"]}, "not in"),
        ({"target": [np.nan, 0.66]}, "finite"),
        ({"target": [0.2, 0.66]}, "out of reach"),
        ({"tolerance": 0.0}, "tolerance"),
    ],
)
def test_bad_input_is_refused_before_any_move(
    run_engine: RunEngine, machine: Machine, kwargs: dict[str, Any], message: str
) -> None:
    """An unknown knob, a knob of magnets the plan was not given, a NaN target, a target
    0.2 away (more than max_change), a zero tolerance: refused with a clear message, and
    nothing moved."""
    assert machine.tune is not None
    before = hardware_setpoints([machine.quadrupoles, machine.sextupoles])
    args: dict[str, Any] = {"target": [0.41, 0.66], **kwargs}
    with pytest.raises(ValueError, match=message):
        run_engine(correct_tunes(machine.tune, machine.quadrupoles, **args))
    assert_same_setpoints(hardware_setpoints([machine.quadrupoles, machine.sextupoles]), before)


@pytest.mark.twin(seed=1, noise=True)
def test_measure_tunes_refuses_bad_arguments(run_engine: RunEngine, machine: Machine) -> None:
    assert machine.tune is not None
    with pytest.raises(ValueError, match="tbt"):
        run_engine(measure_tunes(machine.tune, method="tbt"))
    with pytest.raises(ValueError, match="n_samples"):
        run_engine(measure_tunes(machine.tune, n_samples=0))
