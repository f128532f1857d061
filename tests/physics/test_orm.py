import numpy as np
import pytest

from accplans.physics import chi2_per_dof, orbit_statistics, orm_from_bipolar


def test_bipolar_difference_recovers_a_linear_response_and_its_noise():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(40, 6))
    kp, km = np.full(6, 4e-5), np.full(6, -4e-5)
    offset = rng.normal(size=(40, 1)) * 1e-4  # a static orbit cancels in the difference
    sigma = 1e-6
    plus = offset + truth * kp + rng.normal(scale=sigma, size=truth.shape)
    minus = offset + truth * km + rng.normal(scale=sigma, size=truth.shape)
    matrix, err = orm_from_bipolar(plus, minus, kp, km, noise_m=sigma)
    assert err is not None
    # chi2 of a correct noise model is near 1 (240 points: 1 +- 0.2 at 2.2 sigma)
    assert 0.78 < chi2_per_dof(matrix, truth, err) < 1.22
    # a wrong noise model is visible
    assert chi2_per_dof(matrix, truth, err / 2) > 3


def test_zero_kick_difference_is_refused():
    with pytest.raises(ValueError, match=r"columns \[1\]"):
        orm_from_bipolar(np.zeros((2, 2)), np.zeros((2, 2)), [1e-5, 0.0], [-1e-5, 0.0])


def test_orbit_statistics_ignores_invalid_readings():
    x = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 100.0]])
    valid = np.array([[True, True], [True, True], [True, False]])
    mean, std, n = orbit_statistics(x, valid)
    np.testing.assert_allclose(mean, [3.0, 2.0])
    assert n.tolist() == [3, 1]
    assert std[0] == pytest.approx(2.0)
    assert np.isnan(std[1])
