"""Orbit response of the online model against the brute-force reference and finite differences."""

from __future__ import annotations

import at
import numpy as np
import pytest

from accplans.config import MachineDescription, build_lattice
from accplans.model import OnlineModel, brute_force_orm, dct_for_frequency, linear_orm


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    """max abs difference / max abs element of the reference."""
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _corrector_elements(desc: MachineDescription, names) -> tuple[list[int], list[str]]:
    devs = [desc.device(n) for n in names]
    return [d.elements[0] for d in devs], [str(d.plane) for d in devs]


def _bpm_elements(desc: MachineDescription, names) -> list[int]:
    return [desc.device(n).elements[0] for n in names]


@pytest.fixture
def small_model(small_desc: MachineDescription) -> OnlineModel:
    """The small ring with an orbit (all correctors) and the RF 300 Hz above nominal."""
    model = OnlineModel(small_desc)
    rng = np.random.default_rng(7)
    correctors = [d.name for d in small_desc.devices if d.kind == "corrector"]
    model.set_hardware({n: float(rng.normal(0.0, 0.2)) for n in correctors})  # ~20 urad
    model.set_hardware({"RF": model.rf_frequency + 300.0})
    return model


def test_orm_equals_brute_force_small(small_model: OnlineModel) -> None:
    desc = small_model.description
    resp = small_model.orm()
    assert resp.correctors == tuple(desc.family("hcorr").devices + desc.family("vcorr").devices)
    assert resp.bpms == tuple(desc.family("bpms").devices)
    assert resp.matrix.shape == (2 * len(resp.bpms), len(resp.correctors))
    elements, planes = _corrector_elements(desc, resp.correctors)
    ring = small_model.lattice
    before = [ring[e].KickAngle.copy() for e in elements]
    ref = brute_force_orm(
        ring, _bpm_elements(desc, resp.bpms), elements, planes, dct=small_model.dct
    )
    # brute_force_orm restores every kick
    for e, k in zip(elements, before, strict=True):
        np.testing.assert_array_equal(ring[e].KickAngle, k)
    assert _rel(resp.matrix, ref) < 1e-4
    # all four blocks are filled: the orbit in the sextupoles couples the planes
    nb, nh = len(resp.bpms), len(desc.family("hcorr").devices)
    assert np.max(np.abs(resp.matrix[:nb, nh:])) > 1e-4
    assert np.max(np.abs(resp.matrix[nb:, :nh])) > 1e-4


def test_rf_column_is_a_frequency_derivative(small_model: OnlineModel) -> None:
    desc = small_model.description
    resp = small_model.orm(correctors=["HCM001"])
    assert resp.rf_column is not None
    ring = small_model.lattice
    bpms = np.array(_bpm_elements(desc, resp.bpms), dtype=np.uint32)
    f0, df = small_model.rf_frequency, 20.0

    def orbit(f: float) -> np.ndarray:
        _, o = at.find_orbit4(ring, dct=dct_for_frequency(ring, f), refpts=bpms)
        return np.concatenate([o[:, 0], o[:, 2]])

    fd = (orbit(f0 + df) - orbit(f0 - df)) / (2 * df)
    assert _rel(resp.rf_column, fd) < 1e-5
    # d x / d f = -D / (f alpha_c) to first order
    approx = -small_model.dispersion() / (f0 * small_model.alpha_c)
    assert _rel(resp.rf_column, approx) < 1e-3


def test_column_order_and_mixed_planes(small_model: OnlineModel) -> None:
    names = ["VCM003", "HCM010", "HCM002", "VCM001"]
    resp = small_model.orm(["BPM004", "BPM001"], names, rf=False)
    full = small_model.orm(rf=False)
    assert resp.rf_column is None
    rows = [full.bpms.index("BPM004"), full.bpms.index("BPM001")]
    nb = len(full.bpms)
    cols = [full.correctors.index(n) for n in names]
    expected = full.matrix[np.ix_(rows + [nb + r for r in rows], cols)]
    np.testing.assert_array_equal(resp.matrix, expected)
    assert resp.correctors == tuple(names)


def test_orm_methods_agree(small_model: OnlineModel) -> None:
    exact = small_model.orm()
    diff = small_model.orm(method="difference")
    assert exact.rf_column is not None and diff.rf_column is not None
    assert _rel(diff.matrix, exact.matrix) < 1e-6
    assert _rel(diff.rf_column, exact.rf_column) < 1e-6
    # the analytic (thin-kick, uncoupled) formula is good to ~1e-3 in the main blocks
    analytic = small_model.orm(method="analytic")
    nb, nh = len(exact.bpms), 24
    for rows, cols in ((slice(0, nb), slice(0, nh)), (slice(nb, None), slice(nh, None))):
        assert _rel(analytic.matrix[rows, cols], exact.matrix[rows, cols]) < 2e-3
    assert analytic.rf_column is not None
    assert _rel(analytic.rf_column, exact.rf_column) < 1e-6
    # the model is unchanged by the differences it took
    np.testing.assert_allclose(small_model.orm().matrix, exact.matrix, rtol=0, atol=1e-9)


