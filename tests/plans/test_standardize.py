"""standardize_magnets on a twin whose quadrupoles have hysteresis: truth against the devices."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop

from accplans.config import MachineDescription, load_description
from accplans.data import BackgroundTiledWriter
from accplans.devices import Machine, MagnetFamily
from accplans.plans import set_family_hardware, standardize_magnets
from accplans.plans.standardize import standardize_cycle
from accplans.sim import TwinPorts, TwinProcess, run_twin
from tests.plans.helpers import (
    connect_to,
    drop_ca_channels,
    hardware_setpoints,
    primary_events,
    renamed_description,
    run_plan,
    written_run,
)

WIDTH = 0.5  # A, backlash of every quadrupole
STEP = 1.0  # A, every quadrupole is raised by this: approached from below


def _hysteretic(directory: Path) -> Path:
    """The small ring with a WIDTH backlash on the quadrupoles, as YAML, under its own prefix."""
    data = load_description("small").model_dump(mode="json")
    for dev in data["devices"]:
        if dev["kind"] == "quadrupole":
            dev["calibration"]["hysteresis"] = {"width": WIDTH}
    return renamed_description(MachineDescription.model_validate(data), "H", directory)


@pytest.fixture
def hysteretic_twin(
    run_engine: RunEngine, twin_ports: TwinPorts, tmp_path: Path
) -> Iterator[tuple[TwinProcess, Machine]]:
    """A perfect, noiseless twin with hysteretic quadrupoles, and the machine connected to it."""
    path = _hysteretic(tmp_path)
    description = load_description(path)
    with run_twin(path, errors=False, noise=False, ports=twin_ports) as twin:
        yield twin, connect_to(twin, description)
        drop_ca_channels()


def _truth_vs_devices(
    twin: TwinProcess, quads: MagnetFamily, directory: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(true K1 of each quadrupole from the exported truth, K1 the devices report, arrays)."""
    truth = twin.control.export_truth(directory)
    true_k1 = np.array([truth.ring[s.elements[0]].PolynomB[1] for s in quads.specs])
    reported = call_in_bluesky_event_loop(quads.strengths())
    names = list(truth.arrays["magnet_names"])
    rows = [names.index(n) for n in quads.names]
    arrays = {k: np.asarray(v)[rows] for k, v in truth.arrays.items() if k.startswith("magnet_")}
    return true_k1, np.asarray(reported, float), arrays


def test_standardization_removes_the_branch_error(
    hysteretic_twin: tuple[TwinProcess, Machine],
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    tmp_path: Path,
) -> None:
    """Quadrupoles raised by 1 A sit on the ascending branch: the beam sees the calibration at
    ``I - w``, not what the devices report. After standardize_magnets they agree to 1e-9."""
    twin, machine = hysteretic_twin
    quads = machine.quadrupoles
    start = hardware_setpoints([quads])[quads.name]
    target = start + STEP
    run_engine(set_family_hardware(quads, target))
    true_k1, reported, arrays = _truth_vs_devices(twin, quads, tmp_path / "before")
    np.testing.assert_array_equal(arrays["magnet_hardware"], target)
    np.testing.assert_allclose(arrays["magnet_effective_hardware"], target - WIDTH, atol=1e-12)
    cals = [s.calibration for s in quads.specs if s.calibration is not None]
    branch = np.array(
        [c.to_strength(h - WIDTH) - c.to_strength(h) for c, h in zip(cals, target, strict=True)]
    )
    error = true_k1 - reported
    print(
        f"\nwithout standardization: |K1 error| {np.min(np.abs(error)):.3e} .. "
        f"{np.max(np.abs(error)):.3e} m^-2 (relative {np.max(np.abs(error / reported)):.2e})"
    )
    assert np.all(np.abs(error) > 1e-3 * np.abs(reported))  # a real strength error
    np.testing.assert_allclose(error, branch, rtol=1e-9, atol=1e-15)

    result = run_plan(run_engine, standardize_magnets(quads, cycles=2))
    assert result.exit_status == "success"
    after = hardware_setpoints([quads])[quads.name]
    np.testing.assert_array_equal(after, target)  # back at the setpoints, exactly
    true_k1, reported, arrays = _truth_vs_devices(twin, quads, tmp_path / "after")
    np.testing.assert_allclose(arrays["magnet_effective_hardware"], target, rtol=0, atol=1e-12)
    relative = np.max(np.abs(true_k1 - reported) / np.abs(reported))
    print(f"after standardize_magnets: max relative K1 error {relative:.2e}")
    assert relative <= 1e-9
    # one event per step: max, min, max, min, max, setpoint; the recorded cycle is the plan's
    run = written_run(client, writer, result.run_start_uids[0])
    assert primary_events(run) == 6
    recorded = np.asarray(run["primary"].read()[f"{quads.name}-setpoint"])
    limits = [s.limits for s in quads.specs if s.limits is not None]
    low, high = (np.array([lim[i] for lim in limits]) for i in (0, 1))
    expected = [t for _, t in standardize_cycle(low, high, target, 2)]
    np.testing.assert_array_equal(recorded, np.array(expected))


def test_bad_input_is_refused_before_anything_moves(
    hysteretic_twin: tuple[TwinProcess, Machine], run_engine: RunEngine
) -> None:
    _, machine = hysteretic_twin
    quads = machine.quadrupoles
    start = hardware_setpoints([quads])[quads.name]
    assert machine.rf is not None
    for plan, message in [
        (standardize_magnets(quads, cycles=0), "cycles must be an integer >= 1"),
        (standardize_magnets(machine.rf), "RF is not a magnet family"),
        (standardize_magnets(), "at least one magnet family"),
        (standardize_magnets(quads, quads), "given twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_engine(plan)
    np.testing.assert_array_equal(hardware_setpoints([quads])[quads.name], start)


def test_the_cycle_ends_from_above() -> None:
    low, high, sp = np.array([-1.0, 0.0]), np.array([2.0, 5.0]), np.array([0.5, 4.0])
    steps = standardize_cycle(low, high, sp, 3)
    assert [label for label, _ in steps] == [
        "max 1", "min 1", "max 2", "min 2", "max 3", "min 3", "max", "setpoint",
    ]  # fmt: skip
    np.testing.assert_array_equal(steps[-2][1], high)
    np.testing.assert_array_equal(steps[-1][1], sp)
