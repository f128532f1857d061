"""Turn-by-turn buffers of the twin: tracking against pyAT, the envelope model, bad BPMs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import at
import nafflib
import numpy as np
import pytest

from accplans.config import MachineDescription, load_description
from accplans.devices import Pinger, TbtBuffers
from accplans.sim import Twin, TwinIoc, TwinProcess
from accplans.sim._tbt import TbtSettings, decoherence_envelope, track_shot


@pytest.fixture(scope="module")
def small() -> MachineDescription:
    return load_description("small")


def _shot(twin: Twin, kick: float = 30e-6, turns: int = 512):
    return track_shot(twin.tbt_request(kick, kick, turns))


def test_tracked_tunes_are_the_true_lattice_tunes(small: MachineDescription) -> None:
    """NAFF of the noiseless buffers gives pyAT's tunes of the exported true lattice."""
    twin = Twin(small, seed=2, noise=False)
    twin.compute()
    shot = _shot(twin, turns=1024)
    x, y = twin.tbt_readings(shot)
    truth = twin.truth()
    tunes = at.get_tune(truth.ring, dct=truth.dct_m)[:2]
    # amplitude detuning at 30 urad: dQ/dJ ~ 50 /m, J ~ 5e-9 m: ~3e-7
    for data, q in ((x, tunes[0]), (y, tunes[1])):
        for row in data[::5]:
            f = abs(nafflib.tune(row - row.mean()))
            assert min(abs(f - q), abs(1 - f - q)) < 2e-6


def test_buffers_follow_the_reading_model(small: MachineDescription) -> None:
    """Turn 0..n of each BPM: gain, roll and offset of the closed-orbit model, per turn."""
    twin = Twin(small, seed=3, noise=False)
    twin.compute()
    shot = _shot(twin)
    x, y = twin.tbt_readings(shot)
    e = twin.errors
    for i in (0, 7):
        beam = shot.beam_m[:, i, :].T
        d = beam - e.bpm_offset_m[i]
        c, s = np.cos(e.bpm_roll_rad[i]), np.sin(e.bpm_roll_rad[i])
        np.testing.assert_allclose(x[i], e.bpm_gain[i, 0] * (c * d[:, 0] + s * d[:, 1]))
        np.testing.assert_allclose(y[i], e.bpm_gain[i, 1] * (-s * d[:, 0] + c * d[:, 1]))
    # the closed-orbit frame and the mean of the buffers agree (no envelope at the orbit)
    frame = twin.compute()
    np.testing.assert_allclose(shot.orbit_m[0] * 1e3, frame.beam_m[:, 0] * 1e3, atol=1e-7)


def test_tbt_noise_is_its_own(small: MachineDescription) -> None:
    twin = Twin(small, seed=3, noise=True)
    twin.compute()
    shot = _shot(twin)
    x1, _ = twin.tbt_readings(shot)
    x2, _ = twin.tbt_readings(shot)
    diff = (x1 - x2).ravel() / np.sqrt(2)
    assert np.std(diff) == pytest.approx(twin.tbt_settings.noise_m, rel=0.05)


def test_chromatic_envelope_and_recoherence() -> None:
    qs, xi, sd = 0.01, 4.0, 1e-3
    env = decoherence_envelope(
        201,
        chromaticity=np.array([xi, 0.0]),
        sigma_delta=sd,
        synchrotron_tune=qs,
        detuning=np.zeros((2, 2)),
        emittances=np.array([1e-9, 1e-11]),
        actions=np.array([1e-8, 1e-10]),
    )
    assert env[0, 0] == 1.0
    assert env[0, 50] == pytest.approx(
        np.exp(-2 * (xi * sd / qs) ** 2)
    )  # half a synchrotron period
    assert env[0, 100] == pytest.approx(1.0)  # recoherence
    np.testing.assert_allclose(env[1], 1.0)


