"""``measure_orm``: the orbit response matrix, measured with bipolar corrector kicks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import ResultReadable, run_metadata
from accplans.devices import OrbitFrame, OrbitSource, SettableFamily, resolve_select
from accplans.model import OnlineModel
from accplans.physics import orm_from_bipolar

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frames, set_and_settle, set_family_hardware
from ._worker import compute
from .orbit import _orbit_record

__all__ = ["measure_orm"]


def momentum_compaction(description: MachineDescription) -> float:
    """alpha_c of the description's design lattice (run in a worker process)."""
    return OnlineModel(description).alpha_c


def measure_orm(
    bpms: OrbitSource,
    correctors: SettableFamily | Sequence[SettableFamily],
    *,
    select: Any = None,
    bpm_select: Any = None,
    kick: float = 40e-6,
    rf: SettableFamily | None = None,
    rf_step: float | None = None,
    rf_dp: float = 1e-4,
    settle: float = 0.0,
    timeout: float = 10.0,
    bpm_noise: float | Sequence[float] | None = None,
    n_frames: int = 1,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Measure the orbit response matrix with bipolar kicks of each selected corrector.

    Each selected corrector is set to its starting kick + ``kick``, then - ``kick``; after each
    setting has been read back, the plan waits for the first BPM frame taken after the magnets
    settled (plus ``settle``) and the ``n_frames - 1`` frames after it, records each frame and
    uses their mean. Columns use the kicks *read back*; an element is
    valid when its BPM was valid at both steps. With horizontal and vertical families, the
    matrix has all four blocks (rows: x of every BPM, then y; columns: selected correctors in
    family order). With ``rf``, the RF frequency is stepped by +-``rf_step`` for an RF column.

    All targets are checked against the limits before anything moves. Every corrector (and the
    RF frequency) is restored to its starting setpoint however the plan ends (success, error,
    abort, lost beam); if the machine cannot be reached, a pending restore is journaled for
    ``restore_setpoints``.

    Args:
        bpms: the BPM family (an orbit source).
        correctors: a corrector family or several (e.g. ``[hcorr, vcorr]``).
        select: correctors to kick: names, indices or a boolean mask over the families'
            members concatenated in order; all by default.
        bpm_select: BPM rows to keep: names, indices or a mask; all by default.
        kick: kick amplitude (rad); each corrector goes to start +- kick.
        rf: the RF device, to add an RF-frequency column (m/Hz).
        rf_step: RF frequency step (Hz) for the RF column; by default the step that shifts
            the beam energy by ``rf_dp`` (``df = rf_dp * f * alpha_c``, alpha_c from the online
            model, computed in a worker process), kept within half the distance to the limits.
        rf_dp: relative energy offset of the default RF step.
        settle: extra wait after the readbacks settled before a frame counts (s).
        timeout: longest wait for one fresh frame (s).
        bpm_noise: standard deviation of one BPM reading (m): a scalar, or one per selected
            BPM (e.g. ``std_x``/``std_y`` of a ``measure_orbit`` result, x then y); gives the
            standard error of every matrix element (``noise``, m/rad; NaN without it), divided
            by ``sqrt(n_frames)``.
        n_frames: fresh BPM frames averaged per step (>= 1; each a later frame than the
            last): the noise falls as ``1 / sqrt(n_frames)``, the time per step grows by one
            frame period per frame.
        md: metadata added to the run's start document.

    Returns:
        The uid of the run; its ``result_orm`` stream holds the matrix (m/rad), the RF column
        (m/Hz, NaN without ``rf``), names, kicks, the valid mask and ``n_frames``
        (``load_result(uid, "orm")``); ``primary`` has one event per frame.
    """
    families = [correctors] if isinstance(correctors, SettableFamily) else list(correctors)
    if not families:
        raise ValueError("measure_orm needs at least one corrector family")
    if not np.isfinite(kick) or kick <= 0:
        raise ValueError(f"kick must be a positive number of rad, got {kick!r}")
    if int(n_frames) != n_frames or n_frames < 1:
        raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
    n_frames = int(n_frames)
    description = description_of(bpms, *families, rf)
    all_names = [n for fam in families for n in fam.names]
    owner = [(f, m) for f, fam in enumerate(families) for m in range(len(fam.names))]
    columns = resolve_select(select, all_names, owner="correctors")
    rows = resolve_select(bpm_select, bpms.names, owner=bpms.name)
    bpm_names = [bpms.names[i] for i in rows]
    col_names = [all_names[j] for j in columns]
    planes = [description.device(n).plane or "" for n in col_names]
    moved = list(families) + ([rf] if rf is not None else [])
    noise = None
    if bpm_noise is not None:
        noise = np.asarray(bpm_noise, float)
        if noise.ndim == 1:
            if noise.size != 2 * len(rows):
                raise ValueError(f"bpm_noise: {noise.size} values for {2 * len(rows)} rows")
            noise = noise[:, None]
        noise = noise / np.sqrt(n_frames)

    _md = run_metadata(
        description,
        plan_name="measure_orm",
        plan_args={
            "bpms": bpms.name,
            "correctors": [f.name for f in families],
            "select": repr(select),
            "bpm_select": repr(bpm_select),
            "kick": kick,
            "rf": rf is not None,
            "rf_step": rf_step,
            "rf_dp": rf_dp,
            "settle": settle,
            "bpm_noise": repr(bpm_noise),
            "n_frames": n_frames,
        },
        units={
            "step-kick": "rad",
            "step-kick_readback": "rad",
            "step-rf_step": "Hz",
            "step-rf_step_readback": "Hz",
            "orbit-x": "m",
            "orbit-y": "m",
        },
        num_points=n_frames * (2 * len(columns) + (2 if rf is not None else 0)),
        corrector_names=col_names,
        bpm_names=bpm_names,
        n_frames=n_frames,
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        step = rf_step
        snapshot = yield from take_snapshot(description, moved)
        start = {f.name: np.array([snapshot.setpoints[f.name][n] for n in f.names]) for f in moved}
        # every target, in hardware units, checked before anything moves
        targets: dict[int, tuple[float, float]] = {}
        for j in columns:
            f, m = owner[j]
            fam = families[f]
            spec = description.device(fam.names[m])
            assert spec.calibration is not None
            s0 = float(spec.calibration.to_strength(start[fam.name][m]))
            targets[j] = (
                float(spec.calibration.to_hardware(s0 + kick)),
                float(spec.calibration.to_hardware(s0 - kick)),
            )
        check_hardware_limits(
            description,
            [all_names[j] for j in columns for _ in (0, 1)],
            np.array([t for j in columns for t in targets[j]]),
        )
        if rf is not None:
            f0 = start[rf.name][0]
            if step is None:
                alpha_c = yield from compute(momentum_compaction, description)
                low, high = rf.limits()
                room = 0.5 * min(f0 - float(low[0]), float(high[0]) - f0)
                step = min(abs(rf_dp) * f0 * abs(alpha_c), room)
            check_hardware_limits(description, list(rf.names) * 2, np.array([f0 + step, f0 - step]))

        @bpp.run_decorator(md=_md)
        def measure() -> MsgGenerator[None]:
            nrow = len(rows)
            plus = np.full((2 * nrow, len(columns)), np.nan)
            minus = np.full_like(plus, np.nan)
            k_plus = np.full(len(columns), np.nan)
            k_minus = np.full(len(columns), np.nan)
            ok = np.ones_like(plus, dtype=bool)
            records = (_step_record(), _orbit_record(nrow, bpms.name))
            current = {name: values.copy() for name, values in start.items()}
            for c, j in enumerate(columns):
                f, m = owner[j]
                fam = families[f]
                spec = description.device(fam.names[m])
                assert spec.calibration is not None
                for sign, target in zip((+1, -1), targets[j], strict=True):
                    yield from bps.checkpoint()
                    values = current[fam.name].copy()
                    values[m] = target
                    readbacks, settled = yield from set_and_settle(fam, values)
                    current[fam.name] = values
                    kick_rb = float(spec.calibration.to_strength(readbacks[m]))
                    kick_rb -= float(spec.calibration.to_strength(start[fam.name][m]))
                    orbit, valid = yield from _averaged_frames(
                        records,
                        c,
                        all_names[j],
                        bpms,
                        rows,
                        settled + settle,
                        n_frames,
                        timeout,
                        kick=sign * kick,
                        kick_readback=kick_rb,
                    )
                    (plus if sign > 0 else minus)[:, c] = orbit
                    (k_plus if sign > 0 else k_minus)[c] = kick_rb
                    ok[:, c] &= valid
                # back to the start value (folded into the next corrector's put when possible)
                current[fam.name][m] = start[fam.name][m]
                nxt = columns[c + 1] if c + 1 < len(columns) else None
                if nxt is None or owner[nxt][0] != f:
                    yield from set_family_hardware(fam, current[fam.name])
            rf_column = np.full(2 * nrow, np.nan)
            if rf is not None:
                assert step is not None  # chosen before the run opened
                rf_column = yield from _rf_column(
                    records, rf, start[rf.name], step, bpms, rows, settle, timeout, n_frames
                )
            matrix, sigma = orm_from_bipolar(plus, minus, k_plus, k_minus, noise_m=noise)
            yield from bps.create("result_orm")
            yield from bps.read(
                ResultReadable(
                    "orm",
                    matrix=np.where(ok, matrix, np.nan),
                    rf_column=rf_column,
                    bpm_names=bpm_names,
                    corrector_names=col_names,
                    corrector_planes=planes,
                    kicks=(k_plus - k_minus) / 2,
                    valid=ok,
                    noise=np.full_like(matrix, np.nan) if sigma is None else sigma,
                    n_frames=float(n_frames),
                )
            )
            yield from bps.save()

        return (
            yield from restore_on_exit(
                measure(), moved, snapshot, policy="measurement", owner="measure_orm"
            )
        )

    return (yield from plan())


def _step_record() -> Record:
    """One step: the corrector kicked (column -1 and ``RF`` for an RF step) and by how much."""
    return Record(
        "step",
        {
            "column": 0,
            "frame": 0,
            "corrector": "",
            "kick": 0.0,
            "kick_readback": 0.0,
            "rf_step": 0.0,
            "rf_step_readback": 0.0,
        },
        {"kick": "rad", "kick_readback": "rad", "rf_step": "Hz", "rf_step_readback": "Hz"},
    )


def _record_step(
    records: tuple[Record, Record],
    column: int,
    name: str,
    frame: OrbitFrame,
    rows: np.ndarray,
    frame_index: int = 0,
    **change: float,
) -> MsgGenerator[None]:
    """Record one frame of a step.

    ``change`` gives ``kick``/``kick_readback`` (rad) or ``rf_step``/``rf_step_readback``
    (Hz); ``frame_index`` is which frame of the step it is.
    """
    step, orbit = records
    values: dict[str, float] = dict.fromkeys(
        ("kick", "kick_readback", "rf_step", "rf_step_readback"), 0.0
    )
    values.update(change)
    yield from bps.create("primary")
    yield from bps.read(step.update(column=column, frame=frame_index, corrector=name, **values))
    yield from bps.read(
        orbit.update(
            x=frame.x[rows],
            y=frame.y[rows],
            valid=frame.valid[rows].astype(np.int8),
            counter=frame.counter,
            frame_time=frame.time,
        )
    )
    yield from bps.save()


def _averaged_frames(
    records: tuple[Record, Record],
    column: int,
    name: str,
    bpms: OrbitSource,
    rows: np.ndarray,
    after: float,
    n_frames: int,
    timeout: float,
    **change: float,
) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
    """Record ``n_frames`` successive frames taken after ``after`` (epoch, s); their mean.

    Returns:
        ``(orbit, valid)``: the mean orbit, rows ``[x; y]`` (m), and where every frame was valid.
    """
    frames = yield from read_orbit_frames(bpms, after=after, n=n_frames, timeout=timeout)
    for k, frame in enumerate(frames):
        yield from _record_step(records, column, name, frame, rows, k, **change)
    orbits = np.array([np.concatenate([f.x[rows], f.y[rows]]) for f in frames])
    valid = np.all([np.concatenate([f.valid[rows], f.valid[rows]]) for f in frames], axis=0)
    return orbits.mean(axis=0), valid


def _rf_column(
    records: tuple[Record, Record],
    rf: SettableFamily,
    f_start: np.ndarray,
    step: float,
    bpms: OrbitSource,
    rows: np.ndarray,
    settle: float,
    timeout: float,
    n_frames: int = 1,
) -> MsgGenerator[np.ndarray]:
    """The RF column (m/Hz) from orbits at +-``step`` (Hz), over the frequencies read back."""
    orbits, frequencies = [], []
    for sign in (+1, -1):
        yield from bps.checkpoint()
        readback, settled = yield from set_and_settle(rf, f_start + sign * step)
        orbit, _ = yield from _averaged_frames(
            records,
            -1,
            rf.names[0],
            bpms,
            rows,
            settled + settle,
            n_frames,
            timeout,
            rf_step=sign * step,
            rf_step_readback=float(readback[0] - f_start[0]),
        )
        orbits.append(orbit)
        frequencies.append(float(readback[0]))
    yield from set_family_hardware(rf, f_start)
    return (orbits[0] - orbits[1]) / (frequencies[0] - frequencies[1])
