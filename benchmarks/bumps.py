"""Benchmark: orbit_bump on the EBS twin (errors, BPM noise) for three seeds, against the truth.

For each seed a fresh EBS twin (seeded errors, 1 um BPM noise) runs, at two BPMs:

- a vertical 0.3 mm bump (3 nearest correctors), a vertical 50 urad angle bump;
- a horizontal 0.3 mm bump with the RF step (3 correctors + RF) and one with the path-length
  row (4 correctors);

each with one measured closure iteration, then ``remove_bump``. It prints, per bump, the true
amplitude change at the point (pyAT ``find_orbit4`` on the twin's true lattice), the BPM
reading's, the true rms orbit change at the BPMs outside the bump, as fractions of the
requested amplitude; the issue's targets are 2 % (amplitude), 1 % (y) and 2 % (x) (leakage).
For the angle bump the leakage is relative to the largest orbit change inside the bump (an
angle has no position amplitude). A bump the limits refuse is reported as refused.

Run: ``.venv/bin/python benchmarks/bumps.py [--seeds 1 2 3]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from accplans.sim import client_environment, reserve_ports, run_twin

PORTS = reserve_ports(1)[0]
os.environ.update(client_environment([PORTS]))

import at  # noqa: E402
from bluesky import RunEngine  # noqa: E402

from accplans.config import load_description  # noqa: E402
from accplans.data import BackgroundTiledWriter, LocalTiled, load_result  # noqa: E402
from accplans.devices import connect_sync  # noqa: E402
from accplans.physics import BumpError  # noqa: E402
from accplans.plans import orbit_bump, remove_bump, shutdown_workers  # noqa: E402

POINTS = ("BPM010",)
CASES = (
    ("y", {"position_m": 0.3e-3}, 0.01),
    ("y", {"angle_rad": 50e-6}, 0.01),
    ("x", {"position_m": 0.3e-3, "path_length": "rf"}, 0.02),
    ("x", {"position_m": 0.3e-3, "path_length": "row"}, 0.02),
)


def true_orbit(twin, directory: str, elements: np.ndarray) -> np.ndarray:
    """True 4D closed orbit (n, 4) at ``elements`` (ascending, unique)."""
    truth = twin.control.export_truth(directory)
    _, orbit = at.find_orbit4(truth.ring, dct=truth.dct_m, refpts=elements)
    return orbit[:, :4]


def main() -> None:
    parser = argparse.ArgumentParser(description="orbit_bump on the EBS twin")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--amplitude-from", default="bpms", choices=["bpms", "model"])
    args = parser.parse_args()
    description = load_description("ebs")
    bpm_elems = np.array(
        [description.device(n).elements[0] for n in description.families["bpms"].devices]
    )
    worst = {"amp": 0.0, "bpm": 0.0, "leak_x": 0.0, "leak_y": 0.0}
    with tempfile.TemporaryDirectory() as tmp, LocalTiled(tmp + "/tiled") as tiled:
        client = tiled.client()
        for seed in args.seeds:
            with run_twin("ebs", seed=seed, ports=PORTS) as twin:
                engine = RunEngine({}, call_returns_result=True)
                writer = BackgroundTiledWriter(client)
                engine.subscribe(writer)
                m = connect_sync(description, address=f"127.0.0.1:{PORTS.ca}")
                for point in POINTS:
                    element = description.device(point).elements[0]
                    refs = np.unique(np.r_[bpm_elems, element])
                    k_point = int(np.searchsorted(refs, element))
                    for plane, options, limit in CASES:
                        p = 0 if plane == "x" else 2
                        before = true_orbit(twin, f"{tmp}/{seed}b", refs)
                        try:
                            result = engine(
                                orbit_bump(
                                    m.bpms,
                                    m.hcorr,
                                    m.vcorr,
                                    m.rf,
                                    at=point,
                                    plane=plane,
                                    amplitude_from=args.amplitude_from,
                                    **options,
                                )
                            )
                        except BumpError as exc:
                            print(f"seed {seed} {point} {plane} {options}: refused: {exc}")
                            continue
                        (uid,) = result.run_start_uids
                        change = true_orbit(twin, f"{tmp}/{seed}a", refs) - before
                        bump = _load(client, uid)
                        inside = np.asarray(bump["inside"], bool)
                        bpm_change = change[np.searchsorted(refs, bpm_elems)]
                        leak = float(np.sqrt(np.mean(bpm_change[~inside, p] ** 2)))
                        if "position_m" in options:
                            want = options["position_m"]
                            got = change[k_point, p]
                            amp_err = abs(got / want - 1)
                            bpm_err = abs(bump["measured_position"] / want - 1)
                            scale = want
                        else:
                            want = options["angle_rad"]
                            got = change[k_point, p + 1]
                            amp_err = abs(got / want - 1)
                            bpm_err = float("nan")
                            scale = float(np.max(np.abs(bpm_change[inside, p])))
                        rel_leak = leak / scale
                        kicks = np.round(np.asarray(bump["kicks"]) * 1e6, 1)
                        print(
                            f"seed {seed} {point} {plane} {options}: amplitude "
                            f"{amp_err * 100:.2f} %, BPM {bpm_err * 100:.2f} %, leakage "
                            f"{rel_leak * 100:.3f} % (target {limit * 100:.0f} %), measured "
                            f"leakage {bump['leakage_rms'] * 1e6:.2f} um, kicks {kicks} urad, "
                            f"RF {bump['rf_step']:.2f} Hz",
                            flush=True,
                        )
                        worst["amp"] = max(worst["amp"], amp_err)
                        if np.isfinite(bpm_err):
                            worst["bpm"] = max(worst["bpm"], bpm_err)
                        key = "leak_x" if plane == "x" else "leak_y"
                        worst[key] = max(worst[key], rel_leak)
                        engine(remove_bump(m.hcorr, m.vcorr, m.rf, bump=bump))
                writer.close(timeout=60)
                engine.loop.call_soon_threadsafe(engine.loop.stop)
        client.context.close()
    shutdown_workers()
    print(
        f"worst: amplitude {worst['amp'] * 100:.2f} % (target 2), BPM reading "
        f"{worst['bpm'] * 100:.2f} %, leakage y {worst['leak_y'] * 100:.3f} % (1), x "
        f"{worst['leak_x'] * 100:.3f} % (2)"
    )


def _load(client, uid):
    import time

    for _ in range(200):
        try:
            return load_result(client, uid, "bump")
        except Exception:
            time.sleep(0.1)
    return load_result(client, uid, "bump")


if __name__ == "__main__":
    main()
