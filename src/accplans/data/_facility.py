"""A facility Tiled: PostgreSQL catalog and tables, password login, per-user keys, roles.

:func:`facility_config` builds a ``tiled serve config`` configuration (``accplans tiled
facility-config`` writes it as YAML):

- **catalog** in PostgreSQL (``postgresql+asyncpg://``), arrays as zarr files in a directory,
  event tables in PostgreSQL (``postgresql://``, Tiled's SQL table storage through ADBC);
- **authentication**: password login (``pam``: the host's accounts, or ``dictionary``: a fixed
  list of users whose passwords come from environment variables, for tests and small
  set-ups), sessions signed with ``$TILED_SECRET_KEY``; users, sessions and API keys in a
  PostgreSQL database (``postgresql+asyncpg://``); no anonymous access;
- **access control**: :class:`RoleAccessPolicy`: *operators* read and write (the scopes the
  writer needs), *viewers* only read, everyone else sees nothing.

Each user logs in with a password and creates API keys of their own (``tiled login`` and
``tiled api_key create``, or :meth:`FacilityTiled.login` and :meth:`FacilityTiled.create_api_key`
in Python); a key can be narrowed to the read scopes (:data:`READ_SCOPES`), and is refused
writes (HTTP 401). A viewer's key is refused writes whatever its scopes (HTTP 403, from the
policy). :func:`run_facility_tiled` runs such a server as a child process on 127.0.0.1 (tests,
trials); a facility runs ``tiled serve config`` under its own service manager.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from tiled.access_control.access_policies import ALL_ACCESS, NO_ACCESS
from tiled.access_control.protocols import AccessPolicy, normalize_access_tags

from ._server import _free_port, _log_tail, _stop

__all__ = [
    "OPERATOR_SCOPES",
    "READ_SCOPES",
    "FacilityTiled",
    "RoleAccessPolicy",
    "add_facility_commands",
    "facility_config",
    "facility_config_main",
    "password_env_var",
    "run_facility_tiled",
    "write_facility_config",
]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
#: Scopes of a read-only key and of viewers: read metadata and data.
READ_SCOPES: tuple[str, ...] = ("read:metadata", "read:data")
#: Scopes of operators on every node: what ``BackgroundTiledWriter`` needs (create runs and
#: streams, write data, replace the run's metadata at stop), plus reading.
OPERATOR_SCOPES: tuple[str, ...] = (
    *READ_SCOPES,
    "create:node",
    "write:metadata",
    "write:data",
    "delete:revision",
)
_SECRET_ENV = "TILED_SECRET_KEY"
_PROVIDER = "accplans"


def password_env_var(user: str) -> str:
    """The environment variable holding ``user``'s password (``dictionary`` authenticator).

    ``ACCPLANS_TILED_PASSWORD_<USER>`` with the name upper-cased and non-alphanumerics as ``_``.
    """
    safe = "".join(c if c.isalnum() else "_" for c in user).upper()
    return f"ACCPLANS_TILED_PASSWORD_{safe}"


class RoleAccessPolicy(AccessPolicy):
    """Tiled access policy: operators read and write, viewers read, others see nothing.

    Users are matched by their login name (the identity from ``provider``). The scopes a
    request finally has are those of its credentials (session or API key) *and* of the role:
    a viewer's key with write scopes is still refused writes (403), an operator's read-only key
    is refused them too (401).

    Args:
        provider: Name of the authentication provider whose identities the lists name.
        operators: Login names that read and write (:data:`OPERATOR_SCOPES`).
        viewers: Login names that only read (:data:`READ_SCOPES`).
    """

    def __init__(
        self, *, provider: str, operators: Sequence[str] = (), viewers: Sequence[str] = ()
    ) -> None:
        both = sorted(set(operators) & set(viewers))
        if both:
            raise ValueError(f"RoleAccessPolicy: users {both} are both operators and viewers")
        self.provider = provider
        self.operators = frozenset(operators)
        self.viewers = frozenset(viewers)

    def scopes_of(self, principal: Any) -> frozenset[str]:
        """The scopes the role of ``principal`` (a Tiled principal, or ``None``) allows."""
        if principal is None:
            return frozenset()
        names = {i.id for i in getattr(principal, "identities", []) if i.provider == self.provider}
        if names & self.operators:
            return frozenset(OPERATOR_SCOPES)
        if names & self.viewers:
            return frozenset(READ_SCOPES)
        return frozenset()

    async def init_node(
        self,
        principal: Any,
        authn_access_tags: Any,
        authn_scopes: Any,
        access_tags: Any = None,
    ) -> tuple[bool, Any]:
        """New nodes carry no access tags (roles apply to the whole catalog)."""
        return (False, access_tags or normalize_access_tags())

    async def allowed_scopes(
        self, node: Any, principal: Any, authn_access_tags: Any, authn_scopes: Any
    ) -> Any:
        """The role's scopes (the same on every node)."""
        return set(self.scopes_of(principal))

    async def filters(
        self,
        node: Any,
        principal: Any,
        authn_access_tags: Any,
        authn_scopes: Any,
        scopes: Any,
    ) -> Any:
        """Everything for users with a role, nothing for the others."""
        return ALL_ACCESS if set(scopes) <= self.scopes_of(principal) else NO_ACCESS


