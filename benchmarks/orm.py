"""Benchmark: the full EBS orbit response matrix through RunEngine + EPICS + Tiled, vs pyAT.

Measures, in one run on this machine:

1. ``measure_orm`` of every corrector of both planes (576 correctors, bipolar: 1152 steps) on
   the EBS twin (seeded errors, BPM noise), through a RunEngine writing to a standalone Tiled
   server with the writer in its own process (``ProcessTiledWriter``);
2. the same plan with no Tiled writer subscribed;
3. the bare device sequence of one step (family put with completion, stamped readbacks, the
   orbit frame taken with them) without the RunEngine, sampling the twin's own tick time;
4. pyAT's ``OrbitResponseMatrix(...).build()`` for both planes of the same lattice.

It prints the time per step split into twin model, EPICS (device I/O), RunEngine and Tiled,
and ``ratio plan/pyAT-build: X`` (the issue's target: X <= 0.5).

Run: ``.venv/bin/python benchmarks/orm.py [--correctors N]`` (all by default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from accplans.sim import client_environment, reserve_ports, run_twin

PORTS = reserve_ports(1)[0]
os.environ.update(client_environment([PORTS]))

from at.latticetools import OrbitResponseMatrix  # noqa: E402
from bluesky import RunEngine  # noqa: E402
from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402

from accplans.config import build_lattice, load_description  # noqa: E402
from accplans.data import ProcessTiledWriter, load_result, run_tiled_server  # noqa: E402
from accplans.devices import connect_sync  # noqa: E402
from accplans.plans import measure_orm  # noqa: E402


def pyat_build(description) -> tuple[float, np.ndarray]:
    """pyAT's OrbitResponseMatrix.build() for both planes; (seconds, stacked matrix)."""
    ring = build_lattice(description)
    bpms = [description.device(n).elements[0] for n in description.families["bpms"].devices]
    out = []
    t0 = time.perf_counter()
    for plane, fam in (("x", "hcorr"), ("y", "vcorr")):
        steer = [description.device(n).elements[0] for n in description.families[fam].devices]
        orm = OrbitResponseMatrix(ring, plane, bpms, steer)
        out.append(orm.build())
    return time.perf_counter() - t0, np.concatenate([np.ravel(m) for m in out])


def raw_steps(machine, twin, n: int) -> tuple[float, float]:
    """Mean seconds per bare step (no RunEngine) and mean twin tick (s) over ``n`` steps."""

    async def run() -> list[float]:
        hcorr, bpms = machine.hcorr, machine.bpms
        start = await hcorr.hardware_setpoints()
        steps = []
        for k in range(n):
            values = start.copy()
            values[k % len(values)] += 0.4 * (1 if k % 2 else -1)
            t0 = time.perf_counter()
            await hcorr.set_hardware(values)
            _, stamp = await hcorr.stamped_readbacks()
            await bpms.wait_for_frame(after=stamp - 1e-6)
            steps.append(time.perf_counter() - t0)
        await hcorr.set_hardware(start)
        return steps

    steps = call_in_bluesky_event_loop(run())
    tick_ms = [float(twin.control.get(twin.twin_prefix + "TICK_MS")) for _ in range(20)]
    return statistics.mean(steps), statistics.mean(tick_ms) / 1e3


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--correctors", type=int, default=None, help="first N per plane")
    args = parser.parse_args()
    description = load_description("ebs")
    nh = len(description.families["hcorr"].devices)
    nv = len(description.families["vcorr"].devices)
    select = None
    if args.correctors is not None:
        select = list(range(args.correctors)) + [nh + k for k in range(args.correctors)]
    ncorr = nh + nv if select is None else len(select)
    nsteps = 2 * ncorr

    t_build, _ = pyat_build(description)
    print(f"pyAT OrbitResponseMatrix.build(), both planes ({nh}+{nv} steerers): {t_build:.1f} s")
    if select is not None:
        t_build *= ncorr / (nh + nv)
        print(f"  scaled to the {ncorr} correctors measured: {t_build:.1f} s")

    with (
        tempfile.TemporaryDirectory() as tmp,
        run_tiled_server(tmp) as tiled,
        run_twin("ebs", seed=7, ports=PORTS) as twin,
    ):
        engine = RunEngine({})
        m = connect_sync(description, address=f"127.0.0.1:{PORTS.ca}")
        plan = measure_orm(m.bpms, [m.hcorr, m.vcorr], select=select)
        t0 = time.perf_counter()
        engine(plan)
        t_bare = time.perf_counter() - t0
        client = tiled.client()
        with ProcessTiledWriter(tiled.uri, tiled.api_key) as writer:
            token = engine.subscribe(writer)
            t0 = time.perf_counter()
            (uid,) = engine(measure_orm(m.bpms, [m.hcorr, m.vcorr], select=select))
            t_plan = time.perf_counter() - t0
            writer.flush(timeout=300)
            t_flushed = time.perf_counter() - t0
            engine.unsubscribe(token)
        result = load_result(client, uid, "orm")
        assert result.data["matrix"].shape == (640, ncorr)
        t_raw, t_tick = raw_steps(m, twin, 200)

    per = {
        "twin model": t_tick,
        "EPICS (devices)": t_raw - t_tick,
        "RunEngine": t_bare / nsteps - t_raw,
        "Tiled": (t_plan - t_bare) / nsteps,
    }
    print(f"measure_orm, {nsteps} steps: {t_plan:.1f} s with Tiled ({t_flushed:.1f} s until all")
    print(f"  written), {t_bare:.1f} s without a writer; {1e3 * t_plan / nsteps:.1f} ms per step:")
    for name, value in per.items():
        print(f"  {name:16s} {1e3 * value:6.2f} ms/step")
    print(f"ratio plan/pyAT-build: {t_plan / t_build:.3f}")


if __name__ == "__main__":
    main()
