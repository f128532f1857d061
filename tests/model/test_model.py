"""OnlineModel: hardware through calibrations to the lattice, and its physics against pyAT."""

from __future__ import annotations

import pickle
from typing import Any

import at
import numpy as np
import pytest

from accplans.config import MachineDescription
from accplans.model import OnlineModel, UnstableMotion, dct_for_frequency

FIELDS = ("KickAngle", "PolynomA", "PolynomB")


def _snapshot(ring: at.Lattice) -> dict[tuple[int, str], Any]:
    snap: dict[tuple[int, str], Any] = {}
    for i, e in enumerate(ring):
        for f in FIELDS:
            if hasattr(e, f):
                snap[(i, f)] = np.array(getattr(e, f), dtype=float).copy()
        if hasattr(e, "Frequency"):
            snap[(i, "Frequency")] = float(e.Frequency)
    return snap


def _changes(before: dict, after: dict) -> dict[tuple[int, str, int], tuple[float, float]]:
    """Every (element, field, index) whose value changed: (old, new)."""
    assert before.keys() == after.keys()
    out = {}
    for key, old in before.items():
        new = after[key]
        if isinstance(old, float):
            if old != new:
                out[(*key, 0)] = (old, new)
            continue
        for k in np.flatnonzero(old != new):
            out[(*key, int(k))] = (float(old[k]), float(new[k]))
    return out


def _variant(desc: MachineDescription, edit) -> MachineDescription:
    data = desc.model_dump(mode="json")
    edit(data)
    return MachineDescription.model_validate(data)


@pytest.fixture
def small_model(small_desc: MachineDescription) -> OnlineModel:
    model = OnlineModel(small_desc)
    rng = np.random.default_rng(11)
    correctors = [d.name for d in small_desc.devices if d.kind == "corrector"]
    model.set_hardware({n: float(rng.normal(0.0, 0.2)) for n in correctors})
    model.set_hardware({"RF": model.rf_frequency - 2000.0})  # the RF limit
    return model


def test_linear_and_polynomial_calibrations(small_desc: MachineDescription) -> None:
    model = OnlineModel(small_desc)
    ring = model.lattice
    before = _snapshot(ring)
    model.set_hardware({})  # nothing to do, nothing changes
    assert _changes(before, _snapshot(ring)) == {}
    hcm = small_desc.device("HCM005")
    q = small_desc.device("Q001")
    assert q.calibration is not None and q.calibration.type == "polynomial"
    # the initial hardware reproduces the design strength
    design = float(ring[q.elements[0]].PolynomB[1])
    assert q.calibration.to_strength(model.hardware("Q001")) == pytest.approx(design, rel=1e-12)
    model.set_hardware({"HCM005": 1.5, "Q001": 80.0})
    expected_k = float(np.polynomial.polynomial.polyval(80.0, q.calibration.coefficients))
    assert _changes(before, _snapshot(ring)) == {
        (hcm.elements[0], "KickAngle", 0): (0.0, 1.5 * 1e-4),
        (q.elements[0], "PolynomB", 1): (design, expected_k),
    }
    assert model.hardware("HCM005") == 1.5
    assert model.strength("HCM005") == pytest.approx(1.5e-4, rel=1e-15)
    assert model.strength("Q001") == pytest.approx(expected_k, rel=1e-15)
    assert expected_k != pytest.approx(q.calibration.coefficients[1] * 80.0)  # saturation


def test_crosstalk_matrix_applies(small_desc: MachineDescription) -> None:
    matrix = [[1.0, 0.05, 0.0], [0.02, 1.0, 0.0], [0.0, 0.1, 1.0]]

    def edit(data: dict) -> None:
        data["crosstalk"] = [{"devices": ["HCM001", "VCM001", "SQ001"], "matrix": matrix}]

    desc = _variant(small_desc, edit)
    model = OnlineModel(desc)
    ring = model.lattice
    e = desc.device("HCM001").elements[0]
    assert desc.device("SQ001").elements == [e]
    before = _snapshot(ring)
    model.set_hardware({"HCM001": 0.3})  # 3e-5 rad nominal
    model.set_hardware({"VCM001": 0.5, "SQ001": 1.0})  # 5e-5 rad, 1e-2 m^-2 nominal
    nominal = np.array([0.3e-4, 0.5e-4, 1.0e-2])
    beam = np.asarray(matrix) @ nominal
    changes = _changes(before, _snapshot(ring))
    assert set(changes) == {(e, "KickAngle", 0), (e, "KickAngle", 1), (e, "PolynomA", 1)}
    assert changes[(e, "KickAngle", 0)][1] == pytest.approx(beam[0], rel=1e-14)
    assert changes[(e, "KickAngle", 1)][1] == pytest.approx(beam[1], rel=1e-14)
    assert changes[(e, "PolynomA", 1)][1] == pytest.approx(beam[2], rel=1e-14)
    assert model.strength("VCM001") == pytest.approx(beam[1], rel=1e-14)
    assert model.nominal_strength("VCM001") == pytest.approx(0.5e-4, rel=1e-14)
    # the ORM column of a channel includes its cross-talk onto the other fields
    resp = model.orm(correctors=["HCM001"], rf=False)
    nb = len(resp.bpms)
    plain = OnlineModel(small_desc)
    plain.set_hardware(model.hardware_values())
    h = plain.orm(correctors=["HCM001", "VCM001"], rf=False).matrix
    assert np.max(np.abs(resp.matrix[nb:, 0])) > 0.005 * np.max(np.abs(resp.matrix[:nb, 0]))
    np.testing.assert_allclose(
        resp.matrix[:, 0], h[:, 0] + 0.02 * h[:, 1], rtol=0, atol=1e-3 * np.abs(h).max()
    )


