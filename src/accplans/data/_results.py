"""Versioned results: schemas, a Readable that records a result in a run, and ``load_result``.

A result (an orbit response matrix, an averaged orbit, later BPM offsets, a LOCO fit, a snapshot)
is recorded *in the run that produced it*, through the RunEngine, as a one-event stream named
``result_<kind>``, so it goes through the same writer as the raw data::

    yield from bps.create("result_orm")
    yield from bps.read(ResultReadable("orm", matrix=m, bpm_names=..., ...))
    yield from bps.save()

(:func:`record_result` does exactly this.) Each field is one event data key ``<name>_<field>``
whose descriptor entry carries its unit (``units``), its symbolic dimensions (``dims``), the
result field it holds (``result_field``) and the schema version; the kind and schema version
are also in the stream's configuration. String fields (device names) are stored as one JSON string
each (Tiled stores string arrays only as zarr fixed-width unicode, which has no zarr v3
specification); they load back as ``list[str]``.

:func:`load_result` reads one back as a :class:`Result` and refuses a schema version it does not
know. A run holds at most one result of each kind (bluesky reads one set of objects per stream).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

import numpy as np
from bluesky import plan_stubs as bps
from bluesky.protocols import Reading
from bluesky.utils import Msg
from event_model.documents.event_descriptor import DataKey

from ._read import open_run

__all__ = [
    "RESULT_KINDS",
    "FieldSpec",
    "Result",
    "ResultError",
    "ResultReadable",
    "ResultSchema",
    "load_result",
    "record_result",
    "register_result_kind",
    "result_schema",
    "result_stream_name",
]

FieldDtype = Literal["float", "int", "bool", "str"]

_DIM_RE = re.compile(r"^(?:(\d+)\s*\*\s*)?([A-Za-z_]\w*)$")


class ResultError(LookupError):
    """A result is missing, of an unknown kind, or of a schema version this code cannot read."""


class FieldSpec(NamedTuple):
    """One field of a result schema.

    Attributes:
        unit: Physical unit (SI), ``""`` for dimensionless values, names and masks.
        dims: Symbolic shape, e.g. ``"(2*nbpm, ncorr)"``, ``"(nbpm,)"`` or ``"()"`` for a scalar.
            Every symbol must take one size across the fields of a result.
        dtype: ``"float"`` (float64), ``"int"`` (int64), ``"bool"`` or ``"str"``.
        optional: The field may be omitted; an omitted float field is stored as NaN and loads
            back as ``None``.
        choices: Allowed values of a ``"str"`` field (empty: any string).
    """

    unit: str
    dims: str
    dtype: FieldDtype = "float"
    optional: bool = False
    choices: tuple[str, ...] = ()


def _parse_dims(dims: str) -> tuple[tuple[int, str | None], ...]:
    """Parse ``"(2*nbpm, ncorr)"`` into ``((2, "nbpm"), (1, "ncorr"))`` (``"3"``: ``(3, None)``)."""
    inner = dims.strip()
    if not (inner.startswith("(") and inner.endswith(")")):
        raise ValueError(f"dims {dims!r} must be a parenthesized tuple such as '(nbpm,)'")
    out: list[tuple[int, str | None]] = []
    for token in (t.strip() for t in inner[1:-1].split(",")):
        if not token:
            continue
        if token.isdigit():
            out.append((int(token), None))
            continue
        match = _DIM_RE.match(token)
        if match is None:
            raise ValueError(f"dims {dims!r}: cannot parse {token!r} (use 'name' or 'k*name')")
        out.append((int(match.group(1) or 1), match.group(2)))
    return tuple(out)


@dataclass(frozen=True)
class ResultSchema:
    """The schema of one kind of result.

    Attributes:
        kind: Name of the kind (``"orm"``); the result is stored in the stream ``result_<kind>``.
        version: Schema version, stored with every result. Bump it whenever a field changes
            meaning, unit or shape; :func:`load_result` refuses versions it does not know.
        fields: Field name -> :class:`FieldSpec` (a plain ``(unit, dims)`` tuple is accepted).
        description: What the result is, for users.
        check: Extra validation of the (already shape-checked) values; raise ``ValueError``.
    """

    kind: str
    version: int
    fields: Mapping[str, FieldSpec]
    description: str = ""
    check: Callable[[Mapping[str, Any]], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z][a-z0-9_]*$", self.kind):
            raise ValueError(f"result kind {self.kind!r} must be lower_snake_case")
        fields = {n: FieldSpec(*spec) for n, spec in self.fields.items()}
        for name, spec in fields.items():
            try:
                _parse_dims(spec.dims)
            except ValueError as exc:
                raise ValueError(f"result kind {self.kind!r}, field {name!r}: {exc}") from None
            if spec.optional and spec.dtype != "float":
                raise ValueError(
                    f"result kind {self.kind!r}, field {name!r}: only float fields may be "
                    "optional (an omitted one is stored as NaN)"
                )
        object.__setattr__(self, "fields", fields)

    def units(self) -> dict[str, str]:
        """Unit of every field."""
        return {name: spec.unit for name, spec in self.fields.items()}

    def validate(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check ``values`` against the schema and return them as numpy arrays.

        Args:
            values: Field name -> value (array-like, list of strings, scalar).

        Returns:
            Every field of the schema as a numpy array (unicode arrays for strings; omitted
            optional float fields filled with NaN).

        Raises:
            ValueError: A field is missing, unknown, of the wrong type or shape, or a string is
                not one of the allowed choices; the message names the kind and the field.
        """
        where = f"result {self.kind!r} (schema v{self.version})"
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; fields: {list(self.fields)}")
        missing = [n for n, s in self.fields.items() if n not in values and not s.optional]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        arrays: dict[str, np.ndarray] = {}
        for name, spec in self.fields.items():
            if name in values and values[name] is not None:
                arrays[name] = _as_array(where, name, spec, values[name])
        sizes, source = self._bind_sizes(where, arrays)
        for name, spec in self.fields.items():
            expected = tuple(k * sizes[s] if s else k for k, s in _parse_dims(spec.dims))
            if name not in arrays:
                arrays[name] = np.full(expected, np.nan)
            elif arrays[name].shape != expected:
                bound = ", ".join(f"{s}={v} from {source[s]!r}" for s, v in sizes.items())
                raise ValueError(
                    f"{where}: field {name!r} has shape {arrays[name].shape}, expected "
                    f"{spec.dims} = {expected} ({bound})"
                )
            if spec.choices:
                bad = sorted({str(v) for v in arrays[name].ravel()} - set(spec.choices))
                if bad:
                    raise ValueError(
                        f"{where}: field {name!r} has values {bad[:5]}; allowed: {spec.choices}"
                    )
        if self.check is not None:
            try:
                self.check(arrays)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return {name: arrays[name] for name in self.fields}

    def _bind_sizes(
        self, where: str, arrays: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Size each dimension symbol from the fields present (plain symbols first).

        Returns:
            Symbol -> size, and symbol -> the field that gave it.
        """
        sizes: dict[str, int] = {}
        source: dict[str, str] = {}
        parsed = {n: _parse_dims(s.dims) for n, s in self.fields.items()}
        for name, dims in parsed.items():
            if name in arrays and len(dims) != arrays[name].ndim:
                raise ValueError(
                    f"{where}: field {name!r} has {arrays[name].ndim} dimension(s) "
                    f"{arrays[name].shape}, expected {self.fields[name].dims}"
                )
        order = sorted(
            (
                (n, axis, k, s)
                for n, dims in parsed.items()
                if n in arrays
                for axis, (k, s) in enumerate(dims)
                if s
            ),
            key=lambda item: item[2] != 1,
        )
        for name, axis, k, symbol in order:
            if symbol in sizes:
                continue
            length = arrays[name].shape[axis]
            if length % k:
                raise ValueError(
                    f"{where}: field {name!r} axis {axis} has length {length}, "
                    f"not a multiple of {k} ({self.fields[name].dims})"
                )
            sizes[symbol], source[symbol] = length // k, name
        unbound = sorted({s for dims in parsed.values() for _, s in dims if s} - set(sizes))
        if unbound:
            raise ValueError(f"{where}: cannot size {unbound}: no field present gives them")
        return sizes, source


def _as_array(where: str, name: str, spec: FieldSpec, value: Any) -> np.ndarray:
    """Convert one field value to a numpy array of the schema's dtype."""
    try:
        if spec.dtype == "str":
            items = np.asarray(value)
            if items.dtype.kind not in "UO" or (
                items.dtype.kind == "O" and not all(isinstance(v, str) for v in items.ravel())
            ):
                raise TypeError(f"expected strings, got {items.dtype}")
            arr = items.astype(str)
        elif spec.dtype == "bool":
            arr = np.asarray(value)
            if arr.dtype.kind != "b":
                raise TypeError(f"expected booleans, got {arr.dtype}")
        elif spec.dtype == "int":
            arr = np.asarray(value)
            if arr.dtype.kind not in "iu":
                raise TypeError(f"expected integers, got {arr.dtype}")
            arr = arr.astype(np.int64)
        else:
            arr = np.asarray(value)
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"expected real numbers, got {arr.dtype}")
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: field {name!r}: {exc}") from None
    return arr


