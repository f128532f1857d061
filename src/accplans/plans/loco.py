"""LOCO plans: fit the optics to a measured ORM, apply the fit, and measure-fit-correct cycles.

- :func:`loco_fit` fits gradients, BPM gains and rolls, corrector gains (and rolls) to an
  ``orm`` result (:func:`~accplans.plans.measure_orm`) in the worker process
  (:func:`accplans.model.run_loco`, analytic Jacobian, Levenberg-Marquardt in
  :func:`accplans.physics.fit_loco`) and records a ``loco`` result: the fit, the model's
  beta-beating and the quadrupole currents that cancel the fitted errors. Nothing moves.
- :func:`correct_optics` sets the quadrupoles to a ``loco`` result's currents.
- :func:`loco` runs up to N cycles of ``measure_orm`` -> ``loco_fit`` -> ``correct_optics``.

The method and its error budget: ``docs/explanations/loco.md``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import at
import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import Msg, MsgGenerator

from accplans.config import MachineDescription
from accplans.data import (
    FieldSpec,
    Result,
    ResultReadable,
    ResultSchema,
    load_result,
    record_result,
    register_result_kind,
    run_metadata,
    tiled_client_from_env,
)
from accplans.devices import OrbitSource, SettableFamily, call_async
from accplans.model import LocoModel, OnlineModel, gradient_parameters, optics_correction, run_loco

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import set_and_settle
from ._worker import compute
from .orm import measure_orm

__all__ = ["correct_optics", "loco", "loco_fit"]

register_result_kind(
    ResultSchema(
        kind="loco",
        version=1,
        description=(
            "A LOCO fit of a measured ORM (orm_uid): the fitted change of each gradient "
            "parameter from the model at the measurement's settings (quadrupoles and gradient "
            "dipoles), BPM gains (x, y) and rolls, corrector gains and rolls, chi2 per "
            "iteration; the bipolar kicks the model ORM was computed at (model_kick, NaN: the "
            "linear ORM); the model's beta-beating at the BPMs (fitted model against the model "
            "at the reference settings); and the quadrupole currents that cancel the fitted "
            "errors (quadrupole_target), computed from the currents at the fit "
            "(quadrupole_start) toward the reference optics (quadrupole_reference)."
        ),
        fields={
            "orm_uid": FieldSpec("", "()", "str"),
            "parameter_names": FieldSpec("", "(npar,)", "str"),
            "gradients": FieldSpec("1/m^2", "(npar,)"),
            "gradient_sigma": FieldSpec("1/m^2", "(npar,)"),
            "settable": FieldSpec("", "(npar,)", "bool"),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "bpm_gain_x": FieldSpec("", "(nbpm,)"),
            "bpm_gain_y": FieldSpec("", "(nbpm,)"),
            "bpm_roll": FieldSpec("rad", "(nbpm,)"),
            "corrector_names": FieldSpec("", "(ncorr,)", "str"),
            "corrector_gain": FieldSpec("", "(ncorr,)"),
            "corrector_roll": FieldSpec("rad", "(ncorr,)"),
            "model_kick": FieldSpec("rad", "(ncorr,)", optional=True),
            "chi2": FieldSpec("", "(niter,)"),
            "chi2_per_dof": FieldSpec("", "()"),
            "residual_rms": FieldSpec("m/rad", "()"),
            "iterations": FieldSpec("", "()", "int"),
            "converged": FieldSpec("", "()", "bool"),
            "singular_values_kept": FieldSpec("", "()", "int"),
            "beta_beat_x": FieldSpec("", "(nbpm,)"),
            "beta_beat_y": FieldSpec("", "(nbpm,)"),
            "beta_beat_rms": FieldSpec("", "(2,)"),
            "quadrupole_names": FieldSpec("", "(nquad,)", "str"),
            "quadrupole_start": FieldSpec("A", "(nquad,)"),
            "quadrupole_reference": FieldSpec("A", "(nquad,)"),
            "quadrupole_target": FieldSpec("A", "(nquad,)"),
        },
    )
)

_UID = re.compile(r"^[0-9a-fA-F-]{8,}$")


def fit_optics_job(
    description: MachineDescription,
    hardware: Mapping[str, float],
    reference: Mapping[str, float],
    quadrupoles: Sequence[str],
    orm: Mapping[str, Any],
    sigma: float | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The LOCO fit and its correction (a worker job; returns the ``loco`` result's fields).

    Args:
        description: the machine description.
        hardware: hardware values (A, Hz) of the magnets (and RF) at the measurement.
        reference: hardware values (A) of the quadrupoles whose optics the correction aims at.
        quadrupoles: the quadrupoles the correction may set.
        orm: the ``orm`` result's fields (``matrix``, ``noise``, ``bpm_names``,
            ``corrector_names``, ``valid``).
        sigma: standard error of every ORM element (m/rad); ``None``: the result's ``noise``
            where finite, else unit weights.
        options: ``dipoles``, ``float32``, ``correction_svd_cut``, ``nonlinear`` (``None``:
            the bipolar model ORM when the result has its ``kicks``; ``True``: required;
            ``False``: the linear ORM), and keyword arguments of
            :func:`accplans.physics.fit_loco`.
    """
    opts = dict(options)
    nonlinear = opts.pop("nonlinear", None)
    dipoles = bool(opts.pop("dipoles", True))
    dtype = np.float32 if opts.pop("float32", False) else np.float64
    correction_cut = float(opts.pop("correction_svd_cut", 1e-3))
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    bpm_names = [str(n) for n in orm["bpm_names"]]
    corr_names = [str(n) for n in orm["corrector_names"]]
    matrix = np.asarray(orm["matrix"], float)
    valid = orm.get("valid")
    if valid is not None:
        matrix = np.where(np.asarray(valid, bool), matrix, np.nan)
    weights: np.ndarray | float | None = None if sigma is None else float(sigma)
    noise = orm.get("noise")
    if sigma is None and noise is not None:
        noise = np.asarray(noise, float)
        good = np.isfinite(noise) & (noise > 0)
        if np.any(good):  # the measured noise; elements without one: the median
            weights = np.where(good, noise, np.median(noise[good]))
    kick = _model_kick(orm, len(corr_names), nonlinear)
    params = gradient_parameters(model, per="magnet", dipoles=dipoles)
    lm = LocoModel.from_online(model, bpm_names, corr_names, params)
    fit = run_loco(lm, matrix, sigma=weights, dtype=dtype, kick=kick, **opts)
    ref_model = OnlineModel(description)
    ref_model.set_hardware({**dict(hardware), **dict(reference)})
    names = [str(q) for q in quadrupoles]
    ref_strength = {n: ref_model.nominal_strength(n) for n in names}
    targets = optics_correction(model, lm, fit, svd_cut=correction_cut, reference=ref_strength)
    # the fitted model's optics against the reference optics, at the BPMs
    bpm_el = lm.bpm_elements.astype(np.uint32)
    _, _, fitted = at.linopt6(lm.ring, refpts=bpm_el, dct=lm.dct)
    beta_ref = ref_model.optics(bpm_names).beta
    beat = fitted.beta / beta_ref - 1.0
    settable = np.array([p.name in set(names) for p in lm.parameters])
    return {
        "parameter_names": [p.name for p in lm.parameters],
        "gradients": fit.gradients,
        "gradient_sigma": fit.gradient_sigma
        if fit.gradient_sigma.size
        else np.full(len(params), np.nan),
        "settable": settable,
        "bpm_names": bpm_names,
        "bpm_gain_x": fit.bpm_gain[:, 0],
        "bpm_gain_y": fit.bpm_gain[:, 1],
        "bpm_roll": fit.bpm_roll,
        "corrector_names": corr_names,
        "corrector_gain": fit.corrector_gain,
        "corrector_roll": fit.corrector_roll,
        "model_kick": np.full(len(corr_names), np.nan) if kick is None else kick,
        "chi2": np.asarray(fit.chi2, float),
        "chi2_per_dof": float(fit.chi2_per_dof),
        "residual_rms": float(fit.residual_rms),
        "iterations": int(fit.iterations),
        "converged": bool(fit.converged),
        "singular_values_kept": int(fit.kept),
        "beta_beat_x": beat[:, 0],
        "beta_beat_y": beat[:, 1],
        "beta_beat_rms": np.sqrt(np.mean(beat**2, axis=0)),
        "quadrupole_names": names,
        "quadrupole_start": np.array([float(hardware[n]) for n in names]),
        "quadrupole_reference": np.array([float(reference[n]) for n in names]),
        "quadrupole_target": np.array([targets.get(n, float(hardware[n])) for n in names]),
    }