def test_amplitude_envelope_against_a_gaussian_beam() -> None:
    """The Meller et al. factor equals the centroid of a kicked Gaussian beam with dQ/dJ."""
    rng = np.random.default_rng(0)
    eps, a, jkick = 1e-9, 2e5, 4e-9  # dQ/dJ (1/m) and the kick's action (m)
    n_part = 400_000
    u = rng.normal(0, np.sqrt(eps), n_part) + np.sqrt(2 * jkick)
    v = rng.normal(0, np.sqrt(eps), n_part)
    j = (u**2 + v**2) / 2
    turns = np.array([0, 100, 300, 600, 1000])
    z = u - 1j * v
    centroid = np.array([abs(np.mean(z * np.exp(2j * np.pi * a * j * n))) for n in turns])
    env = decoherence_envelope(
        1001,
        chromaticity=np.zeros(2),
        sigma_delta=1e-3,
        synchrotron_tune=0.01,
        detuning=np.array([[a, 0.0], [0.0, 0.0]]),
        emittances=np.array([eps, eps]),
        actions=np.array([jkick, 0.0]),
    )
    expected = env[0, turns] * np.sqrt(2 * jkick)
    assert centroid[-1] < 0.5 * centroid[0]  # the test covers real decoherence
    np.testing.assert_allclose(centroid, expected, rtol=0.02, atol=2e-7)


def test_design_chromaticity_leaves_about_100_turns() -> None:
    """EBS-like numbers (the module docstring): the signal is mostly gone by turn 100."""
    env = decoherence_envelope(
        300,
        chromaticity=np.array([5.73, 3.92]),
        sigma_delta=9.34e-4,
        synchrotron_tune=3.49e-3,
        detuning=np.zeros((2, 2)),
        emittances=np.array([1.3e-10, 1.3e-12]),
        actions=np.zeros(2),
    )
    assert env[0, 50] > 0.2
    assert env[0, 100] < 0.05


@pytest.mark.parametrize(
    ("kind", "value"), [("dead", 0.0), ("noisy", 50e-6), ("gain", 1.4), ("swapped", 0.0)]
)
def test_bad_bpms_in_buffers_and_orbit(small: MachineDescription, kind: str, value: float) -> None:
    twin = Twin(small, seed=4, noise=False, tbt=dataclasses.replace(TbtSettings(), noise_m=0.0))
    frame_good = twin.compute()
    shot = _shot(twin)
    xg, yg = twin.tbt_readings(shot)
    name = twin.bpm_names[5]
    twin.set_bad_bpm(name, kind, value)
    xb, yb = twin.tbt_readings(shot)
    frame = twin.compute()
    others = np.arange(len(twin.bpm_names)) != 5
    np.testing.assert_array_equal(xb[others], xg[others])
    if kind == "dead":
        assert np.all(xb[5] == 0) and np.all(yb[5] == 0)
        assert frame.valid[5] == 0 and frame.valid[others].all()
    elif kind == "noisy":
        assert np.std(xb[5] - xg[5]) == pytest.approx(value, rel=0.15)
    elif kind == "gain":
        np.testing.assert_allclose(xb[5], value * xg[5])
        assert frame.x_mm[5] == pytest.approx(value * frame_good.x_mm[5])
    else:
        np.testing.assert_array_equal(xb[5], yg[5])
        np.testing.assert_array_equal(yb[5], xg[5])
        assert frame.x_mm[5] == pytest.approx(frame_good.y_mm[5])
    assert twin.truth().meta["bad_bpms"] == {name: [kind, value]}
    twin.set_bad_bpm(name, "good")
    assert not twin.bad_bpms
    with pytest.raises(ValueError, match="kind"):
        twin.set_bad_bpm(name, "melted")
    twin.set_bad_bpm(name, "dead")
    twin.reset(4)
    assert not twin.bad_bpms


