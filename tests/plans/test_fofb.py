"""design_fofb on the small twin: the design is recorded, loads back, exports; nothing moves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bluesky.preprocessors as bpp
import numpy as np
import pytest
from bluesky import RunEngine

from accplans.cli import main
from accplans.config import MachineDescription
from accplans.data import BackgroundTiledWriter, LocalTiled, Result, load_result, record_result
from accplans.devices import Machine
from accplans.model import OnlineModel
from accplans.physics import FofbUnstable
from accplans.plans import design_fofb, export_fofb_matrices, read_fofb_matrices, shutdown_workers
from accplans.plans.fofb import handover_matrix
from accplans.sim import TwinProcess
from tests.plans.helpers import (
    assert_same_setpoints,
    machine_setpoints,
    reference_orm,
    run_plan,
    written_run,
)

FAST = list(range(0, 48, 2))  # every other corrector of hcorr + vcorr (24 + 24) is fast


def _truth_orm(twin: TwinProcess, small: MachineDescription, machine: Machine, tmp: Path) -> Result:
    """The twin's true ORM (true lattice, corrector calibration errors) as an ``orm`` result."""
    truth = twin.control.export_truth(tmp / "truth")
    names = [*machine.hcorr.names, *machine.vcorr.names]
    matrix = reference_orm(truth.ring, small, names, dct=truth.dct_m, bpms=truth.bpm_elements)
    matrix = matrix * np.array([truth.corrector_scale(n) for n in names])
    n = len(machine.bpms.names)
    planes = ["h"] * len(machine.hcorr.names) + ["v"] * len(machine.vcorr.names)
    return Result(
        kind="orm",
        version=1,
        uid="truth-of-the-twin",
        data={
            "matrix": matrix,
            "rf_column": None,
            "bpm_names": list(machine.bpms.names),
            "corrector_names": names,
            "corrector_planes": planes,
            "kicks": np.full(len(names), 1e-6),
            "noise": np.zeros((2 * n, len(names))),
            "valid": np.ones((2 * n, len(names)), bool),
        },
        metadata={},
    )


def test_design_from_the_true_orm_is_recorded_and_exported(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    small: MachineDescription,
    tmp_path: Path,
) -> None:
    orm = _truth_orm(fresh_small_twin, small, machine, tmp_path)
    before = machine_setpoints(machine)
    orbit_before = fresh_small_twin.control.export_truth(tmp_path / "t0").closed_orbit()
    result = run_plan(
        run_engine,
        design_fofb(
            machine.bpms,
            machine.hcorr,
            machine.vcorr,
            orm=orm,
            fast_correctors=FAST,
            n_samples=4096,
            n_frequencies=60,
        ),
    )
    assert result.exit_status == "success"
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    design = load_result(client, uid, "fofb_design")
    d = design.data

    # nothing moved: every setpoint as before and the true beam where it was
    assert_same_setpoints(machine_setpoints(machine), before)
    orbit_after = fresh_small_twin.control.export_truth(tmp_path / "t1").closed_orbit()
    assert np.allclose(orbit_after, orbit_before, atol=1e-12)

    # the matrices come from the twin's true ORM, in family order
    n = len(machine.bpms.names)
    assert d["orm_source"] == "truth-of-the-twin"
    assert np.allclose(d["orm_x"], orm["matrix"][:n, :24], rtol=0, atol=1e-15)
    assert np.allclose(d["orm_y"], orm["matrix"][n:, 24:], rtol=0, atol=1e-15)
    fast_h = np.asarray(d["fast_h"])
    assert fast_h.tolist() == [i % 2 == 0 for i in range(24)]
    for p, mask in (("x", fast_h), ("y", np.asarray(d["fast_v"]))):
        k, r = np.asarray(d[f"inverse_{p}"]), np.asarray(d[f"orm_{p}"])
        assert np.all(k[~mask] == 0)  # slow correctors get nothing from the fast matrix
        # R_f K has the loop weights g s phi as eigenvalues: the inverse inverts the true ORM
        weights = d[f"mode_gains_{p}"] * d[f"singular_values_{p}"] * d[f"mode_filter_{p}"]
        eig = np.sort(np.linalg.eigvals(r[:, mask] @ k[mask]).real)[::-1][: weights.size]
        assert np.allclose(eig, np.sort(weights)[::-1], atol=1e-9)
        assert weights.max() > 0.99
        # hand-over: slow rows, fast columns only
        h = handover_matrix(design, p)
        assert np.all(h[:, ~mask] == 0) and np.all(h[mask] == 0) and np.abs(h).max() > 0
        # the acceptance figures
        assert d[f"simulation_error_db_{p}"] < 0.5
        assert d[f"dc_attenuation_db_{p}"] >= 40
        assert d[f"gain_margin_db_{p}"] >= 6 and d[f"phase_margin_deg_{p}"] >= 30
        assert d[f"max_pole_{p}"] < 1
        assert d[f"attenuation_{p}"].shape == (12, 60)
        print(
            f"\n{p}: DC {d[f'dc_attenuation_db_{p}']:.1f} dB, 0 dB at "
            f"{d[f'bandwidth_hz_{p}']:.0f} Hz, GM {d[f'gain_margin_db_{p}']:.1f} dB, PM "
            f"{d[f'phase_margin_deg_{p}']:.1f} deg, "
            f"sim error {d[f'simulation_error_db_{p}']:.1e} dB"
        )
    assert design.metadata["units"]["inverse_x"] == "rad/m"
    assert design.metadata["start"]["plan_name"] == "design_fofb"

    # export round trip
    path = export_fofb_matrices(design, tmp_path / "fofb.h5")
    back = read_fofb_matrices(path)
    assert back["attrs"]["format"] == "accplans-fofb"
    assert back["attrs"]["design_uid"] == uid
    assert back["attrs"]["orm_source"] == "truth-of-the-twin"
    assert back["attrs"]["machine_id"] == small.machine.id
    assert back["loop"]["sampling_hz"] == 10e3 and back["loop"]["latency_samples"] == 2
    assert back["bpm_names"] == list(machine.bpms.names)
    names_h = np.array(machine.hcorr.names)
    assert back["x"]["fast_names"] == names_h[fast_h].tolist()
    assert back["x"]["slow_names"] == names_h[~fast_h].tolist()
    assert np.array_equal(back["x"]["inverse"], np.asarray(d["inverse_x"])[fast_h])
    assert np.array_equal(back["x"]["orm_fast"], orm["matrix"][:n, :24][:, fast_h])
    assert np.array_equal(back["y"]["singular_values"], d["singular_values_y"])
    assert back["x"]["handover"].shape == (12, 12)


