"""The machine built from a description; connect(): identity first, clear errors."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from ophyd_async.core import init_devices, set_mock_value

from accplans.config import load_description
from accplans.devices import (
    BpmFamily,
    Corrector,
    Dcct,
    Machine,
    MachineIdentityError,
    MagnetFamily,
    Quadrupole,
    Rf,
    TuneMonitor,
    _machine,
    configure_twin_client,
    connect,
    connect_sync,
)


async def test_small_ring_machine_has_its_families_in_lattice_order(machine, small):
    sizes = {name: len(family) for name, family in machine.families.items()}
    assert sizes == {
        "bpms": 16,
        "hcorr": 24,
        "vcorr": 24,
        "quadrupoles": 24,
        "sextupoles": 16,
        "skew": 8,
    }
    assert isinstance(machine.bpms, BpmFamily)
    for family in (machine.hcorr, machine.vcorr, machine.quadrupoles, machine.sextupoles):
        assert isinstance(family, MagnetFamily)
    assert machine.skew is machine.families["skew"]
    for fname, family in machine.families.items():
        assert family.names == tuple(small.families[fname].devices)
        assert [m.name for m in family.members.values()] == small.families[fname].devices
    # lattice order: element indices increase along each family
    for fname in machine.families:
        elements = [small.device(n).elements[0] for n in small.families[fname].devices]
        assert elements == sorted(elements)
    assert isinstance(machine.rf, Rf)
    assert isinstance(machine.dcct, Dcct)
    assert isinstance(machine.tune, TuneMonitor)
    assert sorted(machine.knobs) == sorted(small.knobs)
    assert isinstance(machine.device("HCM007"), Corrector)
    assert machine.device("Q003") is machine.quadrupoles[2]
    assert machine.device("RF") is machine.rf
    assert len(machine.others) == 0


async def test_unknown_device_suggests_close_names(machine):
    with pytest.raises(KeyError, match=r"machine 'small' has no device 'Q0003'.*did you mean"):
        machine.device("Q0003")


async def test_mock_machine_serves_its_identity_and_a_wrong_one_is_refused(machine):
    assert await machine.check_identity() == "small-twin"
    set_mock_value(machine.identity, "ebs-twin")
    with pytest.raises(MachineIdentityError) as err:
        await machine.check_identity()
    assert "'ebs-twin'" in str(err.value)
    assert "'small-twin'" in str(err.value)
    assert "SMALL:MACHINE:ID" in str(err.value)


async def test_readings_name_devices_and_families(machine):
    assert set(await machine.hcorr[0].read()) == {"HCM001", "HCM001-readback", "HCM001-setpoint"}
    assert set(await machine.dcct.read()) == {"DCCT-current", "DCCT-lifetime"}
    described = await machine.dcct.describe()
    assert described["DCCT-current"].get("units") == "mA"
    assert described["DCCT-lifetime"].get("units") == "h"
    assert set(await machine.tune.read()) == {"TUNE-x", "TUNE-y"}


@pytest.mark.ebs
async def test_ebs_machine_sizes():
    ebs = load_description("ebs")
    async with init_devices(mock=True):
        machine = Machine(ebs)
    assert len(machine.bpms) == 320
    assert len(machine.hcorr) == len(machine.vcorr) == 288
    assert isinstance(machine.quadrupoles[0], Quadrupole)
    assert machine.skew is not None and len(machine.skew) == 96


def test_twin_client_environment_is_set_before_a_context_exists(monkeypatch):
    monkeypatch.setattr(_machine, "_client_context_exists", lambda protocol: False)
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1:5070")
    monkeypatch.delenv("EPICS_CA_AUTO_ADDR_LIST", raising=False)
    configure_twin_client("127.0.0.1:5999")
    assert os.environ["EPICS_CA_ADDR_LIST"] == "127.0.0.1:5070 127.0.0.1:5999"
    assert os.environ["EPICS_CA_AUTO_ADDR_LIST"] == "NO"
    configure_twin_client("127.0.0.1:5999")  # listed once only
    assert os.environ["EPICS_CA_ADDR_LIST"] == "127.0.0.1:5070 127.0.0.1:5999"
    monkeypatch.setenv("EPICS_PVA_ADDR_LIST", "")
    monkeypatch.setenv("EPICS_PVA_AUTO_ADDR_LIST", "YES")
    configure_twin_client(None, "pva")
    assert os.environ["EPICS_PVA_ADDR_LIST"] == "127.0.0.1"
    assert os.environ["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"


def test_an_existing_context_must_already_list_the_twin(monkeypatch):
    monkeypatch.setattr(_machine, "_client_context_exists", lambda protocol: True)
    monkeypatch.setenv("EPICS_CA_ADDR_LIST", "127.0.0.1:5070 127.0.0.1")
    configure_twin_client("127.0.0.1:5070")  # listed: fine
    configure_twin_client("127.0.0.1:5064")  # the default port of a bare host: fine
    with pytest.raises(
        ValueError,
        match=r"cannot reach the twin at 127.0.0.1:5999 .* reads "
        r"EPICS_CA_ADDR_LIST only once",
    ):
        configure_twin_client("127.0.0.1:5999")
    assert os.environ["EPICS_CA_ADDR_LIST"] == "127.0.0.1:5070 127.0.0.1"


@pytest.mark.parametrize("address", ["127.0.0.1:port", "127.0.0.1:70000", "a b", "h:1:2"])
def test_malformed_addresses(monkeypatch, address):
    monkeypatch.setattr(_machine, "_client_context_exists", lambda protocol: False)
    with pytest.raises(ValueError, match="address must be"):
        configure_twin_client(address)


async def test_connect_arguments_are_checked_before_any_connection(small):
    with pytest.raises(ValueError, match="address= is for mode='twin'"):
        await connect(small, "epics", address="127.0.0.1:5064")
    with pytest.raises(ValueError, match="mode must be 'twin' or 'epics'"):
        await connect(small, "machine")  # type: ignore[arg-type]  # a wrong mode, on purpose


def test_connect_sync_needs_the_run_engine_loop(monkeypatch, small):
    monkeypatch.setattr(_machine, "get_bluesky_event_loop", lambda: None)
    with pytest.raises(RuntimeError, match="create the RunEngine first"):
        connect_sync(small)


def test_connect_sync_connects_in_the_run_engine_loop(run_engine, small, monkeypatch):
    """connect_sync runs connect() in the RunEngine's loop, where plans use the devices."""
    calls = []

    async def fake_connect(description, mode, **kwargs):
        import asyncio

        calls.append(asyncio.get_running_loop())
        return "machine"

    monkeypatch.setattr(_machine, "connect", fake_connect)
    assert connect_sync(small) == "machine"
    assert calls == [run_engine.loop]


def _unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connect_to_nothing_names_the_identity_pv():
    """In a fresh process (the CA client context is per process): no twin on that port."""
    port = _unused_udp_port()
    script = textwrap.dedent(
        f"""
        import asyncio
        from accplans.config import load_description
        from accplans.devices import MachineConnectionError, connect
        try:
            asyncio.run(
                connect(load_description("small"), address="127.0.0.1:{port}", timeout=0.5)
            )
        except MachineConnectionError as exc:
            print("ERROR:", exc)
        # the CA context now exists: another address can no longer be added
        from accplans.devices import configure_twin_client
        try:
            configure_twin_client("127.0.0.1:{port + 1}")
        except ValueError as exc:
            print("LATE:", exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert "ERROR: cannot reach machine 'small'" in out.stdout, out.stderr
    assert "identity PV SMALL:MACHINE:ID did not connect over CA within 0.5 s" in out.stdout
    assert f"EPICS_CA_ADDR_LIST='127.0.0.1:{port}'" in out.stdout
    assert f"LATE: cannot reach the twin at 127.0.0.1:{port + 1} over CA" in out.stdout
