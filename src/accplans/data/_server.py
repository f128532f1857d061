"""Tiled servers: embedded (:class:`LocalTiled`), standalone (``accplans tiled serve``).

Both listen on 127.0.0.1 only and need an API key to write (Tiled's single-user key, which must be
alphanumeric).

- :class:`LocalTiled` runs ``tiled.server.SimpleTiledServer`` in a thread of this process (tests,
  notebooks). Always use it as a context manager (or call :meth:`LocalTiled.close`): a server
  left open keeps a non-daemon thread and the process never exits.
- ``accplans tiled serve`` (:func:`serve_main`) runs the equivalent of ``tiled serve catalog
  <dir>/catalog.db --init -w <dir>/data -w duckdb:///<dir>/storage.duckdb --host 127.0.0.1
  --port P --api-key KEY`` in the foreground: SQLite catalog, zarr array files, DuckDB tables.
  The key comes from ``--api-key``, the ``TILED_SINGLE_USER_API_KEY`` environment variable or
  the key file ``<dir>/api_key``; if none exists it is generated and written there with mode
  600. It is never put on a command line (other users can read those) nor printed.
  :func:`run_tiled_server` runs it as a child process for the demo and tests and always stops
  and reaps it.

A facility runs its own Tiled server instead and points the same code at it: nothing in
accplans changes but the URI and the key. ``accplans tiled facility-config`` writes a complete
configuration (:func:`~accplans.data.facility_config`: PostgreSQL, password login, operators
write and viewers read; how-to "Run Tiled for a facility"). In short, ``tiled serve config
config.yml`` with, e.g.::

    authentication:
      providers:                       # how people log in: PAM, LDAP or OIDC
        - provider: pam
          authenticator: tiled.authenticators:PAMAuthenticator
      tiled_admins: [{provider: pam, id: tiledadmin}]
      secret_keys: ["${TILED_SECRET_KEY}"]                          # signs sessions
    database:                          # users, sessions and API keys
      uri: postgresql+asyncpg://tiled@dbhost/tiled_auth
    trees:
      - path: /
        tree: catalog
        args:
          uri: postgresql+asyncpg://tiled@dbhost/tiled_catalog     # the catalog
          writable_storage:
            - /data/tiled                                           # zarr arrays
            - postgresql://tiled@dbhost/tiled_tables                # event tables
          init_if_not_exists: true

Each user (or each control-room account) logs in once and creates a key with the scopes the
writer needs: ``tiled login``, then ``tiled api_key create --note "accplans RE" --scopes
read:metadata --scopes read:data --scopes write:metadata --scopes write:data --scopes
create:node --scopes delete:revision`` (the writer replaces the run's metadata in place when the
run stops); a key without the write scopes is refused writes (401). The session then connects
with ``BackgroundTiledWriter(tiled.client.from_uri("https://tiled.facility.org/api/v1",
api_key=os.environ["TILED_API_KEY"]))``; analysis sessions use read-only keys. Runs carry the
operator in their metadata (:func:`~accplans.data.run_metadata`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "API_KEY_FILENAME",
    "DEFAULT_DATA_DIRECTORY",
    "DEFAULT_TILED_PORT",
    "LocalTiled",
    "TiledProcess",
    "add_tiled_commands",
    "ensure_api_key",
    "run_tiled_server",
    "serve_main",
    "serve_tiled",
]

logger = logging.getLogger(__name__)

#: Data directory of the demo and of ``accplans tiled serve`` (relative to the working directory).
DEFAULT_DATA_DIRECTORY = Path(".accplans/data")
#: Port of ``accplans tiled serve``.
DEFAULT_TILED_PORT = 8000
#: Name of the API key file in the data directory.
API_KEY_FILENAME = "api_key"
_HOST = "127.0.0.1"
_KEY_ENV = "TILED_SINGLE_USER_API_KEY"


def _check_key(api_key: str, where: str) -> str:
    api_key = api_key.strip()
    if not api_key or not api_key.isalnum() or not api_key.isascii():
        raise ValueError(f"{where}: a Tiled API key must be non-empty and alphanumeric")
    return api_key


def ensure_api_key(directory: str | Path, api_key: str | None = None) -> str:
    """The API key of the server in ``directory``: given, from the environment or the key file.

    Order: ``api_key``, then ``$TILED_SINGLE_USER_API_KEY``, then ``<directory>/api_key``; if
    none, a new key (64 hex characters) is generated and written to ``<directory>/api_key``
    with mode 600.

    Raises:
        ValueError: The key is not alphanumeric, or the key file is readable by other users.
    """
    if api_key is not None:
        return _check_key(api_key, "api_key argument")
    if os.environ.get(_KEY_ENV):
        return _check_key(os.environ[_KEY_ENV], f"environment variable {_KEY_ENV}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / API_KEY_FILENAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ValueError(
                f"Tiled API key file {path} is readable by other users (mode {mode:o}); "
                f"run: chmod 600 {path}"
            ) from None
        return _check_key(path.read_text(), f"key file {path}")
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    logger.info("generated a Tiled API key in %s (mode 600)", path)
    return key


def _client(uri: str, api_key: str | None) -> Any:
    from tiled.client import from_uri

    return from_uri(uri, api_key=api_key)


class LocalTiled:
    """An embedded Tiled server (``SimpleTiledServer``) on 127.0.0.1, as a context manager.

    SQLite catalog, DuckDB tables and zarr arrays under ``directory``, a random free port, an API
    key needed for every request. About 5 s to start.

    Args:
        directory: Where the catalog and data live (created if missing; kept after close).
        api_key: Alphanumeric key; a random one if ``None``.

    Example:
        >>> with LocalTiled(tmp_path) as tiled:                  # doctest: +SKIP
        ...     RE.subscribe(BackgroundTiledWriter(tiled.client()))
    """

    def __init__(self, directory: str | Path, *, api_key: str | None = None) -> None:
        self.directory = Path(directory).resolve()
        self._api_key = None if api_key is None else _check_key(api_key, "LocalTiled api_key")
        self._server: Any = None

    def start(self) -> LocalTiled:
        """Start the server (if not running); returns ``self``."""
        if self._server is None:
            from tiled.server import SimpleTiledServer

            self.directory.mkdir(parents=True, exist_ok=True)
            # SimpleTiledServer shuts its thread down itself if its readiness probe fails.
            self._server = SimpleTiledServer(directory=self.directory, api_key=self._api_key)
        return self

    def close(self) -> None:
        """Stop the server and its thread. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    def __enter__(self) -> LocalTiled:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _running(self) -> Any:
        if self._server is None:
            raise RuntimeError(f"LocalTiled({self.directory}) is not running; use it in 'with'")
        return self._server

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1."""
        return int(self._running().port)

    @property
    def uri(self) -> str:
        """API URI (without the key): ``http://127.0.0.1:<port>/api/v1``."""
        return f"http://{_HOST}:{self.port}/api/v1"

    @property
    def api_key(self) -> str:
        """The key every request needs."""
        return str(self._running().api_key)

    def client(self) -> Any:
        """A new Tiled client (root container) with the key, able to write."""
        return _client(self.uri, self.api_key)

    def __repr__(self) -> str:
        state = f"port {self.port}" if self._server is not None else "stopped"
        return f"LocalTiled({str(self.directory)!r}, {state})"


