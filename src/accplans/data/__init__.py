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
  :func:`load_result`; snapshots (``"snapshot"``) compare with :func:`setpoint_diff`.
- :func:`open_run` and :func:`bluesky_catalog` (databroker 2's view) read runs back;
  :func:`export_nexus` writes a run to a NeXus/HDF5 file (``accplans export RUN``).
- A facility's Tiled (PostgreSQL catalog and tables, password login, per-user API keys,
  operators write and viewers read): :func:`facility_config` (``accplans tiled
  facility-config``), :class:`RoleAccessPolicy`, :func:`run_facility_tiled`.
"""

from ._facility import (
    OPERATOR_SCOPES,
    READ_SCOPES,
    FacilityTiled,
    RoleAccessPolicy,
    facility_config,
    password_env_var,
    run_facility_tiled,
    write_facility_config,
)
from ._metadata import STANDARD_METADATA_KEYS, jsonable, run_metadata
from ._nexus import NEXUS_EXPORT_PACKAGES, export_nexus
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
from ._snapshots import (
    SetpointChange,
    format_diff,
    setpoint_diff,
    snapshot_setpoints,
    tiled_client_from_env,
)
from ._writer import BackgroundTiledWriter, TiledWriteError, WriteFailure
from ._writer_process import ProcessTiledWriter

__all__ = [
    "API_KEY_FILENAME",
    "DEFAULT_DATA_DIRECTORY",
    "DEFAULT_TILED_PORT",
    "NEXUS_EXPORT_PACKAGES",
    "OPERATOR_SCOPES",
    "READ_SCOPES",
    "RESULT_KINDS",
    "STANDARD_METADATA_KEYS",
    "BackgroundTiledWriter",
    "FacilityTiled",
    "FieldSpec",
    "LocalTiled",
    "ProcessTiledWriter",
    "Result",
    "ResultError",
    "ResultReadable",
    "ResultSchema",
    "SetpointChange",
    "RoleAccessPolicy",
    "TiledProcess",
    "TiledWriteError",
    "WriteFailure",
    "add_tiled_commands",
    "bluesky_catalog",
    "ensure_api_key",
    "format_diff",
    "export_nexus",
    "facility_config",
    "jsonable",
    "load_result",
    "open_run",
    "password_env_var",
    "record_result",
    "register_result_kind",
    "result_schema",
    "result_stream_name",
    "run_facility_tiled",
    "run_metadata",
    "run_tiled_server",
    "serve_main",
    "serve_tiled",
    "setpoint_diff",
    "snapshot_setpoints",
    "tiled_client_from_env",
    "write_facility_config",
]
