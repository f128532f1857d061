"""Benchmark: the archiver's sustained rate and CPU use on the EBS twin, into a standalone Tiled.

Records ``dcct``, ``rf``, ``tune`` and ``bpms`` (the orbit: 2 x 320 values per sample, plus the
frame counter) of the EBS twin at increasing rates, each for ``--seconds`` s, into a Tiled
server of its own (``accplans tiled serve`` in a child process), and prints per rate: samples
per second achieved, missed periods, values per second (signals x Hz, a waveform counting each
element), the CPU the archiver's process used (process time / wall time; 1.0 = one core), and
whether the drain kept up (rows still spooled at the end).

Run: ``.venv/bin/python benchmarks/archive.py [--rates 10 25 50 100] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from accplans.sim import client_environment, reserve_ports, run_twin

PORTS = reserve_ports(1)[0]
os.environ.update(client_environment([PORTS]))

import aioca  # noqa: E402
import stamina  # noqa: E402

from accplans.config import load_description  # noqa: E402
from accplans.data import run_tiled_server  # noqa: E402
from accplans.devices import connect  # noqa: E402
from accplans.services import ArchiveConfig, Archiver  # noqa: E402


async def _one(
    machine: object, rate: float, seconds: float, spool: Path, uri: str, key: str
) -> str:
    from tiled.client import from_uri

    config = ArchiveConfig.model_validate(
        {
            "signals": ["dcct", "rf", "tune", "bpms"],
            "rate_hz": rate,
            "batch_rows": max(1, int(rate)),  # about one append per second
            "batch_period_s": 1.0,
            "spool": spool,
            "container": f"bench_{int(rate)}hz",
        }
    )
    archiver = Archiver(machine, config, lambda: from_uri(uri, api_key=key))  # pyright: ignore[reportArgumentType]
    stop = asyncio.Event()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    task = asyncio.create_task(archiver.run(stop))
    await asyncio.sleep(seconds)
    sampling_wall = time.perf_counter() - wall0
    sampling_cpu = time.process_time() - cpu0
    acquired_during = archiver.stats.acquired
    pending_at_stop = archiver.spool.pending()
    stop.set()
    stats = await task
    pending = archiver.spool.pending()
    archiver.spool.close()
    achieved = acquired_during / sampling_wall
    values = achieved * archiver.values_per_sample
    read_ms = 1e3 * stats.read_s / max(1, stats.acquired)
    return (
        f"{rate:7.1f} Hz asked | {achieved:7.1f} Hz achieved | missed {stats.late:5d} | "
        f"{values / 1e3:8.1f} k values/s ({archiver.values_per_sample} per sample) | "
        f"CPU {sampling_cpu / sampling_wall:5.2f} core | read {read_ms:5.1f} ms/sample | "
        f"spooled at stop {pending_at_stop:5d}, after drain {pending:3d}"
    )


async def _main(args: argparse.Namespace, uri: str, key: str, directory: Path) -> None:
    desc = load_description("ebs")
    machine = await connect(desc, address=f"127.0.0.1:{PORTS.ca}", timeout=30)
    for rate in args.rates:
        line = await _one(machine, rate, args.seconds, directory / f"spool-{rate}", uri, key)
        print(line, flush=True)
    aioca.purge_channel_caches()  # before the loop closes and the twin stops


def main() -> None:
    parser = argparse.ArgumentParser(description="archiver rate and CPU on the EBS twin")
    parser.add_argument("--rates", type=float, nargs="+", default=[10.0, 25.0, 50.0, 100.0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    stamina.set_active(False)
    print(f"CPUs: {os.cpu_count()}; signals: dcct (2), rf (2), tune (2), bpms (2 x 320 + 1)")
    with tempfile.TemporaryDirectory() as tmp, run_twin("ebs", ports=PORTS) as _twin:
        directory = Path(tmp)
        with run_tiled_server(directory / "tiled") as tiled:
            asyncio.run(_main(args, tiled.uri, tiled.api_key, directory))


if __name__ == "__main__":
    main()
