"""Benchmark: ``measure_adts`` and ``correct_nonlinear`` on the EBS twin (issue 4, non-linear).

For each seed (default 1 2 3) the EBS twin runs with its default errors and noise (10 um TbT
noise per turn); through a RunEngine and EPICS:

1. ``measure_adts`` (defaults: 5 kicks per plane up to a model tune shift of 0.004, 128 turns,
   actions from the TbT amplitudes): each of dQx/dJx, dQx/dJy, dQy/dJx, dQy/dJy against
   pyAT's ``at.physics.detuning`` of the twin's exported true lattice at the served RF frequency
   (the cross term symmetrised as the smaller of pyAT's two fits, as the twin does); the issue:
   each within 10 %, every shot's |dQ| < 0.01.
2. ``correct_nonlinear`` (objective ``--terms``, default dQx/dJx, the other coefficients held
   near their start; the six sextupole family knobs; chromaticity and tunes held in the solve,
   then trimmed back to their measured starting values with ``correct_tunes``,
   ``correct_chromaticity``, ``correct_tunes``; verification shots before and after): the
   true objective before / after (issue: cut >= 2), and the true chromaticity and tunes change
   (issue: within 0.1 and 1e-3). With the six families of EBS and the chromaticity held, the
   norm of all three coefficients cannot be cut 2x in the model (1.6x at best), ``dqx_djx``
   alone can (to zero, the others held).

Run: ``nice -n 10 .venv/bin/python benchmarks/nonlinear.py [--seeds 1 2 3] [--skip-correction]
[--skip-measurement] [--terms dqx_djx ...] [--rounds 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from typing import Any, cast

import numpy as np

from accplans.sim import client_environment, reserve_ports, run_twin

PORTS = reserve_ports(1)[0]
os.environ.update(client_environment([PORTS]))

import at  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402

from accplans.config import load_description  # noqa: E402
from accplans.devices import Pinger, TbtBuffers, connect_sync  # noqa: E402
from accplans.plans import correct_nonlinear, measure_adts, shutdown_workers  # noqa: E402
from accplans.plans.nonlinear import ADTS_TERMS  # noqa: E402


def true_state(twin: Any, directory: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(detuning (2, 2), chromaticity, tunes) of the twin's true lattice at its RF frequency."""
    truth = twin.control.export_truth(directory)
    ring = truth.ring
    orbit0, _ = at.find_orbit4(ring, dct=truth.dct_m)
    dp = float(orbit0[4])
    _, q1, *_ = at.physics.detuning(ring, xm=3e-5, ym=3e-5, npoints=3, nturns=512, dp=dp)
    q1 = np.asarray(q1, dtype=float)
    off = q1[0, 1] if abs(q1[0, 1]) <= abs(q1[1, 0]) else q1[1, 0]
    q1[0, 1] = q1[1, 0] = off
    chrom = np.asarray(at.get_chrom(ring, dct=truth.dct_m), dtype=float)[:2]
    _, ringdata, _ = at.get_optics(ring, dct=truth.dct_m)
    return q1, chrom, np.asarray(ringdata.tune, dtype=float)[:2]


def collect_results(engine: RunEngine, plan: Any) -> tuple[dict[str, dict[str, Any]], float]:
    """Run ``plan``; its result streams (kind -> field -> value) and its duration (s)."""
    found: dict[str, dict[str, Any]] = {}
    descriptors: dict[str, str] = {}

    def collect(name: str, doc: dict[str, Any]) -> None:
        if name == "descriptor":
            descriptors[doc["uid"]] = doc["name"]
        elif name == "event":
            stream = descriptors.get(doc["descriptor"], "")
            if stream.startswith("result_"):
                kind = stream.removeprefix("result_")
                found[kind] = {
                    k.removeprefix(f"{kind}_"): np.asarray(v) for k, v in doc["data"].items()
                }

    t0 = time.perf_counter()
    engine(plan, cast(Any, collect))
    return found, time.perf_counter() - t0


