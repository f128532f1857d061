"""measure_adts and correct_nonlinear on the small-ring twin, against its true lattice.

The small ring's detuning is tiny (tens of 1/m: a tune shift of 1e-4 needs mm amplitudes,
where higher orders dominate), so the measurement is checked shot by shot against the truth
(each shot's tunes against pyAT tracking of the true lattice with the same kicks, its actions
against ``beta_true theta^2 / 2``) and the fit against the same fit of the true values; the
10 % agreement with pyAT's small-amplitude detuning is an EBS figure (benchmarks/nonlinear.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import at
import nafflib
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop

from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine, Pinger, TbtBuffers
from accplans.physics import fit_adts
from accplans.plans import correct_nonlinear, measure_adts
from accplans.sim import TwinProcess
from tests.plans.helpers import run_plan, written_run

KICKS_X = list(np.sqrt(np.linspace(0.2, 1.0, 5)) * 500e-6)
KICKS_Y = list(np.sqrt(np.linspace(0.2, 1.0, 5)) * 600e-6)
SMALL = 50e-6
TURNS = 256


@pytest.fixture
def tbt_devices(
    run_engine: RunEngine, fresh_small_twin: TwinProcess, small: MachineDescription
) -> tuple[TbtBuffers, Pinger]:
    buffers = TbtBuffers.for_family(small.families_of_kind("bpm")[0], small)
    pinger = Pinger.for_machine(small)

    async def connect() -> None:
        await asyncio.gather(buffers.connect(), pinger.connect())

    call_in_bluesky_event_loop(connect())
    return buffers, pinger


def _values(*signals: Any) -> list[Any]:
    async def read() -> list[Any]:
        return [await s.get_value() for s in signals]

    return call_in_bluesky_event_loop(read())


def _true_shots(ring: at.Lattice, dct: float, kicks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-particle tunes (NAFF of pyAT tracking) and actions of the kicks, true lattice."""
    orbit0, _ = at.find_orbit4(ring, dct=dct)
    _, ringdata, lin = at.get_optics(ring, refpts=[0], dp=float(orbit0[4]))
    linear = np.asarray(ringdata.tune, dtype=float)[:2] % 1.0
    beta = np.asarray(lin.beta[0], dtype=float)[:2]
    start = np.tile(orbit0[:, None], (1, len(kicks)))
    start[1] += kicks[:, 0]
    start[3] += kicks[:, 1]
    out = at.lattice_pass(ring, start.copy(), TURNS, refpts=[0])
    tunes = np.empty((len(kicks), 2))
    for i in range(len(kicks)):
        for p in range(2):
            q = abs(float(nafflib.tune(out[2 * p, i, 0, :] - orbit0[2 * p], window_order=2)))
            q %= 1.0
            tunes[i, p] = q if abs(q - linear[p]) < abs(1 - q - linear[p]) else 1 - q
    return tunes, 0.5 * beta * kicks**2


@pytest.mark.twin(seed=1)
def test_measure_adts_against_the_true_lattice(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    fresh_small_twin: TwinProcess,
    tbt_devices: tuple[TbtBuffers, Pinger],
    tmp_path: Path,
) -> None:
    """Seed-1 errors, 10 um TbT noise: the scanned plane's tune of every shot within 2e-6 of
    the true single-particle tune (NAFF line selection; the other plane's within 3e-5),
    actions within 5 % of the truth (TbT amplitudes and the model beta at the BPMs), the
    fitted detuning that of the true shots within its errors; the pinger restored."""
    buffers, pinger = tbt_devices
    before = _values(pinger.kick_x, pinger.kick_y, buffers.turns)
    result = run_plan(
        run_engine,
        measure_adts(
            buffers, pinger, kicks_x=KICKS_X, kicks_y=KICKS_Y, kick_small=SMALL, turns=TURNS
        ),
    )
    assert result.exit_status == "success"
    assert _values(pinger.kick_x, pinger.kick_y, buffers.turns) == before
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    assert run["primary"].read()["shot-x"].shape == (10, len(buffers.bpm_names), TURNS)
    adts = load_result(client, uid, "adts")
    kicks = np.asarray(adts["kicks"])
    np.testing.assert_allclose(kicks[:5, 0], KICKS_X)
    np.testing.assert_allclose(kicks[5:, 1], KICKS_Y)

    truth = fresh_small_twin.control.export_truth(tmp_path / "truth")
    true_tunes, true_actions = _true_shots(truth.ring, truth.dct_m, kicks)
    scanned = np.array([[True, False]] * 5 + [[False, True]] * 5)
    np.testing.assert_allclose(adts["tunes"][scanned], true_tunes[scanned], atol=2e-6)
    # the barely kicked plane: ~50 um of oscillation, 10 um of noise, 16 BPMs
    np.testing.assert_allclose(adts["tunes"][~scanned], true_tunes[~scanned], atol=3e-5)
    np.testing.assert_allclose(adts["actions"][scanned], true_actions[scanned], rtol=0.05)
    expected = fit_adts(true_actions, true_tunes).detuning
    err = np.abs(adts["detuning"] - expected)
    assert np.all(err <= 4 * adts["std_detuning"] + 0.1 * np.abs(expected)), (
        adts["detuning"],
        expected,
    )
    assert adts["max_tune_shift"] < 0.01


