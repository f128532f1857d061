"""What a closed orbit bump needs from the online model: responses at a point, BPMs and energy.

The bump point may be any lattice point (a BPM, an element given by index or name): the orbit
there is the orbit at the element's entrance. Responses are the exact linear responses of the
closed orbit at the fixed RF frequency (:func:`accplans.model._orm.exact_response`), so a
horizontal kick also moves the beam energy (the path length is fixed by the RF): the change
of ``delta`` per kick is the path-length row of a horizontal bump, and the RF column
compensates it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import at
import numpy as np

from ..physics import BumpError, bump_span, nearest_correctors
from ._model import OnlineModel
from ._orm import exact_response

__all__ = ["BumpResponse", "bump_point", "bump_response", "nearest_bump_correctors"]

_PLANES = {"x": 0, "h": 0, "y": 1, "v": 1}


@dataclass(frozen=True)
class BumpResponse:
    """Model responses of a bump's correctors (one plane), at the fixed RF frequency.

    Attributes:
        point: element index of the bump point (orbit at its entrance).
        point_s: its position [m].
        plane: ``"x"`` or ``"y"``.
        correctors: corrector names (columns).
        bpms: BPM names (rows of ``bpm_matrix``).
        point_matrix: (2, ncorr) position [m/rad] and angle [rad/rad] at the point per kick.
        point_rf: (2,) position [m/Hz] and angle [rad/Hz] at the point per RF step.
        bpm_matrix: (nbpm, ncorr) orbit at the BPMs in the bump's plane per kick [m/rad].
        bpm_rf: (nbpm,) orbit at the BPMs in the bump's plane per RF step [m/Hz].
        delta_row: (ncorr,) change of the relative momentum deviation per kick [1/rad].
        delta_rf: change of the relative momentum deviation per RF step [1/Hz].
        inside: (nbpm,) ``True`` for the BPMs between the first and the last corrector.
    """

    point: int
    point_s: float
    plane: str
    correctors: tuple[str, ...]
    bpms: tuple[str, ...]
    point_matrix: np.ndarray
    point_rf: np.ndarray
    bpm_matrix: np.ndarray
    bpm_rf: np.ndarray
    delta_row: np.ndarray
    delta_rf: float
    inside: np.ndarray


def _plane(plane: str) -> int:
    try:
        return _PLANES[plane]
    except KeyError:
        raise ValueError(f"plane must be 'x' or 'y', got {plane!r}") from None


def bump_point(model: OnlineModel, at_point: str | int) -> tuple[int, float]:
    """Element index and position [m] of a bump point.

    Args:
        model: the online model.
        at_point: a device name (a BPM: its element), a lattice element name (``FamName``, the
            first element of that name), or an element index.

    Raises:
        ValueError: an unknown name or an index outside the lattice.
    """
    ring = model.lattice
    n = len(ring)
    if isinstance(at_point, (int, np.integer)) and not isinstance(at_point, bool):
        element = int(at_point)
        if not 0 <= element < n:
            raise ValueError(f"bump point: element index {element} is outside 0..{n - 1}")
    elif isinstance(at_point, str):
        if at_point in model.description.device_map:
            dev = model.description.device(at_point)
            if not dev.elements:
                raise ValueError(f"bump point: {at_point} is a {dev.kind} with no lattice element")
            element = int(dev.elements[0])
        else:
            found = [i for i, e in enumerate(ring) if e.FamName == at_point]
            if not found:
                raise ValueError(
                    f"bump point: {at_point!r} is neither a device of "
                    f"{model.description.machine.name!r} nor a lattice element name"
                )
            element = found[0]
    else:
        raise ValueError(f"bump point: give a name or an element index, not {at_point!r}")
    s = float(at.get_s_pos(ring, [element])[0])
    return element, s


def nearest_bump_correctors(
    model: OnlineModel, at_point: str | int, candidates: Sequence[str], n: int
) -> list[str]:
    """The ``n`` correctors of ``candidates`` nearest to the bump point, on both sides of it.

    Raises:
        BumpError: fewer than ``n`` candidates, or ``n < 2``.
    """
    element, s = bump_point(model, at_point)
    elements = [model.description.device(c).elements[0] for c in candidates]
    positions = at.get_s_pos(model.lattice, elements)
    chosen = nearest_correctors(
        s,
        positions,
        n,
        float(model.lattice.circumference),
        point=element,
        corrector_elements=elements,
    )
    return [candidates[int(j)] for j in chosen]


def bump_response(
    model: OnlineModel,
    at_point: str | int,
    plane: str,
    correctors: Sequence[str],
    bpms: Sequence[str] | None = None,
) -> BumpResponse:
    """The responses a bump needs, from the model at its current settings (see the class).

    Args:
        model: the online model (set to the machine's setpoints).
        at_point: the bump point (see :func:`bump_point`).
        plane: ``"x"`` or ``"y"``.
        correctors: the bump's correctors (of that plane).
        bpms: BPM names; default every BPM.

    Raises:
        BumpError: a corrector of the wrong plane.
        NoClosedOrbit: no closed orbit at the model's settings.
    """
    p = _plane(plane)
    element, s = bump_point(model, at_point)
    wrong = [c for c in correctors if model.description.device(c).plane != "hv"[p]]
    if wrong:
        raise BumpError(f"{wrong} are not {'hv'[p]} correctors: a {plane} bump needs them")
    bpm_names = list(model._select(bpms, "bpm", model._bpm_names))
    bpm_elems = [model._bpm_element[b] for b in bpm_names]
    refs = np.array([element, *bpm_elems], dtype=np.int64)
    model._ensure_orbit()
    columns = [model._columns(c) for c in correctors]
    m6, per_dct, _ = exact_response(model._solver, refs, columns)
    per_hz = per_dct * model._ddct_df()
    corr_elems = [model.description.device(c).elements[0] for c in correctors]
    inside = bump_span(element, corr_elems, bpm_elems, len(model.lattice))
    return BumpResponse(
        point=element,
        point_s=s,
        plane="xy"[p],
        correctors=tuple(correctors),
        bpms=tuple(bpm_names),
        point_matrix=np.array([m6[2 * p, 0], m6[2 * p + 1, 0]]),
        point_rf=np.array([per_hz[2 * p, 0], per_hz[2 * p + 1, 0]]),
        bpm_matrix=m6[2 * p, 1:],
        bpm_rf=per_hz[2 * p, 1:],
        delta_row=m6[4, 0],
        delta_rf=float(per_hz[4, 0]),
        inside=inside,
    )