# -- standalone server ---------------------------------------------------------------------


def serve_tiled(directory: str | Path, *, port: int, api_key: str) -> None:
    """Serve the catalog in ``directory`` on 127.0.0.1:``port`` until interrupted (blocks).

    The Python equivalent of ``tiled serve catalog <dir>/catalog.db --init -w <dir>/data
    -w duckdb:///<dir>/storage.duckdb --api-key KEY --host 127.0.0.1 --port P``, plus an
    in-memory streaming cache (as ``SimpleTiledServer``) so clients can follow runs live.
    """
    import uvicorn
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.config import Authentication, StreamingCacheConfig
    from tiled.server.app import build_app
    from tiled.server.logging_config import LOGGING_CONFIG
    from tiled.utils import ensure_uri

    directory = Path(directory).resolve()
    (directory / "data").mkdir(parents=True, exist_ok=True)
    tree = catalog_from_uri(
        f"sqlite:///{directory / 'catalog.db'}",
        writable_storage=[
            directory / "data",
            ensure_uri(f"duckdb:///{directory / 'storage.duckdb'}"),
        ],
        init_if_not_exists=True,
        cache_config=StreamingCacheConfig(uri="memory").model_dump(),
    )
    app = build_app(tree, Authentication(single_user_api_key=_check_key(api_key, "api_key")))
    uvicorn.run(app, host=_HOST, port=port, log_config=LOGGING_CONFIG)


