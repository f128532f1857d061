"""fit_bba_center on synthetic scans: known centre, calibrated uncertainties, rejections."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import (
    bba_scan_orders,
    combine_bba_planes,
    fit_basis_kicks,
    fit_bba_center,
    fit_group_centres,
    fit_group_columns,
    fit_group_kicks,
    group_bba_quadrupoles,
    knob_amplitude_at,
    quadrupole_centring_goal,
)

NBPM = 30
SIGMA = 1e-6  # BPM noise (m)


def _scan(
    rng: np.random.Generator,
    *,
    center: float = 37e-6,
    slope: float = 0.5,
    npos: int = 5,
    span: float = 200e-6,
    sigma_d: float = SIGMA * np.sqrt(2),
    sigma_r: float = SIGMA / np.sqrt(2),
    curvature: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Readings r (npos,), difference orbits (npos, NBPM), shape u: d = s (r - c) u + noise."""
    u = np.sin(np.linspace(0, 9, NBPM) + 0.3)
    u /= np.linalg.norm(u)
    true_r = center + 30e-6 + np.linspace(-span, span, npos)
    x = true_r - center
    amp = slope * x * (1 + curvature * x / span)
    d = amp[:, None] * u[None, :] + rng.normal(0, sigma_d, (npos, NBPM))
    r = true_r + rng.normal(0, sigma_r, npos)
    return r, d, u


def test_recovers_the_centre_with_calibrated_uncertainty() -> None:
    """400 scans with 1 um noise: the centre is unbiased, the pulls have unit width and
    95 % of the 2-sigma intervals (+-2.5 %) contain the truth."""
    rng = np.random.default_rng(5)
    pulls, errors = [], []
    for _ in range(400):
        r, d, _ = _scan(rng)
        fit = fit_bba_center(
            r, d, sigma_position_m=SIGMA / np.sqrt(2), sigma_change_m=SIGMA * 1.414
        )
        assert fit.ok, fit.rejected
        errors.append(fit.center_m - 37e-6)
        pulls.append(errors[-1] / fit.std_center_m)
    pulls_a = np.array(pulls)
    print(f"\nerror rms {np.std(errors) * 1e6:.3f} um, pull mean {pulls_a.mean():.3f} "
          f"std {pulls_a.std():.3f}")  # fmt: skip
    assert abs(np.mean(errors)) < 3 * np.std(errors) / np.sqrt(400)
    assert 0.85 < pulls_a.std() < 1.15
    assert 0.925 <= np.mean(np.abs(pulls_a) < 2) <= 0.975
    # the expected scatter: (noise of a / slope, noise of r) over sqrt(npos)
    expected = np.hypot(SIGMA * np.sqrt(2) / 0.5, SIGMA / np.sqrt(2)) / np.sqrt(5)
    assert np.std(errors) == pytest.approx(expected, rel=0.15)


def test_unknown_noise_uses_the_residuals() -> None:
    """Without noise figures the uncertainty comes from the residuals: pulls still ~ unit
    width (Student's t with 3 dof: the std is sqrt(3), so about 1.2 to 2.2)."""
    rng = np.random.default_rng(7)
    pulls = []
    for _ in range(400):
        r, d, _ = _scan(rng, npos=5)
        fit = fit_bba_center(r, d)
        assert fit.ok, fit.rejected
        pulls.append((fit.center_m - 37e-6) / fit.std_center_m)
    # t-distribution with 3 degrees of freedom: 95 % of |t| < 3.18
    assert 0.9 <= np.mean(np.abs(pulls) < 3.18) <= 0.99
    assert np.isnan(fit.chi2_red)


def test_model_direction_gives_the_same_centre() -> None:
    rng = np.random.default_rng(3)
    r, d, u = _scan(rng)
    svd = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6)
    model = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6, direction=-u)
    assert model.center_m == pytest.approx(svd.center_m, abs=0.2e-6)
    assert np.sum(model.direction) > 0  # the sign is fixed


