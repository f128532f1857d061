# pyright: reportUndefinedVariable=false
"""The RunEngine ``RE``; with TILED_URI, a Tiled client ``tiled_client`` (alias ``db``) and
a writer ``tiled_writer`` (in its own process) subscribed to ``RE``.

The RunEngine comes first: it starts the event loop the devices are connected in.
"""

from bluesky import RunEngine

RE = RunEngine()

if TILED_URI:
    from tiled.client import from_uri

    from accplans.data import ProcessTiledWriter

    tiled_client = from_uri(TILED_URI, api_key=TILED_API_KEY)
    tiled_writer = ProcessTiledWriter(TILED_URI, TILED_API_KEY)
    RE.subscribe(tiled_writer)
    print(f"accplans profile: runs are written to Tiled at {TILED_URI}")
else:
    tiled_client = tiled_writer = None
    print("accplans profile: TILED_URI is not set: no Tiled writer, runs are not saved")
db = tiled_client