def _model_kick(orm: Mapping[str, Any], ncorr: int, nonlinear: bool | None) -> np.ndarray | None:
    """The kicks [rad] of the bipolar model ORM, from the ``orm`` result; ``None``: linear."""
    if nonlinear is False:
        return None
    kicks = orm.get("kicks")
    k = None if kicks is None else np.abs(np.asarray(kicks, float)).reshape(-1)
    known = k is not None and k.shape == (ncorr,) and bool(np.all(np.isfinite(k) & (k > 0)))
    if not known:
        if nonlinear:
            raise ValueError("loco_fit: nonlinear=True needs the ORM's kicks (one per column)")
        return None
    return k


def _load(source: Any, kind: str, client: Any) -> MsgGenerator[Any]:
    """``source`` as result fields: a Result, a mapping, or a uid loaded from Tiled."""
    if isinstance(source, str) and _UID.match(source) and not Path(source).exists():
        uid = source

        def load() -> Result:
            if client is not None:
                return load_result(client, uid, kind)
            own = tiled_client_from_env()
            try:
                return load_result(own, uid, kind)
            finally:
                own.context.close()

        source = yield from call_async(lambda: asyncio.to_thread(load))
    if isinstance(source, Result):
        if source.kind != kind:
            raise ValueError(f"expected a {kind!r} result, got {source.kind!r}")
        return {**source.data, "_uid": source.uid}
    if isinstance(source, Mapping):
        return dict(cast(Mapping[str, Any], source))
    raise TypeError(f"give a {kind!r} result (Result, mapping of its fields or run uid)")


