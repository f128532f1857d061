"""The standalone Tiled server: loopback, key in a private file, writes need the key, no orphan."""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import bluesky.plans as bp
import httpx
import numpy as np
import pytest
from bluesky import RunEngine
from ophyd_async.core import init_devices, soft_signal_rw
from tiled.client import Context, from_context
from tiled.client.utils import ClientError

from accplans.data import (
    API_KEY_FILENAME,
    BackgroundTiledWriter,
    TiledProcess,
    add_tiled_commands,
    ensure_api_key,
    open_run,
    run_tiled_server,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledProcess]:
    with run_tiled_server(tmp_path_factory.mktemp("standalone")) as proc:
        yield proc


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_key_is_generated_alphanumeric_in_a_private_file(server):
    path = server.directory / API_KEY_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == server.api_key
    assert server.api_key.isalnum() and len(server.api_key) >= 32
    assert server.uri.startswith("http://127.0.0.1:")


def test_writes_need_the_key(server):
    url = f"{server.uri}/metadata/"
    body = {"data": {"metadata": {}, "structure_family": "container", "specs": []}}
    with httpx.Client(trust_env=False) as http:
        assert http.post(url, json=body).status_code == 401
        wrong = {"Authorization": "Apikey 0123456789abcdef"}
        assert http.post(url, json=body, headers=wrong).status_code == 401
    context, _ = Context.from_any_uri(server.uri, api_key="0123456789abcdef")
    try:
        with pytest.raises(ClientError, match="401"):
            from_context(context)
    finally:
        context.close()
    client = server.client()
    try:
        node = client.create_container("made-with-the-key")
        assert "made-with-the-key" in client and node.metadata == {}
    finally:
        client.context.close()


def test_a_run_written_to_the_standalone_server_reads_back(server):
    RE = RunEngine({})
    with init_devices():
        tune = soft_signal_rw(float, 0.25)
    client = server.client()
    try:
        with BackgroundTiledWriter(client) as writer:
            RE.subscribe(writer)
            (uid,) = RE(bp.count([tune], num=3))
            writer.flush(timeout=60)
        np.testing.assert_array_equal(open_run(client, uid)["primary"].read()["tune"], [0.25] * 3)
    finally:
        client.context.close()


def test_server_is_stopped_and_reaped_even_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError, match="inside the block"):
        with run_tiled_server(tmp_path, api_key="abc123XYZ") as proc:
            pid = proc.pid
            assert proc.api_key == "abc123XYZ"
            raise RuntimeError("inside the block")
    assert _gone(pid)
    assert not (tmp_path / API_KEY_FILENAME).exists()  # a given key is not written anywhere


def test_a_server_that_cannot_start_reports_its_log(tmp_path, server):
    with pytest.raises(RuntimeError, match="exited with status"):
        with run_tiled_server(tmp_path, port=server.port):  # port taken
            pass


def test_key_file_readable_by_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TILED_SINGLE_USER_API_KEY", raising=False)
    key = ensure_api_key(tmp_path)
    assert ensure_api_key(tmp_path) == key  # read back, not regenerated
    (tmp_path / API_KEY_FILENAME).chmod(0o644)
    with pytest.raises(ValueError, match=r"readable by other users.*chmod 600"):
        ensure_api_key(tmp_path)
    monkeypatch.setenv("TILED_SINGLE_USER_API_KEY", "fromtheenv1")
    assert ensure_api_key(tmp_path) == "fromtheenv1"
    with pytest.raises(ValueError, match="alphanumeric"):
        ensure_api_key(tmp_path, "not-alnum!")


def test_cli_parser(tmp_path: Path):
    parser = argparse.ArgumentParser(prog="accplans")
    add_tiled_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tiled", "serve", "--directory", str(tmp_path), "--port", "8123"])
    assert (args.directory, args.port, args.api_key) == (tmp_path, 8123, None)
    assert args.func.__name__ == "serve_main"
