"""``measure_tbt``: kick the beam with the pinger, record turn-by-turn buffers, analyse optics."""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator
from ophyd_async.core import wait_for_value

from accplans.config import MachineDescription
from accplans.data import FieldSpec, ResultSchema, record_result, register_result_kind, run_metadata
from accplans.devices import Pinger, TbtBuffers, TbtData, call_async
from accplans.model import OnlineModel, PhaseFit, fit_coupled_phase_model, fit_phase_model
from accplans.physics import TbtOptics, analyze_tbt, beta_beating

from ._record import Record
from ._stubs import BeamLost
from ._worker import compute

__all__ = [
    "fire_shot",
    "fit_fields",
    "fit_tbt_beta",
    "measure_tbt",
    "model_tbt_reference",
    "tbt_result",
]

register_result_kind(
    ResultSchema(
        kind="tbt",
        version=2,
        description=(
            "Turn-by-turn optics of pinger shots: tunes (NAFF), per BPM the tune, phase, "
            "phase advance from the first BPM, oscillation amplitude, beta from phase (3-BPM, "
            "or a model fitted to the phases: beta_method) and the 3-BPM spread, the model "
            "beta and the beta-beating, and the BPMs flagged bad (SVD); the kicks, turns and "
            "shots."
        ),
        fields={
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "tunes": FieldSpec("", "(k,)"),
            "model_tunes": FieldSpec("", "(k,)"),
            "kick": FieldSpec("rad", "(k,)"),
            "turns": FieldSpec("", "()", "int"),
            "shots": FieldSpec("", "()", "int"),
            "bad": FieldSpec("", "(nbpm,)", "bool"),
            "bad_reasons": FieldSpec("", "(nbpm,)", "str"),
            "beating_rms_x": FieldSpec("", "()"),
            "beating_rms_y": FieldSpec("", "()"),
            "beta_method": FieldSpec("", "()", "str"),
            "beta_3bpm_x": FieldSpec("m", "(nbpm,)", optional=True),
            "beta_3bpm_y": FieldSpec("m", "(nbpm,)", optional=True),
            "fit_residual_rms": FieldSpec("rad", "()", optional=True),
            "fit_coupling_residual_rms": FieldSpec("", "()", optional=True),
            **{
                f"{name}_{plane}": FieldSpec(unit, "(nbpm,)")
                for plane in ("x", "y")
                for name, unit in (
                    ("bpm_tune", ""),
                    ("phase", "rad"),
                    ("phase_advance", "rad"),
                    ("amplitude", "m"),
                    ("beta", "m"),
                    ("beta_error", "m"),
                    ("model_beta", "m"),
                    ("beta_beating", ""),
                )
            },
        },
    )
)

#: Data keys of the raw buffers, and their units.
_UNITS = {"shot-x": "m", "shot-y": "m", "shot-time": "s"}


