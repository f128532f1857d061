"""``measure_c_minus`` and ``correct_c_minus``: ``|C-|`` by the closest tune approach.

A tune scan moves the tunes through each other with the quadrupole knobs: ``qx`` up and ``qy``
down by the same amount (the knob direction comes from the online model's response of the
uncoupled tunes, in the worker process), so the uncoupled distance ``qx - qy`` changes by a
scan parameter ``t`` (tune units). The tune monitor reads the eigen-tunes, whose distance
follows ``split^2 = (distance + t)^2 + |C-|^2``: :func:`accplans.physics.fit_tune_scan` gives
``|C-|`` and the crossing. A first scan spans the crossing the model predicts (from the
measured tunes) by ``+-span``; while the scan is much wider than ``|C-|``, a narrower one
(``+-max(3 |C-|, min_span)``) around the measured crossing follows, since the parabola's
minimum is resolved best by points near it.

The correction minimises the measured ``|C-|`` with two skew knobs: minimum-norm skew
patterns that move complex ``C-`` by one tune unit along two orthogonal directions (the
model's Guignard response, :func:`accplans.model.c_minus_response`; one knob only where the
skews all act at one phase, as on a periodic ring with one winding per cell). For each knob,
``|C-|`` is measured at ``-a, 0, +a`` (``a`` the present ``|C-|``), the parabola
``|C-|^2 = (c_r + k)^2 + c_i^2`` gives the knob value that minimises it
(:func:`accplans.physics.fit_c_minus_knob`), and that value is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator, RequestStop

from accplans.config import MachineDescription
from accplans.data import (
    FieldSpec,
    ResultReadable,
    ResultSchema,
    register_result_kind,
    run_metadata,
)
from accplans.devices import SettableFamily, TuneMonitor
from accplans.model import (
    OnlineModel,
    c_minus_response,
    crossing_shift,
    tune_split_direction,
)
from accplans.physics import (
    CMinusKnobs,
    TuneScanFit,
    c_minus_knob_patterns,
    fit_c_minus_knob,
    fit_tune_scan,
    wrap_tune,
)

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._stubs import set_family_hardware
from ._worker import compute
from .tunes import (
    DEFAULT_TUNE_SAMPLES,
    KnobSet,
    apply_knobs,
    as_families,
    check_knob_targets,
    check_tune_monitor,
    current_strengths,
    read_tunes,
    resolve_knobs,
)

__all__ = ["correct_c_minus", "measure_c_minus"]

#: Points of each scan.
DEFAULT_POINTS = 7
#: Half-width of the first scan in ``qx - qy`` (tune units): it must hold the crossing, which
#: the model predicts within a few 1e-3 on a machine whose tune response differs from it.
DEFAULT_SPAN = 0.02
#: Narrowest half-width of a refined scan: below it the crossing's position (known to ~1e-4)
#: and the tune monitor's noise limit the fit more than the width.
DEFAULT_MIN_SPAN = 5e-4
#: Largest change of either tune in a scan.
DEFAULT_MAX_SHIFT = 0.15
#: Scans of one measurement at most (the first, then narrower ones).
DEFAULT_PASSES = 3
#: Smallest knob step of the correction (tune units): the twin's tune monitor resolves
#: ``|C-|`` to a few 1e-6.
MIN_KNOB_STEP = 1e-5

register_result_kind(
    ResultSchema(
        kind="c_minus",
        version=1,
        description=(
            "|C-| by the closest tune approach (plans measure_c_minus, correct_c_minus): the "
            "eigen-tunes of a quadrupole-knob scan that moves qx up and qy down through each "
            "other, fitted with split^2 = (qx - qy)^2 + |C-|^2; the scan's knob direction and "
            "points; for a correction, |C-| before and the values of the C- skew knobs set."
        ),
        fields={
            "c_minus": FieldSpec("", "()"),
            "std": FieldSpec("", "()"),
            "crossing": FieldSpec("", "()"),
            "shift": FieldSpec("", "(npoint,)"),
            "tunes": FieldSpec("", "(npoint, 2)"),
            "knob_names": FieldSpec("", "(nknob,)", "str"),
            "direction": FieldSpec("", "(nknob,)"),
            "c_minus_before": FieldSpec("", "()", optional=True),
            "std_before": FieldSpec("", "()", optional=True),
            "skew_knob_1": FieldSpec("", "()", optional=True),
            "skew_knob_2": FieldSpec("", "()", optional=True),
        },
    )
)


# -- worker jobs ----------------------------------------------------------------------------
def _model(description: MachineDescription, hardware: dict[str, float]) -> OnlineModel:
    model = OnlineModel(description)
    model.set_hardware(hardware)
    return model


def scan_direction(
    description: MachineDescription,
    hardware: dict[str, float],
    knobs: Sequence[str],
    distance: float,
) -> tuple[np.ndarray, float]:
    """Knob direction of a tune scan and the crossing's scan value (a worker job).

    Args:
        description: the machine.
        hardware: hardware setpoints (A) of the magnets (the model's settings).
        knobs: the quadrupole knobs.
        distance: measured ``qx - qy`` (folded into [-0.5, 0.5)).

    Returns:
        ``(direction, crossing)``: knob steps (knob units) per unit change of ``qx - qy``
        (``qx`` by +1/2, ``qy`` by -1/2), and the change ``t`` that brings the model's
        uncoupled tunes together from the measured distance (``~ -distance``).

    Raises:
        ValueError: the model's tunes cannot be brought together along the direction.
    """
    model = _model(description, hardware)
    direction = tune_split_direction(model, knobs)
    return direction, crossing_shift(model, knobs, direction, -float(distance))


def skew_knobs(
    description: MachineDescription,
    hardware: dict[str, float],
    skews: Sequence[str],
    usable: np.ndarray | None = None,
) -> CMinusKnobs:
    """The ``C-`` skew knobs at the model's optics, on the ``usable`` skews (a worker job)."""
    response = c_minus_response(_model(description, hardware), skews)
    return c_minus_knob_patterns(response, usable=usable)


#: A skew within this fraction of its range from a limit is left out of the knobs.
LIMIT_MARGIN = 0.1


def _free_skews(
    description: MachineDescription, names: Sequence[str], strengths: np.ndarray
) -> np.ndarray:
    """The skews at least ``LIMIT_MARGIN`` of their range from either limit (a mask)."""
    free = np.ones(len(names), bool)
    for i, name in enumerate(names):
        spec = description.device(name)
        if spec.calibration is None or spec.limits is None:
            continue
        ends = sorted(float(spec.calibration.to_strength(v)) for v in spec.limits)
        margin = LIMIT_MARGIN * (ends[1] - ends[0])
        free[i] = ends[0] + margin < strengths[i] < ends[1] - margin
    return free


# -- the scan -------------------------------------------------------------------------------
@dataclass
class _Measured:
    """One ``|C-|`` measurement: the last scan's fit and points."""

    fit: TuneScanFit
    shift: np.ndarray
    tunes: np.ndarray

    @property
    def c_minus(self) -> float:
        return self.fit.c_minus

    @property
    def resolution(self) -> float:
        """Three standard errors (0 when the fit gives none)."""
        return 3.0 * float(np.nan_to_num(self.fit.std, nan=0.0))


@dataclass
class _Scanner:
    """A plan's tune scans: the knobs, the direction, the quadrupoles' start and limits."""

    plan: str
    tune: TuneMonitor
    families: list[SettableFamily]
    knob_set: KnobSet
    start_hardware: list[np.ndarray]
    start_strengths: list[np.ndarray]
    direction: np.ndarray
    points: int
    min_span: float
    passes: int
    max_shift: float
    n_samples: int
    timeout: float
    record: Record = field(
        default_factory=lambda: Record(
            "point",
            {"measurement": 0, "scan": 0, "shift": 0.0, "tune_x": 0.0, "tune_y": 0.0},
            source="c_minus",
        )
    )

    def check(self, center: float, span: float) -> np.ndarray:
        """The scan values of ``center +- span``, checked against reach and limits."""
        shifts = np.linspace(center - span, center + span, self.points)
        largest = 0.5 * float(np.max(np.abs(shifts)))
        if largest > self.max_shift:
            raise ValueError(
                f"{self.plan}: the scan would move each tune by up to {largest:.4f}, more than "
                f"max_shift={self.max_shift:g} (tunes too far apart to bring together "
                "linearly); refused before any move"
            )
        for t in (shifts[0], shifts[-1]):  # the targets are linear in t: the ends bound them
            check_knob_targets(
                self.families,
                self.knob_set.strengths(self.start_strengths, t * self.direction),
                plan=self.plan,
                why=f"the scan's point {t:+.4f} (change of qx - qy) leaves limits",
            )
        return shifts

    def restore(self) -> MsgGenerator[None]:
        """The quadrupoles back at their starting hardware setpoints."""
        for fam, values in zip(self.families, self.start_hardware, strict=True):
            yield from set_family_hardware(fam, values)

    def scan(self, index: int, number: int, shifts: np.ndarray) -> MsgGenerator[_Measured]:
        """Step through ``shifts``, read the eigen-tunes at each, put the quadrupoles back.

        They go back after the scan and on a user stop; after a failure or an abort,
        :func:`~accplans.plans.restore_on_exit` restores them (with everything else).
        """
        tunes = np.empty((shifts.size, 2))

        def steps() -> MsgGenerator[None]:
            now = self.start_strengths
            for i, t in enumerate(shifts):
                targets = self.knob_set.strengths(self.start_strengths, t * self.direction)
                yield from bps.checkpoint()
                settled = yield from apply_knobs(self.families, targets, now)
                now = targets
                avg = yield from read_tunes(
                    self.tune, n_samples=self.n_samples, after=settled, timeout=self.timeout
                )
                tunes[i] = avg.tunes
                yield from bps.create("primary")
                yield from bps.read(
                    self.record.update(
                        measurement=index,
                        scan=number,
                        shift=float(t),
                        tune_x=float(avg.tunes[0]),
                        tune_y=float(avg.tunes[1]),
                    )
                )
                yield from bps.save()

        def put_back(exc: Exception) -> MsgGenerator[None]:
            # a user stop keeps a correction's last step (restore_on_exit): the quadrupoles go
            # back here; any other ending restores everything in restore_on_exit
            if isinstance(exc, RequestStop):
                yield from self.restore()

        yield from bpp.contingency_wrapper(steps(), except_plan=put_back)
        yield from self.restore()
        try:
            fit = fit_tune_scan(shifts, tunes)
        except ValueError as exc:
            raise RuntimeError(
                f"{self.plan}: measurement {index}, scan {number}: {exc} (scan "
                f"{shifts[0]:+.4f} .. {shifts[-1]:+.4f} of qx - qy)"
            ) from None
        return _Measured(fit, shifts, tunes)

    def measure(self, index: int, center: float, span: float) -> MsgGenerator[_Measured]:
        """``|C-|``: a scan of ``center +- span``, then narrower ones while they help."""
        measured = yield from self.scan(index, 0, self.check(center, span))
        for number in range(1, self.passes + 1):
            crossing, c = measured.fit.crossing, measured.c_minus
            if abs(crossing - center) > span:
                raise RuntimeError(
                    f"{self.plan}: measurement {index}: the tunes do not cross within the scan "
                    f"{center - span:+.4f} .. {center + span:+.4f} of qx - qy (fitted crossing "
                    f"{crossing:+.4f}); give a larger span"
                )
            if c > span:
                raise RuntimeError(
                    f"{self.plan}: measurement {index}: the scan of +-{span:.4f} does not "
                    f"resolve |C-| (fitted {c:.3g}: the tunes never come closer than the scan "
                    f"is wide, or the eigen-tunes were misread)"
                )
            centred = abs(crossing - center) <= 0.5 * span
            narrower = max(3.0 * c, self.min_span)
            if centred and narrower >= 0.5 * span:
                break
            if centred:
                span = narrower
            center = crossing
            if number < self.passes:
                measured = yield from self.scan(index, number, self.check(center, span))
        return measured


def _check_options(
    plan: str, points: int, span: float, min_span: float, passes: int, max_shift: float
) -> None:
    if not isinstance(points, int) or points < 4:
        raise ValueError(f"{plan}: points must be an integer >= 4, got {points!r}")
    if not (np.isfinite(span) and span > 0):
        raise ValueError(f"{plan}: span must be a positive tune distance, got {span!r}")
    if not (np.isfinite(min_span) and 0 < min_span <= span):
        raise ValueError(f"{plan}: min_span must be in (0, span={span:g}], got {min_span!r}")
    if not isinstance(passes, int) or passes < 1:
        raise ValueError(f"{plan}: passes must be an integer >= 1, got {passes!r}")
    if not (np.isfinite(max_shift) and 0 < max_shift < 0.5):
        raise ValueError(f"{plan}: max_shift must be in (0, 0.5), got {max_shift!r}")


def _hardware(snapshot: Any) -> dict[str, float]:
    return {n: v for values in snapshot.setpoints.values() for n, v in values.items()}


def _prepare(
    plan: str,
    tune: TuneMonitor,
    families: list[SettableFamily],
    knob_set: KnobSet,
    hardware: dict[str, float],
    span: float,
    options: dict[str, Any],
) -> MsgGenerator[tuple[_Scanner, float, float]]:
    """Read the tunes, get the scan's direction and crossing, check the first scan.

    Returns the scanner, the first scan's centre (predicted crossing) and the measured
    ``qx - qy``. Nothing moves.
    """
    description = description_of(*families)
    start = yield from read_tunes(tune, n_samples=options["n_samples"], timeout=options["timeout"])
    distance = float(wrap_tune(start.tunes[0] - start.tunes[1]))
    try:
        direction, crossing = yield from compute(
            scan_direction, description, hardware, knob_set.names, distance
        )
    except ValueError as exc:
        raise ValueError(
            f"{plan}: tunes {np.round(start.tunes, 5).tolist()} cannot be brought together "
            f"with the knobs {list(knob_set.names)}: {exc}; refused before any move"
        ) from None
    scanner = _Scanner(
        plan,
        tune,
        families,
        knob_set,
        [np.array([hardware[n] for n in fam.names]) for fam in families],
        (yield from current_strengths(families)),
        np.asarray(direction, dtype=float),
        **options,
    )
    scanner.check(crossing, span)
    return scanner, float(crossing), distance


def _result(scanner: _Scanner, measured: _Measured, **extra: float) -> ResultReadable:
    fields: dict[str, Any] = {
        "c_minus": measured.c_minus,
        "std": float(measured.fit.std),
        "crossing": measured.fit.crossing,
        "shift": measured.shift,
        "tunes": measured.tunes,
        "knob_names": list(scanner.knob_set.names),
        "direction": scanner.direction,
        **extra,
    }
    return ResultReadable("c_minus", **fields)


_UNITS = {
    "point-shift": "",
    "point-tune_x": "",
    "point-tune_y": "",
    "c_minus-c_minus": "",
    "c_minus-crossing": "",
    "c_minus-skews": "m^-2",
}


def _options_and_md(
    plan_name: str,
    description: MachineDescription,
    tune: TuneMonitor,
    families: list[SettableFamily],
    knob_set: KnobSet,
    md: dict | None,
    *,
    points: int,
    span: float,
    min_span: float,
    passes: int,
    max_shift: float,
    n_samples: int,
    timeout: float,
    skew: SettableFamily | None = None,
    iterations: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scan options (for :func:`_prepare`) and the start metadata of both plans.

    ``skew`` and ``iterations`` are the correction's: its ``plan_args`` hold them (after the
    quadrupoles and the knobs respectively) and its metadata the skew names.
    """
    options: dict[str, Any] = {
        "points": points,
        "min_span": min_span,
        "passes": passes,
        "max_shift": max_shift,
        "n_samples": n_samples,
        "timeout": timeout,
    }
    plan_args: dict[str, Any] = {"tune": tune.name, "quadrupoles": [f.name for f in families]}
    extra: dict[str, Any] = {}
    if skew is not None:
        plan_args["skew"] = skew.name
        extra["skew_names"] = list(skew.names)
    plan_args["knobs"] = list(knob_set.names)
    if iterations is not None:
        plan_args["iterations"] = iterations
    plan_args.update(span=span, **options)
    _md = run_metadata(
        description,
        plan_name=plan_name,
        plan_args=plan_args,
        units=_UNITS,
        knob_units=list(knob_set.units),
        **extra,
    )
    _md.update(md or {})
    return options, _md


# -- plans ----------------------------------------------------------------------------------
def measure_c_minus(
    tune: TuneMonitor,
    quadrupoles: SettableFamily | Sequence[SettableFamily],
    *,
    knobs: Sequence[str] | None = None,
    points: int = DEFAULT_POINTS,
    span: float = DEFAULT_SPAN,
    min_span: float = DEFAULT_MIN_SPAN,
    passes: int = DEFAULT_PASSES,
    max_shift: float = DEFAULT_MAX_SHIFT,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure ``|C-|`` (tune units) by the closest tune approach: a tune scan through the crossing.

    The quadrupole knobs move ``qx`` up and ``qy`` down by the same amount (the online model's
    minimum-norm knob direction, in the worker), so that the uncoupled ``qx - qy`` changes by
    the scan value ``t``. From the measured tunes, the model predicts the ``t`` where they
    cross; ``points`` values of ``t`` span it by ``+-span``, and at each the tune monitor's
    eigen-tunes are averaged (``n_samples`` fresh readings). The fit ``split^2 = (t -
    t_cross)^2 + |C-|^2`` (:func:`accplans.physics.fit_tune_scan`) gives ``|C-|``, its
    standard error and the crossing; while the scan is wider than twice ``max(3 |C-|,
    min_span)``, a narrower scan around the measured crossing follows (``passes`` scans at
    most), and the last one gives the result.

    Refused before anything moves: knobs that are unknown or not on ``quadrupoles``, tunes
    the model cannot bring together along the direction, a first scan that moves a tune by
    more than ``max_shift`` or leaves a magnet's limits (each later scan is checked before it
    starts).

    A measurement plan: it changes the quadrupoles of the knobs and always restores their
    starting setpoints (after each scan, and however the plan ends: success, failure, abort,
    stop). Nothing else moves.

    Args:
        tune: the tune monitor (eigen-tunes).
        quadrupoles: the quadrupole family (or families) of the knobs.
        knobs: quadrupole knobs of the description; default every knob of quadrupoles on
            ``quadrupoles``.
        points: scan points per scan (>= 4).
        span: half-width of the first scan, in ``qx - qy`` (tune units).
        min_span: narrowest half-width of a refined scan (tune units).
        passes: scans at most (the first and the refined ones).
        max_shift: largest change of either tune in a scan (tune units).
        n_samples: tune readings averaged per point.
        timeout: longest wait for the readings of one point (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events (one per point: measurement 0, scan number,
        ``shift`` ``t``, eigen-tunes), a ``c_minus`` event (``|C-|``, std, crossing) and the
        result ``result_c_minus`` (``load_result(client, uid, "c_minus")``: ``c_minus``,
        ``std``, ``crossing``, the last scan's ``shift`` and ``tunes``, the knob names and
        the direction in knob units per unit of ``qx - qy``).
    """
    plan_name = "measure_c_minus"
    check_tune_monitor(tune, plan_name)
    _check_options(plan_name, points, span, min_span, passes, max_shift)
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"{plan_name}: n_samples must be an integer >= 1, got {n_samples!r}")
    families = as_families(quadrupoles)
    description = description_of(*families)
    knob_set = resolve_knobs(description, families, knobs, "quadrupole", plan=plan_name)
    options, _md = _options_and_md(
        plan_name,
        description,
        tune,
        families,
        knob_set,
        md,
        points=points,
        span=span,
        min_span=min_span,
        passes=passes,
        max_shift=max_shift,
        n_samples=n_samples,
        timeout=timeout,
    )
    summary = Record("c_minus", {"c_minus": 0.0, "std": 0.0, "crossing": 0.0}, source=plan_name)

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, families)
        scanner, center, _ = yield from _prepare(
            plan_name, tune, families, knob_set, _hardware(snapshot), span, options
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            measured = yield from scanner.measure(0, center, span)
            yield from bps.create("c_minus")
            yield from bps.read(
                summary.update(
                    c_minus=measured.c_minus,
                    std=float(measured.fit.std),
                    crossing=measured.fit.crossing,
                )
            )
            yield from bps.save()
            yield from bps.create("result_c_minus")
            yield from bps.read(_result(scanner, measured))
            yield from bps.save()

        return cast(
            str,
            (
                yield from restore_on_exit(
                    run(), families, snapshot, policy="measurement", owner=plan_name
                )
            ),
        )

    return (yield from plan())


def correct_c_minus(
    tune: TuneMonitor,
    quadrupoles: SettableFamily | Sequence[SettableFamily],
    skew: SettableFamily,
    *,
    knobs: Sequence[str] | None = None,
    iterations: int = 2,
    points: int = DEFAULT_POINTS,
    span: float = DEFAULT_SPAN,
    min_span: float = DEFAULT_MIN_SPAN,
    passes: int = DEFAULT_PASSES,
    max_shift: float = DEFAULT_MAX_SHIFT,
    n_samples: int = DEFAULT_TUNE_SAMPLES,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Minimise the measured ``|C-|`` (tune units) with the two ``C-`` skew knobs.

    ``|C-|`` is measured as :func:`measure_c_minus` does (tune scans with the quadrupole
    knobs; the quadrupoles are put back after every scan). The skew knobs come from the online
    model (worker): minimum-norm patterns of the skew windings that move complex ``C-`` by
    one tune unit along two orthogonal directions (one knob when the skews all act at one
    phase), among the windings at least 10 % of their range from a limit (a coupling
    correction may have left some at a limit). For each knob, ``|C-|`` is measured at knob
    values ``-a`` and ``+a`` (``a`` the
    present ``|C-|``, at least three standard errors and 1e-5); with the present value at 0,
    the parabola ``|C-|^2 = (c_r + k)^2 + c_i^2`` gives the knob value that minimises it,
    which is set and measured. Up to ``iterations`` rounds of both knobs, while ``|C-|``
    falls; if the last round made it larger, the skews of the best measurement are set back
    and measured. Each skew setting is checked against the limits before it is set. A scan
    that does not resolve ``|C-|``, or a knob fit asking for a step larger than ``|C-|``
    allows (inconsistent measurements), fails the plan.

    A correction plan: it changes the skew windings (and, while scanning, the quadrupoles of
    the knobs, which are put back after each scan). It keeps the skews when it succeeds, keeps
    the last completed step on a user stop, and restores the starting setpoints of skews and
    quadrupoles when it fails or is aborted.

    Args:
        tune: the tune monitor (eigen-tunes).
        quadrupoles: the quadrupole family (or families) of the tune knobs.
        skew: the skew winding family it sets (m^-2).
        knobs: quadrupole knobs of the scans; default every knob of quadrupoles.
        iterations: rounds of both skew knobs (>= 1).
        points: scan points per scan (>= 4).
        span: half-width of the first scan, in ``qx - qy`` (tune units).
        min_span: narrowest half-width of a scan (tune units).
        passes: scans at most per measurement.
        max_shift: largest change of either tune in a scan (tune units).
        n_samples: tune readings averaged per point.
        timeout: longest wait for the readings of one point (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events (every scan point), one ``c_minus`` event per
        measurement (``|C-|``, std, crossing, the knob moved and its value, the skew strengths
        in m^-2) and the result ``result_c_minus`` of the final measurement with
        ``c_minus_before``, ``std_before`` and the knob values set (``skew_knob_1``,
        ``skew_knob_2``, tune units; NaN for a knob the skews do not provide).
    """
    plan_name = "correct_c_minus"
    check_tune_monitor(tune, plan_name)
    _check_options(plan_name, points, span, min_span, passes, max_shift)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{plan_name}: iterations must be an integer >= 1, got {iterations!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"{plan_name}: n_samples must be an integer >= 1, got {n_samples!r}")
    families = as_families(quadrupoles)
    description = description_of(skew, *families)
    if any(description.device(n).kind != "skew_quadrupole" for n in skew.names):
        raise ValueError(f"{plan_name}: {skew.name} is not a family of skew windings")
    knob_set = resolve_knobs(description, families, knobs, "quadrupole", plan=plan_name)
    ns = len(skew.names)
    options, _md = _options_and_md(
        plan_name,
        description,
        tune,
        families,
        knob_set,
        md,
        points=points,
        span=span,
        min_span=min_span,
        passes=passes,
        max_shift=max_shift,
        n_samples=n_samples,
        timeout=timeout,
        skew=skew,
        iterations=iterations,
    )
    summary = Record(
        "c_minus",
        {
            "measurement": 0,
            "c_minus": 0.0,
            "std": 0.0,
            "crossing": 0.0,
            "skew_knob": 0,
            "knob_value": 0.0,
            "skews": np.zeros(ns),
        },
        {"skews": "m^-2"},
        source=plan_name,
    )

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, [skew, *families])
        hardware = _hardware(snapshot)
        scanner, center, _ = yield from _prepare(
            plan_name, tune, families, knob_set, hardware, span, options
        )
        (start_skews,) = yield from current_strengths([skew])
        free = _free_skews(description, skew.names, start_skews)
        try:
            skew_set = yield from compute(skew_knobs, description, hardware, list(skew.names), free)
        except ValueError as exc:
            raise ValueError(
                f"{plan_name}: no C- skew knobs ({int((~free).sum())} of {len(free)} skews "
                f"within {LIMIT_MARGIN:.0%} of a limit left out): {exc}"
            ) from None

        def set_skews(values: np.ndarray, now: np.ndarray, why: str) -> MsgGenerator[None]:
            check_knob_targets([skew], [values], plan=plan_name, why=why)
            yield from bps.checkpoint()
            yield from apply_knobs([skew], [values], [now])

        def note(
            index: int, measured: _Measured, knob: int, value: float, skews: np.ndarray
        ) -> MsgGenerator[None]:
            yield from bps.create("c_minus")
            yield from bps.read(
                summary.update(
                    measurement=index,
                    c_minus=measured.c_minus,
                    std=float(measured.fit.std),
                    crossing=measured.fit.crossing,
                    skew_knob=knob,
                    knob_value=value,
                    skews=skews,
                )
            )
            yield from bps.save()

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            count = 0
            first = yield from scanner.measure(count, center, span)
            yield from note(count, first, 0, 0.0, start_skews)
            present, skews = first, start_skews.copy()
            best = (first, skews.copy())
            totals = np.zeros(skew_set.patterns.shape[1])
            for _ in range(iterations):
                round_start = present.c_minus
                for j in range(totals.size):
                    pattern = skew_set.patterns[:, j]
                    # the probe: |C-| or its resolution, never beyond the narrow scans' width
                    a = max(present.c_minus, min(present.resolution, min_span), MIN_KNOB_STEP)
                    width = max(3.0 * (present.c_minus + a), min_span)
                    seen = {0.0: present.c_minus}
                    now = skews
                    for k in (-a, a):
                        target = skews + k * pattern
                        yield from set_skews(target, now, f"skew knob {j + 1} at {k:+.2e}")
                        now = target
                        count += 1
                        measured = yield from scanner.measure(count, present.fit.crossing, width)
                        yield from note(count, measured, j + 1, k, target)
                        seen[k] = measured.c_minus
                    fit = fit_c_minus_knob(np.array(list(seen)), np.array(list(seen.values())))
                    # the knob moves C- by one unit per unit: its best value is at most |C-|
                    # away; a larger one means inconsistent measurements, not a step to take
                    if abs(fit.best) > 1.5 * seen[0.0] + 2.0 * a:
                        raise RuntimeError(
                            f"{plan_name}: skew knob {j + 1}: |C-| {seen[-a]:.3g}, "
                            f"{seen[0.0]:.3g}, {seen[a]:.3g} at knob {-a:+.2e}, 0, {a:+.2e} "
                            f"fit a step of {fit.best:+.2e}, beyond what the knob can need; "
                            "refused (the starting skews are restored)"
                        )
                    target = skews + fit.best * pattern
                    yield from set_skews(target, now, f"skew knob {j + 1} at {fit.best:+.2e}")
                    skews = target
                    totals[j] += fit.best
                    count += 1
                    present = yield from scanner.measure(
                        count, present.fit.crossing, max(3.0 * present.c_minus, min_span)
                    )
                    yield from note(count, present, j + 1, fit.best, skews)
                    if present.c_minus < best[0].c_minus:
                        best = (present, skews.copy())
                if present.c_minus >= round_start:
                    break
            if best[0] is not present:
                yield from set_skews(best[1], skews, "the skews of the best measurement")
                totals = np.linalg.lstsq(skew_set.patterns, best[1] - start_skews, rcond=None)[0]
                count += 1
                present = yield from scanner.measure(
                    count, best[0].fit.crossing, max(3.0 * best[0].c_minus, min_span)
                )
                yield from note(count, present, 0, 0.0, best[1])
            values = np.full(2, np.nan)
            values[: totals.size] = totals
            yield from bps.create("result_c_minus")
            yield from bps.read(
                _result(
                    scanner,
                    present,
                    c_minus_before=first.c_minus,
                    std_before=float(first.fit.std),
                    skew_knob_1=float(values[0]),
                    skew_knob_2=float(values[1]),
                )
            )
            yield from bps.save()

        return cast(
            str,
            (
                yield from restore_on_exit(
                    run(), [skew, *families], snapshot, policy="correction", owner=plan_name
                )
            ),
        )

    return (yield from plan())
