"""The phase model of turn-by-turn optics: the analytic phase response against finite differences
of pyAT's optics, and a fit to the phases of a lattice with gradient errors that gives its beta
(pyAT on that lattice); the coupling ratios of the model against tracking, and the coupled fit
on the small-ring twin's turn-by-turn readings against its normal-mode beta."""

from __future__ import annotations

import at
import numpy as np
import pytest

from accplans.config import MachineDescription, load_description
from accplans.model import (
    OnlineModel,
    PhaseModel,
    fit_coupled_phase_model,
    fit_phase_model,
    phase_correction,
)
from accplans.physics import analyze_tbt, coupling_ratios
from accplans.sim import TbtSettings, Twin
from accplans.sim._tbt import track_shot


@pytest.fixture
def model(small_desc: MachineDescription) -> OnlineModel:
    return OnlineModel(small_desc)


def _centred(phase: np.ndarray) -> np.ndarray:
    return phase - phase.mean(axis=-1, keepdims=True)


def test_phase_response_matches_finite_differences(model: OnlineModel) -> None:
    """Every quadrupole's and sextupole's column, both planes, within 1 % of its largest entry
    (thick elements by Simpson's rule over their halves)."""
    pm = PhaseModel(model, sextupoles=True)
    jac = pm.jacobian()
    n = len(pm.bpm_names)
    h = 1e-5
    for p in range(len(pm.parameters)):
        step = np.zeros(len(pm.parameters))
        step[p] = h
        pm.add(step)
        up, _, _ = pm.optics()
        pm.add(-2 * step)
        down, _, _ = pm.optics()
        pm.add(step)
        numeric = _centred((up - down) / (2 * h)).ravel()
        analytic = np.concatenate([_centred(jac[:n, p]), _centred(jac[n:, p])])
        scale = np.max(np.abs(numeric))
        assert scale > 0, pm.parameters[p]
        np.testing.assert_allclose(analytic, numeric, atol=0.01 * scale, err_msg=pm.parameters[p])


def test_fit_to_phases_gives_the_beta_of_the_lattice(
    model: OnlineModel, small_desc: MachineDescription
) -> None:
    """0.5 % rms gradient errors on the quadrupoles (about 4 % beating): the model fitted to the
    exact phases at the BPMs has the true beta within 0.2 % rms; the correction computed from
    the same phases, applied to the erroneous lattice, cuts the beating at least 5x."""
    rng = np.random.default_rng(11)
    truth = model.lattice.deepcopy()
    quads = [d for d in small_desc.devices if d.kind == "quadrupole"]
    for dev in quads:
        for e in dev.elements:
            truth[e].PolynomB[1] *= 1 + 0.005 * rng.standard_normal()
    bpms = np.array([d.elements[0] for d in small_desc.devices if d.kind == "bpm"])
    _, _, true_optics = at.get_optics(truth, refpts=bpms)
    design = model.optics()
    beating = np.sqrt(np.mean((true_optics.beta / design.beta - 1) ** 2, axis=0))
    assert np.all(beating > 0.01), beating
    phases = true_optics.mu.T
    sigma = np.ones_like(phases)
    fit = fit_phase_model(model, phases, sigma, sextupoles=False)
    error = np.sqrt(np.mean((fit.beta.T / true_optics.beta - 1) ** 2, axis=0))
    assert np.all(error < 0.002), (beating, error)

    dk, _ = phase_correction(model, phases, design.mu.T, sigma, alpha=1e-3)
    for dev, change in zip(quads, dk, strict=True):
        for e in dev.elements:
            truth[e].PolynomB[1] += change
    _, _, corrected = at.get_optics(truth, refpts=bpms)
    after = np.sqrt(np.mean((corrected.beta / design.beta - 1) ** 2, axis=0))
    assert np.all(after < beating / 5), (beating, after)