def test_design_from_the_online_model_and_the_cli_export(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    tiled: LocalTiled,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    small: MachineDescription,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """orm=None: the online model's ORM at the twin's current setpoints (not the truth), which
    is close to the true one (the twin has errors); then ``accplans fofb export``."""
    result = run_plan(
        run_engine,
        design_fofb(
            machine.bpms,
            machine.hcorr,
            machine.vcorr,
            fast_correctors=FAST,
            n_samples=2048,
            n_frequencies=30,
            handover_hz=0.0,
        ),
    )
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    d = load_result(client, uid, "fofb_design").data
    assert d["orm_source"] == "model"
    hardware = {
        n: float(v)
        for fam in (machine.hcorr, machine.vcorr)
        for n, v in zip(fam.names, machine_setpoints(machine)[fam.name], strict=True)
    }
    model = OnlineModel(small)
    model.set_hardware(hardware)
    expected = model.orm(list(machine.bpms.names), list(machine.hcorr.names), rf=False).matrix
    assert np.allclose(d["orm_x"], expected[:16], rtol=0, atol=1e-9 * np.abs(expected).max())
    truth = _truth_orm(fresh_small_twin, small, machine, tmp_path)["matrix"][:16, :24]
    relative = np.abs(d["orm_x"] - truth).max() / np.abs(truth).max()
    print(f"\nmodel vs true ORM (x): {relative:.3f} of the largest element")
    assert 1e-4 < relative < 0.3  # the model is not the truth, but near it
    assert (
        np.all(np.asarray(d["handover_x"]) == 0) and np.asarray(d["handover_x"]).size == 576
    )  # handover_hz=0: no hand-over

    output = tmp_path / "cli.h5"
    main_status = None
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "fofb",
                "export",
                uid,
                "--tiled",
                tiled.uri,
                "--api-key",
                tiled.api_key,
                "--output",
                str(output),
            ]
        )
    main_status = stop.value.code
    assert main_status == 0
    assert "fofb_design " + uid in capsys.readouterr().out
    assert np.array_equal(
        read_fofb_matrices(output)["x"]["inverse"], np.asarray(d["inverse_x"])[d["fast_h"]]
    )