def objective(q1: np.ndarray, terms: list[str]) -> float:
    return float(np.linalg.norm([q1[ADTS_TERMS[t]] for t in terms]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--skip-correction", action="store_true")
    parser.add_argument("--skip-measurement", action="store_true")
    parser.add_argument(
        "--terms", nargs="+", default=["dqx_djx"], help="objective (the others are held)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="step-and-trim rounds")
    args = parser.parse_args()
    description = load_description("ebs")
    family = description.families_of_kind("bpm")[0]
    engine = RunEngine({})
    buffers = TbtBuffers.for_family(family, description)
    pinger = Pinger.for_machine(description)
    rows = []
    with run_twin("ebs", seed=args.seeds[0], noise=True, ports=PORTS) as twin:
        machine = connect_sync(description, address=f"127.0.0.1:{PORTS.ca}", timeout=60)

        async def connect() -> None:
            await asyncio.gather(buffers.connect(), pinger.connect())

        call_in_bluesky_event_loop(connect())
        for seed in args.seeds:  # the measurement on every seed first, then the correction
            if args.skip_measurement:
                rows.append({"seed": seed, "rel": np.zeros((2, 2)), "shift": 0.0})
                continue
            twin.control.reset(seed)
            with tempfile.TemporaryDirectory() as tmp:
                q1, _, _ = true_state(twin, os.path.join(tmp, "a"))
            found, dt = collect_results(engine, measure_adts(buffers, pinger))
            adts = found["adts"]
            rel = (adts["detuning"] - q1) / q1
            row: dict[str, Any] = {"seed": seed, "rel": rel, "shift": float(adts["max_tune_shift"])}
            print(f"seed {seed}: true detuning (1/m) {np.round(q1).tolist()}", flush=True)
            print(
                f"  measure_adts {np.round(adts['detuning']).tolist()} +- "
                f"{np.round(adts['std_detuning']).tolist()}; relative error "
                f"{np.round(rel, 4).tolist()}; kicks x {np.round(adts['kicks'][:5, 0] * 1e6, 1)}"
                f" y {np.round(adts['kicks'][5:, 1] * 1e6, 1)} urad; max |dQ| "
                f"{row['shift']:.4f}; model {np.round(adts['model_detuning']).tolist()} "
                f"({dt:.1f} s)",
                flush=True,
            )
            rows.append(row)
        for row in [] if args.skip_correction else rows:
            seed = row["seed"]
            twin.control.reset(seed)
            with tempfile.TemporaryDirectory() as tmp:
                q1, xi0, q0 = true_state(twin, os.path.join(tmp, "a"))
            found, dt = collect_results(
                engine,
                correct_nonlinear(
                    buffers,
                    pinger,
                    machine.sextupoles,
                    terms=args.terms,
                    tune=machine.tune,
                    rf=machine.rf,
                    quadrupoles=machine.quadrupoles,
                    rounds=args.rounds,
                ),
            )
            nl = found["nonlinear"]
            with tempfile.TemporaryDirectory() as tmp:
                q1_after, xi1, q_1 = true_state(twin, os.path.join(tmp, "b"))
            row["cut"] = objective(q1, args.terms) / objective(q1_after, args.terms)
            row["dxi"] = xi1 - xi0
            row["dq"] = (q_1 - q0 + 0.5) % 1.0 - 0.5
            row["measured_cut"] = float(
                nl["measured_objective_before"] / nl["measured_objective_after"]
            )
            print(
                f"seed {seed}: correct_nonlinear: knob steps "
                f"{np.round(nl['knob_steps'], 4).tolist()}; model objective "
                f"{float(nl['model_objective_before']):.0f} -> "
                f"{float(nl['model_objective_after']):.0f}; measured "
                f"{float(nl['measured_objective_before']):.0f} -> "
                f"{float(nl['measured_objective_after']):.0f} (cut "
                f"{row['measured_cut']:.2f}); true {objective(q1, args.terms):.0f} -> "
                f"{objective(q1_after, args.terms):.0f} (cut {row['cut']:.2f}), true detuning "
                "after "
                f"{np.round(q1_after).tolist()} (before {np.round(q1).tolist()}); measured "
                f"tunes {nl['tunes_start']} -> {nl['tunes_end']}, chromaticity "
                f"{nl['chromaticity_start']} -> {nl['chromaticity_end']}; true chromaticity "
                f"{np.round(xi0, 3).tolist()}, change "
                f"{np.round(row['dxi'], 4).tolist()}, tune change "
                f"{np.round(row['dq'], 6).tolist()} ({dt:.1f} s)",
                flush=True,
            )
    shutdown_workers()
    print(
        "\nsummary (issue 4: ADTS within 10 %, |dQ| < 0.01; cut >= 2, |dxi| <= 0.1, |dQ| <= 1e-3)"
    )
    for row in rows:
        line = f"seed {row['seed']}"
        if not args.skip_measurement:
            line += (
                f": max |relative error| {np.max(np.abs(row['rel'])):.4f}, "
                f"max |dQ| of shots {row['shift']:.4f}"
            )
        if "cut" in row:
            line += (
                f"; true cut {row['cut']:.2f} (measured {row['measured_cut']:.2f}), "
                f"|dxi| {np.max(np.abs(row['dxi'])):.3f}, |dQ| {np.max(np.abs(row['dq'])):.1e}"
            )
        print(line)


if __name__ == "__main__":
    main()
