"""``correct_orbit``: iterative closed-orbit correction (SVD, Tikhonov or MICADO)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription
from accplans.data import Result, run_metadata
from accplans.devices import OrbitSource, SettableFamily, call_async, resolve_select
from accplans.model import OnlineModel
from accplans.physics import micado, quadrupole_centring_goal, solve_correction

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frame, set_and_settle
from ._worker import compute

__all__ = [
    "DEFAULT_RELATIVE_ALPHA",
    "correct_orbit",
    "dispersion_response",
    "diverged",
    "model_response",
    "orbit_correction_step",
    "quadrupole_centring_response",
    "reference_orbit",
]


DEFAULT_RELATIVE_ALPHA = 1e-3
"""``correct_orbit``'s default Tikhonov parameter, as a fraction of the largest singular value.

On the EBS twin (singular values 632 to 0.045 m/rad, 10 um rms quadrupole misalignments, 1 um
BPM noise) an unregularised inverse turns the noise and the model error into kicks along the
smallest singular vectors: 131 urad rms of correctors and tunes 0.2 off. 1e-3 of the largest
keeps the corrector rms at 16-18 urad and reaches the orbit-control issue's figures in three
iterations on three seeds (``benchmarks/orbit_correction.py``).
"""


def largest_singular_value(matrix: np.ndarray) -> float:
    """The largest singular value of the finite rows of ``matrix`` (a worker job)."""
    rows = np.all(np.isfinite(matrix), axis=1)
    return float(np.linalg.norm(matrix[rows], 2))


def model_response(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpm_names: Sequence[str],
    corrector_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """The online model's ORM (m/rad) and RF column (m/Hz) at these setpoints (a worker job)."""
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    response = model.orm(list(bpm_names), list(corrector_names), rf=True)
    assert response.rf_column is not None
    return response.matrix, response.rf_column


