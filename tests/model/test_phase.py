"""The phase model of turn-by-turn optics: the analytic phase response against finite differences
of pyAT's optics, and a fit to the phases of a lattice with gradient errors that gives its beta
(pyAT on that lattice)."""

from __future__ import annotations

import at
import numpy as np
import pytest

from accplans.config import MachineDescription
from accplans.model import OnlineModel, PhaseModel, fit_phase_model, phase_correction


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
