"""The slow orbit feedback's controller: a PI loop on the regularised inverse of each plane.

One iteration takes the orbit error ``e = orbit - reference`` [m] of each plane, turns it into a
corrector-space error ``u = K e`` with the plane's regularised inverse ``K`` (Tikhonov or
truncated SVD of the diagonal ORM block, :func:`~accplans.physics.correction_matrix`) and returns
the kick change of a PI controller in velocity form::

    dtheta_k = -(ki * u_k + kp * (u_k - u_{k-1}))

``ki`` (0..1) is the fraction of the error removed per iteration: with ``kp = 0`` a static error
decays as ``(1 - ki)^k``, and a drift ``v`` [m/iteration] is held at a lag of ``v / ki``. The
velocity form has no integrator state to wind up: pausing the loop (a claim, a bad frame) only
forgets ``u_{k-1}``.

BPMs and correctors are masked per iteration (operator exclusions, claimed resources, BPMs whose
frame is invalid); an inverse is computed once per mask and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._correction import correction_matrix

__all__ = ["FeedbackGains", "FeedbackStep", "OrbitFeedbackController"]

_PLANES = ("x", "y")
_MAX_CACHED = 32


@dataclass(frozen=True)
class FeedbackGains:
    """Gains of one plane of the feedback.

    Attributes:
        ki: integral gain, fraction of the error removed per iteration (0 < ki <= 1).
        kp: proportional gain of the velocity-form PI (>= 0; 0 is a pure integrator).
    """

    ki: float = 0.5
    kp: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.ki) and 0.0 < self.ki <= 1.0):
            raise ValueError(f"integral gain ki must be in (0, 1], got {self.ki!r}")
        if not (np.isfinite(self.kp) and 0.0 <= self.kp <= 1.0):
            raise ValueError(f"proportional gain kp must be in [0, 1], got {self.kp!r}")


@dataclass(frozen=True)
class FeedbackStep:
    """The outcome of one iteration of :class:`OrbitFeedbackController`.

    Attributes:
        dtheta_x_rad: (nh,) kick change of the horizontal correctors [rad]; 0 where masked.
        dtheta_y_rad: (nv,) kick change of the vertical correctors [rad]; 0 where masked.
        error_rms_m: rms orbit error ``orbit - reference`` over the used BPMs, per plane [m].
        used_bpms: (nbpm,) booleans, the BPMs the step used (valid and not excluded).
    """

    dtheta_x_rad: np.ndarray
    dtheta_y_rad: np.ndarray
    error_rms_m: tuple[float, float]
    used_bpms: np.ndarray


@dataclass
class _Plane:
    response: np.ndarray
    gains: FeedbackGains
    cache: dict[tuple[bytes, bytes], np.ndarray] = field(default_factory=dict)
    previous: np.ndarray | None = None
    previous_key: tuple[bytes, bytes] | None = None


class OrbitFeedbackController:
    """Per-plane PI orbit feedback on the diagonal blocks of an orbit response matrix.

    Args:
        response_x: (nbpm, nh) horizontal orbit response to the horizontal correctors [m/rad].
        response_y: (nbpm, nv) vertical orbit response to the vertical correctors [m/rad].
        gains_x: gains of the horizontal plane.
        gains_y: gains of the vertical plane.
        method: ``"tikhonov"`` or ``"svd"`` (truncated), as :func:`correction_matrix`.
        alpha: Tikhonov parameter as a fraction of each plane's largest singular value (so one
            number suits any machine); ``method="tikhonov"`` only.
        n_singular: singular values kept per plane (``"svd"``; default all).

    Raises:
        ValueError: shapes that do not match, NaN in the response, bad gains or settings.
    """

    def __init__(
        self,
        response_x: np.ndarray,
        response_y: np.ndarray,
        *,
        gains_x: FeedbackGains | None = None,
        gains_y: FeedbackGains | None = None,
        method: str = "tikhonov",
        alpha: float = 0.02,
        n_singular: tuple[int | None, int | None] = (None, None),
    ) -> None:
        rx, ry = np.asarray(response_x, float), np.asarray(response_y, float)
        if rx.ndim != 2 or ry.ndim != 2 or rx.shape[0] != ry.shape[0]:
            raise ValueError(
                f"response blocks must be (nbpm, nh) and (nbpm, nv) with the same BPMs, got "
                f"{rx.shape} and {ry.shape}"
            )
        for plane, r in zip(_PLANES, (rx, ry), strict=True):
            if not np.isfinite(r).all():
                raise ValueError(f"the {plane} response block holds NaN or inf")
        if method not in ("tikhonov", "svd"):
            raise ValueError(f"unknown method {method!r}; use 'tikhonov' or 'svd'")
        if method == "tikhonov" and not (np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite fraction >= 0, got {alpha!r}")
        self.method = method
        self.alpha = float(alpha)
        self.n_singular = n_singular
        self._planes = {
            "x": _Plane(rx, gains_x or FeedbackGains()),
            "y": _Plane(ry, gains_y or FeedbackGains()),
        }
        self._scale = {p: float(np.linalg.norm(pl.response, 2)) for p, pl in self._planes.items()}

    @property
    def nbpm(self) -> int:
        """Number of BPMs (rows of each block)."""
        return self._planes["x"].response.shape[0]

    def gains(self, plane: str) -> FeedbackGains:
        """The gains of ``plane`` (``"x"`` or ``"y"``)."""
        return self._planes[plane].gains

    def set_gains(self, plane: str, gains: FeedbackGains) -> None:
        """Change the gains of ``plane``; the next step uses them."""
        self._planes[plane].gains = gains

    def reset(self) -> None:
        """Forget the previous error (after a pause): the next step is a pure integral step."""
        for pl in self._planes.values():
            pl.previous = None

    def inverse(self, plane: str, bpm_mask: np.ndarray, corrector_mask: np.ndarray) -> np.ndarray:
        """The regularised inverse ``K`` of ``plane`` for these masks (True: used), cached."""
        pl = self._planes[plane]
        key = (np.packbits(bpm_mask).tobytes(), np.packbits(corrector_mask).tobytes())
        if key not in pl.cache:
            if len(pl.cache) >= _MAX_CACHED:
                pl.cache.pop(next(iter(pl.cache)))
            n_sv = self.n_singular[_PLANES.index(plane)]
            if self.method == "tikhonov":
                pl.cache[key] = correction_matrix(
                    pl.response,
                    method="tikhonov",
                    alpha=self.alpha * self._scale[plane],
                    n_singular=n_sv,
                    bpm_weights=bpm_mask.astype(float),
                    corrector_weights=corrector_mask.astype(float),
                )
            else:
                pl.cache[key] = correction_matrix(
                    pl.response,
                    method="svd",
                    n_singular=n_sv,
                    bpm_weights=bpm_mask.astype(float),
                    corrector_weights=corrector_mask.astype(float),
                )
        return pl.cache[key]

    def step(
        self,
        orbit: tuple[np.ndarray, np.ndarray],
        reference: tuple[np.ndarray, np.ndarray],
        *,
        bpm_mask: np.ndarray | None = None,
        corrector_masks: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
    ) -> FeedbackStep:
        """One feedback iteration: the kick changes for this orbit.

        Args:
            orbit: ``(x, y)`` orbit readings [m], (nbpm,) each; NaN marks an invalid reading.
            reference: ``(x, y)`` reference orbit [m].
            bpm_mask: (nbpm,) BPMs that may be used (True); invalid (NaN) readings are dropped
                on top of it.
            corrector_masks: ``(h, v)`` correctors that may move (True); default all.

        Raises:
            ValueError: no usable BPM left, or wrong shapes.
        """
        n = self.nbpm
        x, y = (np.asarray(v, float).reshape(-1) for v in orbit)
        rx, ry = (np.asarray(v, float).reshape(-1) for v in reference)
        if not all(v.size == n for v in (x, y, rx, ry)):
            raise ValueError(f"orbit and reference must have {n} BPMs per plane")
        used = np.ones(n, bool) if bpm_mask is None else np.asarray(bpm_mask, bool).copy()
        used &= np.isfinite(x) & np.isfinite(y) & np.isfinite(rx) & np.isfinite(ry)
        if not used.any():
            raise ValueError("no usable BPM: every BPM is excluded or reads NaN")
        out: list[np.ndarray] = []
        rms: list[float] = []
        for plane, (o, r), cmask in zip(_PLANES, ((x, rx), (y, ry)), corrector_masks, strict=True):
            pl = self._planes[plane]
            ncorr = pl.response.shape[1]
            cm = np.ones(ncorr, bool) if cmask is None else np.asarray(cmask, bool)
            if cm.size != ncorr:
                raise ValueError(f"{plane} corrector mask has {cm.size} entries, not {ncorr}")
            error = np.where(used, o - r, 0.0)
            rms.append(float(np.sqrt(np.mean(error[used] ** 2))))
            if not cm.any():
                out.append(np.zeros(ncorr))
                pl.previous = None
                continue
            key = (np.packbits(used).tobytes(), np.packbits(cm).tobytes())
            u = self.inverse(plane, used, cm) @ error
            g = pl.gains
            delta = -g.ki * u
            if g.kp and pl.previous is not None and pl.previous_key == key:
                delta -= g.kp * (u - pl.previous)
            pl.previous, pl.previous_key = u, key
            out.append(np.where(cm, delta, 0.0))
        return FeedbackStep(out[0], out[1], (rms[0], rms[1]), used)
