"""``correct_rf_frequency``: the RF frequency that matches the ring's true circumference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

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

__all__ = ["correct_rf_frequency", "rf_frequency_step", "rf_fit_response"]


def rf_fit_response(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpm_names: Sequence[str],
    corrector_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The model's horizontal ORM (m/rad, x rows) and RF column (m/Hz) (a worker job)."""
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    response = model.orm(list(bpm_names), list(corrector_names), rf=True)
    assert response.rf_column is not None
    n = len(bpm_names)
    return response.matrix[:n], response.rf_column[:n]


def rf_frequency_step(
    matrix: np.ndarray, rf_column: np.ndarray, orbit_x: np.ndarray, alpha: float
) -> float:
    """RF step (Hz) of the dispersive component of ``orbit_x`` (m) (a worker job).

    Fits ``orbit_x = R dtheta + rf_column df`` (Tikhonov, ``alpha`` in m/rad) and returns the
    step ``-df`` that removes the dispersive component. ``R`` is the ORM at a fixed RF
    frequency, whose kicks keep the orbit length: the RF unknown carries the orbit's path
    length ``-(C/f) df``, i.e. the difference between ``h c / f`` and the true circumference.
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
    alpha: float = 1.0,
    bpm_select: Any = None,
    iterations: int = 3,
    tolerance_hz: float = 0.1,
    max_step_hz: float | None = None,
    gain: float = 1.0,
    n_samples: int = 5,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Set the RF frequency so that the beam's orbit has no dispersive component.

    "Centred" here means: the RF frequency ``f = h c / L`` whose orbit length ``L`` is the
    ring's true circumference, so the correctors and errors, not an energy offset, carry the
    orbit. It is found from the dispersive orbit component: the horizontal orbit (averaged
    over ``n_samples`` fresh frames) is fitted by the online model's horizontal ORM at a
    fixed RF frequency plus its RF column (Tikhonov), and the RF frequency is stepped by the
    fitted RF term; repeated until a step is below ``tolerance_hz``. The correctors do not
    move (``hcorr`` gives the model its setpoints).

    A correction plan: on success it keeps the new frequency, on ``RE.stop()`` the last
    completed step; on a failure or an abort it restores the RF frequency. Every step is
    checked against the RF limits (and ``max_step_hz``) before it is set.

    Args:
        bpms: the BPM family (an orbit source).
        hcorr: the horizontal correctors (read, not moved: the model's setpoints).
        rf: the RF device (Hz).
        alpha: Tikhonov parameter of the fit (m/rad).
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
        per step (the step and the frequency in Hz, the horizontal orbit in m).
    """
    description = description_of(bpms, hcorr, rf)
    if iterations < 1 or n_samples < 1:
        raise ValueError("correct_rf_frequency: iterations and n_samples must be >= 1")
    if not np.isfinite(alpha) or alpha < 0:
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
        matrix, rf_column = yield from compute(
            rf_fit_response, description, hardware, bpm_names, list(hcorr.names)
        )
        orbit_record = Record("orbit", {"x": np.zeros(n)}, {"x": "m"}, source=bpms.name)
        step_record = Record(
            "rf", {"iteration": 0, "step": 0.0, "frequency": f0}, {"step": "Hz", "frequency": "Hz"}
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
                step = gain * (yield from compute(rf_frequency_step, matrix, rf_column, x, alpha))
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
                    step_record.update(iteration=k + 1, step=step, frequency=frequency)
                )
                yield from bps.read(orbit_record.update(x=x))
                yield from bps.save()

        return cast(str, (yield from restore_on_exit(run(), [rf], snapshot, policy="correction")))

    return (yield from plan())
