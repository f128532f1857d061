"""Tune averaging, chromaticity fits and knob solves against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import (
    average_tunes,
    fit_chromaticity,
    solve_knobs,
    unwrap_tunes,
    wrap_tune,
)


def test_wrap_and_unwrap_across_an_integer() -> None:
    np.testing.assert_allclose(wrap_tune([0.97, 0.01 - 0.98, 0.5]), [-0.03, 0.03, -0.5], atol=1e-12)
    q = unwrap_tunes([[0.999, 0.2], [0.001, 0.2], [0.998, 0.21]])
    np.testing.assert_allclose(q[:, 0], [0.999, 1.001, 0.998])


def test_average_of_readings_near_an_integer_is_not_one_half() -> None:
    rng = np.random.default_rng(1)
    true = np.array([0.9999, 0.2])
    readings = np.mod(true + rng.normal(0, 1e-4, (400, 2)), 1.0)
    avg = average_tunes(readings)
    assert abs(wrap_tune(avg.tunes - true)).max() < 4 * 1e-4 / np.sqrt(400)
    np.testing.assert_allclose(avg.std, 1e-4, rtol=0.15)
    np.testing.assert_allclose(avg.std_mean, avg.std / 20)
    with pytest.raises(ValueError, match="finite"):
        average_tunes([[0.2, np.nan]])


@pytest.mark.parametrize("order", [1, 2])
def test_chromaticity_fit_recovers_a_known_polynomial_and_its_errors(order: int) -> None:
    """Q(dp) = Q0 + xi dp + xi2 dp^2 sampled at 5 points with noise: over many draws the
    errors of xi are distributed as the reported standard errors say (rms of z near 1)."""
    rng = np.random.default_rng(2)
    dp = np.linspace(-2e-3, 2e-3, 5)
    q0, xi, xi2 = np.array([0.995, 0.34]), np.array([5.7, 3.9]), np.array([40.0, -25.0])
    sigma = 1e-5
    z, z2 = [], []
    for _ in range(400):
        clean = q0 + np.outer(dp, xi) + (np.outer(dp**2, xi2) if order == 2 else 0.0)
        fit = fit_chromaticity(
            dp, np.mod(clean + rng.normal(0, sigma, clean.shape), 1.0), order=order
        )
        z.append((fit.chromaticity - xi) / fit.std_chromaticity)
        if order == 2:
            assert fit.second_order is not None
            z2.append((fit.second_order - xi2) / fit.std_coefficients[2])
    z = np.array(z)
    # a t distribution with 3 (order 1) or 2 (order 2) degrees of freedom: rms sqrt(3) or inf;
    # the median |z| is 0.77 / 0.82 for these, 0.67 for a normal one
    assert 0.55 < np.median(np.abs(z)) < 1.0
    assert np.mean(np.abs(z) < 5) > 0.95
    if order == 2:
        assert 0.55 < np.median(np.abs(z2)) < 1.0


def test_linear_fit_of_a_quadratic_is_biased_only_in_q0_on_symmetric_points() -> None:
    dp = np.array([-2e-3, -1e-3, 0.0, 1e-3, 2e-3])
    tunes = np.column_stack([0.2 + 3.0 * dp + 100 * dp**2, 0.3 - 1.0 * dp])
    lin = fit_chromaticity(dp, tunes, order=1)
    quad = fit_chromaticity(dp, tunes, order=2)
    np.testing.assert_allclose(lin.chromaticity, [3.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(quad.chromaticity, [3.0, -1.0], atol=1e-9)
    assert quad.second_order is not None
    np.testing.assert_allclose(quad.second_order, [100.0, 0.0], atol=1e-6)
    assert lin.residual_rms[0] > 1e-5 and quad.residual_rms[0] < 1e-12


def test_chromaticity_fit_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="distinct"):
        fit_chromaticity([0.0, 0.0, 1e-3], np.zeros((3, 2)), order=2)
    with pytest.raises(ValueError, match="order"):
        fit_chromaticity([0.0, 1e-3], np.zeros((2, 2)), order=3)
    with pytest.raises(ValueError, match="finite"):
        fit_chromaticity([0.0, np.nan], np.zeros((2, 2)))


def test_knob_solve_cancels_the_error_and_prefers_small_steps() -> None:
    response = np.array([[2.2, 0.27], [-0.22, -2.2]])
    error = np.array([0.01, -0.02])
    sol = solve_knobs(response, error)
    np.testing.assert_allclose(response @ sol.steps, -error, atol=1e-14)
    np.testing.assert_allclose(sol.residual, 0.0, atol=1e-14)
    assert sol.n_used == 2
    # two identical knobs: the minimum-norm solution splits the step equally
    twin = solve_knobs(np.array([[1.0, 1.0], [1.0, 1.0]]), [0.2, 0.2])
    np.testing.assert_allclose(twin.steps, [-0.1, -0.1])
    assert twin.n_used == 1
    # an SVD cut keeping one singular value of a well-conditioned 2x2 leaves a residual
    cut = solve_knobs(response, error, n_singular=1)
    assert cut.n_used == 1 and np.linalg.norm(cut.residual) > 1e-4


def test_weights_favour_the_plane_that_matters() -> None:
    """Three values, one knob: the weighted solution fits the heavily weighted value."""
    response = np.array([[1.0], [1.0], [1.0]])
    error = np.array([1.0, 0.0, 0.0])
    heavy = solve_knobs(response, error, weights=[100.0, 1.0, 1.0])
    assert abs(heavy.residual[0]) < 1e-3
    plain = solve_knobs(response, error)
    np.testing.assert_allclose(plain.steps, [-1 / 3])
    with pytest.raises(ValueError, match="weights"):
        solve_knobs(response, error, weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        solve_knobs(response, [np.nan, 0.0, 0.0])
