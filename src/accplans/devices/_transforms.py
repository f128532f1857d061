"""Shared ophyd-async ``Transform`` classes for the devices' derived signals.

ophyd-async's ``derived_signal_r``/``derived_signal_rw`` helpers build a new pydantic
``Transform`` class per signal (~0.4 ms each: 1.5 s for the ~3700 signals of an EBS-size
machine). These shared classes take their parameters as constants instead, so building a
machine creates no classes. (No ``from __future__ import annotations`` here: ophyd-async
inspects these signatures for every signal, and real annotations need no ``eval``.)
"""

from functools import cache

from ophyd_async.core import Transform
from pydantic import TypeAdapter

from accplans.config import Calibration

__all__ = ["CalibrationTransform", "NonZeroTransform", "ScaleTransform"]

_CALIBRATION: TypeAdapter[Calibration] = TypeAdapter(Calibration)


@cache
def _calibration(json_text: str) -> Calibration:
    return _CALIBRATION.validate_json(json_text)


class CalibrationTransform(Transform):
    """``raw`` (hardware value) <-> ``value`` (strength, SI) through a calibration (JSON)."""

    calibration: str

    def raw_to_derived(self, *, raw: float) -> dict[str, float]:
        """Hardware -> SI."""
        return {"value": float(_calibration(self.calibration).to_strength(raw))}

    def derived_to_raw(self, *, value: float) -> dict[str, float]:
        """SI -> hardware."""
        return {"raw": float(_calibration(self.calibration).to_hardware(value))}


class ScaleTransform(Transform):
    """``value = raw * scale`` (e.g. mm -> m)."""

    scale: float

    def raw_to_derived(self, *, raw: float) -> dict[str, float]:
        """The scaled value."""
        return {"value": raw * self.scale}


class NonZeroTransform(Transform):
    """``value = raw != 0``: an integer flag as a bool."""

    def raw_to_derived(self, *, raw: int) -> dict[str, bool]:
        """The flag."""
        return {"value": bool(raw)}
