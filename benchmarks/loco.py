"""Benchmark: one LOCO iteration with the analytic Jacobian vs a finite-difference one (EBS).

In one run, on the EBS ring with 64 + 64 correctors, all 320 BPMs and every gradient (512
quadrupoles and 160 gradient dipoles, one parameter each):

1. a "measured" ORM from a copy of the lattice with 2e-3 rms relative gradient errors on the
   quadrupoles, 3 % BPM gains (x, y), 2 mrad BPM rolls, 3 % corrector gains and the noise of
   1 um BPM readings with +-40 urad kicks;
2. ours: one LOCO iteration = model ORM + analytic Jacobian (:class:`accplans.model.LocoModel`)
   + one Levenberg-Marquardt step (:func:`accplans.physics.fit_loco`);
3. the reference: the Jacobian by one-sided finite differences of pyAT's
   ``OrbitResponseMatrix.build_analytical`` (both planes, one rebuild per parameter), timed on
   a subset of the parameters and scaled to all of them (the full set takes minutes; the
   printout says so), plus the same LM step;
4. measure-fit-correct cycles (at most 3): each fits the model, then sets the quadrupoles to
   cancel the fitted errors, and reports the rms beta-beating of the corrected lattice and the
   fitted BPM gains and rolls against the truth.

Prints ``ratio speedup: X`` (the issue's target: X >= 10).

Run: ``.venv/bin/python benchmarks/loco.py [--subset N] [--cycles N] [--float32]``
"""

from __future__ import annotations

import argparse
import time

import at
import numpy as np
from at.latticetools import OrbitResponseMatrix

from accplans.config import load_description
from accplans.model import LocoModel, OnlineModel, gradient_correction, run_loco
from accplans.physics import fit_loco, loco_forward

NOISE_M = 1e-6
DF_HZ = 100.0


def beta_beat(ring: at.Lattice, design: np.ndarray, refpts: np.ndarray) -> np.ndarray:
    """rms (beta / beta_design - 1) at ``refpts`` per plane."""
    _, _, data = at.linopt6(ring, refpts=refpts.astype(np.uint32))
    return np.sqrt(np.mean((data.beta / design - 1.0) ** 2, axis=0))


