"""``measure_adts`` and ``correct_nonlinear``: amplitude-dependent tune shift from pinger shots.

``measure_adts`` kicks the beam with the pinger at several amplitudes per plane and fits the
four detuning coefficients from the tunes (NAFF) and actions of the shots
(:mod:`accplans.physics._nonlinear`). ``correct_nonlinear`` moves sextupole knobs to cut the
model's detuning in the null space of the model's chromaticity (and tune) response, and
verifies the cut with the same shots before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import Msg, MsgGenerator

from accplans.config import MachineDescription
from accplans.data import (
    FieldSpec,
    ResultReadable,
    ResultSchema,
    record_result,
    register_result_kind,
    run_metadata,
)
from accplans.devices import Pinger, SettableFamily, TbtBuffers, TuneMonitor, call_async
from accplans.model import OnlineModel
from accplans.physics import (
    AdtsFit,
    constrained_step,
    find_bad_bpms,
    fit_adts,
    kick_actions,
    line_tune,
    tbt_actions,
)

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._worker import compute
from .chromaticity import correct_chromaticity, measure_chromaticity
from .tbt import fire_shot
from .tunes import (
    KnobSet,
    apply_knobs,
    as_families,
    check_knob_targets,
    check_tune_monitor,
    correct_tunes,
    current_strengths,
    read_tunes,
    resolve_knobs,
)

__all__ = ["ADTS_TERMS", "correct_nonlinear", "measure_adts", "model_adts"]

#: The distinct detuning coefficients (the cross term once).
_DISTINCT = ("dqx_djx", "dqx_djy", "dqy_djy")
#: Names of the detuning coefficients an objective can use, and their place in pyAT's layout
#: ``[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]]`` (row: action, column: tune).
ADTS_TERMS: dict[str, tuple[int, int]] = {
    "dqx_djx": (0, 0),
    "dqy_djx": (0, 1),
    "dqx_djy": (1, 0),
    "dqy_djy": (1, 1),
}
#: Action methods of ``measure_adts``.
ACTIONS = ("tbt", "kick")
#: The issue's bound on the tune shift of any shot.
MAX_TUNE_SHIFT = 0.01
#: Relative knob step of the detuning Jacobian (a 1e-2 change of the sextupoles changes the
#: detuning by ~2 %, well above pyAT's tracking precision at 30 um).
_JACOBIAN_STEP = 1e-2
#: The model's objective must drop below this fraction of its start, or nothing moves.
_MIN_MODEL_CUT = 0.95
#: Largest knob step of one Gauss-Newton step, relative to the knob's present strength.
_MAX_STEP = 0.3
#: Tune shift of the tracking amplitude of the model's detuning in ``solve_nonlinear``.
_TRACK_SHIFT = 2e-5

register_result_kind(
    ResultSchema(
        kind="adts",
        version=1,
        description=(
            "Amplitude-dependent tune shift from pinger shots: the fitted detuning "
            "[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]] (1/m) with standard errors, the tunes at "
            "zero amplitude, per shot the kicks, actions and tunes; the model's detuning and "
            "beta at the pinger."
        ),
        fields={
            "detuning": FieldSpec("1/m", "(2, 2)"),
            "std_detuning": FieldSpec("1/m", "(2, 2)"),
            "tunes0": FieldSpec("", "(2,)"),
            "std_tunes0": FieldSpec("", "(2,)"),
            "second_order": FieldSpec("1/m^2", "(2, 3)"),
            "residual_rms": FieldSpec("", "(2,)"),
            "order": FieldSpec("", "()", "int"),
            "action_method": FieldSpec("", "()", "str", choices=ACTIONS),
            "kicks": FieldSpec("rad", "(nshot, 2)"),
            "actions": FieldSpec("m", "(nshot, 2)"),
            "actions_kick": FieldSpec("m", "(nshot, 2)"),
            "tunes": FieldSpec("", "(nshot, 2)"),
            "max_tune_shift": FieldSpec("", "()"),
            "model_detuning": FieldSpec("1/m", "(2, 2)"),
            "model_tunes": FieldSpec("", "(2,)"),
            "beta_pinger": FieldSpec("m", "(2,)"),
            "turns": FieldSpec("", "()", "int"),
            "bad_bpms": FieldSpec("", "(nbpm,)", "bool"),
        },
    )
)

register_result_kind(
    ResultSchema(
        kind="nonlinear",
        version=1,
        description=(
            "A non-linear correction: the knobs and their steps, the objective terms, the "
            "model's detuning before and after (1/m), the model's predicted changes of "
            "chromaticity and tunes, and the measured detuning before and after with its "
            "standard errors (NaN without verification); with the trims, the measured tunes "
            "and chromaticity at the start and the end and the uids of the sub-runs "
            "(space-separated)."
        ),
        fields={
            "knobs": FieldSpec("", "(nknob,)", "str"),
            "knob_steps": FieldSpec("", "(nknob,)"),
            "terms": FieldSpec("", "(nterm,)", "str"),
            "model_before": FieldSpec("1/m", "(2, 2)"),
            "model_after": FieldSpec("1/m", "(2, 2)"),
            "model_objective_before": FieldSpec("1/m", "()"),
            "model_objective_after": FieldSpec("1/m", "()"),
            "chromaticity_change": FieldSpec("", "(2,)"),
            "tune_change": FieldSpec("", "(2,)"),
            "measured_before": FieldSpec("1/m", "(2, 2)"),
            "measured_after": FieldSpec("1/m", "(2, 2)"),
            "std_measured_before": FieldSpec("1/m", "(2, 2)"),
            "std_measured_after": FieldSpec("1/m", "(2, 2)"),
            "measured_objective_before": FieldSpec("1/m", "()"),
            "measured_objective_after": FieldSpec("1/m", "()"),
            "tunes_start": FieldSpec("", "(2,)", optional=True),
            "tunes_end": FieldSpec("", "(2,)", optional=True),
            "chromaticity_start": FieldSpec("", "(2,)", optional=True),
            "chromaticity_end": FieldSpec("", "(2,)", optional=True),
            "sub_runs": FieldSpec("", "()", "str"),
        },
    )
)


# -- model (worker jobs) ------------------------------------------------------------------------
def _detuning(ring: Any, dp: float, amplitude: float) -> np.ndarray:
    """The detuning (1/m) of a lattice by pyAT, the cross term symmetrised.

    ``dQx/dJy = dQy/dJx`` in theory; pyAT fits it twice (x scan, y scan) and one of the fits
    can catch the other plane's line (a nonsense value): keep the smaller.
    """
    import at

    _, q1, *_ = at.physics.detuning(ring, xm=amplitude, ym=amplitude, npoints=3, nturns=256, dp=dp)
    q1 = np.asarray(q1, dtype=float)
    off = q1[0, 1] if abs(q1[0, 1]) <= abs(q1[1, 0]) else q1[1, 0]
    q1[0, 1] = q1[1, 0] = off
    return q1


def _model_at(description: MachineDescription, hardware: dict[str, float] | None) -> OnlineModel:
    model = OnlineModel(description)
    if hardware:
        model.set_hardware(hardware)
    return model


def model_adts(
    description: MachineDescription,
    hardware: dict[str, float] | None,
    bpm_names: list[str],
    amplitude: float = 3e-5,
) -> dict[str, np.ndarray]:
    """The online model's ADTS reference at the given setpoints (a worker job).

    Returns ``beta_pinger`` (2,) (m, at the ring start, where the pinger kicks), ``beta_bpm``
    (2, n) (m), ``tunes`` (2,) fractional, ``detuning`` (2, 2) (1/m, pyAT's tracking over
    ``amplitude`` (m) at the model's momentum offset, cross term symmetrised).
    """
    model = _model_at(description, hardware)
    refs = [0, *(description.device(n).elements[0] for n in bpm_names)]
    optics = model.optics(refs)
    beta = np.asarray(optics.beta, dtype=float)
    dp = float(optics.closed_orbit[0, 4])
    return {
        "beta_pinger": beta[0].copy(),
        "beta_bpm": beta[1:].T.copy(),
        "tunes": np.mod(model.tunes(), 1.0),
        "detuning": _detuning(model.lattice, dp, amplitude),
    }


def _coefficients(description: MachineDescription, knob: str) -> dict[str, float]:
    """A knob's magnets and coefficients (a magnet's own name: itself, coefficient 1)."""
    if knob in description.knobs:
        return {n: float(c) for n, c in description.knobs[knob].coefficients.items()}
    return {knob: 1.0}


def _resolve(
    description: MachineDescription,
    families: Sequence[SettableFamily],
    knobs: Sequence[str] | None,
    plan: str,
) -> KnobSet:
    """Knobs of the description, or sextupoles of ``families`` by name (one knob each)."""
    if knobs is None or isinstance(knobs, str) or all(k in description.knobs for k in knobs):
        return resolve_knobs(description, families, knobs, "sextupole", plan=plan)
    names = list(knobs)
    where = {n: (f, i) for f, fam in enumerate(families) for i, n in enumerate(fam.names)}
    unknown = [k for k in names if k not in description.knobs and k not in where]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"{plan}: knobs must be distinct knob names of the description or magnets of "
            f"{[f.name for f in families]}; unknown: {unknown}"
        )
    matrix = [np.zeros((len(fam.names), len(names))) for fam in families]
    units = []
    for j, k in enumerate(names):
        for n, c in _coefficients(description, k).items():
            if n not in where:
                raise ValueError(f"{plan}: knob {k!r} moves {n}, not in the families given")
            f, i = where[n]
            matrix[f][i, j] += c
        units.append(description.knobs[k].unit if k in description.knobs else "SI strength")
    return KnobSet(tuple(names), tuple(units), tuple(matrix))


def _objective(q1: np.ndarray, terms: Sequence[str]) -> np.ndarray:
    return np.array([q1[ADTS_TERMS[t]] for t in terms])


def solve_nonlinear(
    description: MachineDescription,
    hardware: dict[str, float],
    knobs: Sequence[str],
    terms: Sequence[str],
    ratio: float,
    iterations: int,
    regularization: float,
    hold_tunes: bool,
    max_step: float = 0.3,
    hold: Sequence[str] = (),
    hold_weight: float = 1.0,
) -> dict[str, Any]:
    """Knob steps that cut the model's detuning terms to ``ratio`` of their norm (a worker job).

    Gauss-Newton in the null space of the chromaticity response (rows / 0.1) and, with
    ``hold_tunes``, the tune response (rows / 1e-3) of the knobs; the detuning Jacobian by
    one-sided differences of pyAT's tracked detuning. The ``hold`` terms join the least
    squares with their starting values as target and weight ``hold_weight`` (they may move,
    but every step pays for moving them). Each step is limited to ``max_step`` of each knob's
    present strength and halved until the cost (objective and weighted held terms) decreases
    (a trust region: sextupoles change the detuning quadratically). Stops when the norm of the
    terms is below ``ratio`` of its start, or when no step improves the cost.
    """
    model = _model_at(description, hardware)
    knob_list = list(knobs)
    held = [t for t in hold if t not in terms]
    xi0, q0 = model.chromaticity(), model.tunes()
    coefficients = [_coefficients(description, k) for k in knob_list]
    names = sorted({n for c in coefficients for n in c})
    nominal = {n: model.nominal_strength(n) for n in names}
    total = np.zeros(len(knob_list))
    # a knob's scale: the largest present strength it moves, per knob unit
    scale = np.array(
        [
            max((abs(nominal[n] / v) for n, v in c.items() if v), default=1.0) or 1.0
            for c in coefficients
        ]
    )

    def apply(steps: np.ndarray) -> None:
        """The model's magnets at the start plus knob ``steps`` (knob units)."""
        strength = dict(nominal)
        for c, step in zip(coefficients, steps, strict=True):
            for n, v in c.items():
                strength[n] += float(v) * float(step)
        values = {}
        for n in names:
            cal = description.device(n).calibration
            assert cal is not None  # magnets have calibrations
            values[n] = float(cal.to_hardware(strength[n]))
        model.set_hardware(values)

    # tracking amplitude: a tune shift of ~2e-5 at the start (3e-5 m on EBS, mm on a ring
    # with weak sextupoles), so the Jacobian's differences stand above NAFF's precision
    q1_start = _detuning(model.lattice, float(model.optics([0]).closed_orbit[0, 4]), 3e-5)
    beta0 = float(np.max(model.optics([0]).beta[0]))
    amplitude = float(
        np.clip(np.sqrt(2 * beta0 * _TRACK_SHIFT / max(np.max(np.abs(q1_start)), 1e-9)), 3e-5, 3e-3)
    )

    def detuning_now() -> np.ndarray:
        return _detuning(model.lattice, float(model.optics([0]).closed_orbit[0, 4]), amplitude)

    all_terms = [*terms, *held]
    q1_0 = detuning_now()
    q1 = q1_0
    obj0 = _objective(q1_0, terms)
    held0 = _objective(q1_0, held)
    goal = ratio * float(np.linalg.norm(obj0))
    target = np.concatenate([np.zeros(len(terms)), held0])
    weights = np.concatenate([np.ones(len(terms)), np.full(len(held), hold_weight)])

    def cost(q: np.ndarray) -> float:
        return float(np.linalg.norm(weights * (_objective(q, all_terms) - target)))

    for _ in range(iterations):
        base = _objective(q1, all_terms)
        if float(np.linalg.norm(base[: len(terms)])) <= goal:
            break
        rows = [model.chromaticity_response(knob_list) / 0.1]
        if hold_tunes:
            rows.append(model.tune_response(knob_list) / 1e-3)
        jac = np.empty((len(all_terms), len(knob_list)))
        for j in range(len(knob_list)):
            h = _JACOBIAN_STEP * scale[j]
            trial = total.copy()
            trial[j] += h
            apply(trial)
            jac[:, j] = (_objective(detuning_now(), all_terms) - base) / h
        step = constrained_step(
            jac,
            base,
            np.vstack(rows),
            target=target,
            weights=weights,
            regularization=regularization,
            knob_scale=scale,
        )
        # trust region: at most max_step of each knob's scale, then halve until it improves
        size = float(np.max(np.abs(step.steps) / scale))
        alpha = min(1.0, max_step / size) if size > 0 else 0.0
        now = cost(q1)
        improved = False
        for _ in range(6):
            trial = total + alpha * step.steps
            apply(trial)
            try:
                q_trial = detuning_now()
            except (ValueError, RuntimeError, ArithmeticError):  # unstable or no orbit
                q_trial = None
            if q_trial is not None and cost(q_trial) < now:
                total, q1, improved = trial, q_trial, True
                break
            alpha /= 2
        apply(total)
        if not improved:
            break
    return {
        "steps": total,
        "before": q1_0,
        "after": q1,
        "objective_before": float(np.linalg.norm(obj0)),
        "objective_after": float(np.linalg.norm(_objective(q1, terms))),
        "chromaticity_change": model.chromaticity() - xi0,
        "tune_change": (model.tunes() - q0 + 0.5) % 1.0 - 0.5,
    }


