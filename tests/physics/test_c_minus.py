"""The C- skew knob patterns: unit moves of complex C-, on the usable skews only."""

from __future__ import annotations

import numpy as np
import pytest

from accplans.physics import c_minus_knob_patterns


def test_knob_patterns_move_c_minus_by_unit_steps_with_the_usable_skews_only() -> None:
    rng = np.random.default_rng(3)
    response = rng.normal(size=12) + 1j * rng.normal(size=12)  # per m^-2, distinct phases
    usable = np.ones(12, bool)
    usable[[2, 7]] = False  # e.g. at a limit
    knobs = c_minus_knob_patterns(response, usable=usable)
    assert knobs.patterns.shape == (12, 2)
    np.testing.assert_array_equal(knobs.patterns[~usable], 0.0)
    # each pattern moves C- by its unit direction; the two directions are orthogonal
    moves = response @ knobs.patterns
    np.testing.assert_allclose(moves, knobs.directions, atol=1e-12)
    np.testing.assert_allclose(np.abs(knobs.directions), 1.0, atol=1e-12)
    assert abs(np.real(knobs.directions[0] * np.conj(knobs.directions[1]))) < 1e-12
    # minimum norm among the usable skews: no pattern of the same move is shorter
    free = c_minus_knob_patterns(response[usable])
    np.testing.assert_allclose(
        np.linalg.norm(knobs.patterns, axis=0), np.linalg.norm(free.patterns, axis=0)
    )


def test_no_usable_skew_is_refused() -> None:
    with pytest.raises(ValueError, match="usable skews do not move C-"):
        c_minus_knob_patterns(np.array([1.0 + 1j, 2.0]), usable=np.zeros(2, bool))