def test_invalid_bpms_are_left_out() -> None:
    rng = np.random.default_rng(4)
    r, d, _ = _scan(rng)
    d[2, 5] = np.nan
    fit = fit_bba_center(r, d, sigma_change_m=1.4e-6, sigma_position_m=0.7e-6)
    assert fit.ok and fit.n_bpms == NBPM - 1 and np.isnan(fit.direction[5])
    assert fit.center_m == pytest.approx(37e-6, abs=3 * fit.std_center_m)


def test_no_modulation_effect_is_rejected_for_slope() -> None:
    """A quadrupole that does not move the orbit (slope 0): rejected, the reason says so."""
    rng = np.random.default_rng(1)
    r, d, _ = _scan(rng, slope=0.0)
    fit = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6)
    assert not fit.ok
    assert fit.rejected.startswith("too little slope")


def test_no_beam_motion_is_rejected_for_slope() -> None:
    """A scan that does not move the beam at the BPM (span 0.2 um): rejected for slope."""
    rng = np.random.default_rng(2)
    r, d, _ = _scan(rng, span=0.2e-6)
    fit = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6)
    assert "too little slope" in fit.rejected


def test_nonlinear_scan_is_rejected() -> None:
    """A strongly curved response (50 % at the ends) with 7 points: poor linearity."""
    rng = np.random.default_rng(8)
    r, d, _ = _scan(rng, curvature=0.5, npos=7)
    fit = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6)
    assert fit.rejected.startswith("poor linearity"), fit.rejected
    straight = fit_bba_center(*_scan(rng, npos=7)[:2], sigma_position_m=0.7e-6,
                              sigma_change_m=1.4e-6)  # fmt: skip
    assert straight.ok, straight.rejected


def test_outlier_is_rejected_by_chi_square() -> None:
    rng = np.random.default_rng(9)
    r, d, u = _scan(rng, npos=6)
    d[3] += 40e-6 * u  # a reading lost in the middle: 40 um along the shape
    fit = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6)
    assert "poor linearity" in fit.rejected


def test_centre_far_outside_the_scan_is_rejected() -> None:
    rng = np.random.default_rng(10)
    r, d, u = _scan(rng, center=0.0)
    d += 0.5 * 1e-3 * u[None, :]  # the zero crossing 1 mm below the scanned readings
    fit = fit_bba_center(r, d, sigma_position_m=0.7e-6, sigma_change_m=1.4e-6)
    assert fit.center_m == pytest.approx(-1e-3, abs=10e-6)
    assert "outside the scanned readings" in fit.rejected


def test_too_few_positions_and_bad_input() -> None:
    fit = fit_bba_center(np.zeros(2), np.zeros((2, 4)))
    assert "need >= 3" in fit.rejected and np.isnan(fit.center_m)
    with pytest.raises(ValueError, match="3 positions but 2"):
        fit_bba_center(np.zeros(3), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="finite"):
        fit_bba_center(np.array([0.0, np.nan, 1.0]), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="sigma_change_m"):
        fit_bba_center(np.arange(3.0), np.ones((3, 4)), sigma_change_m=-1.0)


