"""Benchmark: the optics correction from turn-by-turn phases on the EBS twin, against its truth.

For each seed (default 1 2 3), the EBS twin in process (no EPICS: the same analysis and
correction jobs that ``correct_optics_tbt`` runs in its worker, ``_analyze`` and
``tbt_phase_correction``), its default errors and noise (10 um TbT noise per turn):
``--iterations`` times, ``--shots`` pinger shots of ``--kick`` urad and ``--turns`` turns,
the quadrupole changes toward the design phases (Tikhonov ``--alpha``) set on the twin. Printed
per iteration: the true rms beta-beating (pyAT on the twin's true lattice against the design
beta at the BPMs), the measured 3-BPM beating, the rms phase error against the design. The issue
asks the correction to reduce the true beating at least 3x; the last line gives the ratio.

Run: ``nice -n 10 .venv/bin/python benchmarks/tbt_correction.py [--seeds 1 2 3]``.
"""

from __future__ import annotations

import argparse
import time

import at
import numpy as np

from accplans.config import load_description
from accplans.model import OnlineModel
from accplans.plans.optics_tbt import _phase_error, tbt_phase_correction
from accplans.plans.tbt import _analyze, model_tbt_reference
from accplans.sim import Twin
from accplans.sim._tbt import track_shot


def true_beating(twin: Twin, design_beta: np.ndarray) -> np.ndarray:
    """(2,) rms beating of the twin's true lattice against ``design_beta`` (2, n) at the BPMs."""
    orbit0, _ = at.find_orbit4(twin.ring, dct=twin.dct)
    _, _, optics = at.get_optics(twin.ring, refpts=twin.bpm_elements, dp=float(orbit0[4]))
    return np.sqrt(np.mean((optics.beta.T / design_beta - 1) ** 2, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--turns", type=int, default=1024)
    parser.add_argument("--kick", type=float, default=60.0, help="urad, both planes")
    parser.add_argument("--alpha", type=float, default=1e-2)
    args = parser.parse_args()
    description = load_description("ebs")
    model = OnlineModel(description)
    quads = [d.name for d in description.devices if d.kind == "quadrupole"]
    summary = []
    for seed in args.seeds:
        twin = Twin(description, seed=seed)
        names = twin.bpm_names
        target, design_beta, design_tunes = model_tbt_reference(description, names)
        index = [twin.magnet_index[q] for q in quads]
        strengths = np.array([model.nominal_strength(q) for q in quads])
        history = []
        for k in range(args.iterations + 1):
            t0 = time.perf_counter()
            shot = track_shot(twin.tbt_request(args.kick * 1e-6, args.kick * 1e-6, args.turns))
            xs, ys = zip(*(twin.tbt_readings(shot) for _ in range(args.shots)), strict=True)
            optics = _analyze(np.array(xs), np.array(ys), target, design_beta, design_tunes, 6.0)
            truth = true_beating(twin, design_beta)
            history.append(truth)
            err = _phase_error(optics, target)
            print(
                f"seed {seed} iteration {k}: true beating x {truth[0]:.4f} y {truth[1]:.4f}; "
                f"measured (3-BPM) x {optics.beating_rms[0]:.4f} y {optics.beating_rms[1]:.4f}; "
                f"phase error x {err[0] * 1e3:.2f} y {err[1] * 1e3:.2f} mrad; "
                f"{int(optics.bad.sum())} BPMs flagged",
                flush=True,
            )
            if k == args.iterations:
                break
            hardware = {q: float(twin.hardware[i]) for q, i in zip(quads, index, strict=True)}
            dk = tbt_phase_correction(
                description,
                hardware,
                names,
                quads,
                optics.phases,
                target,
                optics.amplitudes,
                ~optics.bad,
                args.alpha,
            )
            strengths = strengths + dk
            values = twin.hardware.copy()
            for q, i, kk in zip(quads, index, strengths, strict=True):
                values[i] = model._calibration(q).to_hardware(float(kk))
            twin.set_magnets(values)
            print(
                f"  step {k + 1}: max |dK/K| {np.max(np.abs(dk / strengths)):.2e}, "
                f"{time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        summary.append((seed, history[0], history[-1]))
    print("seed  true beating before (x, y)  after (x, y)      ratio before/after (x, y)")
    for seed, before, after in summary:
        ratio = before / after
        print(
            f"{seed:4d}  {before[0]:.4f} {before[1]:.4f}             {after[0]:.4f} {after[1]:.4f}"
            f"     {ratio[0]:.1f} {ratio[1]:.1f}"
        )
    worst = min(min(b / a) for _, b, a in summary)
    print(f"ratio beating reduction (worst plane and seed): {worst:.1f}")


if __name__ == "__main__":
    main()
