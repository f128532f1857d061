"""``measure_dispersion``: the dispersion at the BPMs from an RF-frequency scan."""

from __future__ import annotations

from typing import Any, cast

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import ResultReadable, run_metadata
from accplans.devices import OrbitSource, SettableFamily, call_async, resolve_select
from accplans.model import OnlineModel
from accplans.physics import delta_for_frequency_step, fit_dispersion, frequency_step_for_delta

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frame, set_and_settle
from ._worker import compute

__all__ = ["measure_dispersion", "model_alpha_c", "scan_momenta"]

#: Largest |dp| a default scan asks for (the issue's +-1e-3).
DEFAULT_DP = 1e-3
#: Orbit frames averaged per point by default (see the noise budget in the docstring).
DEFAULT_SAMPLES = 16


def model_alpha_c(description: MachineDescription, rf_frequency_hz: float) -> float:
    """The online model's momentum compaction at this RF frequency (a worker job)."""
    model = OnlineModel(description)
    model.rf_frequency = float(rf_frequency_hz)
    return float(model.alpha_c)


def scan_momenta(dp: float, n_steps: int) -> np.ndarray:
    """The momentum offsets of a scan: ``+dp k/n`` then ``-dp k/n`` for ``k = 1..n``."""
    up = dp * np.arange(1, n_steps + 1) / n_steps
    return np.concatenate([up, -up])


