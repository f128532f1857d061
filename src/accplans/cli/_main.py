"""Argument parsing and dispatch for ``accplans``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _describe(args: argparse.Namespace) -> int:
    from accplans.config import dump_description, load_description

    desc = load_description(args.machine)
    if args.output:
        dump_description(desc, args.output)
        print(f"wrote {args.output}: {len(desc.devices)} devices, hash {desc.config_hash}")
    else:
        for name, fam in desc.families.items():
            print(f"{name:12s} {fam.kind:16s} {len(fam.devices):4d} devices")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return run_demo(
        machine=args.machine, seed=args.seed, data_dir=args.data_dir, correctors=args.correctors
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``accplans`` argument parser."""
    from accplans.data import add_tiled_commands
    from accplans.services import add_feedback_commands
    from accplans.sim import add_twin_commands

    from ._archive import add_archive_command
    from ._export import add_export_command
    from ._fofb import add_fofb_commands
    from ._snapshot import add_snapshot_command

    parser = argparse.ArgumentParser(prog="accplans", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_twin_commands(sub)
    add_feedback_commands(sub)
    add_tiled_commands(sub)
    add_archive_command(sub)
    add_export_command(sub)
    add_fofb_commands(sub)
    add_snapshot_command(sub)

    p = sub.add_parser("describe", help="print or write a machine description")
    p.add_argument("--machine", default="ebs", help="built-in machine name or YAML file")
    p.add_argument("--output", "-o", help="write the description as YAML to this file")
    p.set_defaults(func=_describe)

    p = sub.add_parser("demo", help="measure orbit and ORM on a twin; report; stop everything")
    p.add_argument("--machine", default="ebs", help="built-in machine: ebs or small")
    p.add_argument("--seed", type=int, default=7, help="error seed of the twin")
    p.add_argument("--data-dir", default=".accplans/demo", help="where Tiled keeps the data")
    p.add_argument(
        "--correctors", type=int, default=None, help="measure only the first N per plane"
    )
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run the accplans command line."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
