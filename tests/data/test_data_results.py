"""Versioned results: validation, recording through the RunEngine, load_result round trips."""

from __future__ import annotations

from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
import pytest
from bluesky.protocols import Configurable, Readable

from accplans.data import (
    RESULT_KINDS,
    FieldSpec,
    ResultError,
    ResultReadable,
    ResultSchema,
    load_result,
    record_result,
    register_result_kind,
)


def _orm(nbpm: int, ncorr: int, *, rf: bool = True, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    valid = np.ones((2 * nbpm, ncorr), bool)
    valid[1, 0] = False
    out: dict[str, Any] = {
        "matrix": rng.normal(size=(2 * nbpm, ncorr)) * 10.0,
        "bpm_names": [f"SR-BPM{i:02d}" for i in range(nbpm)],
        "corrector_names": [f"SR-C{i:02d}{'HV'[i % 2]}" for i in range(ncorr)],
        "corrector_planes": ["hv"[i % 2] for i in range(ncorr)],
        "kicks": np.full(ncorr, 2e-5),
        "noise": np.abs(rng.normal(size=(2 * nbpm, ncorr))) * 0.1,
        "valid": valid,
    }
    if rf:
        out["rf_column"] = rng.normal(size=2 * nbpm) * 1e-6
    return out


def test_registry_has_orm_and_orbit_with_units():
    orm = RESULT_KINDS["orm"]
    assert orm.version == 1
    assert orm.fields["matrix"][:2] == ("m/rad", "(2*nbpm, ncorr)")
    assert orm.fields["rf_column"][:2] == ("m/Hz", "(2*nbpm,)")
    assert orm.fields["noise"].unit == "m/rad" and orm.fields["kicks"].unit == "rad"
    assert {"x", "y", "std_x", "std_y", "bpm_names", "n_samples"} == set(
        RESULT_KINDS["orbit"].fields
    )


def test_result_readable_follows_the_bluesky_protocols():
    r = ResultReadable("orm", **_orm(3, 2))
    assert isinstance(r, Readable) and isinstance(r, Configurable)
    assert r.parent is None and r.name == "orm"
    desc, reading = r.describe(), r.read()
    assert set(desc) == set(reading) == {f"orm_{f}" for f in RESULT_KINDS["orm"].fields}
    assert desc["orm_matrix"]["shape"] == [6, 2]
    assert desc["orm_matrix"]["units"] == "m/rad"
    assert desc["orm_matrix"]["schema_version"] == 1
    assert r.read_configuration()["orm_schema_version"]["value"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"matrix": np.zeros((7, 2))}, r"'matrix' has shape \(7, 2\), expected .*nbpm=3 from"),
        ({"noise": np.zeros((6, 3))}, r"'noise' has shape \(6, 3\)"),
        ({"corrector_planes": ["h", "x"]}, r"'corrector_planes' has values \['x'\]"),
        ({"valid": np.ones((6, 2))}, r"'valid': expected booleans"),
        ({"bpm_names": [1, 2, 3]}, r"'bpm_names': expected strings"),
        ({"kicks": np.zeros(2)}, r"'kicks' must be finite and non-zero"),
        ({"tune": 0.2}, r"unknown field\(s\) \['tune'\]"),
    ],
)
def test_bad_results_are_refused_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ResultReadable("orm", **(_orm(3, 2) | change))


def test_missing_field_and_unknown_kind():
    fields = _orm(3, 2)
    del fields["kicks"]
    with pytest.raises(ValueError, match=r"missing field\(s\) \['kicks'\]"):
        ResultReadable("orm", **fields)
    # a kind no module registers (plan modules register theirs, e.g. "loco", on import)
    with pytest.raises(ResultError, match=r"unknown result kind 'no_such_kind'.*orbit"):
        ResultReadable("no_such_kind", x=1)


