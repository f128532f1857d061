"""The online model's coupling: one-turn matrix, ``|C-|`` and the response to skew windings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..physics import closest_tune_approach
from ._model import OnlineModel
from ._orm import FieldDrive, exact_response

__all__ = [
    "CouplingResponse",
    "coupling_response",
    "model_c_minus",
    "one_turn_matrix",
    "skew_element_response",
]


def one_turn_matrix(model: OnlineModel) -> np.ndarray:
    """The (4, 4) transverse one-turn matrix at the model's closed orbit (fixed RF frequency)."""
    return np.asarray(model._linearize([len(model.lattice)]).one_turn[:4, :4], dtype=float)


def model_c_minus(model: OnlineModel) -> float:
    """``|C-|`` of the model (:func:`accplans.physics.closest_tune_approach`)."""
    return float(closest_tune_approach(one_turn_matrix(model)).c_minus)


@dataclass(frozen=True)
class CouplingResponse:
    """The model's ORM and dispersion, and the response of their coupling parts to skews.

    Attributes:
        bpms: BPM names (rows ``[x; y]`` of ``orm``).
        correctors: corrector names (columns of ``orm``).
        planes: corrector planes (``"h"``/``"v"``).
        skews: skew winding names (columns of the responses).
        orm: (2 nbpm, ncorr) model ORM [m/rad].
        dx: (nbpm,) model horizontal dispersion [m].
        dy: (nbpm,) model vertical dispersion [m].
        orm_response: (nbpm * ncorr, nskew) response of the coupling blocks, ordered as
            :func:`accplans.physics.coupling_observables` (y rows of h columns, then x rows of
            v columns), per skew strength [m/rad per m^-2].
        dy_response: (nbpm, nskew) response of Dy [m per m^-2].
    """

    bpms: tuple[str, ...]
    correctors: tuple[str, ...]
    planes: tuple[str, ...]
    skews: tuple[str, ...]
    orm: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    orm_response: np.ndarray
    dy_response: np.ndarray


def _coupling_blocks(orm: np.ndarray, planes: np.ndarray) -> np.ndarray:
    nb = orm.shape[0] // 2
    return np.concatenate(
        [orm[nb:, planes == "h"].ravel(order="F"), orm[:nb, planes == "v"].ravel(order="F")]
    )


def coupling_response(
    model: OnlineModel,
    bpms: Sequence[str],
    correctors: Sequence[str],
    skews: Sequence[str],
    *,
    method: str = "linear",
    step: float = 1e-4,
) -> CouplingResponse:
    """Model ORM, dispersion and their coupling response to each skew winding.

    ``method="linear"`` (default): a skew winding of strength ``a`` (pyAT ``PolynomA[1]``) on
    an orbit ``(x, y)`` acts as the dipole fields ``PolynomA[0] = a x`` and ``PolynomB[0] =
    -a y``; the response is the orbit response to those fields at the skew (exact, from
    :func:`~accplans.model._orm.exact_response`) times the orbit (or dispersion) each
    corrector makes there, all from one linearization (~1 s on EBS). The orbit is taken at
    the mean of the element's entrance and exit: it agrees with ``"difference"`` to 1.8e-3
    (EBS, SH windings) and 3.7e-3 (small ring, SF windings) of the largest element.
    ``method="difference"``: central differences of the exact ORM and the dispersion by
    ``+-step`` (m^-2) of each skew's strength (~1 min on EBS).
    """
    if method not in ("linear", "difference"):
        raise ValueError(f"coupling_response: method must be 'linear' or 'difference': {method!r}")
    planes = np.array([model.description.device(n).plane or "" for n in correctors])
    base = model.orm(list(bpms), list(correctors), rf=False).matrix
    disp = model.dispersion(list(bpms))
    nb = len(bpms)
    if method == "linear":
        orm_resp, dy_resp = _linear_response(model, bpms, correctors, skews, planes)
        return CouplingResponse(
            bpms=tuple(bpms),
            correctors=tuple(correctors),
            planes=tuple(str(p) for p in planes),
            skews=tuple(skews),
            orm=base,
            dx=disp[:nb],
            dy=disp[nb:],
            orm_response=orm_resp,
            dy_response=dy_resp,
        )
    orm_resp = np.empty((nb * len(correctors), len(skews)))
    dy_resp = np.empty((nb, len(skews)))
    for j, name in enumerate(skews):
        if model.description.device(name).kind != "skew_quadrupole":
            raise ValueError(f"{name} is not a skew quadrupole")
        values = []
        for s in (step, -step):
            with model._perturbed({name: s}):
                orm = model.orm(list(bpms), list(correctors), rf=False).matrix
                values.append((_coupling_blocks(orm, planes), model.dispersion(list(bpms))[nb:]))
        orm_resp[:, j] = (values[0][0] - values[1][0]) / (2 * step)
        dy_resp[:, j] = (values[0][1] - values[1][1]) / (2 * step)
    return CouplingResponse(
        bpms=tuple(bpms),
        correctors=tuple(correctors),
        planes=tuple(str(p) for p in planes),
        skews=tuple(skews),
        orm=base,
        dx=disp[:nb],
        dy=disp[nb:],
        orm_response=orm_resp,
        dy_response=dy_resp,
    )