def test_linear_orm_function(small_desc: MachineDescription) -> None:
    ring = build_lattice(small_desc)
    bpms = [d.elements[0] for d in small_desc.devices if d.kind == "bpm"]
    cors = [d for d in small_desc.devices if d.kind == "corrector"][::5]
    elements, planes = [d.elements[0] for d in cors], [str(d.plane) for d in cors]
    ref = brute_force_orm(ring, bpms, elements, planes, dct=1e-4)
    assert _rel(linear_orm(ring, bpms, elements, planes, dct=1e-4), ref) < 1e-4


def test_orm_bad_names(small_model: OnlineModel) -> None:
    with pytest.raises(ValueError, match="BPM001 is a bpm, not a corrector"):
        small_model.orm(correctors=["BPM001"])
    with pytest.raises(KeyError, match="NOPE"):
        small_model.orm(bpms=["NOPE"])
    with pytest.raises(ValueError, match="unknown method"):
        small_model.orm(method="magic")
    ring = small_model.lattice
    with pytest.raises(ValueError, match="plane"):
        brute_force_orm(ring, [5], [3], ["z"])
    with pytest.raises(ValueError, match="no float64 array KickAngle"):
        brute_force_orm(ring, [5], [1], ["h"])  # element 1 is a quadrupole


@pytest.mark.ebs
def test_ebs_orm_agrees_with_brute_force(ebs_desc: MachineDescription) -> None:
    model = OnlineModel(ebs_desc)
    rng = np.random.default_rng(3)
    correctors = [d.name for d in ebs_desc.devices if d.kind == "corrector"]
    model.set_hardware({n: float(rng.normal(0.0, 0.05)) for n in correctors})  # ~5 urad
    ring = model.lattice
    bpms = _bpm_elements(ebs_desc, ebs_desc.family("bpms").devices)
    nb = len(bpms)
    # vertical plane (y rows, vertical correctors): the one-sided 1e-6 rad reference is linear
    # to ~1e-6 there. Its x rows are not: y^2 in the sextupoles moves x at second order,
    # ~3e-4 of the largest element with 1e-6 rad kicks.
    vnames = list(rng.choice(ebs_desc.family("vcorr").devices, 6, replace=False))
    resp = model.orm(correctors=vnames, rf=False)
    elements, planes = _corrector_elements(ebs_desc, vnames)
    ref = brute_force_orm(ring, bpms, elements, planes, dct=model.dct)
    assert _rel(resp.matrix[nb:], ref[nb:]) < 1e-4
    assert _rel(resp.matrix, ref) < 2e-3
    # horizontal plane: the EBS sextupoles make the one-sided 1e-6 rad reference itself
    # non-linear at ~5e-4 (second-order orbit); a two-sided reference removes that
    hnames = list(rng.choice(ebs_desc.family("hcorr").devices, 4, replace=False))
    resp = model.orm(correctors=hnames, rf=False)
    elements, planes = _corrector_elements(ebs_desc, hnames)
    up = brute_force_orm(ring, bpms, elements, planes, dct=model.dct, kick=1e-6)
    down = brute_force_orm(ring, bpms, elements, planes, dct=model.dct, kick=-1e-6)
    assert _rel(resp.matrix, 0.5 * (up + down)) < 1e-5
    assert _rel(resp.matrix, up) < 2e-3


def test_quadrupole_orm_is_the_response_of_the_mean_orbit_in_each_quadrupole(
    small_model: OnlineModel,
) -> None:
    """``quadrupole_orm``: the response of the mean of the closed orbit at each quadrupole's
    entrance and exit, against two-sided finite differences of ``find_orbit4`` (a kick per
    corrector) and of the RF frequency; the last quadrupole of the ring included (its exit is
    the ring's end)."""
    desc = small_model.description
    quads = list(desc.family("quadrupoles").devices)
    correctors = [desc.family("hcorr").devices[0], desc.family("vcorr").devices[1]]
    matrix, rf_column = small_model.quadrupole_orm(quads, correctors)
    ring = small_model.lattice
    n = len(ring)
    ends = [(min(desc.device(q).elements), max(desc.device(q).elements) + 1) for q in quads]
    refs = np.array(sorted({e % n for pair in ends for e in pair}), dtype=np.int64)

    def mean_orbit(dct: float) -> np.ndarray:
        _, orbit = at.find_orbit4(ring, dct=dct, refpts=refs)
        row = {int(e): k for k, e in enumerate(refs)}
        mean = np.array([0.5 * (orbit[row[a % n]] + orbit[row[z % n]]) for a, z in ends])
        return np.concatenate([mean[:, 0], mean[:, 2]])

    kick = 1e-6
    expected = np.zeros_like(matrix)
    for j, name in enumerate(correctors):
        (element,) = desc.device(name).elements
        plane = 0 if desc.device(name).plane == "h" else 1
        old = ring[element].KickAngle.copy()
        try:
            diffs = []
            for sign in (1.0, -1.0):
                ring[element].KickAngle = old + sign * kick * np.eye(2)[plane]
                diffs.append(mean_orbit(small_model.dct))
        finally:
            ring[element].KickAngle = old
        expected[:, j] = (diffs[0] - diffs[1]) / (2 * kick)
    assert _rel(matrix, expected) < 1e-4
    f0 = small_model.rf_frequency
    df = 10.0
    dcts = [dct_for_frequency(ring, f0 + sign * df) for sign in (1.0, -1.0)]
    rf_expected = (mean_orbit(dcts[0]) - mean_orbit(dcts[1])) / (2 * df)
    assert _rel(rf_column, rf_expected) < 1e-3
