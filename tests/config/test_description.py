"""Machine descriptions: loading, validation errors that name the key, from_lattice."""

from pathlib import Path

import at
import numpy as np
import pytest
import yaml

from accplans.config import (
    DescriptionError,
    LatticeSource,
    LinearCalibration,
    PolynomialCalibration,
    build_lattice,
    dump_description,
    from_lattice,
    load_description,
)


@pytest.fixture(scope="module")
def small():
    return load_description("small")


def _yaml(desc, tmp_path: Path) -> tuple[dict, Path]:
    path = tmp_path / "machine.yaml"
    dump_description(desc, path)
    return yaml.safe_load(path.read_text()), path


def test_builtin_machines_have_the_documented_sizes():
    ebs = load_description("ebs")
    sizes = {name: len(fam.devices) for name, fam in ebs.families.items()}
    assert sizes["bpms"] == 320
    assert sizes["hcorr"] == sizes["vcorr"] == 288
    small = load_description("small")
    assert len(small.families["bpms"].devices) == 16
    assert small.single("rf").field == "Frequency"


def test_one_element_carries_several_devices(small):
    ring = build_lattice(small)
    by_element: dict[int, list[str]] = {}
    for dev in small.devices:
        for i in dev.elements:
            by_element.setdefault(i, []).append(dev.kind)
    sf = [i for i, e in enumerate(ring) if e.FamName == "SF"]
    assert sorted(by_element[sf[0]]) == ["corrector", "corrector", "sextupole", "skew_quadrupole"]


def test_yaml_round_trip(small, tmp_path):
    _, path = _yaml(small, tmp_path)
    assert load_description(path) == small


def test_unknown_machine_is_a_clear_error():
    with pytest.raises(DescriptionError, match=r"unknown machine 'nosuchring'.*ebs"):
        load_description("nosuchring")


def test_wrong_key_is_named(small, tmp_path):
    data, path = _yaml(small, tmp_path)
    data["devices"][3]["calibraton"] = data["devices"][3].pop("calibration", None)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError) as info:
        load_description(path)
    text = str(info.value)
    assert str(path) in text
    assert "devices.3.calibraton: unknown key" in text


def test_missing_pv_is_named(small, tmp_path):
    data, path = _yaml(small, tmp_path)
    name = data["devices"][20]["name"]
    del data["devices"][20]["pvs"]["readback"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError, match=r"devices\.20.*needs PVs for \['readback'\]"):
        load_description(path)
    assert name.startswith("HCM")


def test_twin_control_pvs_are_refused(small, tmp_path):
    data, path = _yaml(small, tmp_path)
    data["devices"][0]["pvs"]["x"] = "TWIN:SMALL:BPM001:X"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError, match="twin truth/control PV"):
        load_description(path)


def test_description_must_match_its_lattice(small, tmp_path):
    data, path = _yaml(small, tmp_path)
    data["devices"][0]["element_names"] = ["QF"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError, match=r"BPM001.*'BPM'.*expects 'QF'"):
        load_description(path)


def test_unknown_family_member_and_duplicate_pv(small, tmp_path):
    data, path = _yaml(small, tmp_path)
    data["families"]["hcorr"]["devices"].append("HCM999")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError, match=r"family hcorr: unknown devices \['HCM999'\]"):
        load_description(path)
    data, path = _yaml(small, tmp_path)
    data["devices"][1]["pvs"]["x"] = data["devices"][0]["pvs"]["x"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(DescriptionError, match=r"already used by device BPM001.x"):
        load_description(path)


@pytest.mark.parametrize("value", [-6.0, 6.0, float("nan")])
def test_limits_refuse_out_of_range_and_nan(small, value):
    with pytest.raises(ValueError, match=r"HCM001.*outside its limits"):
        small.device("HCM001").check_limits(value)


def test_polynomial_calibration_round_trip():
    cal = PolynomialCalibration(coefficients=[0.0, 0.02, 0.0, -1e-7], valid_range=(-100, 100))
    currents = np.linspace(-100, 100, 41)
    back = cal.to_hardware(cal.to_strength(currents))
    np.testing.assert_allclose(back, currents, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not monotonic"):
        PolynomialCalibration(coefficients=[0.0, 1.0, 0.0, -1.0], valid_range=(-10, 10))
    with pytest.raises(ValueError, match="non-zero"):
        LinearCalibration(gain=0.0)


def test_from_lattice_selectors_markers_and_kickangle_multipoles():
    ring = at.Lattice(
        [
            at.Marker("BPM_A"),
            at.Drift("D", 1.0),
            at.Quadrupole("QF", 0.5, 1.2),
            at.Marker("BPM_B"),
            at.Multipole("CM", 0.0, [0, 0], [0, 0], KickAngle=[0.0, 0.0]),
            at.Drift("D", 1.0),
            at.Quadrupole("QD", 0.5, -1.2),
        ],
        energy=1e9,
    )
    desc = from_lattice(
        ring,
        "toy",
        "TOY:",
        source=LatticeSource(file="toy.m"),
        bpms="BPM_.*",
        vcorrectors=lambda i, e: e.FamName == "CM",  # h: default, elements with KickAngle
    )
    assert [desc.device(n).elements[0] for n in desc.families["bpms"].devices] == [0, 3]
    hcorr = desc.family_devices("hcorr")
    assert [d.elements for d in hcorr] == [[4]]
    assert hcorr[0].field == "KickAngle[0]"
    assert desc.family_devices("vcorr")[0].field == "KickAngle[1]"
    assert desc.family_devices("quadrupoles")[1].element_names == ["QD"]


def test_build_lattice_adds_fields_the_description_drives():
    ebs = load_description("ebs")
    ring = build_lattice(ebs)
    sh = [d for d in ebs.family_devices("skew")]
    elem = ring[sh[0].elements[0]]
    assert elem.FamName.startswith("SH")
    assert elem.KickAngle.shape == (2,)
    assert len(elem.PolynomA) >= 2
