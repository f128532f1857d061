"""The twin over EPICS (small ring): CA through aioca, PVA through p4p, physics against pyAT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import at
import numpy as np
import pytest
from aioca import caget, camonitor, caput
from at.constants import clight

from accplans.config import MachineDescription, load_description
from accplans.sim import Truth, TwinProcess


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


def readings_mm(truth: Truth, ring: at.Lattice | None = None, dct: float | None = None):
    """Noiseless BPM readings (mm, (n, 2)) of a (modified) true lattice, from pyAT."""
    ring = truth.ring if ring is None else ring
    dct = truth.dct_m if dct is None else dct
    _, orbit = at.find_orbit4(ring, dct=dct, refpts=truth.bpm_elements)
    return truth.readings(orbit[:, (0, 2)]) * 1e3


def with_kicks(truth: Truth, desc: MachineDescription, currents: dict[str, float]) -> at.Lattice:
    """The true lattice with corrector currents (A) applied through calibration x true error."""
    ring = truth.ring.deepcopy()
    for name, current in currents.items():
        dev = desc.device(name)
        assert dev.calibration is not None and dev.field is not None
        plane = 0 if dev.field == "KickAngle[0]" else 1
        kick = float(dev.calibration.to_strength(current)) * truth.corrector_scale(name)
        ring[dev.elements[0]].KickAngle[plane] = kick
    return ring


async def wait_until(pv: str, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """Monitor ``pv`` until ``predicate(value)``; return that value."""
    done = asyncio.Event()
    seen: list[Any] = []

    def callback(value: Any) -> None:
        if predicate(value):
            seen.append(value)
            done.set()

    sub = camonitor(pv, callback)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        sub.close()
    return seen[0]


async def test_machine_id_is_served_over_ca_and_pva(small_twin: TwinProcess):
    assert await caget(small_twin.pv("MACHINE:ID"), timeout=10) == "small-twin"
    assert small_twin.control.get(small_twin.pv("MACHINE:ID")) == "small-twin"


async def test_every_pv_of_the_description_is_served(
    small_twin: TwinProcess, small: MachineDescription
):
    pvs = list(small.pvs.values())
    pvs += [pv for dev in small.devices for pv in dev.pvs.values()]
    pvs += [pv for fam in small.families.values() for pv in fam.pvs.values()]
    values = await caget(pvs, timeout=10)
    assert len(values) == len(pvs) > 250
    assert await caget(small_twin.pv("RF:VOLT:RB")) == pytest.approx(0.5e6)
    assert 0.0 < await caget(small_twin.pv("TUNE:X")) < 1.0


@pytest.mark.twin(noise=False)
async def test_drift_moves_the_orbit(fresh_small_twin: TwinProcess, tmp_path):
    twin = fresh_small_twin
    seeded = twin.control.export_truth(tmp_path / "seeded")["quad_shift_m"]
    x0 = await caget(twin.pv("BPMS:X"))
    twin.control.inject_drift(20e-6)  # 20 um/s rms
    await wait_until(twin.pv("BPMS:X"), lambda v: np.max(np.abs(v - x0)) > 1e-3)
    twin.control.inject_drift(0.0)
    moved = twin.control.export_truth(tmp_path / "moved")
    assert np.max(np.abs(moved["quad_shift_m"] - seeded)) > 0.1e-6
    x = await caget(twin.pv("BPMS:X"))
    np.testing.assert_allclose(x, readings_mm(moved)[:, 0], atol=1e-6)


@pytest.mark.twin(seed=1, noise=False)
async def test_completed_put_shows_the_model_response(
    fresh_small_twin: TwinProcess, small: MachineDescription, tmp_path
):
    twin = fresh_small_twin
    truth = twin.control.export_truth(tmp_path / "before")
    x0 = await caget(twin.pv("BPMS:X"))
    y0 = await caget(twin.pv("BPMS:Y"))
    np.testing.assert_allclose(np.stack([x0, y0], 1), readings_mm(truth), atol=1e-6)
    counter0 = await caget(twin.pv("BPMS:COUNTER"))
    t_put = time.time()
    await caput(twin.pv("HCM005:SP"), 0.5, wait=True, timeout=10)
    x1 = await caget(twin.pv("BPMS:X"))
    y1 = await caget(twin.pv("BPMS:Y"))
    assert await caget(twin.pv("BPMS:COUNTER")) > counter0
    assert await caget(twin.pv("BPMS:TIME")) >= t_put
    assert await caget(twin.pv("HCM005:RB")) == 0.5
    expected = readings_mm(truth, with_kicks(truth, small, {"HCM005": 0.5}))
    np.testing.assert_allclose(x1, expected[:, 0], atol=1e-6)
    np.testing.assert_allclose(y1, expected[:, 1], atol=1e-6)
    assert np.max(np.abs(x1 - x0)) > 0.05  # mm: the put did something


@pytest.mark.twin(seed=4, noise=False)
async def test_family_waveform_put_moves_every_corrector(
    fresh_small_twin: TwinProcess, small: MachineDescription, tmp_path
):
    twin = fresh_small_twin
    truth = twin.control.export_truth(tmp_path / "before")
    names = small.families["vcorr"].devices
    currents = np.random.default_rng(3).uniform(-0.3, 0.3, len(names))
    t_put = time.time()
    await caput(twin.pv("VCORR:SP"), currents, wait=True, timeout=10)
    np.testing.assert_array_equal(await caget(twin.pv("VCORR:RB")), currents)
    assert await caget(twin.pv("BPMS:TIME")) >= t_put
    y = await caget(twin.pv("BPMS:Y"))
    expected = readings_mm(truth, with_kicks(truth, small, dict(zip(names, currents, strict=True))))
    np.testing.assert_allclose(y, expected[:, 1], atol=1e-6)
    # per-device PVs follow: the last corrector's RB and SP mirror
    last = names[-1]
    await wait_until(twin.pv(f"{last}:RB"), lambda v: v == currents[-1])
    await wait_until(twin.pv(f"{last}:SP"), lambda v: v == currents[-1])


async def test_each_frame_has_a_new_counter_and_a_later_time(fresh_small_twin: TwinProcess):
    twin = fresh_small_twin
    frames: list[tuple[int, float]] = []
    got = asyncio.Event()

    async def on_counter(value: int) -> None:
        frames.append((int(value), float(await caget(twin.pv("BPMS:TIME")))))
        if len(frames) >= 4:
            got.set()

    sub = camonitor(twin.pv("BPMS:COUNTER"), lambda v: asyncio.ensure_future(on_counter(v)))
    try:
        for k in range(3):
            await caput(twin.pv("HCM002:SP"), 0.1 * (k + 1), wait=True, timeout=10)
        await asyncio.wait_for(got.wait(), 10)
    finally:
        sub.close()
    counters = [c for c, _ in frames]
    times = [t for _, t in frames]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    assert times == sorted(times)


async def test_setpoints_ramp_and_the_put_completes_at_the_readback(
    fresh_small_twin: TwinProcess,
):
    twin = fresh_small_twin
    twin.control.set_ramp_rate(20.0)  # A/s: 1 A takes 50 ms
    rb_values: list[float] = []
    sub = camonitor(twin.pv("HCM003:RB"), lambda v: rb_values.append(float(v)))
    try:
        await wait_until(twin.pv("HCM003:RB"), lambda v: v == 0.0)
        await caput(twin.pv("HCM003:SP"), 1.0, wait=True, timeout=10)
        # completed: the readback is at the setpoint and the frame used it
        assert await caget(twin.pv("HCM003:RB")) == 1.0
        np.testing.assert_array_equal((await caget(twin.pv("HCORR:RB")))[2], 1.0)
        await wait_until(twin.pv("HCM003:RB"), lambda v: v == 1.0)
    finally:
        sub.close()
    ramp = [v for v in rb_values if 0.0 < v < 1.0]
    assert ramp, f"no intermediate readback in {rb_values}"
    assert rb_values == sorted(rb_values)


@pytest.mark.twin(seed=2, noise=False)
async def test_rf_frequency_step_moves_the_orbit_along_the_dispersion(
    fresh_small_twin: TwinProcess, tmp_path
):
    twin = fresh_small_twin
    truth = twin.control.export_truth(tmp_path / "before")
    f0 = await caget(twin.pv("RF:FREQ:RB"))
    assert f0 == pytest.approx(truth.rf_frequency_hz)
    x0 = await caget(twin.pv("BPMS:X"))
    df = 1900.0  # Hz, within the +-2000 Hz limits
    await caput(twin.pv("RF:FREQ:SP"), f0 + df, wait=True, timeout=10)
    x1 = await caget(twin.pv("BPMS:X"))
    ring = truth.ring
    dct = ring.harmonic_number * clight / (f0 + df) - ring.circumference
    np.testing.assert_allclose(x1, readings_mm(truth, dct=dct)[:, 0], atol=1e-6)
    # along the dispersion, with the sign of a shorter orbit (lower momentum)
    d_delta = at.find_orbit4(ring, dct=dct)[0][4] - at.find_orbit4(ring, dct=truth.dct_m)[0][4]
    assert d_delta < 0
    _, _, lin = at.linopt6(ring, refpts=truth.bpm_elements)
    dx_m = (x1 - x0) * 1e-3 / truth["bpm_gain"][:, 0]
    np.testing.assert_allclose(dx_m, lin["dispersion"][:, 0] * d_delta, rtol=0.05, atol=1e-6)
    assert np.max(np.abs(x1 - x0)) > 0.03  # mm


async def test_beam_kill_and_refill(fresh_small_twin: TwinProcess):
    twin = fresh_small_twin
    assert await caget(twin.pv("DCCT:CURRENT")) > 100.0
    twin.control.kill_beam()
    assert await caget(twin.pv("DCCT:CURRENT")) == 0.0
    assert await caget(twin.pv("DCCT:LIFETIME")) == 0.0
    for sig in ("X", "Y"):
        values = await caget(twin.pv(f"BPMS:{sig}"))
        assert np.all(np.isfinite(values)) and not np.any(values)
    assert not np.any(await caget(twin.pv("BPMS:VALID")))
    await wait_until(twin.pv("BPM001:VALID"), lambda v: v == 0)
    await wait_until(twin.pv("BPM001:X"), lambda v: v == 0.0)
    assert not twin.control.beam and "killed" in twin.control.loss_reason
    twin.control.refill()
    assert await caget(twin.pv("DCCT:CURRENT")) == pytest.approx(200.0, rel=1e-3)
    assert np.all(await caget(twin.pv("BPMS:VALID")) == 1)


async def test_no_closed_orbit_loses_the_beam_without_nan(
    fresh_small_twin: TwinProcess, small: MachineDescription, tmp_path
):
    twin = fresh_small_twin
    truth = twin.control.export_truth(tmp_path / "before")
    # every horizontal corrector at its limit, signed to add up at the first BPM
    x0 = readings_mm(truth)[0, 0]
    names = small.families["hcorr"].devices
    currents = []
    for name in names:
        dx = readings_mm(truth, with_kicks(truth, small, {name: 0.1}))[0, 0] - x0
        currents.append(5.0 * np.sign(dx))
    await caput(twin.pv("HCORR:SP"), np.array(currents), wait=True, timeout=30)
    assert not twin.control.beam
    assert twin.control.loss_reason
    assert await caget(twin.pv("DCCT:CURRENT")) == 0.0
    for pv in ("BPMS:X", "BPMS:Y", "BPMS:VALID", "TUNE:X"):
        value = np.atleast_1d(await caget(twin.pv(pv)))
        assert np.all(np.isfinite(value)) and not np.any(value), pv


async def test_reset_with_a_new_seed_changes_the_errors(fresh_small_twin: TwinProcess):
    twin = fresh_small_twin
    offsets_1 = await caget("TWIN:SMALL:BPMS:OFFSET_X")
    x1 = await caget(twin.pv("BPMS:X"))
    twin.control.reset(8)
    assert twin.control.seed == 8
    assert await caget("TWIN:SMALL:SEED") == 8
    offsets_8 = await caget("TWIN:SMALL:BPMS:OFFSET_X")
    assert not np.allclose(offsets_1, offsets_8)
    assert np.max(np.abs(offsets_1)) > 0.01  # mm
    assert not np.allclose(await caget(twin.pv("BPMS:X")), x1, atol=0.01)


@pytest.mark.twin(seed=5, noise=False)
async def test_truth_export_round_trips_and_matches_the_truth_pvs(
    fresh_small_twin: TwinProcess, tmp_path
):
    twin = fresh_small_twin
    truth = twin.control.export_truth(tmp_path / "truth")
    assert truth.seed == 5 and truth.meta["machine"] == "small"
    np.testing.assert_allclose(
        await caget("TWIN:SMALL:BPMS:OFFSET_X"), truth["bpm_offset_m"][:, 0] * 1e3
    )
    np.testing.assert_allclose(await caget("TWIN:SMALL:BPMS:ROLL"), truth["bpm_roll_rad"])
    np.testing.assert_allclose(
        await caget("TWIN:SMALL:HCORR:GAIN_ERR"), truth["corrector_gain_rel"][:24]
    )
    np.testing.assert_allclose(
        await caget("TWIN:SMALL:BPMS:TRUE_X"), truth.closed_orbit()[:, 0] * 1e3, atol=1e-6
    )
    x = await caget(twin.pv("BPMS:X"))
    np.testing.assert_allclose(x, readings_mm(truth)[:, 0], atol=1e-6)


async def test_limits_clamp_and_bad_family_puts_are_refused(fresh_small_twin: TwinProcess):
    twin = fresh_small_twin
    await caput(twin.pv("HCM001:SP"), 50.0, wait=True, timeout=10)
    assert await caget(twin.pv("HCM001:SP")) == 5.0
    assert await caget(twin.pv("HCM001:RB")) == 5.0
    values = np.zeros(24)
    values[1] = -80.0
    await caput(twin.pv("HCORR:SP"), values, wait=True, timeout=10)
    assert (await caget(twin.pv("HCORR:RB")))[1] == -5.0
    await wait_until(twin.pv("HCORR:SP"), lambda v: v[1] == -5.0)
    before = await caget(twin.pv("HCORR:RB"))
    # a waveform of the wrong length is refused: the SP keeps its last good value
    await caput(twin.pv("HCORR:SP"), np.ones(3), wait=True, timeout=10)
    sp = await caget(twin.pv("HCORR:SP"))
    assert len(sp) == 24 and sp[1] == -5.0
    await caput(twin.pv("VCM002:SP"), 0.0, wait=True, timeout=10)  # one more tick
    np.testing.assert_array_equal(await caget(twin.pv("HCORR:RB")), before)


@pytest.mark.twin(seed=1, noise=False)
async def test_pva_put_with_wait_completes_after_the_tick(
    fresh_small_twin: TwinProcess, small: MachineDescription, tmp_path
):
    twin = fresh_small_twin
    truth = twin.control.export_truth(tmp_path / "before")
    twin.control.put(twin.pv("VCM007:SP"), -0.4)
    y = np.asarray(twin.control.get(twin.pv("BPMS:Y")))
    expected = readings_mm(truth, with_kicks(truth, small, {"VCM007": -0.4}))
    np.testing.assert_allclose(y, expected[:, 1], atol=1e-6)
