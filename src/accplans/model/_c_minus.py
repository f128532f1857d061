"""The online model's side of a closest-tune-approach scan and of the ``C-`` skew knobs.

- :func:`tune_split_direction`: the quadrupole knob steps that move the (uncoupled) tunes
  apart, ``qx`` by +1/2 and ``qy`` by -1/2 per unit, so ``qx - qy`` by 1;
- :func:`crossing_shift`: how far along that direction the uncoupled tunes cross, by Newton
  steps on the model (the tune response is not quite linear over 0.1);
- :func:`c_minus_response`: complex ``C-`` per unit strength of each skew winding
  (:func:`accplans.physics.c_minus_coefficients` on the model's optics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..physics import c_minus_coefficients, solve_knobs, uncoupled_tunes
from ._coupling import one_turn_matrix
from ._model import OnlineModel, UnstableMotion

__all__ = ["c_minus_response", "crossing_shift", "tune_split_direction", "uncoupled_distance"]


def _wrap(q: float) -> float:
    return float((q + 0.5) % 1.0 - 0.5)


def uncoupled_distance(model: OnlineModel) -> float:
    """``qx - qy`` of the uncoupled tunes (diagonal blocks), folded into [-0.5, 0.5)."""
    q = uncoupled_tunes(one_turn_matrix(model))
    return _wrap(float(q[0] - q[1]))


def _knob_deltas(model: OnlineModel, knobs: Sequence[str], steps: np.ndarray) -> dict[str, float]:
    """Device strength changes (SI) of knob steps (knob units)."""
    out: dict[str, float] = {}
    for name, step in zip(knobs, steps, strict=True):
        for device, c in model._knob(name).items():
            out[device] = out.get(device, 0.0) + float(step) * c
    return out


def _distance_after(model: OnlineModel, deltas: Mapping[str, float]) -> float:
    with model._perturbed(deltas):
        return uncoupled_distance(model)


def tune_split_direction(model: OnlineModel, knobs: Sequence[str]) -> np.ndarray:
    """Knob steps (knob units) per unit change of ``qx - qy``: ``qx`` +1/2, ``qy`` -1/2.

    The minimum-norm solution (:func:`accplans.physics.solve_knobs`) on the central-difference
    response of the uncoupled tunes (diagonal blocks of the one-turn matrix, which the
    coupling does not repel) to each knob.
    """
    response = np.empty((2, len(knobs)))
    for k, name in enumerate(knobs):
        coefficients = model._knob(name)
        h = model._knob_step(coefficients)
        values = []
        for s in (h, -h):
            with model._perturbed({n: s * c for n, c in coefficients.items()}):
                values.append(uncoupled_tunes(one_turn_matrix(model)))
        response[:, k] = ((values[0] - values[1] + 0.5) % 1.0 - 0.5) / (2 * h)
    return solve_knobs(response, np.array([-0.5, 0.5])).steps


def crossing_shift(
    model: OnlineModel,
    knobs: Sequence[str],
    direction: np.ndarray,
    change: float,
    *,
    tolerance: float = 1e-6,
    max_steps: int = 8,
) -> float:
    """The multiple ``t`` of ``direction`` that changes the model's ``qx - qy`` by ``change``.

    Newton steps from ``t = change`` with the slope of the last two steps (1 to first order).

    Raises:
        ValueError: no stable optics on the way, or no convergence within ``max_steps``: the
            tunes are too far apart to be brought together along the direction.
    """
    start = uncoupled_distance(model)

    def moved(t: float) -> float:
        try:
            return _wrap(_distance_after(model, _knob_deltas(model, knobs, t * direction)) - start)
        except (UnstableMotion, ValueError) as exc:
            raise ValueError(
                f"the model has no stable optics at a tune-distance change of {t:+.4f} "
                f"({exc}): the tunes cannot be brought together with these knobs"
            ) from None

    t_prev, g_prev = 0.0, 0.0
    t = float(change)
    for _ in range(max_steps):
        g = moved(t)
        miss = change - g
        if abs(miss) <= tolerance:
            return t
        slope = (g - g_prev) / (t - t_prev) if t != t_prev else 1.0
        if not 0.5 < slope < 2.0:
            raise ValueError(
                f"the tune distance does not follow the knobs linearly (slope {slope:.2f} at "
                f"{t:+.4f}): the tunes are too far apart to be brought together"
            )
        t_prev, g_prev = t, g
        t += miss / slope
    raise ValueError(
        f"the model's tunes do not cross within {max_steps} Newton steps (left "
        f"{abs(change - moved(t)):.1e} at {t:+.4f}): the tunes are too far apart"
    )


def c_minus_response(model: OnlineModel, skews: Sequence[str]) -> np.ndarray:
    """Complex ``C-`` per unit strength (m^-2) of each skew winding, at the model's optics.

    Each winding's lattice fields (``PolynomA[1]`` times the drive's coefficient, times the
    element length for a thick element) at the mean optics of the element's entrance and exit.
    Checked against :func:`~accplans.model.model_c_minus` (finite differences of skew
    patterns): see :mod:`accplans.physics._c_minus`.

    Raises:
        ValueError: a name is not a skew winding.
    """
    desc = model.description
    elements: list[int] = []
    weights: list[tuple[int, int, float]] = []  # (skew index, element slot, integrated factor)
    for j, name in enumerate(skews):
        if desc.device(name).kind != "skew_quadrupole":
            raise ValueError(f"c_minus_response: {name} is not a skew winding")
        for drive in model._magnet(name).drives:
            length = float(getattr(model.lattice[drive.element], "Length", 0.0))
            weights.append((j, len(elements), drive.coefficient * (length if length > 0 else 1.0)))
            elements.append(int(drive.element))
    refs = np.array(elements, dtype=np.int64)
    entrance = model.optics(refs)
    exit_ = model.optics(refs + 1)
    end = model.optics(np.array([len(model.lattice)], dtype=np.int64))
    per_element = c_minus_coefficients(
        0.5 * (entrance.beta + exit_.beta),
        0.5 * (entrance.mu + exit_.mu),
        0.5 * (entrance.s + exit_.s),
        end.mu[0] / (2 * np.pi),
        float(model.lattice.circumference),
    )
    out = np.zeros(len(skews), dtype=complex)
    for j, slot, factor in weights:
        out[j] += factor * per_element[slot]
    return out