def _check_orm(values: Mapping[str, Any]) -> None:
    if not np.all(np.isfinite(values["kicks"])) or np.any(values["kicks"] == 0):
        raise ValueError("'kicks' must be finite and non-zero")
    if np.any(values["noise"][values["valid"]] < 0):
        raise ValueError("'noise' must be >= 0 where valid")


def _check_orbit(values: Mapping[str, Any]) -> None:
    if int(values["n_samples"]) < 1:
        raise ValueError("'n_samples' must be >= 1")


#: Registered result kinds, by kind (the current version of each).
RESULT_KINDS: dict[str, ResultSchema] = {}


def register_result_kind(schema: ResultSchema) -> ResultSchema:
    """Register a result kind (later issues add BPM offsets, LOCO fits, snapshots, ...).

    Raises:
        ValueError: Another schema is registered under the same kind.
    """
    old = RESULT_KINDS.get(schema.kind)
    if old is not None and old != schema:
        raise ValueError(f"result kind {schema.kind!r} is already registered (v{old.version})")
    RESULT_KINDS[schema.kind] = schema
    return schema


register_result_kind(
    ResultSchema(
        kind="orm",
        version=1,
        description=(
            "Orbit response matrix, all four blocks: rows are the BPMs' x then y readings "
            "(BPM family order), columns the correctors of both planes (in the order given); "
            "rf_column is the orbit response to the RF frequency."
        ),
        fields={
            "matrix": FieldSpec("m/rad", "(2*nbpm, ncorr)"),
            "rf_column": FieldSpec("m/Hz", "(2*nbpm,)", optional=True),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "corrector_names": FieldSpec("", "(ncorr,)", "str"),
            "corrector_planes": FieldSpec("", "(ncorr,)", "str", choices=("h", "v")),
            "kicks": FieldSpec("rad", "(ncorr,)"),
            "noise": FieldSpec("m/rad", "(2*nbpm, ncorr)"),
            "valid": FieldSpec("", "(2*nbpm, ncorr)", "bool"),
            "n_frames": FieldSpec("", "()", optional=True),
        },
        check=_check_orm,
    )
)

