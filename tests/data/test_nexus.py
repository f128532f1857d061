"""NeXus export: a run measured on the twin, written to HDF5, read back with h5py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import at
import bluesky
import bluesky.plans as bp
import h5py
import numpy as np
import ophyd_async
import pytest
import tiled
from bluesky import RunEngine
from bluesky.preprocessors import SupplementalData
from ophyd_async.core import StandardReadable, init_devices, soft_signal_rw
from ophyd_async.core import StandardReadableFormat as Format

from accplans import __version__ as accplans_version
from accplans.cli._main import build_parser
from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, LocalTiled, export_nexus, load_result, open_run
from accplans.devices import Machine
from accplans.plans import measure_orbit

# the plan tests' fixtures, imported so pytest finds them here (F401); the tests' parameters
# that name them then shadow these imports, as pytest intends (F811)
from tests.plans.conftest import machine, run_engine, small  # noqa: F401
from tests.plans.helpers import run_plan

N_SAMPLES = 5


@pytest.fixture
def plan_writer(client: Any, run_engine: RunEngine) -> Iterator[BackgroundTiledWriter]:  # noqa: F811
    w = BackgroundTiledWriter(client)
    token = run_engine.subscribe(w)
    yield w
    run_engine.unsubscribe(token)
    w.close(timeout=60)


@pytest.fixture
def orbit_uid(
    run_engine: RunEngine,  # noqa: F811
    plan_writer: BackgroundTiledWriter,
    machine: Machine,  # noqa: F811
) -> str:
    """A measure_orbit run on the small twin (seed 1), written to Tiled."""
    result = run_plan(
        run_engine,
        measure_orbit(machine.bpms, n_samples=N_SAMPLES, md={"purpose": "nexus export test"}),
    )
    (uid,) = result.run_start_uids
    plan_writer.flush(timeout=60)
    return uid


def _assert_file_matches_run(path: Path, run: Any) -> int:
    """Every data key of every stream: same array and unit in the file as in Tiled."""
    n_compared = 0
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        for stream in run:
            group = entry[stream]
            assert group.attrs["NX_class"] == "NXdata"
            data_keys = run[stream].metadata["data_keys"]
            assert data_keys, stream
            for key, data_key in data_keys.items():
                expected = np.asarray(run[stream][key].read())
                ds = group[key]
                got = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]
                assert np.array_equal(got, expected), (stream, key)
                assert got.shape[0] == run.metadata["stop"]["num_events"][stream]
                assert ds.attrs["units"] == (data_key.get("units") or ""), (stream, key)
                assert json.loads(ds.attrs["bluesky_data_key"]) == data_key
                np.testing.assert_array_equal(
                    group["timestamps"][key][()], run[stream][f"ts_{key}"].read()
                )
                n_compared += 1
            np.testing.assert_array_equal(group["time"][()], run[stream]["time"].read())
            assert group.attrs["signal"] in group
    return n_compared


def test_export_gives_the_same_arrays_units_and_metadata(
    client: Any,
    orbit_uid: str,
    small: MachineDescription,  # noqa: F811
    tmp_path: Path,
) -> None:
    run = open_run(client, orbit_uid)
    path = export_nexus(run, tmp_path / "orbit.nxs")
    assert path == tmp_path / "orbit.nxs" and not list(tmp_path.glob("*.partial"))
    n_compared = _assert_file_matches_run(path, run)
    print(f"\nNeXus export: {n_compared} data keys in streams {list(run)}, {path.stat().st_size} B")
    assert {"primary", "result_orbit"} <= set(run)
    orbit = load_result(client, orbit_uid, "orbit")
    with h5py.File(path, "r") as f:
        # NeXus conventions: classes, the default chain ends at an NXdata with its signal
        assert f.attrs["NX_class"] == "NXroot"
        entry = f[f.attrs["default"]]
        assert entry.attrs["NX_class"] == "NXentry"
        default = entry[entry.attrs["default"]]
        assert default.name == "/entry/primary" and default.attrs["NX_class"] == "NXdata"
        signal = default[default.attrs["signal"]]
        assert signal.shape[0] == N_SAMPLES
        assert default.attrs["axes"][0] == "time" and default.attrs["time_indices"] == 0
        # the result stream holds the mean orbit that load_result gives
        result = entry["result_orbit"]
        x_keys = [k for k in result if k.endswith("_x") and not k.endswith("std_x")]
        assert len(x_keys) == 1
        np.testing.assert_array_equal(result[x_keys[0]][0], orbit.data["x"])
        assert result[x_keys[0]].attrs["units"] == "m"
        # run metadata
        assert entry["title"].asstr()[()] == "measure_orbit"
        assert entry["entry_identifier"].asstr()[()] == orbit_uid
        assert entry["start_time"].asstr()[()] < entry["end_time"].asstr()[()]
        md = entry["metadata"]
        assert md["plan_name"].asstr()[()] == "measure_orbit"
        assert md["plan_args"]["n_samples"][()] == N_SAMPLES
        assert md["machine"]["id"].asstr()[()] == small.machine.id
        assert md["config_hash"].asstr()[()] == small.config_hash
        assert md["lattice"]["builtin"].asstr()[()] == "small"
        assert md["purpose"].asstr()[()] == "nexus export test"
        start = run.metadata["start"]
        assert md["operator"].asstr()[()] == start["operator"]
        assert entry["user"]["name"].asstr()[()] == start["operator"]
        assert entry["instrument"]["name"].asstr()[()] == small.machine.name
        assert entry["stop"]["exit_status"].asstr()[()] == "success"
        # software versions: what the run recorded, and the exporter's own
        as_run = entry["software"]["run"]
        assert as_run["accplans"].asstr()[()] == start["accplans_version"]
        assert as_run["bluesky"].asstr()[()] == start["versions"]["bluesky"]
        export = entry["software"]["export"]
        for dist, version in {
            "accplans": accplans_version,
            "bluesky": bluesky.__version__,
            "ophyd-async": ophyd_async.__version__,
            "accelerator-toolbox": at.__version__,
            "tiled": tiled.__version__,
        }.items():
            assert export[dist].asstr()[()] == version, dist


def test_cli_export_writes_the_run(
    tiled: LocalTiled,
    client: Any,
    orbit_uid: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TILED_API_KEY", tiled.api_key)  # never on the command line
    out = tmp_path / "cli.nxs"
    args = build_parser().parse_args(
        ["export", orbit_uid, "--format", "nexus", "-o", str(out), "--tiled", tiled.uri]
    )
    assert args.func(args) == 0
    assert f"wrote {out}: run {orbit_uid} (measure_orbit)" in capsys.readouterr().out
    assert _assert_file_matches_run(out, open_run(client, orbit_uid)) > 0

    # -1: the latest run (this test's), written to the default name in the working directory
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["export", "-1", "--tiled", tiled.uri])
    assert args.func(args) == 0
    default = tmp_path / f"measure_orbit_{orbit_uid[:8]}.nxs"
    assert f"wrote {default.name}: run {orbit_uid}" in capsys.readouterr().out
    assert _assert_file_matches_run(default, open_run(client, orbit_uid)) > 0

    args = build_parser().parse_args(["export", "nope-no-such-run", "--tiled", tiled.uri])
    assert args.func(args) == 2
    assert "no run 'nope-no-such-run'" in capsys.readouterr().out


def test_metadata_types_survive(tmp_path: Path) -> None:
    """Nested mappings become groups; mixed or ragged lists and None are kept as JSON."""
    from accplans.data._nexus import _put

    value = {
        "ints": [1, 2, 3],
        "names": ["a", "bc"],
        "mixed": [1, "a", None],
        "ragged": [[1], [2, 3]],
        "flags": [True, 1],
        "none": None,
        "empty": [],
        "nested": {"a/b": 1.5},
    }
    with h5py.File(tmp_path / "md.h5", "w") as f:
        _put(f, "md", value)
        md = f["md"]
        np.testing.assert_array_equal(md["ints"][()], [1, 2, 3])
        assert list(md["names"].asstr()[()]) == ["a", "bc"]
        for key in ("mixed", "ragged", "flags", "none"):
            assert md[key].attrs["encoding"] == "json"
            assert json.loads(md[key].asstr()[()]) == value[key]
        assert md["empty"].shape == (0,)
        assert md["nested"].attrs["NX_class"] == "NXcollection"
        assert md["nested"]["a_b"][()] == 1.5


class _Screen(StandardReadable):
    """A soft device with a configuration signal (exposure, s) and a read signal."""

    def __init__(self, name: str = "") -> None:
        with self.add_children_as_readables(Format.CONFIG_SIGNAL):
            self.exposure = soft_signal_rw(float, 0.25, units="s")
        with self.add_children_as_readables(Format.HINTED_SIGNAL):
            self.intensity = soft_signal_rw(float, 3.5, units="counts")
        super().__init__(name=name)


def test_configuration_and_baseline_are_exported(
    RE: RunEngine, writer: BackgroundTiledWriter, client: Any, tmp_path: Path
) -> None:
    with init_devices():
        screen = _Screen()
        current = soft_signal_rw(float, 0.2, units="A")
    RE.preprocessors.append(SupplementalData(baseline=[current]))
    result = RE(bp.count([screen], num=3))
    assert isinstance(result, tuple)  # a RunEngine without call_returns_result
    (uid,) = result
    writer.flush(timeout=60)
    run = open_run(client, uid)
    path = export_nexus(run, tmp_path / "count.nxs")
    assert _assert_file_matches_run(path, run) == 2  # screen-intensity, current
    with h5py.File(path, "r") as f:
        primary = f["entry/primary"]
        assert primary.attrs["signal"] == "screen-intensity"
        exposure = primary["configuration/screen/screen-exposure"]
        assert exposure[()] == 0.25 and exposure.attrs["units"] == "s"
        baseline = f["entry/baseline/current"]
        np.testing.assert_array_equal(baseline[()], [0.2, 0.2])  # before and after
        assert baseline.attrs["units"] == "A"
