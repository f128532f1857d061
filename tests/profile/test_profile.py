"""The profile (``profile_collection/startup``) in IPython, in qserver-list-plans-devices and in
the queueserver, on the small ring's twin with a Tiled server.

Every process these tests start listens on 127.0.0.1 only and is stopped however its test ends:
IPython and the RE manager (with its worker) by their test, Tiled and Redis (started only when
the machine has none on 127.0.0.1:6379) at the end of the module.

``ACCPLANS_UPDATE_PROFILE=1 pytest tests/profile -k existing`` rewrites the committed
``existing_plans_and_devices.yaml`` from the startup files (after a change of a plan's
signature or docstring) instead of comparing with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from accplans.config import load_description
from accplans.data import TiledProcess, load_result, run_tiled_server
from accplans.model import brute_force_orm
from accplans.plans import PLANS
from accplans.sim import TwinProcess

PROFILE = Path(__file__).resolve().parents[2] / "profile_collection"
STARTUP = PROFILE / "startup"
EXISTING = STARTUP / "existing_plans_and_devices.yaml"
PERMISSIONS = STARTUP / "user_group_permissions.yaml"
BIN = Path(sys.executable).parent
UPDATE = os.environ.get("ACCPLANS_UPDATE_PROFILE") == "1"
SELECT = [0, 1, 2]  # the first three horizontal correctors of the small ring
_HOST = "127.0.0.1"


# -- helpers ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _profile_environment(twin: TwinProcess, tiled: TiledProcess | None) -> dict[str, str]:
    """The environment of a process that runs the profile on ``twin`` (and writes to ``tiled``)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ACCPLANS_", "TILED_", "QSERVER"))
    }
    env.update(twin.environment)
    env.update(
        ACCPLANS_MACHINE="small",
        ACCPLANS_MODE="twin",
        ACCPLANS_ADDRESS=f"{_HOST}:{twin.ports.ca}",
        ACCPLANS_PROTOCOL="ca",
    )
    if tiled is not None:
        env.update(TILED_URI=tiled.uri, TILED_API_KEY=tiled.api_key)
    return env


def _setpoints(twin: TwinProcess) -> np.ndarray:
    """Every corrector setpoint (A): the HCORR then VCORR family array PVs."""
    return np.concatenate(
        [np.asarray(twin.control.get(twin.pv(f"{fam}:SP")), float) for fam in ("HCORR", "VCORR")]
    )


def _expected_orm(twin: TwinProcess, names: list[str], directory: Path) -> np.ndarray:
    """What the twin's BPMs must show: the true lattice's ORM read through the BPM errors.

    The true ORM (pyAT ``find_orbit4`` at the served RF frequency) of each corrector, scaled by
    its true calibration, mapped through each BPM's gain and roll (offsets cancel).
    """
    truth = twin.control.export_truth(directory)
    description = load_description("small")
    elements = [description.device(n).elements[0] for n in names]
    planes = [description.device(n).plane or "" for n in names]
    bpms = [int(i) for i in truth.bpm_elements]
    true = brute_force_orm(truth.ring, bpms, elements, planes, dct=truth.dct_m)
    nbpm = len(bpms)
    expected = np.empty_like(true)
    for j, name in enumerate(names):
        beam = np.stack([true[:nbpm, j], true[nbpm:, j]], axis=1)
        seen = truth.readings(beam) - truth.readings(np.zeros_like(beam))
        expected[:, j] = np.concatenate([seen[:, 0], seen[:, 1]]) * truth.corrector_scale(name)
    return expected


def _wait_for_stopped_run(client: Any, uid: str, timeout: float = 60.0) -> Any:
    """The run ``uid`` once Tiled has its stop document (the writer works in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        if uid in client:
            run = client[uid]
            if run.metadata.get("stop"):
                return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {uid} not complete in Tiled after {timeout} s")
        time.sleep(0.1)


def _check_orm_run(
    client: Any, uid: str, twin: TwinProcess, start: np.ndarray, directory: Path
) -> None:
    """The run is in Tiled, its ORM is the twin's, and the correctors are back where they were."""
    run = _wait_for_stopped_run(client, uid)
    assert run.metadata["start"]["plan_name"] == "measure_orm"
    assert run.metadata["start"]["plan_args"]["correctors"] == ["hcorr", "vcorr"]
    assert run.metadata["stop"]["exit_status"] == "success"
    result = load_result(client, uid, "orm")
    matrix = np.asarray(result.data["matrix"])
    names = [str(n) for n in result.data["corrector_names"]]
    hcorr = load_description("small").families["hcorr"].devices
    assert matrix.shape == (32, 3)  # x and y of 16 BPMs; 3 correctors
    assert names == hcorr[:3]
    assert np.all(np.isfinite(matrix))
    assert np.all(np.abs(matrix[:16]).max(axis=0) > 1.0)  # m/rad: every column saw its kick
    expected = _expected_orm(twin, names, directory)
    error = np.abs(matrix - expected).max(axis=0) / np.abs(expected).max(axis=0)
    assert np.all(error < 1e-4), f"ORM differs from the twin's truth by {error} (relative)"
    np.testing.assert_allclose(_setpoints(twin), start, rtol=0, atol=1e-9)


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TiledProcess]:
    """A standalone Tiled server on 127.0.0.1 (``accplans tiled serve``)."""
    with run_tiled_server(tmp_path_factory.mktemp("tiled")) as server:
        yield server


