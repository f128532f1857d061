"""The registry of plans that change the machine, and the faults the tests inject into them.

Every plan that changes the machine joins the fault tests (tests/plans/test_faults.py) with
one entry here: a factory that builds the plan on a connected small-ring
:class:`~accplans.devices.Machine` and says which families it moves, and where faults strike::

    @register("correct_orbit", fault_after_sets=(2,), fault_after_events=1, reads_orbit=True)
    def _correct_orbit(machine: Machine) -> Built:
        families = [machine.hcorr, machine.vcorr]
        return correct_orbit(machine.bpms, families, ...), families

The tests then run it under every fault and check that every setpoint (correctors, RF,
quadrupoles, sextupoles, skew windings: :func:`fault_setpoints`) comes back exactly,
that the run in Tiled holds the events taken before the fault and says why it ended, and,
when the machine cannot be reached, that a pending restore is journaled and applies.

Faults:

- ``exception``: the plan fails right after its N-th set (:func:`fail_after_sets`, a plan
  preprocessor throwing :class:`InjectedFault` into the plan where it stands).
- ``abort``: the RunEngine is paused right after the N-th set (:func:`pause_after_sets`) and
  the test calls ``RE.abort()`` (in bluesky 1.15, ``abort`` acts on a paused RunEngine, and
  ``request_pause`` cannot be called from the RunEngine's own thread, where document callbacks
  run: a ``pause`` message is the reliable way to pause at a known point).
- ``beam_lost``: the twin dumps its beam after the N-th event (:class:`AfterEvents` calling
  ``twin.control.kill_beam()``); the plan's next orbit read raises ``BeamLost``.
- ``twin_killed``: the twin's process is killed after the N-th event; nothing can be restored.

A "set" is the step a plan takes after a checkpoint: STYLE.md's step is ``checkpoint -> set ->
wait for fresh data -> read``, so the first message after the N-th checkpoint is the N-th set,
and a fault "after the N-th set" strikes at the message that follows it (the set completed).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import at
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.run_engine import call_in_bluesky_event_loop
from bluesky.utils import Msg, MsgGenerator

from accplans.config import MachineDescription, build_lattice
from accplans.data import Result
from accplans.devices import Machine, Pinger, SettableFamily, TbtBuffers
from accplans.plans import (
    bba,
    correct_c_minus,
    correct_chromaticity,
    correct_coupling,
    correct_nonlinear,
    correct_optics,
    correct_optics_tbt,
    correct_orbit,
    correct_rf_frequency,
    correct_tunes,
    load_optics,
    measure_c_minus,
    measure_chromaticity,
    measure_coupling,
    measure_dispersion,
    measure_orm,
    orbit_bump,
    orbit_feedback,
    restore_setpoints,
    standardize_magnets,
    take_snapshot,
)
from accplans.sim import TwinProcess
from tests.plans.helpers import hardware_setpoints, machine_setpoints

Built = tuple[MsgGenerator[Any], list[SettableFamily]]


@dataclass(frozen=True)
class MachinePlan:
    """A plan that changes the machine, as the fault tests run it.

    Attributes:
        name: the plan's name (the test ids).
        build: ``machine -> (plan, families it moves)``. It may set the machine up first
            (a starting state the plan needs); the tests read the starting setpoints after it.
        fault_after_sets: the sets after which ``exception`` and ``abort`` strike (one test
            each), each > 1. The tests expect one primary event per completed step
            (STYLE.md's ``checkpoint -> set -> wait for fresh data -> read``), so ``n - 1``
            events before a fault after set ``n``.
        fault_after_events: the events after which ``beam_lost`` and ``twin_killed`` strike.
        reads_orbit: whether the plan reads BPMs (a lost beam stops it); ``beam_lost`` is not
            run on plans that do not.
    """

    name: str
    build: Callable[[Machine], Built]
    fault_after_sets: tuple[int, ...]
    fault_after_events: int
    reads_orbit: bool


MACHINE_PLANS: dict[str, MachinePlan] = {}


def register(
    name: str, *, fault_after_sets: tuple[int, ...], fault_after_events: int, reads_orbit: bool
) -> Callable[[Callable[[Machine], Built]], Callable[[Machine], Built]]:
    """Add a plan factory to :data:`MACHINE_PLANS` (a decorator)."""

    def add(build: Callable[[Machine], Built]) -> Callable[[Machine], Built]:
        if name in MACHINE_PLANS:
            raise ValueError(f"plan {name!r} is registered twice")
        MACHINE_PLANS[name] = MachinePlan(
            name, build, fault_after_sets, fault_after_events, reads_orbit
        )
        return build

    return add


# -- the registry ---------------------------------------------------------------------------
#: measure_orm's columns in the fault tests: sets 1-4 move HCM002/HCM006 (+-), 5-8 VCM003/VCM007,
#: 9-10 the RF frequency (+-); one event per set.
ORM_SELECT = ["HCM002", "HCM006", "VCM003", "VCM007"]


@register("measure_orm", fault_after_sets=(3, 9), fault_after_events=3, reads_orbit=True)
def _measure_orm(machine: Machine) -> Built:
    assert machine.rf is not None
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr, machine.rf]
    plan = measure_orm(
        machine.bpms, [machine.hcorr, machine.vcorr], select=ORM_SELECT, rf=machine.rf, timeout=5
    )
    return plan, families


@register("correct_orbit", fault_after_sets=(2,), fault_after_events=1, reads_orbit=True)
def _correct_orbit(machine: Machine) -> Built:
    """Three iterations (seed-1 errors: the orbit keeps improving, so no early stop) with the
    RF frequency as an unknown."""
    assert machine.rf is not None
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr, machine.rf]
    plan = correct_orbit(
        machine.bpms, [machine.hcorr, machine.vcorr], rf=machine.rf, iterations=3, timeout=5
    )
    return plan, families


@register("measure_dispersion", fault_after_sets=(2, 4), fault_after_events=2, reads_orbit=True)
def _measure_dispersion(machine: Machine) -> Built:
    """Four RF frequency steps (two of each sign), one event per step."""
    assert machine.rf is not None
    families: list[SettableFamily] = [machine.rf]
    return measure_dispersion(machine.bpms, machine.rf, n_steps=2, timeout=5), families


@register("correct_rf_frequency", fault_after_sets=(2,), fault_after_events=1, reads_orbit=True)
def _correct_rf_frequency(machine: Machine) -> Built:
    """Three RF steps (seed-1 errors on the small ring: the steps stay above 0.01 Hz)."""
    assert machine.rf is not None
    families: list[SettableFamily] = [machine.rf]
    plan = correct_rf_frequency(
        machine.bpms, machine.hcorr, machine.rf, iterations=3, tolerance_hz=0.01, timeout=5
    )
    return plan, families


#: Current (A) restore_setpoints' test snapshot adds to every corrector.
RESTORE_SHIFT = 0.25


@register("orbit_feedback", fault_after_sets=(2,), fault_after_events=2, reads_orbit=True)
def _orbit_feedback(machine: Machine) -> Built:
    """Four loop iterations toward zero readings (each one checkpointed step: both planes)."""
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr]
    plan = orbit_feedback(
        machine.bpms, machine.hcorr, machine.vcorr, iterations=4, reference="zero", timeout=5
    )
    return plan, families


@register("restore_setpoints", fault_after_sets=(2,), fault_after_events=1, reads_orbit=False)
def _restore_setpoints(machine: Machine) -> Built:
    """Restore a snapshot of the present correctors shifted by RESTORE_SHIFT (one set per
    family: hcorr, then vcorr)."""
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr]

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(machine.description, families)
        for values in snapshot.setpoints.values():
            for name in values:
                values[name] += RESTORE_SHIFT
        return (yield from restore_setpoints(families, snapshot))

    return plan(), families


@register("standardize_magnets", fault_after_sets=(2,), fault_after_events=1, reads_orbit=False)
def _standardize_magnets(machine: Machine) -> Built:
    """One cycle of the horizontal correctors: max, min, max, back to the setpoints (4 sets)."""
    families: list[SettableFamily] = [machine.hcorr]
    return standardize_magnets(machine.hcorr, cycles=1), families


@register(
    "restore_setpoints_snapshot", fault_after_sets=(2, 3), fault_after_events=1, reads_orbit=False
)
def _restore_setpoints_snapshot(machine: Machine) -> Built:
    """Restore a stored ``"snapshot"`` result (the present correctors shifted by
    RESTORE_SHIFT) in two steps: sets hcorr, vcorr, hcorr, vcorr."""
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr]

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(machine.description, families)
        rows = [(f, n, v) for f, values in snapshot.setpoints.items() for n, v in values.items()]
        data = {
            "setpoints": np.array([v + RESTORE_SHIFT for _, _, v in rows]),
            "device_names": [n for _, n, _ in rows],
            "family_names": [f for f, _, _ in rows],
            "units": ["A"] * len(rows),
            "machine_id": snapshot.machine_id,
            "config_hash": snapshot.config_hash,
            "operator": "test",
            "comment": "fault test",
            "taken": snapshot.taken,
        }
        stored = Result("snapshot", 1, "no-run", data, {})
        return (yield from restore_setpoints(families, stored, steps=2))

    return plan(), families


#: Lattice files of load_optics' fault test (removed when the interpreter exits).
_OPTICS_FILES = tempfile.TemporaryDirectory(prefix="accplans-faults-")


@register("load_optics", fault_after_sets=(2,), fault_after_events=1, reads_orbit=False)
def _load_optics(machine: Machine) -> Built:
    """Load the corrector kicks of a lattice file (0.3 A on every corrector) in three steps,
    each setting hcorr then vcorr."""
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr]
    description = machine.description
    ring = build_lattice(description)
    for name in [*machine.hcorr.names, *machine.vcorr.names]:
        spec = description.device(name)
        assert spec.calibration is not None
        plane = 0 if spec.plane == "h" else 1
        ring[spec.elements[0]].KickAngle[plane] = float(spec.calibration.to_strength(0.3))
    path = Path(_OPTICS_FILES.name) / f"{description.machine.name}-kicks.mat"
    at.save_lattice(ring, str(path))
    return load_optics(families, str(path), steps=3), families


@register("orbit_bump", fault_after_sets=(2,), fault_after_events=1, reads_orbit=True)
def _orbit_bump(machine: Machine) -> Built:
    """A 0.2 mm horizontal bump at BPM005 with the RF step (set 1), one closure step (set 2)."""
    assert machine.rf is not None
    families: list[SettableFamily] = [machine.hcorr, machine.rf]
    plan = orbit_bump(
        machine.bpms,
        machine.hcorr,
        machine.vcorr,
        machine.rf,
        at="BPM005",
        plane="x",
        position_m=0.2e-3,
        timeout=5,
    )
    return plan, families


@register("bba", fault_after_sets=(2, 5), fault_after_events=2, reads_orbit=True)
def _bba(machine: Machine) -> Built:
    """BBA of BPM005 and BPM006, 4 bump amplitudes up to 0.1 mm: each set (bumps, quadrupole
    at +dK or -dK) is followed by one reading; sets 1-8 are BPM005's scan."""
    families: list[SettableFamily] = [machine.quadrupoles, machine.hcorr, machine.vcorr]
    plan = bba(
        machine.bpms,
        machine.quadrupoles,
        machine.hcorr,
        machine.vcorr,
        select=["BPM005", "BPM006"],
        n_positions=4,
        span_m=100e-6,
        n_samples=1,
        timeout=5,
    )
    return plan, families


@register("measure_chromaticity", fault_after_sets=(2, 4), fault_after_events=2, reads_orbit=True)
def _measure_chromaticity(machine: Machine) -> Built:
    """Four RF frequency steps (two of each sign), one event per step; a lost beam reads
    (0, 0) on the tune monitor (BeamLost)."""
    assert machine.rf is not None and machine.tune is not None
    families: list[SettableFamily] = [machine.rf]
    plan = measure_chromaticity(machine.tune, machine.rf, n_steps=2, n_samples=2, timeout=5)
    return plan, families


@register("correct_tunes", fault_after_sets=(2,), fault_after_events=1, reads_orbit=True)
def _correct_tunes(machine: Machine) -> Built:
    """Three knob steps at gain 0.5 toward tunes 0.01 away (never within the 1e-6
    tolerance): one set (the quadrupoles) and one event per step. Needs the fault tests to
    compare the quadrupoles (they do: tests/plans/helpers.py machine_setpoints)."""
    assert machine.tune is not None
    families: list[SettableFamily] = [machine.quadrupoles]
    plan = correct_tunes(
        machine.tune,
        machine.quadrupoles,
        target=[0.42, 0.655],
        gain=0.5,
        tolerance=1e-6,
        iterations=3,
        n_samples=2,
        timeout=5,
    )
    return plan, families


@register("correct_chromaticity", fault_after_sets=(2,), fault_after_events=2, reads_orbit=True)
def _correct_chromaticity(machine: Machine) -> Built:
    """Sets 1-4 step the RF frequency (the first scan), set 5 returns it, set 6 applies the
    sextupole knobs; one event per set."""
    assert machine.rf is not None and machine.tune is not None
    families: list[SettableFamily] = [machine.sextupoles, machine.rf]
    plan = correct_chromaticity(
        machine.tune,
        machine.rf,
        machine.sextupoles,
        target=[1.5, 0.5],
        iterations=2,
        n_samples=2,
        timeout=5,
    )
    return plan, families


@register("correct_optics", fault_after_sets=(2,), fault_after_events=1, reads_orbit=False)
def _correct_optics(machine: Machine) -> Built:
    """A ``loco`` result asking for +0.2 % on every quadrupole, applied in three steps (one set
    of the quadrupoles and one event each)."""
    quadrupoles = machine.quadrupoles
    families: list[SettableFamily] = [quadrupoles]

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(machine.description, families)
        start = np.array([snapshot.setpoints[quadrupoles.name][n] for n in quadrupoles.names])
        data = {
            "quadrupole_names": [str(n) for n in quadrupoles.names],
            "quadrupole_start": start,
            "quadrupole_target": start * 1.002,
        }
        return (
            yield from correct_optics(Result("loco", 1, "no-run", data, {}), quadrupoles, steps=3)
        )

    return plan(), families


@register("correct_optics_tbt", fault_after_sets=(2,), fault_after_events=2, reads_orbit=True)
def _correct_optics_tbt(machine: Machine) -> Built:
    """One pinger shot per measurement: set 1 fires the first shot, sets 2 and 3 move the
    quadrupoles and fire (one event per set); a fault after event 2 strikes after the first
    quadrupole step. The pinger's kicks are restored too (its own tests check them:
    tests/plans/test_optics_tbt.py)."""
    description = machine.description
    buffers = TbtBuffers.for_family(description.families_of_kind("bpm")[0], description)
    pinger = Pinger.for_machine(description)

    async def connect() -> None:
        await asyncio.gather(buffers.connect(timeout=10), pinger.connect(timeout=10))

    call_in_bluesky_event_loop(connect())
    families: list[SettableFamily] = [machine.quadrupoles]
    plan = correct_optics_tbt(
        buffers,
        pinger,
        machine.quadrupoles,
        amplitude_x=100e-6,
        amplitude_y=100e-6,
        turns=256,
        shots=1,
        iterations=2,
    )
    return plan, families


# -- faults ---------------------------------------------------------------------------------
class InjectedFault(RuntimeError):
    """The failure :func:`fail_after_sets` throws into a plan."""


Observer = Callable[[], None] | None


def _after_sets(
    plan: MsgGenerator[Any], n: int, strike: Callable[[Msg], Generator[Msg, Any, Any]]
) -> MsgGenerator[Any]:
    """Replace the message after the ``n``-th set by ``strike(message)`` (module docstring)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    state = {"checkpoints": 0, "after": -1}

    def proc(msg: Msg) -> tuple[Generator[Msg, Any, Any] | None, None]:
        if state["after"] >= 0:
            state["after"] += 1
            if state["after"] == 2:  # the message after the set
                state["after"] = -2  # strike once
                return strike(msg), None
            return None, None
        if msg.command == "checkpoint" and state["after"] == -1:
            state["checkpoints"] += 1
            if state["checkpoints"] == n:
                state["after"] = 0
        return None, None

    return (yield from bpp.plan_mutator(plan, proc))


def fail_after_sets(plan: MsgGenerator[Any], n: int, observe: Observer = None) -> MsgGenerator[Any]:
    """``plan``, failing with :class:`InjectedFault` right after its ``n``-th set.

    ``observe()`` is called (in the RunEngine's thread) just before the fault.
    """

    def fail(msg: Msg) -> Generator[Msg, Any, Any]:
        if observe is not None:
            observe()
        raise InjectedFault(f"injected fault after set {n} (before {msg.command!r})")
        yield  # a generator  # pyright: ignore[reportUnreachable]

    return _after_sets(plan, n, fail)


def pause_after_sets(
    plan: MsgGenerator[Any], n: int, observe: Observer = None, *, defer: bool = False
) -> MsgGenerator[Any]:
    """``plan``, pausing the RunEngine right after its ``n``-th set.

    With ``defer``, the RunEngine pauses at the plan's next checkpoint instead (the end of the
    step, as after one Ctrl-C). ``observe()`` is called (in the RunEngine's thread) just before
    the pause is requested.
    """

    def pause(msg: Msg) -> Generator[Msg, Any, Any]:
        if observe is not None:
            observe()
        yield Msg("pause", defer=defer)
        return (yield msg)

    return _after_sets(plan, n, pause)


class AfterEvents:
    """A RunEngine callback that calls ``action()`` once, after the ``n``-th primary event.

    It runs in the RunEngine's thread, between the event's ``save`` and the plan's next
    message, so the plan's next step sees what ``action`` did.
    """

    def __init__(self, n: int, action: Callable[[], None]) -> None:
        self.n = n
        self.action = action
        self.events = 0
        self.fired = False
        self.start_uids: list[str] = []
        self._primary: set[str] = set()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.start_uids.append(doc["uid"])
        elif name == "descriptor" and doc.get("name") == "primary":
            self._primary.add(doc["uid"])
        elif name == "event" and doc["descriptor"] in self._primary:
            self.events += 1
            if self.events == self.n and not self.fired:
                self.fired = True
                self.action()


def twin_setpoints(twin: TwinProcess, description: MachineDescription) -> dict[str, np.ndarray]:
    """Corrector, RF, quadrupole, sextupole and skew setpoints (A, Hz) as the twin serves
    them, through its own control client (callable from any thread, the RunEngine's
    included); the keys of :func:`fault_setpoints`."""
    pvs = {
        "hcorr": description.families["hcorr"].pvs["setpoint"],
        "vcorr": description.families["vcorr"].pvs["setpoint"],
        "RF": description.device("RF").pvs["frequency_setpoint"],
        "quadrupoles": description.families["quadrupoles"].pvs["setpoint"],
        "sextupoles": description.families["sextupoles"].pvs["setpoint"],
        "skew": description.families["skew"].pvs["setpoint"],
    }
    return {k: np.atleast_1d(np.asarray(twin.control.get(pv), float)) for k, pv in pvs.items()}


def fault_setpoints(machine: Machine) -> dict[str, np.ndarray]:
    """Setpoints (A, Hz) of every family a registered plan may move, read through the
    devices: :func:`tests.plans.helpers.machine_setpoints` and the skew windings."""
    assert machine.skew is not None, f"{machine.description.machine.name} has no skew family"
    return {**machine_setpoints(machine), **hardware_setpoints([machine.skew])}


#: The coupling plans' columns in the fault tests: sets 1-4 kick HCM002/HCM006 (+-), 5-8
#: VCM003/VCM007, 9-10 step the RF frequency (+-); one event per set.
COUPLING_SELECT = ["HCM002", "HCM006", "VCM003", "VCM007"]


@register("measure_coupling", fault_after_sets=(3, 9), fault_after_events=3, reads_orbit=True)
def _measure_coupling(machine: Machine) -> Built:
    assert machine.rf is not None and machine.skew is not None
    families: list[SettableFamily] = [machine.hcorr, machine.vcorr, machine.rf]
    plan = measure_coupling(
        machine.bpms,
        [machine.hcorr, machine.vcorr],
        machine.rf,
        machine.skew,
        select=COUPLING_SELECT,
        n_samples=1,
        timeout=5,
    )
    return plan, families


@register("correct_coupling", fault_after_sets=(3, 11), fault_after_events=11, reads_orbit=True)
def _correct_coupling(machine: Machine) -> Built:
    """One iteration: a measurement over COUPLING_SELECT (sets 1-10, one event each; the RF
    frequency is put back without a checkpoint), the skew step (set 11, one event), the last
    measurement (sets 12-21). A fault after set 3 strikes mid-measurement (a corrector
    kicked), after set 11 or event 11 right after the skew step (only the skews moved)."""
    assert machine.rf is not None and machine.skew is not None
    families: list[SettableFamily] = [machine.skew, machine.hcorr, machine.vcorr, machine.rf]
    plan = correct_coupling(
        machine.bpms,
        [machine.hcorr, machine.vcorr],
        machine.rf,
        machine.skew,
        iterations=1,
        select=COUPLING_SELECT,
        n_samples=1,
        timeout=5,
    )
    return plan, families


#: correct_nonlinear's shots (rad) on the small ring, as tests/plans/test_nonlinear.py fires
#: them: its detuning is tens of 1/m, so the tune shifts need kicks of hundreds of urad.
NONLINEAR_KICKS_X = list(np.sqrt(np.linspace(0.2, 1.0, 5)) * 500e-6)
NONLINEAR_KICKS_Y = list(np.sqrt(np.linspace(0.2, 1.0, 5)) * 600e-6)
#: Relative change of the focusing sextupoles, alternately + and - along the ring, that
#: correct_nonlinear's fault tests start from (the sum, hence the chromaticity, unchanged).
SF_UNBALANCE = 0.5


@register("correct_nonlinear", fault_after_sets=(11,), fault_after_events=11, reads_orbit=False)
def _correct_nonlinear(machine: Machine) -> Built:
    """Sets 1-10 fire the shots before (one event each: the pinger moves, no family), set 11
    steps the sextupoles (no event), sets 12-21 fire the shots after.

    The small ring is periodic: at the design sextupoles every focusing (defocusing)
    sextupole moves the detuning alike, and no step free of the chromaticity cuts it (the
    plan refuses: tests/plans/test_nonlinear.py). So the machine is set up first with its
    focusing sextupoles unbalanced by +-SF_UNBALANCE (chromaticity unchanged, dQx/dJx up from
    11 to 15 1/m in the model); with each sextupole a knob, one model step cuts dQx/dJx by
    ~13 %. Beam loss: the plan reads turn-by-turn buffers, not orbit frames (empty buffers
    raise ``BeamLost`` in ``fire_shot``); ``beam_lost``, written for orbit reads, is not run.
    """
    description = machine.description
    sextupoles = machine.sextupoles
    buffers = TbtBuffers.for_family(description.families_of_kind("bpm")[0], description)
    pinger = Pinger.for_machine(description)
    focusing = set(description.knobs["SF_strength"].coefficients)
    present = hardware_setpoints([sextupoles])[sextupoles.name]
    sign = 1.0
    for i, name in enumerate(sextupoles.names):
        if name in focusing:
            present[i] *= 1 + sign * SF_UNBALANCE
            sign = -sign

    async def set_up() -> None:
        await asyncio.gather(buffers.connect(timeout=10), pinger.connect(timeout=10))
        await sextupoles.set_hardware(present)

    call_in_bluesky_event_loop(set_up())
    families: list[SettableFamily] = [sextupoles]
    plan = correct_nonlinear(
        buffers,
        pinger,
        sextupoles,
        knobs=list(sextupoles.names),
        iterations=1,
        kicks_x=NONLINEAR_KICKS_X,
        kicks_y=NONLINEAR_KICKS_Y,
        kick_small=50e-6,
        turns=256,
    )
    return plan, families


@register("measure_c_minus", fault_after_sets=(2, 5), fault_after_events=2, reads_orbit=True)
def _measure_c_minus(machine: Machine) -> Built:
    """The first tune scan: sets 1-7 move the quadrupoles to its points, one event each; a
    lost beam reads (0, 0) on the tune monitor (BeamLost)."""
    assert machine.tune is not None
    families: list[SettableFamily] = [machine.quadrupoles]
    plan = measure_c_minus(machine.tune, machine.quadrupoles, n_samples=2, timeout=5)
    return plan, families


@register("correct_c_minus", fault_after_sets=(3,), fault_after_events=2, reads_orbit=True)
def _correct_c_minus(machine: Machine) -> Built:
    """The faults strike in the first tune scan (sets 1-7 move the quadrupoles, one event
    each), before any skew moves; the restore covers skews and quadrupoles."""
    assert machine.tune is not None and machine.skew is not None
    families: list[SettableFamily] = [machine.skew, machine.quadrupoles]
    plan = correct_c_minus(machine.tune, machine.quadrupoles, machine.skew, n_samples=2, timeout=5)
    return plan, families