def fd_jacobian_pyat(
    lm: LocoModel, hcorr: list[int], vcorr: list[int], params: list[int], step: float = 1e-5
) -> tuple[float, np.ndarray]:
    """One-sided finite differences of build_analytical; (seconds, (n, 2nb, nc) jacobian)."""
    ring = lm.ring.deepcopy()
    bpms = lm.bpm_elements.astype(np.uint32)

    def orm() -> np.ndarray:
        mx = OrbitResponseMatrix(ring, "x", bpms, np.array(hcorr, np.uint32)).build_analytical()
        my = OrbitResponseMatrix(ring, "y", bpms, np.array(vcorr, np.uint32)).build_analytical()
        out = np.zeros((2 * len(bpms), len(hcorr) + len(vcorr)))
        out[: len(bpms), : len(hcorr)] = mx
        out[len(bpms) :, len(hcorr) :] = my
        return out

    t0 = time.perf_counter()
    base = orm()
    jac = np.empty((len(params), 2 * len(bpms), len(hcorr) + len(vcorr)))
    for n, k in enumerate(params):
        drives = lm.parameters[k].drives
        for d in drives:
            ring[d.element].PolynomB[1] += step * d.coefficient
        jac[n] = (orm() - base) / step
        for d in drives:
            ring[d.element].PolynomB[1] -= step * d.coefficient
    return time.perf_counter() - t0, jac


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--subset", type=int, default=16, help="parameters timed by FD")
    parser.add_argument("--cycles", type=int, default=3, help="measure-fit-correct cycles")
    parser.add_argument("--float32", action="store_true", help="float32 Jacobian")
    parser.add_argument("--kick", type=float, default=100e-6, help="bipolar kick [rad]")
    parser.add_argument("--frames", type=int, default=4, help="orbit frames averaged per step")
    args = parser.parse_args()
    dtype = np.float32 if args.float32 else np.float64
    rng = np.random.default_rng(11)

    desc = load_description("ebs")
    model = OnlineModel(desc)
    h = list(desc.family("hcorr").devices)
    v = list(desc.family("vcorr").devices)
    corr = h[:: len(h) // 64][:64] + v[:: len(v) // 64][:64]
    lm = LocoModel.from_online(model, correctors=corr)
    npar = len(lm.parameters)
    nb, nc = len(lm.bpm_elements), len(lm.columns)
    quad = np.array([p.name in desc.device_map for p in lm.parameters])
    print(f"EBS: {nb} BPMs, {nc} correctors, {npar} gradients ({quad.sum()} quadrupoles)")

    truth = LocoModel.from_online(model, correctors=corr)
    k0 = np.array([s[0] for s in truth._start])
    err = np.where(quad, 2e-3 * rng.standard_normal(npar) * k0, 0.0)
    gain = 1.0 + 0.03 * rng.standard_normal((nb, 2))
    roll = 2e-3 * rng.standard_normal(nb)
    cgain = 1.0 + 0.03 * rng.standard_normal(nc)
    sigma = NOISE_M / np.sqrt(args.frames) * np.sqrt(2.0) / (2.0 * args.kick)
    sigma_rf = NOISE_M * np.sqrt(2.0) / (2.0 * DF_HZ)

    def measure(applied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        data = truth.evaluate(err + applied, jacobian=False)
        m, rf = loco_forward(data, gain, roll, cgain, np.zeros(nc))
        assert rf is not None
        return (
            m + sigma * rng.standard_normal(m.shape),
            rf + sigma_rf * rng.standard_normal(rf.shape),
        )

    measured, _ = measure(np.zeros(npar))
    m0 = truth.evaluate(err, jacobian=False).matrix
    nh = 64
    s_roll = sigma / np.sqrt((m0[:nb, :nh] ** 2).sum(1) + (m0[nb:, nh:] ** 2).sum(1))
    s_gain = sigma / np.sqrt((m0[:nb, :nh] ** 2).sum(1))
    print(
        f"noise: 1 um x {args.frames} frames, +-{1e6 * args.kick:.0f} urad: sigma "
        f"{sigma:.4f} m/rad; noise-limited BPM roll error rms "
        f"{1e3 * np.sqrt(np.mean(s_roll**2)):.3f} mrad, x gain error rms "
        f"{100 * np.sqrt(np.mean(s_gain**2)):.3f} %"
    )

    # -- ours: one iteration --------------------------------------------------------------
    t0 = time.perf_counter()
    data = lm.evaluate(rf=False, dtype=dtype)
    t_jac = time.perf_counter() - t0
    t0 = time.perf_counter()
    fit1 = fit_loco(measured, data, sigma=sigma, max_iterations=1)
    t_step = time.perf_counter() - t0
    t_ours = t_jac + t_step
    print(f"ours: ORM + analytic Jacobian {t_jac:.2f} s ({data.jacobian.nbytes / 1e6:.0f} MB), ")
    print(f"  LM step {t_step:.2f} s; one iteration {t_ours:.2f} s")
    print(
        f"  chi2/dof after one step: {fit1.chi2_per_dof:.2f} "
        f"(start {fit1.chi2[0] / measured.size:.0f})"
    )

    # -- reference: finite differences of build_analytical --------------------------------
    hcorr = [c[0].element for c in lm.columns[:64]]
    vcorr = [c[0].element for c in lm.columns[64:]]
    subset = list(np.linspace(0, npar - 1, args.subset).astype(int))
    t_sub, jac_fd = fd_jacobian_pyat(lm, hcorr, vcorr, subset)
    t_fd = t_sub / len(subset) * npar
    print(
        f"pyAT build_analytical finite differences: {t_sub:.1f} s for {len(subset)} parameters,"
        f" scaled to {npar}: {t_fd:.0f} s (not run in full)"
    )
    diag = np.zeros_like(jac_fd, dtype=bool)
    diag[:, :nb, :64] = True
    diag[:, nb:, 64:] = True
    ours = np.asarray(data.jacobian[subset], dtype=float)
    rel = np.linalg.norm((jac_fd - ours) * diag) / np.linalg.norm(ours * diag)
    print(f"  FD Jacobian (uncoupled thin-kick formula) vs ours, in-plane blocks: {rel:.1e} rel")
    t_ref = t_fd + t_step
    print(f"reference iteration: {t_ref:.0f} s")
    print(f"ratio speedup: {t_ref / t_ours:.1f}")

    # -- measure-fit-correct cycles ---------------------------------------------------------
    design = at.linopt6(lm.ring, refpts=lm.bpm_elements.astype(np.uint32))[2].beta
    applied = np.zeros(npar)
    truth.set_gradients(err)
    print(
        f"beta-beating before correction: {100 * beta_beat(truth.ring, design, lm.bpm_elements)} %"
    )
    for cycle in range(1, args.cycles + 1):
        measured, _ = measure(applied)
        lm.set_gradients(applied)
        t0 = time.perf_counter()
        fit = run_loco(lm, measured, sigma=sigma, max_iterations=4, dtype=dtype)
        dt = time.perf_counter() - t0
        # quadrupoles cancel the fitted errors, the dipoles' fitted share included
        applied = gradient_correction(lm, fit.gradients, quad)
        truth.set_gradients(err + applied)
        bb = beta_beat(truth.ring, design, lm.bpm_elements)
        g = fit.bpm_gain / gain
        g_rel = np.abs(g / g.mean() - 1.0)
        print(
            f"cycle {cycle}: fit {dt:.0f} s, {fit.iterations} evaluations, chi2/dof "
            f"{fit.chi2_per_dof:.2f}; beta-beating {100 * bb[0]:.3f} % / {100 * bb[1]:.3f} %;"
        )
        print(
            f"  BPM gains (relative to their mean) max {100 * g_rel.max():.3f} % rms "
            f"{100 * np.sqrt(np.mean(g_rel**2)):.3f} %; rolls max "
            f"{1e3 * np.abs(fit.bpm_roll - roll).max():.3f} mrad rms "
            f"{1e3 * np.sqrt(np.mean((fit.bpm_roll - roll) ** 2)):.3f} mrad"
        )


if __name__ == "__main__":
    main()
