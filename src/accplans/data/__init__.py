"""Data: Tiled servers, a background writer, run metadata, versioned results, read-back.

- :class:`LocalTiled` (embedded) and ``accplans tiled serve`` / :func:`run_tiled_server`
  (standalone) serve a Tiled catalog on 127.0.0.1 that needs an API key to write.
- :class:`BackgroundTiledWriter` is the RunEngine callback: it only enqueues documents; a thread
  writes them to Tiled in batches of whatever has queued, so the plan never waits and data stay
  live. :class:`ProcessTiledWriter` runs it in a child process, so its work does not compete
  with the RunEngine for the GIL (the default of the demo and the profile).
- :func:`run_metadata` builds the standard start-document metadata of every run.
- Results (ORM, orbit, ...) follow versioned schemas (:data:`RESULT_KINDS`), are recorded in the
  run with :class:`ResultReadable` / :func:`record_result` and load back with
  :func:`load_result`.
- :func:`open_run` and :func:`bluesky_catalog` (databroker 2's view) read runs back.
"""

from ._metadata import STANDARD_METADATA_KEYS, jsonable, run_metadata
from ._read import bluesky_catalog, open_run
from ._results import (
    RESULT_KINDS,
    FieldSpec,
    Result,
    ResultError,
    ResultReadable,
    ResultSchema,
    load_result,
    record_result,
    register_result_kind,
    result_schema,
    result_stream_name,
)
from ._server import (
    API_KEY_FILENAME,
    DEFAULT_DATA_DIRECTORY,
    DEFAULT_TILED_PORT,
    LocalTiled,
    TiledProcess,
    add_tiled_commands,
    ensure_api_key,
    run_tiled_server,
    serve_main,
    serve_tiled,
)
from ._writer import BackgroundTiledWriter, TiledWriteError, WriteFailure
from ._writer_process import ProcessTiledWriter

__all__ = [
    "API_KEY_FILENAME",
    "DEFAULT_DATA_DIRECTORY",
    "DEFAULT_TILED_PORT",
    "RESULT_KINDS",
    "STANDARD_METADATA_KEYS",
    "BackgroundTiledWriter",
    "FieldSpec",
    "LocalTiled",
    "ProcessTiledWriter",
    "Result",
    "ResultError",
    "ResultReadable",
    "ResultSchema",
    "TiledProcess",
    "TiledWriteError",
    "WriteFailure",
    "add_tiled_commands",
    "bluesky_catalog",
    "ensure_api_key",
    "jsonable",
    "load_result",
    "open_run",
    "record_result",
    "register_result_kind",
    "result_schema",
    "result_stream_name",
    "run_metadata",
    "run_tiled_server",
    "serve_main",
    "serve_tiled",
]
