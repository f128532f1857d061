"""``measure_tunes`` and ``correct_tunes``: the betatron tunes from the tune monitor, and knobs.

Shared with :mod:`accplans.plans.chromaticity`: reading fresh tunes (:func:`read_tunes`), knobs
resolved onto magnet families (:func:`resolve_knobs`, :func:`apply_knobs`) and the online
model's responses computed in the worker process (:func:`model_knob_response`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import ResultReadable, run_metadata
from accplans.devices import SettableFamily, TuneMonitor, call_async
from accplans.model import OnlineModel
from accplans.physics import TuneAverage, average_tunes, solve_knobs, wrap_tune

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._stubs import BeamLost, set_and_settle
from ._worker import compute

__all__ = [
    "KnobSet",
    "apply_knobs",
    "correct_tunes",
    "measure_tunes",
    "model_knob_response",
    "read_tunes",
    "resolve_knobs",
]

#: Tune readings averaged per measurement by default: the twin's monitor has 1e-5 rms noise,
#: so the mean of 8 has 3.5e-6, 30 times below the 1e-4 a tune correction is asked for.
DEFAULT_TUNE_SAMPLES = 8
#: Seconds between polls of the tune monitor while waiting for a fresh reading.
_POLL_S = 0.02
#: Timestamps cross the control system as floats (see plans/_stubs.py).
_STAMP_RESOLUTION = 1e-6

#: Tune measurement methods (``"tbt"``, from turn-by-turn BPM data, is planned).
METHODS = ("monitor",)


# -- reading tunes ------------------------------------------------------------------------------
async def _tune_readings(
    monitor: TuneMonitor, n: int, after: float, timeout: float
) -> tuple[np.ndarray, float]:
    """``n`` fresh (x, y) readings, each stamped at or after ``after`` and newer than the last."""
    samples: list[tuple[float, float]] = []
    last = (after - _STAMP_RESOLUTION, after - _STAMP_RESOLUTION)
    deadline = time.monotonic() + timeout
    stamp = after
    while len(samples) < n:
        rx, ry = await asyncio.gather(monitor.x.read(), monitor.y.read())
        (vx,), (vy,) = rx.values(), ry.values()
        tx, ty = float(vx["timestamp"]), float(vy["timestamp"])
        if tx > last[0] and ty > last[1]:  # both planes updated since the last reading
            samples.append((float(vx["value"]), float(vy["value"])))
            last = (tx, ty)
            stamp = max(tx, ty)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{monitor.name}: no fresh tune reading within {timeout:g} s "
                f"({len(samples)} of {n} taken)"
            )
        await asyncio.sleep(_POLL_S)
    return np.array(samples), stamp


def read_tunes(
    monitor: TuneMonitor,
    *,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    after: float | None = None,
    timeout: float = 10.0,
) -> MsgGenerator[TuneAverage]:
    """Average ``n_samples`` fresh tune readings taken at or after ``after`` (a plan stub).

    Each reading must be newer than the previous one (a new tune-monitor update), so the
    average is over independent measurements.

    Args:
        monitor: the tune monitor.
        n_samples: readings to average.
        after: epoch (s) the readings must be taken at or after (e.g. the time the magnets
            read back); default: now.
        timeout: longest wait for all readings (s).

    Raises:
        BeamLost: the monitor reads (0, 0) (no beam).
        ValueError: a reading is not finite.
        TimeoutError: no fresh reading within ``timeout``.
    """
    start = time.time() if after is None else after
    samples, _ = yield from call_async(_tune_readings, monitor, n_samples, start, timeout)
    if np.any(np.all(samples == 0.0, axis=1)):
        raise BeamLost(f"beam lost: the tune monitor {monitor.name} reads 0, 0")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{monitor.name} read non-finite tunes: {samples.tolist()}")
    return average_tunes(samples)


def check_tune_monitor(monitor: Any, plan: str) -> None:
    if not (hasattr(monitor, "x") and hasattr(monitor, "y")):
        raise ValueError(f"{plan}: {getattr(monitor, 'name', monitor)!r} is no tune monitor")


def _monitor_metadata(monitor: TuneMonitor, plan_name: str, **kw: Any) -> dict[str, Any]:
    description = getattr(monitor, "description", None)
    if isinstance(description, MachineDescription):
        return run_metadata(description, plan_name=plan_name, **kw)
    # the tune monitor carries no description (yet): the standard keys we can fill
    return {
        "plan_name": plan_name,
        "plan_args": {k: repr(v) for k, v in kw["plan_args"].items()},
        "units": dict(kw.get("units") or {}),
        "machine": {"name": getattr(getattr(monitor, "spec", None), "name", monitor.name)},
    }


# -- knobs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KnobSet:
    """Knobs resolved onto magnet families.

    Attributes:
        names: knob names.
        units: knob units (e.g. ``m^-2``).
        matrix: per family, (nmembers, nknobs) strength change (SI) per knob unit.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    matrix: tuple[np.ndarray, ...]

    def strengths(self, current: Sequence[np.ndarray], steps: np.ndarray) -> list[np.ndarray]:
        """New strengths per family after knob changes ``steps`` (knob units)."""
        return [c + m @ steps for c, m in zip(current, self.matrix, strict=True)]