@pytest.mark.twin(seed=1)
def test_kicks_beyond_the_pinger_limit_fire_nothing(
    run_engine: RunEngine, tbt_devices: tuple[TbtBuffers, Pinger]
) -> None:
    buffers, pinger = tbt_devices
    (kick_max,) = _values(pinger.kick_max)
    before = _values(pinger.kick_x, pinger.kick_y, buffers.turns, buffers.counter)
    too_far = list(np.linspace(0.5, 2.0, 5) * kick_max * 1e-6)
    with pytest.raises(ValueError, match="exceeds the pinger's limit"):
        run_plan(run_engine, measure_adts(buffers, pinger, kicks_x=too_far, kicks_y=KICKS_Y))
    assert _values(pinger.kick_x, pinger.kick_y, buffers.turns, buffers.counter) == before
    with pytest.raises(ValueError, match="at least 5"):
        run_plan(run_engine, measure_adts(buffers, pinger, kicks_x=KICKS_X[:4]))


@pytest.mark.twin(seed=1)
def test_correct_nonlinear_refuses_when_no_free_knob_cuts_the_detuning(
    run_engine: RunEngine,
    fresh_small_twin: TwinProcess,
    machine: Machine,
    tbt_devices: tuple[TbtBuffers, Pinger],
) -> None:
    """The small ring is periodic: every focusing (defocusing) sextupole changes the detuning
    alike to first order, so in the null space of the chromaticity response no step cuts it.
    The plan says so and moves nothing (sextupoles, quadrupoles, RF, pinger), the trims given
    or not; the trims' devices come together or not at all."""
    buffers, pinger = tbt_devices
    sextupoles, quadrupoles, rf, tune = (
        machine.sextupoles,
        machine.quadrupoles,
        machine.rf,
        machine.tune,
    )
    assert rf is not None and tune is not None
    before = _values(pinger.kick_x, pinger.kick_y, buffers.turns, buffers.counter)
    start = [
        call_in_bluesky_event_loop(f.hardware_setpoints()) for f in (sextupoles, quadrupoles, rf)
    ]
    for trims in ({}, {"tune": tune, "rf": rf, "quadrupoles": quadrupoles}):
        with pytest.raises(ValueError, match="refused before any move"):
            run_plan(
                run_engine,
                correct_nonlinear(
                    buffers, pinger, sextupoles, knobs=list(sextupoles.names)[:4], iterations=1,
                    hold_tunes=False, kicks_x=KICKS_X, kicks_y=KICKS_Y, kick_small=SMALL,
                    **trims,
                ),
            )  # fmt: skip
    assert _values(pinger.kick_x, pinger.kick_y, buffers.turns, buffers.counter) == before
    for f, values in zip((sextupoles, quadrupoles, rf), start, strict=True):
        np.testing.assert_array_equal(call_in_bluesky_event_loop(f.hardware_setpoints()), values)
    with pytest.raises(ValueError, match="terms"):
        run_plan(run_engine, correct_nonlinear(buffers, pinger, sextupoles, terms=["dqx"]))
    with pytest.raises(ValueError, match="hold"):
        run_plan(run_engine, correct_nonlinear(buffers, pinger, sextupoles, hold=["dqy"]))
    with pytest.raises(ValueError, match="together"):
        run_plan(run_engine, correct_nonlinear(buffers, pinger, sextupoles, tune=tune))
    with pytest.raises(ValueError, match="rounds"):
        run_plan(run_engine, correct_nonlinear(buffers, pinger, sextupoles, rounds=2))
