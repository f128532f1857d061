"""Benchmark: what limits one LOCO fit on the EBS twin, without the noise (no EPICS).

The twin's physics (:class:`accplans.sim.Twin`, in process) with the issue's errors (2e-3
quadrupole gradients, 3 % BPM and corrector gains, 2 mrad BPM rolls, cut at 3 sigma) and BPM
noise ``--noise`` (default 0): the ORM of 64 + 64 correctors spread round the ring is measured
as ``measure_orm`` does (bipolar ``+-kick``, closed-orbit differences read through the BPM
calibrations), then one fit (:func:`accplans.model.run_loco`, 672 gradients, BPM gains and
rolls, corrector gains) with the bipolar model ORM at the same kicks, or with the linear
model ORM (``--linear``). Without noise, whatever separates the fit from the truth is a
systematic of the model or of the solver.

Prints the rms beta-beating of the fitted model against the true lattice at the BPMs (pyAT
``linopt6`` at the twin's ``dct``), the relative BPM gains (fitted / true, relative to the mean
per plane) max and rms per plane, the BPM rolls against the truth, and the relative size of
the bipolar correction (bipolar ORM minus linear ORM) of the xx and yy blocks.

Run: ``nice -n 10 .venv/bin/python benchmarks/loco_systematics.py [--seed 1] [--linear]
[--noise 0] [--kick 1e-4] [--max-iterations 6]``
"""

from __future__ import annotations

import argparse
import time

import at
import numpy as np

from accplans.config import build_lattice, load_description
from accplans.model import LocoModel, OnlineModel, gradient_parameters, run_loco
from accplans.sim import ErrorModel, Twin


def spread(names: list[str], n: int) -> list[str]:
    """``n`` names evenly spread over ``names``."""
    return [names[i] for i in np.linspace(0, len(names) - 1, n).round().astype(int)]


def measure(twin: Twin, correctors: list[str], kick: float) -> np.ndarray:
    """Bipolar ORM [m/rad] (2 nbpm, ncorr) as the BPMs read it; the magnets are put back."""
    start = twin.hardware.copy()
    columns = []
    for name in correctors:
        i = twin.magnet_index[name]
        cal = twin.description.device(name).calibration
        assert cal is not None
        s0 = float(cal.to_strength(start[i]))
        orbits = []
        for sign in (1.0, -1.0):
            h = start.copy()
            h[i] = float(cal.to_hardware(s0 + sign * kick))
            twin.set_magnets(h)
            f = twin.compute()
            orbits.append(np.concatenate([f.x_mm, f.y_mm]) * 1e-3)
        columns.append((orbits[0] - orbits[1]) / (2.0 * kick))
    twin.set_magnets(start)
    twin.compute()
    return np.array(columns).T


def rms(a: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Root mean square."""
    return np.sqrt(np.mean(np.square(a), axis=axis))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--noise", type=float, default=0.0, help="BPM noise per reading (m)")
    ap.add_argument("--kick", type=float, default=100e-6)
    ap.add_argument("--linear", action="store_true", help="fit with the linear model ORM")
    ap.add_argument("--max-iterations", type=int, default=6)
    a = ap.parse_args()
    errors = ErrorModel(
        **{
            **ErrorModel.none().to_dict(),
            "quad_gradient_rel": 2e-3,
            "bpm_gain_rel": 0.03,
            "corrector_gain_rel": 0.03,
            "bpm_roll_rad": 2e-3,
            "bpm_noise_m": a.noise,
            "cut_sigma": 3.0,
        }
    )
    d = load_description("ebs")
    twin = Twin(d, errors=errors, seed=a.seed, noise=a.noise > 0)
    h, v = list(d.families["hcorr"].devices), list(d.families["vcorr"].devices)
    select = spread(h, 64) + spread(v, 64)
    measured = measure(twin, select, a.kick)
    truth = twin.truth()
    model = OnlineModel(d)
    model.set_hardware(
        {
            **dict(zip(twin.magnet_names, twin.hardware.tolist(), strict=True)),
            "RF": twin.rf_frequency,
        }
    )
    lm = LocoModel.from_online(model, twin.bpm_names, select, gradient_parameters(model))
    nb, nh = len(twin.bpm_names), len(select) // 2
    linear = lm.evaluate(jacobian=False, rf=False).matrix
    extra = lm.nonlinear_correction(a.kick, linear)
    for name, rows, cols in (
        ("xx", slice(0, nb), slice(0, nh)),
        ("yy", slice(nb, None), slice(nh, None)),
    ):
        rel = np.linalg.norm(extra[rows, cols], axis=0) / np.linalg.norm(linear[rows, cols], axis=0)
        print(f"bipolar - linear ORM, {name} columns: mean {rel.mean():.2e}, max {rel.max():.2e}")
    # the noise of one bipolar element; without noise any positive scale gives the same fit
    sigma = max(a.noise, 1e-6) * np.sqrt(2.0) / (2.0 * a.kick)
    t0 = time.perf_counter()
    fit = run_loco(
        lm,
        measured,
        sigma=sigma,
        kick=None if a.linear else np.full(len(select), a.kick),
        max_iterations=a.max_iterations,
    )
    elapsed = time.perf_counter() - t0
    bpm_el = truth.bpm_elements.astype(np.uint32)
    true_beta = at.linopt6(truth.ring, refpts=bpm_el, dct=truth.dct_m)[2].beta
    fitted_beta = at.linopt6(lm.ring, refpts=bpm_el, dct=lm.dct)[2].beta
    design_beta = at.linopt6(build_lattice(d), refpts=bpm_el)[2].beta
    g = fit.bpm_gain / truth["bpm_gain"]
    g_rel = g / g.mean(axis=0) - 1.0
    droll = fit.bpm_roll - truth["bpm_roll_rad"]
    before, after = rms(true_beta / design_beta - 1.0, 0), rms(fitted_beta / true_beta - 1.0, 0)
    print(
        f"seed {a.seed}, {'linear' if a.linear else 'bipolar'} model ORM, noise {a.noise:g} m, "
        f"kick {a.kick:g} rad: {fit.iterations} evaluations in {elapsed:.0f} s, chi2/dof "
        f"{fit.chi2_per_dof:.3g} (sigma {sigma:.2e} m/rad), {fit.kept} of "
        f"{len(fit.singular_values)} singular values kept"
    )
    print(
        f"  true beta-beating (against the design): {100 * before[0]:.3f} % / "
        f"{100 * before[1]:.3f} %"
    )
    print(f"  fitted model against the truth: {100 * after[0]:.3f} % / {100 * after[1]:.3f} %")
    print(
        f"  relative BPM gains x max {100 * np.abs(g_rel[:, 0]).max():.3f} % rms "
        f"{100 * rms(g_rel[:, 0]):.3f} %, y max {100 * np.abs(g_rel[:, 1]).max():.3f} % rms "
        f"{100 * rms(g_rel[:, 1]):.3f} %; rolls max {1e3 * np.abs(droll).max():.4f} mrad rms "
        f"{1e3 * rms(droll):.4f} mrad"
    )


if __name__ == "__main__":
    main()
