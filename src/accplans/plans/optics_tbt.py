"""``correct_optics_tbt``: correct beta-beating with quadrupoles from turn-by-turn phases."""

from __future__ import annotations

import asyncio
from typing import cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import FieldSpec, ResultSchema, record_result, register_result_kind, run_metadata
from accplans.devices import Pinger, SettableFamily, TbtBuffers, call_async
from accplans.model import OnlineModel, phase_correction
from accplans.physics import TbtOptics

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._stubs import set_and_settle
from ._worker import compute
from .tbt import _analyze, fire_shot, model_tbt_reference

__all__ = ["correct_optics_tbt", "tbt_phase_correction"]

register_result_kind(
    ResultSchema(
        kind="tbt_correction",
        version=1,
        description=(
            "Optics correction from turn-by-turn phase advances: the quadrupoles and their "
            "strength change (final minus start), per measurement (the first before any "
            "change, then one after each step) the rms phase error against the target (design) "
            "phases and the rms beta-beating (3-BPM beta from phase against the design beta), "
            "the measured beta before and after, and the BPMs flagged bad."
        ),
        fields={
            "quadrupole_names": FieldSpec("", "(nquad,)", "str"),
            "strength_change": FieldSpec("m^-2", "(nquad,)"),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "phase_error_rms_x": FieldSpec("rad", "(k,)"),
            "phase_error_rms_y": FieldSpec("rad", "(k,)"),
            "beating_rms_x": FieldSpec("", "(k,)"),
            "beating_rms_y": FieldSpec("", "(k,)"),
            "beta_before_x": FieldSpec("m", "(nbpm,)"),
            "beta_before_y": FieldSpec("m", "(nbpm,)"),
            "beta_after_x": FieldSpec("m", "(nbpm,)"),
            "beta_after_y": FieldSpec("m", "(nbpm,)"),
            "model_beta_x": FieldSpec("m", "(nbpm,)"),
            "model_beta_y": FieldSpec("m", "(nbpm,)"),
            "bad": FieldSpec("", "(nbpm,)", "bool"),
            "steps": FieldSpec("", "()", "int"),
        },
    )
)


def _phase_error(optics: TbtOptics, target: np.ndarray) -> np.ndarray:
    """(2,) rms of measured minus target phase over the good BPMs, each plane's offset removed."""
    good = ~optics.bad
    out = np.zeros(2)
    for p in range(2):
        d = np.angle(np.exp(1j * (optics.phases[p][good] - target[p][good])))
        d = np.angle(np.exp(1j * (d - np.angle(np.mean(np.exp(1j * d))))))
        out[p] = float(np.sqrt(np.mean(d**2)))
    return out


def tbt_phase_correction(
    description: MachineDescription,
    hardware: dict[str, float],
    bpm_names: list[str],
    quadrupoles: list[str],
    phases: np.ndarray,
    target: np.ndarray,
    amplitudes: np.ndarray,
    good: np.ndarray,
    alpha: float,
) -> np.ndarray:
    """Quadrupole strength changes (m^-2) toward the target phases (a worker job).

    The online model at ``hardware`` (A), the phase response of ``quadrupoles``
    (:func:`accplans.model.phase_correction`), phases weighted by the oscillation amplitude.
    """
    model = OnlineModel(description)
    model.set_hardware(hardware)
    sigma = 1.0 / np.where(amplitudes > 0, amplitudes, np.nan)
    dk, _ = phase_correction(
        model,
        phases,
        target,
        sigma,
        good,
        quadrupoles=quadrupoles,
        bpms=bpm_names,
        alpha=alpha,
    )
    return dk


