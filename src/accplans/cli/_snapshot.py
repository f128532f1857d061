"""``accplans snapshot list|show|diff``: the setpoint snapshots saved in Tiled."""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

#: Environment variables of the Tiled server and key when ``--tiled``/``--api-key`` are not given.
URI_ENV = "TILED_URI"
API_KEY_ENV = "TILED_API_KEY"


def add_snapshot_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``snapshot`` (``list``, ``show``, ``diff``) to the ``accplans`` CLI's ``subparsers``."""
    p = subparsers.add_parser(
        "snapshot",
        help="list, show and compare the setpoint snapshots saved in Tiled (save_setpoints)",
        description=(
            "Setpoint snapshots (runs of save_setpoints) in a Tiled server. SNAPSHOT is a run "
            f"uid. The server comes from --tiled or ${URI_ENV}, the key from --api-key or "
            f"${API_KEY_ENV} (prefer the variable: other users can read command lines)."
        ),
    )
    p.add_argument("--tiled", default=None, metavar="URI", help=f"Tiled URI (default ${URI_ENV})")
    p.add_argument("--api-key", default=None, help=f"Tiled API key (default ${API_KEY_ENV})")
    sub = p.add_subparsers(dest="snapshot_command", required=True)
    q = sub.add_parser("list", help="the snapshots, newest first")
    q.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    q.set_defaults(func=snapshot_main)
    q = sub.add_parser("show", help="every setpoint of one snapshot")
    q.add_argument("snapshot", metavar="SNAPSHOT", help="run uid")
    q.set_defaults(func=snapshot_main)
    q = sub.add_parser("diff", help="the setpoints that differ between two snapshots (B - A)")
    q.add_argument("a", metavar="A", help="run uid of the first snapshot")
    q.add_argument("b", metavar="B", help="run uid of the second snapshot")
    q.add_argument("--all", action="store_true", help="also list the setpoints that are equal")
    q.set_defaults(func=snapshot_main)
    return p


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _setpoints(result: Any) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    from accplans.data import snapshot_setpoints

    units = dict(zip(result["device_names"], result["units"], strict=True))
    return snapshot_setpoints(result), units


def _header(result: Any) -> str:
    return (
        f"snapshot {result.uid}: machine {result['machine_id']} (config {result['config_hash']}), "
        f"taken {_when(result['taken'])} by {result['operator']}: {result['comment']!r}"
    )


def _list(client: Any, limit: int) -> int:
    from tiled.queries import Key

    found = client.search(Key("start.plan_name") == "save_setpoints")
    rows = []
    for uid in list(found.keys())[-limit:] if limit > 0 else list(found.keys()):
        start = dict(found[uid].metadata.get("start") or {})
        rows.append(
            (
                float(start.get("time", math.nan)),
                uid,
                str((start.get("machine") or {}).get("id", "?")),
                str(start.get("operator", "?")),
                ",".join(start.get("families") or []),
                str(start.get("comment", "")),
            )
        )
    if not rows:
        print("no snapshots")
        return 0
    print(f"{'time':19s}  {'uid':36s}  {'machine':14s} {'operator':10s} families: comment")
    for t, uid, machine, operator, families, comment in sorted(rows, reverse=True):
        print(f"{_when(t):19s}  {uid:36s}  {machine:14s} {operator:10s} {families}: {comment}")
    return 0


def _show(client: Any, uid: str) -> int:
    from accplans.data import load_result

    result = load_result(client, uid, "snapshot")
    print(_header(result))
    print(f"{'device':12s} {'family':12s} {'unit':4s} {'setpoint':>14s}")
    for name, family, unit, value in zip(
        result["device_names"],
        result["family_names"],
        result["units"],
        result["setpoints"],
        strict=True,
    ):
        print(f"{name:12s} {family:12s} {unit:4s} {value:14.6g}")
    return 0


def _diff(client: Any, a: str, b: str, everything: bool) -> int:
    from accplans.data import format_diff, load_result, setpoint_diff

    first = load_result(client, a, "snapshot")
    second = load_result(client, b, "snapshot")
    print("A: " + _header(first))
    print("B: " + _header(second))
    if first["machine_id"] != second["machine_id"]:
        print("warning: the snapshots are of different machines")
    elif first["config_hash"] != second["config_hash"]:
        print("warning: the snapshots were taken with different descriptions (config hash)")
    (now, units), (target, more) = _setpoints(first), _setpoints(second)
    rows = setpoint_diff(now, target, {**units, **more}, changed_only=not everything)
    changed = sum(1 for r in rows if r.delta != 0)
    print(f"{changed} setpoint(s) differ (delta = B - A)")
    if rows:
        print(format_diff(rows))
    return 0


def snapshot_main(args: argparse.Namespace) -> int:
    """Run ``accplans snapshot`` (prints to stdout).

    Returns:
        The exit status: 0, 2 when a snapshot is missing or the server is not given.
    """
    from tiled.client import from_uri

    from accplans.data import ResultError

    uri = args.tiled or os.environ.get(URI_ENV) or None
    if uri is None:
        print(f"accplans snapshot: give --tiled URI or set ${URI_ENV}")
        return 2
    client = from_uri(uri, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    try:
        if args.snapshot_command == "list":
            return _list(client, args.limit)
        if args.snapshot_command == "show":
            return _show(client, args.snapshot)
        return _diff(client, args.a, args.b, args.all)
    except ResultError as exc:
        print(f"accplans snapshot: {exc}")
        return 2
    finally:
        client.context.close()
