"""The twin's emittance monitor: pyAT's equilibrium emittances of the true lattice, over EPICS."""

from __future__ import annotations

import asyncio
import time

import at
import numpy as np
import pytest

from accplans.config import MachineDescription, load_description
from accplans.devices import EmittanceMonitor
from accplans.sim import Twin, TwinProcess
from accplans.sim._emittance import true_c_minus


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


def _skew_index(twin: Twin, k: int = 0) -> int:
    skews = [i for i, d in enumerate(twin.magnets) if d.kind == "skew_quadrupole"]
    return skews[k]


def test_emittances_are_pyat_envelope_of_the_true_lattice(small: MachineDescription) -> None:
    """The monitor's values are ohmi_envelope's of the exported true lattice (6D copy)."""
    twin = Twin(small, seed=2, noise=False)
    hw = twin.hardware
    hw[_skew_index(twin)] += 2.0  # 0.02 m^-2 on one skew winding: eps_y from coupling
    twin.set_magnets(hw)
    twin.compute()
    result = twin.emittances()
    truth = twin.truth()
    ring = truth.ring.enable_6d(copy=True)
    _, beam, env = at.ohmi_envelope(ring, refpts=[0])
    np.testing.assert_allclose(result.emittance_m, beam.mode_emittances[:2], rtol=1e-3)
    np.testing.assert_allclose(result.size_m[1], np.sqrt(env.r66[0][2, 2]), rtol=1e-3)
    # the emittance ratio grows with the skew strength (about as its square)
    hw[_skew_index(twin)] += 2.0
    twin.set_magnets(hw)
    twin.compute()
    stronger = twin.emittances()
    ratio = (stronger.emittance_m[1] / stronger.emittance_m[0]) / (
        result.emittance_m[1] / result.emittance_m[0]
    )
    assert 3.0 < ratio < 5.0


def test_c_minus_of_one_skew_quadrupole(small: MachineDescription) -> None:
    """|C-| of a perfect ring with one thin skew: |k_s L| sqrt(beta_x beta_y) / (2 pi)."""
    from accplans.sim import ErrorModel

    twin = Twin(small, errors=ErrorModel.none(), seed=0, noise=False)
    assert twin.c_minus() < 1e-6
    k = _skew_index(twin)
    element = twin.magnets[k].elements[0]
    hw = twin.hardware
    hw[k] += 0.5  # 5e-3 m^-2 over the sextupole's 0.1 m
    twin.set_magnets(hw)
    twin.compute()
    ks_l = 5e-3 * twin.ring[element].Length
    _, _, data = at.get_optics(twin.ring, refpts=[element, element + 1])
    beta = np.mean(data.beta, axis=0)
    expected = abs(ks_l) * np.sqrt(beta[0] * beta[1]) / (2 * np.pi)
    assert twin.c_minus() == pytest.approx(expected, rel=0.03)
    assert true_c_minus(twin.truth().ring, twin.dct) == pytest.approx(twin.c_minus(), rel=1e-6)


@pytest.mark.twin(seed=1, noise=True)
async def test_emittance_monitor_over_epics(
    fresh_small_twin: TwinProcess, small: MachineDescription
) -> None:
    """Values for readbacks at or after a change arrive; noise ~1 %; the ratio follows a skew."""
    twin = fresh_small_twin
    monitor = EmittanceMonitor.for_machine(small)
    await monitor.connect()
    start = time.time()
    await asyncio.to_thread(twin.control.reset, 1)  # values for the state after this reset
    first = await monitor.wait_for_reading(after=start, timeout=30)
    truth = twin.control.export_truth()
    _, beam, _ = at.ohmi_envelope(truth.ring.enable_6d(copy=True), refpts=[0])
    np.testing.assert_allclose(first.emittance, beam.mode_emittances[:2], rtol=0.05)
    # idle ticks republish with fresh noise
    readings = [first]
    for _ in range(5):
        last = readings[-1].counter
        readings.append(await monitor.wait_for_reading(after=first.time, newer_than=last))
    ex = np.array([r.emittance[0] for r in readings])
    assert 0.002 < np.std(ex) / np.mean(ex) < 0.03
    # a skew winding makes eps_y grow; the value comes for the new readbacks
    name = small.family("skew").devices[0]
    pv = small.device(name).pvs["setpoint"]
    before = readings[-1]
    start = time.time()
    await asyncio.to_thread(twin.control.put, pv, 3.0)
    after = await monitor.wait_for_reading(after=start, timeout=30)
    assert after.emittance[1] > 10 * before.emittance[1]
    await asyncio.to_thread(twin.control.put, pv, 0.0)