def test_both_planes_together_remove_the_coupling_bias() -> None:
    """Each plane's kick couples 5 % into the other plane's orbit and the other plane sits
    150 um from its centre on average: a fit of one plane alone is biased by ~15 um, the
    joint fit (scan not in step, coupling term, both zero crossings solved together) finds
    both centres within 3 sigma, with pulls of unit width over 200 scans."""
    rng = np.random.default_rng(11)
    u = np.sin(np.linspace(0, 9, NBPM) + 0.3)
    v = np.cos(np.linspace(0, 7, NBPM))
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    c = np.array([20e-6, -40e-6])
    t = np.linspace(-1, 1, 5) * 150e-6
    order = np.array([1, 2, 3, 4, 0])
    pulls, biased, rejected = [], [], 0
    for _ in range(200):
        true = np.c_[t + 100e-6, t[order] + 110e-6]  # readings (x, y) at the scan positions
        kx, ky = 0.5 * (true[:, 0] - c[0]), 0.4 * (true[:, 1] - c[1])
        dx = np.outer(kx, u) + 0.05 * np.outer(ky, u) + rng.normal(0, 1.4e-6, (5, NBPM))
        dy = np.outer(ky, v) + 0.05 * np.outer(kx, v) + rng.normal(0, 1.4e-6, (5, NBPM))
        r = true + rng.normal(0, 0.7e-6, true.shape)
        opts = {"sigma_position_m": 0.7e-6, "sigma_change_m": 1.4e-6}
        fx = fit_bba_center(r[:, 0], dx, other_positions_m=r[:, 1], **opts)
        fy = fit_bba_center(r[:, 1], dy, other_positions_m=r[:, 0], **opts)
        jx, jy = combine_bba_planes(fx, fy)
        if not (jx.ok and jy.ok):  # chi-square > 5 with 2 dof: 0.7 % of the fits
            rejected += 1
            continue
        pulls.append(
            [(jx.center_m - c[0]) / jx.std_center_m, (jy.center_m - c[1]) / jy.std_center_m]
        )
        biased.append(fit_bba_center(r[:, 0], dx, **opts).center_m - c[0])
    pulls_a = np.array(pulls)
    assert np.all(np.abs(pulls_a.mean(axis=0)) < 0.25)
    assert np.all((0.8 < pulls_a.std(axis=0)) & (pulls_a.std(axis=0) < 1.25))
    assert abs(np.mean(biased)) > 5e-6  # one plane alone is biased
    assert rejected <= 8


def _ring_columns(n_bpm: int, kicks_at: np.ndarray | list[float], tune: float) -> np.ndarray:
    """Closed-orbit responses (uniform beta) at ``n_bpm`` equally spaced BPMs to kicks at the
    phases ``kicks_at`` (fractions of the ring)."""
    phi = 2 * np.pi * tune * (np.arange(n_bpm) + 0.5) / n_bpm
    phq = 2 * np.pi * tune * np.asarray(kicks_at)
    return np.cos(np.abs(phi[:, None] - phq[None, :]) - np.pi * tune) / (2 * np.sin(np.pi * tune))


def test_groups_keep_scans_apart_and_kicks_separable() -> None:
    """40 quadrupoles round a ring (tune 7.2): every group has disjoint arcs, at most
    max_group members, and each member's kick variance inflation (recomputed here from the
    Gram matrix) within the limit; the groups cover every quadrupole once; the signs cancel
    the tune shifts better than all +1; a tighter inflation limit needs more groups (the
    closed-orbit responses of a ring are dominated by two harmonics near the tune: beyond
    pairs, separating kicks costs variance)."""
    nq, n_ring = 40, 4000
    at = (np.arange(nq) + 0.3) / nq
    cols = [_ring_columns(120, at, 7.2), _ring_columns(120, at + 0.01, 3.3)]
    arcs = np.c_[(at * n_ring).astype(int) - 60, np.full(nq, 120)] % [n_ring, n_ring + 1]
    shifts = np.c_[np.linspace(0.01, 0.02, nq), -np.linspace(0.02, 0.01, nq)]
    loose = group_bba_quadrupoles(cols, arcs, n_ring, max_group=6, max_inflation=10.0,
                                  tune_shifts=shifts)  # fmt: skip
    tight = group_bba_quadrupoles(cols, arcs, n_ring, max_group=6, max_inflation=3.0)
    assert sorted(i for g in loose.groups for i in g) == list(range(nq))
    assert len(tight.groups) > len(loose.groups) >= nq / 6
    for g in loose.groups:
        assert len(g) <= 6
        starts = np.asarray(arcs[list(g), 0], dtype=int)
        gaps = np.diff(np.sort(starts))
        assert np.all(gaps > 120) and (starts.min() + n_ring - starts.max()) > 120
        for m in cols:
            u = m[:, list(g)] / np.linalg.norm(m[:, list(g)], axis=0)
            assert np.all(np.diag(np.linalg.inv(u.T @ u)) <= 10.0 + 1e-9)
        unsigned = np.abs(shifts[list(g)].sum(axis=0))
        if len(g) > 1:
            assert np.max(np.abs(loose.tune_shift[loose.groups.index(g)])) < np.max(unsigned)
    with pytest.raises(ValueError):
        group_bba_quadrupoles(cols, arcs[:5], n_ring)


