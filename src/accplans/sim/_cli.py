"""``accplans twin serve``: run a twin as a soft IOC until SIGTERM or SIGINT.

Also ``python -m accplans.sim serve ...``. The IOC binds to loopback unless the EPICS
environment says otherwise (``EPICS_CAS_INTF_ADDR_LIST``, ``EPICS_PVAS_INTF_ADDR_LIST``).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_twin_commands", "build_parser", "serve_main"]

_log = logging.getLogger("accplans.sim")

#: The loopback EPICS settings of a server (ECOSYSTEM.md); used unless already set.
_SERVER_LOOPBACK = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
}


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--machine", default=None, help="built-in machine (ebs, small) or description YAML file"
    )
    src.add_argument("--lattice", default=None, help="any lattice file pyAT reads (.mat, .m, ...)")
    p.add_argument("--name", default=None, help="machine name for --lattice (default: file stem)")
    p.add_argument("--prefix", default=None, help="PV prefix for --lattice (default: NAME:)")
    p.add_argument("--use", default=None, help="variable of a .mat --lattice holding the ring")
    p.add_argument("--repeat", type=int, default=1, help="repeat the --lattice cells N times")
    p.add_argument("--seed", type=int, default=7, help="error seed (default 7)")
    p.add_argument("--no-errors", action="store_true", help="a perfect machine (noise kept)")
    p.add_argument("--no-noise", action="store_true", help="noiseless BPM and tune readings")
    p.add_argument("--errors", default=None, help="error model as a JSON file (ErrorModel fields)")
    p.add_argument("--ca-port", type=int, default=None, help="CA server port (TCP and UDP)")
    p.add_argument("--pva-port", type=int, default=None, help="PVA server TCP port")
    p.add_argument("--pva-broadcast-port", type=int, default=None, help="PVA server UDP port")
    p.add_argument(
        "--ramp-rate", type=float, default=1000.0, help="magnet ramp rate, A/s (0: at once)"
    )
    p.add_argument("--tick", choices=("event", "periodic"), default="event", help="model ticks")
    p.add_argument("--period", type=float, default=0.1, help="periodic tick period (s)")
    p.add_argument("--window", type=float, default=0.002, help="event coalescing window (s)")
    p.add_argument("--idle-period", type=float, default=0.1, help="fresh frame when idle (s)")
    p.add_argument("--scalar-period", type=float, default=0.5, help="per-BPM scalar PVs (s)")
    p.add_argument("--current", type=float, default=200.0, help="current after refill (mA)")
    p.add_argument("--lifetime", type=float, default=10.0, help="beam lifetime (h)")
    p.add_argument("--aperture", type=float, default=10.0, help="physical aperture radius (mm)")
    p.add_argument("--tbt-turns", type=int, default=1024, help="default TbT buffer length")
    p.add_argument("--tbt-max-turns", type=int, default=2048, help="longest TbT buffer")
    p.add_argument("--tbt-noise", type=float, default=10.0, help="TbT noise per turn (um rms)")
    p.add_argument("--export-dir", default=None, help="directory of EXPORT with an empty path")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, ...)")


def add_twin_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``twin serve`` on an ``argparse`` subparsers object; return the ``twin`` parser."""
    twin = subparsers.add_parser("twin", help="the digital twin (a soft IOC)")
    sub = twin.add_subparsers(dest="twin_command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve a twin over EPICS (CA and PVA) until SIGTERM/SIGINT",
        description=__doc__,
    )
    _add_serve_arguments(serve)
    serve.set_defaults(func=serve_main)
    return twin


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m accplans.sim``."""
    parser = argparse.ArgumentParser(prog="python -m accplans.sim", description=__doc__)
    sub = parser.add_subparsers(dest="twin_command", required=True)
    serve = sub.add_parser("serve", help="serve a twin over EPICS until SIGTERM/SIGINT")
    _add_serve_arguments(serve)
    serve.set_defaults(func=serve_main)
    return parser


def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when ``parent`` dies (Linux prctl); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(f"twin: parent process {parent} is gone")


def _environment(args: argparse.Namespace) -> None:
    for key, value in _SERVER_LOOPBACK.items():
        os.environ.setdefault(key, value)
    # turn-by-turn waveforms (n_bpm * max turns doubles) exceed CA's 16 kB default
    os.environ.setdefault("EPICS_CA_MAX_ARRAY_BYTES", "20000000")
    if args.ca_port is not None:
        os.environ["EPICS_CA_SERVER_PORT"] = str(args.ca_port)
        os.environ["EPICS_CAS_SERVER_PORT"] = str(args.ca_port)
        os.environ["EPICS_CA_ADDR_LIST"] = f"127.0.0.1:{args.ca_port}"
    if args.pva_port is not None:
        os.environ["EPICS_PVAS_SERVER_PORT"] = str(args.pva_port)
    if args.pva_broadcast_port is not None:
        os.environ["EPICS_PVAS_BROADCAST_PORT"] = str(args.pva_broadcast_port)
        os.environ["EPICS_PVA_BROADCAST_PORT"] = str(args.pva_broadcast_port)


def _description(args: argparse.Namespace):
    from accplans.config import LatticeSource, from_lattice, load_description, load_lattice

    if args.lattice is None:
        return load_description(args.machine or "ebs")
    path = Path(args.lattice).resolve()
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem) or "lattice"
    name = args.name or stem
    prefix = args.prefix or re.sub(r"[^A-Za-z0-9_-]", "_", name).upper() + ":"
    source = LatticeSource(file=str(path), repeat=args.repeat, use=args.use)
    ring = load_lattice(source)
    return from_lattice(ring, name, prefix, source=source)


def _error_model(args: argparse.Namespace):
    from ._errors import ErrorModel

    model = ErrorModel.from_json(args.errors) if args.errors else ErrorModel()
    if args.no_errors:
        model = dataclasses.replace(
            ErrorModel.none(), bpm_noise_m=model.bpm_noise_m, tune_noise=model.tune_noise
        )
    return model


def serve_main(args: argparse.Namespace) -> int:
    """Run ``twin serve`` with parsed arguments; returns when SIGTERM or SIGINT arrives."""
    t0 = time.perf_counter()
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    _environment(args)

    from ._ioc import IocSettings, TwinIoc
    from ._tbt import TbtSettings
    from ._twin import BeamSettings, Twin

    try:
        description = _description(args)
        twin = Twin(
            description,
            errors=_error_model(args),
            seed=args.seed,
            beam=BeamSettings(
                current_ma=args.current, lifetime_h=args.lifetime, aperture_m=args.aperture * 1e-3
            ),
            noise=not args.no_noise,
            tbt=TbtSettings(
                turns=args.tbt_turns, max_turns=args.tbt_max_turns, noise_m=args.tbt_noise * 1e-6
            ),
        )
        settings = IocSettings(
            ramp_rate=args.ramp_rate,
            tick=args.tick,
            window=args.window,
            period=args.period,
            idle_period=args.idle_period,
            scalar_period=args.scalar_period,
            export_dir=args.export_dir,
        )
        ioc = TwinIoc(twin, settings)
    except (ValueError, OSError) as exc:  # bad input: say what and where, no traceback
        print(f"accplans twin serve: {exc}", file=sys.stderr)
        return 2

    from softioc import asyncio_dispatcher, builder, softioc

    ioc.create_records()
    builder.LoadDatabase()
    dispatcher = asyncio_dispatcher.AsyncioDispatcher()
    softioc.iocInit(dispatcher)
    asyncio.run_coroutine_threadsafe(ioc.start(), dispatcher.loop).result()
    ready = {
        "machine": description.machine.name,
        "machine_id": description.machine.id,
        "prefix": description.machine.prefix,
        "twin_prefix": ioc.twin_prefix,
        "pid": os.getpid(),
        "records": ioc.record_count,
        "seed": twin.seed,
        "ca_port": int(os.environ.get("EPICS_CAS_SERVER_PORT", "5064")),
        "pva_port": int(os.environ.get("EPICS_PVAS_SERVER_PORT", "5075")),
        "pva_broadcast_port": int(os.environ.get("EPICS_PVAS_BROADCAST_PORT", "5076")),
        "start_s": round(time.perf_counter() - t0, 3),
    }
    line = "READY " + json.dumps(ready) + "\n"
    if args.ready_fd is not None:
        os.write(args.ready_fd, line.encode())
        os.close(args.ready_fd)
    else:
        sys.stdout.write(line)
        sys.stdout.flush()
    _log.info(
        "serving %s (%d PVs, prefix %s, twin %s) in %.2f s",
        description.machine.name,
        ioc.record_count,
        description.machine.prefix,
        ioc.twin_prefix,
        ready["start_s"],
    )
    dispatcher.wait_for_quit()
    try:
        _log.info("stopping")
        asyncio.run_coroutine_threadsafe(ioc.stop(), dispatcher.loop).result(timeout=10)
    except Exception:  # a stop that fails or hangs must not keep the process alive
        _log.exception("twin: stopping failed; exiting anyway")
    finally:
        # exit through EPICS in every case: returning would leave Python waiting at shutdown
        # for the dispatcher's (non-daemon) thread (a twin once outlived its killed parent)
        softioc.safeEpicsExit(0)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m accplans.sim``."""
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))
