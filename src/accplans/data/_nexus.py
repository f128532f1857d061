"""NeXus/HDF5 export of a run: data, units, timestamps, configuration and full metadata.

:func:`export_nexus` writes one run (as Tiled serves it, ``BlueskyRun`` v3) to one NeXus file
(HDF5, read with h5py, silx, nexpy, ...). Layout (``@`` marks an attribute)::

    /                                  NXroot  @default=entry @creator @file_time @file_name
      entry/                           NXentry @default=primary (or the first stream)
        title                          plan name
        entry_identifier               run uid
        start_time, end_time           ISO 8601 (UTC)
        program_name                   "accplans" @version
        user/                          NXuser: name (the run's operator)
        instrument/                    NXinstrument: name (machine name) @short_name (id)
        metadata/                      NXcollection: the start document, recursively (plan_name,
                                       plan_args, machine, config_hash, lattice, twin_seed,
                                       operator, units, versions, ...)
        stop/                          NXcollection: the stop document (exit status, events)
        software/                      NXcollection: run/ (versions the run recorded) and
                                       export/ (versions of the exporter: accplans, bluesky,
                                       ophyd-async, pyAT, tiled, ...)
        <stream>/                      NXdata per stream (primary, baseline, result_<kind>)
                                       @signal @axes @time_indices=0
          time                         event times, s since the epoch @units=s
          seq_num                      event sequence numbers
          <data key>                   (n_events, *shape) @units @source @bluesky_data_key
          timestamps/                  NXcollection: <data key> (n_events,) s
          configuration/               NXcollection: <object>/<key> @units (the descriptor's)

Mappings become groups (``NXcollection``); numbers, strings and rectangular lists of them
become datasets; ``None`` and ragged or mixed lists are stored as JSON strings with
``@encoding="json"``. Strings are variable-length UTF-8 (``dataset.asstr()[...]`` in h5py).
Names are the run's own (data keys such as ``orbit-counter`` keep their ``-``).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from accplans import __version__ as _accplans_version

__all__ = ["NEXUS_EXPORT_PACKAGES", "export_nexus"]

#: Distributions whose installed versions the exporter records (``software/export``).
NEXUS_EXPORT_PACKAGES = (
    "accplans",
    "bluesky",
    "ophyd-async",
    "accelerator-toolbox",
    "tiled",
    "bluesky-tiled-plugins",
    "event-model",
    "numpy",
    "h5py",
)


@functools.cache
def _string_dtype() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def _iso(t: Any) -> str | None:
    try:
        value = float(t)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    return datetime.fromtimestamp(value, tz=UTC).isoformat()


def _installed_versions() -> dict[str, str]:
    versions: dict[str, str] = {"python": sys.version.split()[0]}
    for dist in NEXUS_EXPORT_PACKAGES:
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    versions["accplans"] = _accplans_version
    return versions


def _as_array(value: Any) -> np.ndarray | None:
    """A rectangular numeric/bool/string array of ``value``, or ``None`` if it has none."""
    if isinstance(value, list | tuple) and any(isinstance(x, bool) for x in _leaves(value)):
        if not all(isinstance(x, bool) for x in _leaves(value)):
            return None  # mixed bools and numbers: keep the types (JSON)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # ragged
        return None
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind == "U" and all(isinstance(x, str) for x in _leaves(value)):
        return arr.astype(object)
    return None


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _put(group: Any, name: str, value: Any) -> None:
    """Write a JSON-like ``value`` under ``group[name]`` (groups for mappings)."""
    if isinstance(value, Mapping):
        sub = group.create_group(name)
        sub.attrs["NX_class"] = "NXcollection"
        for key, item in value.items():
            _put(sub, str(key).replace("/", "_"), item)
        return
    if isinstance(value, str):
        group.create_dataset(name, data=value, dtype=_string_dtype())
        return
    arr = None if value is None else _as_array(value)
    if arr is not None and arr.dtype == object:
        group.create_dataset(name, data=arr, dtype=_string_dtype())
    elif arr is not None and (arr.size > 0 or arr.ndim == 1):
        group.create_dataset(name, data=arr)
    else:
        ds = group.create_dataset(name, data=json.dumps(value, default=repr), dtype=_string_dtype())
        ds.attrs["encoding"] = "json"


def _write_array(group: Any, name: str, values: np.ndarray) -> Any:
    values = np.asarray(values)
    if values.dtype.kind in "USO":
        strings = np.vectorize(_to_text, otypes=[object])(values) if values.size else values
        return group.create_dataset(name, data=strings.astype(object), dtype=_string_dtype())
    if values.ndim >= 2 and values.size >= 1024:
        return group.create_dataset(name, data=values, compression="gzip", shuffle=True)
    return group.create_dataset(name, data=values)


def _to_text(item: Any) -> str:
    return item.decode() if isinstance(item, bytes) else str(item)


def _signal(data_keys: Mapping[str, Any], hints: Mapping[str, Any], written: list[str]) -> str:
    """The stream's default plotted field: the first hinted field, else the first numeric one."""
    for fields in (hints.get(obj, {}).get("fields", []) for obj in hints):
        for key in fields:
            if key in written:
                return key
    for key in written:
        if data_keys.get(key, {}).get("dtype") in ("number", "integer", "array", "boolean"):
            return key
    return written[0]