def dispersion_response(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpm_names: Sequence[str],
    corrector_names: Sequence[str],
    dp: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's dispersion response to the correctors and its dispersion (a worker job).

    The dispersion measured by an RF scan is ``D = -f alpha_c d orbit / d f``, so its response
    to a corrector is ``-f alpha_c d R / d f`` (mixed derivatives commute): the ORM's change
    between the RF frequencies that shift the momentum by ``-+dp``, two ORM computations for
    every corrector at once.

    Returns:
        ``(response, dispersion)``: (2 * nbpm, ncorr) ``d[Dx; Dy] / d kick`` (m/rad) and the
        model's (2 * nbpm,) ``[Dx; Dy]`` (m) at these setpoints.
    """
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    f0 = model.rf_frequency
    alpha_c = model.alpha_c
    dispersion = model.dispersion(list(bpm_names))
    step = dp * f0 * alpha_c
    matrices = []
    for sign in (1.0, -1.0):
        model.rf_frequency = f0 + sign * step
        matrices.append(model.orm(list(bpm_names), list(corrector_names), rf=False).matrix)
    model.rf_frequency = f0
    return -f0 * alpha_c * (matrices[0] - matrices[1]) / (2 * step), dispersion


def quadrupole_centring_response(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpm_names: Sequence[str],
    quadrupoles: Sequence[str | None],
    corrector_names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """How the correctors move each BPM's reading relative to the beam in its quadrupole.

    A worker job: the online model's ORM at the BPMs minus the response of the beam's mean
    position in each BPM's quadrupole (:meth:`~accplans.model.OnlineModel.quadrupole_orm`),
    rows of BPMs without a quadrupole (``None``) zero.

    Returns:
        ``(matrix, rf_column)``: (2 * nbpm, ncorr) [m/rad], rows x then y, and (2 * nbpm,)
        [m/Hz].
    """
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    response = model.orm(list(bpm_names), list(corrector_names), rf=True)
    assert response.rf_column is not None
    matrix, rf_column = response.matrix.copy(), response.rf_column.copy()
    rows = [i for i, q in enumerate(quadrupoles) if q is not None]
    quads = [str(quadrupoles[i]) for i in rows]
    nb = len(bpm_names)
    keep = np.zeros(2 * nb, bool)
    if rows:
        q_matrix, q_rf = model.quadrupole_orm(quads, list(corrector_names))
        nq = len(quads)
        for p in range(2):
            at = p * nb + np.asarray(rows)
            matrix[at] -= q_matrix[p * nq : (p + 1) * nq]
            rf_column[at] -= q_rf[p * nq : (p + 1) * nq]
            keep[at] = True
    matrix[~keep] = 0.0
    rf_column[~keep] = 0.0
    return matrix, rf_column


def orbit_correction_step(
    response: np.ndarray,
    orbit: np.ndarray,
    options: dict[str, Any],
) -> tuple[np.ndarray, float]:
    """Kicks (rad) and RF step (Hz) that correct ``orbit`` (a worker job; see ``correct_orbit``)."""
    options = dict(options)
    n_micado = options.pop("micado", None)
    if n_micado is not None:
        weights = options.get("bpm_weights")
        rows = np.ones(orbit.size, bool) if weights is None else np.asarray(weights) > 0
        target = options.get("target")
        error = orbit - (0.0 if target is None else target)
        kicks, _ = micado(response[rows], error[rows], n_micado)  # min |error + R kicks|
        return kicks, 0.0
    result = solve_correction(response, orbit, **options)
    return result.dtheta_rad, result.df_hz


def correct_orbit(
    bpms: OrbitSource,
    correctors: SettableFamily | Sequence[SettableFamily],
    *,
    response: Result | None = None,
    method: str = "tikhonov",
    n_singular: int | None = None,
    alpha: float | None = None,
    micado_correctors: int | None = None,
    gain: float | tuple[float, float] = 1.0,
    bpm_select: Any = None,
    select: Any = None,
    rf: SettableFamily | None = None,
    sum_of_kicks_weight: float | None = None,
    target: np.ndarray | None = None,
    reference: Result | np.ndarray | None = None,
    reference_point: str = "quadrupole",
    dispersion: Result | None = None,
    dispersion_weight: float = 0.05,
    dispersion_planes: str = "y",
    iterations: int = 3,
    tolerance: float = 0.0,
    n_samples: int = 3,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Correct the closed orbit in up to ``iterations`` steps.

    Each iteration averages ``n_samples`` fresh orbit frames, computes the correction (in the
    worker process) from the response matrix, checks the new strengths against the limits, sets
    the correctors (and the RF frequency, with ``rf``), waits for data taken after they
    settled and records the orbit reached. Limits are respected by the solve itself (bounded
    least squares), not by clipping. It stops early when the rms orbit (both planes, the
    selected BPMs) is below ``tolerance`` (m) or stops improving. With a ``dispersion``, these
    tests (and the divergence test below) use the rms of the orbit and the weighted predicted
    dispersion error together, the quantity the solve minimises.

    A correction plan: on success it keeps the correction, on ``RE.stop()`` it keeps the last
    completed iteration, and on a failure (a divergent step: the rms orbit grew by more than
    50 % and by more than 3 times the noise of its mean, from the frames' scatter; a lost
    beam; an error) or an abort it restores every corrector and the RF frequency to their
    starting setpoints. A step that grows the rms by less, at the noise level, ends the
    correction as not improving.

    Args:
        bpms: the BPM family (an orbit source).
        correctors: corrector families (e.g. ``[hcorr, vcorr]``).
        response: a measured ORM (``load_result(client, uid, "orm")``) whose rows and columns
            name these BPMs and correctors; by default the online model's ORM at the current
            setpoints (computed in the worker process).
        method: ``"tikhonov"`` (default) or ``"svd"`` (truncated).
        n_singular: singular values kept; all by default.
        alpha: Tikhonov parameter (m/rad); by default ``DEFAULT_RELATIVE_ALPHA`` (1e-3) times
            the largest singular value of the orbit response. Refused with ``"svd"``.
        micado_correctors: use MICADO with this many correctors per iteration instead (no RF
            unknown, no limits in the solve: the new strengths are checked before any move,
            and MICADO on adjacent, nearly parallel correctors can ask for kicks a limit
            refuses).
        gain: fraction of the computed correction applied, or (horizontal, vertical).
        bpm_select: BPMs to correct on (names, indices or a mask); all by default.
        select: correctors to use (over the families in order); all by default.
        rf: the RF device: its frequency becomes an unknown of the correction (Hz).
        sum_of_kicks_weight: weight (m/rad) of a zero-sum row on the horizontal kick changes.
        target: golden orbit (m), x of the selected BPMs then y; zero by default.
        reference: the orbit to correct to, like ``target`` but BPMs may be left out: an array
            (m) of x of the selected BPMs then y (or (2, nbpm)), NaN for a reading not to
            correct on; or a ``bba`` result (``load_result(client, uid, "bba")``): each
            selected BPM's accepted centre (the reading with the beam through its
            quadrupole's centre), the BPMs it has no accepted centre for left out of the
            correction (in that plane). Exclusive with ``target``.
        reference_point: with a ``bba`` reference, what is corrected: ``"quadrupole"``
            (default) the beam's position in each BBA'd quadrupole, to its centre; ``"bpm"``
            the readings, to the centres. A centre is the reading with the beam through the
            quadrupole *moved there by the BPM's own scan knob*; another orbit through the
            centre crosses the BPM (0.16-0.55 m away on EBS) with another slope, so
            correcting all readings to their centres at once leaves the beam some 10-20 um
            from the quadrupoles on EBS. ``"quadrupole"`` corrects each reading to its centre
            plus the model's change of (reading - beam in the quadrupole) from the corrector
            state the centre was found in (the BBA's start and the knob at the centre, stored
            in the result) to the present one: only the small difference between the BPM and
            its quadrupole is taken from the model. The RF frequency is taken as the BBA's at
            the correction's start (a ``bba`` run does not move it).
        dispersion: a measured dispersion (``load_result(client, uid, "dispersion")`` of
            ``measure_dispersion``) naming the selected BPMs: the correction then also brings
            the dispersion to the model's (Dx of the model, Dy zero on an uncoupled model) in
            the Raubenheimer-Ruth form, minimising ``|orbit + R dtheta|^2 + w^2 |D - D_model +
            R_D dtheta|^2`` with ``R_D`` the model's dispersion response (computed in the
            worker process). The dispersion is measured once: later iterations predict it
            from the kicks applied.
        dispersion_weight: ``w`` above (orbit metres per metre of dispersion): 0.05 weighs
            1 mm of dispersion error like 50 um of orbit. On the EBS twin with 100 urad
            quadrupole rolls and 30 um vertical sextupole offsets it cuts the true vertical
            dispersion 5-9x in three iterations with the orbit still within 14 um (x) and
            8 um (y) rms (``benchmarks/dispersion.py``); a larger weight cuts more and lets
            the vertical orbit grow.
        dispersion_planes: the dispersion rows used: ``"y"`` (default: the vertical
            dispersion, which BPM gain errors do not bias the way they bias Dx), ``"x"`` or
            ``"xy"``.
        iterations: most correction steps.
        tolerance: stop when the rms orbit is below this (m).
        n_samples: orbit frames averaged per measurement.
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: a ``baseline`` event (the starting orbit) and one ``primary``
        event per iteration (kicks in rad, RF step in Hz, the Tikhonov parameter used in m/rad,
        orbit in m, rms in m).
    """
    families = [correctors] if isinstance(correctors, SettableFamily) else list(correctors)
    description = description_of(bpms, *families, rf)
    if iterations < 1 or n_samples < 1:
        raise ValueError("iterations and n_samples must be >= 1")
    gains = (float(gain), float(gain)) if isinstance(gain, (int, float)) else gain
    all_names = [n for f in families for n in f.names]
    columns = resolve_select(select, all_names, owner="correctors")
    rows = resolve_select(bpm_select, bpms.names, owner=bpms.name)
    bpm_names = [str(bpms.names[int(i)]) for i in rows]
    col_names = [all_names[j] for j in columns]
    planes = np.array([description.device(n).plane for n in col_names])
    if response is not None:
        _check_response(response, bpm_names, col_names)
    if reference is not None and target is not None:
        raise ValueError("correct_orbit: give a target or a reference, not both")
    ref = None if reference is None else reference_orbit(reference, bpm_names)
    if reference_point not in ("quadrupole", "bpm"):
        raise ValueError(f"reference_point must be 'quadrupole' or 'bpm', got {reference_point!r}")
    centring = None
    if isinstance(reference, Result) and reference_point == "quadrupole":
        centring = _centring(reference, bpm_names, all_names)
    measured_d = None if dispersion is None else _dispersion_rows(dispersion, bpm_names)
    if dispersion is not None and (not np.isfinite(dispersion_weight) or dispersion_weight <= 0):
        raise ValueError(f"dispersion_weight must be finite and > 0, got {dispersion_weight!r}")
    if dispersion_planes not in ("x", "y", "xy"):
        raise ValueError(f"dispersion_planes must be 'x', 'y' or 'xy', got {dispersion_planes!r}")
    owner = [(f, m) for f, fam in enumerate(families) for m in range(len(fam.names))]
    moved = list(families) + ([rf] if rf is not None else [])
    options: dict[str, Any] = {"method": method, "n_singular": n_singular, "alpha": alpha}
    if target is not None:
        options["target"] = np.asarray(target, float)
    if ref is not None:
        options["target"] = np.nan_to_num(ref)
    if sum_of_kicks_weight:
        options["sum_of_kicks_weight"] = sum_of_kicks_weight
        options["sum_of_kicks_columns"] = np.flatnonzero(planes == "h")
    if micado_correctors is not None:
        options = {"micado": micado_correctors, "target": options.get("target")}
    _md = run_metadata(
        description,
        plan_name="correct_orbit",
        plan_args={
            "bpms": bpms.name,
            "correctors": [f.name for f in families],
            "response": None if response is None else response.uid,
            "method": method,
            "n_singular": n_singular,
            "alpha": alpha,
            "micado_correctors": micado_correctors,
            "gain": repr(gain),
            "bpm_select": repr(bpm_select),
            "select": repr(select),
            "rf": rf is not None,
            "sum_of_kicks_weight": sum_of_kicks_weight,
            "target": target is not None,
            "reference": None
            if reference is None
            else (reference.uid if isinstance(reference, Result) else "array"),
            "reference_point": reference_point if isinstance(reference, Result) else None,
            "dispersion": None if dispersion is None else dispersion.uid,
            "dispersion_weight": dispersion_weight if dispersion is not None else None,
            "dispersion_planes": dispersion_planes if dispersion is not None else None,
            "iterations": iterations,
            "tolerance": tolerance,
            "n_samples": n_samples,
        },
        units={
            "correction-kicks": "rad",
            "correction-rf_step": "Hz",
            "correction-alpha": "m/rad",
            "orbit-x": "m",
            "orbit-y": "m",
            "orbit-rms": "m",
        },
        num_points=iterations,
        corrector_names=col_names,
        bpm_names=bpm_names,
    )
    _md.update(md or {})

    def measure_orbit_now(after: float) -> MsgGenerator[tuple[np.ndarray, float, np.ndarray]]:
        """Frames taken at or after ``after``: mean orbit, next time, standard errors.

        The mean orbit (x then y, m) of ``n_samples`` frames, the time to read the next
        after, and the mean's standard error per reading (m; zero from a single frame).
        """
        samples = []
        for _ in range(n_samples):
            frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
            samples.append(np.concatenate([frame.x[rows], frame.y[rows]]))
            after = frame.time + 2e-6
        error = np.std(samples, axis=0, ddof=1) / np.sqrt(n_samples) if n_samples > 1 else 0.0
        return np.mean(samples, axis=0), after, np.broadcast_to(error, samples[0].shape)

    def plan() -> MsgGenerator[str]:
        snapshot = yield from take_snapshot(description, moved)
        # the starting orbit is taken with the current readbacks (never an older frame)
        start_time = 0.0
        for fam in moved:
            _, stamp = yield from call_async(fam.stamped_readbacks)
            start_time = max(start_time, stamp)
        hardware = {n: v for f in snapshot.setpoints.values() for n, v in f.items()}
        if response is None:
            matrix, rf_column = yield from compute(
                model_response, description, hardware, bpm_names, col_names
            )
        else:
            matrix = np.asarray(response.data["matrix"], float)
            rf_column = response.data.get("rf_column")
        if rf is not None and micado_correctors is None:
            if rf_column is None or not np.all(np.isfinite(rf_column)):
                raise ValueError("correct_orbit(rf=...): the response has no RF column")
            options["rf_column"] = np.asarray(rf_column, float)
        valid = np.all(np.isfinite(matrix), axis=1)
        if ref is not None:
            valid &= np.isfinite(ref)
        # with quadrupole centring: the goal moves with the correctors as (reading - beam in
        # the quadrupole) does, so the correction solves with R - D against the present goal
        centre_terms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        if centring is not None:
            d_all, d_rf = yield from compute(
                quadrupole_centring_response,
                description,
                hardware,
                bpm_names,
                centring.quadrupoles,
                all_names,
            )
            k_start = yield from _strengths(families, owner, np.arange(len(all_names)))
            known = np.isfinite(centring.start)
            k_bba = np.where(known, centring.start, k_start)
            # each row's centre was found at the BBA's start plus its BPM's scan knob
            k_centre = k_bba + np.vstack([centring.bumps, centring.bumps])
            centre_terms = (d_all, d_rf, k_start, k_centre)
            matrix = matrix - d_all[:, columns]
            if "rf_column" in options:
                options["rf_column"] = options["rf_column"] - d_rf
        options["bpm_weights"] = valid.astype(float)
        goal_ref = options.get("target")
        goal_ref = np.zeros(matrix.shape[0]) if goal_ref is None else np.asarray(goal_ref, float)
        goal = goal_ref
        has_target = options.get("target") is not None or centring is not None
        if options.get("method") == "tikhonov" and options.get("alpha") is None:
            s_max = yield from compute(largest_singular_value, matrix)
            options["alpha"] = DEFAULT_RELATIVE_ALPHA * s_max
        nrow = matrix.shape[0]
        d_matrix = d_error = None
        if measured_d is not None:
            # the dispersion rows: w * (D - D_model) and w * R_D, below the orbit rows. The
            # model has none of the errors the correctors compensate: at their setpoints it
            # would carry the opposite of the machine's error orbit (0.5 mm rms on the EBS
            # twin) through its sextupoles, and predict a coupled, wrong dispersion. The
            # target and the response are the model's with the correctors at zero kick, the
            # machine the correction aims at.
            ideal = _without_kicks(description, hardware, all_names)
            r_d, d_model = yield from compute(
                dispersion_response, description, ideal, bpm_names, col_names
            )
            w = float(dispersion_weight)
            d_error = w * (measured_d - d_model)
            d_matrix = w * r_d
            d_valid = np.isfinite(d_error) & np.all(np.isfinite(d_matrix), axis=1)
            d_valid &= np.repeat([p in dispersion_planes for p in "xy"], len(rows))
            d_error = np.where(d_valid, d_error, 0.0)
            d_matrix = np.where(d_valid[:, None], d_matrix, 0.0)
            matrix = np.vstack([matrix, d_matrix])
            options["bpm_weights"] = np.concatenate([valid, d_valid]).astype(float)
            if "rf_column" in options:
                options["rf_column"] = np.concatenate([options["rf_column"], np.zeros(nrow)])
        used_alpha = float(options.get("alpha") or 0.0)  # 0: no Tikhonov term
        applied = np.zeros(len(columns))
        rf_applied = 0.0

        def set_goal() -> None:
            """The orbit goal at the correctors' present strengths, and the solve's target."""
            nonlocal goal
            goal = goal_ref
            if centre_terms is not None:
                d_all, d_rf, k_start, k_centre = centre_terms
                k_now = k_start.copy()
                k_now[columns] += applied
                goal = quadrupole_centring_goal(goal_ref, d_all, k_now, k_centre)
                goal = goal + d_rf * rf_applied
            if has_target:
                target = goal if d_matrix is None else np.concatenate([goal, np.zeros(nrow)])
                options["target"] = target

        baseline = Record(
            "orbit",
            {"x": np.zeros(len(rows)), "y": np.zeros(len(rows)), "rms": 0.0},
            {"x": "m", "y": "m", "rms": "m"},
            source=bpms.name,
        )
        step = Record(
            "correction",
            {"iteration": 0, "kicks": np.zeros(len(columns)), "rf_step": 0.0, "alpha": 0.0},
            {"kicks": "rad", "rf_step": "Hz", "alpha": "m/rad"},
        )

        def rms(orbit: np.ndarray) -> float:
            """The rms distance (m) from the target or reference, over the BPMs used."""
            return float(np.sqrt(np.mean((orbit - goal)[valid] ** 2)))

        def objective(orbit: np.ndarray) -> float:
            """The rms of what the solve minimises (orbit, and predicted weighted D error)."""
            if d_matrix is None or d_error is None:
                return rms(orbit)
            rows_d = (d_error + d_matrix @ applied)[options["bpm_weights"][nrow:] > 0]
            rows_o = (orbit - goal)[valid]
            return float(np.sqrt(np.mean(np.concatenate([rows_o, rows_d]) ** 2)))

        set_goal()

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            nonlocal rf_applied
            orbit, after, error = yield from measure_orbit_now(start_time)
            n = len(rows)
            yield from bps.create("baseline")
            yield from bps.read(baseline.update(x=orbit[:n], y=orbit[n:], rms=rms(orbit)))
            yield from bps.save()
            for k in range(iterations):
                if objective(orbit) <= tolerance:
                    break
                yield from bps.checkpoint()
                if micado_correctors is None:
                    current = yield from _strengths(families, owner, columns)
                    low, high = _strength_limits(families, owner, columns)
                    options["lower"], options["upper"] = low - current, high - current
                rhs = np.nan_to_num(orbit)
                if d_matrix is not None and d_error is not None:
                    rhs = np.concatenate([rhs, d_error + d_matrix @ applied])
                kicks, df = yield from compute(orbit_correction_step, matrix, rhs, options)
                kicks = kicks * np.where(planes == "h", gains[0], gains[1])
                df = float(df) * gains[0]
                before_rms = objective(orbit)
                after = yield from _apply(families, owner, columns, kicks, rf, df)
                applied[:] = applied + kicks
                rf_applied += df
                set_goal()
                orbit, after, error = yield from measure_orbit_now(after)
                yield from bps.create("primary")
                yield from bps.read(
                    step.update(iteration=k + 1, kicks=kicks, rf_step=df, alpha=used_alpha)
                )
                yield from bps.read(baseline.update(x=orbit[:n], y=orbit[n:], rms=rms(orbit)))
                yield from bps.save()
                noise = float(np.sqrt(np.mean(error[valid] ** 2))) if valid.any() else 0.0
                if diverged(before_rms, objective(orbit), noise):
                    raise RuntimeError(
                        f"correct_orbit diverged at iteration {k + 1}: rms orbit "
                        f"{before_rms * 1e6:.1f} -> {objective(orbit) * 1e6:.1f} um; restoring"
                    )
                if objective(orbit) > 0.95 * before_rms:
                    break  # no longer improving

        return (yield from restore_on_exit(run(), moved, snapshot, policy="correction"))

    return (yield from plan())


def reference_orbit(reference: Result | np.ndarray, bpm_names: Sequence[str]) -> np.ndarray:
    """The reference orbit (m) at ``bpm_names``: x then y, NaN where there is none.

    Args:
        reference: an array of ``2 * nbpm`` values (x then y) or of shape (2, nbpm), in m,
            NaN for a reading without a reference; or a ``bba`` result: its accepted centres
            (``center_x`` / ``center_y`` where ``accepted_x`` / ``accepted_y``).
        bpm_names: the BPMs (in the order of the orbit).

    Raises:
        ValueError: a result of another kind, or an array of the wrong size.
    """
    n = len(bpm_names)
    if isinstance(reference, Result):
        if reference.kind != "bba":
            raise ValueError(f"a reference result must be of kind 'bba', got {reference.kind!r}")
        out = np.full(2 * n, np.nan)
        index = {str(b): k for k, b in enumerate(reference.data["bpm_names"])}
        for p, plane in enumerate("xy"):
            centre = np.asarray(reference.data[f"center_{plane}"], float)
            accepted = np.asarray(reference.data[f"accepted_{plane}"], bool)
            for i, name in enumerate(bpm_names):
                k = index.get(str(name))
                if k is not None and accepted[k]:
                    out[p * n + i] = centre[k]
        return out
    arr = np.asarray(reference, dtype=float)
    if arr.size != 2 * n or arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 2):
        raise ValueError(
            f"the reference must have 2 x {n} values (x then y, m), got shape {arr.shape}"
        )
    return arr.reshape(2 * n).copy()


