"""Benchmark: serial ``bba`` on the EBS twin for a sample of BPMs, against the twin's truth.

The issue's error model (100 um rms BPM offsets, 10 um rms quadrupole misalignments, 1 um BPM
noise, the other errors at their defaults); for each seed the orbit is corrected first
(``correct_orbit``'s defaults; ``--no-correct`` skips it), then ``bba`` runs with its defaults
on ``--n-bpms`` BPMs spread round the ring. Printed per seed: the wall time, the accepted fits,
the rms and largest error of the accepted centres against ``accplans.sim.bba_truth`` (the
issue: <= 2 um rms, <= 6 um max, both planes), the median reported uncertainty, the largest
pull, and the reasons of the rejected fits. The full-ring serial and parallel benchmark is
``benchmarks/bba_full_ring.py``.

Run: ``.venv/bin/python benchmarks/bba.py [--seeds 1 2 3] [--n-bpms 20]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from accplans.sim import ErrorModel, bba_truth, client_environment, reserve_ports, run_twin

PORTS = reserve_ports(1)[0]
os.environ.update(client_environment([PORTS]))
from bluesky import RunEngine  # noqa: E402

from accplans.config import load_description  # noqa: E402
from accplans.data import BackgroundTiledWriter, LocalTiled, load_result  # noqa: E402
from accplans.devices import connect_sync  # noqa: E402
from accplans.plans import bba, bba_knobs, correct_orbit, shutdown_workers  # noqa: E402

ERRORS = ErrorModel(bpm_offset_m=100e-6, quad_shift_m=10e-6, bpm_noise_m=1e-6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--n-bpms", type=int, default=20)
    ap.add_argument("--dk-rel", type=float, default=None)
    ap.add_argument("--n-samples", type=int, default=None)
    ap.add_argument("--span", type=float, default=None)
    ap.add_argument("--no-correct", action="store_true")
    a = ap.parse_args()
    d = load_description("ebs")
    names = list(d.families["bpms"].devices)
    sel = [names[i] for i in np.linspace(0, len(names) - 1, a.n_bpms).round().astype(int)]
    allerr = []
    with tempfile.TemporaryDirectory() as tmp, LocalTiled(tmp + "/tiled") as tiled:
        client = tiled.client()
        for seed in a.seeds:
            with run_twin("ebs", seed=seed, errors=ERRORS, ports=PORTS) as twin:
                engine = RunEngine({}, call_returns_result=True)
                writer = BackgroundTiledWriter(client)
                engine.subscribe(writer)
                m = connect_sync(d, address=f"127.0.0.1:{PORTS.ca}")
                if not a.no_correct:
                    engine(correct_orbit(m.bpms, [m.hcorr, m.vcorr], rf=m.rf))
                truth = twin.control.export_truth(f"{tmp}/{seed}")
                t0 = time.perf_counter()
                given = {"dk_rel": a.dk_rel, "n_samples": a.n_samples, "span_m": a.span}
                options = {k: v for k, v in given.items() if v is not None}
                res = engine(bba(m.bpms, m.quadrupoles, m.hcorr, m.vcorr, select=sel, **options))
                el = time.perf_counter() - t0
                (uid,) = res.run_start_uids
                writer.flush(timeout=60)
                r = load_result(client, uid, "bba")
                err = []
                for k, n in enumerate(r["bpm_names"]):
                    t = bba_truth(truth, d, n, r["quadrupole_names"][k], bba_knobs(r, n))
                    err.append(np.array([r["center_x"][k], r["center_y"][k]]) - t)
                err = np.array(err)
                acc = np.c_[r["accepted_x"], r["accepted_y"]]
                std = np.c_[r["std_center_x"], r["std_center_y"]]
                rms = np.sqrt(np.nanmean(np.where(acc, err, np.nan) ** 2, axis=0))
                mx = np.nanmax(np.abs(np.where(acc, err, np.nan)), axis=0)
                print(
                    f"seed {seed}: {el:.0f} s, accepted {acc.sum(0)} of {len(sel)}; "
                    f"rms x {rms[0] * 1e6:.2f} y {rms[1] * 1e6:.2f} um, max x {mx[0] * 1e6:.2f} "
                    f"y {mx[1] * 1e6:.2f} um; median std {np.median(std, 0) * 1e6} um; "
                    f"|pull|max {np.nanmax(np.abs(err / std)):.1f}",
                    flush=True,
                )
                for k, n in enumerate(r["bpm_names"]):
                    if not acc[k].all():
                        print("  rejected", n, r["rejected_x"][k], "|", r["rejected_y"][k])
                allerr.append(np.where(acc, err, np.nan))
                writer.close(timeout=60)
                engine.loop.call_soon_threadsafe(engine.loop.stop)
        client.context.close()
    shutdown_workers()
    e = np.concatenate(allerr)
    print(
        f"all seeds: rms x {np.sqrt(np.nanmean(e[:, 0] ** 2)) * 1e6:.2f} y "
        f"{np.sqrt(np.nanmean(e[:, 1] ** 2)) * 1e6:.2f} um, max {np.nanmax(np.abs(e), 0) * 1e6} um"
    )


if __name__ == "__main__":
    main()
