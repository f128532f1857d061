"""``measure_chromaticity`` and ``correct_chromaticity``: tunes along an RF-frequency scan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator, RequestStop

from accplans.data import ResultReadable, run_metadata
from accplans.devices import SettableFamily, TuneMonitor, call_async
from accplans.physics import (
    ChromaticityFit,
    TuneAverage,
    delta_for_frequency_step,
    fit_chromaticity,
    frequency_step_for_delta,
    solve_knobs,
)

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import set_and_settle
from ._worker import compute
from .dispersion import model_alpha_c, scan_momenta
from .tunes import (
    DEFAULT_TUNE_SAMPLES,
    apply_knobs,
    as_families,
    check_knob_targets,
    check_tune_monitor,
    current_strengths,
    model_knob_response,
    read_tunes,
    resolve_knobs,
)

__all__ = ["correct_chromaticity", "measure_chromaticity"]

#: Largest |dp/p| of a default scan (the issue's 2e-3), unless the RF limits allow less.
DEFAULT_DP = 2e-3


@dataclass
class _Scan:
    """The points of one RF scan: momentum offsets, tunes (unwrapped later), RF steps (Hz)."""

    dp: list[float]
    tunes: list[np.ndarray]
    rf_steps: list[float]

    def fit(self, order: int) -> ChromaticityFit:
        return fit_chromaticity(np.array(self.dp), np.array(self.tunes), order=order)


def _scan_steps(
    rf: SettableFamily, f0: float, a_c: float, dp: float | None, n_steps: int, plan: str
) -> np.ndarray:
    """RF steps (Hz) of the scan, checked against the RF limits (nothing moves)."""
    low, high = rf.limits()
    room = min(high[0] - f0, f0 - low[0])
    largest = DEFAULT_DP if dp is None else dp
    if dp is None:
        largest = min(largest, 0.9 * room / (f0 * abs(a_c)))
    steps = frequency_step_for_delta(scan_momenta(largest, n_steps), f0, a_c)
    description = description_of(rf)
    try:
        check_hardware_limits(description, list(rf.names) * steps.size, f0 + steps)
    except ValueError as exc:
        raise ValueError(
            f"{plan}: the RF steps up to {np.max(np.abs(steps)):.1f} Hz (|dp| {largest:g}) "
            f"leave the RF limits: {exc}"
        ) from None
    return steps


def _result(
    scan: _Scan, order: int, f0: float, a_c: float, target: np.ndarray | None
) -> tuple[ResultReadable, ChromaticityFit]:
    linear = scan.fit(1)
    quadratic = scan.fit(2)
    chosen = quadratic if order == 2 else linear
    tunes = np.array(scan.tunes)
    assert quadratic.second_order is not None
    fields: dict[str, Any] = {
        "chromaticity": chosen.chromaticity,
        "std_chromaticity": chosen.std_chromaticity,
        "order": order,
        "linear": linear.chromaticity,
        "std_linear": linear.std_chromaticity,
        "quadratic": quadratic.chromaticity,
        "std_quadratic": quadratic.std_chromaticity,
        "second_order": quadratic.second_order,
        "std_second_order": quadratic.std_coefficients[2],
        "tunes_at_zero": np.mod(chosen.coefficients[0], 1.0),
        "dp": np.array(scan.dp),
        "tunes_x": tunes[:, 0],
        "tunes_y": tunes[:, 1],
        "rf_steps": np.array(scan.rf_steps),
        "rf_frequency": f0,
        "alpha_c": a_c,
    }
    if target is not None:
        fields["target"] = target
    return ResultReadable("chromaticity", **fields), chosen


def _check_common(
    tune: Any, rf: SettableFamily, dp: float | None, n_steps: int, n_samples: int, order: int,
    alpha_c: float | None, plan: str,
) -> None:  # fmt: skip
    check_tune_monitor(tune, plan)
    if n_steps < 1 or n_samples < 1:
        raise ValueError(f"{plan}: n_steps and n_samples must be >= 1, got {n_steps}, {n_samples}")
    if 2 * n_steps + 1 < 5:
        raise ValueError(f"{plan}: n_steps must be >= 2 (at least 5 points), got {n_steps}")
    if order not in (1, 2):
        raise ValueError(f"{plan}: order must be 1 or 2, got {order!r}")
    if dp is not None and (not np.isfinite(dp) or dp <= 0 or dp > 0.02):
        raise ValueError(f"{plan}: dp must be in (0, 0.02], got {dp!r}")
    if alpha_c is not None and (not np.isfinite(alpha_c) or alpha_c == 0):
        raise ValueError(f"{plan}: alpha_c must be finite and non-zero, got {alpha_c!r}")
    if len(rf.names) != 1:
        raise ValueError(f"{plan}: {rf.name} must have one member (the RF frequency)")


def _rf_scan(
    tune: TuneMonitor,
    rf: SettableFamily,
    f0: float,
    a_c: float,
    steps: np.ndarray,
    scan: _Scan,
    *,
    n_samples: int,
    timeout: float,
    step_record: Record,
    tune_record: Record,
    iteration: int,
    back_to_start: bool,
    nk: int = 0,
) -> MsgGenerator[None]:
    """Step the RF frequency, read the tunes after each step (a ``primary`` event each)."""
    targets = list(steps) + ([0.0] if back_to_start else [])
    # RF steps move no knob: reset the knob steps a knob event left in the record
    knob_zero = {"knob_steps": np.zeros(nk)} if nk else {}
    for step in targets:
        yield from bps.checkpoint()
        readback, settled = yield from set_and_settle(rf, np.array([f0 + step]))
        avg = yield from read_tunes(tune, n_samples=n_samples, after=settled, timeout=timeout)
        seen = float(readback[0] - f0)
        point = float(delta_for_frequency_step(seen, f0, a_c))
        scan.dp.append(point)
        scan.tunes.append(avg.tunes)
        scan.rf_steps.append(seen)
        yield from bps.create("primary")
        yield from bps.read(
            step_record.update(
                iteration=iteration,
                rf_step=float(step),
                rf_step_readback=seen,
                dp=point,
                **knob_zero,
            )
        )
        yield from bps.read(tune_record.update(x=avg.tunes[0], y=avg.tunes[1]))
        yield from bps.save()


def _records(rf: SettableFamily, tune: TuneMonitor, nk: int) -> tuple[Record, Record]:
    values: dict[str, Any] = {"iteration": 0, "rf_step": 0.0, "rf_step_readback": 0.0, "dp": 0.0}
    if nk:
        values["knob_steps"] = np.zeros(nk)
    step = Record("step", values, {"rf_step": "Hz", "rf_step_readback": "Hz"}, source=rf.name)
    return step, Record("tunes", {"x": 0.0, "y": 0.0}, source=tune.name)


def _start_point(scan: _Scan, avg: TuneAverage) -> None:
    scan.dp.append(0.0)
    scan.tunes.append(avg.tunes)
    scan.rf_steps.append(0.0)


def measure_chromaticity(
    tune: TuneMonitor,
    rf: SettableFamily,
    *,
    dp: float | None = None,
    n_steps: int = 2,
    order: int = 2,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    alpha_c: float | None = None,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the unnormalized chromaticity ``xi = dQ / d(dp/p)`` by stepping the RF frequency.

    The tunes are measured at the starting frequency and at ``2 * n_steps`` frequency steps,
    ``n_steps`` of each sign, up to momentum offsets ``+-dp`` (``df = -dp f alpha_c``): 5
    points by default. Each point averages ``n_samples`` fresh tune readings taken after the
    RF frequency read back; ``dp`` of each point comes from the frequency read back. Linear
    and quadratic fits ``Q = q0 + xi dp (+ xi2 dp^2)`` are both recorded, with standard errors
    from their residuals; ``order`` chooses the one reported as ``chromaticity``.

    Noise budget: with monitor noise ``sigma`` per reading, the linear fit's ``xi`` has the
    standard error ``sigma / sqrt(n_samples sum dp_i^2)``: 0.001 on EBS (``+-2e-3``, 1e-5 of
    noise, 8 readings per point), 0.013 on the small ring, whose RF limits allow only
    ``+-1.7e-4``.

    A measurement plan: it claims and changes only the RF frequency, and restores it on
    success, failure, abort and stop. Every frequency is checked against the RF limits before
    the first move.

    Args:
        tune: the tune monitor.
        rf: the RF device (frequency in Hz).
        dp: largest momentum offset ``|dp/p|`` of the scan; by default 2e-3, or the largest
            the RF limits allow (with a 10 % margin) when smaller. A ``dp`` whose steps leave
            the RF limits is refused.
        n_steps: steps per sign (>= 2: at least 5 points).
        order: order of the fit reported as ``chromaticity`` (1 or 2; both are recorded).
            The default 2 keeps the curvature of ``Q(dp)`` (``xi2`` of 60-110 on EBS) out of
            the slope's standard error.
        n_samples: tune readings averaged per point.
        alpha_c: momentum compaction used to turn frequency steps into ``dp``; by default the
            online model's at the starting frequency (computed in the worker process).
        timeout: longest wait for the readings of one point (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``baseline`` event (tunes at the starting frequency), one
        ``primary`` event per frequency step (RF step in Hz, dp, tunes) and the result
        ``result_chromaticity`` (``load_result(client, uid, "chromaticity")``: ``chromaticity``
        and its ``std_chromaticity``, the ``linear`` and ``quadratic`` fits, ``second_order``,
        ``tunes_at_zero``, the points ``dp``, ``tunes_x``, ``tunes_y``, ``rf_steps``, the RF
        frequency and ``alpha_c``).
    """
    _check_common(tune, rf, dp, n_steps, n_samples, order, alpha_c, "measure_chromaticity")
    description = description_of(rf)
    _md = run_metadata(
        description,
        plan_name="measure_chromaticity",
        plan_args={
            "tune": tune.name,
            "rf": rf.name,
            "dp": dp,
            "n_steps": n_steps,
            "order": order,
            "n_samples": n_samples,
            "alpha_c": alpha_c,
        },
        units={"step-rf_step": "Hz", "step-rf_step_readback": "Hz", "tunes-x": "", "tunes-y": ""},
        num_points=2 * n_steps,
    )
    _md.update(md or {})
    step_record, tune_record = _records(rf, tune, 0)

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, [rf])
        f0 = snapshot.setpoints[rf.name][rf.names[0]]
        a_c = alpha_c
        if a_c is None:
            a_c = yield from compute(model_alpha_c, description, f0)
        assert a_c is not None
        steps = _scan_steps(rf, f0, a_c, dp, n_steps, "measure_chromaticity")

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            _, start = yield from call_async(rf.stamped_readbacks)
            avg = yield from read_tunes(tune, n_samples=n_samples, after=start, timeout=timeout)
            yield from bps.create("baseline")
            yield from bps.read(tune_record.update(x=avg.tunes[0], y=avg.tunes[1]))
            yield from bps.save()
            scan = _Scan([], [], [])
            _start_point(scan, avg)
            yield from _rf_scan(
                tune, rf, f0, a_c, steps, scan, n_samples=n_samples, timeout=timeout,
                step_record=step_record, tune_record=tune_record, iteration=0,
                back_to_start=False,
            )  # fmt: skip
            result, _ = _result(scan, order, f0, float(a_c), None)
            yield from bps.create("result_chromaticity")
            yield from bps.read(result)
            yield from bps.save()

        return cast(str, (yield from restore_on_exit(run(), [rf], snapshot, policy="measurement")))

    return (yield from plan())


