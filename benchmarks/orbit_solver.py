"""Benchmark: ClosedOrbitSolver against pyAT's find_orbit4 at fixed RF frequency (EBS ring).

Run: .venv/bin/python benchmarks/orbit_solver.py [--machine ebs|small] [--repeat N]

Scenarios (each checked against a fresh ``at.find_orbit4(ring, dct=dct)``):

- batch: all correctors (both planes) moved by 2 urad rms on top of a 20 urad rms orbit (an
  orbit-correction step): the main figure, ``ratio solver/find_orbit4``;
- single: one corrector moved by 10 urad;
- rf: the RF frequency stepped by 10 Hz;
- big batch: all correctors at 50 urad rms from a zero orbit (worst case: ~1 mm orbits whose
  sextupole feed-down changes the optics, so the Jacobian is refreshed);
- the full two-plane ORM of OnlineModel (exact method) and its RF column.
"""

from __future__ import annotations

import argparse
import statistics
import time

import at
import numpy as np

from accplans.config import build_lattice, load_description
from accplans.model import ClosedOrbitSolver, NoClosedOrbit, OnlineModel, dct_for_frequency


def _apply(ring: at.Lattice, elements: np.ndarray, dk: np.ndarray) -> None:
    for e, (dx, dy) in zip(elements, dk, strict=True):
        ring[e].KickAngle[0] += dx
        ring[e].KickAngle[1] += dy


def main() -> None:
    parser = argparse.ArgumentParser(description="ClosedOrbitSolver against find_orbit4")
    parser.add_argument("--machine", default="ebs")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    desc = load_description(args.machine)
    ring = build_lattice(desc)
    bpms = np.array([d.elements[0] for d in desc.devices if d.kind == "bpm"])
    hcor = np.array(
        [d.elements[0] for d in desc.devices if d.kind == "corrector" and d.plane == "h"]
    )
    vcor = np.array(
        [d.elements[0] for d in desc.devices if d.kind == "corrector" and d.plane == "v"]
    )
    elements = np.concatenate([hcor, vcor])
    rng = np.random.default_rng(12345)

    def kicks(rms: float) -> np.ndarray:
        dk = np.zeros((len(elements), 2))
        dk[: len(hcor), 0] = rng.normal(0.0, rms, len(hcor))
        dk[len(hcor) :, 1] = rng.normal(0.0, rms, len(vcor))
        return dk

    f_rf = ring.get_rf_frequency()
    dct = dct_for_frequency(ring, f_rf)
    solver = ClosedOrbitSolver(ring, bpms)
    t0 = time.perf_counter()
    solver.solve(dct)
    print(
        f"{args.machine}: {len(ring)} elements, {len(bpms)} BPMs, {len(elements)} corrector kicks"
    )
    print(f"first solve (C conversion + Jacobian): {1e3 * (time.perf_counter() - t0):.1f} ms")
    dk = kicks(20e-6)
    _apply(ring, elements, dk)
    solver.solve(dct, kick_changes=(elements, dk))

    def check(orbit: np.ndarray, dct_now: float) -> tuple[float, float]:
        t = time.perf_counter()
        _, ref = at.find_orbit4(ring, dct=dct_now, refpts=bpms)
        elapsed = time.perf_counter() - t
        return float(np.max(np.abs(orbit[:, :4] - ref[:, :4]))), elapsed

    def scenario(name: str, step) -> tuple[float, float]:
        times, f4_times, errs, passes = [], [], [], []
        for _ in range(args.repeat):
            dct_now, kick_changes = step()
            t = time.perf_counter()
            orbit = solver.solve(dct_now, kick_changes=kick_changes)
            times.append(time.perf_counter() - t)
            passes.append(solver.passes)
            err, f4 = check(orbit, dct_now)
            errs.append(err)
            f4_times.append(f4)
        ts, tf = statistics.median(times), statistics.median(f4_times)
        print(
            f"{name:>11}: solver {1e3 * ts:6.2f} ms (max {1e3 * max(times):6.2f}, "
            f"{statistics.mean(passes):.1f} passes), find_orbit4 {1e3 * tf:6.2f} ms, "
            f"max error {max(errs):.1e} m"
        )
        return ts, tf

    state = {"dct": dct}

    def batch():
        dk = kicks(2e-6)
        _apply(ring, elements, dk)
        return state["dct"], (elements, dk)

    def single():
        k = rng.integers(len(elements))
        dk = np.zeros((1, 2))
        dk[0, 0 if k < len(hcor) else 1] = rng.normal(0.0, 10e-6)
        _apply(ring, elements[k : k + 1], dk)
        return state["dct"], (elements[k : k + 1], dk)

    def rf():
        state["dct"] = dct_for_frequency(ring, f_rf + rng.choice([-10.0, 10.0]))
        return state["dct"], None

    ts, tf = scenario("batch", batch)
    scenario("single", single)
    scenario("rf", rf)
    print(f"ratio solver/find_orbit4: {ts / tf:.3f}")

    # worst case: a 50 urad rms batch from a zero orbit
    big_times = []
    for _ in range(3):
        for e in elements:
            ring[e].KickAngle[:] = 0.0
        solver.invalidate()
        solver.solve(dct)
        dk = kicks(50e-6)
        _apply(ring, elements, dk)
        t = time.perf_counter()
        try:
            orbit = solver.solve(dct, kick_changes=(elements, dk))
        except NoClosedOrbit as exc:
            print(f"  big batch: {exc}")
            continue
        big_times.append(time.perf_counter() - t)
        err, _ = check(orbit, dct)
        print(
            f"  big batch 50 urad rms from zero: {1e3 * big_times[-1]:.1f} ms, "
            f"{solver.passes} passes, orbit {1e3 * orbit[:, 0].std():.2f} mm rms, error {err:.1e}"
        )

    model = OnlineModel(desc)
    model.set_hardware(
        {d.name: float(rng.normal(0.0, 0.05)) for d in desc.devices if d.kind == "corrector"}
    )
    model.closed_orbit()
    t = time.perf_counter()
    resp = model.orm()
    print(
        f"full two-plane ORM (exact, {resp.matrix.shape[0]}x{resp.matrix.shape[1]} + RF column): "
        f"{1e3 * (time.perf_counter() - t):.0f} ms"
    )


if __name__ == "__main__":
    main()
