"""A facility Tiled on the machine's PostgreSQL: password login, per-user keys, roles.

The test creates its own databases (unique names ``accplans_test_<random>_*``) on the
PostgreSQL at 127.0.0.1:5432 and drops them at the end; it never touches other databases.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import bluesky.plans as bp
import httpx
import numpy as np
import pytest
import yaml
from bluesky import RunEngine
from ophyd_async.core import Array1D, init_devices, soft_signal_rw
from tiled.client.utils import ClientError
from tiled.config import parse_configs
from tiled.queries import Key

from accplans.cli._main import build_parser
from accplans.data import (
    OPERATOR_SCOPES,
    READ_SCOPES,
    BackgroundTiledWriter,
    FacilityTiled,
    ProcessTiledWriter,
    RoleAccessPolicy,
    TiledWriteError,
    facility_config,
    open_run,
    password_env_var,
    run_facility_tiled,
    write_facility_config,
)

PG = "postgres@127.0.0.1:5432"
OPERATOR, VIEWER, STRANGER = "olga", "victor", "stan"  # stan can log in but has no role
PASSWORDS = {name: secrets.token_hex(8) for name in (OPERATOR, VIEWER, STRANGER)}
DB_ROLES = ("catalog", "auth", "tables")


async def _admin(*statements: str) -> None:
    conn = await asyncpg.connect(f"postgresql://{PG}/postgres", timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _fetchval(database: str, query: str) -> Any:
    conn = await asyncpg.connect(f"postgresql://{PG}/{database}", timeout=5)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    """Three new databases of this test module, dropped at the end."""
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL unreachable on 127.0.0.1:5432 as user postgres ({exc!r})"
        if os.environ.get("CI"):  # .ci/run starts it: in CI its absence is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    prefix = f"accplans_test_{secrets.token_hex(6)}"
    names = {role: f"{prefix}_{role}" for role in DB_ROLES}
    created: list[str] = []
    try:
        for name in names.values():
            asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
            created.append(name)
        yield names
    finally:
        for name in created:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _config(databases: dict[str, str], data_directory: Path) -> dict[str, Any]:
    return facility_config(
        catalog_uri=f"postgresql+asyncpg://{PG}/{databases['catalog']}",
        auth_uri=f"postgresql+asyncpg://{PG}/{databases['auth']}",
        table_storage_uri=f"postgresql://{PG}/{databases['tables']}",
        data_directory=data_directory,
        operators=[OPERATOR],
        viewers=[VIEWER],
        authenticator="dictionary",
    )


@pytest.fixture(scope="module")
def facility(
    databases: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FacilityTiled]:
    directory = tmp_path_factory.mktemp("facility")
    config = _config(databases, directory / "data")
    users = config["authentication"]["providers"][0]["args"]["users_to_passwords"]
    users[STRANGER] = f"${{{password_env_var(STRANGER)}}}"
    with run_facility_tiled(config, directory, passwords=PASSWORDS) as server:
        yield server


@pytest.fixture(scope="module")
def operator_key(facility: FacilityTiled) -> str:
    return facility.create_api_key(facility.login(OPERATOR, PASSWORDS[OPERATOR]), note="RE")


@pytest.fixture(scope="module")
def viewer_key(facility: FacilityTiled) -> str:
    return facility.create_api_key(facility.login(VIEWER, PASSWORDS[VIEWER]), note="analysis")


@pytest.fixture
def client_of(facility: FacilityTiled) -> Iterator[Any]:
    """``client_of(key)``: a Tiled client with ``key``, closed at the end of the test."""
    clients: list[Any] = []

    def make(key: str) -> Any:
        clients.append(facility.client(key))
        return clients[-1]

    yield make
    for c in clients:
        c.context.close()


def _count(RE: RunEngine, n: int, tag: str) -> str:
    with init_devices():
        current = soft_signal_rw(float, 0.2, units="A")
        orbit = soft_signal_rw(Array1D[np.float64], np.linspace(-1e-3, 1e-3, 16), units="m")
    result = RE(bp.count([current, orbit], num=n, md={"tag": tag}))
    assert isinstance(result, tuple)  # a RunEngine without call_returns_result
    (uid,) = result
    return uid


def _assert_run(client: Any, uid: str, n: int, tag: str) -> None:
    run = open_run(client, uid)
    ds = run["primary"].read()
    np.testing.assert_array_equal(ds["current"].values, [0.2] * n)
    np.testing.assert_array_equal(ds["orbit"].values, np.tile(np.linspace(-1e-3, 1e-3, 16), (n, 1)))
    assert run.metadata["start"]["tag"] == tag
    assert run.metadata["stop"]["exit_status"] == "success"
    assert run["primary"].metadata["data_keys"]["orbit"]["units"] == "m"


def _status(exc_info: pytest.ExceptionInfo[ClientError]) -> int:
    return int(exc_info.value.response.status_code)


def test_operator_writes_runs_that_everyone_with_a_role_reads_back(
    facility: FacilityTiled,
    databases: dict[str, str],
    operator_key: str,
    viewer_key: str,
    client_of: Any,
) -> None:
    RE = RunEngine({})
    with BackgroundTiledWriter(client_of(operator_key)) as writer:
        token = RE.subscribe(writer)
        uid_thread = _count(RE, 5, "thread writer")
        writer.flush(timeout=60)
        RE.unsubscribe(token)
    writer_process = ProcessTiledWriter(facility.uri, operator_key)
    try:
        token = RE.subscribe(writer_process)
        uid_process = _count(RE, 3, "process writer")
        writer_process.flush(timeout=60)
        RE.unsubscribe(token)
    finally:
        writer_process.close()
    for key in (operator_key, viewer_key):
        client = client_of(key)
        _assert_run(client, uid_thread, 5, "thread writer")
        _assert_run(client, uid_process, 3, "process writer")
        assert {uid_thread, uid_process} <= set(client)
    # the data are in PostgreSQL: the runs' nodes in the catalog, event rows in the table store
    nodes = asyncio.run(_fetchval(databases["catalog"], "SELECT count(*) FROM nodes"))
    tables = asyncio.run(
        _fetchval(
            databases["tables"],
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
    )
    keys = asyncio.run(_fetchval(databases["auth"], "SELECT count(*) FROM api_keys"))
    print(f"\nfacility Tiled: {nodes} catalog nodes, {tables} SQL tables, {keys} API keys")
    assert nodes >= 2 * 3  # two runs, each with a primary stream and its table
    assert tables >= 1
    assert keys >= 2


def test_viewer_and_read_only_key_cannot_write(
    facility: FacilityTiled, operator_key: str, viewer_key: str, client_of: Any
) -> None:
    # the viewer's key carries the user's write scopes; the role forbids writing: 403
    viewer = client_of(viewer_key)
    with pytest.raises(ClientError) as refused:
        viewer.create_container("viewer_was_here")
    assert _status(refused) == 403
    # an operator's key narrowed to reading: 401, whatever the role allows
    read_only = facility.create_api_key(
        facility.login(OPERATOR, PASSWORDS[OPERATOR]), scopes=READ_SCOPES, note="read only"
    )
    reader = client_of(read_only)
    with pytest.raises(ClientError) as refused:
        reader.create_container("read_only_was_here")
    assert _status(refused) == 401
    list(reader)  # but it reads
    # the writer with the viewer's key fails loudly, and nothing was created
    RE = RunEngine({})
    writer = BackgroundTiledWriter(viewer)
    RE.subscribe(writer)
    _count(RE, 1, "viewer run")
    with pytest.raises(TiledWriteError, match="403"):
        writer.close(timeout=60)
    operator = client_of(operator_key)
    assert not {"viewer_was_here", "read_only_was_here"} & set(operator)
    assert not list(operator.search(Key("start.tag") == "viewer run"))


def test_anonymous_and_wrong_passwords_are_refused(facility: FacilityTiled) -> None:
    with httpx.Client(trust_env=False) as http:
        for path in ("/metadata/", "/search/"):
            assert http.get(facility.uri + path).status_code == 401
        assert (
            http.post(facility.uri + "/metadata/", json={"structure_family": "container"})
        ).status_code == 401
        bad_key = http.get(facility.uri + "/metadata/", headers={"Authorization": "Apikey nope"})
        assert bad_key.status_code == 401
    with pytest.raises(PermissionError, match="refused"):
        facility.login(OPERATOR, "not-the-password")
    with pytest.raises(PermissionError, match="refused"):
        facility.login("mallory", PASSWORDS[OPERATOR])


def test_a_user_without_a_role_sees_nothing(
    facility: FacilityTiled, operator_key: str, client_of: Any
) -> None:
    operator = client_of(operator_key)
    operator.create_container("operators_only", metadata={"tag": "hidden"})
    stranger_key = facility.create_api_key(
        facility.login(STRANGER, PASSWORDS[STRANGER]), note="stan"
    )
    assert "operators_only" in operator
    with httpx.Client(trust_env=False, headers={"Authorization": f"Apikey {stranger_key}"}) as http:
        assert http.get(facility.uri + "/metadata/").status_code == 404  # not even the root
        assert http.get(facility.uri + "/metadata/operators_only").status_code == 404
        assert http.get(facility.uri + "/search/").status_code == 404
        created = http.post(
            facility.uri + "/metadata/",
            json={"id": "stan_was_here", "structure_family": "container", "metadata": {}},
        )
        assert created.status_code == 404, created.text
    assert "stan_was_here" not in operator


def test_role_policy_scopes() -> None:
    policy = RoleAccessPolicy(provider="p", operators=["o"], viewers=["v"])

    def principal(name: str, provider: str = "p") -> Any:
        return SimpleNamespace(identities=[SimpleNamespace(provider=provider, id=name)])

    assert policy.scopes_of(principal("o")) == set(OPERATOR_SCOPES)
    assert policy.scopes_of(principal("v")) == set(READ_SCOPES)
    assert policy.scopes_of(principal("o", provider="other")) == set()
    assert policy.scopes_of(principal("stranger")) == set()
    assert policy.scopes_of(None) == set()
    with pytest.raises(ValueError, match=r"\['x'\] are both operators and viewers"):
        RoleAccessPolicy(provider="p", operators=["x"], viewers=["x"])


def test_config_is_valid_for_tiled_and_holds_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = {role: f"never_created_{role}" for role in DB_ROLES}
    config = _config(names, tmp_path / "data")
    path = write_facility_config(tmp_path / "config.yml", config)
    text = path.read_text()
    assert "${TILED_SECRET_KEY}" in text and f"${{{password_env_var(OPERATOR)}}}" in text
    monkeypatch.setenv("TILED_SECRET_KEY", "s3cret")
    monkeypatch.setenv(password_env_var(OPERATOR), "pw-olga")
    parsed = parse_configs(path)  # tiled's own schema and model validation
    assert parsed.authentication.allow_anonymous_access is False
    authenticator = parsed.authentication.authenticators["accplans"]
    assert authenticator._users_to_passwords[OPERATOR] == "pw-olga"
    assert isinstance(parsed.access_policy, RoleAccessPolicy)
    assert parsed.access_policy.viewers == {VIEWER}
    for bad, match in (
        ({"catalog_uri": "sqlite:///x.db"}, "catalog_uri must start with"),
        ({"table_storage_uri": "duckdb:///t.duckdb"}, "table_storage_uri must start with"),
        ({"operators": []}, "at least one operator"),
        ({"auth_uri": f"postgresql+asyncpg://{PG}/a"}, "two databases"),
    ):
        kwargs: dict[str, Any] = {
            "catalog_uri": f"postgresql+asyncpg://{PG}/a",
            "auth_uri": f"postgresql+asyncpg://{PG}/b",
            "table_storage_uri": f"postgresql://{PG}/c",
            "data_directory": tmp_path,
            "operators": ["o"],
        }
        kwargs.update(bad)
        with pytest.raises(ValueError, match=match):
            facility_config(**kwargs)


def test_cli_writes_the_same_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = {role: f"never_created_{role}" for role in DB_ROLES}
    out = tmp_path / "tiled.yml"
    argv = ["tiled", "facility-config", "-o", str(out), "--authenticator", "dictionary"]
    argv += ["--catalog-uri", f"postgresql+asyncpg://{PG}/{names['catalog']}"]
    argv += ["--auth-uri", f"postgresql+asyncpg://{PG}/{names['auth']}"]
    argv += ["--table-uri", f"postgresql://{PG}/{names['tables']}"]
    argv += ["--data-directory", str(tmp_path / "data"), "--operator", OPERATOR]
    argv += ["--viewer", VIEWER]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    assert yaml.safe_load(out.read_text()) == _config(names, tmp_path / "data")
    printed = capsys.readouterr().out
    assert "TILED_SECRET_KEY" in printed and password_env_var(VIEWER) in printed

    args = build_parser().parse_args([*argv[:-4], "--viewer", VIEWER])  # no operator
    assert args.func(args) == 2
    assert "at least one operator" in capsys.readouterr().out
