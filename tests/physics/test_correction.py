"""Orbit correction numerics on the small ring's model ORM (both planes, all correctors)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from accplans.config import load_description
from accplans.model import OnlineModel, OrbitResponse
from accplans.physics import (
    correction_matrix,
    micado,
    solve_correction,
)


@pytest.fixture(scope="module")
def orm() -> OrbitResponse:
    return OnlineModel(load_description("small")).orm()


@pytest.fixture(scope="module")
def kicked(orm: OrbitResponse) -> tuple[np.ndarray, np.ndarray]:
    """Known random kicks [rad] on every corrector and the orbit [m] they make."""
    kicks = np.random.default_rng(7).normal(scale=1e-5, size=orm.matrix.shape[1])
    return kicks, orm.matrix @ kicks


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a) / np.linalg.norm(b))


def test_full_svd_recovers_the_orbit(orm, kicked):
    _, orbit = kicked
    k = correction_matrix(orm.matrix)
    assert _rel(orbit - orm.matrix @ (k @ orbit), orbit) < 1e-10
    res = solve_correction(orm.matrix, orbit)
    assert _rel(res.residual_m, orbit) < 1e-10
    np.testing.assert_allclose(res.dtheta_rad, -k @ orbit, rtol=0, atol=1e-12)
    assert res.singular_values.size == min(orm.matrix.shape)
    assert res.df_hz == 0.0 and not res.bound_active


def test_truncation_leaves_the_discarded_part(orm, kicked):
    _, orbit = kicked
    u, s, _ = np.linalg.svd(orm.matrix)
    res = solve_correction(orm.matrix, orbit, n_singular=10)
    # the residual is the orbit's part on the discarded left singular vectors
    expected = u[:, 10:] @ (u[:, 10:].T @ orbit)
    np.testing.assert_allclose(res.residual_m, expected, atol=1e-12 * np.abs(orbit).max())
    np.testing.assert_allclose(res.singular_values, s[:10])


def test_tikhonov_tends_to_full_svd(orm):
    k_svd = correction_matrix(orm.matrix)
    k_tik = correction_matrix(orm.matrix, method="tikhonov", alpha=1e-8)
    assert _rel(k_tik - k_svd, k_svd) < 1e-10
    # a real alpha damps: the filter s / (s^2 + a^2) shrinks the kicks
    k_damped = correction_matrix(orm.matrix, method="tikhonov", alpha=1.0)
    assert np.linalg.norm(k_damped) < 0.7 * np.linalg.norm(k_svd)


def test_masked_bpms_and_excluded_correctors(orm, kicked):
    _, orbit = kicked
    m, n = orm.matrix.shape
    bpm_w = np.ones(m)
    bpm_w[[2, 20]] = 0.0
    corr_w = np.ones(n)
    corr_w[[5, 30]] = 0.0
    k = correction_matrix(orm.matrix, bpm_weights=bpm_w, corrector_weights=corr_w)
    assert np.all(k[[5, 30], :] == 0.0)
    assert np.all(k[:, [2, 20]] == 0.0)
    # a masked reading may be anything (NaN included) without changing the kicks
    bad_orbit = orbit.copy()
    bad_orbit[[2, 20]] = [np.nan, 1.0]
    bad_matrix = orm.matrix.copy()
    bad_matrix[2, :] = np.nan
    bad_matrix[:, 30] = np.nan
    res = solve_correction(bad_matrix, bad_orbit, bpm_weights=bpm_w, corrector_weights=corr_w)
    assert res.dtheta_rad[5] == 0.0 and res.dtheta_rad[30] == 0.0
    np.testing.assert_allclose(res.dtheta_rad, -k @ orbit, rtol=0, atol=1e-15)
    # the remaining 46 correctors still zero the 30 unmasked readings (underdetermined)
    assert _rel(np.delete(res.residual_m, [2, 20]), orbit) < 1e-10


def test_micado_picks_the_kicked_correctors(orm):
    kicks = np.zeros(orm.matrix.shape[1])
    kicks[[0, 14]] = [2e-5, -1.5e-5]
    orbit = orm.matrix @ kicks
    dtheta, chosen = micado(orm.matrix, orbit, 2)
    assert sorted(chosen.tolist()) == [0, 14]
    np.testing.assert_allclose(dtheta, -kicks, rtol=0, atol=1e-15)
    # pure greedy takes corrector 0's neighbour (23, across the ring's start) first
    _, greedy = micado(orm.matrix, orbit, 2, exchange=False)
    assert sorted(greedy.tolist()) == [14, 23]
    # one corrector more changes nothing: the orbit is already corrected
    dtheta3, chosen3 = micado(orm.matrix, orbit, 3)
    assert {0, 14} <= set(chosen3.tolist())
    assert np.linalg.norm(orbit + orm.matrix @ dtheta3) < 1e-12 * np.linalg.norm(orbit)


@pytest.mark.parametrize(("method", "alpha"), [("svd", None), ("tikhonov", 1.0)])
def test_bounds_are_respected_and_beat_clipping(orm, kicked, method, alpha):
    _, orbit = kicked
    free = solve_correction(orm.matrix, orbit, method=method, alpha=alpha)
    limit = 0.6 * np.max(np.abs(free.dtheta_rad))
    lower, upper = np.full(orm.matrix.shape[1], -limit), np.full(orm.matrix.shape[1], limit)
    lower[3] = -0.1 * limit  # one asymmetric limit
    res = solve_correction(orm.matrix, orbit, method=method, alpha=alpha, lower=lower, upper=upper)
    assert np.all(res.dtheta_rad >= lower) and np.all(res.dtheta_rad <= upper)
    assert res.bound_active and res.at_bound.any()
    on_limit = res.dtheta_rad[res.at_bound]
    assert np.all((on_limit == lower[res.at_bound]) | (on_limit == upper[res.at_bound]))
    clipped = orbit + orm.matrix @ np.clip(free.dtheta_rad, lower, upper)
    assert np.linalg.norm(res.residual_m) < 0.5 * np.linalg.norm(clipped)
    # limits that do not bind change nothing
    loose = solve_correction(orm.matrix, orbit, method=method, alpha=alpha, lower=-1, upper=1)
    np.testing.assert_array_equal(loose.dtheta_rad, free.dtheta_rad)
    assert not loose.bound_active


def test_rf_column_recovers_an_rf_offset(orm):
    assert orm.rf_column is not None
    # every third corrector of each plane: 16 kicks + RF for 32 readings, so the RF step is
    # not absorbed by the kicks
    weights = np.zeros(orm.matrix.shape[1])
    weights[::3] = 1.0
    kicks = np.random.default_rng(3).normal(scale=1e-5, size=weights.size) * weights
    df = 37.0  # Hz
    orbit = orm.matrix @ kicks + orm.rf_column * df
    res = solve_correction(orm.matrix, orbit, rf_column=orm.rf_column, corrector_weights=weights)
    assert res.df_hz == pytest.approx(-df, rel=1e-8)
    np.testing.assert_allclose(res.dtheta_rad, -kicks, rtol=0, atol=1e-14)
    assert _rel(res.residual_m, orbit) < 1e-10
    # without the RF column the kicks cannot reach the dispersion pattern
    no_rf = solve_correction(orm.matrix, orbit, corrector_weights=weights)
    assert _rel(no_rf.residual_m, orbit) > 1e-3


def test_sum_of_kicks_goes_to_zero_as_the_weight_grows(orm, kicked):
    assert orm.rf_column is not None
    _, orbit = kicked
    # horizontal plane, 8 of the 24 H correctors: overdetermined, so the row has a price
    cols = np.flatnonzero([name.startswith("H") for name in orm.correctors])[::3]
    nb = len(orm.bpms)
    r, x, rf = orm.matrix[:nb, cols], orbit[:nb], orm.rf_column[:nb]
    sums = [
        abs(solve_correction(r, x, rf_column=rf, sum_of_kicks_weight=w).dtheta_rad.sum())
        for w in (None, 1.0, 10.0, 100.0, 1e4)
    ]
    assert all(b < a for a, b in itertools.pairwise(sums))
    assert sums[-1] < 1e-6 * sums[0]


def test_target_orbit_is_reached(orm, kicked):
    kicks, orbit = kicked
    target = orm.matrix @ (0.3 * kicks)
    res = solve_correction(orm.matrix, orbit, target=target)
    assert _rel(res.residual_m, orbit) < 1e-10
    assert _rel(orbit + orm.matrix @ res.dtheta_rad - target, orbit) < 1e-10


def test_nan_inputs_raise_with_their_location(orm, kicked):
    _, orbit = kicked
    bad = orbit.copy()
    bad[[4, 9]] = np.nan
    with pytest.raises(ValueError, match=r"orbit is not finite at rows \[4, 9\]"):
        solve_correction(orm.matrix, bad)
    with pytest.raises(ValueError, match=r"orbit is not finite at rows \[4, 9\]"):
        micado(orm.matrix, bad, 2)
    matrix = orm.matrix.copy()
    matrix[6, 11] = np.nan
    with pytest.raises(ValueError, match=r"rows \[6\], columns \[11\]"):
        correction_matrix(matrix)
    with pytest.raises(ValueError, match=r"rows \[6\], columns \[11\]"):
        solve_correction(matrix, orbit)


def test_bad_arguments_are_refused(orm, kicked):
    _, orbit = kicked
    m, n = orm.matrix.shape
    with pytest.raises(ValueError, match=r"orbit has shape \(31,\).*32 rows"):
        solve_correction(orm.matrix, orbit[:-1])
    with pytest.raises(ValueError, match=r"n_singular=33 is out of range.*rank 32"):
        correction_matrix(orm.matrix, n_singular=33)
    with pytest.raises(ValueError, match=r"n_singular=0 is out of range"):
        solve_correction(orm.matrix, orbit, n_singular=0)
    with pytest.raises(ValueError, match="needs a finite alpha"):
        correction_matrix(orm.matrix, method="tikhonov")
    with pytest.raises(ValueError, match="unknown method 'lsq'"):
        correction_matrix(orm.matrix, method="lsq")
    with pytest.raises(ValueError, match=r"corrector_weights has shape \(3,\)"):
        correction_matrix(orm.matrix, corrector_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"lower < upper.*columns \[2\]"):
        lower = np.full(n, -1e-3)
        lower[2] = 1e-3
        solve_correction(orm.matrix, orbit, lower=lower, upper=1e-3)
    with pytest.raises(ValueError, match=r"n_correctors=0 is out of range"):
        micado(orm.matrix, orbit, 0)
    with pytest.raises(ValueError, match=r"bpm_weights must be finite and >= 0.*rows \[1\]"):
        correction_matrix(orm.matrix, bpm_weights=np.r_[1.0, -1.0, np.ones(m - 2)])