# (4, 8): a square matrix (2 nbpm = ncorr), whose two axes Tiled must name apart
@pytest.mark.parametrize(("nbpm", "ncorr", "rf"), [(3, 2, False), (20, 6, True), (4, 8, True)])
def test_orm_round_trips_through_the_run_engine(RE, writer, client, nbpm, ncorr, rf):
    fields = _orm(nbpm, ncorr, rf=rf, seed=nbpm)
    (uid,) = RE(bpp.run_wrapper(record_result("orm", **fields), md={"plan_name": "test_orm"}))
    writer.flush(timeout=60)
    result = load_result(client, uid, "orm")
    assert (result.kind, result.version, result.uid) == ("orm", 1, uid)
    for name in ("matrix", "kicks", "noise"):
        np.testing.assert_array_equal(result[name], fields[name])
        assert result[name].dtype == np.float64
    assert result["valid"].dtype == np.bool_
    np.testing.assert_array_equal(result["valid"], fields["valid"])
    assert result["bpm_names"] == fields["bpm_names"]
    assert result["corrector_names"] == fields["corrector_names"]
    assert result["corrector_planes"] == fields["corrector_planes"]
    if rf:
        np.testing.assert_array_equal(result["rf_column"], fields["rf_column"])
    else:
        assert result["rf_column"] is None
    assert result.metadata["units"]["matrix"] == "m/rad"
    assert result.metadata["dims"]["matrix"] == ["2*nbpm", "ncorr"]
    assert result.metadata["start"]["plan_name"] == "test_orm"


def test_orbit_round_trips(RE, writer, client):
    names = [f"BPM{i}" for i in range(30)]
    x = np.linspace(-1e-4, 1e-4, 30)
    orbit = dict(x=x, y=-x, std_x=abs(x) / 10, std_y=abs(x) / 5, bpm_names=names, n_samples=8)
    (uid,) = RE(bpp.run_wrapper(record_result("orbit", name="avg_orbit", **orbit)))
    writer.flush(timeout=60)
    result = load_result(client, uid, "orbit")
    for name in ("x", "y", "std_x", "std_y"):
        np.testing.assert_array_equal(result[name], orbit[name])
    assert result["n_samples"] == 8 and isinstance(result["n_samples"], int)
    assert result["bpm_names"] == names
    assert result.metadata["units"]["x"] == "m"
    with pytest.raises(KeyError, match="has no field 'z'"):
        result["z"]


def test_missing_result_wrong_uid_and_wrong_kind_are_clear(RE, writer, client):
    (uid,) = RE(bpp.run_wrapper(record_result("orm", **_orm(3, 2))))
    writer.flush(timeout=60)
    with pytest.raises(ResultError, match=rf"run {uid} has no 'orbit' result.*result_orm"):
        load_result(client, uid, "orbit")
    with pytest.raises(ResultError, match="no run with uid 'not-a-run'"):
        load_result(client, "not-a-run", "orm")
    with pytest.raises(ResultError, match="unknown result kind 'orn'"):
        load_result(client, uid, "orn")


def test_unknown_schema_version_is_refused(RE, writer, client, monkeypatch):
    v1 = ResultSchema("test_kind", 1, {"value": FieldSpec("m", "(n,)")})
    monkeypatch.setitem(RESULT_KINDS, "test_kind", v1)
    (uid,) = RE(bpp.run_wrapper(record_result("test_kind", value=np.ones(3))))
    writer.flush(timeout=60)
    np.testing.assert_array_equal(load_result(client, uid, "test_kind")["value"], np.ones(3))
    monkeypatch.setitem(RESULT_KINDS, "test_kind", ResultSchema("test_kind", 2, v1.fields))
    with pytest.raises(ResultError, match=r"schema version \[1\].*reads version 2"):
        load_result(client, uid, "test_kind")


def test_schemas_are_checked_when_registered(monkeypatch):
    with pytest.raises(ValueError, match="cannot parse"):
        ResultSchema("bad_dims", 1, {"v": FieldSpec("m", "(n+1,)")})
    with pytest.raises(ValueError, match="only float fields may be optional"):
        ResultSchema("bad_opt", 1, {"v": FieldSpec("", "(n,)", "str", optional=True)})
    with pytest.raises(ValueError, match="already registered"):
        register_result_kind(ResultSchema("orm", 2, {"v": FieldSpec("m", "(n,)")}))
