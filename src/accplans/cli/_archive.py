"""``accplans archive``: record machine signals into Tiled until SIGTERM or SIGINT (wiring only).

The Tiled key comes from ``--api-key`` or, better (command lines are visible to other users),
the ``TILED_API_KEY`` environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Any

__all__ = ["add_archive_command", "archive_main"]


def add_archive_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``archive`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "archive", help="record machine signals into Tiled tables", description=__doc__
    )
    p.add_argument("--machine", default="ebs", help="built-in machine or description YAML file")
    p.add_argument("--address", default=None, help="the twin's host:port (default: EPICS env)")
    p.add_argument("--protocol", choices=("ca", "pva"), default="ca", help="client transport")
    p.add_argument(
        "--tiled", required=True, help="Tiled API URI, e.g. http://127.0.0.1:8000/api/v1"
    )
    p.add_argument("--api-key", default=None, help="Tiled key (default: $TILED_API_KEY)")
    p.add_argument("--config", required=True, help="archive configuration (YAML)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    p.set_defaults(func=archive_main)
    return p


def archive_main(args: argparse.Namespace) -> int:
    """Run the archiver until SIGTERM/SIGINT; then drain what Tiled can take."""
    import stamina

    from accplans.config import load_description
    from accplans.devices import connect
    from accplans.services import Archiver, load_archive_config

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    config = load_archive_config(args.config)
    description = load_description(args.machine)
    key = args.api_key or os.environ.get("TILED_API_KEY")
    stamina.set_active(False)  # the archiver retries by itself; the spool holds the rows

    def tiled() -> Any:
        from tiled.client import from_uri

        return from_uri(args.tiled, api_key=key)

    async def main() -> int:
        mode = "twin" if args.address else "epics"
        machine = await connect(description, mode, address=args.address, protocol=args.protocol)
        archiver = Archiver(machine, config, tiled, metadata={"machine": description.machine.id})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        logging.info(
            "archiving %d signal groups (%d columns, %d values per sample) at %g Hz to %s",
            len(archiver.groups),
            len(archiver.columns),
            archiver.values_per_sample,
            config.rate_hz,
            args.tiled,
        )
        stats = await archiver.run(stop)
        pending = archiver.spool.pending()
        logging.info("stopped: %s; %d rows left in the spool %s", stats, pending, config.spool)
        return 0

    return asyncio.run(main())
