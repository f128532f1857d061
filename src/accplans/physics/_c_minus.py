"""``|C-|`` as a complex number: its response to skew gradients and the two skew knobs.

Pure numpy on arrays in SI units; the online model gives the optics.

Complex ``C-`` (Guignard's first-order difference-resonance driving term)
    ``C- = (1 / 2 pi) sum_s (a L)_s sqrt(beta_x beta_y)_s exp(i (phi_x - phi_y - 2 pi D s / C))``
    over the skew gradients ``(a L)_s`` (integrated, m^-1) at longitudinal positions ``s``,
    with ``D = (Qx - Qy) - p`` the distance of the tunes to the nearest difference resonance
    ``Qx - Qy = p`` and ``C`` the circumference. ``|C-|`` is the closest tune approach (tune
    units); its phase depends on the convention (here ``phi_x - phi_y``), which the knobs do
    not need: two skew patterns that move ``C-`` by 1 and by ``i`` are orthogonal knobs in any
    convention. On the small ring (``|D| = 0.25``) ``|C-|`` of random skews agrees with the
    model's closest tune approach within 10 %; on EBS (``|D| = 0.13``) within 10 % too.

Knob scan (:func:`fit_c_minus_knob`)
    A knob ``k`` (tune units of ``C-``) changes ``C- -> C0 + k e`` along a unit complex
    direction ``e`` (:func:`c_minus_knob_patterns`), so ``|C-|^2 = (c_r + k)^2 + c_i^2`` with
    ``c_r = Re(C0 / e)``: three measurements of ``|C-|`` give ``c_r``, and the knob value that
    minimises ``|C-|`` is ``-c_r``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "CMinusKnobFit",
    "CMinusKnobs",
    "c_minus_coefficients",
    "c_minus_knob_patterns",
    "fit_c_minus_knob",
    "uncoupled_tunes",
]


def c_minus_coefficients(
    beta: npt.ArrayLike,
    phase: npt.ArrayLike,
    s: npt.ArrayLike,
    tunes: npt.ArrayLike,
    circumference: float,
) -> np.ndarray:
    """Complex ``C-`` per unit integrated skew gradient at each source (module docstring).

    Args:
        beta: (n, 2) beta functions (x, y) at the sources [m].
        phase: (n, 2) betatron phase advances (x, y) from the ring's start [rad].
        s: (n,) longitudinal positions [m].
        tunes: (2,) full tunes (x, y), integer part included.
        circumference: ring circumference [m].

    Returns:
        (n,) complex ``C-`` per unit ``a L`` [per m^-1].
    """
    b = np.asarray(beta, dtype=float)
    mu = np.asarray(phase, dtype=float)
    pos = np.asarray(s, dtype=float)
    q = np.asarray(tunes, dtype=float)
    if b.ndim != 2 or b.shape[1] != 2 or mu.shape != b.shape or pos.shape != (b.shape[0],):
        raise ValueError(
            f"c_minus_coefficients: beta {b.shape}, phase {mu.shape}, s {pos.shape}: "
            "need (n, 2), (n, 2), (n,)"
        )
    if q.shape != (2,) or not circumference > 0:
        raise ValueError("c_minus_coefficients: need two tunes and a positive circumference")
    if np.any(b <= 0):
        raise ValueError("c_minus_coefficients: beta functions must be positive")
    distance = float(q[0] - q[1])
    distance -= round(distance)
    angle = mu[:, 0] - mu[:, 1] - 2 * np.pi * distance * pos / circumference
    return np.sqrt(b[:, 0] * b[:, 1]) * np.exp(1j * angle) / (2 * np.pi)


@dataclass(frozen=True)
class CMinusKnobs:
    """Skew patterns that move complex ``C-`` along orthogonal directions (tune units).

    Attributes:
        patterns: (nskew, nknob) strength changes [m^-2] per knob unit; knob ``j`` moves
            ``C-`` by ``directions[j]`` per unit.
        directions: (nknob,) unit complex numbers, orthogonal (``directions[1] = +-i
            directions[0]``).
        singular_values: (2,) singular values of the response's (real, imaginary) rows.
    """

    patterns: np.ndarray
    directions: np.ndarray
    singular_values: np.ndarray


def c_minus_knob_patterns(
    response: npt.ArrayLike, *, rcond: float = 1e-2, usable: npt.ArrayLike | None = None
) -> CMinusKnobs:
    """Minimum-norm skew patterns that move complex ``C-`` along its principal directions.

    The (2, nskew) real matrix ``[Re r; Im r]`` is decomposed ``U S V^T``; knob ``j`` is the
    pattern ``V[:, j] / S[j]``, which moves ``C-`` by the unit complex number ``U[0, j] + i
    U[1, j]``. Two knobs when the skews move both parts of ``C-`` (a rotated pair of real
    and imaginary knobs); one when the second singular value is below ``rcond`` times the
    first: skews at the same phase of the difference resonance, as in a periodic ring with one
    winding per cell (the small test ring), move ``C-`` along one direction only.

    Args:
        response: (nskew,) complex ``C-`` per unit strength of each skew [per m^-2].
        rcond: smallest kept singular value relative to the largest.
        usable: (nskew,) the skews the knobs may move (e.g. those not at a limit); all by
            default. The others get zero in every pattern.

    Raises:
        ValueError: no skew, or skews that do not move ``C-``.
    """
    r = np.asarray(response, dtype=complex)
    if r.ndim != 1 or r.size < 1 or not np.all(np.isfinite(r)):
        raise ValueError(f"c_minus_knob_patterns: need (nskew,) finite values, got {r.shape}")
    use = np.ones(r.size, bool) if usable is None else np.asarray(usable, bool)
    if use.shape != r.shape:
        raise ValueError(f"c_minus_knob_patterns: usable {use.shape} vs {r.size} skews")
    u, sv, vt = np.linalg.svd(np.vstack([np.real(r[use]), np.imag(r[use])]), full_matrices=False)
    if sv.size == 0 or sv[0] == 0:
        raise ValueError("c_minus_knob_patterns: the usable skews do not move C-")
    keep = sv >= rcond * sv[0]
    patterns = np.zeros((r.size, int(keep.sum())))
    patterns[use] = vt[keep].T / sv[keep]
    return CMinusKnobs(
        patterns=patterns,
        directions=(u[0, keep] + 1j * u[1, keep]),
        singular_values=np.pad(sv, (0, 2 - sv.size)),
    )


def uncoupled_tunes(m44: npt.ArrayLike) -> np.ndarray:
    """Fractional tunes (x, y), in [0, 1), of the diagonal 2x2 blocks of a 4x4 one-turn matrix.

    With coupling these are the tunes the planes would have without it (to first order in the
    coupling), which move through each other in a tune scan while the eigen-tunes do not.

    Raises:
        ValueError: not a 4x4 matrix, or a block is unstable (``|trace| >= 2``).
    """
    m = np.asarray(m44, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"uncoupled_tunes: need a 4x4 matrix, got shape {m.shape}")
    out = []
    for block, plane in ((m[:2, :2], "x"), (m[2:, 2:], "y")):
        cos_mu = 0.5 * float(np.trace(block))
        if abs(cos_mu) >= 1.0:
            raise ValueError(f"uncoupled_tunes: the {plane} block is unstable (cos mu {cos_mu})")
        sin_mu = float(np.sign(block[0, 1])) * np.sqrt(1.0 - cos_mu**2)
        out.append(np.mod(np.arctan2(sin_mu, cos_mu) / (2 * np.pi), 1.0))
    return np.array(out)


@dataclass(frozen=True)
class CMinusKnobFit:
    """A knob scan of ``|C-|`` fitted by :func:`fit_c_minus_knob` (tune units).

    Attributes:
        best: knob value that minimises ``|C-|`` (``-c_r``).
        c_along: ``c_r``, the part of ``C-`` along the knob at knob value 0.
        c_across: ``|c_i|``, the part across it: the ``|C-|`` predicted at ``best``.
        residual_rms: rms of the fit's residual in ``|C-|^2``.
    """

    best: float
    c_along: float
    c_across: float
    residual_rms: float


def fit_c_minus_knob(knob: npt.ArrayLike, c_minus: npt.ArrayLike) -> CMinusKnobFit:
    """Fit ``|C-|^2 = (c_r + k)^2 + c_i^2`` to ``|C-|`` measured at knob values ``k``.

    The curvature is 1 (the knob moves ``C-`` by one tune unit per unit), so two unknowns,
    ``c_r`` and ``c_r^2 + c_i^2``, fitted by linear least squares.

    Args:
        knob: (n,) knob values [tune units], n >= 2, at least two distinct.
        c_minus: (n,) measured ``|C-|`` [tune units].

    Raises:
        ValueError: bad shapes, non-finite values, or fewer than two distinct knob values.
    """
    k = np.asarray(knob, dtype=float)
    c = np.asarray(c_minus, dtype=float)
    if k.ndim != 1 or c.shape != k.shape or k.size < 2:
        raise ValueError("fit_c_minus_knob: need (n,) knob values and (n,) |C-|, n >= 2")
    if not (np.all(np.isfinite(k)) and np.all(np.isfinite(c))):
        raise ValueError("fit_c_minus_knob: knob values and |C-| must be finite")
    if np.unique(k).size < 2:
        raise ValueError("fit_c_minus_knob: need at least two distinct knob values")
    a = np.column_stack([2.0 * k, np.ones_like(k)])
    y = c**2 - k**2
    (c_r, total), *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = y - a @ np.array([c_r, total])
    return CMinusKnobFit(
        best=float(-c_r),
        c_along=float(c_r),
        c_across=float(np.sqrt(max(total - c_r**2, 0.0))),
        residual_rms=float(np.sqrt(np.mean(resid**2))),
    )
