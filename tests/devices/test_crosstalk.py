"""Multi-channel magnets: a set gives the beam the requested strength (twin truth, cross-talk).

The small ring's SF sextupoles carry four windings each (sextupole, skew quadrupole, horizontal
and vertical corrector; see ``load_description("small")``). A variant description couples them
with a cross-talk matrix; its own twin (renamed prefix, ports from ``twin_ports``) applies the
matrix to its true magnets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from accplans.config import MachineDescription, load_description
from accplans.devices import MagnetFamily, connect
from accplans.sim import TwinPorts, run_twin
from tests.plans.helpers import renamed_description

#: channels S (K2, m^-3), SQ (skew K1, m^-2), HCM, VCM (rad): beam = MATRIX @ nominal
MATRIX = [
    [1.0, 0.0, 50.0, 0.0],
    [1e-4, 1.0, 0.0, 0.0],
    [0.0, 0.0, 1.0, 0.01],
    [0.0, 0.0, 0.02, 1.0],
]
ORDER = ("sextupole", "skew_quadrupole", "corrector/h", "corrector/v")


def _coupled(directory: Path) -> Path:
    small = load_description("small")
    data: dict[str, Any] = small.model_dump(mode="json")
    by_element: dict[int, dict[str, str]] = {}
    for d in small.devices:
        if d.kind in ("sextupole", "skew_quadrupole", "corrector") and d.element_names[0] == "SF":
            key = f"{d.kind}/{d.plane}" if d.kind == "corrector" else d.kind
            by_element.setdefault(d.elements[0], {})[key] = d.name
    groups = [g for g in by_element.values() if set(g) == set(ORDER)]
    assert len(groups) == 8  # every SF has its four windings
    data["crosstalk"] = [{"devices": [g[k] for k in ORDER], "matrix": MATRIX} for g in groups]
    # both corrector windings of every SF in one family: a set of it moves two coupled
    # channels of one magnet at once
    prefix = small.machine.prefix
    data["families"]["sfcorr"] = {
        "kind": "corrector",
        "devices": [g[k] for g in groups for k in ("corrector/h", "corrector/v")],
        "pvs": {"setpoint": f"{prefix}SFCORR:SP", "readback": f"{prefix}SFCORR:RB"},
    }
    return renamed_description(MachineDescription.model_validate(data), "X", directory)


def _truth_values(twin: Any, specs: Any, attr: str, index: int, directory: Path) -> np.ndarray:
    truth = twin.control.export_truth(directory)
    return np.array([getattr(truth.ring[s.elements[0]], attr)[index] for s in specs])


async def test_setting_coupled_channels_gives_the_beam_the_requested_strengths(
    twin_ports: TwinPorts, tmp_path: Path
):
    path = _coupled(tmp_path)
    description = load_description(path)
    with run_twin(path, errors=False, noise=False, ports=twin_ports) as twin:
        machine = await connect(description, address=f"127.0.0.1:{twin.ports.ca}", timeout=10)
        sext, skew, hcorr = machine.sextupoles, machine.skew, machine.hcorr
        assert skew is not None
        sf = [n for n, s in zip(sext.names, sext.specs, strict=True) if s.element_names[0] == "SF"]
        sf_specs = sext.specs_of(sf)
        # correctors kicked, so that they feed the sextupoles through the matrix
        await hcorr.set_strengths(np.full(len(hcorr), 2e-5))
        k2 = await sext.strengths(sf)
        target = k2 * 1.05
        await sext.set_strengths(target, sf)
        true_k2 = _truth_values(twin, sf_specs, "PolynomB", 2, tmp_path / "a")
        np.testing.assert_allclose(true_k2, target, rtol=1e-9)
        # the compensation mattered: the plain calibration of the written currents differs
        nominal = sext.to_strength(await sext.hardware_setpoints(sf), sf)
        assert np.all(np.abs(nominal - target) > 1e-5 * np.abs(target))
        # the family reports what the beam sees
        np.testing.assert_allclose(await sext.strengths(sf), true_k2, rtol=1e-9)
        # skew windings fed by the sextupoles (1e-4 * K2 ~ 1e-3 m^-2): set to 1e-3 m^-2 exactly
        await skew.set_strengths(1e-3)
        true_skew = _truth_values(twin, skew.specs, "PolynomA", 1, tmp_path / "b")
        np.testing.assert_allclose(true_skew, 1e-3, rtol=1e-9)
        # a member alone (Magnet.set) too
        first = sext.members[sext.names.index(sf[0])]
        await first.set(float(target[0]) * 0.9)
        true_k2 = _truth_values(twin, sf_specs[:1], "PolynomB", 2, tmp_path / "c")
        assert true_k2[0] == pytest.approx(float(target[0]) * 0.9, rel=1e-9)
        # changing a corrector changes what the sextupole gives; strengths() follows the truth
        await hcorr.set_strengths(np.full(len(hcorr), -3e-5))
        true_k2 = _truth_values(twin, sf_specs, "PolynomB", 2, tmp_path / "d")
        np.testing.assert_allclose(await sext.strengths(sf), true_k2, rtol=1e-9)
        # H and V windings of one magnet set together: solved jointly (each one solved with
        # the other held at its old current would miss by 0.01-0.02 of the other's change)
        both = machine.families["sfcorr"]
        assert isinstance(both, MagnetFamily)
        h_specs, v_specs = both.specs[0::2], both.specs[1::2]
        kicks = np.tile([4e-5, -6e-5], len(h_specs))
        kicks[::2] += 1e-6 * np.arange(len(h_specs))
        await both.set_strengths(kicks)
        true_h = _truth_values(twin, h_specs, "KickAngle", 0, tmp_path / "e")
        true_v = _truth_values(twin, v_specs, "KickAngle", 1, tmp_path / "f")
        np.testing.assert_allclose(true_h, kicks[0::2], rtol=1e-9)
        np.testing.assert_allclose(true_v, kicks[1::2], rtol=1e-9)
        np.testing.assert_allclose(await both.strengths(), kicks, rtol=1e-9)
