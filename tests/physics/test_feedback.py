"""The feedback controller on a linear plant: decay rate, drift lag, masks, PI form, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import FeedbackGains, OrbitFeedbackController, correction_matrix

NBPM, NH, NV = 20, 12, 10


@pytest.fixture
def plant() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(NBPM, NH)) * 10.0, rng.normal(size=(NBPM, NV)) * 8.0


def _in_range(r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return r @ rng.normal(size=r.shape[1]) * 1e-5


def test_integral_loop_removes_the_fraction_ki_per_iteration(plant) -> None:
    rx, ry = plant
    ki = 0.3
    gains = FeedbackGains(ki=ki)
    ctl = OrbitFeedbackController(rx, ry, gains_x=gains, gains_y=gains, alpha=0.0)
    rng = np.random.default_rng(1)
    x, y = _in_range(rx, rng), _in_range(ry, rng)
    x0, y0 = x.copy(), y.copy()
    zero = np.zeros(NBPM)
    for _ in range(8):
        step = ctl.step((x, y), (zero, zero))
        x, y = x + rx @ step.dtheta_x_rad, y + ry @ step.dtheta_y_rad
    np.testing.assert_allclose(x, (1 - ki) ** 8 * x0, atol=1e-12)
    np.testing.assert_allclose(y, (1 - ki) ** 8 * y0, atol=1e-12)


def test_a_drift_is_held_at_a_lag_of_its_speed_over_ki(plant) -> None:
    rx, ry = plant
    ki = 0.5
    ctl = OrbitFeedbackController(rx, ry, gains_x=FeedbackGains(ki), alpha=0.0)
    rng = np.random.default_rng(2)
    vx = _in_range(rx, rng)  # orbit drift per iteration, in the correctors' range
    x, y = np.zeros(NBPM), np.zeros(NBPM)
    zero = np.zeros(NBPM)
    for _ in range(60):
        x = x + vx
        step = ctl.step((x, y), (zero, zero))
        x = x + rx @ step.dtheta_x_rad
    # after the correction of iteration k the error is v (1 - ki) / ki in steady state
    np.testing.assert_allclose(x, vx * (1 - ki) / ki, rtol=1e-9, atol=1e-15)


def test_masked_correctors_do_not_move_and_invalid_bpms_are_ignored(plant) -> None:
    rx, ry = plant
    ctl = OrbitFeedbackController(rx, ry, alpha=0.05)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=NBPM) * 1e-4, rng.normal(size=NBPM) * 1e-4
    x_bad = x.copy()
    x_bad[3] = np.nan
    hmask = np.ones(NH, bool)
    hmask[[0, 5]] = False
    bpm_mask = np.ones(NBPM, bool)
    bpm_mask[7] = False
    step = ctl.step(
        (x_bad, y),
        (np.zeros(NBPM), np.zeros(NBPM)),
        bpm_mask=bpm_mask,
        corrector_masks=(hmask, None),
    )
    assert step.dtheta_x_rad[0] == 0.0 and step.dtheta_x_rad[5] == 0.0
    assert not step.used_bpms[3] and not step.used_bpms[7] and step.used_bpms.sum() == NBPM - 2
    used = step.used_bpms.astype(float)
    scale = np.linalg.norm(rx, 2)
    k = correction_matrix(
        rx, method="tikhonov", alpha=0.05 * scale, bpm_weights=used, corrector_weights=hmask * 1.0
    )
    np.testing.assert_allclose(step.dtheta_x_rad, -0.5 * k @ np.where(used > 0, x, 0.0))


def test_velocity_form_pi(plant) -> None:
    rx, ry = plant
    g = FeedbackGains(ki=0.4, kp=0.2)
    ctl = OrbitFeedbackController(rx, ry, gains_x=g, gains_y=g, alpha=0.0)
    rng = np.random.default_rng(5)
    e1, e2 = _in_range(rx, rng), _in_range(rx, rng)
    zero = np.zeros(NBPM)
    k = ctl.inverse("x", np.ones(NBPM, bool), np.ones(NH, bool))
    first = ctl.step((e1, zero), (zero, zero)).dtheta_x_rad
    second = ctl.step((e2, zero), (zero, zero)).dtheta_x_rad
    np.testing.assert_allclose(first, -0.4 * k @ e1)  # no previous error: pure integral
    np.testing.assert_allclose(second, -(0.4 * k @ e2 + 0.2 * (k @ e2 - k @ e1)))
    ctl.reset()
    np.testing.assert_allclose(ctl.step((e2, zero), (zero, zero)).dtheta_x_rad, -0.4 * k @ e2)


def test_bad_settings_and_input_are_refused(plant) -> None:
    rx, ry = plant
    with pytest.raises(ValueError, match="integral gain"):
        FeedbackGains(ki=1.5)
    with pytest.raises(ValueError, match="proportional gain"):
        FeedbackGains(kp=-0.1)
    with pytest.raises(ValueError, match="same BPMs"):
        OrbitFeedbackController(rx, ry[:-1])
    bad = rx.copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="x response block holds NaN"):
        OrbitFeedbackController(bad, ry)
    ctl = OrbitFeedbackController(rx, ry)
    nan = np.full(NBPM, np.nan)
    with pytest.raises(ValueError, match="no usable BPM"):
        ctl.step((nan, nan), (np.zeros(NBPM), np.zeros(NBPM)))
    with pytest.raises(ValueError, match="must have 20 BPMs"):
        ctl.step((np.zeros(3), np.zeros(3)), (np.zeros(NBPM), np.zeros(NBPM)))
