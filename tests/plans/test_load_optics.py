"""load_optics on an error-free twin: the machine ends up with the optics of the file loaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import at
import numpy as np
import pytest
from bluesky import RunEngine

from accplans.config import MachineDescription, build_lattice, load_description
from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine, call_async
from accplans.model import strengths_from_lattice
from accplans.plans import load_optics
from accplans.sim import TwinPorts, TwinProcess, run_twin
from tests.plans.faults import InjectedFault, fail_after_sets
from tests.plans.helpers import (
    assert_same_setpoints,
    connect_to,
    drop_ca_channels,
    hardware_setpoints,
    primary_events,
    renamed_description,
    run_plan,
    written_run,
)
from tests.plans.test_snapshots import served

#: Tune shift (fractional, both planes) of the file loaded.
DQ = (0.04, -0.03)


@pytest.fixture(scope="module")
def perfect(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MachineDescription, TwinProcess]]:
    """An error-free, noiseless small-ring twin under its own prefix (ports of the pool)."""
    from tests.conftest import _SPARE  # a module-scoped twin cannot use the twin_ports fixture

    ports: TwinPorts = _SPARE.pop(0)
    directory = tmp_path_factory.mktemp("perfect")
    yaml = renamed_description(load_description("small"), "P", directory)
    try:
        with run_twin(yaml, errors=False, noise=False, ports=ports) as twin:
            yield load_description(yaml), twin
    finally:
        _SPARE.append(ports)


@pytest.fixture
def perfect_machine(
    run_engine: RunEngine, perfect: tuple[MachineDescription, TwinProcess]
) -> Iterator[Machine]:
    description, twin = perfect
    twin.control.reset(0)
    machine = connect_to(twin, description)
    yield machine
    drop_ca_channels()


def _shifted_optics(description: MachineDescription, path: Path) -> at.Lattice:
    """The description's lattice with its tunes moved by DQ through the QF and QD families."""
    ring = build_lattice(description)
    tunes = ring.get_tune()[:2]
    at.fit_tune(ring, "QF", "QD", tunes + np.array(DQ), KStep=1e-5)
    at.save_lattice(ring, str(path))
    return ring