def _hardware(snapshot_setpoints: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {n: float(v) for fam in snapshot_setpoints.values() for n, v in fam.items()}


def _fit_plan(
    orm: Any,
    quadrupoles: SettableFamily,
    others: Sequence[SettableFamily],
    reference: Any,
    client: Any,
    sigma: float | None,
    options: dict[str, Any],
    md: dict | None,
    plan_args: dict[str, Any],
) -> MsgGenerator[tuple[str, dict[str, Any]]]:
    """The body of :func:`loco_fit`; returns the run's uid and the result's fields."""
    families = [quadrupoles, *others]
    description = description_of(*families)
    data = yield from _load(orm, "orm", client)
    orm_uid = str(data.pop("_uid", "") or (orm if isinstance(orm, str) else ""))
    snapshot = yield from take_snapshot(description, families)
    hardware = _hardware(snapshot.setpoints)
    quad_names = [str(n) for n in quadrupoles.names]
    if reference is None:
        ref = {n: hardware[n] for n in quad_names}
    elif isinstance(reference, Mapping) and "quadrupole_reference" not in reference:
        ref = {n: float(reference.get(n, hardware[n])) for n in quad_names}
    else:
        stored = yield from _load(reference, "loco", client)
        given = dict(
            zip(
                [str(n) for n in stored["quadrupole_names"]],
                np.asarray(stored["quadrupole_reference"], float),
                strict=True,
            )
        )
        ref = {n: float(given.get(n, hardware[n])) for n in quad_names}
    bpm_names = [str(n) for n in data["bpm_names"]]
    corr_names = [str(n) for n in data["corrector_names"]]
    _md = run_metadata(
        description,
        plan_name="loco_fit",
        plan_args=plan_args,
        units={"fit-chi2": ""},
        num_points=1,
        bpm_names=bpm_names,
        corrector_names=corr_names,
    )
    _md.update(md or {})
    _md["orm_uid"] = orm_uid

    box: dict[str, Any] = {}

    @bpp.run_decorator(md=_md)
    def run() -> MsgGenerator[None]:
        fields = yield from compute(
            fit_optics_job, description, hardware, ref, quad_names, data, sigma, options
        )
        fields["orm_uid"] = orm_uid
        record = Record("fit", {"iteration": 0, "chi2": 0.0}, source="loco_fit")
        for k, chi2 in enumerate(np.asarray(fields["chi2"], float)):
            yield from bps.create("primary")
            yield from bps.read(record.update(iteration=k, chi2=float(chi2)))
            yield from bps.save()
        readable = yield from record_result("loco", **fields)
        box.update(readable.values)

    uid = cast(str, (yield from run()))
    box["_uid"] = uid
    return uid, box


def loco_fit(
    orm: Any,
    quadrupoles: SettableFamily,
    *,
    others: Sequence[SettableFamily] = (),
    reference: Any = None,
    client: Any = None,
    sigma: float | None = None,
    dipoles: bool = True,
    fit_corrector_roll: bool = False,
    svd_cut: float = 1e-4,
    regularization: float = 0.0,
    max_iterations: int = 6,
    correction_svd_cut: float = 1e-3,
    float32: bool = False,
    nonlinear: bool | None = None,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Fit the optics (LOCO) to a measured ORM, in the worker process; nothing moves.

    The model is the online model at the present hardware setpoints of ``quadrupoles`` and
    ``others`` (give every family whose setting matters: sextupoles and correctors for the
    orbit, the RF for the path length; the machine must be as it was during the
    measurement). Fitted: one gradient per quadrupole device and per gradient dipole
    (``dipoles``), BPM gains (x, y) and rolls, corrector gains (their mean held at 1: only
    relative gains are measurable without an RF column), corrector rolls with
    ``fit_corrector_roll`` (:func:`accplans.model.run_loco`, analytic Jacobian,
    Levenberg-Marquardt with an SVD cut and regularization).

    The correction (:func:`accplans.model.optics_correction`): the quadrupole currents that
    cancel the fitted errors, aimed at the ``reference`` optics (by default the present
    setpoints). After a first correction the present setpoints already hold minus the
    errors: give the first fit (or the setpoints before it) as ``reference`` so that a second
    fit corrects what is left instead of the errors again (:func:`loco` does).

    Args:
        orm: the measured ORM: an ``orm`` result, its fields, or its run uid (loaded from
            ``client``, by default ``$TILED_URI``).
        quadrupoles: the quadrupole family (its setpoints enter the model; the correction
            sets them).
        others: more families whose setpoints enter the model (read only).
        reference: the quadrupole currents (A) the correction aims at: ``None`` (the present
            setpoints), ``{name: A}``, or a ``loco`` result (its ``quadrupole_reference``).
        client: the Tiled container the uids are loaded from.
        sigma: standard error of every ORM element (m/rad); default the result's ``noise``
            (``measure_orm(bpm_noise=...)``), else unit weights (chi2 then has no scale).
        dipoles: also fit the gradient dipoles' gradients (their share is compensated by the
            quadrupoles).
        fit_corrector_roll: also fit corrector rolls.
        svd_cut: relative singular value below which gradient directions are dropped.
        regularization: Tikhonov parameter of the scaled problem (0: none).
        max_iterations: model evaluations allowed to the Levenberg-Marquardt fit.
        correction_svd_cut: SVD cut of the compensation of non-settable fitted errors.
        float32: hold the Jacobian in float32 (half the memory).
        nonlinear: compare the measurement with the model ORM a bipolar measurement at the
            ORM's kicks sees (closed orbits at +-kick in the model, so the orbit's cubic
            non-linearity is not absorbed by the BPM gains); ``None`` (default): when the ORM
            result has its ``kicks``; ``False``: the linear ORM.
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``primary`` event per accepted iteration (chi2) and the result
        ``loco`` (``load_result(client, uid, "loco")``: fitted gradients in 1/m^2, BPM gains
        and rolls in rad, corrector gains and rolls, chi2, the predicted beta-beating and the
        quadrupole currents of the correction in A).
    """
    options = _fit_options(
        dipoles,
        fit_corrector_roll,
        svd_cut,
        regularization,
        max_iterations,
        correction_svd_cut,
        float32,
        nonlinear,
    )
    plan_args = {
        "orm": orm if isinstance(orm, str) else "<result>",
        "quadrupoles": quadrupoles.name,
        "others": [f.name for f in others],
        "reference": reference if reference is None or isinstance(reference, str) else "<given>",
        "sigma": sigma,
        **{k: v for k, v in options.items()},
    }

    def plan() -> MsgGenerator[str]:
        uid, _ = yield from _fit_plan(
            orm, quadrupoles, others, reference, client, sigma, options, md, plan_args
        )
        return uid

    return (yield from plan())


def _fit_options(
    dipoles: bool,
    fit_corrector_roll: bool,
    svd_cut: float,
    regularization: float,
    max_iterations: int,
    correction_svd_cut: float,
    float32: bool,
    nonlinear: bool | None = None,
) -> dict[str, Any]:
    if not 0 <= svd_cut < 1 or not 0 <= correction_svd_cut < 1:
        raise ValueError("loco_fit: svd_cut and correction_svd_cut must be in [0, 1)")
    if regularization < 0 or max_iterations < 1:
        raise ValueError("loco_fit: regularization >= 0 and max_iterations >= 1")
    return {
        "dipoles": bool(dipoles),
        "fit_corrector_roll": bool(fit_corrector_roll),
        "svd_cut": float(svd_cut),
        "regularization": float(regularization),
        "max_iterations": int(max_iterations),
        "correction_svd_cut": float(correction_svd_cut),
        "float32": bool(float32),
        "nonlinear": None if nonlinear is None else bool(nonlinear),
    }


def correct_optics(
    fit: Any,
    quadrupoles: SettableFamily,
    *,
    gain: float = 1.0,
    steps: int = 1,
    tolerance: float = 1e-6,
    client: Any = None,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Set the quadrupoles to a ``loco`` result's correction (:func:`loco_fit`).

    Each quadrupole of the result goes from its present setpoint ``I`` to
    ``I + gain * (quadrupole_target - quadrupole_start)`` in ``steps`` equal steps, each
    ``checkpoint -> set -> wait for the readbacks -> read`` (one ``primary`` event with the
    setpoints and readbacks, A). The fit is refused if the quadrupoles moved since it
    (setpoints more than ``tolerance`` A from ``quadrupole_start``): refit first. Every target
    is checked against the limits before anything moves.

    A correction plan: it changes the quadrupoles of the result; it keeps them on success and
    the last completed step on a user stop, and restores the starting setpoints on failure
    and abort.

    Args:
        fit: the ``loco`` result, its fields, or its run uid (loaded from ``client``, by
            default ``$TILED_URI``).
        quadrupoles: the quadrupole family.
        gain: fraction of the correction applied, in ``(0, 1]``.
        steps: number of equal steps (>= 1).
        tolerance: largest difference (A) between a present setpoint and the fit's.
        client: the Tiled container a uid is loaded from.
        md: metadata added to the run's start document.

    Returns:
        The uid of the run (one ``primary`` event per step).
    """
    description = description_of(quadrupoles)
    if not (np.isfinite(gain) and 0 < gain <= 1):
        raise ValueError(f"correct_optics: gain must be in (0, 1], got {gain!r}")
    if steps < 1:
        raise ValueError(f"correct_optics: steps must be >= 1, got {steps!r}")
    family_names = [str(n) for n in quadrupoles.names]
    nq = len(family_names)

    def plan() -> MsgGenerator[str]:
        data = yield from _load(fit, "loco", client)
        names = [str(n) for n in data["quadrupole_names"]]
        unknown = [n for n in names if n not in family_names]
        if unknown:
            raise ValueError(f"correct_optics: {unknown[:5]} are not in {quadrupoles.name}")
        idx = np.array([family_names.index(n) for n in names], dtype=np.int64)
        start_fit = np.asarray(data["quadrupole_start"], float)
        change = np.asarray(data["quadrupole_target"], float) - start_fit
        if not np.all(np.isfinite(change)):
            raise ValueError("correct_optics: the result's correction is not finite")
        snapshot = yield from take_snapshot(description, [quadrupoles])
        now = np.array([snapshot.setpoints[quadrupoles.name][n] for n in family_names])
        moved = np.abs(now[idx] - start_fit) > tolerance
        if np.any(moved):
            which = [names[k] for k in np.flatnonzero(moved)[:5]]
            raise ValueError(
                f"correct_optics: {which} moved since the fit (more than {tolerance:g} A from "
                "its quadrupole_start): refit; refused before any move"
            )
        final = now.copy()
        final[idx] += gain * change
        check_hardware_limits(description, family_names, final)
        _md = run_metadata(
            description,
            plan_name="correct_optics",
            plan_args={
                "fit": fit if isinstance(fit, str) else str(data.get("_uid", "<result>")),
                "quadrupoles": quadrupoles.name,
                "gain": gain,
                "steps": steps,
                "tolerance": tolerance,
            },
            units={"step-fraction": "", "quadrupoles-setpoints": "A", "quadrupoles-readbacks": "A"},
            num_points=steps,
        )
        _md.update(md or {})
        step = Record("step", {"step": 0, "fraction": 0.0}, source="correct_optics")
        values = Record(
            "quadrupoles",
            {"setpoints": np.zeros(nq), "readbacks": np.zeros(nq)},
            {"setpoints": "A", "readbacks": "A"},
            source=quadrupoles.name,
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            for k in range(1, steps + 1):
                yield from bps.checkpoint()
                target = now + (final - now) * (k / steps)
                readbacks, _ = yield from set_and_settle(quadrupoles, target)
                yield from bps.create("primary")
                yield from bps.read(step.update(step=k, fraction=k / steps))
                yield from bps.read(values.update(setpoints=target, readbacks=readbacks))
                yield from bps.save()

        return cast(
            str,
            (
                yield from restore_on_exit(
                    run(), [quadrupoles], snapshot, policy="correction", owner="correct_optics"
                )
            ),
        )

    return (yield from plan())


def _capture(plan: MsgGenerator[Any], kind: str, box: dict[str, Any]) -> MsgGenerator[Any]:
    """``plan``, keeping the fields of the ``kind`` result it records in ``box``."""

    def grab(msg: Msg) -> Msg:
        obj = msg.obj
        if msg.command == "read" and isinstance(obj, ResultReadable) and obj.kind == kind:
            box.update(obj.values)
        return msg

    return (yield from bpp.msg_mutator(plan, grab))


def _average(measured: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of repeated ``orm`` results (same rows and columns); uid of the last one."""
    if len(measured) == 1:
        return measured[0]
    out = dict(measured[-1])
    n = len(measured)
    out["matrix"] = np.mean([np.asarray(m["matrix"], float) for m in measured], axis=0)
    out["noise"] = np.asarray(out["noise"], float) / np.sqrt(n)
    out["valid"] = np.logical_and.reduce([np.asarray(m["valid"], bool) for m in measured])
    return out


def loco(
    bpms: OrbitSource,
    hcorr: SettableFamily,
    vcorr: SettableFamily,
    quadrupoles: SettableFamily,
    *,
    others: Sequence[SettableFamily] = (),
    select: Any = None,
    bpm_select: Any = None,
    kick: float = 100e-6,
    bpm_noise: float | None = None,
    n_frames: int = 1,
    repeats: int = 1,
    cycles: int = 3,
    tolerance: float = 1e-3,
    gain: float = 1.0,
    dipoles: bool = True,
    fit_corrector_roll: bool = False,
    svd_cut: float = 1e-4,
    regularization: float = 0.0,
    max_iterations: int = 6,
    float32: bool = False,
    nonlinear: bool | None = None,
    settle: float = 0.0,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[list[str]]:
    """LOCO cycles: measure the ORM, fit, correct the quadrupoles; up to ``cycles`` times.

    Each cycle runs :func:`~accplans.plans.measure_orm` ``repeats`` times (bipolar ``kick``
    of the selected correctors of ``hcorr`` and ``vcorr``; the matrices averaged),
    :func:`loco_fit` (the model at the present
    setpoints of ``quadrupoles``, ``hcorr``, ``vcorr`` and ``others``; every fit aims at the
    optics of the quadrupole setpoints the plan started from) and, unless the fit's predicted
    rms beta-beating is at most ``tolerance`` in both planes (converged: the plan stops),
    :func:`correct_optics`. Each is its own run.

    A correction plan: it changes the quadrupoles (the correctors and RF only during each
    measurement, restored by it). It keeps the corrected quadrupoles on success and on a
    user stop, and restores the quadrupoles it started from on failure and abort.

    Args:
        bpms: the BPM family (an orbit source).
        hcorr: the horizontal correctors.
        vcorr: the vertical correctors.
        quadrupoles: the quadrupole family (fitted and corrected).
        others: more families whose setpoints enter the model (sextupoles, RF).
        select: correctors kicked (names, indices or a mask over hcorr then vcorr).
        bpm_select: BPM rows kept.
        kick: the kick amplitude (rad).
        bpm_noise: standard deviation of one BPM reading (m), for the fit's weights.
        n_frames: BPM frames averaged per step of each ORM measurement (the noise falls as
            their square root; the measuring time grows by one model tick per frame).
        repeats: ORM measurements per cycle, averaged (the noise falls as their square
            root; each is its own ``measure_orm`` run).
        cycles: largest number of measure-fit-correct cycles (>= 1).
        tolerance: converged when the fitted rms beta-beating is at most this (both planes).
        gain: fraction of each correction applied, in ``(0, 1]``.
        dipoles: also fit the gradient dipoles (their share compensated by quadrupoles).
        fit_corrector_roll: also fit corrector rolls.
        svd_cut: relative singular value cut of the gradient fit.
        regularization: Tikhonov parameter of the gradient fit.
        max_iterations: model evaluations allowed to each fit.
        float32: hold the Jacobian in float32.
        nonlinear: fit with the model ORM at the measurement's bipolar kicks (``None``:
            on, the ORM results carry their kicks; :func:`loco_fit`).
        settle: extra wait after the readbacks settled before a frame counts (s).
        timeout: longest wait for one fresh frame (s).
        md: metadata added to every run's start document.

    Returns:
        The uids of the runs, in order (``repeats`` x ``measure_orm``, ``loco_fit``,
        ``correct_optics``, ``measure_orm``, ...); the last ``loco`` result holds the final
        calibrations (its ``orm_uid`` is the last ORM of its cycle).
    """
    description = description_of(bpms, hcorr, vcorr, quadrupoles, *others)
    if cycles < 1 or repeats < 1:
        raise ValueError(f"loco: cycles and repeats must be >= 1, got {cycles!r}, {repeats!r}")
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"loco: tolerance must be > 0, got {tolerance!r}")
    if not (np.isfinite(gain) and 0 < gain <= 1):
        raise ValueError(f"loco: gain must be in (0, 1], got {gain!r}")
    options = _fit_options(
        dipoles,
        fit_corrector_roll,
        svd_cut,
        regularization,
        max_iterations,
        1e-3,
        float32,
        nonlinear,
    )
    model_families = [quadrupoles, hcorr, vcorr, *others]

    def body(reference: dict[str, float], uids: list[str]) -> MsgGenerator[None]:
        for cycle in range(1, cycles + 1):
            measured: list[dict[str, Any]] = []
            for _ in range(repeats):
                orm: dict[str, Any] = {}
                orm_uid = yield from _capture(
                    measure_orm(
                        bpms,
                        [hcorr, vcorr],
                        select=select,
                        bpm_select=bpm_select,
                        kick=kick,
                        settle=settle,
                        timeout=timeout,
                        bpm_noise=bpm_noise,
                        n_frames=n_frames,
                        md={**(md or {}), "loco_cycle": cycle},
                    ),
                    "orm",
                    orm,
                )
                uids.append(orm_uid)
                orm["_uid"] = orm_uid
                measured.append(orm)
            orm = _average(measured)
            fit_uid, fitted = yield from _fit_plan(
                orm,
                quadrupoles,
                model_families[1:],
                reference,
                None,
                None,
                options,
                {**(md or {}), "loco_cycle": cycle},
                {
                    "orm": [str(m["_uid"]) for m in measured],
                    "quadrupoles": quadrupoles.name,
                    "cycle": cycle,
                    **options,
                },
            )
            uids.append(fit_uid)
            if float(np.max(fitted["beta_beat_rms"])) <= tolerance:
                return
            uids.append(
                (
                    yield from correct_optics(
                        fitted, quadrupoles, gain=gain, md={**(md or {}), "loco_cycle": cycle}
                    )
                )
            )

    def plan() -> MsgGenerator[list[str]]:
        snapshot = yield from take_snapshot(description, [quadrupoles])
        reference = dict(snapshot.setpoints[quadrupoles.name])
        uids: list[str] = []
        yield from restore_on_exit(
            body(reference, uids),
            [quadrupoles],
            snapshot,
            policy="correction",
            claim_mode=None,
            owner="loco",
        )
        return uids

    return (yield from plan())