# -- analysis (worker job) ----------------------------------------------------------------------
def analyze_adts(
    xs: np.ndarray,
    ys: np.ndarray,
    kicks: np.ndarray,
    reference: dict[str, np.ndarray],
    action: str,
    order: int,
) -> tuple[AdtsFit, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tunes, actions and the fit of a set of shots (a worker job).

    Returns ``(fit, tunes (n, 2), actions (n, 2), actions from the kicks (n, 2), bad BPMs)``.
    """
    n_shot, n_bpm, _ = xs.shape
    bad = np.zeros(n_bpm, bool)
    for data in (xs[int(np.argmax(kicks[:, 0]))], ys[int(np.argmax(kicks[:, 1]))]):
        bad |= find_bad_bpms(data).flagged
    good = ~bad
    ref = np.asarray(reference["tunes"], dtype=float)
    tunes = np.empty((n_shot, 2))
    for i in range(n_shot):
        tunes[i, 0] = line_tune(xs[i], ref[0], good=good)[0]
        tunes[i, 1] = line_tune(ys[i], ref[1], good=good)[0]
    from_kick = kick_actions(kicks, reference["beta_pinger"])
    if action == "kick":
        actions = from_kick
    else:
        actions = np.array(
            [
                tbt_actions(xs[i], ys[i], reference["beta_bpm"], tunes[i], good=good)
                for i in range(n_shot)
            ]
        )
        # a plane barely kicked (the other plane's scan) has an action near zero whose TbT
        # estimate is mostly noise: take the kick's there
        small = kicks <= 0.25 * np.max(kicks, axis=0)
        actions = np.where(small, from_kick, actions)
    fit = fit_adts(actions, tunes, order=order)
    return fit, tunes, actions, from_kick, bad


# -- shots ----------------------------------------------------------------------------------
def _default_kicks(
    reference: dict[str, np.ndarray], max_tune_shift: float, n_kicks: int, kick_max: float
) -> tuple[np.ndarray, np.ndarray]:
    """Kicks (rad) per plane whose model tune shift reaches ``max_tune_shift`` at the largest."""
    q1 = np.asarray(reference["detuning"], dtype=float)
    beta = np.asarray(reference["beta_pinger"], dtype=float)
    out = []
    for u in range(2):
        slope = float(np.max(np.abs(q1[u]))) or 1.0
        j_max = max_tune_shift / slope
        k_max = min(float(np.sqrt(2 * j_max / beta[u])), 0.9 * kick_max)
        out.append(k_max * np.sqrt(np.linspace(0.2, 1.0, n_kicks)))
    return out[0], out[1]


def _shot_list(kx: np.ndarray, ky: np.ndarray, small: float) -> np.ndarray:
    return np.array([(k, small) for k in kx] + [(small, k) for k in ky], dtype=float)


def _fire(
    bpms: TbtBuffers,
    pinger: Pinger,
    kicks: np.ndarray,
    turns: int,
    timeout: float,
    record: Record,
    stage: str,
) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
    """Fire one shot per row of ``kicks``; a ``primary`` event per shot; the buffers."""
    n = len(bpms.bpm_names)
    xs, ys = np.empty((len(kicks), n, turns)), np.empty((len(kicks), n, turns))
    for i, (kx, ky) in enumerate(kicks):
        yield from bps.checkpoint()
        yield from bps.mv(pinger.kick_x, float(kx) * 1e6, pinger.kick_y, float(ky) * 1e6)
        data = yield from fire_shot(bpms, pinger, turns, timeout)
        xs[i], ys[i] = data.x, data.y
        yield from bps.create("primary")
        yield from bps.read(
            record.update(
                x=data.x,
                y=data.y,
                counter=data.counter,
                time=data.time,
                kick_x=float(kx),
                kick_y=float(ky),
                stage=stage,
            )
        )
        yield from bps.save()
    return xs, ys


def _check_common(
    bpms: Any,
    pinger: Any,
    turns: int,
    n_kicks: int,
    max_tune_shift: float,
    kick_small: float,
    plan: str,
) -> MachineDescription:
    description = getattr(bpms, "description", None)
    if not isinstance(description, MachineDescription):
        raise ValueError(
            f"{plan}: {getattr(bpms, 'name', bpms)!r} is no TbtBuffers with a machine "
            "description (build it with TbtBuffers.for_family)"
        )
    if not all(hasattr(pinger, a) for a in ("kick_x", "kick_y", "fire", "kick_max")):
        raise ValueError(f"{plan}: {getattr(pinger, 'name', pinger)!r} is no pinger")
    if not isinstance(turns, int) or turns < 32:
        raise ValueError(f"{plan}: turns must be an integer >= 32, got {turns!r}")
    if not isinstance(n_kicks, int) or n_kicks < 5:
        raise ValueError(f"{plan}: n_kicks must be an integer >= 5 per plane, got {n_kicks!r}")
    if not 0 < max_tune_shift < MAX_TUNE_SHIFT:
        raise ValueError(
            f"{plan}: max_tune_shift must be in (0, {MAX_TUNE_SHIFT}), got {max_tune_shift!r}"
        )
    if not np.isfinite(kick_small) or kick_small <= 0:
        raise ValueError(f"{plan}: kick_small must be > 0 (rad), got {kick_small!r}")
    return description


def _given_kicks(
    kicks_x: Sequence[float] | None, kicks_y: Sequence[float] | None, plan: str
) -> list[np.ndarray | None]:
    given: list[np.ndarray | None] = []
    for label, ks in (("kicks_x", kicks_x), ("kicks_y", kicks_y)):
        if ks is None:
            given.append(None)
            continue
        arr = np.asarray(ks, dtype=float)
        if arr.ndim != 1 or arr.size < 5 or np.unique(arr).size < 5:
            raise ValueError(f"{plan}: {label} needs at least 5 distinct kicks, got {ks!r}")
        _check_kicks(arr, np.inf, plan)
        given.append(arr)
    return given


def _scan_kicks(
    reference: dict[str, np.ndarray],
    given: list[np.ndarray | None],
    max_tune_shift: float,
    n_kicks: int,
    kick_small: float,
    kick_max_urad: float,
    plan: str,
) -> np.ndarray:
    """The shots' kicks (n, 2) (rad): given or from the model, checked against the limit."""
    kx, ky = _default_kicks(reference, max_tune_shift, n_kicks, kick_max_urad * 1e-6)
    kx = given[0] if given[0] is not None else kx
    ky = given[1] if given[1] is not None else ky
    kicks = _shot_list(kx, ky, kick_small)
    _check_kicks(kicks, kick_max_urad, plan)
    return kicks


def _check_kicks(kicks: np.ndarray, kick_max_urad: float, plan: str) -> None:
    if not np.all(np.isfinite(kicks)) or np.any(kicks < 0):
        raise ValueError(f"{plan}: kicks must be finite and >= 0 (rad)")
    if np.max(kicks) * 1e6 > kick_max_urad:
        raise ValueError(
            f"{plan}: kick {np.max(kicks) * 1e6:.3g} urad exceeds the pinger's limit "
            f"{kick_max_urad:.3g} urad; refused before any shot"
        )


def _adts_fields(
    analysis: tuple[AdtsFit, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    kicks: np.ndarray,
    reference: dict[str, np.ndarray],
    action: str,
    turns: int,
) -> dict[str, Any]:
    fit, tunes, actions, from_kick, bad = analysis
    shift = np.abs((tunes - fit.tunes0 + 0.5) % 1.0 - 0.5)
    return {
        "detuning": fit.detuning,
        "std_detuning": fit.std,
        "tunes0": fit.tunes0,
        "std_tunes0": fit.std_tunes0,
        "second_order": fit.second_order,
        "residual_rms": fit.residual_rms,
        "order": fit.order,
        "action_method": action,
        "kicks": kicks,
        "actions": actions,
        "actions_kick": from_kick,
        "tunes": tunes,
        "max_tune_shift": float(np.max(shift)),
        "model_detuning": np.asarray(reference["detuning"], dtype=float),
        "model_tunes": np.asarray(reference["tunes"], dtype=float),
        "beta_pinger": np.asarray(reference["beta_pinger"], dtype=float),
        "turns": int(turns),
        "bad_bpms": bad,
    }


def _shot_record(bpms: TbtBuffers, turns: int) -> Record:
    n = len(bpms.bpm_names)
    return Record(
        "shot",
        {
            "x": np.zeros((n, turns)),
            "y": np.zeros((n, turns)),
            "counter": 0,
            "time": 0.0,
            "kick_x": 0.0,
            "kick_y": 0.0,
            "stage": "",
        },
        {"x": "m", "y": "m", "time": "s", "kick_x": "rad", "kick_y": "rad"},
        source=bpms.name,
    )


_UNITS = {
    "shot-x": "m",
    "shot-y": "m",
    "shot-time": "s",
    "shot-kick_x": "rad",
    "shot-kick_y": "rad",
}


# -- plans --------------------------------------------------------------------------------------
def measure_adts(
    bpms: TbtBuffers,
    pinger: Pinger,
    *,
    kicks_x: Sequence[float] | None = None,
    kicks_y: Sequence[float] | None = None,
    kick_small: float = 5e-6,
    n_kicks: int = 5,
    max_tune_shift: float = 0.004,
    turns: int = 128,
    action: str = "tbt",
    order: int = 1,
    timeout: float = 60.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the amplitude-dependent tune shift (detuning with amplitude) with pinger shots.

    Two scans of single shots: the horizontal kick at ``n_kicks`` amplitudes with a small
    vertical kick ``kick_small``, then the vertical kick at ``n_kicks`` amplitudes with the
    same small horizontal kick (the small kick makes the other plane's tune visible; larger, it
    would change the slope through higher-order detuning). By default the amplitudes are
    spaced evenly in action up to the one where the model's detuning (pyAT tracking of the
    online model at the present setpoints, in the worker) shifts a tune by
    ``max_tune_shift`` (0.004: the fit stays linear; the issue bounds it at 0.01), within the
    pinger's limit.

    Per shot (analysis in the worker process): the tune of each plane is the NAFF line
    nearest the model's tune in the SVD of the BPM x turn matrix (:func:`accplans.physics.
    line_tune`), BPMs flagged bad left out. The action of each plane (``action="tbt"``, the
    default) comes from the first 32 turns, ``median(A_i^2 / 2 beta_i)`` over the BPMs with
    the model's beta, extrapolated to turn 0 (:func:`accplans.physics.tbt_actions`):
    beta-beating and BPM gains average out over the BPMs, while ``action="kick"``
    (``J = beta theta^2 / 2``) depends on the model's beta at the pinger alone (on the EBS
    twin 6 % off with the default errors). A plane barely kicked takes the kick's action.
    Decoherence limits the usable turns (~100 at EBS's design chromaticity): the default 128
    turns are enough for the tunes; the actions use the first 32. The fit
    (:func:`accplans.physics.fit_adts`) is linear in the actions (``order=2`` adds
    ``Jx^2``, ``Jy^2``), least squares over all shots, with standard errors.

    A measurement plan: it changes the pinger's kicks and the buffer length and restores them
    however it ends. Every kick is checked against the pinger's ``KICK_MAX`` before the first
    shot.

    Args:
        bpms: the TbT buffers of a BPM family.
        pinger: the pinger.
        kicks_x: horizontal kicks of the x scan (rad; >= 5); default from ``max_tune_shift``.
        kicks_y: vertical kicks of the y scan (rad; >= 5); default from ``max_tune_shift``.
        kick_small: the other plane's kick in each scan (rad).
        n_kicks: amplitudes per plane of the default scans (>= 5).
        max_tune_shift: tune shift of the largest default kick in the model (< 0.01).
        turns: buffer length (turns, >= 32).
        action: ``"tbt"`` or ``"kick"`` (above).
        order: 1 (linear fit) or 2 (adds the squares of the actions).
        timeout: longest wait for the buffers of one shot (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: one ``primary`` event per shot (``shot-x``, ``shot-y`` (n_bpm,
        turns) in m, ``shot-kick_x``, ``shot-kick_y`` in rad) and the result ``result_adts``
        (``load_result(client, uid, "adts")``: ``detuning`` (1/m, pyAT's layout
        ``[[dQx/dJx, dQy/dJx], [dQx/dJy, dQy/dJy]]``), ``std_detuning``, ``tunes0``, per shot
        ``kicks``, ``actions``, ``tunes``, the ``max_tune_shift`` seen, the model's
        ``model_detuning`` and ``beta_pinger``).
    """
    plan_name = "measure_adts"
    description = _check_common(bpms, pinger, turns, n_kicks, max_tune_shift, kick_small, plan_name)
    if action not in ACTIONS:
        raise ValueError(f"{plan_name}: action must be one of {ACTIONS}, got {action!r}")
    if order not in (1, 2):
        raise ValueError(f"{plan_name}: order must be 1 or 2, got {order!r}")
    given = _given_kicks(kicks_x, kicks_y, plan_name)
    names = list(bpms.bpm_names)
    _md = run_metadata(
        description,
        plan_name=plan_name,
        plan_args={
            "bpms": bpms.name,
            "pinger": pinger.name,
            "kicks_x": None if kicks_x is None else list(map(float, kicks_x)),
            "kicks_y": None if kicks_y is None else list(map(float, kicks_y)),
            "kick_small": kick_small,
            "n_kicks": n_kicks,
            "max_tune_shift": max_tune_shift,
            "turns": turns,
            "action": action,
            "order": order,
        },
        units=_UNITS,
        bpm_names=names,
    )
    _md.update(md or {})
    record = _shot_record(bpms, turns)

    def plan() -> MsgGenerator[str]:
        kick_max = yield from call_async(pinger.kick_max.get_value)
        start = {}
        for sig in (pinger.kick_x, pinger.kick_y, bpms.turns):
            start[sig] = yield from call_async(sig.get_value)
        reference = yield from compute(model_adts, description, None, names)
        kicks = _scan_kicks(
            reference, given, max_tune_shift, n_kicks, kick_small, kick_max, plan_name
        )
        _md["num_points"] = len(kicks)

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            yield from bps.mv(bpms.turns, turns)
            xs, ys = yield from _fire(bpms, pinger, kicks, turns, timeout, record, "measure")
            analysis = yield from compute(analyze_adts, xs, ys, kicks, reference, action, order)
            yield from record_result(
                "adts", **_adts_fields(analysis, kicks, reference, action, turns)
            )

        def restore() -> MsgGenerator[None]:
            yield from bps.mv(*[v for pair in start.items() for v in pair])

        return cast(str, (yield from bpp.finalize_wrapper(run(), restore())))

    return (yield from plan())


def _norm(q1: np.ndarray, terms: Sequence[str]) -> float:
    return float(np.linalg.norm(_objective(np.asarray(q1, dtype=float), terms)))


def _caught_result(plan: MsgGenerator[str], kind: str) -> MsgGenerator[tuple[str, dict[str, Any]]]:
    """Run a sub-plan; its uid and the fields of the last ``result_<kind>`` it recorded."""
    caught: dict[str, Any] = {}

    def watch(msg: Msg) -> Msg:
        if msg.command == "read" and isinstance(msg.obj, ResultReadable) and msg.obj.kind == kind:
            caught.clear()
            caught.update(msg.obj.values)
        return msg

    uid = yield from bpp.msg_mutator(plan, watch)
    return cast(str, uid), dict(caught)


def _trim(
    tune: TuneMonitor,
    rf: SettableFamily,
    quadrupoles: SettableFamily | Sequence[SettableFamily],
    sextupoles: Sequence[SettableFamily],
    tunes0: np.ndarray,
    xi0: np.ndarray,
    chromaticity_knobs: Sequence[str] | None,
    round_: int,
) -> MsgGenerator[tuple[list[str], np.ndarray]]:
    """Tunes, chromaticity, tunes back to the starting values, each a sub-plan (own run).

    Runs inside the open ``correct_nonlinear`` run under their own run keys. Returns the
    sub-runs' uids and the chromaticity the last ``correct_chromaticity`` measured.
    """
    uids = []
    xi1 = np.full(2, np.nan)
    for k, what in enumerate(("tunes", "chromaticity", "tunes")):
        key = f"trim_{round_}_{k}_{what}"
        if what == "tunes":
            sub = correct_tunes(tune, quadrupoles, target=np.mod(tunes0, 1.0).tolist())
            uid = yield from bpp.set_run_key_wrapper(sub, key)
        else:
            sub = correct_chromaticity(
                tune, rf, list(sextupoles), target=xi0.tolist(), knobs=chromaticity_knobs
            )
            uid, fields = yield from _caught_result(
                bpp.set_run_key_wrapper(sub, key), "chromaticity"
            )
            xi1 = np.asarray(fields.get("chromaticity", np.full(2, np.nan)), dtype=float)
        uids.append(cast(str, uid))
    return uids, xi1


def correct_nonlinear(
    bpms: TbtBuffers,
    pinger: Pinger,
    magnets: SettableFamily | Sequence[SettableFamily],
    *,
    terms: Sequence[str] = ("dqx_djx",),
    hold: Sequence[str] | None = None,
    hold_weight: float = 1.0,
    ratio: float = 0.3,
    knobs: Sequence[str] | None = None,
    iterations: int = 3,
    regularization: float = 0.01,
    hold_tunes: bool = True,
    verify: bool = True,
    min_cut: float = 1.0,
    tune: TuneMonitor | None = None,
    rf: SettableFamily | None = None,
    quadrupoles: SettableFamily | Sequence[SettableFamily] | None = None,
    rounds: int = 1,
    kicks_x: Sequence[float] | None = None,
    kicks_y: Sequence[float] | None = None,
    kick_small: float = 5e-6,
    n_kicks: int = 5,
    max_tune_shift: float = 0.004,
    turns: int = 128,
    action: str = "tbt",
    timeout: float = 60.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Cut the amplitude detuning with sextupole knobs, chromaticity and tunes held.

    The objective is the norm of the chosen detuning ``terms`` (names of
    :data:`ADTS_TERMS`) of the online model at the present setpoints (pyAT tracking, in the
    worker); the ``hold`` terms (default: the other distinct coefficients) are kept near their
    starting values (a weighted penalty). Gauss-Newton steps of the knobs in the null space of
    the model's chromaticity response (and tune response with ``hold_tunes``) bring the
    objective to ``ratio`` of its start, at most ``iterations`` steps, all in the model before
    anything moves. The knob change is checked against every magnet's limits, then applied in
    one step.

    The model knows neither the orbit in the sextupoles (whose feed-down moves the tunes) nor
    the beta-beating (the true chromaticity response differs): with ``tune``, ``rf`` and
    ``quadrupoles`` given, the plan measures the tunes and the chromaticity before the step
    (:func:`~accplans.plans.measure_chromaticity`, a run of its own) and brings them back
    after it with :func:`~accplans.plans.correct_tunes`, :func:`~accplans.plans.
    correct_chromaticity` and :func:`~accplans.plans.correct_tunes` again (sub-plans, each a
    run of its own, opened inside this plan's run). ``rounds`` > 1 repeats step and trims
    while the measured objective is above ``ratio`` of its start (each round solved at the
    setpoints then).

    With ``verify`` (default), the detuning is measured as :func:`measure_adts` does (same
    kicks) before the first step and after the last trim; the plan fails, restoring the
    magnets, if the measured objective did not drop by at least ``min_cut`` (1: it must not
    grow).

    A correction plan: it changes the sextupole knobs (and, with the trims, the quadrupole
    knobs; the pinger's kicks, the buffer length and the RF frequency are always put back).
    It keeps the new setpoints on success and on a user stop after a step; it restores every
    starting setpoint (sextupoles and quadrupoles) when it fails or is aborted. With the trims
    the sub-plans claim what they move; the sextupole step itself claims nothing then (the
    claims may not overlap).

    Args:
        bpms: the TbT buffers of a BPM family.
        pinger: the pinger.
        magnets: the families the knobs act on (e.g. ``sextupoles``).
        terms: detuning coefficients of the objective (:data:`ADTS_TERMS`). On EBS with its
            six sextupole families and the chromaticity held, ``dqx_djx`` alone can be cut to
            zero with the others held; the norm of all three at most 1.6x (model).
        hold: detuning coefficients kept near their start (default: those of ``dqx_djx``,
            ``dqx_djy``, ``dqy_djy`` not in ``terms``; ``()``: none).
        hold_weight: weight of the held terms against the objective's.
        ratio: model objective aimed at, relative to its start (0 < ratio < 1).
        knobs: knob names of the description, or sextupole names of ``magnets`` (one knob
            each, in SI strength); default every knob whose magnets are all sextupoles of
            ``magnets``. The constraints take 2 (4 with ``hold_tunes``, when the knobs move
            the tunes) directions: give more knobs than that.
        iterations: largest number of model Gauss-Newton steps per round.
        regularization: relative Tikhonov parameter of each step (on knobs scaled by their
            present strengths).
        hold_tunes: also hold the model's tunes (a constraint that uses up free directions
            only when the knobs move the tunes, through the orbit in the sextupoles).
        verify: measure the detuning before and after.
        min_cut: smallest measured ``before / after`` of the objective accepted.
        tune: the tune monitor (with ``rf`` and ``quadrupoles``: trim tunes and chromaticity
            back after each step).
        rf: the RF device (the chromaticity measurements).
        quadrupoles: the families of the tune knobs.
        rounds: largest number of step-and-trim rounds (> 1 needs ``verify`` and the trims).
        kicks_x: as :func:`measure_adts`.
        kicks_y: as :func:`measure_adts`.
        kick_small: as :func:`measure_adts`.
        n_kicks: as :func:`measure_adts`.
        max_tune_shift: as :func:`measure_adts`.
        turns: as :func:`measure_adts`.
        action: as :func:`measure_adts`.
        timeout: as :func:`measure_adts`.
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events per shot (``shot-stage``: ``before`` or
        ``after``), the results ``result_nonlinear`` (knob steps, model and measured
        detuning before and after, with the trims the tunes and chromaticity at the start and
        the end and the uids of the sub-runs) and, with ``verify``, ``result_adts`` of the
        shots after.
    """
    plan_name = "correct_nonlinear"
    description = _check_common(bpms, pinger, turns, n_kicks, max_tune_shift, kick_small, plan_name)
    families = as_families(magnets)
    description = description_of(*families) if families else description
    if isinstance(terms, str) or not terms or any(t not in ADTS_TERMS for t in terms):
        raise ValueError(f"{plan_name}: terms must be names of {sorted(ADTS_TERMS)}, got {terms!r}")
    held = (
        [t for t in _DISTINCT if t not in terms]
        if hold is None
        else [t for t in hold if t not in terms]
    )
    if isinstance(hold, str) or any(t not in ADTS_TERMS for t in held):
        raise ValueError(f"{plan_name}: hold must be names of {sorted(ADTS_TERMS)}, got {hold!r}")
    if not np.isfinite(hold_weight) or hold_weight <= 0:
        raise ValueError(f"{plan_name}: hold_weight must be > 0, got {hold_weight!r}")
    if not 0 < ratio < 1:
        raise ValueError(f"{plan_name}: ratio must be in (0, 1), got {ratio!r}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{plan_name}: iterations must be an integer >= 1, got {iterations!r}")
    if not np.isfinite(regularization) or regularization < 0:
        raise ValueError(f"{plan_name}: regularization must be >= 0, got {regularization!r}")
    if not np.isfinite(min_cut) or min_cut <= 0:
        raise ValueError(f"{plan_name}: min_cut must be > 0, got {min_cut!r}")
    if action not in ACTIONS:
        raise ValueError(f"{plan_name}: action must be one of {ACTIONS}, got {action!r}")
    trims = (tune, rf, quadrupoles)
    if any(x is not None for x in trims) and any(x is None for x in trims):
        raise ValueError(f"{plan_name}: give tune, rf and quadrupoles together (the trims)")
    trimming = tune is not None and rf is not None and quadrupoles is not None
    if tune is not None:
        check_tune_monitor(tune, plan_name)
    if not isinstance(rounds, int) or rounds < 1 or (rounds > 1 and not (verify and trimming)):
        raise ValueError(
            f"{plan_name}: rounds must be an integer >= 1, and > 1 only with verify and the "
            f"trims; got {rounds!r}"
        )
    quads = as_families(quadrupoles) if quadrupoles is not None else []
    given = _given_kicks(kicks_x, kicks_y, plan_name)
    knob_set = _resolve(description, families, knobs, plan_name)
    # the chromaticity trim: the description's knobs when the step's knobs are knobs
    chroma_knobs = (
        list(knob_set.names) if all(k in description.knobs for k in knob_set.names) else None
    )
    names = list(bpms.bpm_names)
    term_list = list(terms)
    _md = run_metadata(
        description,
        plan_name=plan_name,
        plan_args={
            "bpms": bpms.name,
            "pinger": pinger.name,
            "magnets": [f.name for f in families],
            "terms": term_list,
            "hold": held,
            "hold_weight": hold_weight,
            "ratio": ratio,
            "knobs": list(knob_set.names),
            "iterations": iterations,
            "regularization": regularization,
            "hold_tunes": hold_tunes,
            "verify": verify,
            "min_cut": min_cut,
            "tune": None if tune is None else tune.name,
            "rf": None if rf is None else rf.name,
            "quadrupoles": [f.name for f in quads],
            "rounds": rounds,
            "kick_small": kick_small,
            "n_kicks": n_kicks,
            "max_tune_shift": max_tune_shift,
            "turns": turns,
            "action": action,
        },
        units=_UNITS,
        knob_units=list(knob_set.units),
        bpm_names=names,
    )
    _md.update(md or {})
    record = _shot_record(bpms, turns)
    moved = [*families, *quads]

    def solve(hw: dict[str, float]) -> MsgGenerator[dict[str, Any]]:
        solution = yield from compute(
            solve_nonlinear, description, hw, knob_set.names, term_list, ratio, iterations,
            regularization, hold_tunes, _MAX_STEP, held, hold_weight,
        )  # fmt: skip
        if not solution["objective_after"] < _MIN_MODEL_CUT * solution["objective_before"]:
            raise ValueError(
                f"{plan_name}: no step of the knobs {list(knob_set.names)} free of the "
                f"constraints cuts the model's objective ({solution['objective_before']:.4g} "
                f"-> {solution['objective_after']:.4g} 1/m; knobs of one symmetry class act "
                "alike: give knobs of different families); refused before any move"
            )
        return solution

    def targets_of(steps: np.ndarray) -> MsgGenerator[tuple[list[np.ndarray], list[np.ndarray]]]:
        now = yield from current_strengths(families)
        targets = knob_set.strengths(now, steps)
        check_knob_targets(
            families,
            targets,
            plan=plan_name,
            why=f"knob steps {np.round(steps, 4).tolist()} leave limits",
        )
        return targets, now

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, moved)
        hw = {n: v for fam in families for n, v in snapshot.setpoints[fam.name].items()}
        kick_max = yield from call_async(pinger.kick_max.get_value)
        start = {}
        for sig in (pinger.kick_x, pinger.kick_y, bpms.turns):
            start[sig] = yield from call_async(sig.get_value)
        reference = yield from compute(model_adts, description, hw, names)
        kicks = _scan_kicks(
            reference, given, max_tune_shift, n_kicks, kick_small, kick_max, plan_name
        )
        solution = yield from solve(hw)
        targets, now = yield from targets_of(np.asarray(solution["steps"], dtype=float))
        nan2 = np.full(2, np.nan)
        state = {"tunes0": nan2, "xi0": nan2, "tunes1": nan2, "xi1": nan2}
        sub_uids: list[str] = []
        if trimming:
            assert tune is not None and rf is not None
            avg = yield from read_tunes(tune)
            state["tunes0"] = avg.tunes
            uid, fields = yield from _caught_result(measure_chromaticity(tune, rf), "chromaticity")
            sub_uids.append(uid)
            state["xi0"] = np.asarray(fields["chromaticity"], dtype=float)

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            nonlocal solution, targets, now
            yield from bps.mv(bpms.turns, turns)
            nan = np.full((2, 2), np.nan)
            measured = {"before": (nan, nan), "after": (nan, nan)}
            after_fields: dict[str, Any] | None = None
            total = np.zeros(len(knob_set.names))
            model_before = np.asarray(solution["before"], dtype=float)
            model_obj_before = float(solution["objective_before"])
            xi_change = np.zeros(2)
            q_change = np.zeros(2)
            if verify:
                xs, ys = yield from _fire(bpms, pinger, kicks, turns, timeout, record, "before")
                a = yield from compute(analyze_adts, xs, ys, kicks, reference, action, 1)
                measured["before"] = (a[0].detuning, a[0].std)
            before_obj = _norm(measured["before"][0], term_list)
            for r in range(rounds):
                if r > 0:
                    snap = yield from take_snapshot(description, families)
                    hw_now = {n: v for v in snap.setpoints.values() for n, v in v.items()}
                    solution = yield from solve(hw_now)
                    targets, now = yield from targets_of(np.asarray(solution["steps"], float))
                yield from bps.checkpoint()
                yield from apply_knobs(families, targets, now)
                total = total + np.asarray(solution["steps"], dtype=float)
                xi_change = xi_change + np.asarray(solution["chromaticity_change"], float)
                q_change = q_change + np.asarray(solution["tune_change"], float)
                if trimming:
                    assert tune is not None and rf is not None and quadrupoles is not None
                    uids, state["xi1"] = yield from _trim(
                        tune, rf, quadrupoles, families, state["tunes0"], state["xi0"],
                        chroma_knobs, r,
                    )  # fmt: skip
                    sub_uids.extend(uids)
                    avg = yield from read_tunes(tune)
                    state["tunes1"] = avg.tunes
                if verify:
                    xs, ys = yield from _fire(bpms, pinger, kicks, turns, timeout, record, "after")
                    a = yield from compute(analyze_adts, xs, ys, kicks, reference, action, 1)
                    measured["after"] = (a[0].detuning, a[0].std)
                    after_fields = _adts_fields(a, kicks, reference, action, turns)
                    if _norm(a[0].detuning, term_list) <= ratio * before_obj:
                        break
            after_obj = _norm(measured["after"][0], term_list)
            yield from record_result(
                "nonlinear",
                knobs=list(knob_set.names),
                knob_steps=total,
                terms=term_list,
                model_before=model_before,
                model_after=np.asarray(solution["after"], dtype=float),
                model_objective_before=model_obj_before,
                model_objective_after=float(solution["objective_after"]),
                chromaticity_change=xi_change,
                tune_change=q_change,
                measured_before=measured["before"][0],
                measured_after=measured["after"][0],
                std_measured_before=measured["before"][1],
                std_measured_after=measured["after"][1],
                measured_objective_before=before_obj,
                measured_objective_after=after_obj,
                tunes_start=state["tunes0"],
                tunes_end=state["tunes1"],
                chromaticity_start=state["xi0"],
                chromaticity_end=state["xi1"],
                sub_runs=" ".join(sub_uids),
            )
            if after_fields is not None:
                yield from record_result("adts", **after_fields)
            if verify and not before_obj >= min_cut * after_obj:
                raise RuntimeError(
                    f"{plan_name}: the measured objective went from {before_obj:.4g} to "
                    f"{after_obj:.4g} 1/m (cut {before_obj / after_obj:.2f}, asked >= "
                    f"{min_cut:g}); restoring the starting setpoints"
                )

        def pinger_back() -> MsgGenerator[None]:
            yield from bps.mv(*[v for pair in start.items() for v in pair])

        body = bpp.finalize_wrapper(run(), pinger_back())
        return cast(
            str,
            (
                yield from restore_on_exit(
                    body,
                    moved,
                    snapshot,
                    policy="correction",
                    claim_mode=None if trimming else "pause",
                )
            ),
        )

    return (yield from plan())