def test_model_coupling_ratios_are_those_of_tracked_lines(
    model: OnlineModel, small_desc: MachineDescription
) -> None:
    """A particle tracked through the small ring with skew gradients in its sextupoles: the
    lines of its turn-by-turn positions (coupling_ratios) are the model's ratios within 1e-3."""
    pm = PhaseModel(model, sextupoles=True, skews=True)
    rng = np.random.default_rng(3)
    pm.add_skew(0.1 * rng.standard_normal(len(pm.skew_elements)))
    _, _, tunes = pm.optics()
    start = np.array([[1e-5], [0.0], [1e-5], [0.0], [0.0], [0.0]])
    refs = pm.bpm_elements.astype(np.uint32)
    tracked = pm.lattice.track(start, nturns=512, refpts=refs)[0]
    measured = coupling_ratios(tracked[0, 0], tracked[2, 0], tunes % 1.0)
    expected = pm.coupling()
    assert np.sqrt(np.mean(np.abs(expected) ** 2)) > 0.05
    np.testing.assert_allclose(measured, expected, atol=1e-3)


def test_coupled_fit_gives_the_twins_normal_mode_beta() -> None:
    """The small-ring twin (its default errors and noise) with 0.3 m^-2 rms skew windings (the
    normal-mode beta 1-1.5 % from the uncoupled one), four 100 urad shots of 1024 turns without
    decoherence: the coupled fit's beta is within 0.3 % rms of the true normal-mode beta and at
    least twice as close as the uncoupled fit's."""
    desc = load_description("small")
    twin = Twin(
        desc, seed=2, tbt=TbtSettings(chromaticity=(0.0, 0.0), detuning=((0.0, 0.0), (0.0, 0.0)))
    )
    hardware = twin.hardware.copy()
    rng = np.random.default_rng(5)
    for k, name in enumerate(twin.magnet_names):
        device = desc.device(name)
        if device.kind == "skew_quadrupole":
            assert device.calibration is not None
            hardware[k] = float(device.calibration.to_hardware(0.3 * rng.standard_normal()))
    twin.set_magnets(hardware)
    truth = twin.truth()
    orbit, _ = at.find_orbit4(truth.ring, dct=truth.dct_m)
    refs = truth.bpm_elements.astype(np.uint32)
    _, _, coupled = at.linopt6(truth.ring, refpts=refs, dp=float(orbit[4]))
    _, _, uncoupled = at.linopt2(truth.ring, refpts=refs, dp=float(orbit[4]))
    true_beta = np.asarray(coupled.beta).T
    share = np.sqrt(np.mean((np.asarray(uncoupled.beta).T / true_beta - 1) ** 2, axis=1))
    assert np.all(share > 0.008), share
    shots = [twin.tbt_readings(track_shot(twin.tbt_request(1e-4, 1e-4, 1024))) for _ in range(4)]
    names = [d.name for d in desc.devices if d.kind == "bpm"]
    design = OnlineModel(desc)
    reference = design.optics([*(desc.device(n).elements[0] for n in names), len(design.lattice)])
    mu = np.asarray(reference.mu, float)
    optics = analyze_tbt(
        np.array([x for x, _ in shots]),
        np.array([y for _, y in shots]),
        model_phase=mu[:-1].T,
        model_beta=np.asarray(reference.beta, float)[:-1].T,
        model_tunes=mu[-1] / (2 * np.pi),
    )
    good = ~optics.bad
    sigma = 1.0 / optics.amplitudes

    def error(beta: np.ndarray) -> np.ndarray:
        return np.sqrt(np.mean((beta[:, good] / true_beta[:, good] - 1) ** 2, axis=1))

    plain = fit_phase_model(OnlineModel(desc), optics.phases, sigma, good, bpms=names)
    fit = fit_coupled_phase_model(
        OnlineModel(desc), optics.phases, optics.coupling, sigma, good, bpms=names
    )
    assert np.all(error(fit.beta) < 0.003), error(fit.beta)
    assert np.all(error(fit.beta) < 0.5 * error(plain.beta)), (error(fit.beta), error(plain.beta))
    assert fit.coupling_residual_rms[-1] < 0.05 * fit.coupling_residual_rms[0]
