"""Calibrations: hardware value (A, Hz, mm) <-> physics strength (SI, pyAT's units).

Every calibration maps a hardware value ``h`` (what a PV carries) to a strength ``s`` (what the
lattice element holds: rad for kicks, m^-2 for K1, m^-3 for K2, Hz, V, m). Scalar calibrations
belong to one device; a :class:`CrosstalkSpec` couples the channels that share one element.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ELECTRON_REST_ENERGY_EV",
    "Calibration",
    "CrosstalkSpec",
    "HysteresisSpec",
    "LinearCalibration",
    "PolynomialCalibration",
    "TableCalibration",
    "magnetic_rigidity",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Speed of light (m/s): ``Brho [T m] = p c [eV] / c``.
SPEED_OF_LIGHT = 299_792_458.0
#: Electron rest energy (eV), the default particle of a description.
ELECTRON_REST_ENERGY_EV = 510_998.950_69


def magnetic_rigidity(energy_ev: float, rest_energy_ev: float = ELECTRON_REST_ENERGY_EV) -> float:
    """Magnetic rigidity ``Brho = p / e`` (T m) of a particle of total energy ``energy_ev``.

    ``p c = sqrt(E^2 - (m c^2)^2)`` in eV, and ``Brho = p / e = (p c [eV]) / c``.

    Args:
        energy_ev: total energy (eV), above the rest energy.
        rest_energy_ev: rest energy ``m c^2`` (eV), the electron's by default.
    """
    if not (np.isfinite(energy_ev) and energy_ev > rest_energy_ev > 0):
        raise ValueError(
            f"beam energy must be finite and above the rest energy {rest_energy_ev:g} eV, "
            f"got {energy_ev!r} eV"
        )
    return float(np.sqrt(energy_ev**2 - rest_energy_ev**2) / SPEED_OF_LIGHT)


class HysteresisSpec(_Strict):
    """Backlash ("play operator") hysteresis of a magnet, used by the twin's true magnets.

    The calibration curve is the *descending* branch (magnets are measured after a
    standardization, approaching each point from above). A current approached from below
    gives the strength of the curve at ``current - width``. Devices never use this: they hold
    no state and convert with the descending branch.
    """

    width: float = Field(gt=0, description="backlash width (hardware units, e.g. A)")

    @field_validator("width")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not np.isfinite(v):
            raise ValueError("hysteresis width must be finite")
        return v


class _CalibrationBase(_Strict):
    """What every calibration has: the curve's quantity, Brho scaling and hysteresis.

    A calibration is a curve ``q = curve(hardware)``. With ``quantity: strength`` (default) the
    curve gives the lattice strength directly. With ``quantity: integrated_field`` it gives the
    integrated multipole field ``int B_n dl`` in T m^(1-n) (T m for a dipole kick, T for a
    quadrupole, T/m for a sextupole), and the strength is ``q / Brho`` for a ``KickAngle``
    field and ``q / (Brho * magnetic_length)`` for a ``PolynomB``/``PolynomA`` field. ``brho``
    (T m) is filled in from the description's ``machine.energy_ev`` when the description is
    validated; a calibration without it cannot convert.
    """

    quantity: Literal["strength", "integrated_field"] = Field(
        default="strength", description="what the curve gives: the strength, or int B_n dl"
    )
    magnetic_length: float | None = Field(
        default=None, gt=0, description="magnetic length (m) of a multipole's integrated field"
    )
    brho: float | None = Field(
        default=None, gt=0, description="magnetic rigidity (T m); set from machine.energy_ev"
    )
    hysteresis: HysteresisSpec | None = Field(
        default=None, description="backlash hysteresis of the true magnet (twin only)"
    )

    @property
    def factor(self) -> float:
        """Strength per curve unit: 1, or ``1 / (brho * magnetic_length)`` (integrated field)."""
        if self.quantity == "strength":
            return 1.0
        if self.brho is None:
            raise ValueError(
                "an integrated_field calibration needs Brho: give machine.energy_ev in the "
                "description"
            )
        return 1.0 / (self.brho * (self.magnetic_length or 1.0))

    def _curve(self, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _curve_slope(self, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _curve_inverse(self, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def curve(self, hardware):
        """Hardware value(s) -> the curve's quantity (strength, or integrated field)."""
        return self._curve(np.asarray(hardware, dtype=float))

    def to_strength(self, hardware):
        """Hardware value(s) -> strength(s) (NaN outside a table's range)."""
        return self.factor * self._curve(np.asarray(hardware, dtype=float))

    def to_hardware(self, strength):
        """Strength(s) -> hardware value(s) (NaN where no hardware value gives it)."""
        return self._curve_inverse(np.asarray(strength, dtype=float) / self.factor)

    def slope(self, hardware):
        """D strength / d hardware at ``hardware``."""
        return self.factor * self._curve_slope(np.asarray(hardware, dtype=float))

    def strength_on_branch(self, effective_hardware):
        """Strength of a true magnet whose backlash state is ``effective_hardware``.

        The twin keeps, per magnet, the output ``y`` of a play operator of half-width
        ``w / 2`` driven by the current (``y`` follows the current, lagging by ``w / 2``:
        ``y = current + w / 2`` on a descending approach, ``current - w / 2`` on an ascending
        one). The strength is the calibration at ``y - w / 2``: exactly the curve on the
        descending branch, the curve at ``current - w`` on the ascending one.
        """
        y = np.asarray(effective_hardware, dtype=float)
        if self.hysteresis is None:
            return self.to_strength(y)
        return self.to_strength(y - 0.5 * self.hysteresis.width)


