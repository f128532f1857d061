"""measure_tbt on the small-ring twin: tunes, phase advances and beta from phase against pyAT on
the twin's exported true lattice; the injected bad BPMs flagged; the pinger restored."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import at
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop

from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Pinger, TbtBuffers
from accplans.plans import measure_tbt
from accplans.sim import TwinProcess
from tests.plans.helpers import run_plan, written_run


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


@pytest.mark.twin(seed=1)
def test_tbt_optics_against_the_true_lattice(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    fresh_small_twin: TwinProcess,
    tbt_devices: tuple[TbtBuffers, Pinger],
    tmp_path: Path,
) -> None:
    """10 um TbT noise, seed-1 errors: tunes within 5e-5, phase advances within 5 mrad, beta
    from phase within 1 % rms of pyAT on the true lattice; four bad BPMs flagged, no other."""
    buffers, pinger = tbt_devices
    names = list(buffers.bpm_names)
    bad = {names[2]: ("dead", 0.0), names[6]: ("noisy", 100e-6), names[9]: ("gain", 1.3)}
    bad[names[13]] = ("swapped", 0.0)
    for name, (kind, value) in bad.items():
        fresh_small_twin.control.set_bad_bpm(name, kind, value)
    before = _values(pinger.kick_x, pinger.kick_y, buffers.turns)
    result = run_plan(
        run_engine,
        measure_tbt(buffers, pinger, amplitude_x=100e-6, amplitude_y=100e-6, turns=1024, shots=2),
    )
    assert result.exit_status == "success"
    assert _values(pinger.kick_x, pinger.kick_y, buffers.turns) == before
    (uid,) = result.run_start_uids
    run = written_run(client, writer, uid)
    assert run["primary"].read()["shot-x"].shape == (2, len(names), 1024)
    tbt = load_result(client, uid, "tbt")

    truth = fresh_small_twin.control.export_truth(tmp_path / "truth")
    ring = truth.ring
    refpts = truth.bpm_elements.astype(np.uint32)
    orbit0, _ = at.find_orbit4(ring, dct=truth.dct_m)
    _, ringdata, optics = at.get_optics(ring, refpts=refpts, dp=float(orbit0[4]))
    np.testing.assert_allclose(tbt["tunes"], np.asarray(ringdata.tune)[:2], atol=5e-5)

    flagged = {names[i] for i in np.flatnonzero(tbt["bad"])}
    assert flagged == set(bad)
    good = ~np.asarray(tbt["bad"], bool)
    for p, plane in enumerate(("x", "y")):
        true_mu = optics.mu[:, p][good]
        measured = tbt[f"phase_advance_{plane}"][good]
        np.testing.assert_allclose(
            np.diff(measured), np.diff(true_mu), atol=5e-3, err_msg=f"phase advance {plane}"
        )
        beta = tbt[f"beta_{plane}"][good]
        rel = beta / optics.beta[:, p][good] - 1
        assert np.all(np.isfinite(rel))
        assert np.sqrt(np.mean(rel**2)) < 0.01, f"beta from phase {plane}: {rel}"


@pytest.mark.twin(seed=1)
def test_kick_beyond_the_pinger_limit_moves_nothing(
    run_engine: RunEngine, tbt_devices: tuple[TbtBuffers, Pinger]
) -> None:
    buffers, pinger = tbt_devices
    (kick_max,) = _values(pinger.kick_max)
    before = _values(pinger.kick_x, pinger.kick_y, buffers.turns, buffers.counter)
    with pytest.raises(ValueError, match="exceeds the pinger's limit"):
        run_plan(
            run_engine,
            measure_tbt(buffers, pinger, amplitude_x=2 * kick_max * 1e-6, amplitude_y=0.0),
        )
    assert _values(pinger.kick_x, pinger.kick_y, buffers.turns, buffers.counter) == before


@pytest.mark.twin(seed=1)
def test_coupled_beta_method_records_the_coupled_fit(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    fresh_small_twin: TwinProcess,
    tbt_devices: tuple[TbtBuffers, Pinger],
    tmp_path: Path,
) -> None:
    """``beta_method="coupled"``: the result says so, carries the fit's coupling residual, and
    its beta is within 1 % rms of the true lattice's normal-mode beta."""
    buffers, pinger = tbt_devices
    result = run_plan(
        run_engine,
        measure_tbt(
            buffers,
            pinger,
            amplitude_x=100e-6,
            amplitude_y=100e-6,
            turns=1024,
            shots=2,
            beta_method="coupled",
        ),
    )
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    tbt = load_result(client, uid, "tbt")
    assert str(tbt["beta_method"]) == "coupled"
    assert np.isfinite(float(tbt["fit_coupling_residual_rms"]))
    truth = fresh_small_twin.control.export_truth(tmp_path / "truth")
    orbit0, _ = at.find_orbit4(truth.ring, dct=truth.dct_m)
    refpts = truth.bpm_elements.astype(np.uint32)
    _, _, optics = at.linopt6(truth.ring, refpts=refpts, dp=float(orbit0[4]))
    good = ~np.asarray(tbt["bad"], bool)
    for p, plane in enumerate(("x", "y")):
        rel = tbt[f"beta_{plane}"][good] / optics.beta[good, p] - 1
        assert np.sqrt(np.mean(rel**2)) < 0.01, f"coupled beta {plane}: {rel}"