def _optics(ring: at.Lattice, bpms: np.ndarray, dct: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    _, ringdata, data = at.linopt6(ring, refpts=bpms, dct=dct)
    return np.asarray(ringdata.tune)[:2], np.asarray(data.beta)


def _bpms(description: MachineDescription) -> np.ndarray:
    names = description.families["bpms"].devices
    return np.array([description.device(n).elements[0] for n in names], dtype=np.uint32)


def test_a_lattice_file_loads_its_tunes_and_beta_functions(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    perfect_machine: Machine,
    perfect: tuple[MachineDescription, TwinProcess],
    tmp_path: Path,
    journal: Path,
) -> None:
    """The twin's truth after the load has the file's tunes (1e-3) and beta functions at the
    BPMs (1 %); the run records the optics and ramps in three steps."""
    description, twin = perfect
    machine = perfect_machine
    bpms = _bpms(description)
    path = tmp_path / "shifted.mat"
    wanted = _shifted_optics(description, path)
    want_tunes, want_beta = _optics(wanted, bpms)
    start_tunes, start_beta = _optics(twin.control.export_truth(tmp_path / "t0").ring, bpms)
    # the load has something to do: tunes 0.03-0.04 away, beta functions 2.7 % away
    assert np.all(np.abs(start_tunes - want_tunes) > 0.02)
    assert np.max(np.abs(start_beta / want_beta - 1)) > 0.02

    families = [machine.quadrupoles, machine.sextupoles]
    result = run_plan(run_engine, load_optics(families, str(path), steps=3))
    assert result.exit_status == "success"
    truth = twin.control.export_truth(tmp_path / "t1")
    tunes, beta = _optics(truth.ring, bpms, truth.dct_m)
    beta_error = np.max(np.abs(beta / want_beta - 1))
    print(
        f"\nload_optics: tunes {tunes} (file {want_tunes}, |dQ| {np.abs(tunes - want_tunes)}), "
        f"max beta error {beta_error:.2e} (was {np.max(np.abs(start_beta / want_beta - 1)):.2e})"
    )
    np.testing.assert_allclose(tunes, want_tunes, atol=1e-3)
    assert beta_error < 0.01

    uid = result.run_start_uids[0]
    run = written_run(client, writer, uid)
    assert primary_events(run) == 3
    optics = load_result(client, uid, "optics")
    np.testing.assert_allclose(optics["tunes"], want_tunes, atol=1e-9)
    found = strengths_from_lattice(description, path)
    names = [*machine.quadrupoles.names, *machine.sextupoles.names]
    assert list(optics["device_names"]) == names
    np.testing.assert_allclose(optics["hardware"], found.hardware_of(names))
    set_now = hardware_setpoints(families)
    np.testing.assert_allclose(set_now["quadrupoles"], found.hardware_of(machine.quadrupoles.names))

    # the stored optics loads again (from the run), after going back to the design
    twin.control.reset(0)
    again = run_plan(run_engine, load_optics(families, uid, steps=1, client=client))
    assert again.exit_status == "success"
    np.testing.assert_allclose(hardware_setpoints(families)["quadrupoles"], set_now["quadrupoles"])


def test_a_load_that_fails_mid_way_puts_the_quadrupoles_back(
    run_engine: RunEngine,
    perfect_machine: Machine,
    perfect: tuple[MachineDescription, TwinProcess],
    tmp_path: Path,
    journal: Path,
) -> None:
    description, twin = perfect
    machine = perfect_machine
    path = tmp_path / "shifted.mat"
    _shifted_optics(description, path)
    families = [machine.quadrupoles, machine.sextupoles]
    before = hardware_setpoints(families)
    seen: dict[str, np.ndarray] = {}

    def observe() -> None:  # in the RunEngine's thread: through the twin's own client
        seen.update(served(twin, description, ["quadrupoles", "sextupoles"]))

    with pytest.raises(InjectedFault):
        run_engine(fail_after_sets(load_optics(families, str(path), steps=3), 2, observe))
    assert np.any(seen["quadrupoles"] != before["quadrupoles"])
    assert_same_setpoints(hardware_setpoints(families), before)


def test_a_file_of_another_lattice_or_out_of_limits_is_refused_before_any_move(
    run_engine: RunEngine,
    perfect_machine: Machine,
    perfect: tuple[MachineDescription, TwinProcess],
    tmp_path: Path,
    journal: Path,
) -> None:
    description, _ = perfect
    machine = perfect_machine
    families = [machine.quadrupoles]
    before = hardware_setpoints([machine.quadrupoles, machine.sextupoles])
    other = tmp_path / "ebs.mat"
    at.save_lattice(build_lattice(load_description("ebs"))[:200], str(other))
    with pytest.raises(ValueError, match="is not the description's lattice"):
        run_engine(load_optics(families, str(other)))
    unstable = build_lattice(description)
    unstable[description.device("Q003").elements[0]].PolynomB[1] *= 1.5
    path = tmp_path / "unstable.mat"
    at.save_lattice(unstable, str(path))
    with pytest.raises(ValueError, match="no stable optics"):
        run_engine(load_optics(families, str(path)))
    strong = build_lattice(description)
    element = {n: description.device(n).elements[0] for n in machine.sextupoles.names}
    name = max(element, key=lambda n: abs(strong[element[n]].PolynomB[2]))
    strong[element[name]].PolynomB[2] *= 1.5  # the strongest is at 80 % of its limit: 120 %
    path = tmp_path / "strong.mat"
    at.save_lattice(strong, str(path))
    with pytest.raises(ValueError, match=rf"{name}: -?120 A is outside its limits \[-100, 100\]"):
        run_engine(load_optics([*families, machine.sextupoles], str(path)))
    with pytest.raises(ValueError, match="does not exist"):
        run_engine(load_optics(families, str(tmp_path / "missing.mat")))
    assert_same_setpoints(hardware_setpoints([machine.quadrupoles, machine.sextupoles]), before)


def test_a_load_of_some_channels_of_coupled_magnets_holds_the_others(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    twin_ports: TwinPorts,
    tmp_path: Path,
    journal: Path,
) -> None:
    """Cross-talk (tests/devices/test_crosstalk.py): every SF carries a sextupole, a skew and
    two corrector windings, coupled by a matrix. Loading the quadrupoles, sextupoles and skew
    quadrupoles of a JSON lattice file while the correctors are kicked gives the beam the file's
    K2 and skew K1 on every SF (twin truth, 1e-9) and leaves the corrector currents alone; the
    stored optics loads the same way after the correctors moved."""
    from tests.devices.test_crosstalk import _coupled

    yaml = _coupled(tmp_path)
    description = load_description(yaml)
    ring = build_lattice(description)
    sf = [d for d in description.devices if d.element_names and d.element_names[0] == "SF"]
    sf_elements = sorted({d.elements[0] for d in sf})
    for k, e in enumerate(sf_elements):
        ring[e].PolynomB[2] *= 1.05 + 0.01 * k
        ring[e].PolynomA[1] = 1e-3 * (1 + 0.1 * k)
    path = tmp_path / "coupled.json"
    at.save_lattice(ring, str(path))

    def assert_beam_has_the_file(truth_dir: Path) -> None:
        truth = twin.control.export_truth(truth_dir).ring
        for e in sf_elements:
            assert truth[e].PolynomB[2] == pytest.approx(ring[e].PolynomB[2], rel=1e-9)
            assert truth[e].PolynomA[1] == pytest.approx(ring[e].PolynomA[1], rel=1e-9)

    with run_twin(yaml, errors=False, noise=False, ports=twin_ports) as twin:
        machine = connect_to(twin, description)
        assert machine.skew is not None
        run_engine(call_async(machine.hcorr.set_strengths, 2e-5))
        run_engine(call_async(machine.vcorr.set_strengths, -1e-5))
        correctors = hardware_setpoints([machine.hcorr, machine.vcorr])
        families = [machine.quadrupoles, machine.sextupoles, machine.skew]
        result = run_plan(run_engine, load_optics(families, str(path), steps=2))
        assert result.exit_status == "success"
        assert_beam_has_the_file(tmp_path / "t1")
        assert_same_setpoints(hardware_setpoints([machine.hcorr, machine.vcorr]), correctors)
        # the hold mattered: the file's own currents (correctors at the file's zero kick)
        # differ from those written
        found = strengths_from_lattice(description, path)
        sext = [d.name for d in sf if d.kind == "sextupole"]
        written = hardware_setpoints([machine.sextupoles])["sextupoles"]
        written = written[[machine.sextupoles.names.index(n) for n in sext]]
        assert np.all(np.abs(written - found.hardware_of(sext)) > 1e-6 * np.abs(written))
        # the stored optics, with the correctors moved meanwhile
        uid = result.run_start_uids[0]
        writer.flush(timeout=60)
        run_engine(call_async(machine.hcorr.set_strengths, -3e-5))
        again = run_plan(run_engine, load_optics(families, uid, steps=1, client=client))
        assert again.exit_status == "success"
        assert_beam_has_the_file(tmp_path / "t2")
        drop_ca_channels()
