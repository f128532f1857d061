"""Fast orbit feedback design on the small ring's model ORM: loop analysis against simulation."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.config import load_description
from accplans.model import OnlineModel
from accplans.physics import (
    DisturbanceSpectrum,
    FofbLoop,
    FofbPlane,
    FofbUnstable,
    correction_matrix,
    design_fofb_plane,
    identify_sensitivity,
    measured_attenuation,
    realize_disturbance,
    simulate_fofb,
)

FAST = np.arange(24) % 2 == 0  # every other corrector is fast, the rest slow


@pytest.fixture(scope="module")
def blocks() -> dict[str, np.ndarray]:
    """Diagonal ORM blocks (16 BPMs x 24 correctors per plane) of the small ring [m/rad]."""
    desc = load_description("small")
    model = OnlineModel(desc)
    response = model.orm(rf=False)
    planes = np.array([desc.device(n).plane for n in response.correctors])
    n = len(response.bpms)
    return {"x": response.matrix[:n, planes == "h"], "y": response.matrix[n:, planes == "v"]}


def _alpha(r: np.ndarray) -> float:
    return 0.01 * float(np.linalg.norm(r, 2))


def _plane(blocks: dict[str, np.ndarray], p: str, handover_hz: float = 0.0, **loop) -> FofbPlane:
    r = blocks[p]
    return design_fofb_plane(
        r[:, FAST], r[:, ~FAST], FofbLoop(handover_hz=handover_hz, **loop), alpha=_alpha(r[:, FAST])
    )


def _db(x: np.ndarray) -> np.ndarray:
    return 20 * np.log10(x)


def test_inverse_is_the_tikhonov_correction_matrix(blocks):
    r = blocks["x"]
    plane = design_fofb_plane(r, None, FofbLoop(), alpha=_alpha(r))
    k = correction_matrix(r, method="tikhonov", alpha=_alpha(r))
    assert np.allclose(plane.inverse, k, rtol=0, atol=1e-10 * np.abs(k).max())
    # R K is diagonal in the modes with the loop weights g s phi as eigenvalues
    rk_u = r @ plane.inverse @ plane.u
    assert np.allclose(rk_u, plane.u * plane.loop_weights, atol=1e-12)


@pytest.mark.parametrize("p", ["x", "y"])
@pytest.mark.parametrize("handover_hz", [0.0, 5.0])
def test_time_domain_matches_the_analytic_sensitivity(blocks, p, handover_hz):
    """A multisine in each mode, run through the loop's difference equations on the full
    matrices: the measured |S_kk| equals the analytic one within 0.5 dB (in fact to ~1e-10 dB)
    from 2.4 Hz to 5 kHz, with and without hand-over to the slow correctors."""
    plane = _plane(blocks, p, handover_hz)
    ident = identify_sensitivity(plane, n_period=4096, n_frequencies=30)
    analytic = plane.sensitivity(ident["frequency"])
    error = np.abs(_db(ident["mode"]) - _db(analytic))
    print(f"\n{p} hand-over {handover_hz} Hz: max |sim - analytic| = {error.max():.2e} dB")
    assert error.max() < 0.5
    assert error.max() < 1e-6  # the same linear system: only rounding separates them
    # the table covers real attenuation: -40 dB and below at the low end, ~0 dB at Nyquist
    assert _db(analytic[:, 0]).max() < -25
    assert np.all(np.abs(_db(analytic[:, -1])) < 3)


def test_welch_attenuation_on_a_model_disturbance(blocks):
    """Ground motion ~1/f^2 plus 25/50 Hz lines, 8192 samples: the per-mode H1 estimate and the
    PSD ratio of residual to uncorrected orbit match the analytic values within 0.5 dB where
    the estimate is not limited by leakage (coherence >= 0.99, away from the lines)."""
    plane = _plane(blocks, "x")
    d, power = realize_disturbance(plane, DisturbanceSpectrum(), 8192, seed=3)
    sim = simulate_fofb(plane, d)
    spectrum = DisturbanceSpectrum()
    m = measured_attenuation(plane, d, sim["orbit"], nperseg=1024, lines_hz=spectrum.lines_hz)
    f = m["frequency"]
    good = m["valid"]
    error = np.abs(_db(m["mode"]) - _db(plane.sensitivity(f)))
    print(f"\nH1: {good.mean():.0%} of bins valid, max error there {error[good].max():.2f} dB")
    assert good.mean() > 0.8
    assert not good[:, np.abs(f - 50.0) < 10].any()  # the bins next to the 50 Hz line
    assert error[good].max() < 0.5
    orbit_error = np.abs(_db(m["orbit"]) - _db(plane.orbit_attenuation(f, power)))
    coherent = good.all(axis=0)
    assert np.median(orbit_error[coherent]) < 0.1
    assert orbit_error[coherent].max() < 0.5
    # the feedback really reduces the orbit: the residual rms is far below the disturbance
    assert np.std(sim["orbit"][2000:]) < 0.2 * np.std(d[2000:])


@pytest.mark.parametrize("handover_hz", [0.0, 5.0])
def test_dc_attenuation_is_at_least_40_db(blocks, handover_hz):
    for p in ("x", "y"):
        plane = _plane(blocks, p, handover_hz)
        _, power = realize_disturbance(plane, DisturbanceSpectrum(), 256)
        dc = -_db(plane.orbit_attenuation(np.array([0.1]), power))[0]
        worst_mode = -_db(plane.sensitivity(np.array([0.1]))).min()
        print(f"\n{p}, hand-over {handover_hz} Hz: DC {dc:.1f} dB, worst mode {worst_mode:.1f} dB")
        assert dc >= 40
        assert worst_mode >= 40


def test_gain_margin_predicts_the_stability_limit(blocks):
    """With kp = 0 the loop scales with ki: ki times the gain margin puts a pole on the unit
    circle, so 0.97 of it is stable and 1.03 of it is refused."""
    plane = _plane(blocks, "x", ki=0.1)
    margins = plane.margins()
    assert 6 < margins.gain_margin_db < 30
    assert 30 < margins.phase_margin_deg < 90
    assert margins.max_pole < 1
    limit = 0.1 * 10 ** (margins.gain_margin_db / 20)
    assert _plane(blocks, "x", ki=0.97 * limit).margins().max_pole < 1
    with pytest.raises(FofbUnstable, match="pole has modulus"):
        _plane(blocks, "x", ki=1.03 * limit)


@pytest.mark.parametrize(
    "loop",
    [{"ki": 1.2}, {"latency": 20}, {"ki": 0.1, "kp": 3.0}],
    ids=["gain", "latency", "proportional"],
)
def test_unstable_settings_are_refused(blocks, loop):
    with pytest.raises(FofbUnstable, match=r"refused.*lower ki"):
        _plane(blocks, "y", **loop)


def test_margins_below_the_minimum_are_refused(blocks):
    r = blocks["x"]
    with pytest.raises(FofbUnstable, match=r"phase margin .* < 80 deg"):
        design_fofb_plane(r, None, FofbLoop(), min_phase_margin_deg=80.0)


def test_handover_moves_the_dc_correction_to_the_slow_correctors(blocks):
    """A static orbit error in the handed-over modes: first the fast correctors correct it,
    then the hand-over integrates it onto the slow correctors and the fast correctors' output
    in those modes goes to zero, while the orbit stays corrected. Without hand-over the fast
    correctors keep it."""
    plane = _plane(blocks, "x", handover_hz=5.0)
    assert plane.handed_over.sum() >= 6
    vh = plane.v[:, plane.handed_over]
    kick = vh @ np.random.default_rng(0).normal(size=vh.shape[1]) * 1e-5
    step = np.tile(plane.response_fast @ kick, (6000, 1))
    sim = simulate_fofb(plane, step)
    peak = np.abs(vh.T @ sim["fast"].T).max()
    end = np.linalg.norm(vh.T @ sim["fast"][-1])
    print(f"\nfast output in handed-over modes: peak {peak:.2e} rad, end {end:.2e} rad")
    assert peak > 0.5 * np.linalg.norm(kick)
    assert end < 1e-3 * peak
    assert np.linalg.norm(sim["orbit"][-1]) < 1e-3 * np.linalg.norm(step[0])
    # the slow correctors hold the step; the fast ones only what the slow patterns leak into
    # the modes that are not handed over
    held = plane.response_slow @ sim["slow"][-1]
    fast_orbit = plane.response_fast @ sim["fast"][-1]
    fast_share = np.linalg.norm(fast_orbit) / np.linalg.norm(step[0])
    slow_miss = np.linalg.norm(held + step[0]) / np.linalg.norm(step[0])
    print(
        f"orbit held by the fast correctors at the end {fast_share:.3f}, slow miss {slow_miss:.3f}"
    )
    assert fast_share < 0.05
    assert slow_miss < 0.05

    alone = simulate_fofb(_plane(blocks, "x"), step)
    assert np.allclose(alone["fast"][-1], -kick, atol=1e-3 * np.abs(kick).max())


def test_modes_the_slow_correctors_cannot_hold_stay_on_the_fast_ones(blocks):
    plane = _plane(blocks, "y", handover_hz=5.0)
    assert not plane.handed_over.all()
    assert np.all(plane.handover_overlap[plane.handed_over] >= 0.9)
    assert np.all(plane.handover_overlap[~plane.handed_over] < 0.9)
    # the hand-over matrix does nothing to the fast patterns it keeps
    kept = plane.v[:, ~plane.handed_over]
    assert np.abs(plane.handover @ kept).max() < 1e-10 * np.abs(plane.handover).max()


def test_bad_inputs_are_refused_with_their_reason(blocks):
    r = blocks["x"].copy()
    r[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf at \(row, column\) \[\[3, 5\]\]"):
        design_fofb_plane(r, None, FofbLoop())
    with pytest.raises(ValueError, match="mode_gains has shape"):
        design_fofb_plane(blocks["x"], None, FofbLoop(), mode_gains=np.ones(3))
    with pytest.raises(ValueError, match="latency must be an integer"):
        FofbLoop(latency=-1)
    with pytest.raises(ValueError, match="ki must be > 0"):
        FofbLoop(ki=0.0)
    with pytest.raises(ValueError, match="handover_hz must be in"):
        FofbLoop(handover_hz=6000.0)