def resolve_knobs(
    description: MachineDescription,
    families: Sequence[SettableFamily],
    knobs: Sequence[str] | None,
    kind: str,
    *,
    plan: str,
) -> KnobSet:
    """Knobs of the description on ``families``; default: every knob of magnets of ``kind``.

    Raises:
        ValueError: an unknown knob, a knob with magnets outside ``families``, no knob.
    """
    if isinstance(knobs, str):
        raise ValueError(f"{plan}: knobs must be a list of knob names, not the string {knobs!r}")
    where = {n: (f, i) for f, fam in enumerate(families) for i, n in enumerate(fam.names)}
    if knobs is None:
        knobs = [
            k
            for k, spec in description.knobs.items()
            if all(n in where for n in spec.coefficients)
            and all(description.device(n).kind == kind for n in spec.coefficients)
        ]
        if not knobs:
            raise ValueError(
                f"{plan}: no knob of {kind} magnets on {[f.name for f in families]}; "
                f"give knobs= (knobs of this machine: {sorted(description.knobs)})"
            )
    names = list(knobs)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"{plan}: give distinct knob names, got {names!r}")
    unknown = [k for k in names if k not in description.knobs]
    if unknown:
        raise ValueError(
            f"{plan}: unknown knob(s) {unknown}; knobs of {description.machine.name!r}: "
            f"{sorted(description.knobs)}"
        )
    matrix = [np.zeros((len(fam.names), len(names))) for fam in families]
    for j, k in enumerate(names):
        outside = [n for n in description.knobs[k].coefficients if n not in where]
        if outside:
            raise ValueError(
                f"{plan}: knob {k!r} moves {outside[:5]}, which are not in "
                f"{[f.name for f in families]}"
            )
        for n, c in description.knobs[k].coefficients.items():
            f, i = where[n]
            matrix[f][i, j] += float(c)
    units = tuple(description.knobs[k].unit for k in names)
    return KnobSet(tuple(names), units, tuple(matrix))


