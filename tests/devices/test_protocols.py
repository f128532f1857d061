"""The protocols plans take: implemented by our families and by adapters over ophyd v1 devices."""

import threading
import time

import numpy as np
import pytest
from bluesky import plan_stubs as bps
from ophyd import Signal
from ophyd.sim import SynAxis
from ophyd_async.core import init_devices

from accplans.config import DeviceSpec, LinearCalibration
from accplans.devices import (
    LimitError,
    Machine,
    OphydV1MagnetFamily,
    OphydV1OrbitSource,
    OrbitSource,
    SettableFamily,
    call_async,
)

GAIN = 2e-4  # rad/A
RESPONSE = np.array(
    [[3.0, -1.0, 0.5], [1.0, 2.0, -0.5], [-2.0, 0.5, 1.0], [0.3, 0.3, 0.3]]
)  # m/rad


class FakeRing:
    """ophyd.sim correctors and ophyd Signals for 4 BPMs (mm), ticking frames like a machine:
    every tick computes the orbit from the corrector readbacks, then publishes TIME and
    COUNTER. The BPM orbit is RESPONSE @ kicks."""

    def __init__(self) -> None:
        self.correctors = [SynAxis(name=f"hcm{i}", value=0.0) for i in range(3)]
        self.x = [Signal(name=f"bpm{i}_x", value=0.0) for i in range(4)]
        self.y = [Signal(name=f"bpm{i}_y", value=0.0) for i in range(4)]
        self.counter = Signal(name="counter", value=0)
        self.timestamp = Signal(name="time", value=0.0)
        self.specs = [
            DeviceSpec(
                name=f"HCM{i + 1}",
                kind="corrector",
                section="SR",
                elements=[i],
                field="KickAngle[0]",
                plane="h",
                pvs={"setpoint": "-", "readback": "-"},
                unit="A",
                calibration=LinearCalibration(gain=GAIN),
                limits=(-5.0, 5.0),
                tolerance=1e-9,
            )
            for i in range(3)
        ]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):  # a 5 ms model tick
            snapshot = time.time()
            kicks = GAIN * np.array([c.readback.get() for c in self.correctors])
            orbit_mm = RESPONSE @ kicks * 1e3
            for signal, value in zip(self.x, orbit_mm, strict=True):
                signal.put(float(value))
            self.timestamp.put(snapshot)
            self.counter.put(self.counter.get() + 1)

    def __enter__(self) -> "FakeRing":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def ring():
    with FakeRing() as fake:
        yield fake


def _adapters(ring):
    family = OphydV1MagnetFamily(ring.specs, ring.correctors, name="hcorr")
    source = OphydV1OrbitSource(
        [f"BPM{i}" for i in range(4)],
        ring.x,
        ring.y,
        counter=ring.counter,
        timestamp=ring.timestamp,
        unit="mm",
        name="bpms",
    )
    return family, source


async def test_project_families_satisfy_the_protocols(machine):
    assert isinstance(machine.bpms, OrbitSource)
    for family in (machine.hcorr, machine.vcorr, machine.quadrupoles, machine.sextupoles):
        assert isinstance(family, SettableFamily)
    assert not isinstance(machine.bpms, SettableFamily)
    assert not isinstance(machine.hcorr, OrbitSource)


def test_ophyd_v1_adapters_satisfy_the_protocols(ring):
    family, source = _adapters(ring)
    assert isinstance(family, SettableFamily)
    assert isinstance(source, OrbitSource)


def _orbit_step_plan(correctors: SettableFamily, bpms: OrbitSource, kicks):
    """What a correction plan does: check, set, wait for a frame taken after, read, restore."""
    correctors.check_strengths(kicks)
    saved = yield from call_async(correctors.hardware_setpoints)
    yield from call_async(correctors.set_strengths, kicks)
    settled = time.time()
    frame = yield from call_async(bpms.wait_for_frame, after=settled, timeout=5)
    yield from call_async(correctors.set_hardware, saved)
    restored = yield from call_async(correctors.strengths)
    return frame, settled, restored


def test_a_plan_runs_on_ophyd_v1_devices_through_the_adapters(run_engine, ring):
    family, source = _adapters(ring)
    kicks = np.array([1e-4, -2e-4, 5e-5])
    result = run_engine(_orbit_step_plan(family, source, kicks))
    frame, settled, restored = result.plan_result
    assert frame.time > settled
    np.testing.assert_allclose(frame.x, RESPONSE @ kicks, rtol=1e-9)
    assert frame.valid.all()
    np.testing.assert_allclose(restored, 0.0)


def test_limits_in_the_adapter_refuse_before_any_write(run_engine, ring):
    family, _ = _adapters(ring)
    with pytest.raises(LimitError, match=r"HCM2: requested 0.002 rad \(10 A\)"):
        family.check_strengths([0.0, 2e-3, 0.0])

    def plan():
        try:
            yield from call_async(family.set_strengths, [0.0, 2e-3, 0.0])
        except LimitError as exc:
            return str(exc)

    message = run_engine(plan()).plan_result
    assert "nothing was written" in message
    assert [c.setpoint.get() for c in ring.correctors] == [0.0, 0.0, 0.0]


def test_a_plan_moves_a_mock_family_with_mv_and_call_async(run_engine, small):
    with init_devices(mock=True):
        machine = Machine(small)

    def plan():
        yield from bps.mv(machine.hcorr, [1e-4, -1e-4], select=["HCM002", "HCM005"])
        kicks = yield from call_async(machine.hcorr.strengths, ["HCM002", "HCM005", "HCM001"])
        frame = yield from call_async(machine.bpms.read_orbit)
        return kicks, frame

    kicks, frame = run_engine(plan()).plan_result
    np.testing.assert_allclose(kicks, [1e-4, -1e-4, 0.0])
    assert frame.x.shape == (16,)
