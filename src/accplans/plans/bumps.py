"""``orbit_bump`` and ``remove_bump``: closed orbit bumps of position and/or angle at one point."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import (
    FieldSpec,
    Result,
    ResultSchema,
    record_result,
    register_result_kind,
    run_metadata,
)
from accplans.devices import OrbitSource, SettableFamily, call_async, resolve_select
from accplans.model import BumpResponse, OnlineModel, bump_response, nearest_bump_correctors
from accplans.physics import BumpError, bump_kicks

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frame, set_and_settle
from ._worker import compute

__all__ = ["BumpDesign", "design_bump", "orbit_bump", "remove_bump"]

register_result_kind(
    ResultSchema(
        kind="bump",
        version=1,
        description=(
            "A closed orbit bump: the kicks added to its correctors (and the RF step that kept "
            "the path length), what was asked and what was reached at the bump point, and the "
            "measured orbit change at the BPMs in the bump's plane."
        ),
        fields={
            "plane": FieldSpec("", "()", "str", choices=("x", "y")),
            "point": FieldSpec("", "()", "int"),
            "corrector_names": FieldSpec("", "(ncorr,)", "str"),
            "kicks": FieldSpec("rad", "(ncorr,)"),
            "rf_step": FieldSpec("Hz", "()"),
            "position": FieldSpec("m", "()", optional=True),
            "angle": FieldSpec("rad", "()", optional=True),
            "model_position": FieldSpec("m", "()"),
            "model_angle": FieldSpec("rad", "()"),
            "measured_position": FieldSpec("m", "()", optional=True),
            "leakage_rms": FieldSpec("m", "()"),
            "bpm_names": FieldSpec("", "(nbpm,)", "str"),
            "inside": FieldSpec("", "(nbpm,)", "bool"),
            "orbit_change": FieldSpec("m", "(nbpm,)"),
        },
    )
)

_PATH_LENGTH = ("auto", "rf", "row", None)
#: largest rms orbit change outside a bump the model may predict (fraction of its amplitude)
_MAX_MODEL_LEAKAGE = 1e-3


@dataclass(frozen=True)
class BumpDesign:
    """A bump computed from the online model (a worker job's answer, see :func:`design_bump`).

    Attributes:
        response: the model responses of the chosen correctors.
        rows: constrained quantities at the point: 0 position, 1 angle.
        target: their requested values [m, rad].
        path_length: ``"rf"``, ``"row"`` or ``None`` (resolved from ``"auto"``).
        kicks: (ncorr,) kick changes [rad].
        rf_step: RF frequency step [Hz] (0 unless ``path_length == "rf"``).
        model_point: (2,) predicted position [m] and angle [rad] change at the point.
        model_leakage_rms: predicted rms orbit change at the BPMs outside the bump [m].
    """

    response: BumpResponse
    rows: tuple[int, ...]
    target: np.ndarray
    path_length: str | None
    kicks: np.ndarray
    rf_step: float
    model_point: np.ndarray
    model_leakage_rms: float


def _system(
    r: BumpResponse, rows: Sequence[int], path_length: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(inside, outside, extra) matrices of the bump, with the RF column when it is an unknown."""
    inside, outside = r.point_matrix[list(rows)], r.bpm_matrix[~r.inside]
    extra = None
    if path_length == "rf":
        inside = np.c_[inside, r.point_rf[list(rows)]]
        outside = np.c_[outside, r.bpm_rf[~r.inside]]
        extra = np.r_[r.delta_row, r.delta_rf][None, :]
    elif path_length == "row":
        extra = r.delta_row[None, :]
    return inside, outside, extra


def design_bump(
    description: MachineDescription,
    hardware: Mapping[str, float],
    at_point: str | int,
    plane: str,
    target: Mapping[int, float],
    correctors: Sequence[str] | int,
    candidates: Sequence[str],
    bpm_names: Sequence[str],
    path_length: str | None,
    limits: Mapping[str, tuple[float, float]],
) -> BumpDesign:
    """Compute a bump from the online model at these setpoints (a worker job; see ``orbit_bump``).

    Args:
        description: the machine description.
        hardware: hardware setpoints (A, Hz) of the correctors and RF.
        at_point: the bump point (BPM or element name, or element index).
        plane: ``"x"`` or ``"y"``.
        target: ``{0: position [m], 1: angle [rad]}``, one or both.
        correctors: the bump's corrector names, or how many of the nearest ``candidates``.
        candidates: the correctors of the bump's plane.
        bpm_names: the BPMs (rows).
        path_length: ``"rf"``, ``"row"`` or ``None``.
        limits: ``name -> (lower, upper)`` allowed change of each corrector [rad] and of the
            RF frequency [Hz] (under the RF device's name).

    Raises:
        BumpError: the bump cannot be made (too few or degenerate correctors, limits).
    """
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    if isinstance(correctors, int):
        names = nearest_bump_correctors(model, at_point, list(candidates), correctors)
    else:
        names = list(correctors)
    response = bump_response(model, at_point, plane, names, list(bpm_names))
    rows = tuple(sorted(target))
    inside, outside, extra = _system(response, rows, path_length)
    bounds = [limits[n] for n in names]
    if path_length == "rf":
        rf_name = next(d.name for d in description.devices if d.kind == "rf")
        bounds.append(limits[rf_name])
    lower, upper = np.array(bounds, float).T
    solution = bump_kicks(
        inside, outside, [target[k] for k in rows], extra=extra, lower=lower, upper=upper
    )
    n = len(names)
    kicks = solution.kicks[:n]
    rf_step = float(solution.kicks[n]) if path_length == "rf" else 0.0
    point = response.point_matrix @ kicks + response.point_rf * rf_step
    leak = (
        response.bpm_matrix[~response.inside] @ kicks + response.bpm_rf[~response.inside] * rf_step
    )
    size = max(
        abs(target.get(0, 0.0)),
        float(np.max(np.abs(response.bpm_matrix[response.inside] @ kicks), initial=0.0)),
    )
    leak_rms = float(np.sqrt(np.mean(leak**2))) if leak.size else 0.0
    if leak_rms > _MAX_MODEL_LEAKAGE * size:
        raise BumpError(
            f"the correctors {names} cannot close this bump at {at_point!r}: the model predicts "
            f"{leak_rms * 1e6:.3g} um rms outside it; use more correctors, or correctors on both "
            "sides of the point (two on each side for a position and an angle)"
        )
    return BumpDesign(
        response=response,
        rows=rows,
        target=np.array([target[k] for k in rows], float),
        path_length=path_length,
        kicks=kicks,
        rf_step=rf_step,
        model_point=point,
        model_leakage_rms=leak_rms,
    )


def closure_step(
    design: BumpDesign,
    change: np.ndarray,
    valid: np.ndarray,
    applied_rf: float,
    lower: np.ndarray,
    upper: np.ndarray,
    amplitude_from: str = "bpms",
) -> tuple[np.ndarray, float]:
    """Kick changes [rad] and RF step [Hz] that close a bump from its measured orbit change.

    The kicks the beam actually saw are fitted to the measured orbit change at every valid
    BPM (model responses; corrector calibration errors show up here); the step then brings
    the point's position from what these fitted kicks give to the target (an angle keeps its
    model value: no BPM measures it, and the fit's angle is the less accurate) and cancels
    the measured change outside the bump. The fit averages many BPMs, so one BPM's gain
    error does not set the amplitude.

    Args:
        design: the bump.
        change: (nbpm,) measured orbit change at the BPMs in the bump's plane [m].
        valid: (nbpm,) BPMs whose readings are valid.
        applied_rf: RF step applied so far [Hz].
        lower: lower limits of the changes (correctors, then the RF with ``"rf"``).
        upper: upper limits.
        amplitude_from: ``"bpms"`` (above) or ``"model"``: keep the model's position too.
    """
    r = design.response
    rows = np.asarray(valid, bool) & np.isfinite(change)
    measured = np.nan_to_num(change) - r.bpm_rf * applied_rf
    fitted = np.linalg.lstsq(r.bpm_matrix[rows], measured[rows], rcond=None)[0]
    point = r.point_matrix @ fitted + r.point_rf * applied_rf
    # the position comes from the fit; an angle (no BPM measures it) keeps its model value
    step = np.array(
        [t - point[k] if k == 0 else 0.0 for k, t in zip(design.rows, design.target, strict=True)]
    )
    inside, outside, extra = _system(r, design.rows, design.path_length)
    solution = bump_kicks(
        inside,
        outside,
        step,
        extra=extra,
        outside_target=-np.nan_to_num(change[~r.inside]),
        weights=rows[~r.inside].astype(float),
        lower=lower,
        upper=upper,
        leakage_tolerance=None,
    )
    n = len(r.correctors)
    return solution.kicks[:n], float(solution.kicks[n]) if design.path_length == "rf" else 0.0


def orbit_bump(
    bpms: OrbitSource,
    hcorr: SettableFamily,
    vcorr: SettableFamily,
    rf: SettableFamily | None = None,
    *,
    at: str | int,
    plane: str = "y",
    position_m: float | None = None,
    angle_rad: float | None = None,
    correctors: Any = None,
    path_length: str | None = "auto",
    closure_iterations: int = 1,
    amplitude_from: str = "bpms",
    n_samples: int = 4,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Make a closed orbit bump of position and/or angle at a BPM or any lattice point.

    The kicks are computed in the worker process from the online model at the current
    setpoints: the requested position/angle at the point are met exactly, the orbit change at
    the BPMs outside the bump (outside its first and last corrector) is minimised (zero for
    an exactly closing bump, e.g. three correctors for a position), within the correctors'
    limits. A horizontal bump changes the path length, so at fixed RF frequency the beam
    energy and the orbit everywhere: ``path_length="rf"`` adds the RF frequency step that
    keeps the energy, ``"row"`` constrains the kicks to keep it (one more corrector).

    Every new value is checked against the limits before anything moves (a bump that cannot
    be made within them is refused and nothing moves). The plan reads the orbit, ADDS the
    kicks to the present ones (and the RF step), reads the orbit again, then does up to
    ``closure_iterations`` measured closure steps: the measured orbit change outside the bump
    is cancelled with the same correctors (model responses) keeping the point's amplitude.

    A correction plan: on success the bump stays (remove it with :func:`remove_bump` and the
    run's ``bump`` result, which also takes back the RF step); on ``RE.stop()`` the last
    completed step stays; on failure or abort the correctors and the RF frequency go back to
    their starting setpoints.

    Args:
        bpms: the BPM family (an orbit source).
        hcorr: the horizontal corrector family.
        vcorr: the vertical corrector family.
        rf: the RF device (needed for ``path_length="rf"``).
        at: the bump point: a BPM (or other device) name, a lattice element name, or an
            element index (the orbit at the element's entrance).
        plane: ``"x"`` or ``"y"``.
        position_m: position change at the point (m).
        angle_rad: angle change at the point (rad).
        correctors: the bump's correctors of that plane (names, indices or a mask of the
            family), or how many of the nearest to the point (int); by default the fewest
            that make it: 3 for a position or an angle, 4 for both, one more with
            ``path_length="row"``.
        path_length: horizontal bumps only: ``"rf"`` (RF frequency step), ``"row"`` (kicks
            that keep the path length), ``None`` (neither), ``"auto"``: ``"rf"`` with ``rf``,
            else ``"row"`` (``None`` for vertical bumps).
        closure_iterations: measured closure steps after the bump (0 or more).
        amplitude_from: what sets the position in a closure step: ``"bpms"``, the kicks
            fitted to the measured orbit change at every BPM (corrects corrector calibration
            errors; limited by the gains of the BPMs near the point), or ``"model"``, the
            model's prediction (limited by the corrector calibrations).
        n_samples: orbit frames averaged per orbit measurement.
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: ``baseline`` (orbit before), one ``primary`` event per step (the
        kicks added in rad, RF step in Hz, the orbit in m, the position at the point if it is
        a BPM, the rms leakage outside in m) and the result ``bump``.
    """
    description = description_of(bpms, hcorr, vcorr, rf)
    if plane not in ("x", "y"):
        raise ValueError(f"orbit_bump: plane must be 'x' or 'y', got {plane!r}")
    target: dict[int, float] = {}
    for k, (what, value) in enumerate((("position_m", position_m), ("angle_rad", angle_rad))):
        if value is not None:
            if not np.isfinite(value):
                raise ValueError(f"orbit_bump: {what} must be finite, got {value!r}")
            target[k] = float(value)
    if not target:
        raise ValueError("orbit_bump: give position_m and/or angle_rad")
    if path_length not in _PATH_LENGTH:
        raise ValueError(f"orbit_bump: path_length must be one of {_PATH_LENGTH}")
    if path_length == "auto":
        path_length = None if plane == "y" else ("rf" if rf is not None else "row")
    if path_length is not None and plane == "y":
        raise ValueError("orbit_bump: path_length applies to horizontal bumps only")
    if path_length == "rf" and rf is None:
        raise ValueError("orbit_bump: path_length='rf' needs the rf device")
    if amplitude_from not in ("bpms", "model"):
        raise ValueError(
            f"orbit_bump: amplitude_from must be 'bpms' or 'model', not {amplitude_from!r}"
        )
    if closure_iterations < 0 or n_samples < 1:
        raise ValueError("orbit_bump: closure_iterations >= 0 and n_samples >= 1")
    family = hcorr if plane == "x" else vcorr
    candidates = [str(n) for n in family.names]
    if correctors is None or (isinstance(correctors, int) and not isinstance(correctors, bool)):
        n_corr = correctors or 2 + len(target) + (path_length == "row")
        chosen: Sequence[str] | int = int(n_corr)
    else:
        chosen = [candidates[int(i)] for i in resolve_select(correctors, candidates, owner="bump")]
    bpm_names = [str(n) for n in bpms.names]
    bpm_index = {n: i for i, n in enumerate(bpm_names)}
    point_bpm = bpm_index.get(at) if isinstance(at, str) else None
    moved: list[SettableFamily] = [family] + ([rf] if path_length == "rf" and rf else [])
    families_for_model = [hcorr, vcorr] + ([rf] if rf is not None else [])
    _md = run_metadata(
        description,
        plan_name="orbit_bump",
        plan_args={
            "bpms": bpms.name,
            "hcorr": hcorr.name,
            "vcorr": vcorr.name,
            "rf": None if rf is None else rf.name,
            "at": at,
            "plane": plane,
            "position_m": position_m,
            "angle_rad": angle_rad,
            "correctors": repr(correctors),
            "path_length": path_length,
            "closure_iterations": closure_iterations,
            "amplitude_from": amplitude_from,
            "n_samples": n_samples,
        },
        units={
            "bump-kicks": "rad",
            "bump-rf_step": "Hz",
            "bump-position": "m",
            "bump-leakage_rms": "m",
            "orbit-x": "m",
            "orbit-y": "m",
        },
        num_points=1 + closure_iterations,
        bpm_names=bpm_names,
    )
    _md.update(md or {})
    p = 0 if plane == "x" else 1

    def measure(after: float) -> MsgGenerator[tuple[np.ndarray, np.ndarray, float]]:
        """Mean orbit (2, nbpm) [m] of ``n_samples`` frames at or after ``after``, valid mask."""
        samples, valid = [], np.ones(len(bpm_names), bool)
        for _ in range(n_samples):
            frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
            samples.append(np.array([frame.x, frame.y], float))
            valid &= np.asarray(frame.valid, bool)
            after = frame.time + 2e-6
        return np.mean(samples, axis=0), valid, after

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, moved)
        others = [f for f in families_for_model if f not in moved]
        context = yield from take_snapshot(description, others)
        start_time = 0.0
        for fam in moved:
            _, stamp = yield from call_async(fam.stamped_readbacks)
            start_time = max(start_time, stamp)
        setpoints = [*snapshot.setpoints.values(), *context.setpoints.values()]
        hardware = {n: v for f in setpoints for n, v in f.items()}
        room = yield from _room(family, rf if path_length == "rf" else None)
        design: BumpDesign = yield from compute(
            design_bump,
            description,
            hardware,
            at,
            plane,
            target,
            chosen,
            candidates,
            bpm_names,
            path_length,
            room,
        )
        names = list(design.response.correctors)
        columns = [candidates.index(n) for n in names]
        rf_name = rf.names[0] if rf is not None else ""
        # every value this plan sets first, checked before anything moves
        current = np.asarray((yield from call_async(family.strengths)), float)
        new = current.copy()
        new[columns] += design.kicks
        family.check_strengths(new)
        if design.rf_step:
            check_hardware_limits(
                description, [rf_name], np.array([hardware[rf_name] + design.rf_step])
            )
        inside = design.response.inside
        n_in = len(names)
        step = Record(
            "bump",
            {
                "step": 0,
                "kicks": np.zeros(n_in),
                "rf_step": 0.0,
                "position": np.nan,
                "leakage_rms": 0.0,
            },
            {"kicks": "rad", "rf_step": "Hz", "position": "m", "leakage_rms": "m"},
        )
        orbit_rec = Record(
            "orbit",
            {"x": np.zeros(len(bpm_names)), "y": np.zeros(len(bpm_names))},
            {"x": "m", "y": "m"},
            source=bpms.name,
        )
        total = {"kicks": np.zeros(n_in), "rf": 0.0}

        def apply(kicks: np.ndarray, df: float) -> MsgGenerator[float]:
            values = np.asarray((yield from call_async(family.strengths)), float)
            values[columns] += kicks
            family.check_strengths(values)
            _, settled = yield from set_and_settle(family, values, hardware=False)
            if rf is not None and df != 0.0:
                f0 = float(np.asarray((yield from call_async(rf.hardware_setpoints)))[0])
                check_hardware_limits(description, [rf_name], np.array([f0 + df]))
                _, t = yield from set_and_settle(rf, np.array([f0 + df]))
                settled = max(settled, t)
            total["kicks"] = total["kicks"] + kicks
            total["rf"] += df
            return settled

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            before, valid0, after = yield from measure(start_time)
            yield from bps.create("baseline")
            yield from bps.read(orbit_rec.update(x=before[0], y=before[1]))
            yield from bps.save()
            kicks, df = design.kicks, design.rf_step
            change = np.zeros(len(bpm_names))
            leak_rms = 0.0
            usable = valid0
            for k in range(1 + closure_iterations):
                if k > 0:
                    low, high = yield from _closure_room(
                        family, columns, rf if design.path_length == "rf" else None
                    )
                    kicks, df = closure_step(
                        design, change, usable, total["rf"], low, high, amplitude_from
                    )
                yield from bps.checkpoint()
                settled = yield from apply(kicks, df)
                orbit, valid, after = yield from measure(max(after, settled))
                usable = valid0 & valid
                change = orbit[p] - before[p]
                leak = change[~inside & usable]
                leak_rms = float(np.sqrt(np.mean(leak**2))) if leak.size else 0.0
                position = change[point_bpm] if point_bpm is not None else np.nan
                yield from bps.create("primary")
                yield from bps.read(
                    step.update(
                        step=k, kicks=kicks, rf_step=df, position=position, leakage_rms=leak_rms
                    )
                )
                yield from bps.read(orbit_rec.update(x=orbit[0], y=orbit[1]))
                yield from bps.save()
            yield from record_result(
                "bump",
                plane=plane,
                point=np.int64(design.response.point),
                corrector_names=names,
                kicks=total["kicks"],
                rf_step=total["rf"],
                position=position_m,
                angle=angle_rad,
                model_position=float(design.model_point[0]),
                model_angle=float(design.model_point[1]),
                measured_position=None if point_bpm is None else float(change[point_bpm]),
                leakage_rms=leak_rms,
                bpm_names=bpm_names,
                inside=np.asarray(inside, bool),
                orbit_change=change,
            )

        # fold: a running orbit feedback adds the bump to its reference instead of removing it
        return (
            yield from restore_on_exit(
                run(), moved, snapshot, policy="correction", claim_mode="fold", owner="orbit_bump"
            )
        )

    return (yield from plan())


def _rf_room(rf: SettableFamily) -> MsgGenerator[tuple[float, float]]:
    """(lower, upper) change of the RF frequency the limits allow [Hz]."""
    f0 = float(np.asarray((yield from call_async(rf.hardware_setpoints)))[0])
    assert rf.description is not None
    limits = rf.description.device(rf.names[0]).limits
    assert limits is not None  # an RF device has limits (checked by the description)
    return limits[0] - f0, limits[1] - f0


def _room(
    family: SettableFamily, rf: SettableFamily | None
) -> MsgGenerator[dict[str, tuple[float, float]]]:
    """``name -> (lower, upper)`` change allowed by the limits (rad; Hz for the RF)."""
    current = np.asarray((yield from call_async(family.strengths)), float)
    low, high = family.limits()
    room = {
        str(n): (float(lo - c), float(hi - c))
        for n, c, lo, hi in zip(family.names, current, low, high, strict=True)
    }
    if rf is not None:
        room[str(rf.names[0])] = yield from _rf_room(rf)
    return room


def _closure_room(
    family: SettableFamily, columns: Sequence[int], rf: SettableFamily | None
) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
    """Allowed changes of the bump's correctors [rad] (then of the RF [Hz], with ``rf``)."""
    current = np.asarray((yield from call_async(family.strengths)), float)[list(columns)]
    low, high = (np.asarray(v, float)[list(columns)] - current for v in family.limits())
    if rf is not None:
        rf_low, rf_high = yield from _rf_room(rf)
        low, high = np.r_[low, rf_low], np.r_[high, rf_high]
    return low, high


def remove_bump(
    hcorr: SettableFamily,
    vcorr: SettableFamily,
    rf: SettableFamily | None = None,
    *,
    bump: Result,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Take a bump made by :func:`orbit_bump` away: subtract its kicks and its RF step.

    Only the bump's own changes are undone (other changes made since stay). Every new value
    is checked against the limits before anything moves. A correction plan: kept on success,
    restored to the starting setpoints on failure or abort.

    Args:
        hcorr: the horizontal corrector family.
        vcorr: the vertical corrector family.
        rf: the RF device (needed if the bump stepped the RF frequency).
        bump: the ``bump`` result of the run (``load_result(client, uid, "bump")``).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run (one ``primary`` event: the kicks and RF step taken away).
    """
    if bump.kind != "bump":
        raise ValueError(f"remove_bump needs a 'bump' result, got {bump.kind!r}")
    description = description_of(hcorr, vcorr, rf)
    family = hcorr if bump["plane"] == "x" else vcorr
    names = [str(n) for n in family.names]
    missing = [n for n in bump["corrector_names"] if n not in names]
    if missing:
        raise ValueError(f"remove_bump: {missing} are not in {family.name}")
    columns = [names.index(n) for n in bump["corrector_names"]]
    kicks = np.asarray(bump["kicks"], float)
    df = float(bump["rf_step"] or 0.0)
    if df != 0.0 and rf is None:
        raise ValueError(f"remove_bump: the bump stepped the RF by {df:.3f} Hz: give rf")
    moved: list[SettableFamily] = [family] + ([rf] if df != 0.0 and rf is not None else [])
    _md = run_metadata(
        description,
        plan_name="remove_bump",
        plan_args={"hcorr": hcorr.name, "vcorr": vcorr.name, "bump": bump.uid},
        units={"removed-kicks": "rad", "removed-rf_step": "Hz"},
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, moved)
        values = np.asarray((yield from call_async(family.strengths)), float)
        values[columns] -= kicks
        family.check_strengths(values)
        f_new = 0.0
        if rf is not None and df != 0.0:
            f_new = float(np.asarray((yield from call_async(rf.hardware_setpoints)))[0]) - df
            check_hardware_limits(description, [rf.names[0]], np.array([f_new]))
        record = Record(
            "removed", {"kicks": kicks, "rf_step": df}, {"kicks": "rad", "rf_step": "Hz"}
        )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            yield from bps.checkpoint()
            yield from set_and_settle(family, values, hardware=False)
            if rf is not None and df != 0.0:
                yield from set_and_settle(rf, np.array([f_new]))
            yield from bps.create("primary")
            yield from bps.read(record)
            yield from bps.save()

        return (
            yield from restore_on_exit(
                run(), moved, snapshot, policy="correction", claim_mode="fold", owner="remove_bump"
            )
        )

    return (yield from plan())