def _linear_response(
    model: OnlineModel,
    bpms: Sequence[str],
    correctors: Sequence[str],
    skews: Sequence[str],
    planes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    desc = model.description
    elements = []
    for name in skews:
        dev = desc.device(name)
        if dev.kind != "skew_quadrupole":
            raise ValueError(f"{name} is not a skew quadrupole")
        if len(dev.elements) != 1:
            raise ValueError(f"{name}: the linear coupling response needs one element per skew")
        elements.append(dev.elements[0])
    return skew_element_response(model, bpms, correctors, elements, planes=planes)


def skew_element_response(
    model: OnlineModel,
    bpms: Sequence[str],
    correctors: Sequence[str],
    elements: Sequence[int] | np.ndarray,
    *,
    planes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Response of the coupling observables to a skew gradient in any lattice elements.

    The ``method="linear"`` response of :func:`coupling_response`, per unit ``PolynomA[1]``
    (m^-2) added to each element of ``elements`` (quadrupoles, sextupoles, multipoles: any
    element with a ``PolynomA``), whether or not a device drives it: the columns of a
    coupling-source fit (quadrupole rolls, sextupole vertical offsets and the orbit in the
    sextupoles all act as skew gradients).

    Args:
        model: the online model (its closed orbit and optics are used).
        bpms: BPM names (rows).
        correctors: corrector names (columns of the ORM).
        elements: lattice indices of the skew-gradient sources.
        planes: corrector planes; read from the description by default.

    Returns:
        ``(orm_response, dy_response)``: (nbpm * ncorr, nel) [m/rad per m^-2], ordered as
        :func:`accplans.physics.coupling_observables`, and (nbpm, nel) [m per m^-2].
    """
    desc = model.description
    if planes is None:
        planes = np.array([desc.device(n).plane or "" for n in correctors])
    bpm_el = np.array([desc.device(n).elements[0] for n in bpms], dtype=np.int64)
    sk_el = np.asarray(elements, dtype=np.int64)
    model._ensure_orbit()
    columns = [model._columns(n) for n in correctors]
    columns += [[FieldDrive(int(e), "PolynomA", 0)] for e in sk_el]
    columns += [[FieldDrive(int(e), "PolynomB", 0)] for e in sk_el]
    refs = np.concatenate([bpm_el, sk_el, sk_el + 1])
    m6, per_dct, _ = exact_response(model._solver, refs, columns)
    nb, nc, ns = len(bpm_el), len(correctors), len(sk_el)
    at_bpm = m6[:, :nb, :]  # (6, nb, ncol)
    # orbit per corrector in the sources: the mean of entrance and exit
    at_skew = 0.5 * (m6[:, nb : nb + ns, :nc] + m6[:, nb + ns :, :nc])  # (6, ns, nc)
    g_a = at_bpm[:, :, nc : nc + ns]  # (6, nb, ns): per unit PolynomA[0] at each source
    g_b = at_bpm[:, :, nc + ns :]
    x_s, y_s = at_skew[0], at_skew[2]  # (ns, nc)
    # a skew gradient a on an orbit (x, y) is PolynomA[0] = a x, PolynomB[0] = -a y:
    # d orbit_b(c) / d a_s = g_a[:, b, s] x_s(c) - g_b[:, b, s] y_s(c)
    d_orbit = np.einsum("ibs,sc->ibcs", g_a, x_s) - np.einsum("ibs,sc->ibcs", g_b, y_s)
    h, v = planes == "h", planes == "v"
    orm_resp = np.concatenate(
        [
            d_orbit[2][:, h, :].transpose(1, 0, 2).reshape(-1, ns),
            d_orbit[0][:, v, :].transpose(1, 0, 2).reshape(-1, ns),
        ]
    )
    d6 = per_dct / per_dct[4]
    disp_s = 0.5 * (d6[:, nb : nb + ns] + d6[:, nb + ns :])  # (6, ns): dispersion in the sources
    dy_resp = g_a[2] * disp_s[0][None, :] - g_b[2] * disp_s[2][None, :]
    return orm_resp, dy_resp
