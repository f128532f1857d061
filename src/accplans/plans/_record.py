"""A plan-level Readable: records values a plan computed or took (a step, a frame) as an event."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from bluesky.protocols import Reading
from event_model import DataKey

__all__ = ["Record"]


def _data_key(value: Any, unit: str, source: str) -> DataKey:
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        return {"source": source, "dtype": "string", "shape": list(arr.shape), "units": unit}
    dtype = "integer" if arr.dtype.kind in "iub" else "number"
    if arr.ndim:
        return {
            "source": source,
            "dtype": "array",
            "shape": list(arr.shape),
            "units": unit,
            "dtype_numpy": arr.dtype.str,
        }
    return {"source": source, "dtype": dtype, "shape": [], "units": unit}


class Record:
    """Values recorded under one name (``<name>-<key>`` data keys), with their units.

    bluesky wants the same objects read in every event of a stream: make one ``Record`` per
    stream and :meth:`update` it before each read.

    Args:
        name: prefix of the data keys.
        values: key -> value (scalars, numpy arrays, strings).
        units: key -> unit (SI); keys without a unit are dimensionless.
        source: where the values come from (goes into each data key).
    """

    parent = None

    def __init__(
        self,
        name: str,
        values: Mapping[str, Any],
        units: Mapping[str, str] | None = None,
        source: str = "accplans",
    ) -> None:
        self.name = name
        self._values = dict(values)
        self._units = dict(units or {})
        self._source = source
        self._time = time.time()

    def update(self, **values: Any) -> Record:
        """Replace values (same keys, shapes and types as the first ones) and stamp them now."""
        unknown = set(values) - set(self._values)
        if unknown:
            raise KeyError(f"record {self.name}: unknown keys {sorted(unknown)}")
        self._values.update(values)
        self._time = time.time()
        return self

    def describe(self) -> dict[str, DataKey]:
        """Data keys of the values."""
        return {
            f"{self.name}-{k}": _data_key(v, self._units.get(k, ""), self._source)
            for k, v in self._values.items()
        }

    def read(self) -> dict[str, Reading]:
        """The values, all with the time the record was made."""
        out: dict[str, Reading] = {}
        for k, v in self._values.items():
            value = v.tolist() if isinstance(v, np.ndarray) and v.dtype.kind in "US" else v
            out[f"{self.name}-{k}"] = {"value": value, "timestamp": self._time}
        return out