def _redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(host=_HOST, port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The machine's Redis on 127.0.0.1:6379 if it answers (left running), else our own."""
    if _redis_answers(6379):
        yield 6379
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start one")
    port = _free_port()
    directory = tmp_path_factory.mktemp("redis")
    args = [server, "--bind", _HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    args += ["--dir", str(directory)]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _redis_answers(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not answer")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _close_api(api: Any) -> None:
    """Close the client; bluesky-queueserver-api closes its ZMQ sockets but not their contexts."""
    api.close()
    contexts = [getattr(getattr(api, "_client", None), "_ctx", None)]
    for monitor in ("_console_monitor", "_system_info_monitor"):
        receiver = getattr(getattr(api, monitor, None), "_rco", None)
        contexts.append(getattr(getattr(receiver, "_socket", None), "context", None))
    for context in contexts:
        if context is not None:
            context.destroy(linger=0)


@contextmanager
def _re_manager(env: dict[str, str], redis_port: int, directory: Path) -> Iterator[Any]:
    """``start-re-manager`` on loopback with the profile; yields a connected ``REManagerAPI``.

    The manager reads a copy of the committed plans-and-devices list and never writes it. On
    exit (however the block ends): environment closed, manager stopped, its process group
    reaped, its Redis keys deleted.
    """
    import redis
    from bluesky_queueserver_api.zmq import REManagerAPI

    control = f"tcp://{_HOST}:{_free_port()}"
    info = f"tcp://{_HOST}:{_free_port()}"
    prefix = f"accplans_test_{uuid.uuid4().hex[:12]}"
    existing = directory / EXISTING.name
    shutil.copy(EXISTING, existing)
    args = [str(BIN / "start-re-manager"), "--startup-dir", str(STARTUP)]
    args += ["--existing-plans-devices", str(existing), "--update-existing-plans-devices", "NEVER"]
    args += ["--user-group-permissions", str(PERMISSIONS)]
    args += ["--redis-addr", f"{_HOST}:{redis_port}", "--redis-name-prefix", prefix]
    args += ["--zmq-control-addr", control, "--zmq-info-addr", info]
    log_path = directory / "re-manager.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = REManagerAPI(
        zmq_control_addr=control, zmq_info_addr=info, timeout_recv=2.0, status_polling_period=0.1
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"start-re-manager exited ({proc.returncode}): {log_path}")
            try:
                api.status(reload=True)
                break
            except Exception as exc:  # no answer yet (each try waits timeout_recv)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"start-re-manager silent for 60 s: {log_path}") from exc
        yield api
    finally:
        with suppress(Exception):
            if api.status(reload=True)["worker_environment_exists"]:
                api.environment_close()
                api.wait_for_idle(timeout=30)
        with suppress(Exception):
            api.send_request(method="manager_stop", params={"option": "safe_off"})
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the worker, if it outlived the manager
        _close_api(api)
        keys = redis.Redis(host=_HOST, port=redis_port)
        try:
            stale = list(keys.scan_iter(match=f"{prefix}*"))
            if stale:
                keys.delete(*stale)
        finally:
            keys.close()


# -- tests ----------------------------------------------------------------------------------------
def test_existing_plans_and_devices_is_current(small_twin: TwinProcess, tmp_path: Path) -> None:
    """qserver-list-plans-devices on the profile gives the committed file (it connects)."""
    command = [str(BIN / "qserver-list-plans-devices"), "--startup-dir", str(STARTUP)]
    proc = subprocess.run(
        [*command, "--file-dir", str(tmp_path)],
        env=_profile_environment(small_twin, None),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "connected to 'small-twin'" in output
    assert "no Tiled writer" in output
    generated_path = tmp_path / EXISTING.name
    if UPDATE:
        shutil.copy(generated_path, EXISTING)
    generated = yaml.safe_load(generated_path.read_text())
    committed = yaml.safe_load(EXISTING.read_text())
    assert generated == committed, (
        f"{EXISTING} is out of date (a plan's signature or docstring changed?): "
        "regenerate it with ACCPLANS_UPDATE_PROFILE=1 pytest tests/profile -k existing"
    )
    # what the queueserver needs: device parameters that take device names
    plans = generated["existing_plans"]
    assert sorted(plans) == sorted(plan.__name__ for plan in PLANS)  # every public plan
    params = {p["name"]: p for p in plans["measure_orm"]["parameters"]}
    assert params["bpms"]["annotation"]["devices"] == {"OrbitSources": ["bpms"]}
    families = params["correctors"]["annotation"]["devices"]["Families"]
    assert {"hcorr", "vcorr", "rf"} <= set(families)
    assert "bpms" not in families
    assert params["kick"]["annotation"] == {"type": "float"}
    assert {"bpms", "hcorr", "vcorr", "rf", "dcct", "tune"} <= set(generated["existing_devices"])


@pytest.mark.twin(noise=False)
def test_ipython_profile_measures_orm_into_tiled(
    fresh_small_twin: TwinProcess, tiled: TiledProcess, tmp_path: Path
) -> None:
    """``ipython --profile-dir=...`` runs the startup files; measure_orm lands in Tiled."""
    twin = fresh_small_twin
    start = _setpoints(twin)
    profile = tmp_path / "profile"  # a copy: IPython writes its own files into the profile
    shutil.copytree(STARTUP, profile / "startup")
    code = (
        "import json\n"
        "(uid,) = RE(measure_orm(machine.bpms, [machine.hcorr, machine.vcorr], "
        f"select={SELECT!r}))\n"
        "tiled_writer.flush(60)\n"
        "print('RESULT ' + json.dumps({'uid': uid, 'bpms': bpms is machine.bpms}))\n"
    )
    command = [str(BIN / "ipython"), f"--profile-dir={profile}", "--no-banner", "--colors=nocolor"]
    proc = subprocess.run(
        [*command, "--HistoryManager.enabled=False", "-c", code],
        env=_profile_environment(twin, tiled),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert f"runs are written to Tiled at {tiled.uri}" in output
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["bpms"] is True
    client = tiled.client()
    try:
        _check_orm_run(client, result["uid"], twin, start, tmp_path / "truth")
    finally:
        client.context.close()


@pytest.mark.twin(noise=False)
def test_queueserver_runs_measure_orm(
    fresh_small_twin: TwinProcess, tiled: TiledProcess, redis_port: int, tmp_path: Path
) -> None:
    """The queueserver opens the profile, turns device names into devices, runs measure_orm."""
    from bluesky_queueserver_api import BPlan
    from tiled.queries import Key

    twin = fresh_small_twin
    start = _setpoints(twin)
    env = _profile_environment(twin, tiled)
    with _re_manager(env, redis_port, tmp_path) as api:
        api.environment_open()
        api.wait_for_idle(timeout=120)
        assert api.status()["worker_environment_exists"], (tmp_path / "re-manager.log").read_text()

        # the read-only group may not submit; unknown device names are refused at submission
        with pytest.raises(api.RequestFailedError, match="not in the list of allowed plans"):
            api.item_add(BPlan("measure_orm", "bpms", ["hcorr"]), user_group="observer")
        with pytest.raises(api.RequestFailedError, match="validation failed"):
            api.item_add(BPlan("measure_orm", "bpms", ["hcorr", "no_such_family"]))

        added = api.item_add(BPlan("measure_orm", "bpms", ["hcorr", "vcorr"], select=SELECT))
        assert added["success"], added
        api.queue_start()
        api.wait_for_idle(timeout=120)
        history = api.history_get()["items"]
        assert len(history) == 1, history
        outcome = history[0]["result"]
        assert outcome["exit_status"] == "completed", outcome
        (uid,) = outcome["run_uids"]

        client = tiled.client()
        try:
            _wait_for_stopped_run(client, uid)
            found = client.search(Key("start.plan_name") == "measure_orm")
            assert uid in list(found)
            _check_orm_run(client, uid, twin, start, tmp_path / "truth")
        finally:
            client.context.close()
