"""TbT optics on synthetic data: a thin-lens FODO ring whose optics numpy computes exactly."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import (
    amplitude_outliers,
    analyze_tbt,
    beta_beating,
    beta_from_phase,
    coupling_ratios,
    find_bad_bpms,
    tbt_phases,
    tbt_tunes,
    zero_amplitude_tunes,
)

N_CELLS = 16
L_HALF = 2.0  # m between a quadrupole and the next BPM


def _ring_optics(kl: np.ndarray, plane: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Beta (m) and phase (rad) at BPMs after each thin quadrupole; total tune.

    Elements: thin quad (integrated strength kl[i], sign alternating), drift L_HALF, BPM,
    drift L_HALF. Vertical: the opposite focusing.
    """
    sign = 1 if plane == 0 else -1
    mats = []
    for k in kl:
        q = np.array([[1.0, 0.0], [-sign * k, 1.0]])
        d = np.array([[1.0, L_HALF], [0.0, 1.0]])
        mats.append((d @ q, d))  # quad then drift to the BPM; then drift to the next quad
    one = np.eye(2)
    for a, b in mats:
        one = b @ a @ one
    cos_mu = 0.5 * np.trace(one)
    assert abs(cos_mu) < 1
    sin_mu = np.sign(one[0, 1]) * np.sqrt(1 - cos_mu**2)
    beta0 = one[0, 1] / sin_mu
    alpha0 = (one[0, 0] - one[1, 1]) / (2 * sin_mu)
    gamma0 = (1 + alpha0**2) / beta0
    twiss = np.array([[beta0, -alpha0], [-alpha0, gamma0]])
    betas, phases = [], []
    mu = 0.0
    m = np.eye(2)
    for a, b in mats:
        for step, record in ((a, True), (b, False)):
            m_new = step @ m
            # phase advance through this step
            t = step @ twiss @ step.T
            dmu = np.arctan2(step[0, 1], step[0, 0] * twiss[0, 0] + step[0, 1] * twiss[0, 1])
            mu += dmu + 2 * np.pi if dmu < 0 else dmu
            twiss = t
            m = m_new
            if record:
                betas.append(twiss[0, 0])
                phases.append(mu)
    return np.array(betas), np.array(phases), mu / (2 * np.pi)


@pytest.fixture(scope="module")
def optics() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    kl0 = 0.3 * (-1.0) ** np.arange(N_CELLS * 2)
    kl = kl0 * (1 + 0.01 * rng.standard_normal(kl0.size))
    out: dict[str, np.ndarray] = {}
    for name, k in (("model", kl0), ("true", kl)):
        bx, px, qx = _ring_optics(k, 0)
        by, py, qy = _ring_optics(k, 1)
        out[name + "_beta"] = np.array([bx, by])
        out[name + "_phase"] = np.array([px, py])
        out[name + "_tune"] = np.array([qx, qy])
    return out


