"""Fast closed orbit at fixed RF frequency: a chord (quasi-Newton) iteration on pyAT tracking.

pyAT's ``find_orbit4(ring, dct=...)`` converts the whole lattice to C and runs a full Newton
iteration (six particles per pass) on every call: 25-50 ms on an EBS-size ring. A twin or an
online model recomputes the orbit after small setpoint changes, close to the last solution, so
:class:`ClosedOrbitSolver` instead

- keeps the C lattice between calls (``atpass(..., reuse=True)``): in-place changes of element
  arrays (``e.KickAngle[0] = v``, ``q.PolynomB[1] = k``) are seen by the C tracker, reassigned
  arrays, scalars and replaced elements are not (call :meth:`ClosedOrbitSolver.invalidate`);
- keeps the one-turn Jacobian fixed between calls (chord method) and tracks one particle one
  turn per pass; the Jacobian is refreshed (one six-particle pass) when a pass gains less than
  10x;
- starts from a linear prediction of the new orbit when the caller says which kicks changed;
- corrects the orbit at the reference points linearly by the last (converged) step, so the
  result is exact to the tolerance without one more pass.

The unknowns are ``z = (x, px, y, py, delta)`` at the ring entrance (``ct`` enters at 0). The
conditions are the transverse periodicity and the one-turn path length: with ``F`` the one-turn
map, ``F(z)[0:4] = z[0:4]`` and ``F(z)[5] = dct``, exactly pyAT's ``find_orbit4(ring, dct=dct)``
(and ``find_sync_orbit``).

pyAT's C tracking is called directly (``at.tracking.atpass.atpass``): pyAT's ``internal_lpass``
spends ~2 ms per call scanning the lattice for variable elements, which this module does once.
The C side caches one lattice per process and reuses it only for the same lattice object, so
other pyAT calls in between (``linopt6`` on the same or another ring) are safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import at
import numpy as np
from at.constants import clight
from at.tracking.atpass import atpass
from at.tracking.utils import variable_refs

__all__ = [
    "ClosedOrbitSolver",
    "Linearization",
    "NoClosedOrbit",
    "dct_for_frequency",
    "frequency_for_dct",
]

#: Indices of the one-turn output used by the conditions: x, px, y, py, ct.
_IDX = np.array([0, 1, 2, 3, 5])
#: 1 on the transverse diagonal: d(z_out - z_in)/dz has no "- 1" for delta (it is not periodic
#: in the conditions, the path length is).
_ID5 = np.diag([1.0, 1.0, 1.0, 1.0, 0.0])
_LOST = (
    "particle lost in one turn (NaN coordinates): no closed orbit exists for these settings "
    "(aperture, or unstable motion)"
)
#: The symplectic form of pyAT's 6D coordinates.
_S6 = np.asarray(at.jmat(3), dtype=float)
#: Orbit coordinates beyond which the iteration is said to diverge (m, rad, 1).
_DIVERGED = np.array([0.1, 0.1, 0.1, 0.1, 0.5])


class NoClosedOrbit(RuntimeError):
    """No closed orbit exists (or none was found): the message says why."""


def _harmonic_and_beta(ring: at.Lattice) -> tuple[int, float]:
    try:
        h = int(ring.harmonic_number)
    except AttributeError:
        raise ValueError(
            f"lattice {ring.name!r} has no RF cavity: it has no harmonic number, so an RF "
            "frequency cannot be turned into a path length"
        ) from None
    return h, float(ring.beta)


def dct_for_frequency(ring: at.Lattice, frequency_hz: float) -> float:
    """Path lengthening [m] at which the closed orbit is synchronous with ``frequency_hz``.

    The orbit length ``L`` that makes the revolution frequency ``f / h`` is
    ``L = h * beta * c / f`` (``h`` the ring's harmonic number, ``beta`` the particle's velocity
    over ``c``: 1 for pyAT's ``relativistic`` particle, and pyAT's tracking assumes ``beta = 1``
    for ``ct`` anyway). The result is ``L - C`` with ``C`` the lattice circumference, the
    ``dct`` of ``at.find_orbit4(ring, dct=dct)``; it agrees with pyAT's
    ``find_orbit4(ring, df=...)`` conversion, which is relative to ``h * beta * c / C``, not to
    the cavities' ``Frequency`` attribute.

    Args:
        ring: the ring (it needs a cavity, for the harmonic number).
        frequency_hz: RF frequency [Hz].

    Returns:
        The path lengthening ``dct`` [m] (positive for a frequency below the nominal one).
    """
    if not np.isfinite(frequency_hz) or frequency_hz <= 0.0:
        raise ValueError(f"RF frequency must be finite and positive, got {frequency_hz!r} Hz")
    h, beta = _harmonic_and_beta(ring)
    return h * beta * clight / frequency_hz - float(ring.circumference)


def frequency_for_dct(ring: at.Lattice, dct: float) -> float:
    """RF frequency [Hz] whose synchronous closed orbit has path lengthening ``dct`` [m].

    Inverse of :func:`dct_for_frequency`: ``f = h * beta * c / (C + dct)``.
    """
    h, beta = _harmonic_and_beta(ring)
    length = float(ring.circumference) + dct
    if not np.isfinite(length) or length <= 0.0:
        raise ValueError(f"path lengthening {dct!r} m gives a non-positive orbit length")
    return h * beta * clight / length


@dataclass(frozen=True)
class Linearization:
    """The one-turn map linearized around the closed orbit (central differences).

    Attributes:
        x0: (6,) closed orbit at the ring entrance (``ct`` = 0).
        one_turn: (6, 6) one-turn transfer matrix at the closed orbit (column 5, ``ct``, is
            the unit vector: nothing depends on ``ct`` in a 4D ring).
        refpts: (n,) the reference points (element indices; ``len(ring)`` is the ring exit).
        matrices: (n, 6, 6) transfer matrices from the ring entrance to each reference point.
        orbit: (n, 6) closed orbit at the reference points.
    """

    x0: np.ndarray
    one_turn: np.ndarray
    refpts: np.ndarray
    matrices: np.ndarray
    orbit: np.ndarray

    def jacobian(self) -> np.ndarray:
        """(5, 5) derivative of the closed-orbit conditions by ``(x, px, y, py, delta)``."""
        return self.one_turn[_IDX, :5] - _ID5


def _refpts_array(ring: at.Lattice, refpts: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(refpts)
    n = len(ring)
    if arr.dtype == bool:
        if arr.ndim != 1 or len(arr) > n + 1:
            raise ValueError(f"boolean refpts must be 1-D of length <= {n + 1}")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"refpts must be a 1-D sequence of element indices, got {refpts!r}")
    bad = arr[(arr < 0) | (arr > n)]
    if bad.size:
        raise ValueError(f"refpts {bad[:5].tolist()} are outside the lattice (0..{n})")
    return arr.astype(np.int64)


class ClosedOrbitSolver:
    """Closed orbit of a 4D ring at fixed path length (fixed RF frequency), fast on updates.

    Build it once for a ring and the points where the orbit is wanted; change element
    attributes **in place** (``ring[i].KickAngle[0] = v``, ``ring[i].PolynomB[1] = k``) and call
    :meth:`solve`. After optics changes (quadrupoles, sextupoles) call :meth:`invalidate` with
    ``lattice=False``; after anything the reused C lattice cannot see (an element replaced, an
    array reassigned, a scalar such as ``Length`` changed) call :meth:`invalidate`.

    Args:
        ring: the 4D ring (cavities on ``IdentityPass``, no radiation), periodicity 1.
        refpts: element indices where :meth:`solve` returns the orbit (any order, repeats
            allowed; ``len(ring)`` is the ring exit); a boolean mask is accepted too.
        tol: convergence tolerance [m]: the iteration stops when the last Newton step moves
            the orbit by less than ``tol`` (the norm of the step on ``(x, px, y, py, delta)``
            at the entrance, and x, y at every reference point), or when the observed
            contraction says the remaining error is below ``tol``. The returned orbit is
            corrected by that last step.
        max_passes: one-turn passes allowed per :meth:`solve` before giving up.

    Attributes:
        x0: (6,) closed orbit at the ring entrance after the last solve
            ``(x [m], px [rad], y [m], py [rad], delta, ct = 0)``.
        passes: number of one-turn tracking passes of the last solve (Jacobian passes
            included), for diagnostics.
    """

    #: forward-difference step of the Jacobian pass (pyAT's XYStep) [m, rad, 1]
    jacobian_step = 3e-8
    #: central-difference step of :meth:`linearize` [m, rad, 1]
    linearize_step = 1e-7
    #: a pass that shrinks the Newton step by less than this refreshes the Jacobian
    min_gain = 10.0

    def __init__(
        self,
        ring: at.Lattice,
        refpts: Sequence[int] | np.ndarray,
        *,
        tol: float = 1e-10,
        max_passes: int = 40,
    ) -> None:
        if ring.is_6d:
            raise ValueError(
                f"lattice {ring.name!r} is 6D (cavities or radiation on): the solver needs a 4D "
                "ring; call ring.disable_6d()"
            )
        if int(getattr(ring, "periodicity", 1)) != 1:
            raise ValueError(
                f"lattice {ring.name!r} has periodicity {ring.periodicity}: give the full ring "
                "(ring.repeat(n)), errors and correctors break the symmetry"
            )
        if np.any(variable_refs(ring)):
            raise ValueError(
                f"lattice {ring.name!r} has collective or time-dependent elements; the closed "
                "orbit solver does not support them"
            )
        if not tol > 0.0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        self.ring = ring
        self.tol = float(tol)
        self.max_passes = int(max_passes)
        n = len(ring)
        self._n = n
        self._refpts = _refpts_array(ring, refpts)
        uniq, inverse = np.unique(self._refpts, return_inverse=True)
        self._inverse = inverse.reshape(-1)
        # one-particle passes observe the unique refpts and the ring exit
        self._track_refs = np.union1d(uniq, [n]).astype(np.uint32)
        self._uniq_pos = np.searchsorted(self._track_refs, uniq)
        self._all_refs = np.arange(n + 1, dtype=np.uint32)
        self.x0 = np.zeros(6)
        self.passes = 0
        self._rebuild = True  # next pass converts the lattice to C (no reuse)
        self._jac_stale = True
        self._jinv = np.eye(5)
        self._m_all = np.zeros((n + 1, 6, 6))  # entrance -> element k, at the last Jacobian
        self._m_ref = self._m_all[self._track_refs]

    def __setstate__(self, state: dict) -> None:
        # unpickled in another process: that process's C lattice is not ours
        self.__dict__.update(state)
        self._rebuild = True

    # -- state -------------------------------------------------------------------------------
    @property
    def refpts(self) -> np.ndarray:
        """The reference points (element indices) of :meth:`solve`, in the given order."""
        return self._refpts.copy()

    def invalidate(self, *, lattice: bool = True) -> None:
        """Forget the Jacobian (and, with ``lattice=True``, the C copy of the lattice).

        Call it after optics changes: the next :meth:`solve` refreshes the Jacobian, and
        converts the lattice to C again when ``lattice`` is true (needed after an element is
        replaced, an attribute array reassigned, or a scalar attribute changed; in-place
        changes of arrays such as ``PolynomB[1]`` only need ``lattice=False``).
        """
        self._jac_stale = True
        if lattice:
            self._rebuild = True

    # -- tracking ----------------------------------------------------------------------------
    def _track(self, particles: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Track (6, N) particles one turn; (6, N, len(refs)) coordinates at ``refs``."""
        r = np.array(particles, dtype=float, order="F", copy=True)  # atpass overwrites its input
        reuse = not self._rebuild
        out = atpass(self.ring, r, 1, refpts=refs, reuse=reuse)
        self._rebuild = False
        self.passes += 1
        return out[:, :, :, 0]

    def _jacobian_pass(self, z: np.ndarray) -> np.ndarray:
        """Forward-difference pass at ``z``: refresh the Jacobian; return the centre particle."""
        h = self.jacobian_step
        start = np.zeros((6, 6))
        start[:5, :] = z[:, None]
        start[np.arange(5), np.arange(1, 6)] += h
        out = self._track(start, self._all_refs)  # (6, 6, n + 1)
        centre = out[:, 0, :]  # (6, n + 1)
        m_all = np.empty((self._n + 1, 6, 6))
        m_all[:, :, :5] = np.moveaxis((out[:, 1:, :] - centre[:, None, :]) / h, 2, 0)
        m_all[:, :, 5] = 0.0
        m_all[:, 5, 5] = 1.0
        if not np.all(np.isfinite(m_all)):
            self._jac_stale = True
            raise NoClosedOrbit(_LOST)
        jac = m_all[-1][_IDX, :5] - _ID5
        try:
            self._jinv = np.linalg.inv(jac)
        except np.linalg.LinAlgError:
            self._jac_stale = True
            raise NoClosedOrbit(
                "the one-turn Jacobian is singular (integer or half-integer resonance, or "
                "zero momentum compaction): no unique closed orbit"
            ) from None
        self._m_all = m_all
        self._m_ref = m_all[self._track_refs]  # (unique refpts + exit, 6, 6)
        self._jac_stale = False
        return centre[:, self._track_refs]

    # -- prediction --------------------------------------------------------------------------
    def _check_kicks(
        self, elements: np.ndarray, dkicks: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(elements, dtype=np.int64).reshape(-1)
        dk = np.asarray(dkicks, dtype=float)
        if dk.size != 2 * len(idx) or not np.all(np.isfinite(dk)):
            raise ValueError(
                f"kick_changes: {len(idx)} elements need ({len(idx)}, 2) finite kicks, got "
                f"shape {dk.shape}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise ValueError(f"kick_changes: element indices must be in 0..{self._n - 1}")
        return idx, dk.reshape(-1, 2)

    def predict(self, elements: np.ndarray, dkicks: np.ndarray) -> np.ndarray:
        """Linear change of ``(x, px, y, py, delta)`` at the entrance for kick changes.

        Uses the transfer matrices of the last Jacobian pass; the kick of a thick element is
        taken at its centre (mean of the responses at its entrance and exit).

        Args:
            elements: (n,) element indices.
            dkicks: (n, 2) changes of ``KickAngle`` [rad] (horizontal, vertical).

        Returns:
            (5,) predicted change of the orbit at the ring entrance.
        """
        idx, dk = self._check_kicks(elements, dkicks)
        if idx.size == 0:
            return np.zeros(5)
        # columns px, py of M^-1 = -S M^T S (symplectic), at the element entrance and exit
        m_t = np.swapaxes(self._m_all[idx], 1, 2) + np.swapaxes(self._m_all[idx + 1], 1, 2)
        inv_cols = -_S6 @ (m_t @ _S6[:, (1, 3)])
        w = 0.5 * np.einsum("kij,kj->i", inv_cols, dk)  # equivalent entrance change
        dg = (self._m_all[-1] @ w)[_IDX]
        return -self._jinv @ dg

    # -- solve -------------------------------------------------------------------------------
    def solve(
        self,
        dct: float = 0.0,
        *,
        kick_changes: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Closed orbit at the reference points for path lengthening ``dct``.

        Args:
            dct: path lengthening [m] (``at.find_orbit4(ring, dct=dct)`` semantics; see
                :func:`dct_for_frequency`).
            kick_changes: ``(element_indices, dkicks)`` with ``dkicks`` (n, 2) the changes of
                ``KickAngle`` [rad] made since the last solve; optional, it only makes the
                iteration start closer.

        Returns:
            (nrefpts, 6) closed orbit at the reference points, in their given order.

        Raises:
            NoClosedOrbit: the particle is lost, the iteration diverges or does not converge,
                or the Jacobian is singular, from the last orbit and again from zero (as
                ``find_orbit4`` starts). The solver keeps its last good orbit.
        """
        if not np.isfinite(dct):
            raise ValueError(f"dct must be finite, got {dct!r}")
        self.passes = 0
        z_good = self.x0[:5].copy()
        try:
            return self._solve(float(dct), kick_changes)
        except NoClosedOrbit:
            if not np.any(z_good):
                self._jac_stale = True
                raise
        # the warm start failed (far from the new orbit): start from zero, as find_orbit4 does
        self.x0 = np.zeros(6)
        self._jac_stale = True
        try:
            return self._solve(float(dct), None)
        except NoClosedOrbit:
            self.x0 = np.append(z_good, 0.0)
            self._jac_stale = True
            raise

    def _size(self, step: np.ndarray, moved: np.ndarray | None = None) -> float:
        """Size of a step: its norm at the entrance, and its x, y at the reference points [m]."""
        if moved is None:
            moved = self._m_ref @ np.append(step, 0.0)
        return max(float(np.linalg.norm(step)), float(np.max(np.abs(moved[:, (0, 2)]))))

    def _solve(self, dct: float, kick_changes: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        z = self.x0[:5].copy()
        prev = np.inf
        if kick_changes is not None:
            self._check_kicks(*kick_changes)
        if kick_changes is not None and not self._jac_stale:
            dz = self.predict(*kick_changes)
            z = z + dz
            # the predicted step counts as the previous step for the gain test
            prev = self._size(dz) or np.inf
        for _ in range(self.max_passes):
            if self._jac_stale:
                obs = self._jacobian_pass(z)
                fresh = True
            else:
                obs = self._track(np.append(z, 0.0)[:, None], self._track_refs)[:, 0, :]
                fresh = False
            if not np.all(np.isfinite(obs)):
                raise NoClosedOrbit(_LOST)
            end = obs[:, -1]
            g = np.append(end[:4] - z[:4], end[5] - dct)
            step = self._jinv @ g
            moved = self._m_ref @ np.append(step, 0.0)
            size = self._size(step, moved)
            # a posteriori error of z - step: ~ rho * size, rho the observed contraction
            rho = size / prev if np.isfinite(prev) else 1.0
            if size <= self.tol or (rho < 0.5 and 2.0 * rho * size / (1.0 - rho) <= self.tol):
                self.x0 = np.append(z - step, 0.0)
                orbit = (obs - moved.T)[:, self._uniq_pos].T
                return orbit[self._inverse]
            if size > prev and not fresh:
                # diverging with a stale Jacobian: refresh it here, do not take the step
                self._jac_stale = True
                continue
            if size * self.min_gain > prev and not fresh:
                self._jac_stale = True  # too slow: refresh at the next point
            z = z - step
            if np.any(np.abs(z) > _DIVERGED):
                raise NoClosedOrbit(
                    f"closed orbit search diverged: (x, px, y, py, delta) = {z.tolist()}"
                )
            prev = size
        raise NoClosedOrbit(
            f"closed orbit did not converge to {self.tol:g} in {self.max_passes} passes "
            f"(last step {prev:.3g})"
        )

    # -- linearization -----------------------------------------------------------------------
    def linearize(self, refpts: Sequence[int] | np.ndarray) -> Linearization:
        """Transfer matrices around the last solved closed orbit (central differences).

        One pass of 11 particles (the orbit and +-``linearize_step`` in x, px, y, py, delta),
        reusing the C lattice. Call :meth:`solve` first.

        Args:
            refpts: element indices (``len(ring)``: ring exit).
        """
        refs = _refpts_array(self.ring, refpts)
        uniq, inverse = np.unique(refs, return_inverse=True)
        track_refs = np.union1d(uniq, [self._n]).astype(np.uint32)
        pos = np.searchsorted(track_refs, uniq)
        h = self.linearize_step
        start = np.repeat(self.x0[:, None], 11, axis=1)
        start[np.arange(5), np.arange(1, 6)] += h
        start[np.arange(5), np.arange(6, 11)] -= h
        out = self._track(start, track_refs)  # (6, 11, nref)
        if not np.all(np.isfinite(out)):
            raise NoClosedOrbit(_LOST)
        mats = np.empty((len(track_refs), 6, 6))
        mats[:, :, :5] = np.moveaxis((out[:, 1:6, :] - out[:, 6:11, :]) / (2 * h), 2, 0)
        mats[:, :, 5] = 0.0
        mats[:, 5, 5] = 1.0
        inv = inverse.reshape(-1)
        return Linearization(
            x0=self.x0.copy(),
            one_turn=mats[-1].copy(),
            refpts=refs,
            matrices=mats[pos][inv],
            orbit=out[:, 0, :].T[pos][inv],
        )