def add_tiled_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tiled serve`` and ``tiled facility-config`` to an argparse ``subparsers``.

    The ``serve`` parser sets ``func=serve_main``: call ``args.func(args)``.

    Returns:
        The ``tiled`` parser.
    """
    tiled = subparsers.add_parser("tiled", help="the local Tiled server")
    commands = tiled.add_subparsers(dest="tiled_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve a Tiled catalog on 127.0.0.1 (SQLite + files); needs a key to write",
        description=(
            "Serve the Tiled catalog in DIRECTORY on 127.0.0.1. The API key comes from "
            f"--api-key, ${_KEY_ENV} or DIRECTORY/{API_KEY_FILENAME}, generated there (mode "
            "600) if missing."
        ),
    )
    serve.add_argument(
        "--directory",
        type=Path,
        default=DEFAULT_DATA_DIRECTORY,
        help=f"data directory (default: {DEFAULT_DATA_DIRECTORY})",
    )
    serve.add_argument(
        "--port", type=int, default=DEFAULT_TILED_PORT, help=f"port (default {DEFAULT_TILED_PORT})"
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="alphanumeric key (visible to other users in the process list: prefer the key file)",
    )
    serve.set_defaults(func=serve_main)
    from ._facility import add_facility_commands

    add_facility_commands(commands)
    return tiled


def serve_main(args: argparse.Namespace) -> int:
    """Run ``accplans tiled serve`` (blocks until interrupted).

    Args:
        args: Parsed arguments with ``directory``, ``port`` and ``api_key``.

    Returns:
        The exit status (0).
    """
    directory = Path(args.directory).resolve()
    key = ensure_api_key(directory, args.api_key)
    key_source = (
        "--api-key"
        if args.api_key
        else f"${_KEY_ENV}"
        if os.environ.get(_KEY_ENV)
        else str(directory / API_KEY_FILENAME)
    )
    print(
        f"Tiled catalog {directory}\n"
        f"  URI     http://{_HOST}:{args.port}/api/v1\n"
        f"  API key from {key_source}",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        serve_tiled(directory, port=args.port, api_key=key)
    return 0


@dataclass(frozen=True)
class TiledProcess:
    """A standalone Tiled server started by :func:`run_tiled_server`.

    Attributes:
        directory: Its data directory.
        port: TCP port on 127.0.0.1.
        api_key: The key every request needs.
        pid: Process id.
        log_path: Its stdout/stderr.
    """

    directory: Path
    port: int
    api_key: str
    pid: int
    log_path: Path

    @property
    def uri(self) -> str:
        """API URI (without the key)."""
        return f"http://{_HOST}:{self.port}/api/v1"

    def client(self) -> Any:
        """A new Tiled client (root container) with the key, able to write."""
        return _client(self.uri, self.api_key)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "Tiled server %d ignored SIGTERM for %.0f s: killing it", proc.pid, timeout
            )
            proc.kill()
    proc.wait()


@contextlib.contextmanager
def run_tiled_server(
    directory: str | Path,
    port: int | None = None,
    *,
    api_key: str | None = None,
    startup_timeout: float = 90.0,
) -> Iterator[TiledProcess]:
    """Run ``accplans tiled serve`` as a child process while the ``with`` block runs.

    Waits until the server answers with the key, and stops (SIGTERM, then SIGKILL) and reaps it
    however the block ends.

    Args:
        directory: Data directory (created if missing).
        port: Port on 127.0.0.1; a free one if ``None``.
        api_key: Key to use; by default the directory's key file (generated if missing).
        startup_timeout: Longest wait for the server to answer, s.

    Yields:
        The running server (``uri``, ``api_key``, ``client()``).

    Raises:
        RuntimeError: The server exited before answering (the message has its log's tail).
        TimeoutError: It did not answer within ``startup_timeout``.
    """
    directory = Path(directory).resolve()
    key = ensure_api_key(directory, api_key)
    port = _free_port() if port is None else port
    log_path = directory / "tiled-server.log"
    cmd = [sys.executable, "-m", "accplans.data", "tiled", "serve", "--directory", str(directory)]
    cmd += ["--port", str(port)]
    env = {**os.environ, _KEY_ENV: key}  # the key goes through the environment, not argv
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_serving(proc, port, key, log_path, startup_timeout)
        yield TiledProcess(directory, port, key, proc.pid, log_path)
    finally:
        _stop(proc)


def _wait_until_serving(
    proc: subprocess.Popen[bytes], port: int, key: str, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{_HOST}:{port}/api/v1/metadata/"  # needs the key (/api/v1/ does not)
    with httpx.Client(trust_env=False) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"Tiled server on port {port} exited with status {proc.returncode} before "
                    f"answering; {log_path}:\n{_log_tail(log_path)}"
                )
            try:
                # Our key must work: a different server already on this port would refuse it.
                if http.get(url, headers={"Authorization": f"Apikey {key}"}, timeout=2).is_success:
                    if proc.poll() is None:
                        return
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Tiled server on port {port} did not answer within {timeout} s; "
                    f"{log_path}:\n{_log_tail(log_path)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)  # returns at once if the server exits