def model_knob_response(
    description: MachineDescription,
    hardware: dict[str, float],
    rf_frequency_hz: float | None,
    knobs: Sequence[str],
    quantity: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's tunes or chromaticity (2,) and their response (2, nknobs) (a worker job).

    The online model at the given hardware setpoints (A) and RF frequency (Hz); the response
    is per knob unit.
    """
    model = OnlineModel(description)
    model.set_hardware(hardware)
    if rf_frequency_hz is not None:
        model.rf_frequency = float(rf_frequency_hz)
    if quantity == "tunes":
        return model.tunes(), model.tune_response(list(knobs))
    if quantity == "chromaticity":
        return model.chromaticity(), model.chromaticity_response(list(knobs))
    raise ValueError(f"unknown quantity {quantity!r}")


def current_strengths(families: Sequence[SettableFamily]) -> MsgGenerator[list[np.ndarray]]:
    """Strength readbacks (SI) of every family."""
    out = []
    for fam in families:
        out.append(np.asarray((yield from call_async(fam.strengths)), float))
    return out


def check_knob_targets(
    families: Sequence[SettableFamily], targets: Sequence[np.ndarray], *, plan: str, why: str
) -> None:
    """Raise ``ValueError`` (``why`` and the limit errors) if a target is out of limits."""
    problems = []
    for fam, values in zip(families, targets, strict=True):
        try:
            fam.check_strengths(values)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError(f"{plan}: {why}, refused before any move: " + "; ".join(problems)[:2000])


def apply_knobs(
    families: Sequence[SettableFamily],
    targets: Sequence[np.ndarray],
    current: Sequence[np.ndarray],
) -> MsgGenerator[float]:
    """Set the families whose ``targets`` (SI) differ from ``current``; return when settled.

    The first message is a set (put it right after a checkpoint). Returns the time (epoch, s)
    the readbacks were stamped.
    """
    settled = time.time()
    for fam, values, now in zip(families, targets, current, strict=True):
        if np.array_equal(values, now):
            continue
        _, t = yield from set_and_settle(fam, values, hardware=False)
        settled = max(settled, t)
    return settled


def as_families(magnets: SettableFamily | Sequence[SettableFamily]) -> list[SettableFamily]:
    if isinstance(magnets, Sequence) and not isinstance(magnets, str):
        return list(magnets)
    return [cast(SettableFamily, magnets)]


def _tune_result(avg: TuneAverage, method: str, target: np.ndarray | None) -> ResultReadable:
    extra: dict[str, Any] = {} if target is None else {"target": np.mod(target, 1.0)}
    return ResultReadable(
        "tunes",
        tunes=avg.tunes,
        std=np.nan_to_num(avg.std, nan=0.0),
        std_mean=np.nan_to_num(avg.std_mean, nan=0.0),
        n_samples=avg.n_samples,
        method=method,
        **extra,
    )


# -- plans --------------------------------------------------------------------------------------
def measure_tunes(
    tune: TuneMonitor,
    *,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    method: str = "monitor",
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the fractional betatron tunes (x, y) with the tune monitor.

    ``n_samples`` fresh readings (each a new update of the monitor) are recorded as
    ``primary`` events and averaged (unwrapped around the first one, so tunes near an integer
    average correctly). With the twin's 1e-5 rms monitor noise, the default 8 readings give a
    standard error of 3.5e-6.

    A measurement plan that changes nothing.

    Args:
        tune: the tune monitor.
        n_samples: readings averaged (>= 1).
        method: ``"monitor"`` (the tune monitor; a turn-by-turn ``"tbt"`` method is planned).
        timeout: longest wait for all readings (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events (``tune-x``, ``tune-y``, one per reading) and
        the result ``result_tunes`` (``load_result(client, uid, "tunes")``: ``tunes``, ``std``
        of one reading, ``std_mean``, ``n_samples``, ``method``).
    """
    check_tune_monitor(tune, "measure_tunes")
    if method not in METHODS:
        raise ValueError(
            f"measure_tunes: method must be 'monitor' (tbt is not available yet), got {method!r}"
        )
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"measure_tunes: n_samples must be an integer >= 1, got {n_samples!r}")
    _md = _monitor_metadata(
        tune,
        "measure_tunes",
        plan_args={"tune": tune.name, "n_samples": n_samples, "method": method},
        units={"tune-x": "", "tune-y": ""},
        num_points=n_samples,
    )
    _md.update(md or {})
    record = Record("tune", {"x": 0.0, "y": 0.0}, source=tune.name)

    @bpp.run_decorator(md=_md)
    def run() -> MsgGenerator[None]:
        samples, _ = yield from call_async(_tune_readings, tune, n_samples, time.time(), timeout)
        if np.any(np.all(samples == 0.0, axis=1)):
            raise BeamLost(f"beam lost: the tune monitor {tune.name} reads 0, 0")
        for qx, qy in samples:
            yield from bps.create("primary")
            yield from bps.read(record.update(x=float(qx), y=float(qy)))
            yield from bps.save()
        avg = average_tunes(samples)
        yield from bps.create("result_tunes")
        yield from bps.read(_tune_result(avg, method, None))
        yield from bps.save()

    return cast(str, (yield from run()))


