"""``accplans export RUN --format nexus``: write a run from Tiled to a file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "TILED_API_KEY"
_FORMATS = ("nexus",)


def add_export_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` to the ``accplans`` CLI's ``subparsers``."""
    p = subparsers.add_parser(
        "export",
        help="export a run from Tiled to a file (NeXus/HDF5)",
        description=(
            "Export one run from a Tiled server to a NeXus/HDF5 file: every stream with units "
            "and timestamps, the descriptors' configuration and the full run metadata. RUN is "
            "a uid, a scan id or a negative index (-1: the latest run). "
            f"The API key comes from --api-key or ${API_KEY_ENV} (prefer the variable: other "
            "users can read command lines)."
        ),
    )
    p.add_argument("run", metavar="RUN", help="uid, scan id or -N (N-th latest)")
    p.add_argument("--format", choices=_FORMATS, default="nexus", help="file format (nexus)")
    p.add_argument("--output", "-o", type=Path, help="file to write (default: <plan>_<uid8>.nxs)")
    p.add_argument("--tiled", required=True, metavar="URI", help="Tiled URI (http://.../api/v1)")
    p.add_argument("--api-key", default=None, help=f"Tiled API key (default: ${API_KEY_ENV})")
    p.set_defaults(func=export_main)
    return p


def _find_run(client: Any, text: str) -> Any:
    """The run ``text`` names: a scan id or negative index if an integer, else a full uid."""
    from accplans.data import bluesky_catalog, open_run

    try:
        number = int(text)
    except ValueError:
        return open_run(client, text)
    return bluesky_catalog(client)[number]


def export_main(args: argparse.Namespace) -> int:
    """Run ``accplans export`` (prints the file written).

    Returns:
        The exit status: 0, or 2 if the run is not in the catalog.
    """
    from tiled.client import from_uri

    from accplans.data import export_nexus

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    client = from_uri(args.tiled, api_key=api_key)
    try:
        try:
            run = _find_run(client, args.run)
        except (KeyError, IndexError, ValueError) as exc:
            print(f"accplans export: no run {args.run!r} in {args.tiled}: {exc}")
            return 2
        start = dict(run.metadata.get("start") or {})
        uid = str(start.get("uid", args.run))
        output = args.output or Path(f"{start.get('plan_name', 'run')}_{uid[:8]}.nxs")
        path = export_nexus(run, output)
        streams = ", ".join(run)
        print(f"wrote {path}: run {uid} ({start.get('plan_name', '?')}), streams {streams}")
    finally:
        client.context.close()
    return 0
