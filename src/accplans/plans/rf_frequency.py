"""``correct_rf_frequency``: the RF frequency that centres the beam energy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import run_metadata
from accplans.devices import OrbitSource, SettableFamily, call_async, resolve_select
from accplans.model import OnlineModel
from accplans.physics import solve_correction

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frame, set_and_settle
from ._worker import compute
from .orbit_correction import DEFAULT_RELATIVE_ALPHA  # the same default as correct_orbit

__all__ = ["RfFitResponse", "correct_rf_frequency", "rf_fit_response", "rf_frequency_step"]


class RfFitResponse(NamedTuple):
    """The model responses :func:`rf_frequency_step` fits the orbit with.

    Attributes:
        matrix: (nbpm, ncorr) horizontal orbit response at fixed beam energy (m/rad).
        rf_column: (nbpm,) horizontal orbit response to the RF frequency (m/Hz): the
            dispersion times ``-1 / (f alpha_c)``.
        largest_singular_value: of ``matrix`` (m/rad).
        alpha_c: momentum compaction factor of the model.
        rf_frequency: RF frequency of the model (Hz).
    """

    matrix: np.ndarray
    rf_column: np.ndarray
    largest_singular_value: float
    alpha_c: float
    rf_frequency: float


def rf_fit_response(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpm_names: Sequence[str],
    corrector_names: Sequence[str],
) -> RfFitResponse:
    """The model's horizontal ORM at fixed beam energy and its RF column (a worker job).

    The online model's ORM is at a fixed RF frequency: a kick ``theta`` at a place of
    dispersion ``D_k`` lengthens the orbit by ``D_k theta``, so at a fixed orbit length the
    energy moves by ``-D_k theta / (alpha_c C)`` and the orbit by that times the dispersion.
    Adding that term back, ``R_E = R_f + D_bpm D_k^T / (alpha_c C)``, gives the response at
    fixed energy (``D_k`` averaged over the corrector's element; within 1e-6 of pyAT's
    ``find_orbit4(dp=0)`` differences on EBS).
    """
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    response = model.orm(list(bpm_names), list(corrector_names), rf=True)
    assert response.rf_column is not None
    n = len(bpm_names)
    elements = np.array([description.device(c).elements[0] for c in corrector_names], np.int64)
    if elements.size:
        d = np.asarray(model.optics(np.concatenate([elements, elements + 1])).dispersion)[:, 0]
        d_kick = 0.5 * (d[: elements.size] + d[elements.size :])
    else:
        d_kick = np.zeros(0)
    d_bpm = model.dispersion(list(bpm_names))[:n]
    alpha_c = float(model.alpha_c)
    matrix = response.matrix[:n] + np.outer(d_bpm, d_kick) / (
        alpha_c * float(model.lattice.circumference)
    )
    largest = float(np.linalg.norm(matrix, 2)) if matrix.size else 0.0
    return RfFitResponse(matrix, response.rf_column[:n], largest, alpha_c, model.rf_frequency)


def rf_frequency_step(
    matrix: np.ndarray, rf_column: np.ndarray, orbit_x: np.ndarray, alpha: float
) -> float:
    """RF step (Hz) that removes the energy offset seen in ``orbit_x`` (m) (a worker job).

    Fits ``orbit_x = R_E dtheta + rf_column c`` (Tikhonov, ``alpha`` in m/rad), ``R_E`` the
    response at fixed energy (:func:`rf_fit_response`): the RF term is then the dispersive
    orbit of the beam's energy offset ``delta = c / (-f alpha_c)``, and the returned step
    ``-c`` brings ``delta`` to 0 (the correctors keep their strengths). The kicks absorb the
    rest of the orbit.
    """
    ok = np.isfinite(orbit_x)
    weights = ok.astype(float)
    result = solve_correction(
        matrix,
        np.nan_to_num(orbit_x),
        method="tikhonov",
        alpha=alpha,
        bpm_weights=weights,
        rf_column=rf_column,
    )
    return float(result.df_hz)


def correct_rf_frequency(
    bpms: OrbitSource,
    hcorr: SettableFamily,
    rf: SettableFamily,
    *,
    alpha: float | None = None,
    bpm_select: Any = None,
    iterations: int = 3,
    tolerance_hz: float = 0.1,
    max_step_hz: float | None = None,
    gain: float = 1.0,
    n_samples: int = 5,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Set the RF frequency that centres the beam energy (zero energy offset).

    The beam's energy offset ``delta`` shows in the horizontal orbit as ``D delta`` (``D`` the
    dispersion). The orbit, averaged over ``n_samples`` fresh frames, is fitted by the online
    model's horizontal orbit response at fixed energy plus the dispersive orbit of an RF step
    (Tikhonov): the kicks absorb the orbit the magnets and errors make, the RF term the
    energy offset. The RF frequency is stepped by ``f alpha_c delta``, which brings the
    energy offset to 0 with the correctors unchanged; repeated until a step is below
    ``tolerance_hz``. The correctors do not move (``hcorr`` gives the model its setpoints).

    This is not ``h c / (C + dL)``, the frequency whose orbit length is the true
    circumference ``C + dL``: a closed orbit with kicks ``theta_k`` (correctors and errors)
    where the dispersion is ``D_k`` is ``sum D_k theta_k`` longer than the circumference at
    zero energy offset, so the centred frequency is ``h c / (C + dL + sum D_k theta_k)``.
    On EBS after an orbit correction the two differ by 2 to 5 Hz with the benchmark's errors;
    a fit at fixed RF frequency aims at the latter (and lands 20-28 Hz from the energy-centred
    frequency on an uncorrected orbit, from the path length of the kicks it fits).

    Correct the orbit first. The part of the error orbit along the dispersion that the
    correctors cannot make (mostly from misaligned quadrupoles) looks like an energy offset
    to the BPMs: on the EBS twin the result is 0.5-3 Hz from the energy-centred frequency
    after an orbit correction, 1.2-3.3 Hz without one, and no estimator from the BPM
    readings can do better than 1.4 Hz rms there (``benchmarks/rf_energy_limit.py``,
    docs/how-to/correct-rf-frequency.md). A change of the circumference is followed to
    0.1 Hz.

    A correction plan: on success it keeps the new frequency, on ``RE.stop()`` the last
    completed step; on a failure or an abort it restores the RF frequency. Every step is
    checked against the RF limits (and ``max_step_hz``) before it is set.

    Args:
        bpms: the BPM family (an orbit source).
        hcorr: the horizontal correctors (read, not moved: the model's setpoints).
        rf: the RF device (Hz).
        alpha: Tikhonov parameter of the fit (m/rad); by default ``DEFAULT_RELATIVE_ALPHA``
            (1e-3) times the largest singular value of the response at fixed energy.
        bpm_select: BPMs used (names, indices or a mask); all by default.
        iterations: most RF steps.
        tolerance_hz: stop when the next step is smaller (Hz).
        max_step_hz: refuse a single step larger than this (Hz); by default a quarter of the
            RF limits' width.
        gain: fraction of each computed step applied.
        n_samples: orbit frames averaged per measurement.
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``baseline`` event (starting orbit) and one ``primary`` event
        per step (the step and the frequency in Hz, the energy offset it removed, the
        horizontal orbit in m).
    """
    description = description_of(bpms, hcorr, rf)
    if iterations < 1 or n_samples < 1:
        raise ValueError("correct_rf_frequency: iterations and n_samples must be >= 1")
    if alpha is not None and (not np.isfinite(alpha) or alpha < 0):
        raise ValueError(f"correct_rf_frequency: alpha must be finite and >= 0, got {alpha!r}")
    if not 0 < gain <= 1:
        raise ValueError(f"correct_rf_frequency: gain must be in (0, 1], got {gain!r}")
    if len(rf.names) != 1:
        raise ValueError(f"correct_rf_frequency: {rf.name} must have one member")
    rows = resolve_select(bpm_select, bpms.names, owner=bpms.name)
    bpm_names = [str(bpms.names[int(i)]) for i in rows]
    n = len(rows)
    _md = run_metadata(
        description,
        plan_name="correct_rf_frequency",
        plan_args={
            "bpms": bpms.name,
            "hcorr": hcorr.name,
            "rf": rf.name,
            "alpha": alpha,
            "bpm_select": repr(bpm_select),
            "iterations": iterations,
            "tolerance_hz": tolerance_hz,
            "max_step_hz": max_step_hz,
            "gain": gain,
            "n_samples": n_samples,
        },
        units={"rf-step": "Hz", "rf-frequency": "Hz", "orbit-x": "m"},
        num_points=iterations,
        bpm_names=bpm_names,
    )
    _md.update(md or {})

    def measure_x(after: float) -> MsgGenerator[np.ndarray]:
        samples = []
        for _ in range(n_samples):
            frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
            samples.append(np.where(frame.valid[rows], frame.x[rows], np.nan))
            after = frame.time + 2e-6
        return np.mean(samples, axis=0)

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, [rf])
        model_state = yield from take_snapshot(description, [rf, hcorr])  # for the model only
        f0 = snapshot.setpoints[rf.name][rf.names[0]]
        low, high = (float(v[0]) for v in rf.limits())
        largest = 0.25 * (high - low) if max_step_hz is None else float(max_step_hz)
        hardware = {k: v for fam in model_state.setpoints.values() for k, v in fam.items()}
        response = yield from compute(
            rf_fit_response, description, hardware, bpm_names, list(hcorr.names)
        )
        fit_alpha = (
            DEFAULT_RELATIVE_ALPHA * response.largest_singular_value if alpha is None else alpha
        )
        orbit_record = Record("orbit", {"x": np.zeros(n)}, {"x": "m"}, source=bpms.name)
        step_record = Record(
            "rf",
            {"iteration": 0, "step": 0.0, "frequency": f0, "energy_offset": 0.0, "alpha": 0.0},
            {"step": "Hz", "frequency": "Hz", "alpha": "m/rad"},
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            _, start = yield from call_async(rf.stamped_readbacks)
            x = yield from measure_x(start)
            yield from bps.create("baseline")
            yield from bps.read(orbit_record.update(x=x))
            yield from bps.save()
            frequency = f0
            for k in range(iterations):
                full = yield from compute(
                    rf_frequency_step, response.matrix, response.rf_column, x, fit_alpha
                )
                step = gain * full
                if abs(step) < tolerance_hz:
                    break
                if abs(step) > largest:
                    raise ValueError(
                        f"correct_rf_frequency: step {step:.1f} Hz exceeds the largest allowed "
                        f"{largest:.1f} Hz (max_step_hz); nothing set in this step"
                    )
                check_hardware_limits(description, list(rf.names), np.array([frequency + step]))
                yield from bps.checkpoint()
                readback, settled = yield from set_and_settle(rf, np.array([frequency + step]))
                frequency = float(readback[0])
                x = yield from measure_x(settled)
                yield from bps.create("primary")
                yield from bps.read(
                    step_record.update(
                        iteration=k + 1,
                        step=step,
                        frequency=frequency,
                        energy_offset=full / (frequency * response.alpha_c),
                        alpha=fit_alpha,
                    )
                )
                yield from bps.read(orbit_record.update(x=x))
                yield from bps.save()

        return cast(str, (yield from restore_on_exit(run(), [rf], snapshot, policy="correction")))

    return (yield from plan())
