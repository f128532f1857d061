"""``measure_coupling`` and ``correct_coupling``: linear coupling with the skew windings.

The coupling is measured as the off-diagonal blocks of the orbit response matrix (y readings
for horizontal kicks, x readings for vertical kicks) and the vertical dispersion (an RF step of
each sign). The online model's response of these observables to the skew windings (computed in
the worker process, :func:`accplans.model.coupling_response`) gives, by a Tikhonov-regularised
fit (:func:`accplans.physics.fit_coupling`), the skew strength changes that cancel the measured
coupling, with the BPM rolls fitted at the same time. ``|C-|`` is that of the model with the
fitted coupling (the closest tune approach of its one-turn matrix,
:func:`accplans.physics.closest_tune_approach`). With an emittance monitor, the emittances
and their ratio are read; with a tune monitor, the tunes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator, RequestStop

from accplans.config import MachineDescription
from accplans.data import ResultReadable, run_metadata
from accplans.devices import (
    EmittanceMonitor,
    EmittanceReading,
    OrbitSource,
    SettableFamily,
    TuneMonitor,
    call_async,
    resolve_select,
)
from accplans.model import OnlineModel, coupling_response, model_c_minus
from accplans.physics import (
    bpm_roll_columns,
    coupling_observables,
    delta_for_frequency_step,
    fit_coupling,
    frequency_step_for_delta,
)

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frame, read_orbit_frames, set_and_settle, set_family_hardware
from ._worker import compute
from .tunes import read_tunes

__all__ = ["analyse_coupling", "correct_coupling", "measure_coupling"]

#: Weight of the vertical dispersion rows (1/rad): ``w * Dy`` joins the m/rad ORM rows. The
#: vertical emittance follows Dy more than the ORM's coupling blocks: on the EBS twin (seed 1,
#: after an orbit correction) 1000 with ``dp=2e-3, n_samples=4`` takes eps_y/eps_x 2.0 % ->
#: 0.12 %, 100 only to 0.30 %; on the small ring's 8 skews (one phase) 100 finds the skews.
DEFAULT_DISPERSION_WEIGHT = 100.0
#: Momentum step of the Dy measurement and frames per setting (Dy's noise, ~1 mm with 1 um BPM
#: noise, falls as 1 / (dp sqrt(n)): raise both with the dispersion weight).
DEFAULT_DP = 5e-4
DEFAULT_SAMPLES = 2
#: Tikhonov parameter of the fit, relative to the largest singular value.
DEFAULT_ALPHA = 1e-2


@dataclass(frozen=True)
class CouplingAnalysis:
    """What :func:`analyse_coupling` finds (a worker job's answer)."""

    skew_strengths: np.ndarray
    skew_change: np.ndarray
    bpm_roll: np.ndarray
    coupling_rms: float
    residual_rms: float
    c_minus_model: float
    at_limit: np.ndarray


def analyse_coupling(
    description: MachineDescription,
    hardware: dict[str, float],
    rf_frequency_hz: float,
    bpm_names: Sequence[str],
    corrector_names: Sequence[str],
    skew_names: Sequence[str],
    matrix: np.ndarray,
    dy: np.ndarray,
    *,
    dispersion_weight: float = DEFAULT_DISPERSION_WEIGHT,
    alpha_rel: float = DEFAULT_ALPHA,
    fit_rolls: bool = True,
) -> CouplingAnalysis:
    """Fit the skew strength changes that cancel a measured coupling (a worker job).

    The online model at ``hardware`` (A) and the RF frequency (Hz) gives the ORM, the
    dispersion and their coupling response to the skews; :func:`fit_coupling` finds the
    changes (within the skews' limits) and the BPM rolls. ``|C-|`` is the model's with every
    skew at ``-skew_change`` (the coupling found, as skew strengths).

    Args:
        description: the machine.
        hardware: hardware setpoints of the magnets (A) (the model's settings).
        rf_frequency_hz: RF frequency (Hz).
        bpm_names: BPMs (rows).
        corrector_names: correctors (columns of ``matrix``).
        skew_names: skew windings (fit parameters).
        matrix: (2 nbpm, ncorr) measured ORM [m/rad] (only its coupling blocks are used).
        dy: (nbpm,) measured vertical dispersion [m].
        dispersion_weight: weight of the dispersion rows [1/rad].
        alpha_rel: relative Tikhonov parameter.
        fit_rolls: also fit BPM rolls.
    """
    model = OnlineModel(description)
    model.set_hardware(hardware)
    model.rf_frequency = float(rf_frequency_hz)
    resp = coupling_response(model, bpm_names, corrector_names, skew_names)
    planes = resp.planes
    observed = coupling_observables(matrix, planes, dy, dispersion_weight=dispersion_weight)
    response = resp.orm_response
    if dispersion_weight > 0:
        response = np.vstack([response, dispersion_weight * resp.dy_response])
    rolls = None
    if fit_rolls:
        rolls = bpm_roll_columns(resp.orm, planes, resp.dx, dispersion_weight=dispersion_weight)
    strengths = np.array([model.nominal_strength(n) for n in skew_names])
    lows, highs = [], []
    for n in skew_names:
        spec = description.device(n)
        assert spec.calibration is not None and spec.limits is not None
        ends = [float(spec.calibration.to_strength(v)) for v in spec.limits]
        lows.append(min(ends))
        highs.append(max(ends))
    # margin of 1e-9 of the range: the setpoints must stay inside the limits
    span = np.array(highs) - np.array(lows)
    fit = fit_coupling(
        observed,
        response,
        roll_columns=rolls,
        alpha_rel=alpha_rel,
        lower=np.array(lows) + 1e-9 * span - strengths,
        upper=np.array(highs) - 1e-9 * span - strengths,
    )
    # the machine's coupling as skew strengths: every skew at -change (module docstring)
    found = {}
    for n, value in zip(skew_names, -fit.skew_change, strict=True):
        cal = description.device(n).calibration
        assert cal is not None
        found[n] = float(cal.to_hardware(value))
    model.set_hardware(found)
    c_minus = model_c_minus(model)
    nobs_orm = resp.orm_response.shape[0]
    return CouplingAnalysis(
        skew_strengths=strengths,
        skew_change=fit.skew_change,
        bpm_roll=fit.bpm_roll_rad if fit_rolls else np.zeros(len(bpm_names)),
        coupling_rms=float(np.sqrt(np.mean(observed[:nobs_orm] ** 2))),
        residual_rms=float(np.sqrt(np.mean(fit.residual[:nobs_orm] ** 2))),
        c_minus_model=c_minus,
        at_limit=fit.at_limit,
    )


@dataclass
class _Measurement:
    matrix: np.ndarray
    dy: np.ndarray
    emittance: EmittanceReading | None
    tunes: np.ndarray | None


class _Setup:
    """What both plans share: devices, names, columns and the checked targets."""

    def __init__(
        self,
        plan: str,
        bpms: OrbitSource,
        correctors: SettableFamily | Sequence[SettableFamily],
        rf: SettableFamily,
        skew: SettableFamily,
        select: Any,
        kick: float,
        dp: float,
    ) -> None:
        self.families = [correctors] if isinstance(correctors, SettableFamily) else list(correctors)
        if not self.families:
            raise ValueError(f"{plan}: give the corrector families (e.g. [hcorr, vcorr])")
        if not np.isfinite(kick) or kick <= 0:
            raise ValueError(f"{plan}: kick must be a positive number of rad, got {kick!r}")
        if not np.isfinite(dp) or not 0 < dp <= 0.01:
            raise ValueError(f"{plan}: dp must be in (0, 0.01], got {dp!r}")
        if len(rf.names) != 1:
            raise ValueError(f"{plan}: {rf.name} must have one member (the RF frequency)")
        self.description = description_of(bpms, rf, skew, *self.families)
        d = self.description
        if any(d.device(n).kind != "skew_quadrupole" for n in skew.names):
            raise ValueError(f"{plan}: {skew.name} is not a family of skew windings")
        self.bpms, self.rf, self.skew = bpms, rf, skew
        self.all_names = [n for fam in self.families for n in fam.names]
        self.owner = [(f, m) for f, fam in enumerate(self.families) for m in range(len(fam.names))]
        self.columns = resolve_select(select, self.all_names, owner="correctors")
        self.col_names = [self.all_names[j] for j in self.columns]
        planes = {d.device(n).plane or "" for n in self.col_names}
        if planes != {"h", "v"}:
            raise ValueError(f"{plan}: select correctors of both planes (got {sorted(planes)})")
        self.bpm_names = list(bpms.names)
        self.kick, self.dp = float(kick), float(dp)

    def targets(self, start: dict[str, np.ndarray]) -> dict[int, tuple[float, float]]:
        """Hardware targets +-kick of every selected corrector, checked against the limits."""
        d = self.description
        out: dict[int, tuple[float, float]] = {}
        for j in self.columns:
            f, m = self.owner[j]
            fam = self.families[f]
            cal = d.device(fam.names[m]).calibration
            assert cal is not None
            s0 = float(cal.to_strength(start[fam.name][m]))
            out[int(j)] = (
                float(cal.to_hardware(s0 + self.kick)),
                float(cal.to_hardware(s0 - self.kick)),
            )
        check_hardware_limits(
            d,
            [self.all_names[j] for j in self.columns for _ in (0, 1)],
            np.array([t for j in self.columns for t in out[int(j)]]),
        )
        return out

    def rf_steps(self, f0: float, alpha_c: float) -> np.ndarray:
        """The two RF steps (Hz) of the dispersion, checked against the limits."""
        low, high = self.rf.limits()
        room = min(float(high[0]) - f0, f0 - float(low[0]))
        dp = min(self.dp, 0.9 * room / (f0 * abs(alpha_c)))  # within the RF limits
        steps = frequency_step_for_delta(np.array([dp, -dp]), f0, alpha_c)
        check_hardware_limits(self.description, list(self.rf.names) * 2, f0 + steps)
        return np.asarray(steps, dtype=float)


def _alpha_c(description: MachineDescription, rf_frequency_hz: float) -> float:
    model = OnlineModel(description)
    model.rf_frequency = float(rf_frequency_hz)
    return float(model.alpha_c)


def _measure(
    setup: _Setup,
    start: dict[str, np.ndarray],
    targets: dict[int, tuple[float, float]],
    steps_hz: np.ndarray,
    alpha_c: float,
    records: dict[str, Record],
    *,
    n_samples: int,
    emittance: EmittanceMonitor | None,
    tune: TuneMonitor | None,
    timeout: float,
) -> MsgGenerator[_Measurement]:
    """Kick every selected corrector +-kick, step the RF +-; read; put everything back."""
    bpms = setup.bpms
    nb = len(setup.bpm_names)
    current = {name: values.copy() for name, values in start.items()}

    def orbit_after(after: float) -> MsgGenerator[np.ndarray]:
        samples = []
        frames = yield from read_orbit_frames(bpms, after=after, n=n_samples, timeout=timeout)
        for frame in frames:
            ok = np.asarray(frame.valid, bool)
            samples.append(np.where(np.concatenate([ok, ok]), np.r_[frame.x, frame.y], np.nan))
        return np.mean(samples, axis=0)

    def record(
        column: int, name: str, kick: float, rf_step: float, orbit: np.ndarray
    ) -> MsgGenerator[None]:
        yield from bps.create("primary")
        yield from bps.read(
            records["step"].update(column=column, device=name, kick=kick, rf_step=rf_step)
        )
        yield from bps.read(records["orbit"].update(x=orbit[:nb], y=orbit[nb:]))
        yield from bps.save()

    matrix = np.full((2 * nb, setup.columns.size), np.nan)
    for c, j in enumerate(setup.columns):
        f, m = setup.owner[int(j)]
        fam = setup.families[f]
        spec = setup.description.device(fam.names[m])
        assert spec.calibration is not None
        orbits, kicks = [], []
        for sign, target in zip((1, -1), targets[int(j)], strict=True):
            yield from bps.checkpoint()
            values = current[fam.name].copy()
            values[m] = target
            readbacks, settled = yield from set_and_settle(fam, values)
            current[fam.name] = values
            orbit = yield from orbit_after(settled)
            kick = float(spec.calibration.to_strength(readbacks[m])) - float(
                spec.calibration.to_strength(start[fam.name][m])
            )
            orbits.append(orbit)
            kicks.append(kick)
            yield from record(c, fam.names[m], sign * setup.kick, 0.0, orbit)
        matrix[:, c] = (orbits[0] - orbits[1]) / (kicks[0] - kicks[1])
        current[fam.name][m] = start[fam.name][m]
        nxt = setup.columns[c + 1] if c + 1 < setup.columns.size else None
        if nxt is None or setup.owner[int(nxt)][0] != f:
            yield from set_family_hardware(fam, current[fam.name])
    rf = setup.rf
    f0 = float(start[rf.name][0])
    orbits, dps = [], []
    settled = time.time()
    for step in steps_hz:
        yield from bps.checkpoint()
        readback, settled = yield from set_and_settle(rf, np.array([f0 + step]))
        orbit = yield from orbit_after(settled)
        seen = float(readback[0] - f0)
        orbits.append(orbit)
        dps.append(float(delta_for_frequency_step(seen, f0, alpha_c)))
        yield from record(-1, rf.names[0], 0.0, seen, orbit)
    _, settled = yield from set_and_settle(rf, np.array([f0]))
    dy = (orbits[0][nb:] - orbits[1][nb:]) / (dps[0] - dps[1])
    reading = None
    if emittance is not None:
        reading = yield from call_async(
            emittance.wait_for_reading, after=settled, timeout=max(timeout, 60.0)
        )
    tunes = None
    if tune is not None:
        avg = yield from read_tunes(tune, after=settled, timeout=timeout)
        tunes = np.asarray(avg.tunes, dtype=float)
    return _Measurement(matrix=matrix, dy=dy, emittance=reading, tunes=tunes)


def _records(setup: _Setup) -> dict[str, Record]:
    nb = len(setup.bpm_names)
    return {
        "step": Record(
            "step",
            {"column": 0, "device": "", "kick": 0.0, "rf_step": 0.0},
            {"kick": "rad", "rf_step": "Hz"},
            source=setup.bpms.name,
        ),
        "orbit": Record(
            "orbit", {"x": np.zeros(nb), "y": np.zeros(nb)}, {"x": "m", "y": "m"}, source="bpms"
        ),
    }


def _hardware(snapshot: Any) -> dict[str, float]:
    return {n: v for values in snapshot.setpoints.values() for n, v in values.items()}


def _result(
    setup: _Setup,
    analysis: CouplingAnalysis,
    measured: _Measurement,
    dispersion_weight: float,
) -> ResultReadable:
    extra: dict[str, Any] = {}
    if measured.emittance is not None:
        extra["emittance_x"] = float(measured.emittance.emittance[0])
        extra["emittance_y"] = float(measured.emittance.emittance[1])
        extra["emittance_ratio"] = float(
            measured.emittance.emittance[1] / measured.emittance.emittance[0]
        )
    if measured.tunes is not None:
        extra["tune_x"] = float(measured.tunes[0])
        extra["tune_y"] = float(measured.tunes[1])
    return ResultReadable(
        "coupling",
        skew_names=list(setup.skew.names),
        skew_strengths=analysis.skew_strengths,
        skew_change=analysis.skew_change,
        bpm_names=setup.bpm_names,
        bpm_roll=analysis.bpm_roll,
        dy=measured.dy,
        corrector_names=setup.col_names,
        coupling_rms=analysis.coupling_rms,
        residual_rms=analysis.residual_rms,
        c_minus_model=analysis.c_minus_model,
        dispersion_weight=float(dispersion_weight),
        **extra,
    )


def _units() -> dict[str, str]:
    return {
        "step-kick": "rad",
        "step-rf_step": "Hz",
        "orbit-x": "m",
        "orbit-y": "m",
        "skews-strengths": "m^-2",
        "coupling-emittance_x": "m",
        "coupling-emittance_y": "m",
    }


def measure_coupling(
    bpms: OrbitSource,
    correctors: SettableFamily | Sequence[SettableFamily],
    rf: SettableFamily,
    skew: SettableFamily,
    *,
    emittance: EmittanceMonitor | None = None,
    tune: TuneMonitor | None = None,
    select: Any = None,
    kick: float = 40e-6,
    dp: float = DEFAULT_DP,
    n_samples: int = DEFAULT_SAMPLES,
    dispersion_weight: float = DEFAULT_DISPERSION_WEIGHT,
    alpha_rel: float = DEFAULT_ALPHA,
    fit_rolls: bool = True,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the linear coupling: off-diagonal ORM blocks, vertical dispersion, |C-|.

    Each selected corrector is kicked by +-``kick`` (the orbit after each setting averaged
    over ``n_samples`` fresh frames); the RF frequency is stepped to the momentum offsets
    ``+-dp`` for the vertical dispersion. In the worker, the online model's response of the
    coupling observables (y rows of horizontal kicks, x rows of vertical kicks, ``w * Dy``)
    to the skew windings gives the skew strength changes that cancel the coupling (Tikhonov,
    ``alpha_rel`` of the largest singular value) and, with ``fit_rolls``, the BPM rolls.
    ``|C-|`` is the closest tune approach of the model with that coupling. The emittance
    monitor (if given) and the tune monitor (if given) are read at the end.

    A measurement plan: it changes the selected correctors and the RF frequency, checks
    every target against the limits before the first move, and restores them however it
    ends. The skew windings are read, not moved.

    Args:
        bpms: the BPM family (an orbit source).
        correctors: the corrector families (both planes, e.g. ``[hcorr, vcorr]``).
        rf: the RF device (frequency in Hz).
        skew: the skew winding family (the fit's parameters, m^-2).
        emittance: the emittance monitor, to record the emittances (m rad) and their ratio.
        tune: the tune monitor, to record the tunes.
        select: correctors to kick (names, indices or a mask over the families' members in
            order); all by default (on EBS, a subset of 32 per plane is enough).
        kick: kick amplitude (rad).
        dp: momentum offset of each RF step (or the largest the RF limits allow, with a
            10 % margin, when smaller).
        n_samples: orbit frames averaged per setting.
        dispersion_weight: weight of the vertical dispersion rows (1/rad).
        alpha_rel: Tikhonov parameter relative to the largest singular value.
        fit_rolls: fit the BPM rolls together with the skews.
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events (one per kick or RF step: the step and the
        orbit in m) and the result ``result_coupling`` (``load_result(client, uid,
        "coupling")``: skew strengths and the changes that cancel the coupling (m^-2), BPM
        rolls (rad), Dy (m), rms of the coupling blocks and of the fit's residual (m/rad),
        ``c_minus_model``, the emittances and tunes when monitored).
    """
    setup = _Setup("measure_coupling", bpms, correctors, rf, skew, select, kick, dp)
    if n_samples < 1:
        raise ValueError(f"measure_coupling: n_samples must be >= 1, got {n_samples}")
    d = setup.description
    moved = [*setup.families, rf]
    _md = run_metadata(
        d,
        plan_name="measure_coupling",
        plan_args={
            "bpms": bpms.name,
            "correctors": [f.name for f in setup.families],
            "rf": rf.name,
            "skew": skew.name,
            "emittance": getattr(emittance, "name", None),
            "tune": getattr(tune, "name", None),
            "select": repr(select),
            "kick": kick,
            "dp": dp,
            "n_samples": n_samples,
            "dispersion_weight": dispersion_weight,
            "alpha_rel": alpha_rel,
            "fit_rolls": fit_rolls,
        },
        units=_units(),
        num_points=2 * setup.columns.size + 2,
        corrector_names=setup.col_names,
        bpm_names=setup.bpm_names,
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(d, moved)
        skews = yield from take_snapshot(d, [skew])  # read for the model, never moved
        start = {f.name: np.array([snapshot.setpoints[f.name][n] for n in f.names]) for f in moved}
        targets = setup.targets(start)
        f0 = float(start[rf.name][0])
        alpha_c = yield from compute(_alpha_c, d, f0)
        steps = setup.rf_steps(f0, alpha_c)
        records = _records(setup)

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            measured = yield from _measure(
                setup,
                start,
                targets,
                steps,
                alpha_c,
                records,
                n_samples=n_samples,
                emittance=emittance,
                tune=tune,
                timeout=timeout,
            )
            analysis = yield from compute(
                _analyse,
                d,
                {**_hardware(snapshot), **_hardware(skews)},
                f0,
                (setup.bpm_names, setup.col_names, list(skew.names)),
                (measured.matrix, measured.dy),
                (dispersion_weight, alpha_rel, fit_rolls),
            )
            yield from bps.create("result_coupling")
            yield from bps.read(_result(setup, analysis, measured, dispersion_weight))
            yield from bps.save()

        return cast(
            str,
            (
                yield from restore_on_exit(
                    run(), moved, snapshot, policy="measurement", owner="measure_coupling"
                )
            ),
        )

    return (yield from plan())


def _analyse(
    description: MachineDescription,
    hardware: dict[str, float],
    f0: float,
    names: tuple[list[str], list[str], list[str]],
    measured: tuple[np.ndarray, np.ndarray],
    options: tuple[float, float, bool],
) -> CouplingAnalysis:
    """Worker entry: :func:`analyse_coupling` on a measurement (picklable arguments)."""
    matrix, dy = measured
    weight, alpha_rel, fit_rolls = options
    return analyse_coupling(
        description,
        hardware,
        f0,
        *names,
        matrix,
        dy,
        dispersion_weight=weight,
        alpha_rel=alpha_rel,
        fit_rolls=fit_rolls,
    )


def correct_coupling(
    bpms: OrbitSource,
    correctors: SettableFamily | Sequence[SettableFamily],
    rf: SettableFamily,
    skew: SettableFamily,
    *,
    emittance: EmittanceMonitor | None = None,
    tune: TuneMonitor | None = None,
    iterations: int = 3,
    gain: float = 1.0,
    select: Any = None,
    kick: float = 40e-6,
    dp: float = DEFAULT_DP,
    n_samples: int = DEFAULT_SAMPLES,
    dispersion_weight: float = DEFAULT_DISPERSION_WEIGHT,
    alpha_rel: float = DEFAULT_ALPHA,
    fit_rolls: bool = True,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Correct the linear coupling with the skew windings, iteratively.

    Each iteration measures the coupling as :func:`measure_coupling` does (bipolar kicks of
    the selected correctors, two RF steps; correctors and RF frequency put back), fits in the
    worker the skew strength changes that cancel it (on the online model's response at the
    present setpoints, within the skews' limits) and applies ``gain`` times them; a last
    measurement follows the last change. Every change is checked against the limits before it
    is set.

    A correction plan: it changes the skew windings (and, while measuring, the correctors and
    the RF frequency, which are always put back). It keeps the skews when it succeeds, keeps
    the last completed step on a user stop, and restores the starting setpoints when it fails
    or is aborted.

    Args:
        bpms: the BPM family (an orbit source).
        correctors: the corrector families (both planes).
        rf: the RF device (frequency in Hz).
        skew: the skew winding family it sets (m^-2).
        emittance: the emittance monitor (emittances recorded at each measurement).
        tune: the tune monitor (tunes recorded at each measurement).
        iterations: corrections applied (each followed by a measurement).
        gain: fraction of each computed change applied (0 < gain <= 1).
        select: correctors kicked by each measurement (names, indices or a mask); all by
            default.
        kick: kick amplitude of the measurement (rad).
        dp: momentum offset of the RF steps.
        n_samples: orbit frames averaged per setting.
        dispersion_weight: weight of the vertical dispersion rows (1/rad).
        alpha_rel: Tikhonov parameter relative to the largest singular value.
        fit_rolls: fit the BPM rolls with the skews.
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events (each kick, RF step and skew setting), one
        ``coupling`` event per measurement (iteration, rms of the coupling blocks, ``|C-|`` of
        the fitted model, emittances) and the result ``result_coupling`` of the last one.
    """
    setup = _Setup("correct_coupling", bpms, correctors, rf, skew, select, kick, dp)
    if iterations < 1 or n_samples < 1:
        raise ValueError("correct_coupling: iterations and n_samples must be >= 1")
    if not 0 < gain <= 1:
        raise ValueError(f"correct_coupling: gain must be in (0, 1], got {gain!r}")
    d = setup.description
    measured_families = [*setup.families, rf]
    moved = [skew, *measured_families]
    ns = len(skew.names)
    _md = run_metadata(
        d,
        plan_name="correct_coupling",
        plan_args={
            "bpms": bpms.name,
            "correctors": [f.name for f in setup.families],
            "rf": rf.name,
            "skew": skew.name,
            "emittance": getattr(emittance, "name", None),
            "tune": getattr(tune, "name", None),
            "iterations": iterations,
            "gain": gain,
            "select": repr(select),
            "kick": kick,
            "dp": dp,
            "n_samples": n_samples,
            "dispersion_weight": dispersion_weight,
            "alpha_rel": alpha_rel,
            "fit_rolls": fit_rolls,
        },
        units=_units(),
        corrector_names=setup.col_names,
        bpm_names=setup.bpm_names,
        skew_names=list(skew.names),
    )
    _md.update(md or {})
    summary = Record(
        "coupling",
        {
            "iteration": 0,
            "coupling_rms": 0.0,
            "c_minus_model": 0.0,
            "emittance_x": 0.0,
            "emittance_y": 0.0,
        },
        {"coupling_rms": "m/rad", "emittance_x": "m", "emittance_y": "m"},
        source="correct_coupling",
    )
    skew_record = Record("skews", {"strengths": np.zeros(ns)}, {"strengths": "m^-2"})

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(d, moved)
        start = {
            f.name: np.array([snapshot.setpoints[f.name][n] for n in f.names])
            for f in measured_families
        }
        targets = setup.targets(start)
        f0 = float(start[rf.name][0])
        alpha_c = yield from compute(_alpha_c, d, f0)
        steps = setup.rf_steps(f0, alpha_c)
        records = _records(setup)
        hardware = _hardware(snapshot)

        def measure_and_fit(k: int) -> MsgGenerator[tuple[CouplingAnalysis, _Measurement]]:
            def put_back(exc: Exception) -> MsgGenerator[None]:
                # a user stop keeps the skews of the last step: put the kicked corrector and
                # the RF back (any other ending restores everything, below)
                if isinstance(exc, RequestStop):
                    for fam in measured_families:
                        yield from set_family_hardware(fam, start[fam.name])

            measured = yield from bpp.contingency_wrapper(
                _measure(
                    setup,
                    start,
                    targets,
                    steps,
                    alpha_c,
                    records,
                    n_samples=n_samples,
                    emittance=emittance,
                    tune=tune,
                    timeout=timeout,
                ),
                except_plan=put_back,
            )
            analysis = yield from compute(
                _analyse,
                d,
                hardware,
                f0,
                (setup.bpm_names, setup.col_names, list(skew.names)),
                (measured.matrix, measured.dy),
                (dispersion_weight, alpha_rel, fit_rolls),
            )
            em = measured.emittance.emittance if measured.emittance is not None else [np.nan] * 2
            yield from bps.create("coupling")
            yield from bps.read(
                summary.update(
                    iteration=k,
                    coupling_rms=analysis.coupling_rms,
                    c_minus_model=analysis.c_minus_model,
                    emittance_x=float(em[0]),
                    emittance_y=float(em[1]),
                )
            )
            yield from bps.save()
            return analysis, measured

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            analysis, measured = yield from measure_and_fit(0)
            for k in range(iterations):
                now = analysis.skew_strengths
                new = now + gain * analysis.skew_change
                try:
                    skew.check_strengths(new)
                except ValueError as exc:
                    raise ValueError(
                        f"correct_coupling: step {k + 1} leaves the skew limits, refused "
                        f"before the move: {exc}"
                    ) from None
                yield from bps.checkpoint()
                readbacks, settled = yield from set_and_settle(skew, new, hardware=False)
                hardware.update(dict(zip(skew.names, map(float, readbacks), strict=True)))
                frame = yield from read_orbit_frame(bpms, after=settled, timeout=timeout)
                yield from bps.create("primary")
                yield from bps.read(
                    records["step"].update(column=-2, device=skew.name, kick=0.0, rf_step=0.0)
                )
                yield from bps.read(records["orbit"].update(x=frame.x, y=frame.y))
                yield from bps.save()
                yield from bps.create("skews")
                yield from bps.read(skew_record.update(strengths=new))
                yield from bps.save()
                analysis, measured = yield from measure_and_fit(k + 1)
            yield from bps.create("result_coupling")
            yield from bps.read(_result(setup, analysis, measured, dispersion_weight))
            yield from bps.save()

        return cast(
            str,
            (
                yield from restore_on_exit(
                    run(), moved, snapshot, policy="correction", owner="correct_coupling"
                )
            ),
        )

    return (yield from plan())
