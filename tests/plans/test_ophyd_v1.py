"""measure_orm on a facility's ophyd (v1) devices, through accplans' adapters.

A fake ring of ``ophyd.sim`` correctors and ophyd ``Signal`` BPM arrays (mm), ticking frames
like a machine: each tick snapshots the time, computes the orbit from the corrector readbacks
(a known response matrix), publishes X, Y, TIME and, last, COUNTER. The devices carry the
small ring's names, so the plan uses the small ring's description (calibrations, limits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine
from ophyd import Signal
from ophyd.sim import SynAxis

from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import OphydV1MagnetFamily, OphydV1OrbitSource
from accplans.plans import measure_orm
from tests.plans.helpers import run_plan, written_run

H_NAMES = ["HCM001", "HCM002", "HCM003"]
V_NAMES = ["VCM001", "VCM002"]


class FakeRing:
    """ophyd v1 correctors and BPMs; the orbit (m) is ``response @ kicks`` (rad)."""

    def __init__(self, description: MachineDescription) -> None:
        self.description = description
        self.bpm_names = list(description.families["bpms"].devices)
        n = len(self.bpm_names)
        self.response = np.random.default_rng(11).normal(0.0, 20.0, (2 * n, 5))  # m/rad
        self.correctors = [SynAxis(name=name.lower(), value=0.0) for name in H_NAMES + V_NAMES]
        self.x = Signal(name="bpm_x", value=np.zeros(n))
        self.y = Signal(name="bpm_y", value=np.zeros(n))
        self.counter = Signal(name="counter", value=0)
        self.timestamp = Signal(name="time", value=0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def kicks(self) -> np.ndarray:
        """Kicks (rad) of the correctors' readbacks, through the description's calibrations."""
        calibrations = [self.description.device(n).calibration for n in H_NAMES + V_NAMES]
        currents = [c.readback.get() for c in self.correctors]
        return np.array(
            [c.to_strength(a) for c, a in zip(calibrations, currents, strict=True) if c]
        )

    def _run(self) -> None:
        n = len(self.bpm_names)
        while not self._stop.wait(0.005):  # a 5 ms model tick
            snapshot = time.time()
            orbit_mm = self.response @ self.kicks() * 1e3
            self.x.put(orbit_mm[:n])
            self.y.put(orbit_mm[n:])
            self.timestamp.put(snapshot)
            self.counter.put(self.counter.get() + 1)

    def __enter__(self) -> FakeRing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def ring(small: MachineDescription) -> Iterator[FakeRing]:
    with FakeRing(small) as fake:
        yield fake


def test_measure_orm_on_ophyd_v1_devices_measures_their_response(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    ring: FakeRing,
    small: MachineDescription,
) -> None:
    hcorr = OphydV1MagnetFamily(
        [small.device(n) for n in H_NAMES], ring.correctors[:3], name="hcorr", description=small
    )
    vcorr = OphydV1MagnetFamily(
        [small.device(n) for n in V_NAMES], ring.correctors[3:], name="vcorr", description=small
    )
    bpms = OphydV1OrbitSource(
        ring.bpm_names,
        ring.x,
        ring.y,
        counter=ring.counter,
        timestamp=ring.timestamp,
        unit="mm",
        name="bpms",
        description=small,
    )
    ring.correctors[1].set(0.5).wait(5)  # start away from zero: the plan restores 0.5 A
    start = [c.setpoint.get() for c in ring.correctors]
    t0 = time.perf_counter()
    result = run_plan(run_engine, measure_orm(bpms, [hcorr, vcorr], bpm_noise=1e-6))
    print(f"\nmeasure_orm on ophyd v1, 5 correctors: {time.perf_counter() - t0:.2f} s")
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    orm = load_result(client, uid, "orm").data
    assert list(orm["corrector_names"]) == H_NAMES + V_NAMES
    assert list(orm["corrector_planes"]) == ["h"] * 3 + ["v"] * 2
    np.testing.assert_allclose(orm["matrix"], ring.response, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(orm["kicks"], 40e-6, rtol=1e-12)
    assert [c.setpoint.get() for c in ring.correctors] == start
