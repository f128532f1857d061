"""``accplans demo``: the main job, end to end on a twin.

Starts a local Tiled server and a twin (seeded error model) in their own processes on loopback,
connects the devices, measures the orbit and the full orbit response matrix (both planes, every
corrector, with the RF column) with a progress display, prints a report and stops every
process it started.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np
from bluesky import RunEngine
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from accplans.config import MachineDescription, load_description
from accplans.data import ProcessTiledWriter, load_result, run_tiled_server
from accplans.devices import Machine, connect_sync
from accplans.model import OnlineModel
from accplans.physics import orm_relative_difference
from accplans.plans import measure_orbit, measure_orm, shutdown_workers
from accplans.sim import client_environment, reserve_ports, run_twin

__all__ = ["ProgressCallback", "run_demo"]


class ProgressCallback:
    """A RunEngine callback drawing a progress bar per run (``num_points`` of the start doc)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: Any = None
        self._primary: set[str] = set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Follow the documents of a run."""
        if name == "start":
            total = doc.get("num_points")
            self._task = self._progress.add_task(doc.get("plan_name", "run"), total=total)
            self._primary.clear()
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary.add(doc["uid"])
        elif name == "event" and doc.get("descriptor") in self._primary:
            self._progress.advance(self._task)
        elif name == "stop" and self._task is not None:
            self._progress.update(self._task, description=f"{doc.get('exit_status')}")


@contextmanager
def _running_run_engine() -> Iterator[RunEngine]:
    engine = RunEngine({})
    try:
        yield engine
    finally:
        if engine.state != "idle":
            engine.halt()


def _blocks(matrix: np.ndarray, nbpm: int, planes: list[str]) -> dict[str, tuple[slice, Any]]:
    h = np.array([p == "h" for p in planes])
    rows = {"x": slice(0, nbpm), "y": slice(nbpm, 2 * nbpm)}
    return {
        f"{r}/{c}": (rows[r], cols)
        for r in ("x", "y")
        for c, cols in (("h", h), ("v", ~h))
        if cols.any()
    }


def run_demo(
    *,
    machine: str = "ebs",
    seed: int = 7,
    data_dir: str = ".accplans/demo",
    correctors: int | None = None,
    console: Console | None = None,
) -> int:
    """Run the demo; return the process exit status (0: success).

    Args:
        machine: built-in machine (``ebs`` or ``small``).
        seed: the twin's error seed.
        data_dir: the Tiled server's data directory (kept after the demo, for browsing).
        correctors: measure only the first N correctors of each plane (all by default).
        console: where to print (default: the terminal).
    """
    console = console or Console()
    t_start = time.perf_counter()
    description = load_description(machine)
    ports = reserve_ports(1)[0]
    # the EPICS client context reads its environment once: set it before anything connects
    os.environ.update(client_environment([ports]))
    data_path = Path(data_dir).resolve()
    with ExitStack() as stack:
        console.print(f"[bold]accplans demo[/] on [cyan]{machine}[/] (error seed {seed})")
        console.print("starting Tiled and the twin (their own processes, loopback only)...")
        tiled = stack.enter_context(run_tiled_server(data_path))
        twin = stack.enter_context(run_twin(machine, seed=seed, ports=ports))
        console.print(f"  Tiled {tiled.uri} (pid {tiled.pid}), twin {twin.prefix} (pid {twin.pid})")
        client = tiled.client()
        engine = stack.enter_context(_running_run_engine())
        writer = stack.enter_context(ProcessTiledWriter(tiled.uri, tiled.api_key))
        engine.subscribe(writer)
        progress = stack.enter_context(
            Progress(
                TextColumn("{task.description:>14}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
            )
        )
        engine.subscribe(ProgressCallback(progress))
        m = connect_sync(description, address=f"127.0.0.1:{ports.ca}")
        (orbit_uid,) = cast(tuple[str], engine(measure_orbit(m.bpms, n_samples=10)))
        select = _first_per_plane(m, correctors)
        t0 = time.perf_counter()
        (orm_uid,) = cast(
            tuple[str], engine(measure_orm(m.bpms, [m.hcorr, m.vcorr], select=select, rf=m.rf))
        )
        t_orm = time.perf_counter() - t0
        progress.stop()
        writer.flush(timeout=120)
        _report(console, description, client, orbit_uid, orm_uid, t_orm, tiled)
        shutdown_workers()
    console.print(
        f"every process the demo started is stopped; total {time.perf_counter() - t_start:.1f} s"
    )
    return 0


def _first_per_plane(m: Machine, n: int | None) -> list[int] | None:
    if n is None:
        return None
    nh = len(m.hcorr.names)
    return list(range(min(n, nh))) + [nh + k for k in range(min(n, len(m.vcorr.names)))]


def _report(
    console: Console,
    description: MachineDescription,
    client: Any,
    orbit_uid: str,
    orm_uid: str,
    t_orm: float,
    tiled: Any,
) -> None:
    orbit = load_result(client, orbit_uid, "orbit").data
    orm = load_result(client, orm_uid, "orm").data
    matrix, planes = orm["matrix"], list(orm["corrector_planes"])
    nbpm = len(orm["bpm_names"])
    model = OnlineModel(description)
    design = model.orm(list(orm["bpm_names"]), list(orm["corrector_names"]), rf=True)
    table = Table(title="accplans demo: measured on the twin")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rms_x, rms_y = _rms(orbit["x"]) * 1e6, _rms(orbit["y"]) * 1e6
    table.add_row("orbit rms x / y (BPM readings)", f"{rms_x:.1f} / {rms_y:.1f} um")
    table.add_row("ORM shape (rows x correctors)", f"{matrix.shape[0]} x {matrix.shape[1]}")
    table.add_row("ORM steps", f"{2 * matrix.shape[1] + 2} in {t_orm:.1f} s")
    scale = float(np.max(np.abs(design.matrix)))
    for block, (rows, cols) in _blocks(matrix, nbpm, planes).items():
        diff = orm_relative_difference(matrix[rows][:, cols], design.matrix[rows][:, cols], scale)
        table.add_row(f"vs pyAT design ORM, block {block}", f"{diff:.2%}")
    if design.rf_column is not None and np.all(np.isfinite(orm["rf_column"])):
        diff = orm_relative_difference(orm["rf_column"], design.rf_column)
        table.add_row("vs pyAT design ORM, RF column", f"{diff:.2%}")
    console.print(table)
    console.print(
        "The twin carries seeded errors (misalignments, gradient errors, BPM and corrector "
        "calibration errors) and its orbit is uncorrected, so the measured ORM differs from "
        "the design lattice's: that difference is what orbit correction and LOCO remove."
    )
    console.print(
        f"data: Tiled server data in [cyan]{tiled.directory}[/] (key in its api_key file)"
    )
    console.print(f"runs: orbit {orbit_uid}, ORM {orm_uid}")
    console.print(
        "browse: `accplans tiled serve --directory "
        f"{tiled.directory}`, then in Python\n"
        "  from tiled.client import from_uri; from accplans.data import load_result\n"
        "  c = from_uri('http://127.0.0.1:8000', api_key=open('"
        f"{tiled.directory}/api_key').read().strip())\n"
        f"  c['{orm_uid}']['primary'].read(); load_result(c, '{orm_uid}', 'orm')"
    )


def _rms(values: Any) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.sqrt(np.nanmean(arr**2)))
