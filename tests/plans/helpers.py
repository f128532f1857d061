"""Helpers of the plan tests: connecting, reading setpoints, model references, runs in Tiled."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aioca
import at
import numpy as np
from bluesky import RunEngine
from bluesky.run_engine import RunEngineResult, call_in_bluesky_event_loop
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription, dump_description
from accplans.data import BackgroundTiledWriter, open_run
from accplans.devices import Machine, SettableFamily, connect_sync
from accplans.model import brute_force_orm, dct_for_frequency
from accplans.physics import orm_relative_difference
from accplans.sim import TwinProcess, bpm_readings

BLOCKS = ("x/h", "y/h", "x/v", "y/v")  # rows / corrector plane


def renamed_description(description: MachineDescription, tag: str, directory: Path) -> Path:
    """``description`` under prefix ``<PREFIX><tag>:`` and id ``<id>-<tag>``, as a YAML file.

    A test's own twin must not serve the PV names of the session's twins (tests/conftest.py):
    the client's search goes to every port of the pool, and a name served twice connects to
    whichever twin answers first (both serve the same ``MACHINE:ID``).
    """
    old = description.machine.prefix
    new = f"{old[:-1]}{tag}:"

    def rename(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(old):
            return new + value[len(old) :]
        if isinstance(value, dict):
            return {k: rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return value

    data = rename(description.model_dump(mode="json"))
    data["machine"].update(
        prefix=new,
        id=f"{description.machine.id}-{tag.lower()}",
        name=f"{data['machine']['name']}{tag}",
    )
    path = directory / f"{data['machine']['name']}.yaml"
    dump_description(MachineDescription.model_validate(data), path)
    return path


def run_plan(run_engine: RunEngine, plan: MsgGenerator[Any]) -> RunEngineResult:
    """``run_engine(plan)`` with its result (the fixture's RunEngine returns results)."""
    result = run_engine(plan)
    assert isinstance(result, RunEngineResult)
    return result


def connect_to(twin: TwinProcess, description: MachineDescription) -> Machine:
    """Connect ``description`` to ``twin`` in the current RunEngine's loop (create it first)."""
    return connect_sync(description, address=f"127.0.0.1:{twin.ports.ca}", timeout=10)


async def _purge_ca_channels() -> None:
    aioca.purge_channel_caches()


def drop_ca_channels() -> None:
    """Close every CA channel of this process (in the RunEngine's loop).

    Before a test's own twin stops: its channels' disconnect callbacks would otherwise reach
    the RunEngine's loop after the test closed it (an unraisable error). Before connecting to
    a restarted twin: the old, disconnected channels are cached and searched for with a
    backed-off period (no CA repeater on loopback forwards the new server's beacons).
    """
    call_in_bluesky_event_loop(_purge_ca_channels())


def hardware_setpoints(families: Sequence[SettableFamily]) -> dict[str, np.ndarray]:
    """Hardware setpoints (A, Hz) of ``families``, read in the RunEngine's loop (no plan)."""

    async def read() -> dict[str, np.ndarray]:
        return {f.name: np.asarray(await f.hardware_setpoints(), float) for f in families}

    return call_in_bluesky_event_loop(read())


def machine_setpoints(machine: Machine) -> dict[str, np.ndarray]:
    """Setpoints of every family a plan of these tests may move: correctors, RF, quadrupoles
    and sextupoles."""
    assert machine.rf is not None
    return hardware_setpoints(
        [machine.hcorr, machine.vcorr, machine.rf, machine.quadrupoles, machine.sextupoles]
    )


def assert_same_setpoints(after: dict[str, np.ndarray], before: dict[str, np.ndarray]) -> None:
    """Every setpoint exactly as before (what a restore writes back is what was read)."""
    assert after.keys() == before.keys()
    for name in before:
        moved = np.flatnonzero(after[name] != before[name])
        assert moved.size == 0, (
            f"{name}: members {moved.tolist()} not restored: "
            f"{after[name][moved].tolist()} != {before[name][moved].tolist()}"
        )


# -- model references -----------------------------------------------------------------------
def bpm_elements(description: MachineDescription) -> list[int]:
    """Lattice index of every BPM of the ``bpms`` family (family order)."""
    return [description.device(n).elements[0] for n in description.families["bpms"].devices]


def corrector_columns(
    description: MachineDescription, names: Sequence[str]
) -> tuple[list[int], list[str]]:
    """Lattice element and plane of each corrector in ``names``."""
    specs = [description.device(n) for n in names]
    return [s.elements[0] for s in specs], [s.plane or "" for s in specs]


def reference_orm(
    ring: at.Lattice,
    description: MachineDescription,
    names: Sequence[str],
    *,
    dct: float,
    bpms: Sequence[int] | np.ndarray | None = None,
    two_sided: bool = False,
) -> np.ndarray:
    """``brute_force_orm`` (1e-6 rad kicks) of the correctors ``names`` at path length ``dct``.

    One-sided by default; ``two_sided`` averages the +1e-6 and -1e-6 rad matrices, which
    cancels the reference's own second-order error (~5e-6 of the largest element on the small
    ring, ~5e-4 on EBS in x: see ``accplans.model._orm``).
    """
    elements, planes = corrector_columns(description, names)
    rows = bpm_elements(description) if bpms is None else list(bpms)
    plus = brute_force_orm(ring, rows, elements, planes, dct=dct)
    if not two_sided:
        return plus
    return 0.5 * (plus + brute_force_orm(ring, rows, elements, planes, dct=dct, kick=-1e-6))


def model_rf_column(
    ring: at.Lattice, bpms: Sequence[int] | np.ndarray, frequency_hz: float, step_hz: float
) -> np.ndarray:
    """d(orbit)/d(RF frequency) (m/Hz), central difference of ``find_orbit4`` at fixed frequency."""
    orbits = []
    for sign in (1.0, -1.0):
        dct = dct_for_frequency(ring, frequency_hz + sign * step_hz)
        _, o = at.find_orbit4(ring, dct=dct, refpts=np.asarray(bpms, dtype=np.uint32))
        orbits.append(np.concatenate([o[:, 0], o[:, 2]]))
    return (orbits[0] - orbits[1]) / (2.0 * step_hz)


def as_read_by_bpms(matrix: np.ndarray, gain: np.ndarray, roll: np.ndarray) -> np.ndarray:
    """Orbit changes (rows x then y) as BPMs with ``gain`` (n, 2) and ``roll`` (n,) read them.

    The linear part of the twin's reading ``g * R(roll) @ (x - offset)`` (offsets cancel in a
    difference): :func:`accplans.sim.bpm_readings` with zero offsets, column by column.
    """
    nb = gain.shape[0]
    m = np.atleast_2d(matrix.T).T
    out = np.empty_like(m)
    for j in range(m.shape[1]):
        beam = np.stack([m[:nb, j], m[nb:, j]], axis=1)
        read = bpm_readings(beam, np.zeros((nb, 2)), gain, roll)
        out[:nb, j], out[nb:, j] = read[:, 0], read[:, 1]
    return out.reshape(matrix.shape)


def block_agreement(
    measured: np.ndarray, reference: np.ndarray, planes: Sequence[str]
) -> dict[str, float]:
    """``max |measured - reference| / max |reference|`` of each of the four blocks.

    A block whose reference is below ``1e-3`` of the whole matrix's largest element (the
    cross-plane blocks of an uncoupled machine: zero, or second-order effects of the reference's
    one-sided kicks) is normalised by that largest element instead
    (``accplans.physics.orm_relative_difference``).
    """
    nb = measured.shape[0] // 2
    whole = float(np.max(np.abs(reference)))
    out = {}
    for block in BLOCKS:
        rows = slice(0, nb) if block[0] == "x" else slice(nb, 2 * nb)
        cols = np.array([p == block[-1] for p in planes])
        ref = reference[rows][:, cols]
        scale = None if np.max(np.abs(ref)) > 1e-3 * whole else whole
        out[block] = orm_relative_difference(measured[rows][:, cols], ref, scale)
    return out


# -- runs in Tiled --------------------------------------------------------------------------
def written_run(client: Any, writer: BackgroundTiledWriter, uid: str) -> Any:
    """Run ``uid`` as Tiled serves it, once the writer has written everything queued."""
    writer.flush(timeout=60)
    return open_run(client, uid)


def primary_events(run: Any) -> int:
    """Number of events of the run's ``primary`` stream (0 without one)."""
    if "primary" not in list(run):
        return 0
    return int(run["primary"].read().sizes["time"])


#: Skew windings set on top of the seed's errors by the coupling and C- tests (A; 0.03 and
#: -0.02 m^-2: |C-| ~ 1e-3 on the small ring).
INJECTED = {"SQ002": 3.0, "SQ005": -2.0}


def inject_skews(twin: TwinProcess, machine: Machine) -> None:
    """Put the setpoints of :data:`INJECTED` to the twin (the online model sees them)."""
    for name, value in INJECTED.items():
        twin.control.put(machine.description.device(name).pvs["setpoint"], value)