def test_group_kicks_are_separated_with_their_covariance() -> None:
    """Three kicks at once on a 120-BPM ring with 1 um noise: the least-squares kicks agree
    with the truth within their covariance (pulls of unit width over 300 draws)."""
    rng = np.random.default_rng(3)
    cols = np.vstack([_ring_columns(120, [0.1, 0.4, 0.75], 7.2), np.zeros((120, 3))])
    truth = np.array([20e-6, -35e-6, 5e-6])
    pulls = []
    for _ in range(300):
        d = cols @ truth + rng.normal(0, SIGMA, 240)
        d[5] = np.nan  # a lost reading is left out
        kicks, cov = fit_group_kicks(cols, d, SIGMA)
        pulls.append((kicks - truth) / np.sqrt(np.diag(cov)))
    pulls = np.array(pulls)
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.2)
    assert np.all(np.abs(pulls.std(axis=0) - 1) < 0.12)


def test_scan_orders_are_permutations_independent_within_a_plane() -> None:
    """Member 0 scans sorted in x; every order is a permutation; within a plane the centred
    orders with the constant are well conditioned (so the members' columns can be told
    apart); the same call gives the same orders; too few positions are refused."""
    orders = bba_scan_orders(8, 10)
    assert orders.shape == (8, 2, 10)
    assert np.array_equal(orders[0, 0], np.arange(10))
    assert all(sorted(o) == list(range(10)) for o in orders.reshape(-1, 10))
    for p in range(2):
        design = np.c_[np.ones(10), orders[:, p].T - 4.5]
        singular = np.linalg.svd(design / np.linalg.norm(design, axis=0), compute_uv=False)
        assert singular[-1] > 0.3
    assert np.array_equal(bba_scan_orders(8, 10), orders)
    with pytest.raises(ValueError):
        bba_scan_orders(8, 8)


def test_group_centres_from_data_columns_are_unbiased_where_model_columns_are_not() -> None:
    """Five quadrupoles modulated at once on a 120-BPM ring, their beams 60 um (rms) from
    their centres, each scanned +-100 um in its own order, 1 um noise. With the columns known
    to a 10 % model error, splitting the difference orbits by the model's columns biases the
    centres by several um (one member's kick leaks into another's estimate); the centres from
    the columns fitted to the data (fit_group_centres) are unbiased and their uncertainties
    calibrated (pulls of unit width over 200 draws)."""
    rng = np.random.default_rng(11)
    nm, npos = 5, 7
    true_cols = _ring_columns(120, [0.05, 0.27, 0.46, 0.68, 0.9], 7.2) * 0.4  # m/m
    model_cols = true_cols * (1 + 0.1 * rng.normal(size=true_cols.shape))
    orders = bba_scan_orders(nm, npos, 1)[:, 0]
    scan = np.linspace(-100e-6, 100e-6, npos)[orders].T  # (npos, nm)
    sigma_d, sigma_r = SIGMA * np.sqrt(2), SIGMA / 2
    pulls, model_errors = [], []
    for _ in range(200):
        centres = rng.normal(0, 60e-6, nm)
        d = (scan - centres) @ true_cols.T + rng.normal(0, sigma_d, (npos, 120))
        readings = scan + rng.normal(0, sigma_r, scan.shape)
        found = fit_group_centres(readings, d, sigma_d, sigma_r)
        assert np.all(found.columns.significance > 10)
        pulls.append((found.center_m - centres) / found.std_center_m)
        offsets = np.array([fit_group_kicks(model_cols, d[i], sigma_d)[0] for i in range(npos)])
        model = [fit_bba_center(readings[:, m], offsets[:, [m]], direction=np.ones(1))
                 for m in range(nm)]  # fmt: skip
        model_errors.append([f.center_m for f in model] - centres)
    pulls = np.array(pulls)
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.25)
    assert np.all(np.abs(pulls.std(axis=0) - 1) < 0.2)
    assert np.sqrt(np.mean(np.square(model_errors))) > 2e-6
    with pytest.raises(ValueError):
        fit_group_columns(scan[: nm + 1], np.zeros((nm + 1, 120)))  # no degree of freedom


