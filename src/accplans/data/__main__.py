"""``python -m accplans.data tiled serve ...``: the standalone Tiled server without the full CLI.

:func:`~accplans.data.run_tiled_server` starts this; ``accplans tiled serve`` is the same command
in the ``accplans`` CLI.
"""

import argparse
import sys

from ._server import add_tiled_commands


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command."""
    parser = argparse.ArgumentParser(prog="python -m accplans.data")
    add_tiled_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