@dataclass(frozen=True)
class _Centring:
    """What a ``bba`` result says of the corrector state each centre was found in.

    Attributes:
        quadrupoles: per selected BPM its BBA'd quadrupole, ``None`` without a centre.
        bumps: (nbpm, ncorr) the scan knobs at the centre amplitudes, both planes (rad).
        start: (ncorr,) the correctors' strengths at the BBA's start (rad), NaN for a
            corrector the result does not name.
    """

    quadrupoles: list[str | None]
    bumps: np.ndarray
    start: np.ndarray


def _centring(
    reference: Result, bpm_names: Sequence[str], corrector_names: Sequence[str]
) -> _Centring:
    """The quadrupole centring of a ``bba`` reference, over ``corrector_names``.

    Raises:
        ValueError: the result lacks the corrector state (an older schema), or a scan knob
            uses a corrector the correction does not have.
    """
    data = reference.data
    needed = ("center_amplitude_x", "center_amplitude_y", "corrector_names", "corrector_start")
    missing = [k for k in needed if k not in data]
    if missing:
        raise ValueError(
            f"the bba result {reference.uid} has no {missing}: it cannot centre the beam in the "
            "quadrupoles; use reference_point='bpm'"
        )
    column = {str(n): j for j, n in enumerate(corrector_names)}
    start = np.full(len(corrector_names), np.nan)
    for name, value in zip(data["corrector_names"], data["corrector_start"], strict=True):
        if str(name) in column:
            start[column[str(name)]] = float(value)
    index = {str(b): k for k, b in enumerate(data["bpm_names"])}
    amplitude = np.nan_to_num(np.c_[data["center_amplitude_x"], data["center_amplitude_y"]])
    quadrupoles: list[str | None] = []
    bumps = np.zeros((len(bpm_names), len(corrector_names)))
    for i, name in enumerate(bpm_names):
        k = index.get(str(name))
        accepted = k is not None and any(bool(np.asarray(data[f"accepted_{p}"])[k]) for p in "xy")
        quadrupoles.append(str(data["quadrupole_names"][k]) if accepted and k is not None else None)
        if not accepted:
            continue
        for b, p, c, v in zip(
            data["knob_bpm"], data["knob_plane"], data["knob_correctors"], data["knob_kicks"],
            strict=True,
        ):  # fmt: skip
            if int(b) != k:
                continue
            if str(c) not in column:
                raise ValueError(
                    f"the bba result {reference.uid}: {name}'s scan knob uses {c}, which is "
                    "not among the correction's correctors: give its family, or "
                    "reference_point='bpm'"
                )
            bumps[i, column[str(c)]] += amplitude[k, "xy".index(str(p))] * float(v)
    return _Centring(quadrupoles, bumps, start)


