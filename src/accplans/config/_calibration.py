"""Calibrations: hardware value (A, Hz, mm) <-> physics strength (SI, pyAT's units).

Every calibration maps a hardware value ``h`` (what a PV carries) to a strength ``s`` (what the
lattice element holds: rad for kicks, m^-2 for K1, m^-3 for K2, Hz, V, m). Scalar calibrations
belong to one device; a :class:`CrosstalkSpec` couples the channels that share one element.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Calibration",
    "CrosstalkSpec",
    "LinearCalibration",
    "PolynomialCalibration",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinearCalibration(_Strict):
    """``strength = gain * hardware + offset``."""

    type: Literal["linear"] = "linear"
    gain: float = Field(description="strength per hardware unit (e.g. rad/A)")
    offset: float = Field(default=0.0, description="strength at zero hardware value")

    @field_validator("gain")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0.0 or not np.isfinite(v):
            raise ValueError("gain must be finite and non-zero, or the magnet cannot be set")
        return v

    def to_strength(self, hardware):
        """Hardware value(s) -> strength(s)."""
        return self.gain * np.asarray(hardware, dtype=float) + self.offset

    def to_hardware(self, strength):
        """Strength(s) -> hardware value(s)."""
        return (np.asarray(strength, dtype=float) - self.offset) / self.gain

    def slope(self, hardware):
        """D strength / d hardware at ``hardware``."""
        return np.full_like(np.asarray(hardware, dtype=float), self.gain)


class PolynomialCalibration(_Strict):
    """``strength = sum_k coefficients[k] * hardware**k``, monotonic over ``valid_range``.

    The inverse is solved by Newton iteration from the linear estimate, to 1e-12 relative; the
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

    def to_strength(self, hardware):
        """Hardware value(s) -> strength(s)."""
        return np.polynomial.polynomial.polyval(
            np.asarray(hardware, dtype=float), self.coefficients
        )

    def slope(self, hardware):
        """D strength / d hardware at ``hardware``."""
        der = np.polynomial.polynomial.polyder(self.coefficients)
        return np.polynomial.polynomial.polyval(np.asarray(hardware, dtype=float), der)

    def to_hardware(self, strength):
        """Strength(s) -> hardware value(s) (Newton iteration)."""
        s = np.asarray(strength, dtype=float)
        h = (s - self.coefficients[0]) / self.coefficients[1]
        for _ in range(50):
            step = (self.to_strength(h) - s) / self.slope(h)
            h = h - step
            if np.all(np.abs(step) <= 1e-13 * np.maximum(1.0, np.abs(h))):
                break
        return h


Calibration = Annotated[LinearCalibration | PolynomialCalibration, Field(discriminator="type")]


class CrosstalkSpec(_Strict):
    """Vector-valued calibration of one multi-channel magnet.

    The devices named here share one lattice element (a sextupole with H, V and skew windings).
    Each device's own calibration gives its *nominal* strength; the strengths the beam sees are
    ``matrix @ nominal`` (dimensionless; identity means no cross-talk). Devices convert with their
    own calibration; the online model and the twin apply the matrix.
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
        return self

    def apply(self, nominal):
        """Nominal strengths (in ``devices`` order) -> strengths seen by the beam."""
        return np.asarray(self.matrix, dtype=float) @ np.asarray(nominal, dtype=float)

    def invert(self, strengths):
        """Strengths seen by the beam -> nominal strengths."""
        return np.linalg.solve(np.asarray(self.matrix, dtype=float), np.asarray(strengths, float))
