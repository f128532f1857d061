"""Bump numerics: the classic 3-corrector bump against its analytic formula, limits, selection."""

from __future__ import annotations

import at
import numpy as np
import pytest

from accplans.config import load_description
from accplans.model import OnlineModel, bump_response, nearest_bump_correctors
from accplans.physics import BumpError, bump_kicks, bump_span, nearest_correctors


@pytest.fixture(scope="module")
def model() -> OnlineModel:
    return OnlineModel(load_description("small"))


def test_three_corrector_bump_matches_the_analytic_formula(model: OnlineModel) -> None:
    """Vertical 3-bump at BPM005 from the model's exact responses vs the thin-kick formula
    theta2/theta1 = -sqrt(b1/b2) sin(mu31)/sin(mu32), theta3/theta1 = sqrt(b1/b3)
    sin(mu21)/sin(mu32) with beta and phase at the corrector centres (thick correctors: 1 %)."""
    names = nearest_bump_correctors(
        model, "BPM005", list(model.description.families["vcorr"].devices), 3
    )
    r = bump_response(model, "BPM005", "y", names)
    solution = bump_kicks(r.point_matrix[:1], r.bpm_matrix[~r.inside], [0.2e-3])
    elements = [model.description.device(n).elements[0] for n in names]
    _, avebeta, avemu, *_ = at.avlinopt(model.lattice, refpts=elements)
    b, mu = avebeta[:, 1], avemu[:, 1]
    ratio2 = -np.sqrt(b[0] / b[1]) * np.sin(mu[2] - mu[0]) / np.sin(mu[2] - mu[1])
    ratio3 = np.sqrt(b[0] / b[2]) * np.sin(mu[1] - mu[0]) / np.sin(mu[2] - mu[1])
    theta = solution.kicks
    print(
        f"\nkicks {theta * 1e6} urad; ratios {theta[1] / theta[0]:.4f} vs {ratio2:.4f}, "
        f"{theta[2] / theta[0]:.4f} vs {ratio3:.4f}"
    )
    assert theta[1] / theta[0] == pytest.approx(ratio2, rel=0.01)
    assert theta[2] / theta[0] == pytest.approx(ratio3, rel=0.01)
    assert solution.inside[0] == pytest.approx(0.2e-3, rel=1e-9)
    assert np.abs(solution.outside).max() < 1e-9 * 0.2e-3


def test_rf_column_compensates_the_path_length(model: OnlineModel) -> None:
    """A horizontal 3-bump with the RF as 4th unknown keeps delta and closes exactly."""
    names = nearest_bump_correctors(
        model, "BPM005", list(model.description.families["hcorr"].devices), 3
    )
    r = bump_response(model, "BPM005", "x", names)
    out = ~r.inside
    solution = bump_kicks(
        np.c_[r.point_matrix[:1], r.point_rf[:1]],
        np.c_[r.bpm_matrix, r.bpm_rf][out],
        [0.2e-3],
        extra=[np.r_[r.delta_row, r.delta_rf]],
    )
    kicks, df = solution.kicks[:3], solution.kicks[3]
    assert r.delta_row @ kicks + r.delta_rf * df == pytest.approx(0.0, abs=1e-15)
    assert abs(df) > 1.0  # the bump does change the path length
    assert np.abs(solution.outside).max() < 1e-9 * 0.2e-3
    # without the RF step, the same kicks would move delta and leak the dispersion orbit
    assert np.sqrt(np.mean((r.bpm_matrix[out] @ kicks) ** 2)) > 0.01 * 0.2e-3


def test_limits_refuse_a_bump_that_cannot_close_and_use_freedom_when_it_can() -> None:
    """Synthetic: 3 unknowns, exact closure needs 2 dof: a limit on it is refused; with 4
    unknowns the bounded solve finds another closed bump within the limit."""
    rng = np.random.default_rng(3)
    outside = rng.normal(size=(20, 2)) @ rng.normal(size=(2, 4))  # rank 2: closed bumps exist
    inside = rng.normal(size=(1, 4))
    free = bump_kicks(inside, outside, [1.0])
    assert np.abs(outside @ free.kicks).max() < 1e-9
    cap = 0.8 * np.abs(free.kicks).max()
    bounded = bump_kicks(inside, outside, [1.0], lower=-cap, upper=cap)
    assert np.all(np.abs(bounded.kicks) <= cap * (1 + 1e-9))
    assert bounded.inside[0] == pytest.approx(1.0, rel=1e-6)
    assert np.abs(bounded.outside).max() < 1e-6
    with pytest.raises(BumpError, match="beyond the limits"):
        bump_kicks(inside[:, :3], outside[:, :3], [1.0], lower=-1e-3, upper=1e-3)
    with pytest.raises(BumpError, match="independent constraints"):
        bump_kicks(np.ones((2, 2)), outside[:, :2], [1.0, 2.0])


def test_span_and_nearest_selection_wrap_around_the_ring() -> None:
    """Correctors around element 2 of a 100-element ring: the bump spans the wrap."""
    inside = bump_span(2, [95, 1, 10], [0, 5, 50, 97, 12], 100)
    assert inside.tolist() == [True, True, False, True, False]
    chosen = nearest_correctors(1.0, [0.5, 3.0, 5.0, 99.0, 50.0], 4, 100.0)
    assert sorted(chosen.tolist()) == [0, 1, 2, 3]
    assert chosen.tolist()[:2] == [3, 0]  # ring order from upstream
    with pytest.raises(BumpError):
        nearest_correctors(1.0, [0.5, 3.0], 3, 100.0)
