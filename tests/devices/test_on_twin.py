"""Devices against the real twin over CA and PVA (uses ``small_twin`` from tests/conftest.py).

These start the small ring's twin once per session (a child process on loopback ports of the
session's pool); the mock tests of this folder cover the same behaviour without it.
"""

import time

import at
import numpy as np
import pytest
from bluesky import plan_stubs as bps

from accplans.config import MachineDescription, build_lattice, load_description
from accplans.devices import (
    LimitError,
    MachineConnectionError,
    MachineIdentityError,
    call_async,
    connect,
    connect_sync,
)


def _ca(twin) -> str:
    return f"127.0.0.1:{twin.ports.ca}"


@pytest.fixture
async def on_twin(fresh_small_twin, small):
    return await connect(small, address=_ca(fresh_small_twin), timeout=10)


@pytest.mark.parametrize("protocol", ["ca", "pva"])
async def test_every_pv_connects_and_reads(small_twin, small, protocol):
    port = small_twin.ports.ca if protocol == "ca" else small_twin.ports.pva_broadcast
    machine = await connect(small, address=f"127.0.0.1:{port}", protocol=protocol, timeout=10)
    assert await machine.identity.get_value() == small.machine.id
    frame = await machine.bpms.wait_for_frame(timeout=5)
    assert frame.x.shape == frame.y.shape == (16,)
    assert np.all(np.isfinite(frame.x)) and np.all(np.abs(frame.x) < 0.05)  # metres
    described = await machine.hcorr.describe()
    assert described["hcorr-strength_readback"].get("units") == "rad"
    assert described["hcorr-readback"].get("units") == "A"
    assert machine.dcct is not None
    assert (await machine.dcct.read())["DCCT-current"]["value"] > 0.0


@pytest.mark.twin(noise=False)
async def test_a_family_kick_moves_the_orbit_as_pyat_predicts(on_twin, small):
    hcorr, bpms = on_twin.hcorr, on_twin.bpms
    kick = 5e-5  # rad
    before = await bpms.wait_for_frame(timeout=5)
    await hcorr.set_strengths(kick, select="HCM004")
    settled = time.time()
    after = await bpms.wait_for_frame(after=settled, timeout=5)
    assert after.time > settled and after.counter > before.counter
    np.testing.assert_allclose(
        await hcorr.strengths("HCM004"), kick, atol=hcorr.specs[3].tolerance * 1e-4
    )
    # the same kick in pyAT (design lattice, 4D): the twin adds errors, so compare shapes
    ring = build_lattice(small)
    bpm_idx = [small.device(n).elements[0] for n in bpms.names]
    element = small.device("HCM004").elements[0]
    _, orbit0 = at.find_orbit4(ring, refpts=bpm_idx)
    ring[element].KickAngle[0] += kick
    _, orbit1 = at.find_orbit4(ring, refpts=bpm_idx)
    predicted = orbit1[:, 0] - orbit0[:, 0]
    measured = after.x - before.x
    # (measured on seed 1: correlation 0.999, amplitude ratio 0.98; corrector gain and BPM
    # gain errors are a few per cent)
    assert np.corrcoef(predicted, measured)[0, 1] > 0.99
    assert np.dot(measured, predicted) / np.dot(predicted, predicted) == pytest.approx(1, abs=0.1)


@pytest.mark.twin(noise=False)
async def test_a_kick_beyond_its_limit_leaves_the_twin_untouched(on_twin):
    hcorr = on_twin.hcorr
    before = await hcorr.hardware_setpoints()
    _, high = hcorr.limits()
    with pytest.raises(LimitError, match=r"HCM002: requested .* current"):
        await hcorr.set_strengths([0.0, 1.1 * high[1]], select=["HCM001", "HCM002"])
    np.testing.assert_array_equal(await hcorr.hardware_setpoints(), before)


async def test_a_wrong_identity_is_refused(small_twin, small):
    other = small.model_copy(update={"machine": small.machine.model_copy(update={"id": "other"})})
    with pytest.raises(MachineIdentityError, match=r"serves machine id 'small-twin'.*'other'"):
        await connect(other, address=_ca(small_twin), timeout=10)


async def test_a_pv_the_twin_does_not_serve_is_named(small_twin, small):
    data = small.model_dump()
    for device in data["devices"]:
        if device["name"] == "Q003":
            device["pvs"]["readback"] = "SMALL:Q003:NOPE"
    broken = MachineDescription.model_validate(data)
    with pytest.raises(
        MachineConnectionError,
        match=r"1 PV\(s\) did not connect .*\n  "
        r"SMALL:Q003:NOPE \(device Q003\)",
    ):
        await connect(broken, address=_ca(small_twin), timeout=1)


def test_connect_sync_and_a_plan_on_the_twin(run_engine, fresh_small_twin):
    small = load_description("small")
    machine = connect_sync(small, address=_ca(fresh_small_twin), timeout=10)

    def plan():
        saved = yield from call_async(machine.vcorr.hardware_setpoints)
        yield from bps.mv(machine.vcorr, [2e-5, -2e-5], select=["VCM001", "VCM009"])
        frame = yield from call_async(machine.bpms.wait_for_frame, after=time.time())
        moved = yield from call_async(machine.vcorr.strengths, ["VCM001", "VCM009"])
        yield from call_async(machine.vcorr.set_hardware, saved)
        return frame, moved

    frame, moved = run_engine(plan()).plan_result
    np.testing.assert_allclose(moved, [2e-5, -2e-5], atol=1e-8)
    assert np.std(frame.y) > 0.0