def test_coupled_planes_need_the_joint_fit() -> None:
    """Three quadrupoles at once, both planes scanned, on a ring whose planes are coupled
    (each kick moves the other plane's orbit by 15 % of its own shape's size). Fitting
    each plane's rows on its own readings leaves the coupled part of the other plane's
    offsets in the intercepts: centres biased by several um, beyond 4 sigma. Fitting all
    rows on both planes' readings (``2 n + 2`` positions, joint orders) gives every centre
    within 4 sigma."""
    rng = np.random.default_rng(5)
    nm, nb = 3, 120
    npos = 2 * nm + 2
    at = [0.1, 0.43, 0.77]
    ux, uy = _ring_columns(nb, at, 7.2) * 0.4, _ring_columns(nb, at, 3.3) * 0.3
    cx, cy = _ring_columns(nb, np.add(at, 0.05), 3.3) * 0.06, _ring_columns(nb, at, 7.2) * 0.06
    kick_x = np.vstack([ux, cy])  # (2 nb, nm): x kicks seen in x rows, then in y rows
    kick_y = np.vstack([cx, uy])
    orders = bba_scan_orders(nm, npos, 2, joint=True)
    scan = np.linspace(-100e-6, 100e-6, npos)[orders]  # (nm, 2, npos)
    rx, ry = scan[:, 0].T, scan[:, 1].T  # (npos, nm)
    centre_x, centre_y = rng.normal(0, 80e-6, nm), rng.normal(0, 80e-6, nm)
    sigma = SIGMA * np.sqrt(2)
    d = (rx - centre_x) @ kick_x.T + (ry - centre_y) @ kick_y.T
    d = d + rng.normal(0, sigma, d.shape)
    alone = fit_group_centres(rx, d[:, :nb], sigma)
    joint = fit_group_centres(np.c_[rx, ry], d, sigma)
    truth = np.r_[centre_x, centre_y]
    assert np.max(np.abs(alone.center_m - centre_x) / alone.std_center_m) > 4
    assert np.max(np.abs(alone.center_m - centre_x)) > 3e-6
    assert np.all(np.abs(joint.center_m - truth) <= 4 * joint.std_center_m)


def test_knob_amplitude_at_the_centre_inverts_the_scan_line() -> None:
    """The amplitude where a reading linear in the knob meets the centre, and when unknown."""
    rng = np.random.default_rng(5)
    amplitudes = np.linspace(-100e-6, 100e-6, 5)
    readings = 12e-6 + 0.8 * amplitudes + rng.normal(0, 0.1e-6, 5)
    found = knob_amplitude_at(amplitudes, readings, 40e-6)
    assert found == pytest.approx((40e-6 - 12e-6) / 0.8, abs=0.5e-6)
    readings[[0, 3]] = np.nan  # a missing reading leaves the line of the others
    assert knob_amplitude_at(amplitudes, readings, 40e-6) == pytest.approx(found, abs=0.5e-6)
    assert np.isnan(knob_amplitude_at(amplitudes, np.full(5, 3e-6), 40e-6))  # does not move
    assert np.isnan(knob_amplitude_at(amplitudes, readings, float("nan")))
    assert np.isnan(knob_amplitude_at(amplitudes[:1], readings[:1], 40e-6))