def facility_config(
    *,
    catalog_uri: str,
    auth_uri: str,
    data_directory: str | Path,
    table_storage_uri: str,
    operators: Sequence[str],
    viewers: Sequence[str] = (),
    authenticator: Literal["pam", "dictionary"] = "pam",
    provider: str = _PROVIDER,
    streaming_cache_uri: str = "memory",
    tiled_admins: Sequence[str] = (),
) -> dict[str, Any]:
    """A ``tiled serve config`` configuration for a facility (see the module docstring).

    Secrets are never in it: the session key is ``${TILED_SECRET_KEY}`` and, with the
    ``dictionary`` authenticator, each password is ``${ACCPLANS_TILED_PASSWORD_<USER>}``
    (:func:`password_env_var`); Tiled expands them from the server's environment.

    Args:
        catalog_uri: The catalog database, ``postgresql+asyncpg://user@host:port/db``.
        auth_uri: Users, sessions and API keys, ``postgresql+asyncpg://user@host:port/db``
            (another database than the catalog's).
        data_directory: Where zarr array files go (shared by the server's workers).
        table_storage_uri: Event tables, ``postgresql://user@host:port/db``.
        operators: Login names that read and write.
        viewers: Login names that only read.
        authenticator: ``"pam"`` (the host's accounts) or ``"dictionary"`` (``operators`` and
            ``viewers`` with passwords from the environment).
        provider: Name of the login provider (in URLs: ``/api/v1/auth/provider/<name>/token``).
        streaming_cache_uri: Live-data cache: ``"memory"`` (one server process) or a
            ``redis://`` URI.
        tiled_admins: Login names with Tiled's admin role (manage other users' keys).

    Returns:
        The configuration as a dict (dump it as YAML for ``tiled serve config``).

    Raises:
        ValueError: A URI has the wrong scheme, no operator, or a user in both lists.
    """
    for what, uri, scheme in (
        ("catalog_uri", catalog_uri, "postgresql+asyncpg://"),
        ("auth_uri", auth_uri, "postgresql+asyncpg://"),
        ("table_storage_uri", table_storage_uri, "postgresql://"),
    ):
        if not uri.startswith(scheme):
            raise ValueError(f"facility_config: {what} must start with {scheme!r}, got {uri!r}")
    if catalog_uri == auth_uri:
        raise ValueError("facility_config: the catalog and authentication need two databases")
    if not operators:
        raise ValueError("facility_config: name at least one operator")
    RoleAccessPolicy(provider=provider, operators=operators, viewers=viewers)  # checks lists
    if authenticator == "pam":
        auth_spec: dict[str, Any] = {
            "provider": provider,
            "authenticator": "tiled.authenticators:PAMAuthenticator",
        }
    elif authenticator == "dictionary":
        users = [*operators, *viewers]
        auth_spec = {
            "provider": provider,
            "authenticator": "tiled.authenticators:DictionaryAuthenticator",
            "args": {"users_to_passwords": {u: f"${{{password_env_var(u)}}}" for u in users}},
        }
    else:
        raise ValueError(
            f"facility_config: authenticator must be 'pam' or 'dictionary', got {authenticator!r}"
        )
    authentication: dict[str, Any] = {
        "providers": [auth_spec],
        "secret_keys": [f"${{{_SECRET_ENV}}}"],
        "allow_anonymous_access": False,
    }
    if tiled_admins:
        authentication["tiled_admins"] = [{"provider": provider, "id": a} for a in tiled_admins]
    return {
        "authentication": authentication,
        "database": {"uri": auth_uri, "init_if_not_exists": True},
        "access_control": {
            "access_policy": "accplans.data:RoleAccessPolicy",
            "args": {"provider": provider, "operators": list(operators), "viewers": list(viewers)},
        },
        "trees": [
            {
                "path": "/",
                "tree": "catalog",
                "args": {
                    "uri": catalog_uri,
                    "writable_storage": [str(Path(data_directory)), table_storage_uri],
                    "init_if_not_exists": True,
                },
            }
        ],
        "streaming_cache": {"uri": streaming_cache_uri},
    }


