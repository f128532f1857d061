"""orbit_bump on the twin: amplitude and closure against the twin's true closed orbit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import at
import numpy as np
import pytest
from bluesky import RunEngine

from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine
from accplans.physics import BumpError
from accplans.plans import orbit_bump, remove_bump
from accplans.sim import TwinProcess
from tests.plans.helpers import assert_same_setpoints, machine_setpoints, run_plan, written_run

POINT = "BPM005"


def _true_orbit(twin: TwinProcess, directory: Path, point: int) -> tuple[np.ndarray, np.ndarray]:
    """True closed orbit (x, y) at the BPMs (nbpm, 2) and at element ``point`` (2,) [m]."""
    truth = twin.control.export_truth(directory)
    refs = np.r_[truth.bpm_elements, point]
    uniq, where = np.unique(refs, return_inverse=True)  # pyAT wants ascending refpts
    _, orbit = at.find_orbit4(truth.ring, dct=truth.dct_m, refpts=uniq)
    orbit = orbit[where]
    return orbit[:-1][:, (0, 2)], orbit[-1, (0, 2)]


def _bump(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    twin: TwinProcess,
    tmp_path: Path,
    **options: Any,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """Run orbit_bump; its result, and the true orbit change at the BPMs and at the point."""
    point = int(machine.description.device(POINT).elements[0]) if "at" not in options else None
    options.setdefault("at", POINT)
    element = point if point is not None else int(options["at"])
    bpms0, point0 = _true_orbit(twin, tmp_path / "before", element)
    result = run_plan(
        run_engine,
        orbit_bump(machine.bpms, machine.hcorr, machine.vcorr, machine.rf, **options),
    )
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    bump = load_result(client, uid, "bump")
    bpms1, point1 = _true_orbit(twin, tmp_path / "after", element)
    return bump, bpms1 - bpms0, point1 - point0


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


@pytest.mark.parametrize(
    ("plane", "limit"), [("y", 0.01), ("x", 0.02)], ids=["vertical", "horizontal-rf"]
)
def test_bump_at_a_bpm_has_its_amplitude_and_closes(
    plane: str,
    limit: float,
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """Seed 1 (all errors, 1 um BPM noise), 0.2 mm at BPM005 (0.3 mm needs more than the small
    ring's 0.5 mrad correctors) with the 3 nearest correctors (and
    the RF step in x), one closure iteration: the true beam moves by 0.3 mm within 2 % at the
    BPM, the BPM reads it within 2 %, and the true orbit change outside the bump is <= 1 % (y)
    or 2 % (x) rms of the amplitude; the bump stays (a correction plan)."""
    amplitude = 0.2e-3
    bump, true_bpms, true_point = _bump(
        run_engine, writer, client, machine, fresh_small_twin, tmp_path,
        plane=plane, position_m=amplitude,
    )  # fmt: skip
    p = 0 if plane == "x" else 1
    outside = ~np.asarray(bump["inside"])
    leak = _rms(true_bpms[outside, p])
    print(
        f"\n{plane}: true {true_point[p] * 1e6:.2f} um, BPM {bump['measured_position'] * 1e6:.2f}"
        f" um, true leakage {leak * 1e6:.2f} um rms, measured {bump['leakage_rms'] * 1e6:.2f} um,"
        f" kicks {np.round(bump['kicks'] * 1e6, 1)} urad, rf {bump['rf_step']:.3f} Hz"
    )
    assert len(bump["corrector_names"]) == 3
    assert true_point[p] == pytest.approx(amplitude, rel=0.02)
    assert bump["measured_position"] == pytest.approx(amplitude, rel=0.02)
    assert leak <= limit * amplitude
    assert bump["leakage_rms"] <= limit * amplitude
    if plane == "x":
        assert abs(bump["rf_step"]) > 0.0
    assert np.all(outside.sum() >= 10)


@pytest.mark.twin(noise=False)
def test_angle_and_position_bump_at_a_lattice_element(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """Position 0.2 mm and angle 50 urad at an element that is no BPM (4 nearest correctors):
    the true orbit there has both within 2 %, leakage <= 1 %."""
    element = int(machine.description.device(POINT).elements[0]) + 2
    truth = fresh_small_twin.control.export_truth(tmp_path / "t0")
    _, angles0 = at.find_orbit4(truth.ring, dct=truth.dct_m, refpts=[element])
    bump, true_bpms, true_point = _bump(
        run_engine, writer, client, machine, fresh_small_twin, tmp_path,
        at=element, plane="y", position_m=0.2e-3, angle_rad=50e-6, correctors=5,
    )  # fmt: skip
    truth = fresh_small_twin.control.export_truth(tmp_path / "t1")
    _, angles1 = at.find_orbit4(truth.ring, dct=truth.dct_m, refpts=[element])
    angle = angles1[0, 3] - angles0[0, 3]
    outside = ~np.asarray(bump["inside"])
    leak = _rms(true_bpms[outside, 1])
    print(
        f"\ny at element {element}: {true_point[1] * 1e6:.2f} um, {angle * 1e6:.2f} urad, leakage"
        f" {leak * 1e6:.3f} um"
    )
    assert len(bump["corrector_names"]) == 5
    assert bump["measured_position"] is None or np.isnan(bump["measured_position"])
    assert true_point[1] == pytest.approx(0.2e-3, rel=0.02)
    assert angle == pytest.approx(50e-6, rel=0.02)
    assert leak <= 0.01 * 0.2e-3


@pytest.mark.twin(noise=False)
def test_horizontal_bump_with_rf_is_removed_with_its_rf_step(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """remove_bump takes the kicks and the RF step back: every setpoint returns to where it
    was (to float rounding) and the true orbit too."""
    before = machine_setpoints(machine)
    bpms0, _ = _true_orbit(fresh_small_twin, tmp_path / "start", 0)
    bump, _, _ = _bump(
        run_engine, writer, client, machine, fresh_small_twin, tmp_path,
        plane="x", position_m=0.2e-3, path_length="rf",
    )  # fmt: skip
    moved = machine_setpoints(machine)
    assert moved["RF"][0] != before["RF"][0]
    assert moved["RF"][0] - before["RF"][0] == pytest.approx(bump["rf_step"], abs=1e-3)
    result = run_plan(run_engine, remove_bump(machine.hcorr, machine.vcorr, machine.rf, bump=bump))
    assert result.exit_status == "success"
    after = machine_setpoints(machine)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=0, atol=1e-6)
    bpms1, _ = _true_orbit(fresh_small_twin, tmp_path / "removed", 0)
    print(f"\nremoved: max |true orbit - start| {np.abs(bpms1 - bpms0).max() * 1e6:.4f} um")
    assert np.abs(bpms1 - bpms0).max() < 1e-8
    assert after["RF"][0] == pytest.approx(before["RF"][0], abs=1e-3)


def test_a_bump_beyond_the_limits_is_refused_before_any_move(
    run_engine: RunEngine, machine: Machine, fresh_small_twin: TwinProcess
) -> None:
    """A 30 mm bump needs kicks far beyond the corrector limits: refused, no run, no move."""
    before = machine_setpoints(machine)
    documents: list[str] = []
    token = run_engine.subscribe(lambda name, doc: documents.append(name))
    try:
        with pytest.raises(BumpError, match="beyond the limits"):
            run_plan(
                run_engine,
                orbit_bump(machine.bpms, machine.hcorr, machine.vcorr, at=POINT, position_m=30e-3),
            )
    finally:
        run_engine.unsubscribe(token)
    assert "start" not in documents
    assert_same_setpoints(machine_setpoints(machine), before)


def test_bad_inputs_are_refused_with_a_clear_error(machine: Machine) -> None:
    """No amplitude, unknown plane, path length on a vertical bump, RF path without RF."""
    args = (machine.bpms, machine.hcorr, machine.vcorr)
    with pytest.raises(ValueError, match="position_m and/or angle_rad"):
        next(orbit_bump(*args, at=POINT))
    with pytest.raises(ValueError, match="plane"):
        next(orbit_bump(*args, at=POINT, plane="z", position_m=1e-4))
    with pytest.raises(ValueError, match="horizontal bumps only"):
        next(orbit_bump(*args, at=POINT, plane="y", position_m=1e-4, path_length="row"))
    with pytest.raises(ValueError, match="amplitude_from"):
        next(orbit_bump(*args, at=POINT, position_m=1e-4, amplitude_from="tune"))
    with pytest.raises(ValueError, match="needs the rf device"):
        next(orbit_bump(*args, at=POINT, plane="x", position_m=1e-4, path_length="rf"))
