"""Reading runs back: the Tiled client, and databroker 2's catalog view.

A run written by :class:`~accplans.data.BackgroundTiledWriter` (bluesky-tiled-plugins' layout,
spec ``BlueskyRun`` v3) reads back with the plain Tiled client::

    run = open_run(container, uid)
    run["primary"].read()                # xarray.Dataset
    run.metadata["start"]["plan_name"]
    container.search(Key("start.plan_name") == "measure_orm")

and with databroker 2, whose ``Broker``/catalog is bluesky-tiled-plugins'
``CatalogOfBlueskyRuns`` (``databroker.v2.Broker`` is that class; databroker 2.0.2 has no
``from_uri``): :func:`bluesky_catalog` gives that view of any container
(``catalog.v2[uid].primary.read()``, ``catalog.scan_id[...]``, partial uids).
"""

from __future__ import annotations

from typing import Any

from bluesky_tiled_plugins import CatalogOfBlueskyRuns
from tiled.client.container import Container
from tiled.utils import OneShotCachedMap

__all__ = ["bluesky_catalog", "open_run"]


def open_run(container: Any, uid: str) -> Any:
    """The run ``uid`` of ``container`` (a ``BlueskyRun`` Tiled client).

    Args:
        container: The Tiled container the runs were written to.
        uid: The run's full uid.

    Raises:
        KeyError: There is no run ``uid`` in the container (the message names both).
    """
    try:
        return container[uid]
    except KeyError:
        where = getattr(container, "uri", repr(container))
        raise KeyError(f"no run with uid {uid!r} in Tiled container {where}") from None


def bluesky_catalog(container: Container) -> CatalogOfBlueskyRuns:
    """Databroker 2's catalog view of ``container`` (same server, same node, no copy).

    Args:
        container: A Tiled container holding bluesky runs.

    Returns:
        A ``CatalogOfBlueskyRuns`` (``databroker.v2.Broker``) on the same node: ``[uid]``,
        ``.scan_id[n]``, ``.v2[uid]`` (databroker v2 runs).
    """
    if isinstance(container, CatalogOfBlueskyRuns):
        return container
    return CatalogOfBlueskyRuns(
        container.context, item=container.item, structure_clients=_own(container.structure_clients)
    )


def _own(clients: Any) -> Any:
    """A structure-client map that shares no entries with ``clients``.

    bluesky-tiled-plugins' ``CatalogOfBlueskyRuns.v2`` sets ``BlueskyRun`` on a *shallow* copy
    of its map, which shares the entries with the process-wide default: after one ``.v2`` every
    run read anywhere in the process would have the v2 layout (streams as ``data``,
    ``timestamps``, ``config``). Reading through this map keeps that change to the catalog.
    """
    if not isinstance(clients, OneShotCachedMap):
        return clients
    return OneShotCachedMap({key: (lambda key=key: clients[key]) for key in clients})
