"""measure_orm against the physics: pyAT's ORM of the lattice the twin serves, and its noise.

Agreement figures are ``max |measured - reference| / max |reference|`` per block (x and y rows
of horizontal and vertical correctors); a cross-plane block that is zero in the reference (the
error-free machine has no coupling) is normalised by the largest element of the whole matrix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bluesky import RunEngine

from accplans.config import MachineDescription, build_lattice, load_description
from accplans.data import BackgroundTiledWriter, load_result
from accplans.devices import Machine
from accplans.model import dct_for_frequency
from accplans.physics import chi2_per_dof, orm_relative_difference
from accplans.plans import measure_orm
from accplans.sim import ErrorModel, TwinPorts, TwinProcess, run_twin
from tests.plans.helpers import (
    as_read_by_bpms,
    assert_same_setpoints,
    block_agreement,
    bpm_elements,
    connect_to,
    drop_ca_channels,
    machine_setpoints,
    model_rf_column,
    reference_orm,
    renamed_description,
    run_plan,
    written_run,
)

TOLERANCE = 2e-3  # per block, relative to the block's largest element


@contextmanager
def _perfect_twin(
    machine: str, ports: TwinPorts, directory: Path
) -> Iterator[tuple[TwinProcess, MachineDescription]]:
    """A twin of ``machine`` with no errors and no noise, under its own PV prefix (connect to it
    in the test's RunEngine loop, which must outlive it)."""
    path = renamed_description(load_description(machine), "P", directory)
    with run_twin(path, errors=False, noise=False, ports=ports) as twin:
        yield twin, load_description(path)
        drop_ca_channels()


@pytest.fixture
def perfect_small(
    run_engine: RunEngine, twin_ports: TwinPorts, tmp_path: Path
) -> Iterator[tuple[TwinProcess, MachineDescription]]:
    """The small ring with no errors and no noise (its own process and prefix)."""
    with _perfect_twin("small", twin_ports, tmp_path) as twin:
        yield twin


@pytest.fixture
def perfect_ebs(
    run_engine: RunEngine, twin_ports: TwinPorts, tmp_path: Path
) -> Iterator[tuple[TwinProcess, MachineDescription]]:
    """The EBS-size ring with no errors and no noise (its own process and prefix)."""
    with _perfect_twin("ebs", twin_ports, tmp_path) as twin:
        yield twin


@dataclass
class Measured:
    """A measure_orm run: its result, the RF step it took (Hz, NaN without RF), its time (s)."""

    result: Any
    rf_step: float
    seconds: float

    @property
    def data(self) -> dict[str, Any]:
        return self.result.data


def _measure(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    **kwargs: Any,
) -> Measured:
    """Run measure_orm on both families, check it restored everything, load its result."""
    before = machine_setpoints(machine)
    t0 = time.perf_counter()
    result = run_plan(
        run_engine, measure_orm(machine.bpms, [machine.hcorr, machine.vcorr], **kwargs)
    )
    elapsed = time.perf_counter() - t0
    assert result.exit_status == "success"
    assert_same_setpoints(machine_setpoints(machine), before)
    (uid,) = result.run_start_uids
    steps = written_run(client, writer, uid)["primary"].read()
    rf_rows = np.asarray(steps["step-corrector"]) == "RF"
    rf_steps = np.asarray(steps["step-rf_step"])[rf_rows]
    rf_step = float(np.max(rf_steps)) if rf_rows.any() else np.nan
    if rf_rows.any():  # an RF row records its frequency step, not a kick
        assert np.all(np.asarray(steps["step-kick"])[rf_rows] == 0.0)
        np.testing.assert_allclose(np.asarray(steps["step-rf_step_readback"])[rf_rows], rf_steps)
    return Measured(load_result(client, uid, "orm"), rf_step, elapsed)


def _check_against_design(
    measured: Measured, description: MachineDescription, machine: Machine, label: str
) -> dict[str, float]:
    """Blocks and RF column of ``result`` against the description's lattice (the twin has no
    errors): brute_force_orm at the served frequency, RF column by finite difference."""
    data = measured.data
    names, planes = list(data["corrector_names"]), list(data["corrector_planes"])
    ring = build_lattice(description)
    (f_served,) = machine_setpoints(machine)["RF"]
    dct = dct_for_frequency(ring, f_served)
    reference = reference_orm(ring, description, names, dct=dct)
    figures = block_agreement(data["matrix"], reference, planes)
    rf_model = model_rf_column(ring, bpm_elements(description), f_served, measured.rf_step)
    figures["rf"] = orm_relative_difference(data["rf_column"], rf_model)
    print(
        f"\n{label} ({measured.seconds:.1f} s): dct {dct:.3g} m at {f_served:.1f} Hz, "
        f"RF step {measured.rf_step:.4g} Hz; agreement {figures}"
    )
    return figures


def test_orm_of_the_error_free_small_ring_is_pyats(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    perfect_small: tuple[TwinProcess, MachineDescription],
) -> None:
    """Every corrector of both planes, RF column: each block within 2e-3 of brute_force_orm."""
    twin, small = perfect_small
    machine = connect_to(twin, small)
    measured = _measure(run_engine, writer, client, machine, rf=machine.rf)
    data = measured.data
    assert data["matrix"].shape == (32, 48)
    assert data["valid"].all()
    assert list(data["corrector_names"]) == list(machine.hcorr.names) + list(machine.vcorr.names)
    np.testing.assert_allclose(data["kicks"], 40e-6, rtol=1e-3)
    figures = _check_against_design(measured, small, machine, "small")
    assert max(figures.values()) < TOLERANCE, figures


@pytest.mark.ebs
def test_orm_of_the_error_free_ebs_ring_is_pyats(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    perfect_ebs: tuple[TwinProcess, MachineDescription],
) -> None:
    """EBS, 12 correctors per plane spread round the ring (every 24th of 288: horizontal
    HCM001, HCM025, ..., HCM265; vertical VCM013, VCM037, ..., VCM277) and the RF column.

    Kicks of +-10 urad: with the default +-40 urad the x/h block is off by 2.9e-3, the third
    order of EBS's sextupoles (pyAT's own +-40 urad differences give the same 2.9e-3); at
    10 urad it is 1.8e-4, below the one-sided reference's own 5e-4.
    """
    twin, ebs = perfect_ebs
    machine = connect_to(twin, ebs)
    select = [machine.hcorr.names[i] for i in range(0, 288, 24)]
    select += [machine.vcorr.names[i] for i in range(12, 288, 24)]
    measured = _measure(
        run_engine, writer, client, machine, select=select, kick=10e-6, rf=machine.rf
    )
    assert measured.data["matrix"].shape == (640, 24)
    assert list(measured.data["corrector_names"]) == select
    figures = _check_against_design(measured, ebs, machine, "EBS")
    assert max(figures.values()) < TOLERANCE, figures


def _truth_reference(
    twin: TwinProcess,
    description: MachineDescription,
    names: list[str],
    tmp_path: Path,
    rf_step: float = 20.0,
) -> tuple[np.ndarray, np.ndarray]:
    """ORM and RF column of the twin's true lattice as its BPMs read them, in nominal kicks.

    The true lattice's response to a true kick, times each corrector's calibration error (the
    plan divides by the nominal kick), read through each BPM's gain and roll. Two-sided
    brute-force kicks: the cross-plane blocks are ~1e-3 of the largest element here, and a
    one-sided reference's second-order error (5e-6 of the largest element) would be 0.4% of
    them.
    """
    truth = twin.control.export_truth(tmp_path / "truth")
    reference = reference_orm(
        truth.ring, description, names, dct=truth.dct_m, bpms=truth.bpm_elements, two_sided=True
    )
    reference *= np.array([truth.corrector_scale(n) for n in names])
    rf = model_rf_column(truth.ring, truth.bpm_elements, truth.rf_frequency_hz, rf_step)
    gain, roll = truth["bpm_gain"], truth["bpm_roll_rad"]
    return as_read_by_bpms(reference, gain, roll), as_read_by_bpms(rf, gain, roll)


@pytest.mark.twin(noise=False)
def test_orm_of_a_machine_with_errors_is_the_true_lattices(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    small: MachineDescription,
    tmp_path: Path,
) -> None:
    """Seeded errors (seed 1), no noise: the measured ORM is the true lattice's, read through
    the BPM gains and rolls and scaled by the corrector calibration errors; not the design's."""
    measured = _measure(run_engine, writer, client, machine, rf=machine.rf)
    data = measured.data
    names, planes = list(data["corrector_names"]), list(data["corrector_planes"])
    reference, rf_reference = _truth_reference(
        fresh_small_twin, small, names, tmp_path, measured.rf_step
    )
    figures = block_agreement(data["matrix"], reference, planes)
    figures["rf"] = orm_relative_difference(data["rf_column"], rf_reference)
    # the errors matter at this tolerance: the design lattice's ORM is far off
    design = reference_orm(build_lattice(small), small, names, dct=0.0)
    design_figures = block_agreement(data["matrix"], design, planes)
    print(f"\nseeded small ({measured.seconds:.1f} s): truth {figures}; design {design_figures}")
    assert max(figures.values()) < TOLERANCE, figures
    assert min(design_figures[b] for b in ("x/h", "y/v")) > 5 * TOLERANCE, design_figures


@pytest.mark.twin(noise=False)
def test_orm_noise_gives_the_expected_chi_square(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    small: MachineDescription,
    tmp_path: Path,
) -> None:
    """With BPM noise on (ErrorModel().bpm_noise_m per reading): chi-square per degree of
    freedom of the measured matrix against the noise-free one (same machine), using the
    plan's per-element standard errors, is 1 within statistics (1536 elements)."""
    noise = ErrorModel().bpm_noise_m
    quiet = _measure(run_engine, writer, client, machine, bpm_noise=noise)
    fresh_small_twin.control.set_noise(True)
    noisy = _measure(run_engine, writer, client, machine, bpm_noise=noise)
    sigma = noisy.data["noise"]
    np.testing.assert_allclose(sigma, np.sqrt(2) * noise / (2 * 40e-6), rtol=1e-3)
    chi2 = chi2_per_dof(noisy.data["matrix"], quiet.data["matrix"], sigma)
    names = list(noisy.data["corrector_names"])
    truth_reference, _ = _truth_reference(fresh_small_twin, small, names, tmp_path)
    chi2_truth = chi2_per_dof(noisy.data["matrix"], truth_reference, sigma)
    print(
        f"\nnoisy small ({noisy.seconds:.1f} s): chi2/dof {chi2:.3f} "
        f"(against the truth model: {chi2_truth:.3f})"
    )
    assert 0.8 < chi2 < 1.25
    assert 0.8 < chi2_truth < 1.25


@pytest.mark.ebs
@pytest.mark.twin(noise=False)
def test_orm_of_the_ebs_ring_with_errors_is_the_true_lattices(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    fresh_ebs_twin: TwinProcess,
    tmp_path: Path,
) -> None:
    """EBS with seeded errors (seed 1, an uncorrected orbit of several hundred um), 8
    correctors per plane spread round the ring, +-10 urad, RF column: the true lattice's ORM as
    its BPMs read it, each block within 2e-3."""
    ebs = load_description("ebs")
    machine = connect_to(fresh_ebs_twin, ebs)
    select = [machine.hcorr.names[i] for i in range(5, 288, 36)]
    select += [machine.vcorr.names[i] for i in range(23, 288, 36)]
    measured = _measure(
        run_engine, writer, client, machine, select=select, kick=10e-6, rf=machine.rf
    )
    data = measured.data
    names, planes = list(data["corrector_names"]), list(data["corrector_planes"])
    assert names == select
    reference, rf_reference = _truth_reference(
        fresh_ebs_twin, ebs, names, tmp_path, measured.rf_step
    )
    figures = block_agreement(data["matrix"], reference, planes)
    figures["rf"] = orm_relative_difference(data["rf_column"], rf_reference)
    print(f"\nseeded EBS ({measured.seconds:.1f} s): truth {figures}")
    assert max(figures.values()) < TOLERANCE, figures


@pytest.mark.twin(noise=False)
def test_orm_with_averaged_frames_has_the_noise_of_the_mean(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    small: MachineDescription,
    tmp_path: Path,
) -> None:
    """``n_frames=4``, noise on: every step records 4 later frames and uses their mean, the
    plan's standard errors are those of one frame over sqrt(4), and the matrix scatters
    about the twin's true ORM with exactly those errors (chi2/dof ~ 1; the standard errors
    of one frame would give ~1/4). The frames and n_frames are in the run."""
    noise = ErrorModel().bpm_noise_m
    n = 4
    select = list(range(0, 48, 2))
    fresh_small_twin.control.set_noise(True)
    one = _measure(run_engine, writer, client, machine, select=select, bpm_noise=noise)
    four = _measure(run_engine, writer, client, machine, select=select, bpm_noise=noise, n_frames=n)
    sigma1 = np.sqrt(2) * noise / (2 * 40e-6)
    np.testing.assert_allclose(one.data["noise"], sigma1, rtol=1e-3)
    np.testing.assert_allclose(four.data["noise"], sigma1 / np.sqrt(n), rtol=1e-3)
    assert four.data["n_frames"] == n and one.data["n_frames"] == 1
    names = list(four.data["corrector_names"])
    reference, _ = _truth_reference(fresh_small_twin, small, names, tmp_path)
    chi2_one = chi2_per_dof(one.data["matrix"], reference, one.data["noise"])
    chi2_four = chi2_per_dof(four.data["matrix"], reference, four.data["noise"])
    rms_one = np.sqrt(np.mean((one.data["matrix"] - reference) ** 2))
    rms_four = np.sqrt(np.mean((four.data["matrix"] - reference) ** 2))
    print(
        f"\n1 frame ({one.seconds:.1f} s): chi2/dof {chi2_one:.3f}, rms {rms_one:.3g} m/rad; "
        f"{n} frames ({four.seconds:.1f} s): chi2/dof {chi2_four:.3f}, rms {rms_four:.3g} "
        f"m/rad (ratio {rms_one / rms_four:.2f}, sqrt({n}) = {np.sqrt(n):.2f})"
    )
    assert 0.8 < chi2_one < 1.25  # 768 elements each
    assert 0.8 < chi2_four < 1.25
    uid = four.result.uid
    steps = client[uid]["primary"].read()
    frames = np.asarray(steps["step-frame"])
    assert len(frames) == 2 * len(select) * n
    np.testing.assert_array_equal(frames, np.tile(np.arange(n), 2 * len(select)))
    counters = np.asarray(steps["orbit-counter"]).reshape(-1, n)
    bad = np.flatnonzero(np.any(np.diff(counters, axis=1) <= 0, axis=1))
    assert bad.size == 0, (counters[bad], np.asarray(steps["orbit-frame_time"]).reshape(-1, n)[bad])
    assert client[uid].metadata["start"]["n_frames"] == n
    assert client[uid].metadata["start"]["plan_args"]["n_frames"] == n