register_result_kind(
    ResultSchema(
        kind="orbit",
        version=1,
        description="Averaged closed orbit at the BPMs and its per-BPM standard deviation.",
        fields={
            "x": FieldSpec("m", "(nbpm,)"),
            "y": FieldSpec("m", "(nbpm,)"),
            "std_x": FieldSpec("m", "(nbpm,)"),
            "std_y": FieldSpec("m", "(nbpm,)"),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "n_samples": FieldSpec("", "()", "int"),
        },
        check=_check_orbit,
    )
)


def _check_dispersion(values: Mapping[str, Any]) -> None:
    dp = np.asarray(values["dp"], float)
    if not np.all(np.isfinite(dp)) or np.unique(dp).size < 2:
        raise ValueError("'dp' must be finite with at least two distinct values")


register_result_kind(
    ResultSchema(
        kind="dispersion",
        version=1,
        description=(
            "Dispersion at the BPMs as they read it, d orbit / d(dp/p), from an RF-frequency "
            "scan: a fit per BPM through the orbits measured at the momentum offsets dp."
        ),
        fields={
            "dx": FieldSpec("m", "(nbpm,)"),
            "dy": FieldSpec("m", "(nbpm,)"),
            "std_dx": FieldSpec("m", "(nbpm,)"),
            "std_dy": FieldSpec("m", "(nbpm,)"),
            "dx2": FieldSpec("m", "(nbpm,)", optional=True),
            "dy2": FieldSpec("m", "(nbpm,)", optional=True),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "dp": FieldSpec("", "(npoints,)"),
            "rf_steps": FieldSpec("Hz", "(npoints,)"),
            "rf_frequency": FieldSpec("Hz", "()"),
            "alpha_c": FieldSpec("", "()"),
        },
        check=_check_dispersion,
    )
)