def measure_dispersion(
    bpms: OrbitSource,
    rf: SettableFamily,
    *,
    dp: float | None = None,
    n_steps: int = 2,
    order: int = 1,
    n_samples: int = DEFAULT_SAMPLES,
    bpm_select: Any = None,
    alpha_c: float | None = None,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the dispersion at the BPMs (as they read it) by stepping the RF frequency.

    The orbit is measured at the starting frequency and at ``2 * n_steps`` frequency steps,
    ``n_steps`` of each sign, up to momentum offsets ``+-dp`` (``df = -dp f alpha_c``). Each
    point averages ``n_samples`` fresh orbit frames taken after the RF frequency read back. A
    polynomial of ``order`` 1 (or 2, to separate the second-order dispersion) is fitted per BPM
    through the orbit against ``dp``.

    Noise budget (``accplans.physics.dispersion_standard_error``): with BPM noise ``sigma`` per
    frame, the fitted dispersion has the standard error ``sigma / sqrt(n_samples sum dp_i^2)``
    (linear fit). The defaults (``+-1e-3`` in 2 steps per sign, 16 frames per point: 5
    points, 80 frames) give 0.16 mm for 1 um of noise, 0.20 % of the 80 mm peak Dx of EBS:
    the largest error over its 320 BPMs stays below 1 % of the peak (5 standard errors) but
    in about 1 scan in 10000. With 3 frames per point it was 0.37 mm (0.45 %; 1.4 % of the
    peak at the worst BPM). The scan takes 10-12 s on the EBS twin (a real machine: 80
    frames at its BPM rate plus 5 RF settlings).

    A measurement plan: it changes only the RF frequency and restores it on success, failure,
    abort and stop. Every frequency is checked against the RF limits before the first move.

    Args:
        bpms: the BPM family (an orbit source).
        rf: the RF device (frequency in Hz).
        dp: largest momentum offset of the scan; by default 1e-3, or the largest the RF
            limits allow (with a 10 % margin) when smaller.
        n_steps: steps per sign (>= 1; 2 or more to check linearity).
        order: polynomial order of the fit (1 or 2; 2 needs ``n_steps >= 1`` per sign).
        n_samples: orbit frames averaged per point (see the noise budget above).
        bpm_select: BPMs to record (names, indices or a mask); all by default.
        alpha_c: momentum compaction used to turn frequency steps into ``dp``; by default the
            online model's at the starting frequency (computed in the worker process).
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``baseline`` event (the orbit at the starting frequency), one
        ``primary`` event per frequency step (RF step in Hz, dp, orbit in m) and the result
        ``result_dispersion`` (``load_result(client, uid, "dispersion")``: ``dx``, ``dy`` in m
        per BPM, their standard errors, ``dx2``/``dy2`` for ``order=2``, the ``dp`` points
        including 0, the RF steps, the RF frequency and ``alpha_c``).
    """
    description = description_of(bpms, rf)
    if n_steps < 1 or n_samples < 1:
        raise ValueError(
            f"measure_dispersion: n_steps and n_samples must be >= 1, got {n_steps}, {n_samples}"
        )
    if order not in (1, 2):
        raise ValueError(f"measure_dispersion: order must be 1 or 2, got {order!r}")
    if dp is not None and (not np.isfinite(dp) or dp <= 0 or dp > 0.02):
        raise ValueError(f"measure_dispersion: dp must be in (0, 0.02], got {dp!r}")
    if alpha_c is not None and (not np.isfinite(alpha_c) or alpha_c == 0):
        raise ValueError(f"measure_dispersion: alpha_c must be finite and non-zero: {alpha_c!r}")
    if len(rf.names) != 1:
        raise ValueError(f"measure_dispersion: {rf.name} must have one member (the RF frequency)")
    rows = resolve_select(bpm_select, bpms.names, owner=bpms.name)
    names = [str(bpms.names[int(i)]) for i in rows]
    n = len(rows)
    _md = run_metadata(
        description,
        plan_name="measure_dispersion",
        plan_args={
            "bpms": bpms.name,
            "rf": rf.name,
            "dp": dp,
            "n_steps": n_steps,
            "order": order,
            "n_samples": n_samples,
            "bpm_select": repr(bpm_select),
            "alpha_c": alpha_c,
        },
        units={"step-rf_step": "Hz", "orbit-x": "m", "orbit-y": "m"},
        num_points=2 * n_steps,
        bpm_names=names,
    )
    _md.update(md or {})

    def measure_orbit_now(after: float) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
        """Mean orbit (x then y, m) and valid mask of ``n_samples`` frames at/after ``after``."""
        samples, valid = [], []
        for _ in range(n_samples):
            frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
            samples.append(np.concatenate([frame.x[rows], frame.y[rows]]))
            ok = np.asarray(frame.valid[rows], bool)
            valid.append(np.concatenate([ok, ok]))
            after = frame.time + 2e-6
        ok_all = np.all(valid, axis=0)
        return np.where(ok_all, np.mean(samples, axis=0), np.nan), ok_all

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, [rf])
        f0 = snapshot.setpoints[rf.name][rf.names[0]]
        a_c = alpha_c
        if a_c is None:
            a_c = yield from compute(model_alpha_c, description, f0)
        assert a_c is not None
        low, high = rf.limits()
        room = min(high[0] - f0, f0 - low[0])
        largest = DEFAULT_DP if dp is None else dp
        if dp is None:
            largest = min(largest, 0.9 * room / (f0 * abs(a_c)))
        momenta = scan_momenta(largest, n_steps)
        steps = frequency_step_for_delta(momenta, f0, a_c)
        check_hardware_limits(description, list(rf.names) * steps.size, f0 + steps)
        record = Record(
            "step",
            {"index": 0, "rf_step": 0.0, "rf_step_readback": 0.0, "dp": 0.0},
            {"rf_step": "Hz", "rf_step_readback": "Hz"},
            source=rf.name,
        )
        orbit_record = Record(
            "orbit", {"x": np.zeros(n), "y": np.zeros(n)}, {"x": "m", "y": "m"}, source=bpms.name
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            _, start = yield from call_async(rf.stamped_readbacks)
            orbit, ok = yield from measure_orbit_now(start)
            yield from bps.create("baseline")
            yield from bps.read(orbit_record.update(x=orbit[:n], y=orbit[n:]))
            yield from bps.save()
            orbits, valid, points, readbacks = [orbit], [ok], [0.0], [0.0]
            for k, step in enumerate(steps):
                yield from bps.checkpoint()
                readback, settled = yield from set_and_settle(rf, np.array([f0 + step]))
                orbit, ok = yield from measure_orbit_now(settled)
                # dp from the frequency read back (the step the beam saw)
                seen = float(readback[0] - f0)
                points.append(float(delta_for_frequency_step(seen, f0, a_c)))
                readbacks.append(seen)
                orbits.append(orbit)
                valid.append(ok)
                yield from bps.create("primary")
                yield from bps.read(
                    record.update(index=k + 1, rf_step=step, rf_step_readback=seen, dp=points[-1])
                )
                yield from bps.read(orbit_record.update(x=orbit[:n], y=orbit[n:]))
                yield from bps.save()
            fit = fit_dispersion(
                np.array(points), np.array(orbits), order=order, valid=np.array(valid)
            )
            result: dict[str, Any] = {
                "dx": fit.dispersion[:n],
                "dy": fit.dispersion[n:],
                "std_dx": fit.std_dispersion[:n],
                "std_dy": fit.std_dispersion[n:],
                "bpm_names": names,
                "dp": np.array(points),
                "rf_steps": np.array(readbacks),
                "rf_frequency": f0,
                "alpha_c": float(a_c),
            }
            if fit.second_order is not None:
                result["dx2"] = fit.second_order[:n]
                result["dy2"] = fit.second_order[n:]
            yield from bps.create("result_dispersion")
            yield from bps.read(ResultReadable("dispersion", **result))
            yield from bps.save()

        return cast(str, (yield from restore_on_exit(run(), [rf], snapshot, policy="measurement")))

    return (yield from plan())
