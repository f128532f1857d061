"""Orbit response matrices at fixed RF frequency: exact linear response, brute-force reference.

The exact response of the closed orbit to a small change of element fields is computed from
the one-turn map linearized around the closed orbit (pyAT tracking, central differences), with
no thin-lens or uncoupled approximation:

- each changed element is tracked alone, from its closed-orbit entrance coordinates, with the
  field changed by +-step: ``r = d(exit coordinates) / d(strength)`` (exact for any pass
  method, thick or thin, kicks, skew quadrupoles, cross-talk);
- ``w = M_exit^-1 r`` is the equivalent change at the ring entrance (``M_exit`` the transfer
  matrix from the ring entrance to the element exit);
- the closed orbit moves by ``dz = -J^-1 (M_turn w)[x, px, y, py, ct]``, ``J`` the Jacobian of
  the fixed-path-length conditions (see :mod:`accplans.model._orbit`);
- the orbit at a BPM ``b`` moves by ``M_b dz`` plus ``M_b w`` when ``b`` is downstream of the
  element.

It agrees with two-sided +-1e-6 rad differences of ``at.find_orbit4(ring, dct=...)`` to ~2e-6
of the largest element, at the cost of one 11-particle pass and two one-element passes per
column (a full two-plane EBS ORM with its RF column: ~70 ms). The one-sided 1e-6 rad reference
(:func:`brute_force_orm`) carries its own second-order error: ~5e-6 of the largest element on
the small ring, but ~5e-4 on EBS in the horizontal plane and in the x rows of vertical kicks
(the strong sextupoles move x with the square of the kick), so a comparison with it on EBS
needs that tolerance, or two-sided kicks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import at
import numpy as np
from at.tracking import internal_epass

from ._orbit import _IDX, ClosedOrbitSolver, Linearization, NoClosedOrbit

__all__ = ["FieldDrive", "OrbitResponse", "brute_force_orm", "linear_orm"]


@dataclass(frozen=True)
class OrbitResponse:
    """An orbit response matrix at fixed RF frequency.

    Attributes:
        bpms: BPM names (rows ``[x of all bpms; y of all bpms]``).
        correctors: corrector names, one per column, in the requested order (horizontal and
            vertical correctors may be mixed: all four blocks are filled).
        matrix: (2 * nbpm, ncorr) response [m/rad] of the orbit to each corrector's strength.
        rf_column: (2 * nbpm,) response [m/Hz] to the RF frequency, or ``None``.
        rf_frequency: RF frequency [Hz] the response was computed at.
        method: how it was computed (``"exact"``, ``"analytic"``).
    """

    bpms: tuple[str, ...]
    correctors: tuple[str, ...]
    matrix: np.ndarray
    rf_column: np.ndarray | None
    rf_frequency: float
    method: str


@dataclass(frozen=True)
class FieldDrive:
    """One lattice field moved by a column of a response: ``attr[index] += coefficient * u``.

    Attributes:
        element: element index.
        attr: array attribute (``"KickAngle"``, ``"PolynomB"``, ``"PolynomA"``).
        index: index in the array.
        coefficient: change of the field per unit of the column's variable (1 for a plain
            corrector; a cross-talk matrix column for a multi-channel magnet).
    """

    element: int
    attr: str
    index: int
    coefficient: float = 1.0


def _field_array(ring: at.Lattice, drive: FieldDrive) -> np.ndarray:
    elem = ring[drive.element]
    arr = getattr(elem, drive.attr, None)
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float64 or arr.ndim != 1:
        raise ValueError(
            f"element {drive.element} ({elem.FamName}) has no float64 array {drive.attr}: it "
            "cannot be changed in place"
        )
    if not 0 <= drive.index < len(arr):
        raise ValueError(
            f"element {drive.element} ({elem.FamName}): {drive.attr}[{drive.index}] is out of "
            f"range (length {len(arr)})"
        )
    return arr


def _element_response(
    ring: at.Lattice, element: int, drives: Sequence[FieldDrive], entrance: np.ndarray, step: float
) -> np.ndarray:
    """d(exit coordinates)/du of one element for the combined field changes ``drives``."""
    elem = ring[element]
    arrays = [_field_array(ring, d) for d in drives]
    old = [float(a[d.index]) for a, d in zip(arrays, drives, strict=True)]
    outs = []
    try:
        for sign in (1.0, -1.0):
            for a, d, v in zip(arrays, drives, old, strict=True):
                a[d.index] = v + sign * step * d.coefficient
            r = np.asfortranarray(entrance.reshape(6, 1).copy())
            internal_epass(elem, r, energy=ring.energy, particle=ring.particle)
            outs.append(r[:, 0].copy())
    finally:
        for a, d, v in zip(arrays, drives, old, strict=True):
            a[d.index] = v
    resp = (outs[0] - outs[1]) / (2.0 * step)
    if not np.all(np.isfinite(resp)):
        raise NoClosedOrbit(f"particle lost in element {element} ({elem.FamName})")
    return resp


def exact_response(
    solver: ClosedOrbitSolver,
    bpm_refpts: np.ndarray,
    columns: Sequence[Sequence[FieldDrive]],
    *,
    step: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, Linearization]:
    """Exact linear response of the closed orbit at ``bpm_refpts`` (solver already solved).

    Args:
        solver: a solver whose last :meth:`~ClosedOrbitSolver.solve` is the current orbit.
        bpm_refpts: (nbpm,) element indices of the BPMs.
        columns: for each column, the fields it moves.
        step: central-difference step of the element passes (field units).

    Returns:
        ``(matrix, per_dct, lin)``: (6, nbpm, ncol) change of the 6D orbit at the BPMs per unit
        of each column; (6, nbpm) change per metre of path lengthening ``dct`` (at fixed
        settings); and the linearization used.
    """
    bpm_refpts = np.asarray(bpm_refpts, dtype=np.int64)
    elements = sorted({d.element for col in columns for d in col})
    refs = np.concatenate([bpm_refpts, elements, np.asarray(elements, dtype=np.int64) + 1])
    lin = solver.linearize(refs.astype(np.int64))
    nb = len(bpm_refpts)
    ne = len(elements)
    m_b = lin.matrices[:nb]
    orbit_in = lin.orbit[nb : nb + ne]
    m_out = lin.matrices[nb + ne :]
    pos = {e: k for k, e in enumerate(elements)}
    jac = lin.jacobian()
    # one term per (column, element): its equivalent change at the ring entrance
    term_col: list[int] = []
    term_elem: list[int] = []
    responses: list[np.ndarray] = []
    for c, col in enumerate(columns):
        by_elem: dict[int, list[FieldDrive]] = {}
        for d in col:
            by_elem.setdefault(d.element, []).append(d)
        for e, drives in by_elem.items():
            responses.append(_element_response(solver.ring, e, drives, orbit_in[pos[e]], step))
            term_col.append(c)
            term_elem.append(e)
    ncol = len(columns)
    matrix = np.zeros((6, nb, ncol))
    if responses:
        r = np.array(responses)  # (nt, 6)
        kpos = np.array([pos[e] for e in term_elem])
        w = np.linalg.solve(m_out[kpos], r[:, :, None])[:, :, 0]  # (nt, 6)
        incidence = np.zeros((len(responses), ncol))
        incidence[np.arange(len(responses)), term_col] = 1.0
        w_col = incidence.T @ w  # (ncol, 6)
        dz = -np.linalg.solve(jac, (lin.one_turn @ w_col.T)[_IDX])  # (5, ncol)
        dz6 = np.vstack([dz, np.zeros((1, ncol))])
        matrix += np.einsum("bij,jc->ibc", m_b, dz6)
        downstream = bpm_refpts[:, None] > np.asarray(term_elem)[None, :]  # (nb, nt)
        direct = np.einsum("bij,tj->ibt", m_b, w) * downstream[None, :, :]
        matrix += direct @ incidence
    dz_dct = np.linalg.solve(jac, np.array([0.0, 0.0, 0.0, 0.0, 1.0]))
    per_dct = np.einsum("bij,j->ib", m_b, np.append(dz_dct, 0.0))
    return matrix, per_dct, lin


def _plane_index(plane: str | int, where: str) -> int:
    if plane in ("h", "x", "H", 0):
        return 0
    if plane in ("v", "y", "V", 1):
        return 1
    raise ValueError(f"{where}: plane must be 'h' or 'v' (or 0, 1), got {plane!r}")


def _kick_columns(
    ring: at.Lattice, corrector_elements: Sequence[int], planes: Sequence[str | int]
) -> list[list[FieldDrive]]:
    if len(corrector_elements) != len(planes):
        raise ValueError(
            f"{len(corrector_elements)} corrector elements but {len(planes)} planes: give one "
            "plane per corrector"
        )
    columns = []
    for j, (e, p) in enumerate(zip(corrector_elements, planes, strict=True)):
        if not 0 <= int(e) < len(ring):
            raise ValueError(f"corrector {j}: element {e} is outside the lattice")
        drive = FieldDrive(int(e), "KickAngle", _plane_index(p, f"corrector {j}"))
        _field_array(ring, drive)
        columns.append([drive])
    return columns


def _rows(orbit6: np.ndarray) -> np.ndarray:
    """(6, nbpm, ...) -> (2 * nbpm, ...): rows [x of all bpms; y of all bpms]."""
    return np.concatenate([orbit6[0], orbit6[2]], axis=0)


def linear_orm(
    ring: at.Lattice,
    bpm_refpts: Sequence[int],
    corrector_elements: Sequence[int],
    planes: Sequence[str | int],
    *,
    dct: float = 0.0,
) -> np.ndarray:
    """Exact linear ORM [m/rad] of ``KickAngle`` correctors at fixed path lengthening ``dct``.

    Same arguments and layout as :func:`brute_force_orm`, computed by the exact linear
    response (module docstring) instead of finite differences of ``find_orbit4``.

    Returns:
        (2 * nbpm, ncorr) matrix, rows ``[x of all bpms; y of all bpms]``.
    """
    columns = _kick_columns(ring, corrector_elements, planes)
    bpms = np.asarray(bpm_refpts, dtype=np.int64)
    solver = ClosedOrbitSolver(ring, bpms)
    solver.solve(dct)
    matrix, _, _ = exact_response(solver, bpms, columns)
    return _rows(matrix)


def brute_force_orm(
    ring: at.Lattice,
    bpm_refpts: Sequence[int],
    corrector_elements: Sequence[int],
    planes: Sequence[str | int],
    *,
    dct: float = 0.0,
    kick: float = 1e-6,
) -> np.ndarray:
    """The reference ORM: one-sided kicks on ``KickAngle`` and ``at.find_orbit4(ring, dct=dct)``.

    For each corrector, ``KickAngle[plane]`` is raised by ``kick`` in place, the closed orbit is
    found with ``at.find_orbit4(ring, dct=dct)`` and the kick is restored (also on error). The
    C lattice is converted once and reused (``keep_lattice=True`` sees in-place changes, so the
    result is the same as with a fresh conversion per column).

    Args:
        ring: 4D ring.
        bpm_refpts: element indices of the BPMs.
        corrector_elements: element index of each column's corrector.
        planes: ``"h"``/``"v"`` (or 0/1) for each column: ``KickAngle[0]`` or ``[1]``.
        dct: path lengthening [m] (fixed RF frequency, see :func:`dct_for_frequency`).
        kick: kick [rad].

    Returns:
        (2 * nbpm, ncorr) matrix [m/rad], rows ``[x of all bpms; y of all bpms]``.

    Raises:
        NoClosedOrbit: ``find_orbit4`` returned NaN.
    """
    columns = _kick_columns(ring, corrector_elements, planes)
    bpms = np.asarray(bpm_refpts, dtype=np.int64).astype(np.uint32)
    nb = len(bpms)

    def orbit(keep: bool, what: str) -> np.ndarray:
        _, o = at.find_orbit4(ring, dct=dct, refpts=bpms, keep_lattice=keep)
        if not np.all(np.isfinite(o)):
            raise NoClosedOrbit(f"find_orbit4 returned NaN ({what})")
        return o

    base = orbit(False, "no kick")
    out = np.empty((2 * nb, len(columns)))
    for j, (drive,) in enumerate(columns):
        arr = _field_array(ring, drive)
        old = float(arr[drive.index])
        arr[drive.index] = old + kick
        try:
            o = orbit(True, f"kick on element {drive.element}")
        finally:
            arr[drive.index] = old
        out[:nb, j] = (o[:, 0] - base[:, 0]) / kick
        out[nb:, j] = (o[:, 2] - base[:, 2]) / kick
    return out
