"""How well can BPM readings tell the beam's energy offset? The information limit on EBS.

``correct_rf_frequency`` finds the RF frequency that centres the beam energy from the
horizontal orbit, whose energy part is ``D delta``. The rest of the orbit comes from kicks:
the correctors' (known setpoints) and the errors' (unknown: misaligned quadrupoles). An orbit
made by error kicks can look like ``D delta`` at the BPMs, so the BPMs cannot separate the two
beyond a limit set by how large the error kicks may be.

This script computes that limit as the Bayesian posterior of ``delta``: the orbit at the 320
BPMs (1 um noise, 10 frames averaged) is ``R_c theta_c + R_q theta_q + D delta``, with
``theta_c`` the known corrector kicks (fixed-energy response ``R_c``), ``theta_q`` a kick at
every quadrupole and gradient dipole with the prior ``N(0, (K1 L * 10 um)^2)`` of the twin's
10 um rms misalignments (``R_q`` from the model's optics), and a flat prior on ``delta``. The
posterior standard deviation of ``delta`` is the best any estimator from these readings can do
on average (the twin's errors are drawn from that prior); it prints it in Hz of RF frequency
(``f alpha_c sigma_delta``) with, for each seed, the error of the posterior mean against the
twin's true energy offset, after an orbit correction, at +-100 um of circumference error.

It runs the twin in-process (no EPICS): a statement about information, not about a plan.

Run: ``.venv/bin/python benchmarks/rf_energy_limit.py [--seeds 1 2 3]``.
"""

from __future__ import annotations

import argparse

import at
import numpy as np

from accplans.config import load_description
from accplans.model import OnlineModel
from accplans.physics import solve_correction
from accplans.sim import ErrorModel, Twin

# the scenario of benchmarks/dispersion.py (BPM offsets off)
ERRORS = ErrorModel(
    quad_roll_rad=100e-6,
    sext_shift_m=30e-6,
    sext_shift_x_fraction=0.0,
    quad_gradient_rel=0.0,
    bpm_offset_m=0.0,
)
FRAMES = 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    description = load_description("ebs")
    design = OnlineModel(description)
    hnames = [d.name for d in description.devices if d.kind == "corrector" and d.plane == "h"]
    vnames = [d.name for d in description.devices if d.kind == "corrector" and d.plane == "v"]
    bpm_names = [d.name for d in description.devices if d.kind == "bpm"]
    nb, nh = len(bpm_names), len(hnames)
    response = design.orm(bpm_names, hnames + vnames, rf=True)
    assert response.rf_column is not None
    alpha = 1e-3 * np.linalg.norm(response.matrix, 2)
    ring = design.lattice
    circumference, alpha_c, f0 = ring.circumference, design.alpha_c, design.rf_frequency
    _, _, optics = at.get_optics(ring, refpts=range(len(ring) + 1))
    tune = optics["mu"][-1, 0] / (2 * np.pi)

    def middle(values: np.ndarray, elements: np.ndarray) -> np.ndarray:
        return 0.5 * (values[elements] + values[elements + 1])

    bpm_el = np.array([description.device(n).elements[0] for n in bpm_names])
    kick_el = np.array(
        [
            i
            for i, e in enumerate(ring)
            if isinstance(e, (at.Quadrupole, at.Dipole)) and e.PolynomB[1] != 0
        ]
    )
    beta_b, mu_b = optics["beta"][bpm_el, 0], optics["mu"][bpm_el, 0]
    d_b = optics["dispersion"][bpm_el, 0]
    beta_q, mu_q = middle(optics["beta"][:, 0], kick_el), middle(optics["mu"][:, 0], kick_el)
    # fixed-energy kick response (betatron closed orbit)
    r_q = (
        np.sqrt(np.outer(beta_b, beta_q))
        / (2 * np.sin(np.pi * tune))
        * np.cos(np.abs(mu_b[:, None] - mu_q[None, :]) - np.pi * tune)
    )
    k1l = np.array([ring[i].PolynomB[1] * ring[i].Length for i in kick_el])
    sigma_q = np.abs(k1l) * ERRORS.quad_shift_m
    sigma_n = ERRORS.bpm_noise_m / np.sqrt(FRAMES)
    cor_el = np.array([description.device(n).elements[0] for n in hnames])
    d_c = middle(optics["dispersion"][:, 0], cor_el)
    r_c = response.matrix[:nb, :nh] + np.outer(d_b, d_c) / (alpha_c * circumference)
    a = np.hstack([r_q, d_b[:, None]])
    normal = a.T @ a / sigma_n**2 + np.diag(np.concatenate([1 / sigma_q**2, [0.0]]))
    covariance = np.linalg.inv(normal)
    hz = f0 * alpha_c
    sigma_hz = float(np.sqrt(covariance[-1, -1])) * hz
    print(
        f"{len(kick_el)} error kicks, {nb} BPMs, {FRAMES} frames of "
        f"{ERRORS.bpm_noise_m * 1e6:.0f} um: posterior sigma of the energy offset = "
        f"{sigma_hz:.2f} Hz of RF frequency (f alpha_c = {hz:.0f} Hz per unit delta)"
    )
    names = hnames + vnames
    for seed in args.seeds:
        twin = Twin(description, errors=ERRORS, seed=seed, noise=True)
        slots = [twin.magnet_index[n] for n in names]
        calibrations = [description.device(n).calibration for n in names]
        kicks = np.zeros(len(names))

        def orbit(frames: int, twin: Twin = twin) -> np.ndarray:
            frames_ = [twin.compute() for _ in range(frames)]
            return np.mean([np.concatenate([f.x_mm, f.y_mm]) * 1e-3 for f in frames_], axis=0)

        for _ in range(3):  # correct_orbit's default, in-process
            step = solve_correction(
                response.matrix,
                orbit(3),
                method="tikhonov",
                alpha=alpha,
                rf_column=response.rf_column,
            )
            kicks += step.dtheta_rad
            hardware = twin.hardware.copy()
            for k, (slot, cal) in enumerate(zip(slots, calibrations, strict=True)):
                hardware[slot] = float(cal.to_hardware(kicks[k])) if cal is not None else kicks[k]
            twin.set_magnets(hardware)
            twin.set_rf(frequency_hz=twin.truth().rf_frequency_hz + step.df_hz)
        for dl in (100e-6, -100e-6):
            twin.set_circumference_error(dl)
            residual = orbit(FRAMES)[:nb] - r_c @ kicks[:nh]
            mean = covariance @ (a.T @ residual / sigma_n**2)
            error_hz = (float(mean[-1]) - twin.energy_offset()) * hz
            print(
                f"seed {seed} dL {dl * 1e6:+.0f} um: posterior mean - true energy offset = "
                f"{error_hz:+.2f} Hz ({error_hz / sigma_hz:+.1f} sigma)",
                flush=True,
            )
        twin.set_circumference_error(0.0)


if __name__ == "__main__":
    main()