def _check_tunes(values: Mapping[str, Any]) -> None:
    tunes = np.asarray(values["tunes"], float)
    if tunes.shape != (2,) or not np.all(np.isfinite(tunes)):
        raise ValueError("'tunes' must be two finite fractional tunes (x, y)")


register_result_kind(
    ResultSchema(
        kind="tunes",
        version=1,
        description=(
            "Fractional betatron tunes (x, y) averaged over n_samples readings (plans "
            "measure_tunes, correct_tunes), with the spread of one reading and of the mean."
        ),
        fields={
            "tunes": FieldSpec("", "(plane,)"),
            "std": FieldSpec("", "(plane,)"),
            "std_mean": FieldSpec("", "(plane,)"),
            "n_samples": FieldSpec("", "()", "int"),
            "method": FieldSpec("", "()", "str", choices=("monitor", "tbt")),
            "target": FieldSpec("", "(plane,)", optional=True),
        },
        check=_check_tunes,
    )
)


def _check_chromaticity(values: Mapping[str, Any]) -> None:
    dp = np.asarray(values["dp"], float)
    if not np.all(np.isfinite(dp)) or np.unique(dp).size < 2:
        raise ValueError("'dp' must be finite with at least two distinct values")


register_result_kind(
    ResultSchema(
        kind="chromaticity",
        version=1,
        description=(
            "Unnormalized chromaticity xi = dQ/d(dp/p) (x, y) from the tunes measured along an "
            "RF-frequency scan: 'chromaticity' is the fit of order 'order'; the linear and "
            "quadratic fits Q = q0 + xi dp (+ xi2 dp^2) are both kept with their standard errors "
            "(from the residuals)."
        ),
        fields={
            "chromaticity": FieldSpec("", "(plane,)"),
            "std_chromaticity": FieldSpec("", "(plane,)"),
            "order": FieldSpec("", "()", "int"),
            "linear": FieldSpec("", "(plane,)"),
            "std_linear": FieldSpec("", "(plane,)"),
            "quadratic": FieldSpec("", "(plane,)", optional=True),
            "std_quadratic": FieldSpec("", "(plane,)", optional=True),
            "second_order": FieldSpec("", "(plane,)", optional=True),
            "std_second_order": FieldSpec("", "(plane,)", optional=True),
            "tunes_at_zero": FieldSpec("", "(plane,)"),
            "dp": FieldSpec("", "(npoints,)"),
            "tunes_x": FieldSpec("", "(npoints,)"),
            "tunes_y": FieldSpec("", "(npoints,)"),
            "rf_steps": FieldSpec("Hz", "(npoints,)"),
            "rf_frequency": FieldSpec("Hz", "()"),
            "alpha_c": FieldSpec("", "()"),
            "target": FieldSpec("", "(plane,)", optional=True),
        },
        check=_check_chromaticity,
    )
)