def correct_chromaticity(
    tune: TuneMonitor,
    rf: SettableFamily,
    magnets: SettableFamily | Sequence[SettableFamily],
    *,
    target: Sequence[float],
    knobs: Sequence[str] | None = None,
    tolerance: float = 0.05,
    iterations: int = 4,
    gain: float = 1.0,
    max_change: float = 10.0,
    dp: float | None = None,
    n_steps: int = 2,
    order: int = 2,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    alpha_c: float | None = None,
    svd_cut: float | None = None,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Bring the chromaticity to ``target`` with sextupole knobs, iteratively.

    Each iteration measures the chromaticity as :func:`measure_chromaticity` does (an RF scan,
    back to the starting frequency as its last step), computes the knob changes that cancel
    ``measured - target`` through the online model's chromaticity response at the present
    setpoints (in the worker process; minimum-norm least squares), applies ``gain`` times them
    and measures again; it stops once both planes are within ``tolerance``, or fails after
    ``iterations`` steps.

    Before anything moves: the RF steps are checked against the RF limits; the target must be
    finite and within ``max_change`` of the model's chromaticity at the present setpoints, and
    the knob step that reaches it from there within every magnet's limits. Each later step is
    checked before it is set.

    A correction plan: it changes the magnets of the knobs (and steps the RF frequency, always
    put back). It keeps the new setpoints when the chromaticity reaches the target and the last
    completed step on a user stop (with the RF frequency back at its start); it restores every
    starting setpoint, RF included, when it fails or is aborted.

    Args:
        tune: the tune monitor.
        rf: the RF device (frequency in Hz).
        magnets: the families the knobs act on (e.g. ``sextupoles``).
        target: chromaticity (x, y) to reach, unnormalized ``dQ / d(dp/p)``.
        knobs: knob names (``SF_strength``...); default every knob whose magnets are all
            sextupoles of ``magnets``.
        tolerance: largest |measured - target| accepted, per plane.
        iterations: largest number of correction steps.
        gain: fraction of each computed step applied (0 < gain <= 1).
        max_change: largest |target - model chromaticity| accepted (refused before any move).
        dp: largest ``|dp/p|`` of each scan (default as :func:`measure_chromaticity`).
        n_steps: RF steps per sign in each scan (>= 2).
        order: fit order used for the chromaticity (1 or 2, as :func:`measure_chromaticity`).
        n_samples: tune readings averaged per point.
        alpha_c: momentum compaction (default: the online model's, in the worker).
        svd_cut: relative singular value cut of the knob solve (default: none).
        timeout: longest wait for the readings of one point (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``baseline`` event (tunes at the start), one ``primary`` event
        per step (RF steps of each scan, the return to the starting frequency, and each knob
        step, whose event carries the tunes at the starting frequency) and the result
        ``result_chromaticity`` of the last scan, with ``target``.
    """
    plan_name = "correct_chromaticity"
    _check_common(tune, rf, dp, n_steps, n_samples, order, alpha_c, plan_name)
    families = as_families(magnets)
    description = description_of(rf, *families)
    goal = np.asarray(target, float)
    if goal.shape != (2,) or not np.all(np.isfinite(goal)):
        raise ValueError(f"{plan_name}: target must be two finite chromaticities, got {target!r}")
    if not np.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"{plan_name}: tolerance must be > 0, got {tolerance!r}")
    if not 0 < gain <= 1:
        raise ValueError(f"{plan_name}: gain must be in (0, 1], got {gain!r}")
    if iterations < 1:
        raise ValueError(f"{plan_name}: iterations must be >= 1, got {iterations!r}")
    if not np.isfinite(max_change) or max_change <= 0:
        raise ValueError(f"{plan_name}: max_change must be > 0, got {max_change!r}")
    knob_set = resolve_knobs(description, families, knobs, "sextupole", plan=plan_name)
    nk = len(knob_set.names)
    _md = run_metadata(
        description,
        plan_name=plan_name,
        plan_args={
            "tune": tune.name,
            "rf": rf.name,
            "magnets": [f.name for f in families],
            "target": goal.tolist(),
            "knobs": list(knob_set.names),
            "tolerance": tolerance,
            "iterations": iterations,
            "gain": gain,
            "max_change": max_change,
            "dp": dp,
            "n_steps": n_steps,
            "order": order,
            "n_samples": n_samples,
            "alpha_c": alpha_c,
            "svd_cut": svd_cut,
        },
        units={"step-rf_step": "Hz", "step-rf_step_readback": "Hz", "tunes-x": "", "tunes-y": ""},
        knob_units=list(knob_set.units),
    )
    _md.update(md or {})
    step_record, tune_record = _records(rf, tune, nk)
    moved: list[SettableFamily] = [*families, rf]

    def hardware(snapshot_setpoints: dict[str, dict[str, float]]) -> dict[str, float]:
        return {
            n: v
            for fam in families
            for n, v in snapshot_setpoints[fam.name].items()
        }  # fmt: skip

    def solve(hw: dict[str, float], f0: float, error: np.ndarray) -> MsgGenerator[np.ndarray]:
        _, response = yield from compute(
            model_knob_response, description, hw, f0, knob_set.names, "chromaticity"
        )
        return gain * solve_knobs(response, error, svd_cut=svd_cut).steps

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, moved)
        f0 = snapshot.setpoints[rf.name][rf.names[0]]
        a_c = alpha_c
        if a_c is None:
            a_c = yield from compute(model_alpha_c, description, f0)
        assert a_c is not None
        steps = _scan_steps(rf, f0, a_c, dp, n_steps, plan_name)
        # reach: from the model's chromaticity at the present setpoints, before any move
        hw = hardware(snapshot.setpoints)
        xi_model, response = yield from compute(
            model_knob_response, description, hw, f0, knob_set.names, "chromaticity"
        )
        if np.max(np.abs(goal - xi_model)) > max_change:
            raise ValueError(
                f"{plan_name}: target {goal.tolist()} out of reach: more than "
                f"max_change={max_change:g} from the model's chromaticity "
                f"{np.round(xi_model, 2).tolist()}; refused before any move"
            )
        reach = solve_knobs(response, xi_model - goal, svd_cut=svd_cut).steps
        now = yield from current_strengths(families)
        check_knob_targets(
            families,
            knob_set.strengths(now, reach),
            plan=plan_name,
            why=f"target {goal.tolist()} out of reach: knob steps {np.round(reach, 4).tolist()} "
            "leave limits",
        )

        def measure(k: int, scan: _Scan) -> MsgGenerator[ChromaticityFit]:
            yield from _rf_scan(
                tune, rf, f0, a_c, steps, scan, n_samples=n_samples, timeout=timeout,
                step_record=step_record, tune_record=tune_record, iteration=k,
                back_to_start=True, nk=nk,
            )  # fmt: skip
            return scan.fit(order)

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            _, start = yield from call_async(rf.stamped_readbacks)
            avg = yield from read_tunes(tune, n_samples=n_samples, after=start, timeout=timeout)
            yield from bps.create("baseline")
            yield from bps.read(tune_record.update(x=avg.tunes[0], y=avg.tunes[1]))
            yield from bps.save()
            scan = _Scan([], [], [])
            _start_point(scan, avg)
            fit = yield from measure(0, scan)
            error = fit.chromaticity - goal
            for k in range(1, iterations + 1):
                if np.max(np.abs(error)) <= tolerance:
                    break
                snap = yield from take_snapshot(description, families)
                knob_steps = yield from solve(hardware(snap.setpoints), f0, error)
                now = yield from current_strengths(families)
                targets = knob_set.strengths(now, knob_steps)
                check_knob_targets(families, targets, plan=plan_name, why=f"step {k} leaves limits")
                before = float(np.max(np.abs(error)))
                yield from bps.checkpoint()
                settled = yield from apply_knobs(families, targets, now)
                avg = yield from read_tunes(
                    tune, n_samples=n_samples, after=settled, timeout=timeout
                )
                yield from bps.create("primary")
                yield from bps.read(
                    step_record.update(
                        iteration=k, rf_step=0.0, rf_step_readback=0.0, dp=0.0,
                        knob_steps=knob_steps,
                    )
                )  # fmt: skip
                yield from bps.read(tune_record.update(x=avg.tunes[0], y=avg.tunes[1]))
                yield from bps.save()
                scan = _Scan([], [], [])
                _start_point(scan, avg)
                fit = yield from measure(k, scan)
                error = fit.chromaticity - goal
                if np.max(np.abs(error)) > 1.5 * before:
                    raise RuntimeError(
                        f"{plan_name} diverged at step {k}: |error| {before:.3f} -> "
                        f"{np.max(np.abs(error)):.3f}; restoring the starting setpoints"
                    )
            if np.max(np.abs(error)) > tolerance:
                raise RuntimeError(
                    f"{plan_name} did not reach {goal.tolist()} within {tolerance:g} in "
                    f"{iterations} steps (error {np.round(error, 3).tolist()}); restoring the "
                    "starting setpoints"
                )
            result, _ = _result(scan, order, f0, float(a_c), goal)
            yield from bps.create("result_chromaticity")
            yield from bps.read(result)
            yield from bps.save()

        def rf_back_on_stop(exc: Exception) -> MsgGenerator[None]:
            # a user stop keeps the last completed knob step, never an RF step
            if isinstance(exc, RequestStop):
                yield from set_and_settle(rf, np.array([f0]))
            else:
                yield from []

        body = bpp.contingency_wrapper(run(), except_plan=rf_back_on_stop)
        return cast(str, (yield from restore_on_exit(body, moved, snapshot, policy="correction")))

    return (yield from plan())
