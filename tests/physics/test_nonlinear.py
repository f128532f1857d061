"""Amplitude detuning numerics on synthetic shots whose tunes, actions and lines are known."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import (
    constrained_step,
    fit_adts,
    kick_actions,
    line_tune,
    null_space,
    tbt_actions,
)

#: pyAT's layout: [[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]] (1/m), EBS-like values.
Q1 = np.array([[8.1e4, -8.6e4], [-8.6e4, 4.4e4]])


def _scans(small: float = 1e-10) -> np.ndarray:
    j = np.linspace(0.2, 1.0, 5)
    return np.array([(2e-8 * f, small) for f in j] + [(small, 3e-8 * f) for f in j])


def test_fit_adts_recovers_the_coefficients_within_its_errors() -> None:
    rng = np.random.default_rng(4)
    actions = _scans()
    q0 = np.array([0.21, 0.34])
    sigma = 2e-6
    tunes = q0 + actions @ Q1 + rng.normal(0, sigma, (len(actions), 2))
    fit = fit_adts(actions, tunes)
    assert np.all(np.abs(fit.detuning - Q1) < 4 * fit.std)
    assert np.all(fit.std < 0.05 * np.abs(Q1))
    np.testing.assert_allclose(fit.tunes0, q0, atol=1e-5)
    np.testing.assert_allclose(fit.residual_rms, sigma, rtol=0.6)


def test_fit_adts_second_order_absorbs_curvature() -> None:
    actions = _scans()
    curvature = np.array([[3e11, 0.0], [0.0, -2e11]])  # Q += c_uu J_u^2
    tunes = 0.3 + actions @ Q1 + (actions**2) @ curvature
    linear = fit_adts(actions, tunes)
    quadratic = fit_adts(actions, tunes, order=2)
    assert np.max(np.abs(linear.detuning - Q1) / np.abs(Q1)) > 0.01
    np.testing.assert_allclose(quadratic.detuning, Q1, rtol=1e-6)
    np.testing.assert_allclose(quadratic.second_order[:, (0, 2)], curvature.T, rtol=1e-6, atol=1e3)


def test_fit_adts_refuses_shots_that_cannot_separate_the_planes() -> None:
    one_plane = np.array([(1e-8 * k, 0.0) for k in range(1, 6)])
    with pytest.raises(ValueError, match="separate"):
        fit_adts(one_plane, 0.3 + one_plane @ Q1)
    with pytest.raises(ValueError, match="shots"):
        fit_adts(one_plane[:2], 0.3 + one_plane[:2] @ Q1)


def test_kick_actions() -> None:
    np.testing.assert_allclose(
        kick_actions([[1e-4, 2e-4]], [6.0, 3.0]), [[0.5 * 6 * 1e-8, 0.5 * 3 * 4e-8]]
    )
    with pytest.raises(ValueError):
        kick_actions([1e-4, 1e-4], [6.0, -1.0])


def _bpm_matrix(
    rng: np.random.Generator, n_bpm: int, turns: int, lines: list[tuple[float, np.ndarray]]
) -> np.ndarray:
    n = np.arange(turns)
    out = np.zeros((n_bpm, turns))
    for q, amp in lines:
        phase = rng.uniform(0, 2 * np.pi, n_bpm)
        out += amp[:, None] * np.cos(2 * np.pi * q * n[None, :] + phase[:, None])
    return out


def test_line_tune_takes_the_weak_line_near_the_reference() -> None:
    """A barely kicked plane: its own line 10x weaker than the other plane's (coupling)."""
    rng = np.random.default_rng(7)
    nb, turns = 64, 128
    qx, qy = 0.18321, 0.32147
    data = _bpm_matrix(
        rng, nb, turns, [(qx, np.full(nb, 30e-6)), (qy, rng.uniform(200e-6, 400e-6, nb))]
    )
    data += rng.normal(0, 10e-6, data.shape)
    tune, _ = line_tune(data, 0.20)
    assert abs(tune - qx) < 6e-5  # noise limit ~1.6e-5 (64 BPMs, 128 turns, SNR 3)
    tune_y, _ = line_tune(data, 0.34)
    assert abs(tune_y - qy) < 2e-6
    # a tune above 0.5 comes back on the reference's side
    above, _ = line_tune(data, 1 - 0.19)
    assert abs(above - (1 - qx)) < 6e-5
    with pytest.raises(ValueError, match="no line"):
        line_tune(data, 0.05, window=0.02)


def test_tbt_actions_from_decohering_shots_with_gain_errors() -> None:
    rng = np.random.default_rng(3)
    nb, turns = 200, 64
    beta = np.vstack([rng.uniform(2, 12, nb), rng.uniform(1, 8, nb)])
    true_j = np.array([3e-8, 1e-8])
    tunes = np.array([0.21, 0.34])
    n = np.arange(turns)
    envelope = np.exp(-((n / 60.0) ** 2))  # decoherence
    data = []
    for p in range(2):
        phase = np.cumsum(rng.uniform(0.3, 1.5, nb))
        gain = rng.normal(1.0, 0.03, nb)
        amp = np.sqrt(2 * true_j[p] * beta[p]) * gain
        signal = amp[:, None] * envelope * np.cos(2 * np.pi * tunes[p] * n + phase[:, None])
        # coupling: the other plane's line at 10 %
        other = (
            0.1
            * np.sqrt(2 * true_j[1 - p] * beta[p])[:, None]
            * np.cos(2 * np.pi * tunes[1 - p] * n + phase[:, None] / 2)
        )
        data.append(signal + other + rng.normal(0, 10e-6, (nb, turns)) + 1e-3)
    j = tbt_actions(data[0], data[1], beta, tunes)
    np.testing.assert_allclose(j, true_j, rtol=0.02)


def test_null_space_and_constrained_step() -> None:
    rng = np.random.default_rng(11)
    nk = 8
    con = rng.normal(size=(2, nk))
    tiny = 1e-9 * rng.normal(size=(2, nk))  # e.g. tunes that the knobs barely move
    basis = null_space(np.vstack([con, tiny]))
    assert basis.shape == (nk, nk - 2)
    np.testing.assert_allclose(con @ basis, 0, atol=1e-12)
    jac = rng.normal(size=(3, nk))
    obj = np.array([1.0, -2.0, 0.5])
    step = constrained_step(jac, obj, con)
    np.testing.assert_allclose(con @ step.steps, 0, atol=1e-12)
    np.testing.assert_allclose(step.predicted, 0, atol=1e-10)  # 6 free knobs, 3 terms
    assert step.free == nk - 2
    # with as many constraints as knobs nothing is free
    with pytest.raises(ValueError, match="no free direction"):
        constrained_step(jac[:, :2], obj, con[:, :2])
    # regularization shortens the step and leaves part of the objective
    short = constrained_step(jac, obj, con, regularization=0.5)
    assert np.linalg.norm(short.steps) < np.linalg.norm(step.steps)
    assert 0 < np.linalg.norm(short.predicted) < np.linalg.norm(obj)
