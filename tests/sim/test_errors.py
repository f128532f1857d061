import dataclasses
import json

import numpy as np
import pytest

from accplans.sim import ErrorModel, bpm_readings, draw_errors


def _draw(model: ErrorModel, seed: int):
    return draw_errors(
        model,
        seed,
        quad_elements=np.arange(400),
        sext_elements=np.arange(200),
        bpm_names=[f"B{i}" for i in range(300)],
        bpm_elements=np.arange(300),
        corrector_names=[f"C{i}" for i in range(250)],
    )


def test_none_is_a_perfect_machine():
    model = ErrorModel.none()
    shapes = ("cut_sigma", "sext_shift_x_fraction")  # not amplitudes
    assert all(v == 0.0 for k, v in model.to_dict().items() if k not in shapes)
    e = _draw(model, 3)
    assert not np.any(e.quad_shift_m) and not np.any(e.bpm_offset_m)
    np.testing.assert_array_equal(e.bpm_gain, 1.0)


def test_same_seed_same_errors_other_seed_other_errors():
    a, b, c = _draw(ErrorModel(), 5), _draw(ErrorModel(), 5), _draw(ErrorModel(), 6)
    np.testing.assert_array_equal(a.quad_shift_m, b.quad_shift_m)
    np.testing.assert_array_equal(a.corrector_gain_rel, b.corrector_gain_rel)
    assert not np.allclose(a.bpm_offset_m, c.bpm_offset_m)


def test_errors_are_cut_at_two_sigma_with_the_given_scale():
    model = ErrorModel(quad_shift_m=10e-6, bpm_offset_m=50e-6, corrector_gain_rel=0.01)
    e = _draw(model, 11)
    assert np.max(np.abs(e.quad_shift_m)) <= 2 * 10e-6
    assert np.max(np.abs(e.bpm_offset_m)) <= 2 * 50e-6
    assert np.max(np.abs(e.corrector_gain_rel)) <= 2 * 0.01
    # a Gaussian cut at 2 sigma has an rms of 0.88 sigma
    assert 0.8 * 50e-6 < np.std(e.bpm_offset_m) < 0.95 * 50e-6


def test_bpm_reading_definition():
    beam = np.array([[1e-3, 0.0], [0.0, 2e-3], [1e-3, 1e-3]])
    offset = np.array([[1e-4, 0.0], [0.0, 0.0], [0.0, 1e-4]])
    gain = np.array([[1.1, 1.0], [1.0, 0.9], [1.0, 1.0]])
    roll = np.array([0.0, 0.0, np.pi / 2])
    r = bpm_readings(beam, offset, gain, roll)
    np.testing.assert_allclose(r[0], [1.1 * 0.9e-3, 0.0])
    np.testing.assert_allclose(r[1], [0.0, 0.9 * 2e-3])
    # rolled by +90 degrees: u = y, v = -x (the frame rotation of at.tilt_elem)
    np.testing.assert_allclose(r[2], [0.9e-3, -1e-3], atol=1e-15)
    noise = np.full((3, 2), 1e-6)
    np.testing.assert_allclose(bpm_readings(beam, offset, gain, roll, noise) - r, noise)


def test_error_model_json_round_trip_and_bad_input(tmp_path):
    model = dataclasses.replace(ErrorModel(), quad_shift_m=3e-6)
    path = tmp_path / "errors.json"
    path.write_text(json.dumps(model.to_dict()))
    assert ErrorModel.from_json(str(path)) == model
    with pytest.raises(ValueError, match="quad_shift"):
        ErrorModel.from_dict({"quad_shift": 1e-6})
    with pytest.raises(ValueError, match="bpm_noise_m"):
        ErrorModel(bpm_noise_m=-1.0)
    assert ErrorModel().without_noise().bpm_noise_m == 0.0


def test_vertical_only_sextupole_offsets_keep_the_other_draws():
    """sext_shift_x_fraction scales the horizontal sextupole offsets after the draw: the
    vertical ones and every other error stay those of the same seed."""
    both = _draw(ErrorModel(sext_shift_m=30e-6), 5)
    vertical = _draw(ErrorModel(sext_shift_m=30e-6, sext_shift_x_fraction=0.0), 5)
    assert np.all(vertical.sext_shift_m[:, 0] == 0.0)
    np.testing.assert_array_equal(vertical.sext_shift_m[:, 1], both.sext_shift_m[:, 1])
    assert np.std(both.sext_shift_m[:, 0]) > 10e-6
    np.testing.assert_array_equal(vertical.quad_shift_m, both.quad_shift_m)
    np.testing.assert_array_equal(vertical.bpm_gain, both.bpm_gain)