def _check_coupling(values: Mapping[str, Any]) -> None:
    v = float(values["c_minus_model"])
    if not np.isfinite(v) or v < 0:
        raise ValueError("'c_minus_model' must be finite and >= 0")


register_result_kind(
    ResultSchema(
        kind="coupling",
        version=1,
        description=(
            "Linear coupling from the off-diagonal ORM blocks and the vertical dispersion "
            "(plans measure_coupling, correct_coupling): the skew strength changes that cancel "
            "it (fit on the online model's response to the skew windings, BPM rolls fitted "
            "too), |C-| of the model with the fitted coupling and after the change, and what "
            "the emittance and tune monitors read."
        ),
        fields={
            "skew_names": FieldSpec("", "(nskew,)", "str"),
            "skew_strengths": FieldSpec("m^-2", "(nskew,)"),
            "skew_change": FieldSpec("m^-2", "(nskew,)"),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "bpm_roll": FieldSpec("rad", "(nbpm,)"),
            "dy": FieldSpec("m", "(nbpm,)"),
            "corrector_names": FieldSpec("", "(ncorr,)", "str"),
            "coupling_rms": FieldSpec("m/rad", "()"),
            "residual_rms": FieldSpec("m/rad", "()"),
            "c_minus_model": FieldSpec("", "()"),
            "dispersion_weight": FieldSpec("1/rad", "()"),
            "emittance_x": FieldSpec("m", "()", optional=True),
            "emittance_y": FieldSpec("m", "()", optional=True),
            "emittance_ratio": FieldSpec("", "()", optional=True),
            "tune_x": FieldSpec("", "()", optional=True),
            "tune_y": FieldSpec("", "()", optional=True),
        },
        check=_check_coupling,
    )
)


def result_schema(kind: str) -> ResultSchema:
    """The registered schema of ``kind``.

    Raises:
        ResultError: ``kind`` is not registered (the message lists the known kinds).
    """
    try:
        return RESULT_KINDS[kind]
    except KeyError:
        raise ResultError(
            f"unknown result kind {kind!r}; known kinds: {sorted(RESULT_KINDS)}"
        ) from None


def result_stream_name(kind: str) -> str:
    """Name of the stream holding a result of ``kind``: ``result_<kind>``."""
    return f"result_{kind}"


_JSON_DTYPE = {"f": "number", "i": "integer", "u": "integer", "b": "boolean", "U": "string"}