class LinearCalibration(_CalibrationBase):
    """``curve = gain * hardware + offset``."""

    type: Literal["linear"] = "linear"
    gain: float = Field(description="curve value per hardware unit (e.g. rad/A)")
    offset: float = Field(default=0.0, description="curve value at zero hardware value")

    @field_validator("gain")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0.0 or not np.isfinite(v):
            raise ValueError("gain must be finite and non-zero, or the magnet cannot be set")
        return v

    def _curve(self, h: np.ndarray) -> np.ndarray:
        return self.gain * h + self.offset

    def _curve_slope(self, h: np.ndarray) -> np.ndarray:
        return np.full_like(h, self.gain)

    def _curve_inverse(self, q: np.ndarray) -> np.ndarray:
        return (q - self.offset) / self.gain


class PolynomialCalibration(_CalibrationBase):
    """``curve = sum_k coefficients[k] * hardware**k``, monotonic over ``valid_range``.

    The inverse is solved by Newton iteration from the linear estimate, to 1e-13 relative; the
    polynomial must be monotonic over the valid range (checked at load), so the inverse is unique.
    """

    type: Literal["polynomial"] = "polynomial"
    coefficients: list[float] = Field(min_length=2, description="c0, c1, c2, ... (c1 != 0)")
    valid_range: tuple[float, float] = Field(description="hardware range where it holds")

    @model_validator(mode="after")
    def _monotonic(self) -> PolynomialCalibration:
        lo, hi = self.valid_range
        if not lo < hi:
            raise ValueError(f"valid_range must be increasing, got {self.valid_range}")
        h = np.linspace(lo, hi, 201)
        d = np.polynomial.polynomial.polyval(h, np.polynomial.polynomial.polyder(self.coefficients))
        if not (np.all(d > 0) or np.all(d < 0)):
            raise ValueError("polynomial is not monotonic over valid_range: no unique inverse")
        return self

    def _curve(self, h: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(h, self.coefficients)

    def _curve_slope(self, h: np.ndarray) -> np.ndarray:
        der = np.polynomial.polynomial.polyder(self.coefficients)
        return np.polynomial.polynomial.polyval(h, der)

    def _curve_inverse(self, q: np.ndarray) -> np.ndarray:
        h = (q - self.coefficients[0]) / self.coefficients[1]
        for _ in range(50):
            step = (self._curve(h) - q) / self._curve_slope(h)
            h = h - step
            if np.all(np.abs(step) <= 1e-13 * np.maximum(1.0, np.abs(h))):
                break
        return h


class TableCalibration(_CalibrationBase):
    """A measured table: ``curve`` interpolates (``hardware[k]``, ``values[k]``).

    ``hardware`` must be strictly increasing and ``values`` strictly monotonic, so the curve is
    invertible. ``interpolation: pchip`` (default) is the shape-preserving monotone cubic
    (scipy's ``PchipInterpolator`` slopes, with end slopes kept off zero); ``linear`` is
    piecewise linear. The inverse of ``linear``
    interpolates the swapped table (exact); that of ``pchip`` is found inside the bracketing
    table interval by bisection then Newton, to ~1e-15 relative. Values outside the table
    (hardware beyond its ends, strengths beyond its values) give NaN: a device refuses them
    with a limit error, and the description requires device limits inside the table.
    """

    type: Literal["table"] = "table"
    hardware: list[float] = Field(min_length=2, description="hardware values, increasing")
    values: list[float] = Field(min_length=2, description="curve values, strictly monotonic")
    interpolation: Literal["pchip", "linear"] = "pchip"

    @model_validator(mode="after")
    def _monotonic_table(self) -> TableCalibration:
        h = np.asarray(self.hardware, dtype=float)
        v = np.asarray(self.values, dtype=float)
        if h.shape != v.shape:
            raise ValueError(
                f"table: {h.size} hardware values but {v.size} values (one per hardware value)"
            )
        if not (np.all(np.isfinite(h)) and np.all(np.isfinite(v))):
            raise ValueError("table: every hardware value and value must be finite")
        if not np.all(np.diff(h) > 0):
            raise ValueError("table: hardware values must be strictly increasing")
        dv = np.diff(v)
        if not (np.all(dv > 0) or np.all(dv < 0)):
            raise ValueError("table: values must be strictly monotonic (no unique inverse)")
        return self

    @property
    def hardware_range(self) -> tuple[float, float]:
        """The table's hardware range (low, high)."""
        return self.hardware[0], self.hardware[-1]

    @cached_property
    def _interp(self) -> Any:
        """The pchip curve, its end slopes kept within [1/2, 3] of the end secants.

        Fritsch-Carlson's end formula may give a zero slope at a table end (where the slopes
        of the last two intervals differ much); the curve is then flat there and its inverse
        ill-conditioned. Within [0, 3] secants the curve stays monotonic.
        """
        from scipy.interpolate import CubicHermiteSpline, PchipInterpolator

        h = np.asarray(self.hardware, dtype=float)
        v = np.asarray(self.values, dtype=float)
        d = np.asarray(PchipInterpolator(h, v).derivative()(h), dtype=float)
        for end, (i, j) in ((0, (0, 1)), (-1, (-2, -1))):
            secant = (v[j] - v[i]) / (h[j] - h[i])
            d[end] = np.sign(secant) * np.clip(abs(d[end]), 0.5 * abs(secant), 3 * abs(secant))
        return CubicHermiteSpline(h, v, d, extrapolate=False)

    @cached_property
    def _increasing(self) -> tuple[np.ndarray, np.ndarray]:
        """(values, hardware) with values increasing."""
        v = np.asarray(self.values, dtype=float)
        h = np.asarray(self.hardware, dtype=float)
        return (v, h) if v[-1] > v[0] else (v[::-1].copy(), h[::-1].copy())

    def _curve(self, h: np.ndarray) -> np.ndarray:
        lo, hi = self.hardware[0], self.hardware[-1]
        if self.interpolation == "linear":
            out = np.interp(h, self.hardware, self.values)
        else:
            out = np.asarray(self._interp(h), dtype=float)
        return np.where((h >= lo) & (h <= hi), out, np.nan)

    def _curve_slope(self, h: np.ndarray) -> np.ndarray:
        hw = np.asarray(self.hardware, dtype=float)
        if self.interpolation == "pchip":
            return np.asarray(self._interp.derivative()(h), dtype=float)
        k = np.clip(np.searchsorted(hw, h, side="right") - 1, 0, hw.size - 2)
        v = np.asarray(self.values, dtype=float)
        out = (v[k + 1] - v[k]) / (hw[k + 1] - hw[k])
        return np.where((h >= hw[0]) & (h <= hw[-1]), out, np.nan)

    def _curve_inverse(self, q: np.ndarray) -> np.ndarray:
        v, hw = self._increasing
        eps = 1e-12 * (v[-1] - v[0])  # rounding of the interpolation at the table's ends
        inside = (q >= v[0] - eps) & (q <= v[-1] + eps)
        q = np.clip(q, v[0], v[-1])
        guess = np.interp(q, v, hw)
        if self.interpolation == "linear":
            return np.where(inside, guess, np.nan)
        # bracket: the table interval holding q (pchip is monotone on each interval)
        k = np.clip(np.searchsorted(v, q, side="right") - 1, 0, v.size - 2)
        a = np.minimum(hw[k], hw[k + 1])
        b = np.maximum(hw[k], hw[k + 1])
        qq = np.where(inside, q, v[0])
        rising = self.values[-1] > self.values[0]
        for _ in range(64):  # bisection: 2^-64 of the interval
            mid = 0.5 * (a + b)
            above = self._interp(mid) > qq
            if not rising:
                above = ~above
            b = np.where(above, mid, b)
            a = np.where(above, a, mid)
            if np.all(b - a <= 1e-15 * np.maximum(1.0, np.abs(a))):
                break
        h = 0.5 * (a + b)
        return np.where(inside, h, np.nan)


Calibration = Annotated[
    LinearCalibration | PolynomialCalibration | TableCalibration, Field(discriminator="type")
]


class CrosstalkSpec(_Strict):
    """Vector-valued calibration of one multi-channel magnet.

    The devices named here share one lattice element (a sextupole with H, V and skew windings).
    Each device's own calibration gives its *nominal* strength; the strengths the beam sees are
    ``matrix @ nominal`` (dimensionless; identity means no cross-talk). The online model and the
    twin apply the matrix; a device's ``set`` inverts it for its own channel
    (:meth:`nominal_for`), holding the other channels' currents.
    """

    devices: list[str] = Field(min_length=2)
    matrix: list[list[float]]

    @model_validator(mode="after")
    def _square(self) -> CrosstalkSpec:
        m = np.asarray(self.matrix, dtype=float)
        n = len(self.devices)
        if m.shape != (n, n):
            raise ValueError(f"matrix must be {n}x{n} for {n} devices, got shape {m.shape}")
        if not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 1e-12:
            raise ValueError("matrix must be finite and invertible")
        if len(set(self.devices)) != n:
            raise ValueError(f"crosstalk devices must be distinct, got {self.devices}")
        # every channel subset must be solvable with the others held (set of some channels)
        for mask in range(1, 2**n):
            sel = [k for k in range(n) if mask >> k & 1]
            sub = m[np.ix_(sel, sel)]
            if abs(np.linalg.det(sub)) < 1e-12 * max(1.0, float(np.max(np.abs(sub))) ** len(sel)):
                names = [self.devices[k] for k in sel]
                raise ValueError(
                    f"matrix: channels {names} cannot be set with the others held (singular block)"
                )
        return self

    def apply(self, nominal):
        """Nominal strengths (in ``devices`` order) -> strengths seen by the beam."""
        return np.asarray(self.matrix, dtype=float) @ np.asarray(nominal, dtype=float)

    def invert(self, strengths):
        """Strengths seen by the beam -> nominal strengths."""
        return np.linalg.solve(np.asarray(self.matrix, dtype=float), np.asarray(strengths, float))

    def nominal_for(self, strengths, channels, nominal) -> np.ndarray:
        """Nominal strengths of ``channels`` that make the beam see ``strengths`` on them.

        The other channels keep their nominal strengths (their currents do not change):
        ``M[S, S] n_S = strengths - M[S, O] n_O``.

        Args:
            strengths: the beam strengths wanted on ``channels``.
            channels: positions in :attr:`devices`.
            nominal: present nominal strengths of every channel (``devices`` order); the
                entries of ``channels`` are ignored.
        """
        m = np.asarray(self.matrix, dtype=float)
        sel = [int(c) for c in channels]
        others = [k for k in range(len(self.devices)) if k not in sel]
        n = np.asarray(nominal, dtype=float)
        rhs = np.asarray(strengths, dtype=float) - m[np.ix_(sel, others)] @ n[others]
        return np.linalg.solve(m[np.ix_(sel, sel)], rhs)
