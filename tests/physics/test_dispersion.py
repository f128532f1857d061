"""The dispersion fit and the RF step <-> momentum conversion, on synthetic scans."""

import numpy as np
import pytest

from accplans.physics import (
    delta_for_frequency_step,
    dispersion_standard_error,
    fit_dispersion,
    frequency_step_for_delta,
)


def _scan(rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dp = np.array([0.0, 5e-4, 1e-3, -5e-4, -1e-3])
    d1 = rng.normal(0.0, 0.05, 40)
    d2 = rng.normal(0.0, 0.5, 40)
    x0 = rng.normal(0.0, 1e-4, 40)
    orbits = x0 + np.outer(dp, d1) + np.outer(dp**2, d2) + rng.normal(0.0, noise, (dp.size, 40))
    return dp, orbits, np.stack([x0, d1, d2])


def test_a_quadratic_fit_recovers_both_orders_exactly_without_noise() -> None:
    dp, orbits, (x0, d1, d2) = _scan(np.random.default_rng(1), 0.0)
    fit = fit_dispersion(dp, orbits, order=2)
    assert fit.second_order is not None
    assert np.allclose(fit.dispersion, d1, rtol=0, atol=1e-9)
    assert np.allclose(fit.second_order, d2, rtol=0, atol=1e-6)
    assert np.allclose(fit.offset, x0, rtol=0, atol=1e-12)
    # symmetric points: the linear fit's slope is not biased by the quadratic term
    linear = fit_dispersion(dp, orbits, order=1)
    assert np.allclose(linear.dispersion, d1, rtol=0, atol=1e-9)
    assert linear.second_order is None


def test_the_standard_error_is_the_spread_of_repeated_fits() -> None:
    rng = np.random.default_rng(2)
    dp = np.zeros(0)
    slopes, stds = [], []
    for _ in range(400):
        dp, orbits, (_, d1, _) = _scan(np.random.default_rng(7), 0.0)
        orbits = orbits + rng.normal(0.0, 1e-6, orbits.shape)
        fit = fit_dispersion(dp, orbits, order=1)
        slopes.append(fit.dispersion - d1)
        stds.append(fit.std_dispersion)
    spread = np.std(slopes, axis=0)
    expected = 1e-6 / np.sqrt(np.sum((dp - dp.mean()) ** 2))
    assert np.allclose(spread, expected, rtol=0.15)
    assert np.allclose(np.mean(stds, axis=0), expected, rtol=0.15)


@pytest.mark.parametrize("order", [1, 2])
def test_the_noise_budget_is_the_spread_of_scans_of_averaged_frames(order: int) -> None:
    """Each point the mean of ``n`` noisy frames (the baseline too): the spread of the fitted
    dispersion over 2000 scans is the budget's standard error, within 5 %."""
    rng = np.random.default_rng(4)
    dp = np.array([0.0, 5e-4, 1e-3, -5e-4, -1e-3])
    n, noise, rows = 16, 1e-6, 40
    d1 = rng.normal(0.0, 0.05, rows)
    clean = np.outer(dp, d1) + np.outer(dp**2, rng.normal(0.0, 0.5, rows))
    slopes = []
    for _ in range(2000 // rows * 2):
        frames = clean[None] + rng.normal(0.0, noise, (n, dp.size, rows))
        slopes.append(fit_dispersion(dp, frames.mean(axis=0), order=order).dispersion - d1)
    spread = float(np.std(np.concatenate(slopes)))
    budget = dispersion_standard_error(dp, noise, n_samples=n, order=order)
    assert spread == pytest.approx(budget, rel=0.05)
    if order == 1:  # the closed form of the docstring
        assert budget == pytest.approx(noise / np.sqrt(n * np.sum(dp**2)), rel=1e-12)
    # the plan's defaults on EBS: 0.2 % of its 80 mm peak Dx for 1 um of noise
    assert dispersion_standard_error(dp, 1e-6, n_samples=16) < 0.002 * 0.080


def test_invalid_readings_are_left_out_per_row() -> None:
    dp, orbits, (_, d1, _) = _scan(np.random.default_rng(3), 0.0)
    valid = np.ones_like(orbits, bool)
    valid[1, 0] = False
    orbits[1, 0] = 1.0  # a bad reading, masked
    valid[:, 1] = [True, False, False, False, False]  # one point: no slope
    fit = fit_dispersion(dp, orbits, order=2, valid=valid)
    assert abs(fit.dispersion[0] - d1[0]) < 1e-9
    assert np.isnan(fit.dispersion[1])
    assert np.allclose(fit.dispersion[2:], d1[2:], rtol=0, atol=1e-9)


def test_frequency_steps_and_momenta_convert_both_ways() -> None:
    f, alpha_c = 352.37e6, 8.5e-5
    df = frequency_step_for_delta(np.array([1e-3, -1e-3]), f, alpha_c)
    assert df == pytest.approx([-f * alpha_c * 1e-3, f * alpha_c * 1e-3])
    assert delta_for_frequency_step(df, f, alpha_c) == pytest.approx([1e-3, -1e-3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dp": np.zeros(3), "orbits": np.zeros((3, 2))}, "distinct"),
        ({"dp": np.arange(3.0), "orbits": np.zeros((2, 2))}, "shape"),
        ({"dp": np.arange(3.0), "orbits": np.zeros((3, 2)), "order": 3}, "order"),
        ({"dp": np.array([0.0, np.nan, 1.0]), "orbits": np.zeros((3, 2))}, "finite"),
    ],
)
def test_bad_inputs_say_what_is_wrong(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_dispersion(**kwargs)


def test_bad_conversions_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha_c"):
        delta_for_frequency_step(1.0, 352e6, 0.0)
    with pytest.raises(ValueError, match="RF frequency"):
        frequency_step_for_delta(1e-3, -1.0, 1e-4)