@pytest.mark.twin(seed=1, noise=False)
async def test_pinger_over_epics(fresh_small_twin: TwinProcess, small: MachineDescription) -> None:
    """Fire over PVA; the IOC answers while the worker tracks; buffers match pyAT's tunes."""
    twin = fresh_small_twin
    family = small.families_of_kind("bpm")[0]
    buffers = TbtBuffers.for_family(family, small)
    pinger = Pinger.for_machine(small)
    await asyncio.gather(buffers.connect(), pinger.connect())
    await buffers.turns.set(256)
    await pinger.kick_x.set(30.0)
    await pinger.kick_y.set(20.0)
    counter = await buffers.counter.get_value()
    await pinger.fire.set(1)
    good = await buffers.wait_for_buffers(counter)
    twin.control.set_bad_bpm(buffers.bpm_names[3], "gain", 1.5)
    await pinger.fire.set(1)
    data = await buffers.wait_for_buffers(good.counter)
    assert data.x.shape == (len(buffers.bpm_names), 256)
    assert data.time > good.time
    truth = twin.control.export_truth()
    assert truth.meta["bad_bpms"] == {buffers.bpm_names[3]: ["gain", 1.5]}
    shot = truth.meta["tbt_last_shot"]
    assert shot["kick_rad"] == pytest.approx([30e-6, 20e-6])
    tunes = at.get_tune(truth.ring, dct=truth.dct_m)[:2]
    for plane, q in zip((data.x, data.y), tunes, strict=True):
        f = abs(nafflib.tune(plane[0] - plane[0].mean()))
        assert min(abs(f - q), abs(1 - f - q)) < 1e-5  # noiseless, 256 turns
    # the same shot (noise off) but BPM 3's gain
    np.testing.assert_allclose(data.x[3], 1.5 * good.x[3], rtol=1e-9)
    np.testing.assert_allclose(data.x[4], good.x[4], rtol=1e-9)


class _Record:
    """A stand-in for a pythonSoftIOC record: its value and the put hooks the IOC gave it."""

    def __init__(
        self,
        initial_value: Any = 0,
        validate: Callable[[Any, Any], bool] | None = None,
        on_update: Callable[[Any], Awaitable[None]] | None = None,
        **_fields: Any,
    ) -> None:
        self.value = initial_value
        self.validate = validate
        self.on_update = on_update

    def get(self) -> Any:
        return self.value

    def set(self, value: Any) -> None:
        self.value = value

    async def put(self, value: Any) -> bool:
        """A client's put as softioc runs it: ``validate`` may refuse it, then ``on_update``."""
        if self.validate is not None and not self.validate(self, value):
            return False
        self.value = value
        if self.on_update is not None:
            await self.on_update(value)
        return True


class _Builder:
    """``softioc.builder`` for :meth:`TwinIoc._tbt_records`: every record is a ``_Record``."""

    def __getattr__(self, _kind: str) -> Callable[..., _Record]:
        return lambda _name, **fields: _Record(**fields)


async def test_a_shot_that_fails_to_start_leaves_the_pinger_ready(
    small: MachineDescription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FIRE whose tracking request fails: BUSY back to 0, the error raised, the next FIRE works.

    The pinger's own records and hooks in-process (the over-EPICS twin runs in another
    process, where the request cannot be made to fail); tracking in a thread, not a worker.
    """
    twin = Twin(small, seed=1, noise=False)
    twin.compute()
    ioc = TwinIoc(twin)
    ioc._tbt_records(_Builder(), lambda pv, _where: pv)
    fire, busy = ioc._pinger["fire"], ioc._pinger["busy"]
    ioc._pinger["kick_x"].set(30.0)  # urad
    for _, rec in ioc._tbt.values():
        rec["turns"].set(16)

    def refuse(*_args: Any) -> Any:
        raise ValueError("no shot")

    with monkeypatch.context() as m:
        m.setattr(twin, "tbt_request", refuse)
        with pytest.raises(ValueError, match="no shot"):
            await fire.put(1)
    assert busy.get() == 0

    ioc._pool = ThreadPoolExecutor(1)
    try:
        assert await fire.put(1)  # not refused
        assert busy.get() == 1
        assert ioc._shot is not None
        await ioc._shot
    finally:
        await ioc.stop()
    assert busy.get() == 0
    # noiseless: the buffers are the reading of the same shot tracked here
    x, y = twin.tbt_readings(track_shot(twin.tbt_request(30e-6, 0.0, 16)))
    assert np.ptp(x) > 1e-5  # m: the kick shows in the buffers
    for index, rec in ioc._tbt.values():
        assert rec["counter"].get() == 1
        assert rec["nturns"].get() == 16
        np.testing.assert_allclose(rec["x"].get(), (x[index] * 1e3).ravel(), rtol=1e-12)
        np.testing.assert_allclose(rec["y"].get(), (y[index] * 1e3).ravel(), rtol=1e-12)