def test_series_powered_device_sets_every_element(small_desc: MachineDescription) -> None:
    qf = [d for d in small_desc.devices if d.kind == "quadrupole" and d.element_names == ["QF"]]
    first, second = qf[0], qf[1]

    def edit(data: dict) -> None:
        for dev in data["devices"]:
            if dev["name"] == first.name:
                dev["elements"] = first.elements + second.elements
                dev["element_names"] = ["QF", "QF"]
        data["devices"] = [d for d in data["devices"] if d["name"] != second.name]
        for fam in data["families"].values():
            fam["devices"] = [n for n in fam["devices"] if n != second.name]
        for knob in data["knobs"].values():
            knob["coefficients"].pop(second.name, None)

    desc = _variant(small_desc, edit)
    model = OnlineModel(desc)
    before = _snapshot(model.lattice)
    model.set_hardware({first.name: 60.0})
    assert first.calibration is not None
    k = float(first.calibration.to_strength(60.0))
    changes = _changes(before, _snapshot(model.lattice))
    assert {key: new for key, (_, new) in changes.items()} == {
        (first.elements[0], "PolynomB", 1): k,
        (second.elements[0], "PolynomB", 1): k,
    }


def test_two_devices_on_one_field_is_an_error(small_desc: MachineDescription) -> None:
    def edit(data: dict) -> None:
        for dev in data["devices"]:
            if dev["name"] == "VCM001":
                dev["field"] = "KickAngle[0]"

    with pytest.raises(ValueError, match=r"HCM001 and VCM001 both drive KickAngle\[0\]"):
        OnlineModel(_variant(small_desc, edit))


def test_rf_frequency_sets_the_orbit(small_desc: MachineDescription) -> None:
    model = OnlineModel(small_desc)
    ring = model.lattice
    cavity = small_desc.device("RF").elements[0]
    assert model.rf_frequency == ring[cavity].Frequency  # default: the lattice's frequency
    before = _snapshot(ring)
    f = model.rf_frequency + 1000.0
    model.set_hardware({"RF": f})
    assert _changes(before, _snapshot(ring)) == {(cavity, "Frequency", 0): (f - 1000.0, f)}
    assert model.rf_frequency == f == model.hardware("RF")
    bpms = np.array([small_desc.device(n).elements[0] for n in small_desc.family("bpms").devices])
    _, ref = at.find_orbit4(ring, dct=dct_for_frequency(ring, f), refpts=bpms.astype(np.uint32))
    orbit = model.closed_orbit()
    np.testing.assert_allclose(orbit, np.concatenate([ref[:, 0], ref[:, 2]]), rtol=0, atol=1e-9)
    assert np.max(np.abs(orbit)) > 1e-5  # off-momentum: dispersion orbit
    np.testing.assert_allclose(model.closed_orbit(["BPM003"]), orbit[[2, 2 + len(bpms)]])


def test_bad_hardware_changes_nothing(small_model: OnlineModel) -> None:
    before = _snapshot(small_model.lattice)
    hcm = small_model.hardware("HCM001")
    with pytest.raises(KeyError, match="has no device 'HCM999'"):
        small_model.set_hardware({"HCM001": 1.0, "HCM999": 1.0})
    with pytest.raises(ValueError, match="BPM001 is a bpm: it has no setpoint"):
        small_model.set_hardware({"HCM001": 1.0, "BPM001": 1.0})
    with pytest.raises(ValueError, match="HCM001: hardware value nan"):
        small_model.set_hardware({"HCM001": float("nan")})
    with pytest.raises(ValueError, match="RF: hardware value"):
        small_model.set_hardware({"RF": -1.0})
    assert small_model.hardware("HCM001") == hcm
    assert _changes(before, _snapshot(small_model.lattice)) == {}
    with pytest.raises(ValueError, match="DCCT is a dcct, not a magnet"):
        small_model.strength("DCCT")