def diverged(before: float, after: float, noise: float) -> bool:
    """Whether a correction step diverged: the rms (m) grew by half and beyond the noise.

    ``noise`` is the rms standard error of the orbit's mean (m). At the noise level a step
    can grow the rms by half without anything wrong (a converged correction's next step):
    that is a step that no longer improves, not a divergence. Divergent: ``after > 1.5
    before`` and ``after > before + 3 noise``.
    """
    return after > 1.5 * before and after > before + 3.0 * noise


def _without_kicks(
    description: MachineDescription, hardware: Mapping[str, float], correctors: Sequence[str]
) -> dict[str, float]:
    """``hardware`` with ``correctors`` at the hardware value of a zero kick."""
    ideal = dict(hardware)
    for name in correctors:
        calibration = description.device(name).calibration
        zero = 0.0 if calibration is None else float(calibration.to_hardware(0.0))
        ideal[name] = zero
    return ideal


def _check_response(
    response: Result, bpm_names: Sequence[str], corrector_names: Sequence[str]
) -> None:
    if response.kind != "orm":
        raise ValueError(f"correct_orbit needs an 'orm' result, got {response.kind!r}")
    if list(response.data["bpm_names"]) != list(bpm_names):
        raise ValueError("the response's BPMs are not the selected BPMs (same order)")
    if list(response.data["corrector_names"]) != list(corrector_names):
        raise ValueError("the response's correctors are not the selected correctors (same order)")


