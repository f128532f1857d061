"""strengths_from_lattice (load_optics' reader): every lattice format pyAT writes gives the
strengths of the lattice it was written from, through the calibrations, and its optics."""

from __future__ import annotations

from pathlib import Path

import at
import numpy as np
import pytest

from accplans.config import MachineDescription, build_lattice, parse_field
from accplans.model import strengths_from_lattice

#: pyAT's writers: (extension, ``use`` when reading back, whether the format carries the SF
#: windings: elegant and MAD-X files have no corrector kick or skew component on a sextupole).
FORMATS = [
    pytest.param(".mat", None, True, id=".mat"),
    pytest.param(".m", None, True, id=".m"),
    pytest.param(".json", None, True, id=".json"),
    pytest.param(".repr", None, True, id=".repr"),
    pytest.param(".lte", "small", False, id=".lte"),
    pytest.param(
        ".seq",
        "small",
        False,
        id=".seq",
        # pyAT's MAD-X reader warns that tracking assumes beta = 1 for every particle it reads
        marks=pytest.mark.filterwarnings("ignore:AT tracking still assumes beta==1"),
    ),
]
WINDINGS = ("corrector", "skew_quadrupole")


def _fitted(description: MachineDescription, windings: bool) -> at.Lattice:
    """The small ring with every quadrupole and sextupole its own strength (a fitted lattice's
    elements of one name differ: elegant and MAD-X writers rename them ``QF.1``, ...), and
    with ``windings`` kicks and skew gradients on its SF windings."""
    ring = build_lattice(description)
    rng = np.random.default_rng(11)
    for dev in description.devices:
        if not dev.elements or (dev.kind in WINDINGS and not windings):
            continue
        e = ring[dev.elements[0]]
        if dev.kind == "quadrupole":
            e.PolynomB[1] = e.PolynomB[1] * (1 + 2e-3 * rng.uniform(-1, 1))
        elif dev.kind == "sextupole":
            e.PolynomB[2] = e.PolynomB[2] * (1 + 5e-2 * rng.uniform(-1, 1))
        elif dev.kind == "skew_quadrupole":
            e.PolynomA[1] = 1e-3 * rng.uniform(-1, 1)
        elif dev.kind == "corrector":
            kick = np.array(getattr(e, "KickAngle", [0.0, 0.0]), dtype=float)
            kick[0 if dev.plane == "h" else 1] = 2e-5 * rng.uniform(-1, 1)
            e.KickAngle = kick
    return ring


@pytest.mark.parametrize(("ext", "use", "windings"), FORMATS)
def test_every_format_gives_the_strengths_and_optics_of_its_lattice(
    small_desc: MachineDescription, tmp_path: Path, ext: str, use: str | None, windings: bool
) -> None:
    ring = _fitted(small_desc, windings)
    kinds = ("quadrupole", "sextupole", *(WINDINGS if windings else ()))
    path = tmp_path / f"fitted{ext}"
    at.save_lattice(ring, str(path))
    found = strengths_from_lattice(small_desc, path, use, kinds=kinds)
    devices = [d for d in small_desc.devices if d.kind in kinds]
    assert list(found.names) == [d.name for d in devices]
    assert {d.kind for d in devices} == set(kinds)
    # every device's hardware value gives, through its calibration, the lattice's strength
    for dev, hardware in zip(devices, found.hardware, strict=True):
        assert dev.calibration is not None and dev.field is not None
        attr, index = parse_field(dev.field)
        value = getattr(ring[dev.elements[0]], attr)
        want = float(value if index is None else np.ravel(value)[index])
        got = float(dev.calibration.to_strength(hardware))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), dev.name
    _, ringdata, data = at.linopt6(
        ring, refpts=[small_desc.device(b).elements[0] for b in found.bpm_names]
    )
    np.testing.assert_allclose(found.tunes, np.asarray(ringdata.tune)[:2], atol=1e-12)
    np.testing.assert_allclose(found.beta, data.beta, rtol=1e-9)
