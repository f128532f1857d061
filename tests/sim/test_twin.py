"""The twin's physics without EPICS, on the small ring, against pyAT on the exported truth."""

import at
import numpy as np
import pytest
from at.constants import clight

from accplans.config import MachineDescription, load_description
from accplans.sim import BeamSettings, ErrorModel, Twin, load_truth


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


@pytest.fixture
def twin(small: MachineDescription) -> Twin:
    return Twin(small, seed=2, noise=False)


def _orbit_readings_mm(truth, ring=None, dct=None) -> np.ndarray:
    ring = truth.ring if ring is None else ring
    dct = truth.dct_m if dct is None else dct
    _, orbit = at.find_orbit4(ring, dct=dct, refpts=truth.bpm_elements)
    return truth.readings(orbit[:, (0, 2)]) * 1e3


def test_readings_are_the_true_lattice_orbit_seen_through_the_bpm_errors(twin: Twin):
    frame = twin.compute()
    assert frame.beam and frame.valid.all()
    truth = twin.truth()
    expected = _orbit_readings_mm(truth)
    np.testing.assert_allclose(frame.x_mm, expected[:, 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(frame.y_mm, expected[:, 1], rtol=0, atol=1e-6)
    # the errors are really there: BPM offsets alone are ~50 um
    assert np.std(frame.x_mm) > 0.01


def test_a_perfect_machine_at_its_design_frequency_reads_zero(small: MachineDescription):
    twin = Twin(small, errors=ErrorModel.none(), seed=0)
    frame = twin.compute()
    np.testing.assert_allclose(frame.x_mm, 0.0, atol=1e-9)
    np.testing.assert_allclose(frame.y_mm, 0.0, atol=1e-9)


def test_corrector_kick_is_calibration_times_true_calibration_error(
    twin: Twin, small: MachineDescription
):
    before = twin.compute()
    truth = twin.truth()
    name = small.families["hcorr"].devices[4]
    dev = small.device(name)
    i = twin.magnet_index[name]
    hardware = twin.hardware
    hardware[i] += 0.5  # A
    twin.set_magnets(hardware)
    after = twin.compute()
    # expected: the same kick applied by hand to the exported true lattice
    assert dev.calibration is not None
    kick = float(dev.calibration.to_strength(hardware[i])) * truth.corrector_scale(name)
    ring = truth.ring.deepcopy()
    ring[dev.elements[0]].KickAngle[0] = kick
    expected = _orbit_readings_mm(truth, ring) - _orbit_readings_mm(truth)
    np.testing.assert_allclose(after.x_mm - before.x_mm, expected[:, 0], atol=1e-6)
    np.testing.assert_allclose(after.y_mm - before.y_mm, expected[:, 1], atol=1e-6)
    assert np.max(np.abs(expected[:, 0])) > 0.05  # a visible response (mm)
    assert truth.corrector_scale(name) != 1.0


def test_rf_frequency_step_moves_the_orbit_along_the_dispersion(twin: Twin):
    before = twin.compute()
    f0 = twin.rf_frequency
    dct0 = twin.dct
    df = 200.0  # Hz
    twin.set_rf(frequency_hz=f0 + df)
    after = twin.compute()
    truth = twin.truth()
    ring = truth.ring
    # fixed frequency: the orbit length is h c / f (pyAT's relativistic particle, beta = 1)
    dct = ring.harmonic_number * clight / (f0 + df) - ring.circumference
    assert truth.dct_m == pytest.approx(dct, abs=1e-12)
    o0, orbit = at.find_orbit4(ring, dct=dct, refpts=truth.bpm_elements)
    expected = truth.readings(orbit[:, (0, 2)]) * 1e3
    np.testing.assert_allclose(after.x_mm, expected[:, 0], atol=1e-6)
    # a higher frequency shortens the orbit: lower momentum for a positive alpha_c
    delta = o0[4] - at.find_orbit4(ring, dct=dct0)[0][4]
    assert delta < 0
    _, _, lin = at.linopt6(ring, refpts=truth.bpm_elements)
    disp = lin["dispersion"][:, 0]
    dx = (after.x_mm - before.x_mm) * 1e-3
    gain = truth["bpm_gain"][:, 0]
    np.testing.assert_allclose(dx / gain, disp * delta, rtol=0.05, atol=2e-6)


def test_quadrupole_change_moves_the_tunes_as_pyat_says(twin: Twin, small: MachineDescription):
    name = small.families["quadrupoles"].devices[0]
    hardware = twin.hardware
    hardware[twin.magnet_index[name]] *= 1.01
    twin.set_magnets(hardware)
    frame = twin.compute()
    truth = twin.truth()
    _, _, _ = at.linopt6(truth.ring, dct=truth.dct_m)
    tune = at.linopt6(truth.ring, dct=truth.dct_m)[1]["tune"]
    np.testing.assert_allclose(frame.tune, np.mod(tune, 1.0), atol=1e-7)


def worst_kicks_a(truth, description: MachineDescription, family: str = "hcorr") -> np.ndarray:
    """Corrector currents at their limits, signed to add up at the first BPM (pyAT ORM)."""
    ring = truth.ring
    bpm = truth.bpm_elements[:1]
    x0 = at.find_orbit4(ring, dct=truth.dct_m, refpts=bpm)[1][0, 0]
    currents = []
    for name in description.families[family].devices:
        dev = description.device(name)
        r = ring.deepcopy()
        r[dev.elements[0]].KickAngle[0] += 1e-5
        dx = at.find_orbit4(r, dct=truth.dct_m, refpts=bpm)[1][0, 0] - x0
        assert dev.limits is not None
        currents.append(dev.limits[1] * np.sign(dx))
    return np.array(currents)


def test_an_absurd_kick_loses_the_beam_without_nan(twin: Twin, small: MachineDescription):
    assert twin.compute().beam
    kicks = worst_kicks_a(twin.truth(), small)
    # a small kick pattern that some Newton iterates would lose, but whose orbit exists
    hardware = twin.hardware
    for name in small.families["hcorr"].devices[:6]:
        hardware[twin.magnet_index[name]] = 5.0
    twin.set_magnets(hardware)
    assert twin.compute().beam
    hardware = twin.design_hardware.copy()
    for name, current in zip(small.families["hcorr"].devices, kicks, strict=True):
        hardware[twin.magnet_index[name]] = current
    twin.set_magnets(hardware)
    frame = twin.compute()
    assert not frame.beam and "orbit" in frame.loss_reason
    assert frame.current_ma == 0.0 and not frame.valid.any()
    for arr in (frame.x_mm, frame.y_mm, frame.tune):
        assert np.all(np.isfinite(arr)) and not np.any(arr)
    # back to design: the beam stays lost until a refill
    twin.set_magnets(twin.design_hardware)
    assert not twin.compute().beam
    twin.refill()
    assert twin.compute().beam


def test_kill_refill_and_current_decay(small: MachineDescription):
    twin = Twin(small, seed=1, beam=BeamSettings(current_ma=100.0, lifetime_h=2.0))
    twin.refill(now=1000.0)
    assert twin.compute(now=1000.0 + 3600.0).current_ma == pytest.approx(100.0 * np.exp(-0.5))
    twin.kill_beam()
    frame = twin.compute(now=2000.0)
    assert frame.current_ma == 0.0 and frame.lifetime_h == 0.0 and not frame.valid.any()


def test_reset_draws_new_errors_and_the_same_seed_gives_the_same_machine(twin: Twin):
    first = twin.truth()["bpm_offset_m"].copy()
    x1 = twin.compute().x_mm
    twin.reset(3)
    assert twin.seed == 3
    assert not np.allclose(twin.truth()["bpm_offset_m"], first)
    twin.reset(2)
    np.testing.assert_array_equal(twin.truth()["bpm_offset_m"], first)
    np.testing.assert_allclose(twin.compute().x_mm, x1, atol=1e-9)


def test_drift_moves_the_quadrupoles_and_the_orbit(twin: Twin, tmp_path):
    t0 = 1.0e9
    twin.compute(now=t0)
    shifts = twin.truth()["quad_shift_m"].copy()
    x0 = twin.compute(now=t0).x_mm
    twin.inject_drift(1e-6, now=t0)  # 1 um/s rms per plane
    frame = twin.compute(now=t0 + 5.0)
    truth = twin.truth()
    moved = truth["quad_shift_m"] - shifts
    assert 1e-6 < np.std(moved) < 20e-6
    # the exported lattice carries the new positions (at.shift_elem semantics)
    for el, (dx, dy) in zip(truth["quad_elements"], truth["quad_shift_m"], strict=True):
        np.testing.assert_allclose(truth.ring[el].T2[[0, 2]], [dx, dy])
        np.testing.assert_allclose(truth.ring[el].T1[[0, 2]], [-dx, -dy])
    np.testing.assert_allclose(frame.x_mm, _orbit_readings_mm(truth)[:, 0], atol=1e-6)
    assert np.max(np.abs(frame.x_mm - x0)) > 1e-3
    # and so does the lattice file
    loaded = load_truth(twin.export_truth(tmp_path / "truth"))
    np.testing.assert_allclose(frame.x_mm, _orbit_readings_mm(loaded)[:, 0], atol=1e-6)
    twin.inject_drift(0.0, now=t0 + 5.0)
    np.testing.assert_array_equal(twin.compute(now=t0 + 50.0).x_mm, frame.x_mm)


def test_truth_files_round_trip(twin: Twin, tmp_path):
    twin.compute()
    path = twin.export_truth(tmp_path / "truth")
    loaded = load_truth(path)
    mem = twin.truth()
    assert loaded.seed == 2 and loaded.dct_m == mem.dct_m
    for key, value in mem.arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    np.testing.assert_array_equal(loaded.closed_orbit(), mem.closed_orbit())
    with pytest.raises(FileNotFoundError, match="not a twin truth"):
        load_truth(tmp_path)


def test_noise_is_drawn_afresh_and_has_the_given_rms(small: MachineDescription):
    twin = Twin(small, seed=1, errors=ErrorModel(bpm_noise_m=2e-6))
    frames = np.array([twin.compute().x_mm for _ in range(200)])
    assert 1.7e-3 < np.std(frames - frames.mean(axis=0)) < 2.3e-3  # mm


def test_bad_inputs_say_what_is_wrong(twin: Twin):
    with pytest.raises(ValueError, match="expected"):
        twin.set_magnets([1.0, 2.0])
    hardware = twin.hardware
    hardware[3] = np.nan
    with pytest.raises(ValueError, match=twin.magnet_names[3]):
        twin.set_magnets(hardware)
    with pytest.raises(ValueError, match="RF frequency"):
        twin.set_rf(frequency_hz=-1.0)