def _dispersion_rows(dispersion: Result, bpm_names: Sequence[str]) -> np.ndarray:
    """``[Dx; Dy]`` (m) of a dispersion result at ``bpm_names`` (NaN where not finite)."""
    if dispersion.kind != "dispersion":
        raise ValueError(f"correct_orbit needs a 'dispersion' result, got {dispersion.kind!r}")
    index = {str(n): k for k, n in enumerate(dispersion.data["bpm_names"])}
    missing = [n for n in bpm_names if n not in index]
    if missing:
        raise ValueError(
            f"the dispersion result {dispersion.uid} has no BPMs {missing[:5]}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    rows = [index[n] for n in bpm_names]
    dx = np.asarray(dispersion.data["dx"], float)[rows]
    dy = np.asarray(dispersion.data["dy"], float)[rows]
    return np.concatenate([dx, dy])


def _strengths(
    families: list[SettableFamily], owner: list[tuple[int, int]], columns: np.ndarray
) -> MsgGenerator[np.ndarray]:
    values = []
    for fam in families:
        values.append((yield from call_async(fam.strengths)))
    return np.array([values[owner[j][0]][owner[j][1]] for j in columns])


def _strength_limits(
    families: list[SettableFamily], owner: list[tuple[int, int]], columns: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    limits = [fam.limits() for fam in families]
    low = np.array([limits[owner[j][0]][0][owner[j][1]] for j in columns])
    high = np.array([limits[owner[j][0]][1][owner[j][1]] for j in columns])
    return low, high


def _apply(
    families: list[SettableFamily],
    owner: list[tuple[int, int]],
    columns: np.ndarray,
    kicks: np.ndarray,
    rf: SettableFamily | None,
    df: float,
) -> MsgGenerator[float]:
    """Add ``kicks`` (rad) to the correctors and ``df`` (Hz) to the RF; return when settled."""
    settled = 0.0
    for f, fam in enumerate(families):
        mine = [c for c, j in enumerate(columns) if owner[j][0] == f]
        if not mine:
            continue
        new = np.array((yield from call_async(fam.strengths)), float)
        for c in mine:
            new[owner[columns[c]][1]] += kicks[c]
        fam.check_strengths(new)
        _, t = yield from set_and_settle(fam, new, hardware=False)
        settled = max(settled, t)
    if rf is not None and df != 0.0:
        f0 = yield from call_async(rf.hardware_setpoints)
        _, t = yield from set_and_settle(rf, np.asarray(f0, float) + df)
        settled = max(settled, t)
    return settled
