"""What a Tiled writer costs the RunEngine, per event, and end to end.

Run: ``.venv/bin/python benchmarks/tiled_writer.py [--events N]``. Prints numbers; asserts nothing.

Each event holds a scalar and two 320-float arrays (an EBS BPM frame; ``--array-size 0``: two
scalars), read from ophyd-async soft signals by ``bluesky.plans.count``. Compared, against an
embedded server (``LocalTiled``: the server shares this process and its GIL) and a standalone one
(``run_tiled_server``):

- no writer (the RunEngine alone),
- ``TiledWriter(batch_size=1)`` (synchronous, every event written as it comes: live but slow),
- ``TiledWriter()`` (default batch of 10000: fast, but nothing is written before the stop),
- ``BackgroundTiledWriter`` (enqueue only; a thread writes whatever queued since its last write).

"RunEngine" is the run's wall time over N; "end to end" adds the wait until every document is in
Tiled (``flush``), so it includes the writer's lag behind the RunEngine. A last case spaces events
by 20 ms, so the background writer is idle between events and writes each one as it comes (the
live case): its time per write is the latency with which data appear in Tiled.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import bluesky.preprocessors as bpp
import numpy as np
from bluesky import RunEngine
from bluesky_tiled_plugins import TiledWriter
from ophyd_async.core import Array1D, init_devices, soft_signal_rw

from accplans.data import BackgroundTiledWriter, LocalTiled, run_tiled_server


def _signals(size: int) -> list[Any]:
    with init_devices():
        current = soft_signal_rw(float, 0.2, units="A")
        bpm_x = soft_signal_rw(Array1D[np.float64], np.linspace(-1e-4, 1e-4, size), units="m")
        bpm_y = soft_signal_rw(Array1D[np.float64], np.linspace(-2e-5, 2e-5, size), units="m")
        tune = soft_signal_rw(float, 0.21)
    return [current, bpm_x, bpm_y] if size else [current, tune]


def _run(RE: RunEngine, dets: list[Any], n: int) -> float:
    t0 = time.perf_counter()
    RE(bp.count(dets, num=n))
    return time.perf_counter() - t0


@contextlib.contextmanager
def _server(kind: str, directory: str) -> Iterator[Any]:
    if kind == "embedded":
        with LocalTiled(directory) as tiled:
            yield tiled
    else:
        with run_tiled_server(directory) as tiled:
            yield tiled


def bench(kind: str, RE: RunEngine, dets: list[Any], n: int, m: int, what: str) -> None:
    with tempfile.TemporaryDirectory() as tmp, _server(kind, tmp) as tiled:
        client = tiled.client()
        rows: list[tuple[str, float, float]] = []
        base = min(_run(RE, dets, n) for _ in range(2)) / n
        rows.append(("no writer", base, base))

        token = RE.subscribe(TiledWriter(client, batch_size=1))
        t = _run(RE, dets, m) / m
        RE.unsubscribe(token)
        rows.append((f"TiledWriter(batch_size=1), {m} events", t, t))

        token = RE.subscribe(TiledWriter(client))
        t = _run(RE, dets, n) / n
        RE.unsubscribe(token)
        rows.append(("TiledWriter() (written at stop)", t, t))

        writer = BackgroundTiledWriter(client)
        calls: list[float] = []

        def timed(name: str, doc: dict[str, Any]) -> None:
            t0 = time.perf_counter()
            writer(name, doc)
            calls.append(time.perf_counter() - t0)

        token = RE.subscribe(timed)
        t0 = time.perf_counter()
        RE(bp.count(dets, num=n))
        t_re = time.perf_counter() - t0
        writer.flush()
        t_all = time.perf_counter() - t0
        RE.unsubscribe(token)
        fast = writer.stats()
        rows.append(("BackgroundTiledWriter", t_re / n, t_all / n))

        @bpp.run_decorator()
        def spaced(k: int):
            for _ in range(k):
                yield from bps.trigger_and_read(dets)
                yield from bps.sleep(0.02)

        token = RE.subscribe(writer)
        RE(spaced(50))
        writer.flush()
        RE.unsubscribe(token)
        live = {k: v - fast[k] for k, v in writer.stats().items()}
        writer.close()
        client.context.close()

    print(f"\n== {kind} server: {n} events of {what}")
    print(f"{'writer':44s} {'RunEngine ms/event':>19s} {'end to end ms/event':>20s}")
    for name, re_t, all_t in rows:
        print(f"{name:44s} {1e3 * re_t:19.2f} {1e3 * all_t:20.2f}")
    print(
        f"BackgroundTiledWriter: callback {1e6 * float(np.mean(calls)):.1f} us mean, "
        f"{1e6 * float(np.max(calls)):.0f} us max; RunEngine {1e3 * (rows[-1][1] - base):+.2f} "
        f"ms/event over no writer; done {t_all - t_re:.2f} s after the run ended"
    )
    print(
        f"  fast run: {int(fast['documents'])} documents in {int(fast['batches'])} writes "
        f"(largest {int(fast['largest_batch'])}), writer thread busy "
        f"{1e3 * fast['busy_s'] / fast['documents']:.2f} ms/document"
    )
    print(
        f"  live run (events 20 ms apart): {int(live['documents'])} documents in "
        f"{int(live['batches'])} writes, {1e3 * live['busy_s'] / live['batches']:.1f} ms per write"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Tiled writer costs per event")
    parser.add_argument("--events", type=int, default=500, help="events per run")
    parser.add_argument("--slow-events", type=int, default=40, help="events with batch_size=1")
    parser.add_argument("--server", choices=["embedded", "standalone", "both"], default="both")
    parser.add_argument("--array-size", type=int, default=320, help="0: two scalars per event")
    args = parser.parse_args()
    RE = RunEngine({})
    dets = _signals(args.array_size)
    what = f"1 scalar + 2 x {args.array_size} floats" if args.array_size else "2 scalars"
    _run(RE, dets, 20)  # warm up
    for kind in ("embedded", "standalone"):
        if args.server in (kind, "both"):
            bench(kind, RE, dets, args.events, args.slow_events, what)


if __name__ == "__main__":
    main()
