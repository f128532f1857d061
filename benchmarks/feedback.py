"""Benchmark: the orbit feedback service and correct_orbit on the EBS twin, against find_orbit4.

Run: .venv/bin/python benchmarks/feedback.py [--machine ebs] [--seeds 1 2 3] [--window 60]

Prints, in one run:

- ``find_orbit4``: pyAT's closed orbit of the same ring (median of 20), the anchor;
- one feedback iteration of the service (its write log: reading the averaged frames, the PI
  step on 320 BPMs x 288 + 288 correctors, both family puts and the wait for their readbacks;
  the wait for the BPMs' next frames, paced by the machine, is printed apart as ``acquire``),
  median over the seeds: ``ratio feedback iteration/find_orbit4: X`` (target <= 1.5);
- one ``correct_orbit`` iteration (bounded solve in the worker, both families set, a fresh
  frame read), from the event times of its run: ``ratio correction iteration/find_orbit4: X``;
- drift hold: the twin's quadrupoles drift at 1 um/min (``inject_drift(1e-6 / 60)``) for
  ``--window`` s, without and with the feedback (2 Hz, ki = 0.5, 4 frames averaged per
  iteration); rms change of the true beam
  position at the BPMs, and the ratio, for each seed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import at
import numpy as np

from accplans.sim import client_environment, reserve_ports

PORTS = reserve_ports(2)
os.environ.update(client_environment(PORTS))

from bluesky import RunEngine  # noqa: E402  (the EPICS environment must be set first)
from bluesky.run_engine import call_in_bluesky_event_loop  # noqa: E402
from ophyd_async.core import wait_for_value  # noqa: E402

from accplans.config import build_lattice, load_description  # noqa: E402
from accplans.devices import FeedbackClient, connect_sync  # noqa: E402
from accplans.plans import correct_orbit  # noqa: E402
from accplans.services import run_feedback  # noqa: E402
from accplans.sim import TwinProcess, run_twin  # noqa: E402

DRIFT_M_PER_S = 1e-6 / 60


def _find_orbit4_s(machine: str) -> float:
    ring = build_lattice(load_description(machine))
    at.find_orbit4(ring)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        at.find_orbit4(ring)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _true(twin: TwinProcess) -> np.ndarray:
    x = np.asarray(twin.control.get(f"{twin.twin_prefix}BPMS:TRUE_X"), float)
    y = np.asarray(twin.control.get(f"{twin.twin_prefix}BPMS:TRUE_Y"), float)
    return np.stack([x, y]) * 1e-3


def _rms(a: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(a**2, axis=-1))


def _in_loop(coro) -> object:
    return call_in_bluesky_event_loop(coro)


def _report_feedback(seed: int, window: float, r: dict[str, object]) -> None:
    free, held = np.asarray(r["free"]), np.asarray(r["held"])
    parts = r["parts"]
    assert isinstance(parts, dict)
    print(
        f"seed {seed}: 1 um/min quadrupole drift over {window:g} s: free "
        f"{free[0] * 1e6:.2f}/{free[1] * 1e6:.2f} um (x/y rms), with feedback "
        f"{held[0] * 1e6:.2f}/{held[1] * 1e6:.2f} um: ratio {free[0] / held[0]:.1f}/"
        f"{free[1] / held[1]:.1f}; iteration parts (median, ms) "
        + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in parts.items()),
        flush=True,
    )


def _seed(
    machine: str, seed: int, window: float, engine: RunEngine, correction: dict[str, object]
) -> dict[str, object]:
    description = load_description(machine)
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp, run_twin(machine, seed=seed, ports=PORTS[0]) as twin:
        address = f"127.0.0.1:{twin.ports.ca}"
        log = Path(tmp) / "writes.jsonl"
        # drift, free
        start = _true(twin)
        twin.control.inject_drift(DRIFT_M_PER_S)
        time.sleep(window)
        free = _rms(_true(twin) - start)
        twin.control.inject_drift(0.0)
        twin.control.reset(seed)
        with run_feedback(
            machine,
            address=address,
            ca_port=PORTS[1].ca,
            pva_port=PORTS[1].pva,
            pva_broadcast_port=PORTS[1].pva_broadcast,
            log_path=log,
            rate_hz=2.0,
            gain=0.5,
            frames=4,
        ) as feedback:
            client = FeedbackClient(description)
            _in_loop(client.connect(timeout=30))

            async def enable_and_wait(n: int) -> None:
                await client.enable.set(True)
                await wait_for_value(client.iteration, lambda v: v >= n, timeout=120)

            _in_loop(enable_and_wait(3))
            start = _true(twin)
            twin.control.inject_drift(DRIFT_M_PER_S)
            time.sleep(window)
            held = _rms(_true(twin) - start)
            twin.control.inject_drift(0.0)

            async def disable() -> None:
                await client.enable.set(False)

            _in_loop(disable())
            writes = [e for e in feedback.entries() if e["event"] == "write"]
            per_iteration = {}
            for e in writes:  # both families of one iteration carry the same timing
                per_iteration[e["iteration"]] = e["read_s"] + e["compute_s"] + e["write_s"]
            out["iterations"] = list(per_iteration.values())[2:]
            out["parts"] = {
                k: statistics.median(e[k] for e in writes[4:])
                for k in ("acquire_s", "read_s", "compute_s", "write_s")
            }
        out["free"], out["held"] = free, held
        _report_feedback(seed, window, out)

        twin.control.reset(seed)
        machine_devices = connect_sync(description, address=address, timeout=30)
        times: list[float] = []

        def collect(name: str, doc: dict) -> None:
            if name == "event":
                times.append(doc["time"])

        token = engine.subscribe(collect)
        engine(
            correct_orbit(
                machine_devices.bpms,
                [machine_devices.hcorr, machine_devices.vcorr],
                iterations=1,
                n_samples=1,
                **correction,
            )
        )
        engine.unsubscribe(token)
        out["correction_s"] = times[1] - times[0]  # baseline orbit -> first iteration's event
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="orbit feedback and correct_orbit benchmark")
    parser.add_argument("--machine", default="ebs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--window", type=float, default=60.0, help="drift window (s)")
    parser.add_argument("--method", default="tikhonov", help="correct_orbit's method")
    parser.add_argument("--alpha", type=float, default=None, help="correct_orbit's alpha (m/rad)")
    parser.add_argument("--n-singular", type=int, default=None, help="correct_orbit's n_singular")
    args = parser.parse_args()
    correction: dict[str, object] = {"method": args.method}
    if args.alpha is not None:
        correction["alpha"] = args.alpha
    if args.n_singular is not None:
        correction["n_singular"] = args.n_singular
    engine = RunEngine({})
    anchor = _find_orbit4_s(args.machine)
    print(f"find_orbit4 ({args.machine}): {anchor * 1e3:.2f} ms (median of 20)")
    iterations: list[float] = []
    corrections: list[float] = []
    for seed in args.seeds:
        r = _seed(args.machine, seed, args.window, engine, correction)
        iterations += list(r["iterations"])  # type: ignore[arg-type]
        corrections.append(float(r["correction_s"]))  # type: ignore[arg-type]
        print(f"seed {seed}: correct_orbit iteration {r['correction_s']:.2f} s", flush=True)
    iteration = statistics.median(iterations)
    per_correction = statistics.median(corrections)
    print(f"feedback iteration: {iteration * 1e3:.2f} ms (median of {len(iterations)})")
    print(f"correct_orbit iteration: {per_correction * 1e3:.1f} ms (median of {len(corrections)})")
    print(f"ratio feedback iteration/find_orbit4: {iteration / anchor:.2f}")
    print(f"ratio correction iteration/find_orbit4: {per_correction / anchor:.2f}")


if __name__ == "__main__":
    main()
