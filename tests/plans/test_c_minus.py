"""measure_c_minus and correct_c_minus on the small-ring twin, against its true lattice.

As in tests/plans/test_coupling.py, a known coupling is added with two skew windings on top of
the seeded errors (quadrupole rolls, sextupole offsets), which the model does not know.

Two truths, both pyAT on the exported true lattice:

- ``scan_c_minus`` (``scan_truth`` here): the smallest eigen-tune distance of the true
  lattice along the plan's own scan (its quadrupole knob direction): what a tune scan
  measures;
- ``true_c_minus``: the closest tune approach by an optics-transparent trombone at the working
  point (the coupling benchmarks' figure).

They differ when the tunes are far from the difference resonance: the small ring's are 0.25
apart, and the quadrupole knobs spread the tune change over its eight cells while the trombone
lumps it at one point, so the skews' phases at the crossing differ. With the injected pair
SQ002/SQ005 the scan sees 4.4e-4 where the trombone sees 9.7e-4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop

from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine
from accplans.model import OnlineModel, c_minus_response, model_c_minus
from accplans.physics import c_minus_knob_patterns, fit_c_minus_knob
from accplans.plans import correct_c_minus, measure_c_minus
from accplans.sim import TwinProcess, scan_c_minus, true_c_minus
from tests.plans.helpers import connect_to, inject_skews, run_plan, written_run


def _true_c_minus(twin: TwinProcess, tmp_path: Path, tag: str) -> float:
    truth = twin.control.export_truth(tmp_path / tag)
    return true_c_minus(truth.ring, truth.dct_m)


def scan_truth(twin: TwinProcess, description: MachineDescription, path: Path, found: Any) -> float:
    """The true lattice's smallest eigen-tune distance along the scan of result ``found``."""
    truth = twin.control.export_truth(path)
    per_unit: dict[str, float] = {}
    for knob, step in zip(found["knob_names"], found["direction"], strict=True):
        for name, c in description.knobs[str(knob)].coefficients.items():
            per_unit[name] = per_unit.get(name, 0.0) + float(step) * c
    return scan_c_minus(truth.ring, truth.dct_m, description, per_unit, float(found["crossing"]))


def _setpoints(machine: Machine) -> dict[str, np.ndarray]:
    assert machine.skew is not None
    return {
        fam.name: np.asarray(call_in_bluesky_event_loop(fam.hardware_setpoints()))
        for fam in (machine.quadrupoles, machine.skew)
    }


# -- the model's complex C- ---------------------------------------------------------------------
@pytest.mark.parametrize("machine_name", ["small", "ebs"])
def test_complex_c_minus_response_predicts_the_model_closest_tune_approach(
    machine_name: str,
) -> None:
    """EBS: |sum r_s a_s| (Guignard, c_minus_response) is model_c_minus of random skew
    patterns within 20 % (5-14 % seen). Both rings: each knob pattern alone makes the model's
    |C-| its unit within 15 %.

    The model's |C-| is the trombone's (a lumped tune change at the working point); the
    Guignard sum's phase term ``-2 pi D s / C`` is that of a distributed one, as a
    quadrupole-knob scan makes. On the small ring (D = 0.25, eight identical cells, one skew
    per cell) the sum puts every skew at one phase and misses most of the trombone's |C-| of
    a random pattern; the plan minimises the measured |C-| and needs the knobs only roughly
    orthogonal."""
    from accplans.config import load_description

    description: MachineDescription = load_description(machine_name)
    model = OnlineModel(description)
    skews = [n for n in description.device_map if description.device(n).kind == "skew_quadrupole"]
    response = c_minus_response(model, skews)
    knobs = c_minus_knob_patterns(response)
    # EBS: two knobs; the small ring's skews sit at one phase of the resonance: one knob
    assert knobs.patterns.shape == (len(skews), 1 if machine_name == "small" else 2)
    rng = np.random.default_rng(3)
    scale = 2e-3 if machine_name == "small" else 5e-4
    for _ in range(3 if machine_name == "ebs" else 0):
        pattern = rng.normal(0.0, scale, len(skews))
        with model._perturbed(dict(zip(skews, pattern, strict=True))):
            c0 = model_c_minus(model)
        predicted = complex(response @ pattern)
        assert abs(predicted) == pytest.approx(c0, rel=0.2)
        print(f"\n{machine_name}: |C-| {c0:.3e}, predicted {abs(predicted):.3e}")
    for j, e in enumerate(knobs.directions):
        with model._perturbed(dict(zip(skews, 1e-3 * knobs.patterns[:, j], strict=True))):
            assert model_c_minus(model) == pytest.approx(1e-3 * abs(e), rel=0.15)


def test_fit_c_minus_knob_finds_the_minimum_of_the_parabola() -> None:
    c0 = 3e-4 - 2e-4j
    k = np.array([-4e-4, 0.0, 4e-4])
    fit = fit_c_minus_knob(k, np.abs(c0 + k))
    assert fit.best == pytest.approx(-3e-4, rel=1e-9)
    assert fit.c_across == pytest.approx(2e-4, rel=1e-9)
    with pytest.raises(ValueError, match="distinct"):
        fit_c_minus_knob(np.zeros(3), np.ones(3))