class ResultReadable:
    """One result as a bluesky ``Readable`` (and ``Configurable``), validated on creation.

    Args:
        kind: A registered result kind (``"orm"``, ``"orbit"``, ...).
        name: Object name; data keys are ``<name>_<field>``. Defaults to ``kind``.
        **fields: The result's fields, in SI units (see ``RESULT_KINDS[kind].fields``).

    Raises:
        ResultError: ``kind`` is not registered.
        ValueError: A field is missing, unknown or of the wrong type or shape.

    Example:
        ``yield from record_result("orbit", x=x, y=y, std_x=sx, std_y=sy,
        bpm_names=names, n_samples=10)``
    """

    def __init__(self, kind: str, *, name: str | None = None, **fields: Any) -> None:
        self.schema = result_schema(kind)
        self._name = name or kind
        self.values = self.schema.validate(fields)
        self._timestamp = time.time()

    @property
    def name(self) -> str:
        """Object name (prefix of the data keys)."""
        return self._name

    @property
    def parent(self) -> None:
        """A result has no parent device."""
        return None

    @property
    def kind(self) -> str:
        """The result kind."""
        return self.schema.kind

    def _key(self, field_name: str) -> str:
        return f"{self._name}_{field_name}"

    def describe(self) -> dict[str, DataKey]:
        """Data keys: one per field, with unit, symbolic dims, field name and schema version."""
        out: dict[str, DataKey] = {}
        for fname, spec in self.schema.fields.items():
            arr = self.values[fname]
            key: dict[str, Any] = {
                "source": f"accplans:result:{self.kind}:v{self.schema.version}",
                "dtype": "array" if arr.ndim else _JSON_DTYPE[arr.dtype.kind],
                "dtype_numpy": arr.dtype.str,
                "shape": list(arr.shape),
                "dims": [f"{k}*{s}" if k != 1 else str(s) for k, s in _parse_dims(spec.dims)],
                "units": spec.unit,
                "result_kind": self.kind,
                "result_field": fname,
                "schema_version": self.schema.version,
            }
            if spec.dtype == "str":
                # Stored as one JSON string: Tiled keeps string arrays only as zarr fixed-width
                # unicode, which has no zarr v3 specification (zarr warns it may become
                # unreadable).
                key.update(dtype="string", dtype_numpy="<U0", shape=[], result_encoding="json")
                key["result_shape"] = list(arr.shape)
            out[self._key(fname)] = cast(DataKey, key)
        return out

    def _value(self, fname: str) -> Any:
        arr = self.values[fname]
        if self.schema.fields[fname].dtype == "str":
            return json.dumps(arr.tolist())
        return arr if arr.ndim else arr.item()

    def read(self) -> dict[str, Reading[Any]]:
        """The values (numpy arrays, scalars as Python numbers, strings as JSON), one timestamp."""
        return {
            self._key(fname): {"value": self._value(fname), "timestamp": self._timestamp}
            for fname in self.values
        }

    def describe_configuration(self) -> dict[str, DataKey]:
        """Configuration keys: the result kind and its schema version."""
        source = f"accplans:result:{self.kind}"
        return {
            self._key("result_kind"): {"source": source, "dtype": "string", "shape": []},
            self._key("schema_version"): {"source": source, "dtype": "integer", "shape": []},
        }

    def read_configuration(self) -> dict[str, Reading[Any]]:
        """The result kind and its schema version."""
        return {
            self._key("result_kind"): {"value": self.kind, "timestamp": self._timestamp},
            self._key("schema_version"): {
                "value": self.schema.version,
                "timestamp": self._timestamp,
            },
        }

    def __repr__(self) -> str:
        return f"ResultReadable({self.kind!r}, name={self._name!r})"


def record_result(
    kind: str, *, name: str | None = None, **fields: Any
) -> Generator[Msg, Any, ResultReadable]:
    """Plan stub: record a result in the open run as the one-event stream ``result_<kind>``.

    Args:
        kind: A registered result kind.
        name: Object name (data key prefix); defaults to ``kind``.
        **fields: The result's fields (SI units), validated before anything is emitted.

    Returns:
        The :class:`ResultReadable` that was read.
    """
    readable = ResultReadable(kind, name=name, **fields)
    yield from bps.create(result_stream_name(kind))
    yield from bps.read(readable)
    yield from bps.save()
    return readable


@dataclass(frozen=True)
class Result:
    """A result loaded back from a run.

    Attributes:
        kind: The result kind.
        version: Its schema version.
        uid: The uid of the run that recorded it.
        data: Field -> value: numpy arrays (SI units, see ``metadata["units"]``), ``list[str]``
            for string fields, Python scalars for 0-d fields, ``None`` for an omitted optional
            field.
        metadata: ``units`` and ``dims`` of every field, the ``time`` the result was recorded
            (s since the epoch), the run's ``start`` document.
    """

    kind: str
    version: int
    uid: str
    data: dict[str, Any]
    metadata: dict[str, Any]

    def __getitem__(self, field_name: str) -> Any:
        """The value of one field."""
        try:
            return self.data[field_name]
        except KeyError:
            raise KeyError(
                f"result {self.kind!r} has no field {field_name!r}; fields: {list(self.data)}"
            ) from None


