"""LOCO's model side: the ORM and its analytic derivatives by gradients, and the fit loop.

The derivative of the orbit response by a gradient ``K`` of element ``e`` is exact to first
order and needs no ORM per parameter. With ``z_j`` the closed-orbit change at the entrance of
``e`` per unit of corrector ``j`` (6D, fixed RF frequency), ``T_e`` the element's 6x6 transfer
matrix around the closed orbit and ``G_e = dT_e/dK`` (central differences of one element pass,
so thick magnets, bends with gradients and fringe fields are exact), a gradient change ``dK``
perturbs the exit coordinates by ``dK G_e z_j``. The closed orbit answers to that perturbation
like to any other (:func:`accplans.model._orm.exact_response`): ``R_e``, the response of the
BPMs to a unit change of each exit coordinate, includes the fixed-path-length (RF) terms, the
coupling and the dispersion. So::

    dM[:, j] / dK = R_e @ G_e @ z_j              (2 nbpm,)  per corrector column j
    d rf / dK     = R_e @ G_e @ z_rf             z_rf: entrance orbit change per Hz

One linearization of the ring (11 particles, one turn), one 11-particle pass of each parameter
element at +-dK and small matrix products: ~1 s for EBS's 672 gradients, 320 BPMs and 64 + 64
correctors (measured 1.2 s on a quiet machine, 5-13 s with the 2 cores shared), against one
full ORM per parameter for finite differences (benchmarks/loco.py). What it
neglects: the change of the closed orbit itself with ``K`` (zero on a centred orbit; with an
orbit ``x`` in the sextupoles it changes the feed-down at second order), and a corrector
winding on the fitted element itself (its own kick does not enter ``z_j``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import at
import numpy as np
from at.constants import clight
from at.tracking import internal_epass

from ..physics import LocoFit, LocoModelData, compensate_gradients, fit_loco, orm_from_bipolar
from ._model import OnlineModel
from ._orbit import _IDX, ClosedOrbitSolver, NoClosedOrbit
from ._orm import FieldDrive, _field_array, _kick_columns, _rows, exact_response

__all__ = [
    "GradientParameter",
    "LocoModel",
    "gradient_correction",
    "gradient_parameters",
    "optics_correction",
    "orm_jacobian",
    "run_loco",
]

#: central-difference step of the element matrices [m, rad]
_X_STEP = 1e-7
#: central-difference step of the gradients [m^-2]
_K_STEP = 1e-5


@dataclass(frozen=True)
class GradientParameter:
    """One fitted gradient: the lattice fields it moves.

    Attributes:
        name: the magnet device's name, a family name, or ``FamName[index]`` for an element.
        drives: the fields (``PolynomB[1]``) moved by one unit [m^-2] of the parameter, with
            their coefficients (1 for series-powered elements of one magnet or family).
    """

    name: str
    drives: tuple[FieldDrive, ...]


def _has_gradient(elem: Any) -> bool:
    pb = getattr(elem, "PolynomB", None)
    return (
        isinstance(elem, (at.Quadrupole, at.Dipole))
        and isinstance(pb, np.ndarray)
        and pb.size > 1
        and pb[1] != 0.0
    )


def gradient_parameters(
    source: OnlineModel | at.Lattice,
    *,
    per: Literal["magnet", "family"] = "magnet",
    dipoles: bool = True,
) -> list[GradientParameter]:
    """The gradient parameters of a LOCO fit: quadrupoles and gradient dipoles.

    Args:
        source: an online model (its quadrupole devices, then the gradient dipoles of its
            lattice) or a lattice (every ``Quadrupole`` and gradient ``Dipole``).
        per: ``"magnet"``: one parameter per quadrupole device (per element for a lattice or
            a dipole); ``"family"``: one per element family name (``FamName``).
        dipoles: include the dipoles with a gradient (``PolynomB[1] != 0``).

    Returns:
        The parameters, quadrupoles first, in lattice order.
    """
    if per not in ("magnet", "family"):
        raise ValueError(f"gradient_parameters: per must be 'magnet' or 'family', got {per!r}")
    ring = source.lattice if isinstance(source, OnlineModel) else source
    groups: dict[str, list[FieldDrive]] = {}
    owned: set[int] = set()
    if isinstance(source, OnlineModel):
        for dev in source.description.devices:
            if dev.kind != "quadrupole" or dev.field != "PolynomB[1]":
                continue
            owned.update(dev.elements)
            key = dev.name if per == "magnet" else str(ring[dev.elements[0]].FamName)
            groups.setdefault(key, []).extend(FieldDrive(e, "PolynomB", 1) for e in dev.elements)
    else:
        for e, elem in enumerate(ring):
            if isinstance(elem, at.Quadrupole) and _has_gradient(elem):
                owned.add(e)
                key = f"{elem.FamName}[{e}]" if per == "magnet" else str(elem.FamName)
                groups.setdefault(key, []).append(FieldDrive(e, "PolynomB", 1))
    if dipoles:
        for e, elem in enumerate(ring):
            if e in owned or not isinstance(elem, at.Dipole) or not _has_gradient(elem):
                continue
            key = f"{elem.FamName}[{e}]" if per == "magnet" else str(elem.FamName)
            groups.setdefault(key, []).append(FieldDrive(e, "PolynomB", 1))
    return [GradientParameter(k, tuple(v)) for k, v in groups.items()]


def _orthogonal(column: Sequence[FieldDrive]) -> list[FieldDrive]:
    """The same kicks rotated by +90 degrees: h -> +v, v -> -h."""
    out = []
    for d in column:
        if d.attr != "KickAngle":
            continue
        sign = 1.0 if d.index == 0 else -1.0
        out.append(FieldDrive(d.element, "KickAngle", 1 - d.index, sign * d.coefficient))
    return out


def _element_matrix_derivative(
    ring: at.Lattice, element: int, drives: Sequence[FieldDrive], entrance: np.ndarray
) -> np.ndarray:
    """d(6x6 transfer matrix of one element)/du for the field changes ``drives``."""
    elem = ring[element]
    arrays = [_field_array(ring, d) for d in drives]
    old = [float(a[d.index]) for a, d in zip(arrays, drives, strict=True)]
    start = np.repeat(entrance[:, None], 11, axis=1)
    start[np.arange(5), np.arange(1, 6)] += _X_STEP
    start[np.arange(5), np.arange(6, 11)] -= _X_STEP
    mats = []
    try:
        for sign in (1.0, -1.0):
            for a, d, v in zip(arrays, drives, old, strict=True):
                a[d.index] = v + sign * _K_STEP * d.coefficient
            r = np.asfortranarray(start.copy())
            internal_epass(elem, r, energy=ring.energy, particle=ring.particle)
            m = np.zeros((6, 6))
            m[:, :5] = (r[:, 1:6] - r[:, 6:11]) / (2 * _X_STEP)
            mats.append(m)
    finally:
        for a, d, v in zip(arrays, drives, old, strict=True):
            a[d.index] = v
    g = (mats[0] - mats[1]) / (2 * _K_STEP)
    if not np.all(np.isfinite(g)):
        raise NoClosedOrbit(f"particle lost in element {element} ({elem.FamName})")
    return g


class LocoModel:
    """A lattice whose gradients a LOCO fit moves, and its ORM with analytic derivatives.

    It works on its own copy of the lattice (the online model is not changed by a fit).

    Args:
        ring: 4D ring (copied).
        bpm_elements: element index of each BPM (rows ``[x of all; y of all]``).
        corrector_columns: for each ORM column, the fields one unit of it moves (rad).
        parameters: the gradient parameters (:func:`gradient_parameters`).
        dct: path lengthening [m] of the closed orbit (fixed RF frequency).
        bpm_names: BPM names (default ``BPM<element>``).
        corrector_names: column names (default ``C<k>``).
    """

    def __init__(
        self,
        ring: at.Lattice,
        bpm_elements: Sequence[int],
        corrector_columns: Sequence[Sequence[FieldDrive]],
        parameters: Sequence[GradientParameter],
        *,
        dct: float = 0.0,
        bpm_names: Sequence[str] | None = None,
        corrector_names: Sequence[str] | None = None,
    ) -> None:
        self.ring = ring.deepcopy()
        self.bpm_elements = np.asarray(bpm_elements, dtype=np.int64)
        self.columns = [list(c) for c in corrector_columns]
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("LocoModel: no gradient parameters")
        self.dct = float(dct)
        self.bpm_names = tuple(bpm_names or [f"BPM{e}" for e in self.bpm_elements])
        self.corrector_names = tuple(corrector_names or [f"C{k}" for k in range(len(self.columns))])
        if len(self.bpm_names) != len(self.bpm_elements):
            raise ValueError("LocoModel: one BPM name per BPM element")
        if len(self.corrector_names) != len(self.columns):
            raise ValueError("LocoModel: one corrector name per column")
        for p in self.parameters:
            for d in p.drives:
                _field_array(self.ring, d)
        self._start = [
            np.array([float(_field_array(self.ring, d)[d.index]) for d in p.drives])
            for p in self.parameters
        ]
        self.gradients = np.zeros(len(self.parameters))
        self.solver = ClosedOrbitSolver(self.ring, self.bpm_elements)
        self._elements = sorted({d.element for p in self.parameters for d in p.drives})

    @classmethod
    def from_online(
        cls,
        model: OnlineModel,
        bpms: Sequence[str] | None = None,
        correctors: Sequence[str] | None = None,
        parameters: Sequence[GradientParameter] | None = None,
    ) -> LocoModel:
        """The online model's lattice at its current settings and fixed RF frequency.

        Args:
            model: the online model (not changed).
            bpms: BPM names (rows); default all, in family order.
            correctors: corrector names (columns; per nominal strength, cross-talk included);
                default all.
            parameters: default :func:`gradient_parameters` of the model, per magnet.
        """
        bpm_names = model._select(bpms, "bpm", model._bpm_names)
        corr = model._select(correctors, "corrector", model._corrector_names)
        model._ensure_orbit()
        return cls(
            model.lattice,
            [model._bpm_element[n] for n in bpm_names],
            [model._columns(n) for n in corr],
            parameters if parameters is not None else gradient_parameters(model),
            dct=model.dct,
            bpm_names=bpm_names,
            corrector_names=corr,
        )

    @property
    def ddct_df(self) -> float:
        """Derivative of the path lengthening by the RF frequency [m/Hz]."""
        length = float(self.ring.circumference) + self.dct
        return -(length**2) / (int(self.ring.harmonic_number) * float(self.ring.beta) * clight)

    def set_gradients(self, gradients: np.ndarray) -> None:
        """Set every parameter to its starting value plus ``gradients`` [m^-2] (in place)."""
        g = np.asarray(gradients, dtype=float).reshape(-1)
        if g.shape != (len(self.parameters),) or not np.all(np.isfinite(g)):
            raise ValueError(f"set_gradients: need {len(self.parameters)} finite values")
        for p, start, v in zip(self.parameters, self._start, g, strict=True):
            for d, s in zip(p.drives, start, strict=True):
                _field_array(self.ring, d)[d.index] = s + d.coefficient * v
        self.gradients = g.copy()
        self.solver.invalidate(lattice=False)

    def evaluate(
        self,
        gradients: np.ndarray | None = None,
        *,
        jacobian: bool = True,
        rf: bool = True,
        dtype: type = np.float64,
        kick: np.ndarray | float | None = None,
    ) -> LocoModelData:
        """The ORM, its orthogonal-kick response, RF column and their gradient derivatives.

        Args:
            gradients: set these first (:meth:`set_gradients`); default: as they are.
            jacobian: compute ``dM/dK`` (else a (0, 2 nbpm, ncorr) array).
            rf: compute the RF column [m/Hz] and its derivative.
            dtype: dtype of the Jacobian (``np.float32`` halves its memory).
            kick: bipolar kick amplitude [rad] (scalar or one per column): the ORM is then the
                one a measurement with ``+-kick`` sees, the linear ORM plus
                :meth:`nonlinear_correction` (the orbit's odd non-linearity, mostly the cubic
                term of the sextupoles); the Jacobian and the orthogonal response stay linear.
                ``None``: the linear ORM.

        Raises:
            NoClosedOrbit: no closed orbit at these gradients (or at a kick).
        """
        data = self._evaluate(gradients, jacobian=jacobian, rf=rf, dtype=dtype)
        if kick is None:
            return data
        matrix = data.matrix + self.nonlinear_correction(kick, data.matrix)
        return LocoModelData(
            matrix, data.jacobian, data.orthogonal, data.rf_column, data.jacobian_rf
        )

    def bipolar_orm(self, kick: np.ndarray | float) -> np.ndarray:
        """The ORM as a bipolar measurement sees it: closed-orbit differences at ``+-kick``.

        Each column's fields are moved in place by ``+kick`` then ``-kick`` (times their
        coefficients), the closed orbit is found at the model's fixed path lengthening
        (pyAT tracking, :class:`~accplans.model.ClosedOrbitSolver`, as the twin does), and
        the fields are put back; :func:`accplans.physics.orm_from_bipolar` makes the columns.
        About 5 ms per column on EBS (two closed orbits).

        Args:
            kick: kick amplitude [rad], a scalar or one per column (``orm`` result ``kicks``).

        Returns:
            (2 nbpm, ncorr) matrix [m/rad], rows ``[x; y]``.

        Raises:
            NoClosedOrbit: no closed orbit at a kicked setting.
        """
        nc, nb = len(self.columns), len(self.bpm_elements)
        k = np.broadcast_to(np.asarray(kick, dtype=float), (nc,))
        if not np.all(np.isfinite(k) & (k > 0.0)):
            raise ValueError("bipolar_orm: kicks must be finite and positive [rad]")
        orbits = np.zeros((2, 2 * nb, nc))
        try:
            for j, column in enumerate(self.columns):
                arrays = [_field_array(self.ring, d) for d in column]
                old = [float(a[d.index]) for a, d in zip(arrays, column, strict=True)]
                for side, sign in enumerate((1.0, -1.0)):
                    try:
                        for a, d, v in zip(arrays, column, old, strict=True):
                            a[d.index] = v + sign * k[j] * d.coefficient
                        orbit = self.solver.solve(self.dct)
                    finally:
                        for a, d, v in zip(arrays, column, old, strict=True):
                            a[d.index] = v
                    orbits[side, :, j] = np.concatenate([orbit[:, 0], orbit[:, 2]])
        finally:
            self.solver.solve(self.dct)  # back to the unkicked orbit
        matrix, _ = orm_from_bipolar(orbits[0], orbits[1], k, -k)
        return matrix

    def nonlinear_correction(
        self, kick: np.ndarray | float, linear: np.ndarray | None = None
    ) -> np.ndarray:
        """Bipolar ORM at ``+-kick`` minus the linear ORM [m/rad], (2 nbpm, ncorr).

        What a measurement with bipolar kicks adds to the linear response: the odd orders of
        the closed orbit in the kick (the cubic term of the sextupoles, ~kick^2 relative).
        Add it to the linear ORM a fit compares with the measurement.

        Args:
            kick: kick amplitude [rad], a scalar or one per column.
            linear: the linear ORM at the present gradients, if already computed.
        """
        if linear is None:
            linear = self._evaluate(None, jacobian=False, rf=False, dtype=np.float64).matrix
        return self.bipolar_orm(kick) - linear

    def _evaluate(
        self,
        gradients: np.ndarray | None,
        *,
        jacobian: bool,
        rf: bool,
        dtype: type,
    ) -> LocoModelData:
        """:meth:`evaluate` without the non-linear correction."""
        if gradients is not None:
            self.set_gradients(gradients)
        nb, nc = len(self.bpm_elements), len(self.columns)
        elems = np.asarray(self._elements, dtype=np.int64)
        ne = len(elems) if jacobian else 0
        refs = np.concatenate([self.bpm_elements, elems[:ne], elems[:ne] + 1])
        self.solver.solve(self.dct)
        cols = self.columns + [_orthogonal(c) for c in self.columns]
        m6, per_dct, lin = exact_response(self.solver, refs, cols)
        matrix = _rows(m6[:, :nb, :nc])
        orth = _rows(m6[:, :nb, nc:])
        ddct = self.ddct_df
        rf_col = _rows(per_dct[:, :nb]) * ddct if rf else None
        npar = len(self.parameters)
        if not jacobian:
            return LocoModelData(matrix, np.zeros((0, 2 * nb, nc), dtype), orth, rf_col, None)
        m_b = lin.matrices[:nb][:, (0, 2), :]  # (nb, 2, 6)
        orbit_in = lin.orbit[nb : nb + ne]
        m_out = lin.matrices[nb + ne : nb + 2 * ne]
        # response of the BPMs to a unit change of each exit coordinate of each element
        w = np.linalg.inv(m_out)  # (ne, 6, 6): equivalent change at the ring entrance
        jinv = np.linalg.inv(lin.jacobian())
        dz = -np.einsum("ij,ejk->eik", jinv, (lin.one_turn @ w)[:, _IDX, :])  # (ne, 5, 6)
        dz6 = np.concatenate([dz, np.zeros((ne, 1, 6))], axis=1)
        resp = np.einsum("bpi,eij->epbj", m_b, dz6)  # (ne, 2, nb, 6)
        down = (self.bpm_elements[None, :] > elems[:, None]).astype(float)  # (ne, nb)
        resp += np.einsum("bpi,eij->epbj", m_b, w) * down[:, None, :, None]
        resp = resp.reshape(ne, 2 * nb, 6)
        # orbit change at each element entrance per corrector, and per Hz
        z = np.moveaxis(m6[:, nb : nb + ne, :nc], 0, 1)  # (ne, 6, nc)
        z_rf = per_dct[:, nb : nb + ne].T * ddct  # (ne, 6)
        pos = {int(e): k for k, e in enumerate(elems)}
        jac = np.zeros((npar, 2 * nb, nc), dtype=dtype)
        jac_rf = np.zeros((npar, 2 * nb)) if rf else None
        for k, p in enumerate(self.parameters):
            by_elem: dict[int, list[FieldDrive]] = {}
            for d in p.drives:
                by_elem.setdefault(d.element, []).append(d)
            acc = np.zeros((2 * nb, nc))
            for e, drives in by_elem.items():
                i = pos[e]
                g = _element_matrix_derivative(self.ring, e, drives, orbit_in[i])
                rg = resp[i] @ g  # (2nb, 6)
                acc += rg @ z[i]
                if jac_rf is not None:
                    jac_rf[k] += rg @ z_rf[i]
            jac[k] = acc
        return LocoModelData(matrix, jac, orth, rf_col, jac_rf)


def orm_jacobian(
    model_or_ring: OnlineModel | at.Lattice,
    bpms: Sequence[str] | Sequence[int] | None,
    correctors: Sequence[str] | Sequence[int] | None,
    parameters: Sequence[GradientParameter] | None = None,
    *,
    planes: Sequence[str | int] | None = None,
    dct: float = 0.0,
    rf: bool = True,
    dtype: type = np.float64,
) -> LocoModelData:
    """ORM, RF column and their analytic derivatives by the gradient parameters.

    Args:
        model_or_ring: an online model (``bpms`` and ``correctors`` are device names, ``None``
            for all) or a 4D lattice (``bpms`` element indices, ``correctors`` element indices
            of ``KickAngle`` correctors with their ``planes``).
        bpms: the rows.
        correctors: the columns.
        parameters: default :func:`gradient_parameters` of the source, per magnet.
        planes: for a lattice, ``"h"``/``"v"`` per corrector.
        dct: for a lattice, the path lengthening [m] (fixed RF frequency).
        rf: also the RF column and its derivative.
        dtype: dtype of the Jacobian.

    Returns:
        :class:`~accplans.physics.LocoModelData`: ``matrix`` (2 nbpm, ncorr) [m/rad],
        ``jacobian`` (npar, 2 nbpm, ncorr) [m/rad per m^-2], ``orthogonal``, ``rf_column``
        [m/Hz] and ``jacobian_rf``.
    """
    return _loco_model(model_or_ring, bpms, correctors, parameters, planes, dct).evaluate(
        rf=rf, dtype=dtype
    )


def _loco_model(
    model_or_ring: OnlineModel | at.Lattice,
    bpms: Sequence[str] | Sequence[int] | None,
    correctors: Sequence[str] | Sequence[int] | None,
    parameters: Sequence[GradientParameter] | None,
    planes: Sequence[str | int] | None,
    dct: float,
) -> LocoModel:
    if isinstance(model_or_ring, OnlineModel):
        return LocoModel.from_online(
            model_or_ring,
            None if bpms is None else [str(b) for b in bpms],
            None if correctors is None else [str(c) for c in correctors],
            parameters,
        )
    ring = model_or_ring
    if bpms is None or correctors is None or planes is None:
        raise ValueError("orm_jacobian on a lattice needs bpms, correctors and planes")
    columns = _kick_columns(ring, [int(c) for c in correctors], list(planes))
    params = parameters if parameters is not None else gradient_parameters(ring)
    return LocoModel(ring, [int(b) for b in bpms], columns, params, dct=dct)


def run_loco(
    loco_model: LocoModel,
    measured: np.ndarray,
    *,
    sigma: np.ndarray | float | None = None,
    measured_rf: np.ndarray | None = None,
    sigma_rf: np.ndarray | float | None = None,
    dtype: type = np.float64,
    kick: np.ndarray | float | None = None,
    **options: Any,
) -> LocoFit:
    """Fit the model's gradients and the calibrations to a measured ORM (LOCO).

    Each Levenberg-Marquardt iteration re-evaluates the model (ORM and analytic Jacobian) at
    the trial gradients; :func:`accplans.physics.fit_loco` does the algebra. On return the
    model's gradients are the fitted ones (``loco_model.gradients``).

    Args:
        loco_model: the model; its current gradients are the fit's start.
        measured: (2 nbpm, ncorr) measured ORM [m/rad], rows and columns as the model's.
        sigma: standard error of each element [m/rad].
        measured_rf: measured RF column [m/Hz] (fitted when given).
        sigma_rf: its standard error [m/Hz].
        dtype: dtype of the Jacobian (``np.float32`` halves its memory).
        kick: the measurement's bipolar kick amplitude [rad] (scalar or one per column): the
            model ORM is then the bipolar one at that kick (:meth:`LocoModel.evaluate`),
            recomputed at every model evaluation (~1.2 s on EBS with 128 columns); ``None``:
            the linear ORM.
        **options: passed to :func:`~accplans.physics.fit_loco` (``fit_bpm_gain``,
            ``fit_corrector_roll``, ``svd_cut``, ``regularization``, ``max_iterations``, ...).

    Returns:
        The fit; ``gradients`` are changes from the starting gradients [m^-2].
    """
    start = loco_model.gradients.copy()
    rf = measured_rf is not None

    def evaluate(dk: np.ndarray) -> LocoModelData:
        return loco_model.evaluate(start + dk, rf=rf, dtype=dtype, kick=kick)

    data = evaluate(np.zeros_like(start))
    fit = fit_loco(
        measured,
        data,
        sigma=sigma,
        measured_rf=measured_rf,
        sigma_rf=sigma_rf,
        evaluate=evaluate,
        **options,
    )
    loco_model.set_gradients(start + fit.gradients)
    return fit


def gradient_correction(
    loco_model: LocoModel,
    fit: LocoFit | np.ndarray,
    settable: Sequence[bool] | np.ndarray,
    *,
    svd_cut: float = 1e-3,
) -> np.ndarray:
    """Changes of the settable gradients [m^-2] that cancel the fitted gradient errors.

    When every parameter with a fitted change is settable, that is minus the change. Otherwise
    (gradient dipoles, magnets without a power supply of their own) the settable parameters
    take the least-squares compensation of the ORM change of all the fitted errors
    (:func:`accplans.physics.compensate_gradients`, with the Jacobian of ``loco_model`` at its
    current, fitted, gradients).

    Args:
        loco_model: the model after the fit.
        fit: the fit, or the fitted gradient changes [m^-2].
        settable: one boolean per parameter.
        svd_cut: SVD cut of the compensation.
    """
    dk = fit.gradients if isinstance(fit, LocoFit) else np.asarray(fit, dtype=float)
    mask = np.asarray(settable, dtype=bool)
    if mask.shape != dk.shape or dk.shape != (len(loco_model.parameters),):
        raise ValueError("gradient_correction: one fitted change and one flag per parameter")
    if not np.any(dk[~mask]):
        return np.where(mask, -dk, 0.0)
    data = loco_model.evaluate(rf=False)
    return compensate_gradients(data.jacobian, dk, mask, svd_cut=svd_cut)


def optics_correction(
    model: OnlineModel,
    loco_model: LocoModel,
    fit: LocoFit | np.ndarray,
    *,
    svd_cut: float = 1e-3,
    reference: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Hardware values [A] of the quadrupoles that cancel the fitted gradient errors.

    The parameters named after a quadrupole device of ``model`` (per-magnet parameters of
    :func:`gradient_parameters`) are settable; :func:`gradient_correction` gives their
    changes (minus the fitted ones, or a compensation when other parameters, such as gradient
    dipoles, were fitted too), added to the device's reference strength (default: its current
    nominal strength) and converted through its calibration.

    The fitted errors are deviations of the machine from the model at its *current* settings;
    after a first correction the settings already hold minus the errors, so a second fit finds
    the same errors again: give ``reference`` (the strengths before the first correction, the
    optics the corrections aim at) so that repeated measure-fit-correct cycles converge
    instead of correcting twice.

    Args:
        model: the online model at the machine's current settings.
        loco_model: the model the fit was made with (at the fitted gradients).
        fit: the fit, or the fitted gradient changes [m^-2].
        svd_cut: SVD cut of the compensation.
        reference: device name -> nominal strength [m^-2] the correction is added to (the
            target optics); default ``model.nominal_strength`` of each device.

    Returns:
        Device name -> hardware value [A]; give it to the quadrupoles (limits are the plan's
        job).
    """
    names = [p.name for p in loco_model.parameters]
    settable = np.array(
        [
            n in model.description.device_map and model.description.device(n).kind == "quadrupole"
            for n in names
        ]
    )
    change = gradient_correction(loco_model, fit, settable, svd_cut=svd_cut)
    out: dict[str, float] = {}
    for name, ok, v in zip(names, settable, change, strict=True):
        if not ok:
            continue
        cal: Callable[[float], float] = model._calibration(name).to_hardware
        base = model.nominal_strength(name) if reference is None else float(reference[name])
        out[name] = float(cal(base + float(v)))
    return out
