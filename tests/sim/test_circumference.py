"""The twin's circumference error: the true ring is longer than its lattice, so the design RF
frequency no longer centres the beam energy; the truth says which frequency does."""

import at
import numpy as np
import pytest
from at.constants import clight

from accplans.config import MachineDescription, load_description
from accplans.sim import Twin, TwinProcess


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


@pytest.mark.parametrize("dl", [100e-6, -100e-6])
def test_a_longer_ring_lowers_the_energy_and_the_centred_frequency_undoes_it(
    small: MachineDescription, dl: float
) -> None:
    """Seed-2 errors: the centred frequency is ``h c / (L0 + dl)`` (``L0`` the orbit length at
    dp = 0 with these errors), the energy offset at the design frequency is the first-order
    ``(h c / f - L0 - dl) / (alpha_c L0)``, and at the centred frequency it is zero."""
    twin = Twin(small, seed=2, noise=False)
    centred0 = twin.centred_rf_frequency()
    twin.set_circumference_error(dl)
    centred = twin.centred_rf_frequency()
    h = int(twin.ring.harmonic_number)
    length0 = h * clight / centred0  # the orbit length at dp = 0 (true ring + orbit)
    expected = h * clight / (length0 + dl)
    assert centred == pytest.approx(expected, rel=1e-12)
    # at the design frequency the energy is off by about -dl / (alpha_c C), sign included
    offset = twin.energy_offset()
    alpha_c = at.get_mcf(twin.ring)
    assert np.sign(offset) == -np.sign(dl)
    design_length = h * clight / twin.design_rf_frequency
    first_order = (design_length - length0 - dl) / (alpha_c * length0)
    assert offset == pytest.approx(first_order, rel=0.01)
    twin.set_rf(centred)
    assert abs(twin.energy_offset()) < 1e-12
    truth = twin.truth()
    assert truth.meta["circumference_error_m"] == dl
    assert truth.meta["centred_rf_frequency_hz"] == pytest.approx(centred, abs=1e-6)
    # the exported dct gives the orbit the twin serves
    _, orbit = at.find_orbit4(truth.ring, dct=truth.dct_m, refpts=truth.bpm_elements)
    frame = twin.compute()
    assert np.allclose(frame.beam_m, orbit[:, (0, 2)], atol=1e-12)
    twin.reset(2)
    assert twin.circumference_error_m == 0.0


def test_absurd_circumference_errors_are_refused(small: MachineDescription) -> None:
    twin = Twin(small, seed=2, noise=False)
    for bad in (float("nan"), 1.0):
        with pytest.raises(ValueError, match="circumference error"):
            twin.set_circumference_error(bad)


def test_the_control_reaches_the_twin_process(fresh_small_twin: TwinProcess, tmp_path) -> None:
    """``TwinControl.set_circumference_error`` over EPICS; a reset puts it back to 0."""
    fresh_small_twin.control.set_circumference_error(100e-6)
    truth = fresh_small_twin.control.export_truth(tmp_path / "a")
    assert truth.meta["circumference_error_m"] == pytest.approx(100e-6, rel=1e-9)
    assert truth.meta["energy_offset"] < 0
    assert truth.meta["centred_rf_frequency_hz"] < truth.rf_frequency_hz
    fresh_small_twin.control.reset(fresh_small_twin.control.seed)
    truth = fresh_small_twin.control.export_truth(tmp_path / "b")
    assert truth.meta["circumference_error_m"] == 0.0