def _iter_result_keys(data_keys: Mapping[str, Any], kind: str) -> Iterator[tuple[str, str, Any]]:
    for key, dk in data_keys.items():
        if dk.get("result_kind") == kind and "result_field" in dk:
            yield key, dk["result_field"], dk


def load_result(container: Any, uid: str, kind: str) -> Result:
    """Load the result of ``kind`` recorded in run ``uid``.

    Args:
        container: The Tiled container holding the runs (where the writer wrote them).
        uid: The run's uid.
        kind: The result kind (``"orm"``, ``"orbit"``, ...). A run holds at most one result of
            each kind (bluesky reads one object set per stream).

    Returns:
        The result, values in SI units.

    Raises:
        ResultError: The kind is unknown, the run does not exist or has no such result, or the
            result's schema version is not one this code knows.
    """
    schema = result_schema(kind)
    try:
        run = open_run(container, uid)
    except KeyError as exc:
        raise ResultError(str(exc.args[0]) if exc.args else str(exc)) from None
    stream = result_stream_name(kind)
    streams = list(run)
    if stream not in streams:
        results = [s for s in streams if s.startswith("result_")]
        raise ResultError(
            f"run {uid} has no {kind!r} result (no stream {stream!r}); "
            f"its results: {results or 'none'}"
        )
    node = run[stream]
    md = dict(node.metadata)
    fields = list(_iter_result_keys(md.get("data_keys", {}), kind))
    if not fields:
        raise ResultError(f"run {uid}: stream {stream!r} holds no {kind!r} result fields")
    versions = {int(dk.get("schema_version", -1)) for _, _, dk in fields}
    if versions != {schema.version}:
        raise ResultError(
            f"run {uid}: {kind!r} result has schema version {sorted(versions)}; this accplans "
            f"reads version {schema.version} only"
        )
    ds = node.read()
    if int(ds.sizes.get("time", 0)) < 1:
        raise ResultError(f"run {uid}: stream {stream!r} has no event (the result was not saved)")
    index = -1
    data: dict[str, Any] = {}
    dims: dict[str, list[str]] = {}
    for key, fname, dk in fields:
        if fname not in schema.fields:
            raise ResultError(f"run {uid}: {kind!r} v{schema.version} has no field {fname!r}")
        data[fname] = _decode(schema.fields[fname], dk, np.asarray(ds[key].values[index]))
        dims[fname] = list(dk.get("dims", []))
    missing = [f for f, s in schema.fields.items() if f not in data and not s.optional]
    if missing:
        raise ResultError(f"run {uid}: {kind!r} result lacks field(s) {missing}")
    times = np.asarray(ds["time"].values) if "time" in ds.coords else None
    return Result(
        kind=kind,
        version=schema.version,
        uid=uid,
        data={f: data.get(f) for f in schema.fields},
        metadata={
            "units": schema.units(),
            "dims": dims,
            "time": float(times[index]) if times is not None else math.nan,
            "start": dict(run.metadata.get("start", {})),
        },
    )


def _decode(spec: FieldSpec, data_key: Mapping[str, Any], value: np.ndarray) -> Any:
    """Turn a stored value back into what was recorded (shape from the descriptor)."""
    if spec.dtype == "str":
        if data_key.get("result_encoding") == "json":
            return json.loads(str(np.asarray(value).item()))
        strings = np.asarray(value).astype(str).reshape(tuple(data_key.get("shape") or ()))
        return strings.tolist() if strings.ndim else str(strings.item())
    shape = tuple(data_key.get("shape") or ())
    dtype = {"float": np.float64, "int": np.int64, "bool": np.bool_}[spec.dtype]
    arr = np.asarray(value).astype(dtype).reshape(shape)
    if not shape:
        return arr.item()
    if spec.optional and spec.dtype == "float" and np.all(np.isnan(arr)):
        return None
    return arr