def correct_optics_tbt(
    bpms: TbtBuffers,
    pinger: Pinger,
    quadrupoles: SettableFamily,
    *,
    amplitude_x: float,
    amplitude_y: float,
    turns: int = 1024,
    shots: int = 2,
    iterations: int = 3,
    gain: float = 1.0,
    alpha: float = 1e-2,
    max_change: float = 0.05,
    threshold: float = 6.0,
    timeout: float = 60.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Correct the beta-beating with the quadrupoles from turn-by-turn phase advances.

    Each iteration measures the phases (``shots`` pinger shots, as :func:`measure_tbt`: bad
    BPMs flagged and left out), computes the quadrupole strength changes that bring the
    measured phases to the design model's (the analytic phase-advance response of the online
    model at the present setpoints, a Tikhonov solve with each plane's phase offset free,
    :func:`accplans.model.phase_correction`, in the worker process), checks them against
    ``max_change`` and the magnets' limits, sets ``gain`` times them and measures again. After
    ``iterations`` steps it records the result ``tbt_correction``.

    A correction plan: it changes the quadrupoles, and the pinger's kicks and the buffer length
    while it measures. The pinger and the buffer length are restored however it ends; the
    quadrupoles keep the correction when it succeeds, keep the last completed step on a user
    stop, and are restored to their starting setpoints when it fails (a step out of limits or
    beyond ``max_change``, a phase error growing by more than half from one measurement to the
    next, a lost beam) or is aborted.

    Args:
        bpms: the TbT buffers of a BPM family.
        pinger: the pinger.
        quadrupoles: the quadrupole family (every member is a corrector).
        amplitude_x: horizontal kick (rad).
        amplitude_y: vertical kick (rad).
        turns: buffer length (turns).
        shots: pinger shots per measurement (phases averaged over them).
        iterations: correction steps (each followed by a measurement).
        gain: fraction of each computed step applied (0 < gain <= 1).
        alpha: Tikhonov parameter, relative to the largest singular value of the response
            (scaled by the quadrupole strengths).
        max_change: largest relative strength change of any quadrupole in one step.
        threshold: outlier threshold of the bad-BPM detection (robust standard deviations).
        timeout: longest wait for the buffers of one shot (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``primary`` events per shot (``shot-x``, ``shot-y`` in m,
        ``shot-iteration``), a ``step`` event per correction step (``step-strength_change``,
        m^-2) and the result ``result_tbt_correction``
        (``load_result(client, uid, "tbt_correction")``).
    """
    for label, kick in (("amplitude_x", amplitude_x), ("amplitude_y", amplitude_y)):
        if not np.isfinite(kick):
            raise ValueError(f"correct_optics_tbt: {label} must be finite, got {kick!r}")
    if amplitude_x == 0 or amplitude_y == 0:
        raise ValueError("correct_optics_tbt: both planes need a kick (amplitude_x, amplitude_y)")
    if turns < 16 or shots < 1 or iterations < 1:
        raise ValueError(
            "correct_optics_tbt: need turns >= 16, shots >= 1 and iterations >= 1, got "
            f"{turns}, {shots}, {iterations}"
        )
    if not 0 < gain <= 1:
        raise ValueError(f"correct_optics_tbt: gain must be in (0, 1], got {gain!r}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"correct_optics_tbt: alpha must be > 0, got {alpha!r}")
    if not (np.isfinite(max_change) and 0 < max_change <= 0.1):
        raise ValueError(f"correct_optics_tbt: max_change must be in (0, 0.1], got {max_change!r}")
    description = description_of(bpms, quadrupoles)
    names = list(bpms.bpm_names)
    quads = list(quadrupoles.names)
    n = len(names)
    _md = run_metadata(
        description,
        plan_name="correct_optics_tbt",
        plan_args={
            "bpms": bpms.name,
            "pinger": pinger.name,
            "quadrupoles": quadrupoles.name,
            "amplitude_x": amplitude_x,
            "amplitude_y": amplitude_y,
            "turns": turns,
            "shots": shots,
            "iterations": iterations,
            "gain": gain,
            "alpha": alpha,
            "max_change": max_change,
            "threshold": threshold,
        },
        units={"shot-x": "m", "shot-y": "m", "step-strength_change": "m^-2"},
        bpm_names=names,
    )
    _md.update(md or {})
    shot_record = Record(
        "shot",
        {"x": np.zeros((n, turns)), "y": np.zeros((n, turns)), "iteration": 0},
        {"x": "m", "y": "m"},
        source=bpms.name,
    )
    step_record = Record(
        "step",
        {
            "iteration": 0,
            "strength_change": np.zeros(len(quads)),
            "phase_error_x": 0.0,
            "phase_error_y": 0.0,
        },
        {"strength_change": "m^-2", "phase_error_x": "rad", "phase_error_y": "rad"},
        source="correct_optics_tbt",
    )

    def plan() -> MsgGenerator[str]:
        kick_max = yield from call_async(pinger.kick_max.get_value)
        for label, kick in (("amplitude_x", amplitude_x), ("amplitude_y", amplitude_y)):
            if abs(kick) * 1e6 > kick_max:
                raise ValueError(
                    f"correct_optics_tbt: {label} {kick * 1e6:.3g} urad exceeds the pinger's "
                    f"limit {kick_max:.3g} urad"
                )
        snapshot = yield from take_snapshot(description, [quadrupoles])
        start_pinger = {}
        for sig in (pinger.kick_x, pinger.kick_y, bpms.turns):
            start_pinger[sig] = yield from call_async(sig.get_value)
        target, model_beta, model_tunes = yield from compute(
            model_tbt_reference, description, names
        )
        start_strengths = np.asarray((yield from call_async(quadrupoles.strengths)), float)

        def measure(iteration: int, goal: np.ndarray | None = None) -> MsgGenerator[TbtOptics]:
            # each shot a step: checkpoint -> (the first: set the quadrupoles to goal) -> fire
            # -> wait for the buffers -> read
            xs, ys = [], []
            for shot in range(shots):
                yield from bps.checkpoint()
                if shot == 0 and goal is not None:
                    yield from set_and_settle(quadrupoles, goal, hardware=False)
                data = yield from fire_shot(bpms, pinger, turns, timeout)
                xs.append(data.x)
                ys.append(data.y)
                yield from bps.create("primary")
                yield from bps.read(shot_record.update(x=data.x, y=data.y, iteration=iteration))
                yield from bps.save()
            optics = yield from compute(
                _analyze, np.array(xs), np.array(ys), target, model_beta, model_tunes, threshold
            )
            return optics

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            yield from bps.mv(
                pinger.kick_x,
                amplitude_x * 1e6,
                pinger.kick_y,
                amplitude_y * 1e6,
                bpms.turns,
                turns,
            )
            optics = yield from measure(0)
            first = optics
            errors = [_phase_error(optics, target)]
            beating = [optics.beating_rms]
            for k in range(iterations):
                snap = yield from take_snapshot(description, [quadrupoles])
                hardware = dict(snap.setpoints[quadrupoles.name])
                dk = yield from compute(
                    tbt_phase_correction,
                    description,
                    hardware,
                    names,
                    quads,
                    optics.phases,
                    target,
                    optics.amplitudes,
                    ~optics.bad,
                    alpha,
                )
                now = np.asarray((yield from call_async(quadrupoles.strengths)), float)
                step = gain * np.asarray(dk, float)
                relative = np.abs(step) / np.maximum(np.abs(now), 1e-12)
                if np.max(relative) > max_change:
                    worst = int(np.argmax(relative))
                    raise ValueError(
                        f"correct_optics_tbt: step {k + 1} changes {quads[worst]} by "
                        f"{relative[worst]:.2%}, more than max_change={max_change:g}; "
                        "restoring the starting setpoints"
                    )
                goal = now + step
                quadrupoles.check_strengths(goal)
                optics = yield from measure(k + 1, goal)
                errors.append(_phase_error(optics, target))
                beating.append(optics.beating_rms)
                yield from bps.create("step")
                yield from bps.read(
                    step_record.update(
                        iteration=k + 1,
                        strength_change=step,
                        phase_error_x=errors[-1][0],
                        phase_error_y=errors[-1][1],
                    )
                )
                yield from bps.save()
                if np.any(errors[-1] > 1.5 * errors[-2]):
                    raise RuntimeError(
                        f"correct_optics_tbt diverged at step {k + 1}: rms phase error "
                        f"{np.round(errors[-2] * 1e3, 3).tolist()} -> "
                        f"{np.round(errors[-1] * 1e3, 3).tolist()} mrad; restoring the starting "
                        "setpoints"
                    )
            final = np.asarray((yield from call_async(quadrupoles.strengths)), float)
            err, beat = np.array(errors), np.array(beating)
            yield from record_result(
                "tbt_correction",
                quadrupole_names=quads,
                strength_change=final - start_strengths,
                bpm_names=names,
                phase_error_rms_x=err[:, 0],
                phase_error_rms_y=err[:, 1],
                beating_rms_x=beat[:, 0],
                beating_rms_y=beat[:, 1],
                beta_before_x=first.beta[0],
                beta_before_y=first.beta[1],
                beta_after_x=optics.beta[0],
                beta_after_y=optics.beta[1],
                model_beta_x=model_beta[0],
                model_beta_y=model_beta[1],
                bad=optics.bad | first.bad,
                steps=iterations,
            )

        async def put_back() -> None:
            await asyncio.gather(*(sig.set(value) for sig, value in start_pinger.items()))

        def restore_pinger() -> MsgGenerator[None]:
            # awaited directly: a machine out of reach raises its own error (a timeout), which
            # the quadrupoles' restore then reports with the pending restore it journals
            yield from call_async(put_back)

        body = bpp.finalize_wrapper(run(), restore_pinger())
        return cast(
            str,
            (yield from restore_on_exit(body, [quadrupoles], snapshot, policy="correction")),
        )

    return (yield from plan())