def test_an_unstable_design_is_refused_before_any_run(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    machine: Machine,
) -> None:
    before = machine_setpoints(machine)
    starts: list[Any] = []
    token = run_engine.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
    with pytest.raises(FofbUnstable, match=r"refused.*pole has modulus"):
        run_engine(design_fofb(machine.bpms, machine.hcorr, machine.vcorr, ki=1.5, n_samples=512))
    run_engine.unsubscribe(token)
    assert starts == []
    assert_same_setpoints(machine_setpoints(machine), before)


def test_bad_inputs_are_refused_with_their_reason(machine: Machine) -> None:
    with pytest.raises(ValueError, match="no fast corrector chosen in vcorr"):
        next(design_fofb(machine.bpms, machine.hcorr, machine.vcorr, fast_correctors=[0, 1]))
    with pytest.raises(ValueError, match="latency must be an integer"):
        next(design_fofb(machine.bpms, machine.hcorr, machine.vcorr, latency=-2))
    with pytest.raises(ValueError, match="unknown method"):
        next(design_fofb(machine.bpms, machine.hcorr, machine.vcorr, method="micado"))


def test_plot(tmp_path: Path) -> None:
    """The PNG of a design (matplotlib is a dependency)."""
    from accplans.physics import FofbLoop, design_fofb_plane
    from accplans.plans import plot_fofb_design
    from accplans.plans.fofb import fofb_design_fields

    rng = np.random.default_rng(1)
    blocks = {"x": rng.normal(size=(8, 10)), "y": rng.normal(size=(8, 10))}
    fast = {"x": np.arange(10) < 8, "y": np.arange(10) < 8}
    assert design_fofb_plane(blocks["x"][:, :8], None, FofbLoop()).n_modes == 8
    from accplans.physics import DisturbanceSpectrum

    fields = fofb_design_fields(
        blocks,
        fast,
        FofbLoop(handover_hz=2.0),
        {
            "method": "tikhonov",
            "alpha": 0.01,
            "n_singular": (None, None),
            "mode_gains": (None, None),
            "f_min_hz": 0.1,
            "n_frequencies": 40,
            "n_samples": 1024,
            "seed": 0,
            "min_gain_margin_db": 0.0,
            "min_phase_margin_deg": 0.0,
            "spectrum": DisturbanceSpectrum(),
        },
    )
    names = {
        "bpm_names": [f"B{i}" for i in range(8)],
        "hcorr_names": [f"H{i}" for i in range(10)],
        "vcorr_names": [f"V{i}" for i in range(10)],
    }
    data = {
        **fields,
        **names,
        "fast_h": fast["x"],
        "fast_v": fast["y"],
        "sampling_hz": 1e4,
        "latency": 2,
        "corrector_bandwidth_hz": 1e3,
        "slow_bandwidth_hz": 20.0,
        "kp": 0.0,
        "ki": 0.1,
        "handover_hz": 2.0,
        "method": "tikhonov",
        "orm_source": "random",
    }
    path = plot_fofb_design(Result("fofb_design", 1, "0123456789", data, {}), tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_design_from_an_orm_uid_in_tiled(
    run_engine: RunEngine,
    writer: BackgroundTiledWriter,
    client: Any,
    tiled: LocalTiled,
    machine: Machine,
    fresh_small_twin: TwinProcess,
    small: MachineDescription,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """orm="<uid>": the worker loads the stored ORM from $TILED_URI (the queueserver's way)."""
    orm = _truth_orm(fresh_small_twin, small, machine, tmp_path)
    fields = {k: v for k, v in orm.data.items() if v is not None}
    stored = run_plan(run_engine, bpp.run_wrapper(record_result("orm", **fields), md={}))
    (orm_uid,) = stored.run_start_uids
    written_run(client, writer, orm_uid)
    monkeypatch.setenv("TILED_URI", tiled.uri)
    monkeypatch.setenv("TILED_API_KEY", tiled.api_key)
    shutdown_workers()  # the next worker is spawned with these variables
    try:
        result = run_plan(
            run_engine,
            design_fofb(
                machine.bpms,
                machine.hcorr,
                machine.vcorr,
                orm=orm_uid,
                fast_correctors=FAST,
                n_samples=1024,
                n_frequencies=20,
            ),
        )
    finally:
        shutdown_workers()
    (uid,) = result.run_start_uids
    written_run(client, writer, uid)
    d = load_result(client, uid, "fofb_design").data
    assert d["orm_source"] == orm_uid
    assert np.allclose(d["orm_y"], orm["matrix"][16:, 24:], rtol=0, atol=1e-15)
