"""LOCO on the small ring: the analytic ORM Jacobian against finite differences, and the fit.

The "measured" ORM comes from a copy of the lattice with known gradient errors (pyAT, the same
exact linear response as the model's), read through known BPM gains and rolls and corrector
gains, with the noise of 1 um BPM readings. The kicks (+-0.5 mrad) give ~0.4 mm orbits on this
ring, whose ORM is ~0.8 m/rad: noise 0.2 % of the elements, as on EBS (~2 m/rad) with +-100 urad
kicks and 4 frames averaged per step (benchmarks/loco.py).
"""

from __future__ import annotations

import at
import numpy as np
import pytest

from accplans.config import MachineDescription
from accplans.model import (
    LocoModel,
    OnlineModel,
    gradient_correction,
    gradient_parameters,
    optics_correction,
    orm_jacobian,
    run_loco,
)
from accplans.physics import loco_forward

NOISE_M = 1e-6
KICK_RAD = 0.5e-3
SIGMA = NOISE_M * np.sqrt(2.0) / (2.0 * KICK_RAD)  # bipolar steps


def _fd_errors(lm: LocoModel, params: list[int], step: float = 1e-5) -> tuple[float, float]:
    """Worst relative error of the Jacobian (per column norm) and of the RF derivative."""
    data = lm.evaluate()
    assert data.jacobian_rf is not None
    worst, worst_rf = 0.0, 0.0
    start = lm.gradients.copy()
    for k in params:
        dk = np.zeros(len(lm.parameters))
        dk[k] = step
        plus = lm.evaluate(start + dk, jacobian=False)
        minus = lm.evaluate(start - dk, jacobian=False)
        assert plus.rf_column is not None and minus.rf_column is not None
        fd = (plus.matrix - minus.matrix) / (2 * step)
        fd_rf = (plus.rf_column - minus.rf_column) / (2 * step)
        scale = np.linalg.norm(fd, axis=0).max()
        worst = max(worst, float(np.linalg.norm(fd - data.jacobian[k], axis=0).max() / scale))
        worst_rf = max(
            worst_rf,
            float(np.linalg.norm(fd_rf - data.jacobian_rf[k]) / np.linalg.norm(fd_rf)),
        )
    lm.set_gradients(start)
    return worst, worst_rf


def test_jacobian_equals_finite_differences(small_desc: MachineDescription) -> None:
    model = OnlineModel(small_desc)
    lm = LocoModel.from_online(model)
    assert len(lm.parameters) == 24  # one per quadrupole device, no gradient dipoles here
    worst, worst_rf = _fd_errors(lm, list(range(0, 24, 3)))
    # exact on a centred orbit (the fixed-RF and dispersive terms included)
    assert worst < 1e-6
    assert worst_rf < 1e-6


def test_jacobian_with_an_orbit_in_the_sextupoles(small_desc: MachineDescription) -> None:
    model = OnlineModel(small_desc)
    rng = np.random.default_rng(1)
    model.set_hardware({n: float(rng.normal(0.0, 0.2)) for n in model._corrector_names})
    model.set_hardware({"RF": model.rf_frequency + 300.0})
    assert np.std(model.closed_orbit()) > 1e-4  # a 0.1 mm rms orbit
    lm = LocoModel.from_online(model)
    worst, worst_rf = _fd_errors(lm, list(range(0, 24, 3)))
    # the neglected change of the orbit with K (sextupole feed-down) stays small
    assert 1e-6 < worst < 3e-3
    assert worst_rf < 3e-3


def test_orm_jacobian_on_a_lattice_with_gradient_dipoles(small_desc: MachineDescription) -> None:
    ring = OnlineModel(small_desc).lattice.deepcopy()
    dipoles = [i for i, e in enumerate(ring) if isinstance(e, at.Dipole)]
    for i in dipoles[:4]:
        ring[i].PolynomB[1] = -0.05  # combined-function bends
    params = gradient_parameters(ring, per="family")
    assert [p.name for p in params] == ["QF", "QD", "B"]
    assert len(params[2].drives) == 4
    bpms = [i for i, e in enumerate(ring) if isinstance(e, at.Monitor)]
    cors = [i for i, e in enumerate(ring) if isinstance(e, at.Corrector)]
    data = orm_jacobian(
        ring, bpms, cors + cors, params, planes=["h"] * len(cors) + ["v"] * len(cors)
    )
    assert data.jacobian.shape == (3, 2 * len(bpms), 2 * len(cors))
    lm = LocoModel(
        ring,
        bpms,
        [[d] for d in _kicks(cors)],
        params,
    )
    worst, worst_rf = _fd_errors(lm, [0, 1, 2])
    assert worst < 1e-6 and worst_rf < 1e-6
    np.testing.assert_allclose(lm.evaluate().jacobian, data.jacobian, rtol=0, atol=1e-9)


