"""Benchmark: serial and parallel ``bba`` on the full EBS ring, against the twin's truth.

The issue's error model (100 um rms BPM offsets, 10 um rms quadrupole misalignments, 1 um BPM
noise, the other errors at their defaults). For each seed: ``correct_orbit`` to zero readings
(its defaults), the true rms distance between beam and quadrupole centres at the BBA'd
quadrupoles (``accplans.sim.beam_in_quadrupoles``), then ``bba`` (``--mode parallel``,
``serial`` or ``both``) on every ``--every``-th BPM (1: all 320), then ``correct_orbit``
to the BBA reference (``reference=`` the ``bba`` result: the beam to the quadrupoles'
centres, its default ``reference_point``) and the distance again; with ``--compare-points``
first the readings to the centres (``reference_point="bpm"``), and with ``--ref-alphas`` at
several Tikhonov parameters (fractions of the largest singular value), each from the state
the pass started in (``--ref-iterations``: the correction's iterations).

Printed per run: wall time, machine steps (``n_steps`` of the result: every set-wait-read
step of the plan, ``2 * n_positions`` per BPM in serial BBA, per group in parallel BBA),
accepted fits, errors of the accepted centres against ``accplans.sim.bba_truth`` (the
noise-free reading with the beam through the quadrupole's centre, moved by the plan's own
knob: for parallel BBA the group's bumps together), the largest pull, and the beam-quadrupole
distances; at the end ``ratio parallel/serial steps: X``. Without a serial run on a seed the
serial step count is the deterministic ``2 * n_positions * n_bpms``.

Run: ``nice -n 10 .venv/bin/python benchmarks/bba_full_ring.py [--seeds 1 2 3]
[--mode parallel] [--every 1] [--compare-points] [--ref-alphas 1e-3 3e-4]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any, cast

import numpy as np

from accplans.sim import (
    ErrorModel,
    bba_truth,
    beam_in_quadrupoles,
    client_environment,
    reserve_ports,
    run_twin,
)

PORTS = reserve_ports(1)[0]
os.environ.update(client_environment([PORTS]))
from bluesky import RunEngine  # noqa: E402
from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402

from accplans.config import load_description  # noqa: E402
from accplans.data import BackgroundTiledWriter, LocalTiled, load_result  # noqa: E402
from accplans.devices import call_async, connect_sync  # noqa: E402
from accplans.model import OnlineModel  # noqa: E402
from accplans.plans import (  # noqa: E402
    bba,
    bba_knobs,
    correct_coupling,
    correct_orbit,
    measure_orm,
    shutdown_workers,
)
from accplans.plans.orbit_correction import DEFAULT_RELATIVE_ALPHA  # noqa: E402

ERRORS = ErrorModel(bpm_offset_m=100e-6, quad_shift_m=10e-6, bpm_noise_m=1e-6)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.nanmean(np.asarray(a) ** 2)))


def _set_hardware(families: Any, values: dict[str, np.ndarray]) -> Any:
    """A plan: the families' hardware setpoints back to ``values`` (by family name)."""
    for f in families:
        yield from call_async(f.set_hardware, values[f.name])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--mode", choices=("parallel", "serial", "both"), default="parallel")
    ap.add_argument("--serial-seeds", type=int, nargs="*", default=None)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--max-group", type=int, default=None)
    ap.add_argument("--max-inflation", type=float, default=None)
    ap.add_argument("--n-samples", type=int, default=None)
    ap.add_argument("--n-positions", type=int, default=None)
    ap.add_argument("--dk-rel", type=float, default=None, help="bba(dk_rel=...)")
    ap.add_argument(
        "--fit-coupling", type=int, choices=(0, 1), default=None, help="bba(fit_coupling=...)"
    )
    ap.add_argument(
        "--passes",
        type=int,
        default=1,
        help="bba passes, each after correct_orbit to the previous pass's reference",
    )
    ap.add_argument("--no-truth", action="store_true", help="skip bba_truth (slow)")
    ap.add_argument(
        "--ref-alphas",
        type=float,
        nargs="+",
        default=[DEFAULT_RELATIVE_ALPHA],
        help="Tikhonov parameters (x the largest singular value) of the correction to the "
        "BBA reference, each from the same start",
    )
    ap.add_argument("--ref-iterations", type=int, default=3, help="its iterations")
    ap.add_argument(
        "--compare-points",
        action="store_true",
        help="also correct the readings to the centres (reference_point='bpm') first",
    )
    ap.add_argument(
        "--dump",
        default=None,
        help="write per-BPM centres, errors and groups to DUMP-<seed>-<mode>.npz",
    )
    ap.add_argument(
        "--response",
        action="store_true",
        help="parallel: measure the ORM (every corrector, RF) first and give it to bba "
        "(its steps are counted apart)",
    )
    ap.add_argument("--orm-frames", type=int, default=1, help="measure_orm(n_frames=...)")
    ap.add_argument(
        "--correct-coupling",
        action="store_true",
        help="correct_coupling (every 9th corrector) and correct_orbit again before bba",
    )
    a = ap.parse_args()
    d = load_description("ebs")
    s_max = float(np.linalg.norm(OnlineModel(d).orm(rf=False).matrix, 2))
    names = list(d.families["bpms"].devices)
    sel = names[:: a.every]
    options = {
        k: v
        for k, v in {
            "max_group": a.max_group,
            "max_inflation": a.max_inflation,
            "n_samples": a.n_samples,
            "n_positions": a.n_positions,
            "dk_rel": a.dk_rel,
            "fit_coupling": None if a.fit_coupling is None else bool(a.fit_coupling),
        }.items()
        if v is not None
    }
    serial_options = {
        k: v for k, v in options.items() if k in ("n_samples", "n_positions", "dk_rel")
    }
    steps: dict[str, list[float]] = {"parallel": [], "serial": []}
    orm_steps: list[float] = []
    per_bpm = 2 * int(options.get("n_positions", 5))
    with tempfile.TemporaryDirectory() as tmp, LocalTiled(tmp + "/tiled") as tiled:
        client = tiled.client()
        for seed in a.seeds:
            modes = ["parallel", "serial"] if a.mode == "both" else [a.mode]
            if a.serial_seeds is not None and seed not in a.serial_seeds:
                modes = [m for m in modes if m != "serial"]
            for mode in modes:
                with run_twin("ebs", seed=seed, errors=ERRORS, ports=PORTS) as twin:
                    engine = RunEngine({}, call_returns_result=True)
                    writer = BackgroundTiledWriter(client)
                    engine.subscribe(writer)
                    m = connect_sync(d, address=f"127.0.0.1:{PORTS.ca}")
                    engine(correct_orbit(m.bpms, [m.hcorr, m.vcorr], rf=m.rf))
                    if a.correct_coupling:
                        assert m.rf is not None and m.skew is not None
                        every9 = d.family("hcorr").devices[::9] + d.family("vcorr").devices[::9]
                        cc = engine(
                            correct_coupling(
                                m.bpms, [m.hcorr, m.vcorr], m.rf, m.skew, select=every9
                            )
                        )
                        print(f"seed {seed}: correct_coupling {cast(Any, cc).exit_status}")
                        engine(correct_orbit(m.bpms, [m.hcorr, m.vcorr], rf=m.rf))
                    seed_steps = 0.0
                    response = None
                    if a.response and mode == "parallel":
                        t0 = time.perf_counter()
                        orm_run = engine(
                            measure_orm(m.bpms, [m.hcorr, m.vcorr], rf=m.rf, n_frames=a.orm_frames)
                        )
                        (orm_uid,) = cast(Any, orm_run).run_start_uids
                        writer.flush(timeout=120)
                        response = load_result(client, orm_uid, "orm")
                        n_cols = len(response["corrector_names"])
                        orm_steps.append((2 * n_cols + 2) / len(sel))
                        print(
                            f"seed {seed}: measure_orm {n_cols} correctors + RF, "
                            f"{2 * n_cols + 2} steps, {time.perf_counter() - t0:.0f} s",
                            flush=True,
                        )
                    for npass in range(1, a.passes + 1):
                        truth = twin.control.export_truth(f"{tmp}/{seed}-{mode}-{npass}-0")
                        start_h = call_in_bluesky_event_loop(m.hcorr.strengths())
                        start_v = call_in_bluesky_event_loop(m.vcorr.strengths())
                        t0 = time.perf_counter()
                        kw = options if mode == "parallel" else serial_options
                        res = engine(
                            bba(
                                m.bpms, m.quadrupoles, m.hcorr, m.vcorr, select=sel,
                                parallel=mode == "parallel", response=response, **kw,
                            )
                        )  # fmt: skip
                        wall = time.perf_counter() - t0
                        (uid,) = cast(Any, res).run_start_uids
                        writer.flush(timeout=120)
                        r = load_result(client, uid, "bba")
                        quads = list(r["quadrupole_names"])
                        before = beam_in_quadrupoles(truth, d, quads)
                        n_steps = int(r["n_steps"])
                        seed_steps += n_steps / len(sel)
                        acc = np.c_[r["accepted_x"], r["accepted_y"]]
                        ngroups = len(set(np.asarray(r["group"]).tolist()))
                        line = (
                            f"seed {seed} {mode} pass {npass}: {len(sel)} BPMs, {wall:.0f} s, "
                            f"{n_steps} steps "
                            f"({n_steps / len(sel):.2f} per BPM, {ngroups} groups), accepted "
                            f"{acc.sum(0)}"
                        )
                        if not a.no_truth:
                            err = np.array(
                                [
                                    np.array([r["center_x"][k], r["center_y"][k]])
                                    - bba_truth(truth, d, n, quads[k], bba_knobs(r, n))
                                    for k, n in enumerate(r["bpm_names"])
                                ]
                            )
                            e = np.where(acc, err, np.nan)
                            std = np.c_[r["std_center_x"], r["std_center_y"]]
                            if a.dump:
                                np.savez(
                                    f"{a.dump}-{seed}-{mode}-{npass}.npz",
                                    bpm_names=np.asarray(r["bpm_names"]),
                                    center=np.c_[r["center_x"], r["center_y"]],
                                    std=std,
                                    error=err,
                                    accepted=acc,
                                    group=np.asarray(r["group"]),
                                )
                            line += (
                                f"; error rms x {_rms(e[:, 0]) * 1e6:.2f} y "
                                f"{_rms(e[:, 1]) * 1e6:.2f}"
                                f" um, max x {np.nanmax(np.abs(e[:, 0])) * 1e6:.2f} y "
                                f"{np.nanmax(np.abs(e[:, 1])) * 1e6:.2f} um; median std "
                                f"{np.median(std, 0) * 1e6} um; |pull| max "
                                f"{np.nanmax(np.abs(e / std)):.1f}, 95% "
                                f"{np.nanquantile(np.abs(e / std), 0.95):.1f}"
                            )
                        print(line, flush=True)
                        rejected = [
                            (n, r["rejected_x"][k], r["rejected_y"][k])
                            for k, n in enumerate(r["bpm_names"])
                            if not acc[k].all()
                        ]
                        for item in rejected[:10]:
                            print("  rejected", *item)
                        print(
                            f"  beam - quadrupole centre, rms over the {len(quads)} quadrupoles: "
                            f"at the pass's start (pass 1: orbit corrected to zero) x "
                            f"{_rms(before[:, 0]) * 1e6:.1f} y "
                            f"{_rms(before[:, 1]) * 1e6:.1f} um ({_rms(before) * 1e6:.1f} both)",
                            flush=True,
                        )
                        # the readings to the centres, then (the default) the beam to the
                        # quadrupoles' centres, each from the state the pass started in and
                        # at each Tikhonov parameter; the later passes start from the last
                        assert m.rf is not None
                        moved = (m.hcorr, m.vcorr, m.rf)
                        start = {
                            f.name: call_in_bluesky_event_loop(f.hardware_setpoints())
                            for f in moved
                        }
                        trials = [("bpm", a.ref_alphas[0])] if a.compare_points else []
                        trials += [("quadrupole", rel) for rel in a.ref_alphas]
                        for point, rel in trials:
                            engine(_set_hardware(moved, start))
                            engine(
                                correct_orbit(
                                    m.bpms, [m.hcorr, m.vcorr], rf=m.rf, reference=r,
                                    reference_point=point, alpha=rel * s_max,
                                    iterations=a.ref_iterations,
                                )
                            )  # fmt: skip
                            truth2 = twin.control.export_truth(
                                f"{tmp}/{seed}-{mode}-{npass}-{point}-{rel}"
                            )
                            after = beam_in_quadrupoles(truth2, d, quads)
                            kicks = np.concatenate(
                                [
                                    call_in_bluesky_event_loop(f.strengths()) - s0
                                    for f, s0 in ((m.hcorr, start_h), (m.vcorr, start_v))
                                ]
                            )
                            print(
                                f"  after correct_orbit(reference=bba, reference_point={point!r},"
                                f" alpha {rel:g} x the largest singular value) x "
                                f"{_rms(after[:, 0]) * 1e6:.1f} y {_rms(after[:, 1]) * 1e6:.1f}"
                                f" um ({_rms(after) * 1e6:.1f} both); ratio "
                                f"{_rms(before) / _rms(after):.1f}; kicks changed by "
                                f"{_rms(kicks) * 1e6:.1f} urad rms",
                                flush=True,
                            )
                    steps[mode].append(seed_steps)
                    writer.close(timeout=120)
                    engine.loop.call_soon_threadsafe(engine.loop.stop)
        client.context.close()
    shutdown_workers()
    serial = np.mean(steps["serial"]) if steps["serial"] else float(per_bpm)
    if not steps["serial"]:
        print(f"serial steps: {per_bpm} per BPM (2 * n_positions, deterministic; not run)")
    if steps["parallel"]:
        print(f"ratio parallel/serial steps: {np.mean(steps['parallel']) / serial:.3f}")
    if orm_steps:
        total = np.mean(steps["parallel"]) + np.mean(orm_steps)
        print(
            f"with the ORM it used (bipolar, every corrector and the RF): "
            f"{total / serial:.3f} of the serial steps"
        )


if __name__ == "__main__":
    main()