def write_facility_config(path: str | Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` (from :func:`facility_config`) as YAML to ``path``; returns the path."""
    path = Path(path)
    text = (
        "# Tiled configuration written by accplans (accplans.data.facility_config).\n"
        f"# Needs ${_SECRET_ENV} (and, with the dictionary authenticator, each user's\n"
        "# ACCPLANS_TILED_PASSWORD_<USER>) in the server's environment.\n"
        "# Run: tiled serve config THIS_FILE --host HOST --port PORT\n"
    )
    path.write_text(text + yaml.safe_dump(dict(config), sort_keys=False))
    return path


@dataclass(frozen=True)
class FacilityTiled:
    """A facility Tiled server started by :func:`run_facility_tiled`.

    Attributes:
        port: TCP port on 127.0.0.1.
        provider: Name of the login provider.
        config_path: Its configuration file.
        log_path: Its stdout/stderr.
        pid: Process id.
    """

    port: int
    provider: str
    config_path: Path
    log_path: Path
    pid: int
    _http: httpx.Client = field(repr=False, compare=False)

    @property
    def uri(self) -> str:
        """API URI: ``http://127.0.0.1:<port>/api/v1``."""
        return f"http://{_HOST}:{self.port}/api/v1"

    def login(self, username: str, password: str) -> str:
        """Log in with a password; returns the session's access token.

        Raises:
            PermissionError: Wrong user name or password (HTTP 401).
        """
        response = self._http.post(
            f"{self.uri}/auth/provider/{self.provider}/token",
            data={"grant_type": "password", "username": username, "password": password},
        )
        if response.status_code == 401:
            raise PermissionError(f"Tiled login as {username!r} refused: {response.text}")
        response.raise_for_status()
        return str(response.json()["access_token"])

    def create_api_key(
        self,
        access_token: str,
        *,
        scopes: Sequence[str] | None = None,
        note: str = "accplans",
        expires_in: int | None = None,
    ) -> str:
        """Create an API key for the logged-in user (``tiled api_key create``).

        Args:
            access_token: From :meth:`login`.
            scopes: The key's scopes (a subset of the user's); ``None``: all of the user's.
            note: Shown in key listings.
            expires_in: Lifetime, s (``None``: no expiry).

        Returns:
            The key's secret (shown once; store it like a password).

        Raises:
            PermissionError: The server refused (expired session, scopes the user lacks).
        """
        body: dict[str, Any] = {
            "expires_in": expires_in,
            "note": note,
            "scopes": ["inherit"] if scopes is None else list(scopes),
        }
        response = self._http.post(
            f"{self.uri}/auth/apikey",
            json=body,
            headers={"Authorization": f"Bearer {access_token}"},
        )
        if not response.is_success:
            raise PermissionError(
                f"Tiled refused to create an API key (HTTP {response.status_code}): {response.text}"
            )
        return str(response.json()["secret"])

    def client(self, api_key: str) -> Any:
        """A Tiled client (root container) authenticated with ``api_key``."""
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=api_key)


@contextlib.contextmanager
def run_facility_tiled(
    config: Mapping[str, Any],
    directory: str | Path,
    *,
    passwords: Mapping[str, str] | None = None,
    port: int | None = None,
    startup_timeout: float = 90.0,
) -> Iterator[FacilityTiled]:
    """Run ``tiled serve config`` on 127.0.0.1 with ``config`` while the ``with`` block runs.

    A random session key and the ``passwords`` go to the server through its environment only
    (never on its command line nor in the file). Waits until the server answers and stops
    (SIGTERM, then SIGKILL) and reaps it however the block ends. The databases must exist.

    Args:
        config: From :func:`facility_config`.
        directory: Where the configuration file and the log go (created if missing).
        passwords: Login name -> password (``dictionary`` authenticator).
        port: Port on 127.0.0.1; a free one if ``None``.
        startup_timeout: Longest wait for the server to answer, s.

    Yields:
        The running server (``uri``, ``login``, ``create_api_key``, ``client``).

    Raises:
        RuntimeError: The server exited before answering (the message has its log's tail).
        TimeoutError: It did not answer within ``startup_timeout``.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_facility_config(directory / "tiled-facility.yml", config)
    log_path = directory / "tiled-facility.log"
    provider = str(config["authentication"]["providers"][0]["provider"])
    port = _free_port() if port is None else port
    env = {**os.environ, _SECRET_ENV: secrets.token_hex(32)}
    env.update({password_env_var(u): p for u, p in (passwords or {}).items()})
    cmd = [sys.executable, "-m", "tiled", "serve", "config", str(config_path)]
    cmd += ["--host", _HOST, "--port", str(port)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with httpx.Client(trust_env=False, timeout=30) as http:
            _wait_until_answering(proc, http, port, log_path, startup_timeout)
            yield FacilityTiled(port, provider, config_path, log_path, proc.pid, http)
    finally:
        _stop(proc)


def _wait_until_answering(
    proc: subprocess.Popen[bytes], http: httpx.Client, port: int, log_path: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{_HOST}:{port}/api/v1/"  # public: the server's description
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"Tiled server on port {port} exited with status {proc.returncode} before "
                f"answering; {log_path}:\n{_log_tail(log_path)}"
            )
        try:
            response = http.get(url, timeout=2)
            if response.is_success and "authentication" in response.json():
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Tiled server on port {port} did not answer within {timeout} s; "
                f"{log_path}:\n{_log_tail(log_path)}"
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.1)  # returns at once if the server exits


def add_facility_commands(tiled_commands: Any) -> argparse.ArgumentParser:
    """Add ``facility-config`` to the subparsers of ``accplans tiled``.

    Returns:
        The ``facility-config`` parser (``func=facility_config_main``).
    """
    p = tiled_commands.add_parser(
        "facility-config",
        help="write a facility Tiled configuration (PostgreSQL, password login, roles)",
        description=(
            "Write a 'tiled serve config' file: catalog and event tables in PostgreSQL, zarr "
            "arrays in a directory, password login, per-user API keys, operators write and "
            "viewers read, no anonymous access. Secrets stay out of the file: the server needs "
            f"${_SECRET_ENV} (and, with --authenticator dictionary, each user's password in "
            "ACCPLANS_TILED_PASSWORD_<USER>) in its environment."
        ),
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="YAML file to write")
    p.add_argument("--catalog-uri", required=True, help="postgresql+asyncpg://user@host/db")
    p.add_argument("--auth-uri", required=True, help="postgresql+asyncpg://user@host/db2")
    p.add_argument("--table-uri", required=True, help="postgresql://user@host/db3 (event tables)")
    p.add_argument("--data-directory", type=Path, required=True, help="zarr array files")
    p.add_argument("--operator", action="append", default=[], help="login name that writes")
    p.add_argument("--viewer", action="append", default=[], help="login name that reads")
    p.add_argument(
        "--admin", action="append", default=[], help="login name with Tiled's admin role"
    )
    p.add_argument(
        "--authenticator", choices=("pam", "dictionary"), default="pam", help="default: pam"
    )
    p.add_argument("--provider", default=_PROVIDER, help=f"login provider name ({_PROVIDER})")
    p.add_argument("--streaming-cache", default="memory", help="memory or redis://host:port")
    p.set_defaults(func=facility_config_main)
    return p


def facility_config_main(args: argparse.Namespace) -> int:
    """Run ``accplans tiled facility-config``.

    Returns:
        The exit status: 0, or 2 for a bad argument (the message says which).
    """
    try:
        config = facility_config(
            catalog_uri=args.catalog_uri,
            auth_uri=args.auth_uri,
            data_directory=args.data_directory,
            table_storage_uri=args.table_uri,
            operators=args.operator,
            viewers=args.viewer,
            authenticator=args.authenticator,
            provider=args.provider,
            streaming_cache_uri=args.streaming_cache,
            tiled_admins=args.admin,
        )
    except ValueError as exc:
        print(f"accplans tiled facility-config: {exc}")
        return 2
    path = write_facility_config(args.output, config)
    needed = [_SECRET_ENV]
    if args.authenticator == "dictionary":
        needed += [password_env_var(u) for u in [*args.operator, *args.viewer]]
    print(
        f"wrote {path}: operators {args.operator}, viewers {args.viewer}\n"
        f"  the server's environment needs: {', '.join(needed)}\n"
        f"  run: tiled serve config {path} --host HOST --port PORT"
    )
    return 0