def _kicks(cors: list[int]):
    from accplans.model import FieldDrive

    return [FieldDrive(c, "KickAngle", 0) for c in cors] + [
        FieldDrive(c, "KickAngle", 1) for c in cors
    ]


class _Machine:
    """A 'real' small ring: gradient errors, BPM and corrector calibration errors, noise."""

    def __init__(self, model: OnlineModel, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.truth = LocoModel.from_online(model)
        npar = len(self.truth.parameters)
        k0 = np.array([s[0] for s in self.truth._start])
        self.errors = 2e-3 * rng.standard_normal(npar) * k0
        nb, nc = len(self.truth.bpm_elements), len(self.truth.columns)
        self.gain = 1.0 + 0.03 * rng.standard_normal((nb, 2))
        self.roll = 2e-3 * rng.standard_normal(nb)
        self.cgain = 1.0 + 0.03 * rng.standard_normal(nc)
        self.correction = np.zeros(npar)
        self.truth.set_gradients(self.errors)

    def measure(self) -> np.ndarray:
        data = self.truth.evaluate(self.errors + self.correction, jacobian=False, rf=False)
        nc = len(self.cgain)
        m, _ = loco_forward(data, self.gain, self.roll, self.cgain, np.zeros(nc))
        return m + SIGMA * self.rng.standard_normal(m.shape)

    def beta_beat(self, design: np.ndarray, refpts: np.ndarray) -> np.ndarray:
        self.truth.set_gradients(self.errors + self.correction)
        _, _, data = at.linopt6(self.truth.ring, refpts=refpts.astype(np.uint32))
        return np.sqrt(np.mean((data.beta / design - 1.0) ** 2, axis=0))


@pytest.fixture
def machine(small_desc: MachineDescription) -> tuple[OnlineModel, _Machine]:
    model = OnlineModel(small_desc)
    return model, _Machine(model, seed=5)


def test_loco_recovers_calibrations_and_optics(machine) -> None:
    model, real = machine
    lm = LocoModel.from_online(model)
    design_beta = at.linopt6(lm.ring, refpts=lm.bpm_elements.astype(np.uint32))[2].beta
    fit = run_loco(lm, real.measure(), sigma=SIGMA, fit_corrector_roll=True)
    assert fit.converged
    assert 0.8 < fit.chi2_per_dof < 1.2  # the model explains the data to the noise
    # gains relative to their mean (the absolute scale is held by the mean corrector gain)
    g = fit.bpm_gain / real.gain
    assert np.max(np.abs(g / g.mean() - 1.0)) < 3e-3
    c = fit.corrector_gain / real.cgain
    assert np.max(np.abs(c / c.mean() - 1.0)) < 3e-3
    assert np.max(np.abs(fit.bpm_roll - real.roll)) < 0.5e-3
    # the truth has no corrector rolls: the fitted ones are noise (~0.4 mrad rms here)
    assert np.max(np.abs(fit.corrector_roll)) < 1.5e-3
    # the fitted model has the machine's optics, far better than the design had
    before = real.beta_beat(design_beta, lm.bpm_elements)
    fitted = at.linopt6(lm.ring, refpts=lm.bpm_elements.astype(np.uint32))[2].beta
    truth = at.linopt6(real.truth.ring, refpts=lm.bpm_elements.astype(np.uint32))[2].beta
    after = np.sqrt(np.mean((fitted / truth - 1.0) ** 2, axis=0))
    assert np.all(before > 5e-3)
    assert np.all(after < before / 5)
    # the gradients: the ORM constrains them up to the near-degenerate pairs of QF halves
    # that meet at each cell boundary, whose sum is what the optics sees
    qf = [k for k, p in enumerate(lm.parameters) if p.name in {"Q003", "Q004"}]
    assert len(qf) == 2
    summed = fit.gradients[qf].sum() - real.errors[qf].sum()
    assert abs(summed) < 0.3 * np.abs(real.errors).max()


def test_measure_fit_correct_cycles(machine) -> None:
    model, real = machine
    lm = LocoModel.from_online(model)
    refpts = lm.bpm_elements
    design_beta = at.linopt6(lm.ring, refpts=refpts.astype(np.uint32))[2].beta
    history = [real.beta_beat(design_beta, refpts)]
    for _ in range(2):
        lm.set_gradients(real.correction)  # the model knows the corrections applied
        fit = run_loco(lm, real.measure(), sigma=SIGMA, regularization=1e-2, max_iterations=4)
        hardware = optics_correction(model, lm, fit)
        assert set(hardware) == {p.name for p in lm.parameters}
        real.correction = -fit.gradients
        history.append(real.beta_beat(design_beta, refpts))
    assert np.all(history[0] > 5e-3)
    assert np.all(history[-1] <= 5e-3)
    assert np.all(history[1] < history[0] / 3)
    print("rms beta-beating per cycle (x, y):", np.array(history))


def test_optics_correction_gives_hardware_values(small_desc: MachineDescription) -> None:
    model = OnlineModel(small_desc)
    lm = LocoModel.from_online(model)
    dk = np.linspace(-1e-3, 1e-3, len(lm.parameters))
    hardware = optics_correction(model, lm, dk)
    name = lm.parameters[3].name
    cal = small_desc.device(name).calibration
    assert cal is not None
    assert cal.to_strength(hardware[name]) == pytest.approx(
        model.nominal_strength(name) - dk[3], rel=1e-9
    )


def test_quadrupoles_compensate_gradient_dipole_errors(small_desc: MachineDescription) -> None:
    ring = OnlineModel(small_desc).lattice.deepcopy()
    dipoles = [i for i, e in enumerate(ring) if isinstance(e, at.Dipole)]
    for i in dipoles:
        ring[i].PolynomB[1] = -0.05
    params = gradient_parameters(ring)  # one per element
    is_dipole = np.array([isinstance(ring[p.drives[0].element], at.Dipole) for p in params])
    assert is_dipole.sum() == len(dipoles)
    bpms = [i for i, e in enumerate(ring) if isinstance(e, at.Monitor)]
    cors = [i for i, e in enumerate(ring) if isinstance(e, at.Corrector)]
    lm = LocoModel(ring, bpms, [[d] for d in _kicks(cors)], params)
    refpts = np.asarray(bpms, dtype=np.uint32)
    design = at.linopt6(lm.ring, refpts=refpts)[2].beta
    errors = np.where(is_dipole, np.random.default_rng(3).normal(0.0, 2e-3, len(params)), 0.0)
    lm.set_gradients(errors)  # the fitted model: errors on the (unpowered) dipoles only

    def beat() -> np.ndarray:
        beta = at.linopt6(lm.ring, refpts=refpts)[2].beta
        return np.sqrt(np.mean((beta / design - 1.0) ** 2, axis=0))

    before = beat()
    change = gradient_correction(lm, errors, ~is_dipole)
    assert np.all(change[is_dipole] == 0.0)
    lm.set_gradients(errors + change)
    assert np.all(before > 1e-3)
    assert np.all(beat() < before / 5)


def test_bipolar_orm_is_pyats_closed_orbit_difference(small_desc: MachineDescription) -> None:
    """``bipolar_orm`` against ``at.find_orbit4`` at +-kick (fixed RF), with an orbit in the
    sextupoles; its difference from the linear ORM (the correction a fit adds) is the cubic
    term: it grows as kick^2."""
    model = OnlineModel(small_desc)
    rng = np.random.default_rng(2)
    model.set_hardware({n: float(rng.normal(0.0, 0.2)) for n in model._corrector_names})
    lm = LocoModel.from_online(model)
    ring = lm.ring.deepcopy()
    refpts = lm.bpm_elements.astype(np.uint32)
    kick = 0.5e-3
    cols = [0, 5, 30, 40]
    reference = np.empty((2 * len(refpts), len(cols)))
    for c, j in enumerate(cols):
        (drive,) = lm.columns[j]
        orbits = []
        for sign in (1.0, -1.0):
            elem = ring[drive.element]
            old = float(elem.KickAngle[drive.index])
            elem.KickAngle[drive.index] = old + sign * kick
            _, o = at.find_orbit4(ring, dct=lm.dct, refpts=refpts)
            elem.KickAngle[drive.index] = old
            orbits.append(np.concatenate([o[:, 0], o[:, 2]]))
        reference[:, c] = (orbits[0] - orbits[1]) / (2 * kick)
    bipolar = lm.bipolar_orm(kick)
    linear = lm.evaluate(jacobian=False, rf=False).matrix
    scale = np.abs(reference).max()
    np.testing.assert_allclose(bipolar[:, cols], reference, rtol=0, atol=1e-7 * scale)
    small = np.linalg.norm(lm.nonlinear_correction(kick / 2, linear))
    large = np.linalg.norm(lm.nonlinear_correction(kick, linear))
    assert np.linalg.norm(reference - linear[:, cols]) > 1e-6 * scale  # the term is there
    assert large / small == pytest.approx(4.0, rel=0.05)
    # evaluate(kick=...) is the linear ORM plus that correction; the Jacobian stays linear
    data = lm.evaluate(kick=kick)
    np.testing.assert_allclose(data.matrix, bipolar, rtol=0, atol=1e-9 * scale)
