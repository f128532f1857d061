"""The twin's true magnets: backlash hysteresis and Brho-scaled calibrations, against its truth."""

from typing import Any

import numpy as np
import pytest

from accplans.config import MachineDescription, load_description, magnetic_rigidity
from accplans.sim import ErrorModel, Twin

WIDTH = 0.5  # A


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


def with_hysteresis(description: MachineDescription, width: float = WIDTH) -> MachineDescription:
    """``description`` with a backlash of ``width`` (A) on every quadrupole."""
    data = description.model_dump(mode="json")
    for dev in data["devices"]:
        if dev["kind"] == "quadrupole":
            dev["calibration"]["hysteresis"] = {"width": width}
    return MachineDescription.model_validate(data)


@pytest.fixture(scope="module")
def hysteretic(small: MachineDescription) -> MachineDescription:
    return with_hysteresis(small)


def _quads(twin: Twin) -> np.ndarray:
    return np.array([i for i, d in enumerate(twin.magnets) if d.kind == "quadrupole"])


def true_k1(twin: Twin) -> np.ndarray:
    """K1 (m^-2) of each quadrupole device's element in the exported truth lattice."""
    truth = twin.truth()
    return np.array(
        [truth.ring[twin.magnets[i].elements[0]].PolynomB[1] for i in _quads(twin)], dtype=float
    )


def calibrated_k1(twin: Twin, hardware: np.ndarray) -> np.ndarray:
    """K1 the calibration (descending branch) gives the quadrupoles at ``hardware`` (A)."""
    out = []
    for i, h in zip(_quads(twin), hardware, strict=True):
        cal = twin.magnets[i].calibration
        assert cal is not None
        out.append(float(cal.to_strength(h)))
    return np.array(out)


def _perfect(description: MachineDescription) -> Twin:
    return Twin(description, errors=ErrorModel.none(), seed=0, noise=False)


def test_after_a_reset_the_state_is_ascending_and_the_truth_shows_it(
    hysteretic: MachineDescription,
):
    twin = _perfect(hysteretic)
    q = _quads(twin)
    h = twin.hardware[q]
    truth = twin.truth()
    # unknown state after a power cut, taken as ascending: the curve at h - w
    np.testing.assert_allclose(true_k1(twin), calibrated_k1(twin, h - WIDTH), rtol=1e-12)
    error = calibrated_k1(twin, h) - true_k1(twin)
    assert np.all(np.abs(error) > 1e-3 * np.abs(calibrated_k1(twin, h)))  # ~0.7 % per A
    np.testing.assert_allclose(truth.arrays["magnet_effective_hardware"][q], h - WIDTH)
    np.testing.assert_array_equal(truth.arrays["magnet_hysteresis_width"][q], WIDTH)
    others = np.setdiff1d(np.arange(len(twin.magnets)), q)
    np.testing.assert_array_equal(truth.arrays["magnet_hysteresis_width"][others], 0.0)
    np.testing.assert_array_equal(
        truth.arrays["magnet_effective_hardware"][others], twin.hardware[others]
    )


def test_the_branch_follows_the_current_history(hysteretic: MachineDescription):
    twin = _perfect(hysteretic)
    q = _quads(twin)
    h0 = twin.hardware.copy()

    def go(delta_a: float) -> np.ndarray:
        h = h0.copy()
        h[q] += delta_a
        twin.set_magnets(h)
        return h[q]

    down = go(-1.0)  # approached from above: exactly the calibration
    np.testing.assert_allclose(true_k1(twin), calibrated_k1(twin, down), rtol=1e-12)
    np.testing.assert_allclose(twin.effective_hardware[q], down, rtol=0, atol=1e-12)
    go(-1.0 + WIDTH / 4)  # a small step up stays inside the backlash: no change at all
    np.testing.assert_allclose(true_k1(twin), calibrated_k1(twin, down), rtol=1e-12)
    up = go(+1.0)  # approached from below: the curve at h - w
    np.testing.assert_allclose(true_k1(twin), calibrated_k1(twin, up - WIDTH), rtol=1e-12)
    # cycled to +5 A then down to the same current: back on the calibrated branch
    go(+5.0)
    again = go(+1.0)
    np.testing.assert_allclose(true_k1(twin), calibrated_k1(twin, again), rtol=1e-12)


def test_magnets_without_hysteresis_are_unchanged(small: MachineDescription):
    twin = _perfect(small)
    np.testing.assert_array_equal(twin.effective_hardware, twin.hardware)
    np.testing.assert_allclose(true_k1(twin), calibrated_k1(twin, twin.hardware[_quads(twin)]))


def _integrated(description: MachineDescription, energy_ev: float) -> MachineDescription:
    """The quadrupoles calibrated in integrated gradient (T) with the lattice's lengths."""
    twin = _perfect(description)
    ring = twin.ring
    brho = magnetic_rigidity(float(ring.energy))
    data: dict[str, Any] = description.model_dump(mode="json")
    data["machine"]["energy_ev"] = energy_ev
    for dev in data["devices"]:
        if dev["kind"] != "quadrupole":
            continue
        length = float(ring[dev["elements"][0]].Length)
        cal = dev["calibration"]
        cal["coefficients"] = [c * brho * length for c in cal["coefficients"]]
        cal.update(quantity="integrated_field", magnetic_length=length)
    return MachineDescription.model_validate(data)


def test_an_integrated_field_calibration_gives_the_same_machine(small: MachineDescription):
    """int G dl = Brho L K1: the same currents give the same true strengths."""
    energy = float(_perfect(small).ring.energy)
    described = _integrated(small, energy)
    q = np.array([d.kind == "quadrupole" for d in described.devices if d.kind in _KINDS])
    cal = next(d.calibration for d in described.devices if d.kind == "quadrupole")
    assert cal is not None and cal.brho == pytest.approx(magnetic_rigidity(energy), rel=1e-15)
    reference, twin = _perfect(small), _perfect(described)
    np.testing.assert_allclose(twin.design_hardware, reference.design_hardware, rtol=1e-9)
    h = reference.hardware
    h[q] *= 0.98
    reference.set_magnets(h)
    twin.set_magnets(h)
    np.testing.assert_allclose(true_k1(twin), true_k1(reference), rtol=1e-12)


def test_a_description_energy_other_than_the_lattice_energy_is_refused(
    small: MachineDescription,
):
    energy = float(_perfect(small).ring.energy)
    with pytest.raises(ValueError, match="differs from the lattice's energy"):
        _perfect(_integrated(small, energy * 1.01))


_KINDS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")