def _write_stream(entry: Any, name: str, stream: Any) -> str | None:
    """One NXdata group for ``stream``; returns its signal (``None``: no data written)."""
    md = dict(stream.metadata)
    data_keys: dict[str, Any] = dict(md.get("data_keys") or {})
    children = set(stream)
    group = entry.create_group(name)
    group.attrs["NX_class"] = "NXdata"
    group.attrs["bluesky_descriptor_uid"] = str(md.get("uid", ""))
    n_events = 0
    for special, unit in (("time", "s"), ("seq_num", "")):
        if special in children:
            values = np.asarray(stream[special].read())
            ds = _write_array(group, special, values)
            if unit:
                ds.attrs["units"] = unit
            n_events = len(values)
    if "time" in group and n_events:
        group["time"].attrs["start"] = _iso(group["time"][0]) or ""
    written: list[str] = []
    timestamps = group.create_group("timestamps")
    timestamps.attrs["NX_class"] = "NXcollection"
    for key, data_key in data_keys.items():
        if key not in children:
            raise ValueError(
                f"export_nexus: stream {name!r} describes {key!r} but Tiled serves no such "
                f"array (external data are not exported); it has {sorted(children)}"
            )
        ds = _write_array(group, key, np.asarray(stream[key].read()))
        ds.attrs["units"] = str(data_key.get("units") or "")
        ds.attrs["long_name"] = key
        ds.attrs["source"] = str(data_key.get("source", ""))
        ds.attrs["bluesky_data_key"] = json.dumps(data_key, default=repr)
        written.append(key)
        if f"ts_{key}" in children:
            ts = _write_array(timestamps, key, np.asarray(stream[f"ts_{key}"].read()))
            ts.attrs["units"] = "s"
    configuration = group.create_group("configuration")
    configuration.attrs["NX_class"] = "NXcollection"
    for obj, conf in dict(md.get("configuration") or {}).items():
        obj_group = configuration.create_group(str(obj))
        obj_group.attrs["NX_class"] = "NXcollection"
        conf_keys = dict(conf.get("data_keys") or {})
        conf_ts = dict(conf.get("timestamps") or {})
        for key, value in dict(conf.get("data") or {}).items():
            _put(obj_group, key, value)
            obj_group[key].attrs["units"] = str(conf_keys.get(key, {}).get("units") or "")
            if key in conf_ts:
                obj_group[key].attrs["timestamp"] = float(conf_ts[key])
            if key in conf_keys:
                obj_group[key].attrs["bluesky_data_key"] = json.dumps(conf_keys[key], default=repr)
    if not written:
        return None
    signal = _signal(data_keys, dict(md.get("hints") or {}), written)
    group.attrs["signal"] = signal
    ndim = group[signal].ndim
    group.attrs["axes"] = ["time"] + ["."] * (ndim - 1) if "time" in group else ["."] * ndim
    if "time" in group:
        group.attrs["time_indices"] = 0
    return signal


def export_nexus(run: Any, path: str | Path, *, entry: str = "entry") -> Path:
    """Write ``run`` to a NeXus/HDF5 file: every stream, with units and the full metadata.

    The layout is in this module's docstring and in the how-to "Export a run to NeXus". Reading
    the file back with h5py gives the same arrays as the run in Tiled (``entry/primary/<key>``
    equals ``run["primary"][key].read()``).

    Args:
        run: The run as a Tiled client (``open_run(container, uid)``, ``container[uid]``).
        path: The file to write (replaced if it exists; ``.nxs`` or ``.h5`` by convention).
        entry: Name of the ``NXentry`` group.

    Returns:
        The path written.

    Raises:
        ValueError: ``run`` has no start document (not a bluesky run), or a stream describes
            data that Tiled does not serve (external assets).
    """
    import h5py

    run_md = dict(run.metadata)
    start = dict(run_md.get("start") or {})
    if "uid" not in start:
        raise ValueError(f"export_nexus: {run!r} has no start document; is it a bluesky run?")
    stop = dict(run_md.get("stop") or {})
    path = Path(path)
    versions = _installed_versions()
    run_versions = dict(start.get("versions") or {})
    if "accplans_version" in start:
        run_versions["accplans"] = start["accplans_version"]
    machine = dict(start.get("machine") or {})
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        f.attrs["NX_class"] = "NXroot"
        f.attrs["default"] = entry
        f.attrs["creator"] = f"accplans {_accplans_version} (accplans.data.export_nexus)"
        f.attrs["file_name"] = path.name
        f.attrs["file_time"] = datetime.now(tz=UTC).isoformat()
        f.attrs["HDF5_Version"] = h5py.version.hdf5_version
        f.attrs["h5py_version"] = h5py.version.version
        nx = f.create_group(entry)
        nx.attrs["NX_class"] = "NXentry"
        _put(nx, "title", str(start.get("plan_name", "")))
        _put(nx, "entry_identifier", str(start["uid"]))
        for field_name, t in (("start_time", start.get("time")), ("end_time", stop.get("time"))):
            iso = _iso(t)
            if iso is not None:
                _put(nx, field_name, iso)
        _put(nx, "program_name", "accplans")
        nx["program_name"].attrs["version"] = _accplans_version
        if "operator" in start:
            user = nx.create_group("user")
            user.attrs["NX_class"] = "NXuser"
            _put(user, "name", str(start["operator"]))
        if machine:
            instrument = nx.create_group("instrument")
            instrument.attrs["NX_class"] = "NXinstrument"
            _put(instrument, "name", str(machine.get("name", "")))
            instrument["name"].attrs["short_name"] = str(machine.get("id", ""))
        _put(nx, "metadata", start)
        _put(nx, "stop", stop)
        _put(nx, "software", {"run": run_versions, "export": versions})
        signals: dict[str, str] = {}
        for stream_name in run:
            signal = _write_stream(nx, stream_name, run[stream_name])
            if signal is not None:
                signals[stream_name] = signal
        if signals:
            nx.attrs["default"] = "primary" if "primary" in signals else next(iter(signals))
    tmp.replace(path)
    return path