def _signals(
    optics: dict[str, np.ndarray], turns: int, noise: float, seed: int, amp_j: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = np.arange(turns)
    envelope = np.exp(-((n / 300.0) ** 2))
    out = []
    for plane in range(2):
        beta = optics["true_beta"][plane][:, None]
        phase = optics["true_phase"][plane][:, None]
        q = optics["true_tune"][plane]
        x = np.sqrt(2 * amp_j * beta) * envelope * np.cos(2 * np.pi * q * n + phase + 0.3)
        out.append(x + 1e-4 + noise * rng.standard_normal(x.shape))
    return out[0], out[1]


def test_tunes_and_phases_noiseless(optics: dict[str, np.ndarray]) -> None:
    x, y = _signals(optics, 512, 0.0, 0)
    for plane, data in enumerate((x, y)):
        q, per_bpm = tbt_tunes(data)
        frac = optics["true_tune"][plane] % 1.0
        frac = min(frac, 1 - frac)
        assert abs(q - frac) < 1e-7
        assert np.all(np.abs(per_bpm - frac) < 1e-6)


def test_beta_from_phase_recovers_the_true_beta(optics: dict[str, np.ndarray]) -> None:
    """Exact phases of the perturbed ring and the unperturbed model give the true beta."""
    for plane in range(2):
        true_b = optics["true_beta"][plane]
        model_b = optics["model_beta"][plane]
        beta, _ = beta_from_phase(
            optics["true_phase"][plane] + 1.234,
            optics["model_phase"][plane],
            model_b,
            float(optics["model_tune"][plane]),
        )
        _, beating_true = beta_beating(true_b, model_b)
        assert beating_true > 0.01  # the errors beat the beta
        rel = beta / true_b - 1
        # the 3-BPM method assumes model transport between BPMs: a residual well below beating
        assert np.sqrt(np.mean(rel**2)) < 0.2 * beating_true


def test_analyze_with_noise(optics: dict[str, np.ndarray]) -> None:
    x, y = _signals(optics, 1024, 1e-6, 1)
    result = analyze_tbt(
        x,
        y,
        model_phase=optics["model_phase"],
        model_beta=optics["model_beta"],
        model_tunes=optics["model_tune"],
    )
    assert not np.any(result.bad)
    np.testing.assert_allclose(result.tunes, optics["true_tune"] % 1.0, atol=2e-5)
    for plane in range(2):
        rel = result.beta[plane] / optics["true_beta"][plane] - 1
        assert np.sqrt(np.mean(rel**2)) < 0.01
        # measured phase advance between neighbours equals the true one
        adv = np.diff(result.phase_advance[plane])
        np.testing.assert_allclose(adv, np.diff(optics["true_phase"][plane]), atol=5e-3)
        phase, amp = tbt_phases(x if plane == 0 else y, result.tunes[plane])
        assert np.all(np.isfinite(phase))
        assert np.all(amp > 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bad_bpms_are_flagged(optics: dict[str, np.ndarray], seed: int) -> None:
    x, y = _signals(optics, 1024, 5e-6, seed)
    rng = np.random.default_rng(seed)
    dead, noisy, gain, swapped = rng.choice(x.shape[0], 4, replace=False)
    x[dead] = y[dead] = 0.0
    x[noisy] += 60e-6 * rng.standard_normal(x.shape[1])
    y[noisy] += 60e-6 * rng.standard_normal(x.shape[1])
    x[gain] *= 1.3
    y[gain] *= 1.3
    x[swapped], y[swapped] = y[swapped].copy(), x[swapped].copy()
    flagged = np.zeros(x.shape[0], bool)
    for plane, data in enumerate((x, y)):
        bad = find_bad_bpms(data, model_beta=optics["model_beta"][plane])
        flagged |= bad.flagged
    assert set(np.flatnonzero(flagged)) == {dead, noisy, gain, swapped}
    # the whole analysis (the gain jump: its amplitude against beta from phase, or its
    # noise, 1.3x the others', owning a singular vector)
    result = analyze_tbt(
        x,
        y,
        model_phase=optics["model_phase"],
        model_beta=optics["model_beta"],
        model_tunes=optics["model_tune"],
    )
    assert set(np.flatnonzero(result.bad)) == {dead, noisy, gain, swapped}


def test_gain_jump_against_beta_from_phase_despite_beating() -> None:
    """20 % beating hides a 1.3 gain from the model's beta, not from beta from phase."""
    rng = np.random.default_rng(5)
    beta = 5.0 * (1 + 0.1 * rng.standard_normal(200))
    amp = np.sqrt(beta)
    amp[17] *= 1.3
    flagged = amplitude_outliers(amp, beta)
    assert np.flatnonzero(flagged).tolist() == [17]
    # against a model beta 10 % off everywhere, the same BPM is not an outlier
    model = beta * (1 + 0.2 * rng.standard_normal(200))
    assert not amplitude_outliers(amp, model)[17]


def test_zero_amplitude_tunes_removes_linear_detuning() -> None:
    q0 = np.array([0.21, 0.34])
    slope = np.array([3e5, -2e5])  # dQ per kick^2 (1/rad^2)
    kicks = np.array([20e-6, 40e-6, 60e-6])
    tunes = q0 + slope * kicks[:, None] ** 2
    np.testing.assert_allclose(zero_amplitude_tunes(kicks, tunes), q0, atol=1e-12)
    with pytest.raises(ValueError, match="two kick amplitudes"):
        zero_amplitude_tunes(kicks[:1], tunes[:1])


def test_coupling_ratios_of_two_decohering_modes() -> None:
    """Two modes, each seen in both planes with a complex ratio per BPM and its own decoherence,
    kicked with different phases per shot, 2 um noise: the ratios within 3e-3."""
    rng = np.random.default_rng(4)
    n_bpm, turns, tunes = 20, 1024, np.array([0.21, 0.34])
    ratios = 0.1 * (rng.standard_normal((2, n_bpm)) + 1j * rng.standard_normal((2, n_bpm)))
    own = 1e-3 * np.exp(1j * rng.uniform(0, 2 * np.pi, (2, n_bpm)))
    n = np.arange(turns)
    xs, ys = [], []
    for _ in range(3):
        planes = np.zeros((2, n_bpm, turns))
        for mode in range(2):
            start = np.exp(1j * rng.uniform(0, 2 * np.pi))
            line = np.exp(-n / (200.0 + 300 * mode) + 2j * np.pi * tunes[mode] * n)
            signal = start * own[mode][:, None] * line
            planes[mode] += signal.real
            planes[1 - mode] += (ratios[mode][:, None] * signal).real
        planes += 2e-6 * rng.standard_normal(planes.shape)
        xs.append(planes[0])
        ys.append(planes[1])
    measured = coupling_ratios(np.array(xs), np.array(ys), tunes)
    np.testing.assert_allclose(measured, ratios, atol=3e-3)
