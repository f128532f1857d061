"""``accplans fofb export UID``: a fast orbit feedback design's matrices to HDF5 (and a plot)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ._export import API_KEY_ENV


def add_fofb_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``fofb export`` to the ``accplans`` CLI's ``subparsers``."""
    p = subparsers.add_parser("fofb", help="fast orbit feedback designs (design_fofb results)")
    sub = p.add_subparsers(dest="fofb_command", required=True)
    e = sub.add_parser(
        "export",
        help="write a design's matrices to HDF5 (format: docs/how-to/design-fofb.md)",
        description=(
            "Load the fofb_design result of run UID from Tiled, print its summary, write its "
            "matrices to an HDF5 file (and with --plot its attenuation to a PNG). The API key "
            f"comes from --api-key or ${API_KEY_ENV}."
        ),
    )
    e.add_argument("uid", metavar="UID", help="uid of the design_fofb run")
    e.add_argument("--tiled", required=True, metavar="URI", help="Tiled URI (http://.../api/v1)")
    e.add_argument("--api-key", default=None, help=f"Tiled API key (default: ${API_KEY_ENV})")
    e.add_argument("--output", "-o", type=Path, help="HDF5 file (default: fofb_<uid8>.h5)")
    e.add_argument("--plot", type=Path, default=None, help="also draw the attenuation (PNG)")
    e.set_defaults(func=fofb_export_main)
    return p


def fofb_export_main(args: argparse.Namespace) -> int:
    """Run ``accplans fofb export``.

    Returns:
        The exit status: 0, or 2 if the run or its result is missing.
    """
    from tiled.client import from_uri

    from accplans.data import ResultError, load_result
    from accplans.plans.fofb import _summary, export_fofb_matrices, plot_fofb_design

    client = from_uri(args.tiled, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    try:
        try:
            result = load_result(client, args.uid, "fofb_design")
        except ResultError as exc:
            print(f"accplans fofb export: {exc}")
            return 2
        print(_summary(result))
        path = export_fofb_matrices(result, args.output or Path(f"fofb_{args.uid[:8]}.h5"))
        print(f"wrote {path}")
        if args.plot is not None:
            print(f"wrote {plot_fofb_design(result, args.plot)}")
    finally:
        client.context.close()
    return 0
