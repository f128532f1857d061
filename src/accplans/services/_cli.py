"""``accplans feedback serve``: the orbit feedback service, until SIGTERM or SIGINT.

Also ``python -m accplans.services feedback serve ...``. It connects to the machine (``--address``
of a twin, or the EPICS environment as it is) and serves its own PVs on loopback unless the
EPICS environment says otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
from typing import Any

__all__ = ["add_feedback_commands", "build_parser", "feedback_serve_main"]

#: loopback EPICS settings of a server (ECOSYSTEM.md); used unless already set
_SERVER_LOOPBACK = {
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
}


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--machine", default="ebs", help="built-in machine or description YAML file")
    p.add_argument("--address", default=None, help="the twin's host:port (default: EPICS env)")
    p.add_argument("--protocol", choices=("ca", "pva"), default="ca", help="client transport")
    p.add_argument("--prefix", default=None, help="PV prefix (default <machine prefix>SOFB:)")
    p.add_argument("--rate", type=float, default=2.0, help="iterations per second")
    p.add_argument("--gain", type=float, default=0.5, help="integral gain ki of both planes")
    p.add_argument("--pgain", type=float, default=0.0, help="proportional gain kp")
    p.add_argument("--alpha", type=float, default=0.02, help="Tikhonov, fraction of s_max")
    p.add_argument("--frames", type=int, default=1, help="BPM frames averaged per iteration")
    p.add_argument("--claim-timeout", type=float, default=10.0, help="claim watchdog (s)")
    p.add_argument("--enable", action="store_true", help="start correcting at once")
    p.add_argument("--log", default="feedback-writes.jsonl", help="write log (JSON lines)")
    p.add_argument("--ca-port", type=int, default=None, help="CA server port")
    p.add_argument("--pva-port", type=int, default=None, help="PVA server TCP port")
    p.add_argument("--pva-broadcast-port", type=int, default=None, help="PVA server UDP port")
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="INFO", help="logging level")


def add_feedback_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``feedback serve`` on an ``argparse`` subparsers object."""
    feedback = subparsers.add_parser("feedback", help="the slow orbit feedback service")
    sub = feedback.add_subparsers(dest="feedback_command", required=True)
    serve = sub.add_parser("serve", help="run the orbit feedback", description=__doc__)
    _add_serve_arguments(serve)
    serve.set_defaults(func=feedback_serve_main)
    return feedback


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m accplans.services``."""
    parser = argparse.ArgumentParser(prog="python -m accplans.services", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_feedback_commands(sub)
    return parser


def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when ``parent`` dies (Linux prctl); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(f"feedback: parent process {parent} is gone")


def feedback_serve_main(args: argparse.Namespace) -> int:
    """Run ``feedback serve`` with parsed arguments; returns when SIGTERM or SIGINT arrives."""
    logging.basicConfig(
        level=str(args.log_level).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid)
    for key, value in _SERVER_LOOPBACK.items():
        os.environ.setdefault(key, value)
    if args.ca_port is not None:
        os.environ["EPICS_CAS_SERVER_PORT"] = str(args.ca_port)
    if args.pva_port is not None:
        os.environ["EPICS_PVAS_SERVER_PORT"] = str(args.pva_port)
    if args.pva_broadcast_port is not None:
        os.environ["EPICS_PVAS_BROADCAST_PORT"] = str(args.pva_broadcast_port)

    from accplans.config import load_description
    from accplans.physics import FeedbackGains

    from ._feedback import FeedbackSettings, serve

    try:
        description = load_description(args.machine)
        gains = FeedbackGains(ki=args.gain, kp=args.pgain)
        settings = FeedbackSettings(
            rate_hz=args.rate,
            gains_x=gains,
            gains_y=gains,
            alpha=args.alpha,
            claim_timeout_s=args.claim_timeout,
            enable=args.enable,
            frames=args.frames,
        )
    except (ValueError, OSError) as exc:  # bad input: say what, no traceback
        print(f"accplans feedback serve: {exc}", file=sys.stderr)
        return 2

    def ready(info: dict[str, Any]) -> None:
        line = "READY " + json.dumps(info) + "\n"
        if args.ready_fd is not None:
            os.write(args.ready_fd, line.encode())
            os.close(args.ready_fd)
        else:
            sys.stdout.write(line)
            sys.stdout.flush()

    return serve(
        description,
        address=args.address,
        protocol=args.protocol,
        settings=settings,
        prefix=args.prefix,
        log_path=args.log,
        ready=ready,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m accplans.services``."""
    args = build_parser().parse_args(argv)
    raise SystemExit(args.func(args))
