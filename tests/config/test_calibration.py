"""Calibrations: round trips of every invertible model, tables, Brho scaling, validation."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.constants as sc
from pydantic import ValidationError

from accplans.config import (
    DescriptionError,
    DeviceSpec,
    LinearCalibration,
    MachineDescription,
    PolynomialCalibration,
    TableCalibration,
    dump_description,
    load_description,
    magnetic_rigidity,
)
from accplans.devices import LimitError, Quadrupole

RTOL = 1e-9


def _tables(rng: np.random.Generator, n: int) -> list[TableCalibration]:
    """Random monotonic tables (rising and falling, pchip and linear, uneven spacing)."""
    out = []
    for k in range(n):
        size = int(rng.integers(2, 25))
        h = np.cumsum(rng.uniform(0.5, 20.0, size)) - rng.uniform(0, 100)
        # slopes varying 5x between points, as a saturating magnet's (a nearly flat table is
        # ill-conditioned: no inverse is accurate where d strength / d current -> 0)
        v = np.cumsum(rng.uniform(0.2, 1.0, size)) * rng.choice([-1.0, 1.0])
        v *= 10 ** rng.uniform(-4, 2)
        out.append(
            TableCalibration(
                hardware=h.tolist(),
                values=v.tolist(),
                interpolation="pchip" if k % 2 else "linear",
            )
        )
    return out


def _models(rng: np.random.Generator) -> list[Any]:
    models: list[Any] = [
        LinearCalibration(gain=g, offset=o)
        for g, o in zip(rng.normal(0, 1e-2, 10), rng.normal(0, 1e-3, 10), strict=True)
    ]
    models += [
        PolynomialCalibration(
            coefficients=[0.0, 0.02125, 0.0, -1.0625e-7], valid_range=(-100, 100)
        ),
        PolynomialCalibration(coefficients=[1e-3, -0.5, 2e-4, 1e-6], valid_range=(-50, 80)),
    ]
    models += _tables(rng, 20)
    models += [
        LinearCalibration(gain=0.1, quantity="integrated_field", magnetic_length=0.25, brho=5.0034),
        TableCalibration(
            hardware=[0, 20, 50, 100],
            values=[0.0, 2.0, 4.8, 8.9],
            quantity="integrated_field",
            magnetic_length=0.3,
            brho=20.0138,
        ),
    ]
    return models


def _hardware_range(model: Any) -> tuple[float, float]:
    if isinstance(model, TableCalibration):
        return model.hardware_range
    if isinstance(model, PolynomialCalibration):
        return model.valid_range
    return (-200.0, 200.0)


def test_every_invertible_model_round_trips_to_1e_9():
    rng = np.random.default_rng(42)
    worst = 0.0
    for model in _models(rng):
        lo, hi = _hardware_range(model)
        h = np.concatenate([rng.uniform(lo, hi, 500), [lo, hi], np.linspace(lo, hi, 101)])
        s = model.to_strength(h)
        assert np.all(np.isfinite(s)), model
        back = model.to_hardware(s)
        scale = np.maximum(np.abs(h), 1e-3 * (hi - lo))
        err = np.max(np.abs(back - h) / scale)
        worst = max(worst, err)
        assert err <= RTOL, (model, err)
        # strength -> hardware -> strength
        s2 = model.to_strength(model.to_hardware(s))
        assert np.max(np.abs(s2 - s) / np.maximum(np.abs(s), 1e-3 * np.ptp(s))) <= RTOL
        # scalars too
        assert float(model.to_hardware(float(s[0]))) == pytest.approx(h[0], rel=RTOL, abs=1e-12)
    print(f"\nworst round-trip error: {worst:.2e} relative")


def test_a_table_interpolates_through_its_points_and_refuses_values_outside_it():
    for interpolation in ("pchip", "linear"):
        t = TableCalibration(
            hardware=[0, 10, 20, 50, 100],
            values=[0, 0.1, 0.21, 0.5, 0.9],
            interpolation=interpolation,
        )
        np.testing.assert_allclose(t.to_strength(t.hardware), t.values, rtol=1e-15, atol=1e-16)
        np.testing.assert_allclose(t.to_hardware(t.values), t.hardware, rtol=1e-12, atol=1e-12)
        assert np.isnan(t.to_strength(100.5)) and np.isnan(t.to_strength(-1.0))
        assert np.isnan(t.to_hardware(0.95)) and np.isnan(t.to_hardware(-0.01))
    # pchip preserves monotonicity between points (no overshoot)
    t = TableCalibration(hardware=[0, 1, 2, 3], values=[0, 0.001, 1.0, 1.001])
    s = t.to_strength(np.linspace(0, 3, 3001))
    assert np.all(np.diff(s) > 0)


def _quad_spec(cal: Any, limits: tuple[float, float] = (0.0, 100.0)) -> DeviceSpec:
    return DeviceSpec(
        name="QT",
        kind="quadrupole",
        section="ring",
        elements=[3],
        field="PolynomB[1]",
        pvs={"setpoint": "T:QT:SP", "readback": "T:QT:RB"},
        unit="A",
        calibration=cal,
        limits=limits,
        tolerance=1e-4,
    )


def test_a_device_refuses_a_strength_beyond_its_table_with_a_clear_error():
    t = TableCalibration(hardware=[0, 50, 100], values=[0, 1.0, 1.9])
    quad = Quadrupole(_quad_spec(t), name="QT")
    assert quad.hardware_for(1.0) == pytest.approx(50.0, rel=1e-12)
    with pytest.raises(LimitError, match=r"QT: requested 2 m\^-2 cannot be reached"):
        quad.hardware_for(2.0)
    with pytest.raises(ValidationError, match="beyond its calibration table"):
        _quad_spec(t, limits=(0.0, 120.0))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"hardware": [0, 1, 1], "values": [0, 1, 2]}, "strictly increasing"),
        ({"hardware": [0, 1, 2], "values": [0, 1, 0.5]}, "strictly monotonic"),
        ({"hardware": [0, 1, 2], "values": [0, 1]}, "one per hardware value"),
        ({"hardware": [0, 1], "values": [0, float("nan")]}, "finite"),
    ],
)
def test_a_bad_table_is_refused(table: dict[str, Any], message: str):
    with pytest.raises(ValidationError, match=message):
        TableCalibration(**table)


def test_brho_is_p_over_e():
    """Brho = gamma beta m c / e, from SI constants (independent of the eV route)."""
    for energy_ev in (1.5e9, 6e9, 1e6):
        gamma = energy_ev * sc.e / (sc.m_e * sc.c**2)
        beta = np.sqrt(1.0 - 1.0 / gamma**2)
        expected = gamma * beta * sc.m_e * sc.c / sc.e
        assert magnetic_rigidity(energy_ev) == pytest.approx(expected, rel=1e-9)
    assert magnetic_rigidity(6e9) == pytest.approx(20.0138, rel=1e-5)  # EBS, 6 GeV
    with pytest.raises(ValueError, match="above the rest energy"):
        magnetic_rigidity(1e5)


def _integrated_small(energy: float | None, **cal: Any) -> dict[str, Any]:
    data = load_description("small").model_dump(mode="json")
    data["machine"]["energy_ev"] = energy
    for dev in data["devices"]:
        if dev["kind"] == "quadrupole":
            dev["calibration"].update(quantity="integrated_field", magnetic_length=0.25, **cal)
    return data


def test_the_description_energy_scales_integrated_field_calibrations(tmp_path: Path):
    desc = MachineDescription.model_validate(_integrated_small(1.5e9))
    quad = desc.family_devices("quadrupoles")[0]
    cal = quad.calibration
    assert cal is not None and cal.brho == pytest.approx(magnetic_rigidity(1.5e9), rel=1e-15)
    plain = load_description("small").family_devices("quadrupoles")[0].calibration
    assert plain is not None
    h = np.linspace(-100, 100, 21)
    # K1 = int G dl / (Brho L)
    brho = magnetic_rigidity(1.5e9)
    np.testing.assert_allclose(cal.to_strength(h), plain.to_strength(h) / (brho * 0.25), rtol=1e-14)
    # saved and loaded back: the same description (brho is written, and agrees)
    path = tmp_path / "integrated.yaml"
    dump_description(desc, path)
    assert load_description(path, check_lattice=False) == desc


def test_integrated_field_without_energy_or_with_a_wrong_brho_is_refused():
    with pytest.raises(ValidationError, match=r"needs machine\.energy_ev"):
        MachineDescription.model_validate(_integrated_small(None))
    with pytest.raises(ValidationError, match=r"disagrees with machine\.energy_ev"):
        MachineDescription.model_validate(_integrated_small(1.5e9, brho=4.0))
    data = load_description("small").model_dump(mode="json")
    data["machine"]["energy_ev"] = 1.5e9
    hcm = next(d for d in data["devices"] if d["kind"] == "corrector")
    hcm["calibration"].update(quantity="integrated_field", magnetic_length=0.1)
    with pytest.raises(ValidationError, match="a kick is int B dl / Brho"):
        MachineDescription.model_validate(data)
    quad = next(d for d in data["devices"] if d["kind"] == "quadrupole")
    quad["calibration"].update(quantity="integrated_field")
    hcm["calibration"].update(magnetic_length=None)
    with pytest.raises(ValidationError, match="needs 'magnetic_length'"):
        MachineDescription.model_validate(data)


def test_a_calibration_without_brho_cannot_convert():
    cal = LinearCalibration(gain=1.0, quantity="integrated_field")
    with pytest.raises(ValueError, match="needs Brho"):
        cal.to_strength(1.0)


def test_hysteresis_must_be_narrower_than_the_limits(tmp_path: Path):
    data = load_description("small").model_dump(mode="json")
    quad = next(d for d in data["devices"] if d["kind"] == "quadrupole")
    quad["calibration"]["hysteresis"] = {"width": 250.0}
    path = tmp_path / "wide.yaml"
    import yaml

    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError, match="hysteresis width 250 A is not smaller"):
        load_description(path, check_lattice=False)
    quad["calibration"]["hysteresis"] = {"width": -1.0}
    with pytest.raises(ValidationError, match="greater than 0"):
        MachineDescription.model_validate(data)
