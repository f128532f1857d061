"""Coupling numerics: eigen-tunes, closest tune approach, tune-scan fit, the coupling fit."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import (
    bpm_roll_columns,
    closest_tune_approach,
    coupling_observables,
    eigen_tunes,
    fit_coupling,
    fit_tune_scan,
)


def _rotation(beta: float, alpha: float, tune: float) -> np.ndarray:
    mu = 2 * np.pi * tune
    c, s = np.cos(mu), np.sin(mu)
    return np.array([[c + alpha * s, beta * s], [-(1 + alpha**2) / beta * s, c - alpha * s]])


def _ring(qx: float, qy: float, ks: float = 0.0, bx: float = 8.0, by: float = 3.0) -> np.ndarray:
    """Uncoupled one-turn matrix with a thin skew quadrupole (integrated ks, 1/m) at s = 0."""
    m = np.zeros((4, 4))
    m[:2, :2] = _rotation(bx, 0.4, qx)
    m[2:, 2:] = _rotation(by, -0.7, qy)
    kick = np.eye(4)
    kick[1, 2] = kick[3, 0] = ks
    return m @ kick


@pytest.mark.parametrize(("qx", "qy"), [(0.21, 0.34), (0.41, 0.66), (0.77, 0.12)])
def test_eigen_tunes_of_an_uncoupled_matrix(qx: float, qy: float) -> None:
    np.testing.assert_allclose(eigen_tunes(_ring(qx, qy)), [qx, qy], atol=1e-12)


@pytest.mark.parametrize(("qx", "qy"), [(0.21, 0.34), (0.41, 0.66)])
def test_closest_tune_approach_of_one_thin_skew(qx: float, qy: float) -> None:
    """|C-| = |ks| sqrt(beta_x beta_y) / (2 pi) for one thin skew quadrupole."""
    ks = 2e-3
    found = closest_tune_approach(_ring(qx, qy, ks))
    expected = ks * np.sqrt(8.0 * 3.0) / (2 * np.pi)
    assert found.c_minus == pytest.approx(expected, rel=0.02)
    assert closest_tune_approach(_ring(qx, qy)).c_minus < 1e-9


def test_fit_tune_scan_recovers_c_minus() -> None:
    rng = np.random.default_rng(1)
    t = np.linspace(-1, 1, 9)
    qx, qy, c = 0.27 + 0.01 * t, 0.275 - 0.01 * t, 3e-3
    mean, half = (qx + qy) / 2, np.sqrt((qx - qy) ** 2 + c**2) / 2
    tunes = np.column_stack([mean + half, mean - half]) + rng.normal(0, 1e-6, (9, 2))
    fit = fit_tune_scan(t, tunes)
    assert fit.c_minus == pytest.approx(c, rel=0.01)
    assert fit.crossing == pytest.approx(0.25, abs=0.01)
    assert fit.std < 1e-4


def test_fit_coupling_finds_skews_and_bpm_rolls() -> None:
    """Observables made by known skew changes and BPM rolls: the fit returns them."""
    rng = np.random.default_rng(3)
    nb, nh, nv, ns = 30, 5, 5, 6
    planes = ["h"] * nh + ["v"] * nv
    orm = rng.normal(0, 10, (2 * nb, nh + nv))
    dx = rng.normal(0, 0.1, nb)
    w = 50.0
    nobs = nb * (nh + nv) + nb
    skew_response = rng.normal(0, 1, (nobs, ns))
    rolls = bpm_roll_columns(orm, planes, dx, dispersion_weight=w)
    errors, roll = rng.normal(0, 0.01, ns), rng.normal(0, 1e-3, nb)
    observed = skew_response @ errors + rolls @ roll
    fit = fit_coupling(-observed, skew_response, roll_columns=rolls, alpha_rel=1e-6)
    np.testing.assert_allclose(fit.skew_change, errors, atol=1e-6)
    np.testing.assert_allclose(fit.bpm_roll_rad, -roll, atol=1e-7)
    assert fit.rms_after < 1e-6 * fit.rms_before
    # with limits, the changes stay inside them
    bounded = fit_coupling(-observed, skew_response, lower=-0.005, upper=0.005)
    assert np.all(np.abs(bounded.skew_change) <= 0.005 + 1e-12)
    assert np.any(bounded.at_limit)


def test_coupling_observables_layout() -> None:
    nb = 3
    orm = np.arange(2 * nb * 3, dtype=float).reshape(2 * nb, 3)
    obs = coupling_observables(orm, ["h", "v", "h"], np.ones(nb), dispersion_weight=2.0)
    expected = np.concatenate([orm[nb:, 0], orm[nb:, 2], orm[:nb, 1], 2.0 * np.ones(nb)])
    np.testing.assert_array_equal(obs, expected)