def test_centring_goal_puts_the_beam_through_the_quadrupole_centres() -> None:
    """A linear machine: readings A k + a, beam in the quadrupoles B k + b. Each centre is
    found at its own strengths (start + a scan knob); at other strengths, reading the goal
    means the beam is through the centre, while reading the centre itself does not."""
    rng = np.random.default_rng(11)
    nrow, ncorr = 12, 20
    a_resp = rng.normal(0, 10.0, (nrow, ncorr))
    b_resp = a_resp + rng.normal(0, 1.0, (nrow, ncorr))  # the quadrupoles see nearly the same
    a0, b0 = rng.normal(0, 100e-6, nrow), rng.normal(0, 100e-6, nrow)
    centre_quad = rng.normal(0, 10e-6, nrow)  # where each quadrupole's centre is
    start = rng.normal(0, 20e-6, ncorr)
    k_centre = np.empty((nrow, ncorr))
    centres = np.empty(nrow)
    for r in range(nrow):  # row r's knob: the least change of strengths to centre quadrupole r
        knob = b_resp[r] * (centre_quad[r] - b_resp[r] @ start - b0[r]) / (b_resp[r] @ b_resp[r])
        k_centre[r] = start + knob
        assert b_resp[r] @ k_centre[r] + b0[r] == pytest.approx(centre_quad[r], abs=1e-15)
        centres[r] = a_resp[r] @ k_centre[r] + a0[r]
    # strengths putting the beam through every centre (least norm change from the start)
    k = start + np.linalg.lstsq(b_resp, centre_quad - b_resp @ start - b0, rcond=None)[0]
    np.testing.assert_allclose(b_resp @ k + b0, centre_quad, atol=1e-15)
    goal = quadrupole_centring_goal(centres, a_resp - b_resp, k, k_centre)
    np.testing.assert_allclose(a_resp @ k + a0, goal, atol=1e-12)
    # the readings differ from the centres there, by well over a micron
    assert np.sqrt(np.mean((a_resp @ k + a0 - centres) ** 2)) > 5e-6


def test_basis_kicks_give_each_members_centre_like_a_serial_scan() -> None:
    """Four members, each kicking along a fixed direction of its two shapes (a ring's
    closed-orbit responses: cosines of the phase, a kink at each kick), scans in independent
    orders: the centres from the whitened coefficients match the truth within their errors,
    and the members' kicks are told apart without any of them being modulated alone."""
    rng = np.random.default_rng(3)
    nrow, npos, sigma = 240, 5, 1e-6
    phase = np.sort(rng.uniform(0, 2 * np.pi * 12.3, nrow))
    beta = rng.uniform(2, 12, nrow)

    def response(at: float) -> np.ndarray:  # closed orbit of a unit kick at phase ``at``
        tune = 12.3
        return np.sqrt(beta) * np.cos(np.abs(phase - at) - np.pi * tune) / np.sin(np.pi * tune)

    starts = 2 * np.pi * np.array([1.1, 4.3, 7.6, 10.2])
    shapes = [(response(a), response(a + 0.4)) for a in starts]  # bracketing correctors
    basis = np.column_stack([v for pair in shapes for v in pair])
    centres = rng.uniform(-50e-6, 50e-6, 4)  # inside the scan
    amplitudes = np.linspace(-100e-6, 100e-6, npos)
    readings = np.array([amplitudes[rng.permutation(npos)] for _ in range(4)]).T  # (npos, 4)
    weights = rng.normal(0, 1, (4, 2))  # each member's direction in its shapes
    kicks = 0.03 * (readings - centres)  # rad per m of offset x offset
    changes = sum(
        np.outer(kicks[:, m], basis[:, 2 * m : 2 * m + 2] @ weights[m]) for m in range(4)
    ) + rng.normal(0, sigma, (npos, nrow))
    fit = fit_basis_kicks(changes, basis, sigma)
    assert fit.chi2_red == pytest.approx(1.0, abs=0.3)
    pulls = []
    for m in range(4):
        member = fit_bba_center(
            readings[:, m], fit.whitened([2 * m, 2 * m + 1]), sigma_change_m=1.0,
            sigma_position_m=0.0,
        )  # fmt: skip
        assert member.rejected == ""
        pulls.append((member.center_m - centres[m]) / member.std_center_m)
        assert member.std_center_m < 2e-6
    assert np.max(np.abs(pulls)) < 4.0
    # rows left out are not fitted; too few rows is an error that says so
    assert fit_basis_kicks(changes, basis, sigma, rows=np.arange(nrow) > 10).rows_used.sum() == (
        nrow - 11
    )
    with pytest.raises(ValueError, match="usable rows"):
        fit_basis_kicks(changes[:, :6], basis[:6], sigma)