def test_physics_at_fixed_rf_matches_pyat(small_model: OnlineModel) -> None:
    ring = small_model.lattice
    dct = small_model.dct
    assert abs(dct) > 1e-5
    orbit0, _ = at.find_orbit4(ring, dct=dct)
    assert abs(orbit0[4]) > 1e-5  # the fixed-frequency orbit is off momentum
    np.testing.assert_allclose(small_model.tunes(), at.get_tune(ring, dct=dct), rtol=0, atol=1e-9)
    np.testing.assert_allclose(
        small_model.chromaticity(), at.get_chrom(ring, dct=dct), rtol=1e-5, atol=0
    )
    assert small_model.alpha_c == pytest.approx(at.get_mcf(ring, dp=orbit0[4]), rel=1e-7)
    bpms = [small_model.description.device(n).elements[0] for n in small_model.orm(rf=False).bpms]
    _, _, lin = at.linopt6(ring, refpts=bpms, dct=dct)
    disp = small_model.dispersion()
    np.testing.assert_allclose(
        disp, np.concatenate([lin.dispersion[:, 0], lin.dispersion[:, 2]]), rtol=0, atol=1e-8
    )
    optics = small_model.optics()
    np.testing.assert_array_equal(optics.refpts, bpms)
    np.testing.assert_allclose(optics.beta, lin.beta, rtol=1e-8)
    np.testing.assert_allclose(optics.mu, lin.mu, rtol=0, atol=1e-8)
    np.testing.assert_allclose(optics.closed_orbit, lin.closed_orbit, rtol=0, atol=1e-9)
    np.testing.assert_allclose(optics.tunes, at.get_tune(ring, dct=dct), atol=1e-9)
    by_name = small_model.optics(["Q001", "BPM002"])
    np.testing.assert_allclose(by_name.beta[1], lin.beta[1], rtol=1e-8)


def _pyat_knob_derivative(model: OnlineModel, knob: str, h: float, what) -> np.ndarray:
    """Central difference of a pyAT quantity in a knob, set through the calibrations."""
    coefficients = model.description.knobs[knob].coefficients
    base = {n: model.hardware(n) for n in coefficients}
    values = []
    for s in (h, -h):
        hw = {}
        for n, c in coefficients.items():
            cal = model.description.device(n).calibration
            assert cal is not None
            hw[n] = float(cal.to_hardware(model.nominal_strength(n) + s * c))
        model.set_hardware(hw)
        values.append(what(model.lattice, model.dct))
        model.set_hardware(base)
    return (values[0] - values[1]) / (2 * h)


def test_tune_and_chromaticity_responses(small_model: OnlineModel) -> None:
    knobs = ["QF_strength", "QD_strength", "SF_strength", "SD_strength"]
    tunes = small_model.tunes()
    tr = small_model.tune_response(knobs)
    cr = small_model.chromaticity_response(knobs)
    np.testing.assert_allclose(small_model.tunes(), tunes, atol=1e-12)  # restored
    assert tr.shape == cr.shape == (2, 4)
    for k, (knob, h) in enumerate(zip(knobs, (1e-3, 1e-3, 0.05, 0.05), strict=True)):
        dq = _pyat_knob_derivative(small_model, knob, h, lambda r, dct: at.get_tune(r, dct=dct))
        dxi = _pyat_knob_derivative(small_model, knob, h, lambda r, dct: at.get_chrom(r, dct=dct))
        np.testing.assert_allclose(tr[:, k], dq, rtol=0, atol=1e-3 * np.abs(tr).max())
        np.testing.assert_allclose(cr[:, k], dxi, rtol=0, atol=1e-3 * np.abs(cr).max())
    assert np.abs(tr[:, :2]).min() > 0.1  # quadrupoles move the tunes
    assert np.abs(cr[:, 2:]).max() > 1.0  # sextupoles move the chromaticity
    # a magnet's name is a knob of coefficient 1
    q = small_model.description.knobs["QF_strength"].coefficients
    single = small_model.tune_response(list(q))
    np.testing.assert_allclose(single.sum(axis=1), tr[:, 0], rtol=1e-4)
    with pytest.raises(KeyError, match="no knob or magnet 'XX'"):
        small_model.tune_response(["XX"])


def test_model_pickles_as_description_and_hardware(small_model: OnlineModel) -> None:
    blob = pickle.dumps(small_model)
    clone = pickle.loads(blob)
    assert clone.hardware_values() == small_model.hardware_values()
    np.testing.assert_allclose(clone.closed_orbit(), small_model.closed_orbit(), atol=1e-12)
    assert _changes(_snapshot(small_model.lattice), _snapshot(clone.lattice)) == {}


def test_needs_one_rf_device(small_desc: MachineDescription) -> None:
    def edit(data: dict) -> None:
        data["devices"] = [d for d in data["devices"] if d["kind"] != "rf"]

    with pytest.raises(ValueError, match="needs exactly one"):
        OnlineModel(_variant(small_desc, edit))


def test_unstable_optics_is_an_error(small_desc: MachineDescription) -> None:
    model = OnlineModel(small_desc)
    qf = [d for d in small_desc.devices if d.kind == "quadrupole" and d.element_names == ["QF"]]
    assert qf[0].calibration is not None
    model.set_hardware({d.name: float(qf[0].calibration.to_hardware(2.6)) for d in qf})
    assert np.all(np.isfinite(model.closed_orbit()))  # the orbit exists (zero), motion does not
    for compute in (model.tunes, model.chromaticity, model.optics):
        with pytest.raises(UnstableMotion, match=r"unstable|no optics"):
            compute()
    with pytest.raises(UnstableMotion):
        model.orm(method="analytic")
