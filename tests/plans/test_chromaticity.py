"""measure_chromaticity and correct_chromaticity on the small-ring twin, against pyAT's
chromaticity of its true lattice at the RF frequency it serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import at
import numpy as np
import pytest
from bluesky import RunEngine

from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine
from accplans.plans import correct_chromaticity, measure_chromaticity
from accplans.sim import Truth, TwinProcess
from tests.plans.helpers import (
    assert_same_setpoints,
    hardware_setpoints,
    machine_setpoints,
    run_plan,
    written_run,
)


def true_chromaticity(truth: Truth) -> np.ndarray:
    """pyAT's chromaticity (x, y) of the true lattice at the RF frequency the twin serves."""
    return np.asarray(at.get_chrom(truth.ring, dct=truth.dct_m), float)[:2]


@pytest.mark.twin(seed=1, noise=True)
def test_chromaticity_matches_the_true_lattice(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """Seed-1 errors, 1e-5 monitor noise, the default scan (5 points; the small ring's RF
    limits shrink it to |dp| 1.7e-4): the linear and quadratic fits within 0.1 of pyAT's
    chromaticity of the true lattice, their reported errors below 0.05, the RF frequency
    restored exactly."""
    assert machine.tune is not None and machine.rf is not None
    before = machine_setpoints(machine)
    result = run_plan(run_engine, measure_chromaticity(machine.tune, machine.rf))
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    chrom = load_result(client, uid, "chromaticity")
    reference = true_chromaticity(fresh_small_twin.control.export_truth(tmp_path / "truth"))
    dp = np.asarray(chrom["dp"])
    print(
        f"\nlinear {chrom['linear']} +- {chrom['std_linear']}, quadratic {chrom['quadratic']} "
        f"+- {chrom['std_quadratic']}, truth {reference}; dp {dp}"
    )
    assert np.all(np.abs(np.asarray(chrom["linear"]) - reference) < 0.1)
    assert np.all(np.abs(np.asarray(chrom["quadratic"]) - reference) < 0.1)
    np.testing.assert_array_equal(chrom["chromaticity"], chrom["quadratic"])
    assert np.all(np.asarray(chrom["std_linear"]) < 0.05)
    assert np.all(np.isfinite(chrom["std_quadratic"]))
    assert dp.size >= 5 and np.unique(dp).size >= 5 and np.max(np.abs(dp)) <= 2e-3
    assert int(run["primary"].read().sizes["time"]) == dp.size - 1
    assert_same_setpoints(machine_setpoints(machine), before)


@pytest.mark.twin(seed=2, noise=True)
def test_correct_chromaticity_reaches_the_target_in_the_true_lattice(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """From about (1, 1) to (1.6, 0.5) with the SF/SD knobs: the true lattice's chromaticity
    ends within 0.1 of the target, the sextupoles keep their new setpoints and the RF
    frequency is back at its start exactly."""
    assert machine.tune is not None and machine.rf is not None
    target = [1.6, 0.5]
    rf_before = hardware_setpoints([machine.rf])
    sext_before = hardware_setpoints([machine.sextupoles])
    result = run_plan(
        run_engine,
        correct_chromaticity(machine.tune, machine.rf, machine.sextupoles, target=target),
    )
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    after = true_chromaticity(fresh_small_twin.control.export_truth(tmp_path / "after"))
    stored = load_result(client, uid, "chromaticity")
    print(f"\ntarget {target}, true after {after}, last measured {stored['chromaticity']}")
    assert np.all(np.abs(after - target) < 0.1)
    np.testing.assert_allclose(stored["target"], target)
    assert_same_setpoints(hardware_setpoints([machine.rf]), rf_before)
    assert np.any(
        hardware_setpoints([machine.sextupoles])["sextupoles"] != sext_before["sextupoles"]
    )


@pytest.mark.twin(seed=3, noise=True)
def test_a_failed_chromaticity_correction_restores_sextupoles_and_rf(
    run_engine: RunEngine, machine: Machine
) -> None:
    """One step at gain 0.2 cannot reach a target 1 unit away: the plan fails; sextupoles and
    RF frequency are back at their starting setpoints exactly."""
    assert machine.tune is not None and machine.rf is not None
    families = [machine.sextupoles, machine.rf]
    before = hardware_setpoints(families)
    with pytest.raises(RuntimeError, match="did not reach"):
        run_engine(
            correct_chromaticity(
                machine.tune,
                machine.rf,
                machine.sextupoles,
                target=[2.0, 0.0],
                iterations=1,
                gain=0.2,
            )
        )
    assert_same_setpoints(hardware_setpoints(families), before)


@pytest.mark.twin(seed=1, noise=True)
@pytest.mark.parametrize(
    ("plan", "kwargs", "message"),
    [
        ("measure", {"dp": 2e-3}, "leave the RF limits"),
        ("measure", {"n_steps": 1}, "at least 5 points"),
        ("correct", {"dp": 1e-3}, "leave the RF limits"),
        ("correct", {"knobs": ["SF_strength", "SX_strength"]}, "unknown knob"),
        ("correct", {"target": [1.0, np.nan]}, "finite"),
        ("correct", {"target": [1.0, -15.0], "max_change": 50.0}, "out of reach: knob steps"),
        ("correct", {"target": [30.0, 1.0]}, "out of reach: more than max_change"),
    ],
)
def test_bad_input_is_refused_before_any_move(
    run_engine: RunEngine, machine: Machine, plan: str, kwargs: dict[str, Any], message: str
) -> None:
    """An RF step beyond the RF limits (|dp| 2e-3 needs 210 kHz on the small ring, which
    allows 20 kHz), fewer than 5 points, an unknown knob, a NaN target, a target the
    sextupoles cannot reach within their limits, a target further than max_change: refused
    with a clear message, nothing moved."""
    assert machine.tune is not None and machine.rf is not None
    families = [machine.sextupoles, machine.rf]
    before = hardware_setpoints(families)
    if plan == "measure":
        built = measure_chromaticity(machine.tune, machine.rf, **kwargs)
    else:
        args: dict[str, Any] = {"target": [1.0, 1.0], **kwargs}
        built = correct_chromaticity(machine.tune, machine.rf, machine.sextupoles, **args)
    with pytest.raises(ValueError, match=message):
        run_engine(built)
    assert_same_setpoints(hardware_setpoints(families), before)