def correct_tunes(
    tune: TuneMonitor,
    magnets: SettableFamily | Sequence[SettableFamily],
    *,
    target: Sequence[float],
    knobs: Sequence[str] | None = None,
    tolerance: float = 5e-5,
    iterations: int = 5,
    gain: float = 1.0,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    max_change: float = 0.05,
    svd_cut: float | None = None,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Bring the fractional tunes to ``target`` with quadrupole knobs, iteratively.

    Each iteration measures the tunes (``n_samples`` fresh readings), computes the knob
    changes that cancel ``wrap(measured - target)`` through the online model's tune response
    at the present setpoints (central differences, in the worker process; minimum-norm least
    squares, :func:`accplans.physics.solve_knobs`), applies ``gain`` times them and measures
    again; it stops once both planes are within ``tolerance`` or after ``iterations`` steps.

    Before anything moves: the target must be finite, the needed change at most
    ``max_change`` in each plane, and the first step within every magnet's limits; each later
    step is checked before it is set.

    A correction plan: it changes the magnets of the knobs. It keeps the result when the
    tunes reach the target, keeps the last completed step on a user stop, and restores the
    starting setpoints when it fails (no convergence within ``iterations``, a divergence, a
    limit) or is aborted.

    Args:
        tune: the tune monitor.
        magnets: the families the knobs act on (e.g. ``quadrupoles``).
        target: fractional tunes (x, y) to reach (an integer part is ignored).
        knobs: knob names of the description (``QF_strength``...); default every knob whose
            magnets are all quadrupoles of ``magnets``.
        tolerance: largest |measured - target| accepted, per plane (tune units).
        iterations: largest number of correction steps.
        gain: fraction of each computed step applied (0 < gain <= 1).
        n_samples: tune readings averaged per measurement.
        max_change: largest |target - measured| accepted at the start (tune units): a larger
            change is out of reach of a linear correction and is refused.
        svd_cut: relative singular value cut of the knob solve (default: none).
        timeout: longest wait for the tune readings of one measurement (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``baseline`` event (tunes before), one ``primary`` event per step
        (knob steps in knob units, tunes after, error) and the result ``result_tunes`` (the
        final tunes and the target).
    """
    check_tune_monitor(tune, "correct_tunes")
    families = as_families(magnets)
    description = description_of(*families)
    goal = np.asarray(target, float)
    if goal.shape != (2,) or not np.all(np.isfinite(goal)):
        raise ValueError(f"correct_tunes: target must be two finite tunes (x, y), got {target!r}")
    if not np.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"correct_tunes: tolerance must be > 0, got {tolerance!r}")
    if not 0 < gain <= 1:
        raise ValueError(f"correct_tunes: gain must be in (0, 1], got {gain!r}")
    if iterations < 1 or n_samples < 1:
        raise ValueError("correct_tunes: iterations and n_samples must be >= 1")
    if not np.isfinite(max_change) or not 0 < max_change <= 0.5:
        raise ValueError(f"correct_tunes: max_change must be in (0, 0.5], got {max_change!r}")
    knob_set = resolve_knobs(description, families, knobs, "quadrupole", plan="correct_tunes")
    nk = len(knob_set.names)
    _md = run_metadata(
        description,
        plan_name="correct_tunes",
        plan_args={
            "tune": tune.name,
            "magnets": [f.name for f in families],
            "target": goal.tolist(),
            "knobs": list(knob_set.names),
            "tolerance": tolerance,
            "iterations": iterations,
            "gain": gain,
            "n_samples": n_samples,
            "max_change": max_change,
            "svd_cut": svd_cut,
        },
        units={"step-knob_steps": "knob units", "tunes-x": "", "tunes-y": ""},
        knob_units=list(knob_set.units),
    )
    _md.update(md or {})
    step_record = Record(
        "step",
        {"iteration": 0, "knob_steps": np.zeros(nk), "error_x": 0.0, "error_y": 0.0},
        source="correct_tunes",
    )
    tune_record = Record("tunes", {"x": 0.0, "y": 0.0}, source=tune.name)

    def solve(
        snapshot_hw: dict[str, float], measured: np.ndarray
    ) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
        _, response = yield from compute(
            model_knob_response, description, snapshot_hw, None, knob_set.names, "tunes"
        )
        error = wrap_tune(measured - goal)
        solution = solve_knobs(response, error, svd_cut=svd_cut)
        return gain * solution.steps, error

    def hardware_now() -> MsgGenerator[dict[str, float]]:
        snap = yield from take_snapshot(description, families)
        return {n: v for values in snap.setpoints.values() for n, v in values.items()}

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, families)
        start = yield from read_tunes(tune, n_samples=n_samples, timeout=timeout)
        error0 = wrap_tune(start.tunes - goal)
        if np.max(np.abs(error0)) > max_change:
            raise ValueError(
                f"correct_tunes: target {goal.tolist()} out of reach: the tunes "
                f"{np.round(start.tunes, 5).tolist()} would change by "
                f"{np.round(-error0, 5).tolist()}, more than max_change={max_change:g}; "
                "refused before any move"
            )
        hw = {n: v for values in snapshot.setpoints.values() for n, v in values.items()}
        steps, _ = yield from solve(hw, start.tunes)
        current = yield from current_strengths(families)
        check_knob_targets(
            families,
            knob_set.strengths(current, steps),
            plan="correct_tunes",
            why=f"target {goal.tolist()} out of reach: knob steps {steps.tolist()} leave limits",
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            nonlocal steps
            yield from bps.create("baseline")
            yield from bps.read(tune_record.update(x=start.tunes[0], y=start.tunes[1]))
            yield from bps.save()
            measured, error = start, error0
            for k in range(iterations):
                if np.max(np.abs(error)) <= tolerance:
                    break
                if k > 0:
                    hw_now = yield from hardware_now()
                    steps, _ = yield from solve(hw_now, measured.tunes)
                now = yield from current_strengths(families)
                targets = knob_set.strengths(now, steps)
                check_knob_targets(
                    families, targets, plan="correct_tunes", why=f"step {k + 1} leaves limits"
                )
                yield from bps.checkpoint()
                settled = yield from apply_knobs(families, targets, now)
                before = float(np.max(np.abs(error)))
                measured = yield from read_tunes(
                    tune, n_samples=n_samples, after=settled, timeout=timeout
                )
                error = wrap_tune(measured.tunes - goal)
                yield from bps.create("primary")
                yield from bps.read(
                    step_record.update(
                        iteration=k + 1, knob_steps=steps, error_x=error[0], error_y=error[1]
                    )
                )
                yield from bps.read(tune_record.update(x=measured.tunes[0], y=measured.tunes[1]))
                yield from bps.save()
                if np.max(np.abs(error)) > 1.5 * before:
                    raise RuntimeError(
                        f"correct_tunes diverged at step {k + 1}: |error| {before:.2e} -> "
                        f"{np.max(np.abs(error)):.2e}; restoring the starting setpoints"
                    )
            if np.max(np.abs(error)) > tolerance:
                raise RuntimeError(
                    f"correct_tunes did not reach {goal.tolist()} within {tolerance:g} in "
                    f"{iterations} steps (error {np.round(error, 6).tolist()}); restoring the "
                    "starting setpoints"
                )
            yield from bps.create("result_tunes")
            yield from bps.read(_tune_result(measured, "monitor", goal))
            yield from bps.save()

        return cast(
            str,
            (yield from restore_on_exit(run(), families, snapshot, policy="correction")),
        )

    return (yield from plan())
