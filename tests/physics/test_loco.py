"""LOCO's algebra: the calibration model, the fit on a synthetic linear model, its degeneracies."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import LocoModelData, compensate_gradients, fit_loco, loco_forward

NB, NC, NPAR = 12, 10, 6


def _model(rng: np.random.Generator, rf: bool = True) -> LocoModelData:
    """A random coupled 'model' ORM with a random linear dependence on NPAR gradients."""
    m = rng.normal(0.0, 5.0, (2 * NB, NC))
    m[NB:, :5] *= 0.05  # weak cross-plane blocks, as on a real ring
    m[:NB, 5:] *= 0.05
    return LocoModelData(
        matrix=m,
        jacobian=rng.normal(0.0, 20.0, (NPAR, 2 * NB, NC)),
        orthogonal=np.vstack([m[NB:], m[:NB]]) * rng.uniform(0.5, 1.5, (2 * NB, NC)),
        rf_column=rng.normal(0.0, 1e-6, 2 * NB) if rf else None,
        jacobian_rf=rng.normal(0.0, 1e-6, (NPAR, 2 * NB)) if rf else None,
    )


def _truth(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "dk": rng.normal(0.0, 1e-3, NPAR),
        "gain": 1.0 + rng.normal(0.0, 0.03, (NB, 2)),
        "roll": rng.normal(0.0, 2e-3, NB),
        "cgain": 1.0 + rng.normal(0.0, 0.03, NC),
        "croll": rng.normal(0.0, 2e-3, NC),
    }


def _measure(model: LocoModelData, t: dict[str, np.ndarray]):
    return loco_forward(model.linearized(t["dk"]), t["gain"], t["roll"], t["cgain"], t["croll"])


def test_forward_is_the_bpm_and_corrector_model() -> None:
    rng = np.random.default_rng(0)
    model = _model(rng)
    t = _truth(rng)
    m, rf = loco_forward(model, t["gain"], t["roll"], t["cgain"], t["croll"])
    b, j = 3, 7
    assert model.orthogonal is not None
    col = t["cgain"][j] * (
        np.cos(t["croll"][j]) * model.matrix[:, j] + np.sin(t["croll"][j]) * model.orthogonal[:, j]
    )
    c, s = np.cos(t["roll"][b]), np.sin(t["roll"][b])
    x, y = col[b], col[NB + b]
    assert m[b, j] == pytest.approx(t["gain"][b, 0] * (c * x + s * y), rel=1e-12)
    assert m[NB + b, j] == pytest.approx(t["gain"][b, 1] * (-s * x + c * y), rel=1e-12)
    # the RF column has BPM calibration but no corrector gain
    assert rf is not None and model.rf_column is not None
    rx, ry = model.rf_column[b], model.rf_column[NB + b]
    assert rf[b] == pytest.approx(t["gain"][b, 0] * (c * rx + s * ry), rel=1e-12)


def test_fit_recovers_everything_without_noise() -> None:
    rng = np.random.default_rng(1)
    model = _model(rng)
    t = _truth(rng)
    meas, rf = _measure(model, t)
    fit = fit_loco(
        meas,
        model,
        sigma=1e-3,
        measured_rf=rf,
        sigma_rf=1e-9,
        fit_corrector_roll=True,
        max_iterations=30,
        svd_cut=1e-8,
        tolerance=1e-12,
    )
    # the RF column fixes the absolute scale: everything is recovered, not only ratios
    np.testing.assert_allclose(fit.gradients, t["dk"], atol=1e-9)
    np.testing.assert_allclose(fit.bpm_gain, t["gain"], atol=1e-9)
    np.testing.assert_allclose(fit.bpm_roll, t["roll"], atol=1e-9)
    np.testing.assert_allclose(fit.corrector_gain, t["cgain"], atol=1e-9)
    np.testing.assert_allclose(fit.corrector_roll, t["croll"], atol=1e-9)
    assert fit.chi2[-1] < 1e-12 * fit.chi2[0]
    assert fit.chi2 == sorted(fit.chi2, reverse=True)  # LM never accepts a worse step
    # the fitted calibration undoes itself on the measured matrix
    ideal = loco_forward(
        model.linearized(t["dk"]), np.ones((NB, 2)), np.zeros(NB), np.ones(NC), t["croll"]
    )[0]
    np.testing.assert_allclose(fit.calibrate(meas), ideal, atol=1e-6 * np.abs(ideal).max())


def test_gain_degeneracy_is_held_by_the_mean_corrector_gain() -> None:
    rng = np.random.default_rng(2)
    model = _model(rng, rf=False)
    t = _truth(rng)
    t["croll"] = np.zeros(NC)
    meas, _ = _measure(model, t)
    fit = fit_loco(meas, model, sigma=1e-3, max_iterations=30, svd_cut=1e-8, tolerance=1e-12)
    # only BPM gain x corrector gain products are observable: the constraint sets the scale
    assert np.mean(fit.corrector_gain) == pytest.approx(1.0, abs=1e-9)
    scale = np.mean(t["cgain"])
    np.testing.assert_allclose(fit.corrector_gain, t["cgain"] / scale, rtol=1e-7)
    np.testing.assert_allclose(fit.bpm_gain, t["gain"] * scale, rtol=1e-7)
    np.testing.assert_allclose(fit.gradients, t["dk"], atol=1e-9)
    assert fit.converged


def test_noise_gives_statistical_errors() -> None:
    rng = np.random.default_rng(3)
    model = _model(rng)
    t = _truth(rng)
    t["croll"] = np.zeros(NC)
    meas, _ = _measure(model, t)
    sigma = 0.01
    fits = []
    for _ in range(20):
        noisy = meas + sigma * rng.standard_normal(meas.shape)
        fits.append(fit_loco(noisy, model, sigma=sigma, max_iterations=10, svd_cut=1e-8))
    dk = np.array([f.gradients for f in fits])
    # the spread of the fitted gradients matches the reported one-sigma error (within 50 %)
    spread = dk.std(axis=0)
    reported = np.mean([f.gradient_sigma for f in fits], axis=0)
    np.testing.assert_allclose(spread, reported, rtol=0.5)
    chi2 = np.array([f.chi2_per_dof for f in fits])
    assert 0.7 < chi2.mean() < 1.3


def test_masked_elements_and_bad_input() -> None:
    rng = np.random.default_rng(4)
    model = _model(rng, rf=False)
    t = _truth(rng)
    t["croll"] = np.zeros(NC)
    meas, _ = _measure(model, t)
    meas[2, :] = np.nan  # a dead BPM (x plane)
    fit = fit_loco(meas, model, sigma=1e-3, max_iterations=30, svd_cut=1e-8, tolerance=1e-12)
    ratio = fit.bpm_gain / t["gain"]
    ok = np.ones((NB, 2), bool)
    ok[2, 0] = False
    np.testing.assert_allclose(ratio[ok], ratio[ok].mean(), rtol=1e-7)
    with pytest.raises(ValueError, match="measured must be"):
        fit_loco(meas[:-1], model)
    with pytest.raises(ValueError, match="sigma_rf"):
        fit_loco(meas, _model(rng), measured_rf=np.zeros(2 * NB))
    with pytest.raises(ValueError, match="orthogonal"):
        fit_loco(
            meas,
            LocoModelData(model.matrix, model.jacobian),
            fit_corrector_roll=True,
        )
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_loco(
            meas,
            model,
            fit_gradients=False,
            fit_bpm_gain=False,
            fit_bpm_roll=False,
            fit_corrector_gain=False,
        )


def test_compensation_of_unsettable_gradients() -> None:
    rng = np.random.default_rng(5)
    jac = rng.normal(0.0, 1.0, (NPAR, 2 * NB, NC))
    errors = rng.normal(0.0, 1e-3, NPAR)
    settable = np.ones(NPAR, bool)
    np.testing.assert_allclose(
        compensate_gradients(jac, errors, settable, svd_cut=1e-8), -errors, atol=1e-12
    )
    # the last parameter cannot be set, but its ORM change is a combination of two others
    jac[-1] = 0.7 * jac[0] - 0.4 * jac[1]
    settable[-1] = False
    x = compensate_gradients(jac, errors, settable, svd_cut=1e-8)
    assert x[-1] == 0.0
    residual = np.tensordot(x + errors, jac, axes=1)
    assert np.max(np.abs(residual)) < 1e-12
    with pytest.raises(ValueError, match="no settable"):
        compensate_gradients(jac, errors, np.zeros(NPAR, bool))