def model_tbt_reference(
    description: MachineDescription, bpm_names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The design model's phase (rad) and beta (m) at the BPMs, (2, n) each, and total tunes.

    A worker job (builds an :class:`~accplans.model.OnlineModel`).
    """
    model = OnlineModel(description)
    end = len(model.lattice)
    optics = model.optics([*(description.device(n).elements[0] for n in bpm_names), end])
    mu = np.asarray(optics.mu, dtype=float)
    beta = np.asarray(optics.beta, dtype=float)
    return mu[:-1].T.copy(), beta[:-1].T.copy(), mu[-1] / (2 * np.pi)


def measure_tbt(
    bpms: TbtBuffers,
    pinger: Pinger,
    *,
    amplitude_x: float,
    amplitude_y: float,
    turns: int = 1024,
    shots: int = 1,
    model: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    threshold: float = 6.0,
    timeout: float = 60.0,
    md: dict | None = None,
    beta_method: str = "3bpm",
) -> MsgGenerator[str]:
    """Kick the beam with the pinger and measure the optics from turn-by-turn BPM buffers.

    For each of ``shots`` shots: set the kicks and buffer length, fire, wait for buffers newer
    than the shot (on the buffers' counter), record them. The analysis
    (:func:`accplans.physics.analyze_tbt`, in a worker process) flags bad BPMs by SVD, takes
    the tunes by NAFF, the phases at the tunes, beta from phase (3-BPM) and the beta-beating
    against the model (the design optics by default).

    Measure on a corrected orbit (``correct_orbit`` first) and with ``beta_method="fit"`` for
    beta within 1 %: on the EBS twin so, the fitted beta is within 0.6-0.7 % rms of the truth,
    the 3-BPM beta off by 2.3-2.8 % (x) and 1.0-1.2 % (y) (``docs/how-to/turn-by-turn.md``,
    Accuracy).

    Each kick dumps no beam on the twin as long as the oscillation stays inside the aperture;
    the pinger refuses kicks beyond its ``KICK_MAX``, and so does this plan, before it moves
    anything. A measurement plan: it changes the pinger's kicks and the buffer length and
    restores them however it ends (the kicks themselves are single shots).

    Args:
        bpms: the TbT buffers of a BPM family.
        pinger: the pinger.
        amplitude_x: horizontal kick (rad).
        amplitude_y: vertical kick (rad).
        turns: buffer length (turns).
        shots: number of shots (phases averaged over them).
        model: ``(phase (2, n) rad, beta (2, n) m, total tunes (2,))`` at the BPMs; default:
            the design model (:func:`model_tbt_reference`).
        threshold: outlier threshold of the bad-BPM detection (robust standard deviations).
        timeout: longest wait for the buffers of one shot (s).
        md: metadata added to the run's start document.
        beta_method: ``"3bpm"`` (beta from the phases of neighbouring BPMs and the model's
            transport between them) or ``"fit"`` (the design model's quadrupole gradients and
            the sextupoles' orbit gradients fitted to the measured phases,
            :func:`accplans.model.fit_phase_model`, in the worker; ``beta_*`` is the fitted
            model's beta, ``beta_3bpm_*`` the 3-BPM one; tens of seconds on EBS) or
            ``"coupled"`` (the fit with a skew gradient per sextupole element as well,
            determined by the coupling ratios of the lines,
            :func:`accplans.model.fit_coupled_phase_model`: for a coupled machine, e.g. an
            uncorrected vertical orbit in the sextupoles; minutes on EBS).

    Returns:
        The uid of the run: a ``primary`` event per shot (``shot-x``, ``shot-y``: (n_bpm,
        turns) in m, ``shot-counter``, ``shot-time``) and the result ``result_tbt``
        (``load_result(client, uid, "tbt")``).
    """
    for label, kick in (("amplitude_x", amplitude_x), ("amplitude_y", amplitude_y)):
        if not np.isfinite(kick):
            raise ValueError(f"measure_tbt: {label} must be finite, got {kick!r}")
    if amplitude_x == 0 and amplitude_y == 0:
        raise ValueError("measure_tbt: at least one of amplitude_x, amplitude_y must be non-zero")
    if beta_method not in ("3bpm", "fit", "coupled"):
        raise ValueError(
            f"measure_tbt: beta_method must be '3bpm', 'fit' or 'coupled', got {beta_method!r}"
        )
    if turns < 16 or shots < 1:
        raise ValueError(f"measure_tbt: need turns >= 16 and shots >= 1, got {turns}, {shots}")
    names = list(bpms.bpm_names)
    n = len(names)
    description = _description(bpms)
    _md = run_metadata(
        description,
        plan_name="measure_tbt",
        plan_args={
            "bpms": bpms.name,
            "pinger": pinger.name,
            "amplitude_x": amplitude_x,
            "amplitude_y": amplitude_y,
            "turns": turns,
            "shots": shots,
            "threshold": threshold,
            "beta_method": beta_method,
        },
        units=_UNITS,
        num_points=shots,
        bpm_names=names,
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        kick_max = yield from call_async(pinger.kick_max.get_value)
        for label, kick in (("amplitude_x", amplitude_x), ("amplitude_y", amplitude_y)):
            if abs(kick) * 1e6 > kick_max:
                raise ValueError(
                    f"measure_tbt: {label} {kick * 1e6:.3g} urad exceeds the pinger's limit "
                    f"{kick_max:.3g} urad"
                )
        start = {}
        for sig in (pinger.kick_x, pinger.kick_y, bpms.turns):
            start[sig] = yield from call_async(sig.get_value)
        reference = model
        if reference is None:
            reference = yield from compute(model_tbt_reference, description, names)
        record = Record(
            "shot",
            {"x": np.zeros((n, turns)), "y": np.zeros((n, turns)), "counter": 0, "time": 0.0},
            {"x": "m", "y": "m", "time": "s"},
            source=bpms.name,
        )

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
            xs, ys = [], []
            for _ in range(shots):
                yield from bps.checkpoint()
                data = yield from fire_shot(bpms, pinger, turns, timeout)
                xs.append(data.x)
                ys.append(data.y)
                yield from bps.create("primary")
                yield from bps.read(
                    record.update(x=data.x, y=data.y, counter=data.counter, time=data.time)
                )
                yield from bps.save()
            assert reference is not None
            mu, beta, tunes = reference
            optics = yield from compute(
                _analyze, np.array(xs), np.array(ys), mu, beta, tunes, threshold
            )
            kicks = (amplitude_x, amplitude_y, turns, shots)
            fields = tbt_result(optics, names, beta, tunes, kicks)
            if beta_method != "3bpm":
                coupling = optics.coupling if beta_method == "coupled" else None
                fit = yield from compute(
                    fit_tbt_beta,
                    description,
                    names,
                    optics.phases,
                    optics.amplitudes,
                    ~optics.bad,
                    None,
                    coupling,
                )
                fields.update(fit_fields(fit, beta, optics))
            yield from record_result("tbt", **fields)

        def restore() -> MsgGenerator[None]:
            yield from bps.mv(
                pinger.kick_x,
                start[pinger.kick_x],
                pinger.kick_y,
                start[pinger.kick_y],
                bpms.turns,
                start[bpms.turns],
            )

        return (yield from bpp.finalize_wrapper(run(), restore()))

    return (yield from plan())


def fire_shot(
    bpms: TbtBuffers, pinger: Pinger, turns: int, timeout: float
) -> MsgGenerator[TbtData]:
    """Fire the pinger once and return the buffers newer than the shot (a plan stub).

    Put a checkpoint before it: the step is (wait until the pinger is ready) -> fire -> wait
    for the buffers' counter -> read.

    Raises:
        BeamLost: every buffer reads 0 (no beam).
        TimeoutError: the pinger still busy, or no new buffers, after ``timeout`` s.
        RuntimeError: the buffers do not hold ``turns`` turns of every BPM.
    """
    # a pinger still acquiring the last shot refuses to fire (a real one also recharges)
    yield from call_async(wait_for_value, pinger.busy, 0, timeout)
    counter = yield from call_async(bpms.counter.get_value)
    yield from bps.mv(pinger.fire, 1)
    data = yield from call_async(bpms.wait_for_buffers, counter, timeout)
    if data.x.shape != (bpms.n_bpm, turns):
        raise RuntimeError(
            f"{bpms.name}: buffers of shape {data.x.shape}, asked for {bpms.n_bpm} x {turns}"
        )
    if not (np.any(data.x) or np.any(data.y)):
        raise BeamLost(f"beam lost: every turn-by-turn buffer of {bpms.name} reads 0")
    return data


def tbt_result(
    optics: TbtOptics,
    names: list[str],
    model_beta: np.ndarray,
    model_tunes: np.ndarray,
    reference: tuple[float, float, int, int],
) -> dict[str, Any]:
    """The fields of the ``tbt`` result of an analysis."""
    kick_x, kick_y, turns, shots = reference
    n = len(names)
    reasons = [
        "; ".join(
            f"{plane}: {', '.join(optics.bad_reasons[plane][i])}"
            for plane in ("x", "y")
            if i in optics.bad_reasons[plane]
        )
        for i in range(n)
    ]
    out: dict[str, Any] = {
        "bpm_names": names,
        "tunes": optics.tunes,
        "model_tunes": np.asarray(model_tunes, dtype=float),
        "kick": np.array([kick_x, kick_y]),
        "turns": int(turns),
        "shots": int(shots),
        "bad": optics.bad,
        "bad_reasons": reasons,
        "beating_rms_x": float(optics.beating_rms[0]),
        "beating_rms_y": float(optics.beating_rms[1]),
        "beta_method": "3bpm",
    }
    for p, plane in enumerate(("x", "y")):
        out[f"bpm_tune_{plane}"] = optics.bpm_tunes[p]
        out[f"phase_{plane}"] = optics.phases[p]
        out[f"phase_advance_{plane}"] = optics.phase_advance[p]
        out[f"amplitude_{plane}"] = optics.amplitudes[p]
        out[f"beta_{plane}"] = optics.beta[p]
        out[f"beta_error_{plane}"] = optics.beta_error[p]
        out[f"model_beta_{plane}"] = np.asarray(model_beta[p], dtype=float)
        out[f"beta_beating_{plane}"] = optics.beta_beating[p]
    return out


def fit_tbt_beta(
    description: MachineDescription,
    bpm_names: list[str],
    phases: np.ndarray,
    amplitudes: np.ndarray,
    good: np.ndarray,
    hardware: dict[str, float] | None = None,
    coupling: np.ndarray | None = None,
) -> PhaseFit:
    """The model fitted to measured phases (a worker job; the design model by default).

    Each phase is weighted by its BPM's oscillation amplitude (its noise is the BPM noise over
    the amplitude). With ``coupling`` ((2, n) complex coupling ratios), the coupled fit
    (:func:`~accplans.model.fit_coupled_phase_model`).
    """
    model = OnlineModel(description)
    if hardware:
        model.set_hardware(hardware)
    sigma = 1.0 / np.where(amplitudes > 0, amplitudes, np.nan)
    if coupling is not None:
        return fit_coupled_phase_model(model, phases, coupling, sigma, good, bpms=bpm_names)
    return fit_phase_model(model, phases, sigma, good, bpms=bpm_names)


def fit_fields(fit: PhaseFit, model_beta: np.ndarray, optics: TbtOptics) -> dict[str, Any]:
    """The ``tbt`` fields of a fitted beta (beta, beating from the fit; 3-BPM kept aside)."""
    out: dict[str, Any] = {
        "beta_method": "coupled" if fit.skew_parameters else "fit",
        "fit_residual_rms": float(fit.residual_rms[-1]),
    }
    if fit.skew_parameters:
        out["fit_coupling_residual_rms"] = float(fit.coupling_residual_rms[-1])
    good = ~optics.bad
    for p, plane in enumerate(("x", "y")):
        beta = np.where(good, fit.beta[p], np.nan)
        beat, rms = beta_beating(beta, model_beta[p])
        out[f"beta_3bpm_{plane}"] = optics.beta[p]
        out[f"beta_{plane}"] = beta
        out[f"beta_beating_{plane}"] = beat
        out[f"beating_rms_{plane}"] = rms
    return out


def _analyze(
    x: np.ndarray,
    y: np.ndarray,
    mu: np.ndarray,
    beta: np.ndarray,
    tunes: np.ndarray,
    threshold: float,
) -> TbtOptics:
    """:func:`~accplans.physics.analyze_tbt` with positional arguments (a worker job)."""
    return analyze_tbt(
        x, y, model_phase=mu, model_beta=beta, model_tunes=tunes, threshold=threshold
    )


def _description(bpms: TbtBuffers) -> MachineDescription:
    description = getattr(bpms, "description", None)
    if not isinstance(description, MachineDescription):
        raise ValueError(
            f"measure_tbt: {bpms.name} has no machine description (build it with "
            "TbtBuffers.for_family)"
        )
    return description