# -- the plans on the twin ----------------------------------------------------------------------
@pytest.mark.twin(seed=1, noise=True)
def test_measure_c_minus_is_the_true_closest_tune_approach(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """The tune scan's |C-| is the true lattice's along the same scan within 10 % (0.1-2 %
    in three runs, the fit's std 0.8 %: the bound leaves room for the model-to-twin
    difference of the knob direction); the quadrupoles are back exactly."""
    assert machine.tune is not None and machine.skew is not None
    inject_skews(fresh_small_twin, machine)
    truth = _true_c_minus(fresh_small_twin, tmp_path, "truth")
    before = _setpoints(machine)
    result = run_plan(run_engine, measure_c_minus(machine.tune, machine.quadrupoles))
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    found = load_result(client, uid, "c_minus")
    along = scan_truth(fresh_small_twin, machine.description, tmp_path / "scan", found)
    print(
        f"\n|C-| measured {found['c_minus']:.4e} +- {found['std']:.1e}, true along the scan "
        f"{along:.4e} (ratio {found['c_minus'] / along:.3f}), trombone {truth:.4e}, crossing "
        f"{found['crossing']:+.5f}, {run['primary'].read()['point-shift'].size} points"
    )
    assert found["c_minus"] == pytest.approx(along, rel=0.1)
    assert 0 < found["std"] < 0.05 * found["c_minus"]
    after = _setpoints(machine)
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values)


@pytest.mark.twin(seed=1, noise=True)
def test_correct_c_minus_reduces_the_true_c_minus(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """The one knob of the small ring (its eight skews act at one phase of the resonance)
    cancels the coupling the scan sees: the true |C-| along the scan falls by 4x (15x in
    two runs: 4.4e-4 -> 2.9e-5); the trombone's |C-| is printed (the knob cannot reach most
    of it: see the module docstring); the skews stay within their limits; the quadrupoles
    are back exactly."""
    assert machine.tune is not None and machine.skew is not None
    inject_skews(fresh_small_twin, machine)
    c0 = _true_c_minus(fresh_small_twin, tmp_path, "before")
    before = _setpoints(machine)
    first = run_plan(run_engine, measure_c_minus(machine.tune, machine.quadrupoles))
    written_run(client, writer, first.run_start_uids[0])
    scan0 = scan_truth(
        fresh_small_twin,
        machine.description,
        tmp_path / "scan0",
        load_result(client, first.run_start_uids[0], "c_minus"),
    )
    result = run_plan(run_engine, correct_c_minus(machine.tune, machine.quadrupoles, machine.skew))
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    c1 = _true_c_minus(fresh_small_twin, tmp_path, "after")
    found = load_result(client, uid, "c_minus")
    scan1 = scan_truth(fresh_small_twin, machine.description, tmp_path / "scan1", found)
    print(
        f"\ntrue |C-| along the scan {scan0:.3e} -> {scan1:.3e} ({scan0 / scan1:.1f}x), "
        f"trombone {c0:.3e} -> {c1:.3e}; measured "
        f"{found['c_minus_before']:.3e} -> {found['c_minus']:.3e}; knobs "
        f"{found['skew_knob_1']:.3e}, {found['skew_knob_2']}"
    )
    assert scan1 < 0.25 * scan0
    after = _setpoints(machine)
    np.testing.assert_array_equal(after[machine.quadrupoles.name], before[machine.quadrupoles.name])
    machine.skew.check_strengths(call_in_bluesky_event_loop(machine.skew.strengths()))
    assert np.any(after[machine.skew.name] != before[machine.skew.name])


@pytest.mark.twin(seed=1, noise=True)
def test_bad_inputs_are_refused_before_any_move(
    run_engine: RunEngine, machine: Machine, fresh_small_twin: TwinProcess
) -> None:
    """An unknown knob, a scan beyond max_shift and a scan out of a quadrupole's limits are
    refused, naming the reason, with nothing moved."""
    assert machine.tune is not None and machine.skew is not None
    before = _setpoints(machine)
    with pytest.raises(ValueError, match="unknown knob"):
        run_plan(run_engine, measure_c_minus(machine.tune, machine.quadrupoles, knobs=["QX"]))
    # the small ring's tunes are 0.25 apart: each must move by 0.125
    with pytest.raises(ValueError, match="too far apart"):
        run_plan(run_engine, measure_c_minus(machine.tune, machine.quadrupoles, max_shift=0.1))
    # the same machine with Q001 (a QF at 82.8 A) limited to 84 A: the scan's QF increase
    # (~1 A at the crossing) leaves it
    data = machine.description.model_dump(mode="json")
    (q001,) = [d for d in data["devices"] if d["name"] == "Q001"]
    q001["limits"] = [-100.0, 84.0]
    tight = connect_to(fresh_small_twin, MachineDescription.model_validate(data))
    assert tight.tune is not None and tight.skew is not None
    with pytest.raises(ValueError, match="leaves limits") as refused:
        run_plan(run_engine, correct_c_minus(tight.tune, tight.quadrupoles, tight.skew))
    assert "Q001" in str(refused.value)
    after = _setpoints(machine)
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values)
