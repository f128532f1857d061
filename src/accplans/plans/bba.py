"""``bba``: quadrupole beam-based alignment of BPMs, one BPM after the other or in groups.

For each selected BPM the plan takes its nearest quadrupole (lattice positions from the
online model), moves the beam through it with local closed bumps (both planes at once, the
same amplitudes in another order in y), and at each of ``n_positions`` bump amplitudes reads
the orbit with the quadrupole at ``K0 + dK`` and at ``K0 - dK``. The difference orbit is
proportional to the beam's distance from the quadrupole's magnetic centre;
:func:`accplans.physics.fit_bba_center` finds, per plane, the BPM reading where it vanishes,
and :func:`accplans.physics.combine_bba_planes` both planes' at once. With ``parallel=True``
groups of quadrupoles (:func:`accplans.physics.group_bba_quadrupoles`) are modulated at once,
each member's bump visiting the amplitudes in its own order, and the members' centres come
from columns fitted to the data (:func:`accplans.physics.fit_group_centres`). The physics and
its error budget are in ``docs/explanations/bba.md``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

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
from accplans.model import (
    OnlineModel,
    bump_point,
    bump_response,
    linear_orm,
    nearest_bump_correctors,
)
from accplans.physics import (
    BbaFit,
    BumpError,
    GroupCentres,
    bba_scan_orders,
    bump_kicks,
    bump_span,
    combine_bba_planes,
    decorrelated_order,
    fit_basis_kicks,
    fit_bba_center,
    fit_group_centres,
    group_bba_quadrupoles,
    knob_amplitude_at,
)

from ._record import Record
from ._safety import description_of, restore_on_exit, take_snapshot
from ._stubs import read_orbit_frames, set_and_settle
from ._worker import compute

__all__ = ["BbaGrouping", "BbaKnob", "bba", "bba_knobs", "design_bba", "design_bba_groups"]

register_result_kind(
    ResultSchema(
        kind="bba",
        version=3,
        description=(
            "Quadrupole beam-based alignment: per BPM, its quadrupole, the gradient modulation, "
            "and per plane the BPM reading at which the modulation does not move the orbit "
            "(the quadrupole's centre as the BPM reads it), its uncertainty, the fit's slope "
            "and quality, and why a fit was rejected; the scan knobs (bump kicks per metre) and "
            "the knob amplitude at the centre; the correctors' strengths the scans started "
            "from (with the knobs, the corrector state each centre was found in); the group "
            "each BPM's quadrupole was modulated in (parallel BBA: several at once) and the "
            "plan's machine steps (set-wait-read steps)."
        ),
        fields={
            "planes": FieldSpec("", "()", "str", choices=("x", "y", "xy")),
            "bpm_names": FieldSpec("", "(nsel,)", "str"),
            "quadrupole_names": FieldSpec("", "(nsel,)", "str"),
            "distance": FieldSpec("m", "(nsel,)"),
            "dk": FieldSpec("1/m^2", "(nsel,)"),
            "center_x": FieldSpec("m", "(nsel,)"),
            "center_y": FieldSpec("m", "(nsel,)"),
            "std_center_x": FieldSpec("m", "(nsel,)"),
            "std_center_y": FieldSpec("m", "(nsel,)"),
            "slope_x": FieldSpec("", "(nsel,)"),
            "slope_y": FieldSpec("", "(nsel,)"),
            "chi2_red_x": FieldSpec("", "(nsel,)"),
            "chi2_red_y": FieldSpec("", "(nsel,)"),
            "accepted_x": FieldSpec("", "(nsel,)", "bool"),
            "accepted_y": FieldSpec("", "(nsel,)", "bool"),
            "rejected_x": FieldSpec("", "(nsel,)", "str"),
            "rejected_y": FieldSpec("", "(nsel,)", "str"),
            "positions_x": FieldSpec("m", "(nsel, npos)"),
            "positions_y": FieldSpec("m", "(nsel, npos)"),
            "projections_x": FieldSpec("m", "(nsel, npos)"),
            "projections_y": FieldSpec("m", "(nsel, npos)"),
            "knob_bpm": FieldSpec("", "(nknob,)", "int"),
            "knob_plane": FieldSpec("", "(nknob,)", "str", choices=("x", "y")),
            "knob_correctors": FieldSpec("", "(nknob,)", "str"),
            "knob_kicks": FieldSpec("rad/m", "(nknob,)"),
            "center_amplitude_x": FieldSpec("m", "(nsel,)"),
            "center_amplitude_y": FieldSpec("m", "(nsel,)"),
            "corrector_names": FieldSpec("", "(ncorr,)", "str"),
            "corrector_start": FieldSpec("rad", "(ncorr,)"),
            "group": FieldSpec("", "(nsel,)", "int"),
            "modulation_sign": FieldSpec("", "(nsel,)"),
            "inflation": FieldSpec("", "(nsel,)"),
            "n_steps": FieldSpec("", "()", "int"),
        },
    )
)

#: largest relative gradient modulation the plan accepts (tune shift, beam stability)
MAX_DK_REL = 0.1
#: largest model orbit change outside a scan bump, relative to its amplitude, besides the
#: energy change of a horizontal bump at fixed RF (coupling through off-centre sextupoles
#: leaks a little; a leak is harmless to BBA, a huge kick is not)
_MAX_LEAK = 1e-2


@dataclass(frozen=True)
class BbaKnob:
    """What the model gives for one BPM (a worker job's answer, see :func:`design_bba`).

    Attributes:
        bpm: the BPM's name.
        quadrupole: its nearest quadrupole's name.
        distance: BPM position minus quadrupole centre along the ring [m].
        correctors: per plane (``"x"``, ``"y"``) the bump's corrector names.
        kicks: per plane the kicks [rad] per metre of beam position at the quadrupole.
    """

    bpm: str
    quadrupole: str
    distance: float
    correctors: dict[str, tuple[str, ...]]
    kicks: dict[str, np.ndarray]


def _nearest_quadrupole(
    model: OnlineModel, bpm_element: int, quads: Mapping[str, Sequence[int]]
) -> tuple[str, float]:
    """The quadrupole whose centre is nearest to the BPM along the ring, and the distance."""
    ring = model.lattice
    circumference = float(ring.circumference)
    _, s_bpm = bump_point(model, bpm_element)
    best, best_d = "", np.inf
    for name, elements in quads.items():
        first, last = min(elements), max(elements)
        _, start = bump_point(model, first)
        length = sum(float(getattr(ring[e], "Length", 0.0)) for e in range(first, last + 1))
        d = s_bpm - (start + 0.5 * length)
        d = (d + 0.5 * circumference) % circumference - 0.5 * circumference
        if abs(d) < abs(best_d):
            best, best_d = name, d
    return best, float(best_d)


def _smallest_bump(
    model: OnlineModel, point: int, family: list[str], plane: str, n_candidates: int
) -> tuple[list[str], np.ndarray]:
    """The closed 3-corrector bump of unit position at ``point`` with the smallest largest kick.

    The 3 nearest correctors can be nearly degenerate (a phase advance near pi between two of
    them needs huge kicks); every triple of the ``n_candidates`` nearest that closes the
    bump is tried. Closes: the model's orbit change outside the bump is at most ``_MAX_LEAK``
    of its amplitude; in x, with an RF step that keeps the energy (the kicks are those of the
    geometric bump: applied alone, at fixed RF, they also change the energy, linearly in the
    amplitude, which is harmless to BBA). If none does, the one that leaks least, up to 10
    times that; else ``([], ...)``.
    """
    candidates = nearest_bump_correctors(model, point, family, min(n_candidates, len(family)))
    response = bump_response(model, point, plane, candidates)
    n_ring = len(model.lattice)
    bpm_elements = [int(model.description.device(b).elements[0]) for b in response.bpms]
    corr_elements = [int(model.description.device(c).elements[0]) for c in candidates]
    best: tuple[list[str], np.ndarray] = ([], np.zeros(0))
    best_max = np.inf
    least_leak: tuple[float, list[str], np.ndarray] = (np.inf, [], np.zeros(0))
    for triple in itertools.combinations(range(len(candidates)), 3):
        cols = list(triple)
        # a closed bump: no change at the BPMs outside its first and last corrector
        inside = bump_span(point, [corr_elements[c] for c in cols], bpm_elements, n_ring)
        point_row = response.point_matrix[[0]][:, cols]
        outside = response.bpm_matrix[~inside][:, cols]
        if plane == "x":  # solve with the RF step as an unknown, apply only the kicks: the
            # geometric bump (its energy change at fixed RF is linear in the amplitude)
            point_row = np.c_[point_row, response.point_rf[0]]
            outside = np.c_[outside, response.bpm_rf[~inside]]
        try:
            solution = bump_kicks(point_row, outside, [1.0])
        except BumpError:
            continue
        leak = float(np.max(np.abs(solution.outside), initial=0.0))
        biggest = float(np.max(np.abs(solution.kicks[:3])))
        if leak <= _MAX_LEAK and biggest < best_max:
            best = ([candidates[c] for c in cols], np.asarray(solution.kicks[:3], float))
            best_max = biggest
        if leak < least_leak[0]:
            least_leak = (leak, [candidates[c] for c in cols], solution.kicks[:3])
    if not best[0] and least_leak[0] <= 10 * _MAX_LEAK:  # the best that closes a little less
        best = (least_leak[1], np.asarray(least_leak[2], float))
    return best


def design_bba(
    description: MachineDescription,
    hardware: Mapping[str, float],
    bpms: Sequence[str],
    quadrupoles: Sequence[str],
    quadrupole_of: Mapping[str, str],
    planes: str,
    hcorr: Sequence[str],
    vcorr: Sequence[str],
    n_candidates: int = 6,
) -> list[BbaKnob]:
    """Each BPM's quadrupole and the bumps that move the beam through it (a worker job).

    Args:
        description: the machine description.
        hardware: hardware setpoints (A, Hz) of the magnets and RF, for the online model.
        bpms: the BPMs to align.
        quadrupoles: candidate quadrupoles (names of the quadrupole family).
        quadrupole_of: explicit BPM -> quadrupole choices (others: the nearest candidate).
        planes: ``"x"``, ``"y"`` or ``"xy"``.
        hcorr: the horizontal correctors (bump candidates).
        vcorr: the vertical correctors.
        n_candidates: the bump of each plane is the closed 3-corrector bump with the smallest
            largest kick among these many correctors nearest to the quadrupole.

    Raises:
        BumpError: no closed bump through a quadrupole with the nearest correctors.
    """
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    quad_elements = {q: list(description.device(q).elements) for q in quadrupoles}
    out = []
    for bpm in bpms:
        element = int(description.device(bpm).elements[0])
        if bpm in quadrupole_of:
            quad = quadrupole_of[bpm]
            _, distance = _nearest_quadrupole(model, element, {quad: quad_elements[quad]})
        else:
            quad, distance = _nearest_quadrupole(model, element, quad_elements)
        point = min(quad_elements[quad])
        correctors, kicks = {}, {}
        for plane in planes:
            # three correctors: a horizontal bump also changes the path length, so at fixed
            # RF the energy, a change linear in the amplitude that the fit does not mind (a
            # fourth corrector to keep it costs several times the kicks on a small ring)
            names, kick = _smallest_bump(
                model, point, list(hcorr if plane == "x" else vcorr), plane, n_candidates
            )
            if not names:
                raise BumpError(f"bba: no closed {plane} bump through {quad} (for {bpm})")
            correctors[plane] = tuple(names)
            kicks[plane] = kick
        out.append(BbaKnob(bpm, quad, distance, correctors, kicks))
    return out


@dataclass(frozen=True)
class BbaGrouping:
    """The groups of parallel BBA (a worker job's answer, see :func:`design_bba_groups`).

    Attributes:
        groups: indices of the knobs (BPMs) whose quadrupoles are modulated together.
        signs: (nsel,) the sign of each quadrupole's first modulation in its group.
        inflation: (nsel,) variance inflation of each quadrupole's kick estimate.
        tune_shift: (ngroups, 2) each group's model tune shift at its first modulation.
    """

    groups: tuple[tuple[int, ...], ...]
    signs: np.ndarray
    inflation: np.ndarray
    tune_shift: np.ndarray


def _kick_columns(
    model: OnlineModel, bpm_names: Sequence[str], quads: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's orbit responses at the BPMs to a uniform dipole field in each quadrupole.

    A beam at ``x - x0`` in a quadrupole whose gradient changes by ``dK`` sees the field of a
    uniform dipole ``-dK (x - x0)`` along the quadrupole: the exact linear response of the
    closed orbit at the fixed RF frequency (``accplans.model.linear_orm``) to a ``KickAngle``
    of the quadrupole's elements, shared in proportion to their lengths. A thin kick at the
    quadrupole's centre is not enough: EBS quadrupoles are up to ~0.8 rad of betatron phase
    long, and the thin kick's shape error leaks one member's kick into another's.

    Returns:
        ``(columns, beta_q, length)``: (2 nbpm, nq, 2) [m/rad]; (nq, 2) beta at the
        quadrupoles (mean of entrance and exit) [m]; (nq,) their lengths [m].
    """
    ring = model.lattice.deepcopy()
    bpm_el = [int(model.description.device(b).elements[0]) for b in bpm_names]
    elements = sorted({int(e) for q in quads for e in q})
    lengths = {e: float(getattr(ring[e], "Length", 0.0)) for e in elements}
    for e in elements:
        ring[e].KickAngle = np.zeros(2)
    planes = ["x"] * len(elements) + ["y"] * len(elements)
    matrix = linear_orm(ring, bpm_el, elements + elements, planes, dct=model.dct)
    col = {e: k for k, e in enumerate(elements)}
    nq, ne = len(quads), len(elements)
    columns = np.zeros((2 * len(bpm_el), nq, 2))
    length = np.array([sum(lengths[e] for e in q) for q in quads])
    for i, q in enumerate(quads):
        for e in q:
            share = lengths[e] / length[i] if length[i] > 0 else 1.0 / len(q)
            columns[:, i, 0] += share * matrix[:, col[e]]
            columns[:, i, 1] += share * matrix[:, ne + col[e]]
    ends = [(min(q), max(q) + 1) for q in quads]
    refs = np.unique([e for pair in ends for e in pair]).astype(np.int64)
    optics = model.optics(refs)
    pos = {int(e): k for k, e in enumerate(refs)}
    beta_q = 0.5 * (optics.beta[[pos[a] for a, _ in ends]] + optics.beta[[pos[z] for _, z in ends]])
    return columns, beta_q, length


def design_bba_groups(
    description: MachineDescription,
    hardware: Mapping[str, float],
    knobs: Sequence[BbaKnob],
    bpm_names: Sequence[str],
    dk_rel: float,
    max_group: int,
    max_inflation: float,
) -> BbaGrouping:
    """Group the knobs' quadrupoles for parallel BBA (a worker job).

    Each quadrupole's scan covers the arc from the first to the last of its bump correctors,
    its BPM and itself; the kick columns are the model's thin-kick responses at ``bpm_names``
    (:func:`accplans.physics.group_bba_quadrupoles` does the grouping); the modulation signs
    cancel the group's tune shift (``beta dK L / 4 pi`` per quadrupole).
    """
    model = OnlineModel(description)
    model.set_hardware(dict(hardware))
    n_ring = len(model.lattice)
    quads = [list(description.device(k.quadrupole).elements) for k in knobs]
    columns, beta_q, length = _kick_columns(model, bpm_names, quads)
    arcs = np.zeros((len(knobs), 2), np.int64)
    for i, knob in enumerate(knobs):
        point = min(quads[i])
        touched = [*quads[i], int(description.device(knob.bpm).elements[0])]
        for names in knob.correctors.values():
            touched += [int(description.device(c).elements[0]) for c in names]
        rel = (np.asarray(touched) - point + n_ring // 2) % n_ring - n_ring // 2
        arcs[i] = ((point + int(rel.min())) % n_ring, int(rel.max() - rel.min()))
    # +dK = +dk_rel |K0| raises K (more focusing in x, less in y), whatever the sign of K0
    dk = dk_rel * np.abs([model.strength(k.quadrupole) for k in knobs])
    shifts = np.c_[beta_q[:, 0], -beta_q[:, 1]] * (dk * length)[:, None] / (4 * np.pi)
    nb = len(bpm_names)
    groups = group_bba_quadrupoles(
        [columns[:nb, :, 0], columns[nb:, :, 1]],
        arcs,
        n_ring,
        max_group=max_group,
        max_inflation=max_inflation,
        tune_shifts=shifts,
    )
    return BbaGrouping(groups.groups, groups.signs, groups.inflation, groups.tune_shift)


def bba(
    bpms: OrbitSource,
    quadrupoles: SettableFamily,
    hcorr: SettableFamily,
    vcorr: SettableFamily,
    *,
    select: Any = None,
    quadrupole_of: Mapping[str, str] | None = None,
    dk_rel: float = 0.05,
    n_positions: int = 5,
    span_m: float = 100e-6,
    planes: str = "xy",
    n_samples: int = 2,
    min_slope_snr: float = 10.0,
    max_chi2_red: float = 5.0,
    parallel: bool = False,
    max_group: int = 8,
    max_inflation: float = 20.0,
    fit_coupling: bool = True,
    response: Result | None = None,
    timeout: float = 10.0,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Beam-based alignment: the reading of each selected BPM at its quadrupole's centre.

    For each selected BPM, one after the other: its nearest quadrupole (or ``quadrupole_of``)
    is modulated by ``+-dK = +-dk_rel * |K0|`` while local closed bumps (3 correctors per
    plane among the 6 nearest, the closing triple with the smallest kicks; from the online
    model in the worker process) move the beam through it at ``n_positions`` amplitudes from
    ``-span_m`` to ``+span_m`` around the present orbit, both planes together (y visits the
    amplitudes in another order, so that the coupling of one plane's kick into the other's
    orbit is fitted and both planes are centred at once:
    :func:`~accplans.physics.combine_bba_planes`). At each amplitude the orbit is read
    (``n_samples`` fresh frames each) at ``K0 + dK`` then ``K0 - dK``; the difference orbit,
    projected on its dominant direction, is fitted by a line against the BPM's reading (the
    mean of both), and its zero crossing is the centre, with an uncertainty from the frames'
    scatter and the residuals (:func:`~accplans.physics.fit_bba_center`). A fit with too
    little slope, poor linearity or a centre far outside the scan is rejected and the reason
    recorded. Run it on a corrected orbit.

    Parallel BBA (``parallel=True``): the quadrupoles are modulated in groups of up to
    ``max_group`` whose scans do not touch (no bump reaches another member's quadrupole or
    BPM) and whose kicks the difference orbit tells apart (the model's responses to kicks at
    the members are nearly orthogonal: each kick's least-squares variance is at most
    ``max_inflation`` times what it would be alone), from the online model's optics in the
    worker process (:func:`~accplans.physics.group_bba_quadrupoles`). All the group's
    quadrupoles are modulated together (signs chosen to cancel the tune shifts) and all its
    bumps move at each step, each member visiting the amplitudes in its own independent order
    (:func:`~accplans.physics.bba_scan_orders`) over ``max(n_positions, 2 N + 2)`` positions
    for a group of ``N`` (``N + 2`` with ``fit_coupling=False``). Every BPM row of the
    difference orbits is then a linear regression on the members' readings of both planes,
    which gives each member's columns from the data, with no optics model, and the centres by
    weighted least squares (:func:`~accplans.physics.fit_group_centres`). It takes
    ``2 * max(n_positions, 2 N + 2)`` machine steps per group instead of ``2 * n_positions``
    per BPM. On the EBS twin its centres are 2-3 um rms from the truth, against the serial
    method's ~1 um (``docs/explanations/bba.md``).

    Parallel BBA with a measured ORM (``response``): outside the stretch between the two
    correctors (per plane) that bracket a quadrupole, the orbit its kick makes is a
    combination of those correctors' measured responses (to ~1e-3 on the EBS twin, the
    path-length term): the measurement carries the optics errors, BPM gains and rolls that a
    model lacks. Each difference orbit is split over the members' four measured shapes by
    weighted least squares (:func:`~accplans.physics.fit_basis_kicks`, the BPMs between any
    member's bracketing correctors left out), and each member's coefficients are fitted
    against its readings like a serial scan's difference orbits
    (:func:`~accplans.physics.fit_bba_center`, both planes combined). The members then need
    no more positions than a BPM alone: ``2 * n_positions`` steps per group; they visit the
    amplitudes in independent orders (each in the serial scan's x-y pattern). What limits
    it: a member's kick also moves the beam in the other modulated quadrupoles, whose
    changed kicks show on their own shapes (third order in ``dK``: 5-7 % of the kick in x,
    ~1 % in y on EBS at ``dk_rel = 0.05``, a quarter of that at 0.025); on the EBS twin the
    centres are 3-4 um rms from the truth (``docs/explanations/bba.md``).

    Hysteresis: the quadrupole goes to ``K0 - dK`` before the first reading, so every
    ``K0 + dK`` is approached from below and every ``K0 - dK`` from above: every reading of
    a sign lies on the same branch of the same minor loop, and the zero crossing is unchanged
    by the hysteresis (it only scales the slope). A group changes sign through ``K0`` (each
    member still moves one way), so that while its members' puts land one by one the tune
    moves by at most half the group's summed shifts, not all of it.

    Everything is checked before anything moves: the BPM names, ``dK`` against the
    quadrupoles' limits (and ``dk_rel`` within ``(0, 0.1]``), every bump amplitude against the
    correctors' limits. A measurement plan: it changes the selected BPMs' quadrupoles and the
    bump correctors, and restores the quadrupoles' and correctors' setpoints (currents; a
    quadrupole with hysteresis ends on its ascending branch) on success, failure, abort and
    stop. The orbit feedback is paused while it runs (the plan claims the magnets).

    Args:
        bpms: the BPM family (an orbit source).
        quadrupoles: the quadrupole family (candidates for each BPM's quadrupole).
        hcorr: the horizontal corrector family.
        vcorr: the vertical corrector family.
        select: the BPMs to align (names, indices or a mask of ``bpms``); all by default.
        quadrupole_of: ``{bpm: quadrupole}`` overriding the nearest quadrupole.
        dk_rel: the modulation, a fraction of each quadrupole's strength (``dK = dk_rel * |K0|``
            in 1/m^2), in ``(0, 0.1]``.
        n_positions: bump amplitudes per BPM (>= 3).
        span_m: largest bump amplitude at the quadrupole (m), in both planes.
        planes: ``"x"``, ``"y"`` or ``"xy"`` (both under one modulation).
        n_samples: orbit frames averaged per reading (>= 2 measures the noise from their
            scatter; 1 takes the uncertainties from the fit residuals alone).
        min_slope_snr: reject a fit whose slope is below this many standard deviations.
        max_chi2_red: reject a fit whose reduced chi-square exceeds this.
        parallel: modulate groups of quadrupoles at once (see above).
        max_group: most quadrupoles in a group (parallel).
        max_inflation: largest variance inflation of a member's kick estimate (parallel, >= 1).
        response: a measured ORM (``load_result(client, uid, "orm")`` of ``measure_orm``
            with every BPM of ``bpms`` as rows, x then y, and every corrector that brackets
            a BBA'd quadrupole as a column): parallel
            BBA then splits each difference orbit over the members' measured shapes (see
            above) instead of fitting the members' columns from the scans.
        fit_coupling: parallel, both planes: fit the members' columns of both planes together
            (every row regressed on the readings of both planes: the machine's coupling of
            one plane's kick into the other's orbit is fitted, a group of ``N`` scans
            ``2 N + 2`` positions); ``False``: each plane alone (``N + 2`` positions; the
            coupling then biases the centres by the cross-plane response times the other
            plane's offset).
        timeout: longest wait for one fresh frame (s).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run: one ``primary`` event per reading (BPM, amplitude and sign indices,
        bump amplitude in m, quadrupole strength in 1/m^2, orbit in m) and the result ``bba``
        (``load_result(client, uid, "bba")``: per BPM its quadrupole, ``dK``, per plane the
        centre and its uncertainty in m, slope, reduced chi-square, accepted / rejected with
        the reason, the scan's readings and projections, the bump knobs in rad/m, each BPM's
        group and modulation sign, and ``n_steps``, the plan's set-wait-read steps:
        ``2 * n_positions`` per group, a group being one BPM in serial BBA).
    """
    description = description_of(bpms, quadrupoles, hcorr, vcorr)
    if planes not in ("x", "y", "xy"):
        raise ValueError(f"bba: planes must be 'x', 'y' or 'xy', got {planes!r}")
    if not (np.isfinite(dk_rel) and 0 < dk_rel <= MAX_DK_REL):
        raise ValueError(f"bba: dk_rel must be in (0, {MAX_DK_REL}], got {dk_rel!r}")
    if not (np.isfinite(span_m) and 0 < span_m <= 5e-3):
        raise ValueError(f"bba: span_m must be in (0, 5e-3] m, got {span_m!r}")
    if max_group < 1 or not max_inflation >= 1:
        raise ValueError(
            f"bba: max_group >= 1 and max_inflation >= 1, got {max_group!r}, {max_inflation!r}"
        )
    least = 4 if planes == "xy" else 3
    if n_positions < least or n_samples < 1:
        raise ValueError(
            f"bba: n_positions >= {least} (planes {planes!r}) and n_samples >= 1, got "
            f"{n_positions}, {n_samples}"
        )
    bpm_names = [str(n) for n in bpms.names]
    if response is not None:
        _check_bba_response(response, bpm_names, parallel)
    rows = resolve_select(select, bpm_names, owner=bpms.name)
    chosen = [bpm_names[int(i)] for i in rows]
    if not chosen:
        raise ValueError("bba: no BPM selected")
    quad_names = [str(n) for n in quadrupoles.names]
    overrides = dict(quadrupole_of or {})
    bad = {b: q for b, q in overrides.items() if b not in chosen or q not in quad_names}
    if bad:
        raise ValueError(
            f"bba: quadrupole_of {bad}: keys must be selected BPMs, values members of "
            f"{quadrupoles.name}"
        )
    hnames, vnames = [str(n) for n in hcorr.names], [str(n) for n in vcorr.names]
    nb = len(bpm_names)
    _md = run_metadata(
        description,
        plan_name="bba",
        plan_args={
            "bpms": bpms.name,
            "quadrupoles": quadrupoles.name,
            "hcorr": hcorr.name,
            "vcorr": vcorr.name,
            "select": repr(select),
            "quadrupole_of": overrides,
            "dk_rel": dk_rel,
            "n_positions": n_positions,
            "span_m": span_m,
            "planes": planes,
            "n_samples": n_samples,
            "parallel": parallel,
            "max_group": max_group,
            "max_inflation": max_inflation,
            "response": None if response is None else response.uid,
        },
        units={
            "step-amplitude_x": "m",
            "step-amplitude_y": "m",
            "step-strength": "1/m^2",
            "orbit-x": "m",
            "orbit-y": "m",
        },
        num_points=None if parallel else 2 * n_positions * len(chosen),
        bpm_names=chosen,
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        moved = [quadrupoles, hcorr, vcorr]
        snapshot = yield from take_snapshot(description, moved)
        hardware = {n: v for fam in snapshot.setpoints.values() for n, v in fam.items()}
        knobs: list[BbaKnob] = yield from compute(
            design_bba, description, hardware, chosen, quad_names, overrides, planes, hnames, vnames
        )
        if parallel:
            grouping: BbaGrouping = yield from compute(
                design_bba_groups,
                description,
                hardware,
                knobs,
                bpm_names,
                dk_rel,
                max_group,
                max_inflation,
            )
        else:
            grouping = BbaGrouping(
                tuple((k,) for k in range(len(knobs))),
                np.ones(len(knobs)),
                np.ones(len(knobs)),
                np.zeros((len(knobs), 2)),
            )
        groups = grouping.groups
        # each group's scan amplitudes (m), (members, x y, positions): a member alone visits
        # n_positions sorted in x and in another order in y (the readings of both planes are
        # then independent regressors, so the coupling between the planes can be fitted); a
        # group of N visits max(n_positions, N + 2), each member in its own independent order
        # (fit_group_columns tells the members' columns apart by them)
        joint = fit_coupling and planes == "xy"
        shapes = None if response is None else _measured_shapes(description, response, knobs)
        scans = []
        for members in groups:
            n = len(members)
            if shapes is not None:
                n_pos = n_positions
                orders = _member_orders(n, n_pos)
            else:
                n_pos = n_positions if n == 1 else max(n_positions, (2 * n if joint else n) + 2)
                orders = bba_scan_orders(n, n_pos, 2, joint=joint)
            if planes != "xy":
                orders[:, 1] = orders[:, 0]
            scans.append(np.linspace(-span_m, span_m, n_pos)[orders])
        k0 = np.asarray((yield from call_async(quadrupoles.strengths)), float)
        base = {
            "x": np.asarray((yield from call_async(hcorr.strengths)), float),
            "y": np.asarray((yield from call_async(vcorr.strengths)), float),
        }
        quad_hw0 = snapshot.setpoints[quadrupoles.name]
        families = {"x": hcorr, "y": vcorr}
        names_of = {"x": hnames, "y": vnames}
        # every value the plan will set, checked before anything moves
        dks, q_index, settings = [], [], []
        for knob in knobs:
            q = quad_names.index(knob.quadrupole)
            dk = dk_rel * abs(float(k0[q]))
            if dk == 0:
                raise ValueError(f"bba: {knob.quadrupole} is off (K0 = 0): nothing to modulate")
            dks.append(dk)
            q_index.append(q)
            settings.append(
                {
                    p: ([names_of[p].index(c) for c in knob.correctors[p]], knob.kicks[p])
                    for p in planes
                }
            )
        signs = np.asarray(grouping.signs, float)

        def quad_values(members: Sequence[int], sign: float) -> np.ndarray:
            """The group's quadrupole strengths (1/m^2) at the modulation ``sign``."""
            return np.array([k0[q_index[k]] + sign * signs[k] * dks[k] for k in members])

        def bump_values(g: int, p: str, i: int) -> np.ndarray:
            """The family ``p``'s strengths (rad) with group ``g``'s bumps at position ``i``."""
            values = base[p].copy()
            for m, k in enumerate(groups[g]):
                cols, kicks = settings[k][p]
                np.add.at(values, cols, scans[g][m, "xy".index(p), i] * kicks)
            return values

        for g, members in enumerate(groups):
            qs = [q_index[k] for k in members]
            if len(set(qs)) != len(qs):
                raise ValueError(f"bba: a group modulates a quadrupole twice ({members})")
            for sign in (1.0, -1.0):
                values = k0.copy()
                values[qs] = quad_values(members, sign)
                quadrupoles.check_strengths(values)
            for p in planes:
                for i in range(scans[g].shape[2]):
                    families[p].check_strengths(bump_values(g, p, i))
        step = Record(
            "step",
            {
                "bpm": 0,
                "group": 0,
                "position": 0,
                "sign": 0,
                "amplitude_x": 0.0,
                "amplitude_y": 0.0,
                "strength": 0.0,
            },
            {"amplitude_x": "m", "amplitude_y": "m", "strength": "1/m^2"},
        )
        orbit_rec = Record(
            "orbit", {"x": np.zeros(nb), "y": np.zeros(nb)}, {"x": "m", "y": "m"}, source=bpms.name
        )

        def measure(after: float) -> MsgGenerator[tuple[np.ndarray, np.ndarray]]:
            """Mean orbit (2, nbpm) [m] of ``n_samples`` fresh frames, and their variance."""
            frames = yield from read_orbit_frames(bpms, after=after, n=n_samples, timeout=timeout)
            arr = np.array([[f.x, f.y] for f in frames], float)
            valid = np.all([np.asarray(f.valid, bool) for f in frames], axis=0)
            mean = np.where(valid, arr.mean(axis=0), np.nan)
            var = arr.var(axis=0, ddof=1) if n_samples > 1 else np.full((2, nb), np.nan)
            return mean, var

        def set_bump(g: int, i: int) -> MsgGenerator[float]:
            """The bumps of group ``g`` at scan position ``i``; the time they read back."""
            settled = 0.0
            for p in planes:
                values = bump_values(g, p, i)
                _, t = yield from set_and_settle(families[p], values, hardware=False)
                settled = max(settled, t)
            return settled

        def set_quads(qs: Sequence[int], values: np.ndarray) -> MsgGenerator[float]:
            """Set quadrupoles ``qs`` alone to ``values`` (1/m^2); the time they read back."""
            yield from call_async(quadrupoles.set_strengths, np.asarray(values, float), list(qs))
            _, t = yield from call_async(quadrupoles.stamped_readbacks)
            return t

        def unset_quads(qs: Sequence[int]) -> MsgGenerator[None]:
            """Quadrupoles ``qs`` back to their starting setpoints (A, exactly)."""
            if qs:
                hw = np.array([quad_hw0[quad_names[q]] for q in qs])
                yield from call_async(quadrupoles.set_hardware, hw, list(qs))

        fits: dict[str, list[BbaFit | None]] = {"x": [None] * len(knobs), "y": [None] * len(knobs)}
        centre_amplitude = np.full((len(knobs), 2), np.nan)  # m, the knob at each centre
        n_steps = 0

        def align(g: int) -> MsgGenerator[None]:
            nonlocal n_steps
            members = groups[g]
            qs = [q_index[k] for k in members]
            n_pos = scans[g].shape[2]
            orbits = np.full((n_pos, 2, 2, nb), np.nan)  # position, sign, plane, bpm
            variances = np.full_like(orbits, np.nan)
            for i in range(n_pos):
                for j, sign in enumerate((1.0, -1.0)):
                    # one step: absolute setpoints (the previous group's bumps go in the same
                    # puts, its quadrupoles back first), then fresh frames
                    yield from bps.checkpoint()
                    t_bump = yield from set_bump(g, i)
                    if i == 0 and j == 0:
                        if g > 0:  # the previous group's quadrupoles
                            yield from unset_quads(
                                [q_index[k] for k in groups[g - 1] if q_index[k] not in qs]
                            )
                        # one-sided approach (hysteresis): from the other sign first
                        yield from set_quads(qs, quad_values(members, -1.0))
                    if len(qs) > 1:
                        # a group changes sign through K0: the members' puts land one by
                        # one, and half-way the same-signed members' tune shifts would
                        # add up (the full group's, 4 x 10 % on the small ring's QF: past
                        # the half integer) instead of half of them
                        yield from set_quads(qs, quad_values(members, 0.0))
                    t_quad = yield from set_quads(qs, quad_values(members, sign))
                    orbit, var = yield from measure(max(t_bump, t_quad))
                    n_steps += 1
                    orbits[i, j], variances[i, j] = orbit, var
                    yield from bps.create("primary")
                    yield from bps.read(
                        step.update(
                            bpm=bpm_names.index(chosen[members[0]]),
                            group=g,
                            position=i,
                            sign=int(sign),
                            amplitude_x=float(scans[g][0, 0, i]),
                            amplitude_y=float(scans[g][0, 1, i]),
                            strength=float(k0[qs[0]] + sign * signs[members[0]] * dks[members[0]]),
                        )
                    )
                    yield from bps.read(orbit_rec.update(x=orbit[0], y=orbit[1]))
                    yield from bps.save()
            noise = None
            if n_samples > 1:  # pooled variance of one frame per BPM, all readings
                noise = np.sqrt(np.nanmean(variances, axis=(0, 1)) / n_samples)  # (2, nb)
            diff = orbits[:, 0] - orbits[:, 1]  # (npos, 2, nb)
            rows = [bpm_names.index(chosen[k]) for k in members]
            readings = 0.5 * (orbits[:, 0][..., rows] + orbits[:, 1][..., rows])  # (npos, 2, nm)
            grouped = len(members) > 1
            # a group: per plane the members' columns from the data (no optics model), their
            # centres, and each difference orbit split into the members' beam offsets (m)
            found: dict[str, GroupCentres] = {}
            measured: dict[str, list[BbaFit]] | None = None
            if grouped and shapes is not None:
                measured = _fit_with_shapes(
                    shapes,
                    members,
                    diff,
                    readings,
                    noise,
                    rows,
                    planes,
                    min_slope_snr,
                    max_chi2_red,
                )
            elif grouped and joint:  # every row on both planes' readings: coupling fitted
                both = fit_group_centres(
                    np.concatenate([readings[:, 0], readings[:, 1]], axis=1),
                    np.concatenate([diff[:, 0], diff[:, 1]], axis=1),
                    None if noise is None else np.sqrt(2) * noise.ravel(),
                    None if noise is None else noise[:, rows].ravel() / np.sqrt(2),
                )
                n = len(members)
                found = {"x": _members(both, slice(0, n)), "y": _members(both, slice(n, 2 * n))}
            elif grouped:
                for p in planes:
                    r = "xy".index(p)
                    found[p] = fit_group_centres(
                        readings[:, r],
                        diff[:, r],
                        None if noise is None else np.sqrt(2) * noise[r],
                        None if noise is None else noise[r, rows] / np.sqrt(2),
                    )
            for m, k in enumerate(members):
                b = rows[m]
                new: dict[str, BbaFit] = {}
                for p in planes if measured is None else ():
                    r = "xy".index(p)
                    if grouped:
                        changes = found[p].offsets_m[:, [m]]
                        sigma_change = found[p].std_offsets_m[:, [m]]
                        direction = np.ones(1)
                    else:
                        changes = diff[:, r]
                        sigma_change = None if noise is None else noise[r] * np.sqrt(2)
                        direction = None
                    new[p] = fit_bba_center(
                        readings[:, r, m],
                        changes,
                        sigma_position_m=None if noise is None else noise[r, b] / np.sqrt(2),
                        sigma_change_m=sigma_change,
                        direction=direction,
                        min_slope_snr=min_slope_snr,
                        max_chi2_red=max_chi2_red,
                        other_positions_m=(
                            readings[:, 1 - r, m] if planes == "xy" and not grouped else None
                        ),
                    )
                    if grouped:
                        new[p] = _group_member_fit(
                            new[p], found[p], m, chosen[k], min_slope_snr, max_chi2_red
                        )
                if planes == "xy" and not grouped:
                    new["x"], new["y"] = combine_bba_planes(new["x"], new["y"])
                if measured is not None:
                    new = {p: measured[p][m] for p in planes}
                for p, fit in new.items():
                    fits[p][k] = fit
                    r = "xy".index(p)
                    centre_amplitude[k, r] = knob_amplitude_at(
                        scans[g][m, r], readings[:, r, m], fit.center_m
                    )

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            for g in range(len(groups)):
                yield from align(g)
            done = {p: [f for f in fits[p] if f is not None] for p in "xy"}
            fields = _result(planes, knobs, dks, done, grouping, n_steps)
            fields.update(
                center_amplitude_x=centre_amplitude[:, 0],
                center_amplitude_y=centre_amplitude[:, 1],
                corrector_names=hnames + vnames,
                corrector_start=np.concatenate([base["x"], base["y"]]),
            )
            yield from record_result("bba", **fields)

        return cast(
            str,
            (yield from restore_on_exit(run(), moved, snapshot, policy="measurement", owner="bba")),
        )

    return (yield from plan())


def _members(group: GroupCentres, members: slice) -> GroupCentres:
    """The ``members`` of a group fit (a plane's half of a fit of both planes)."""
    columns = group.columns
    return GroupCentres(
        center_m=group.center_m[members],
        std_center_m=group.std_center_m[members],
        offsets_m=group.offsets_m[:, members],
        std_offsets_m=group.std_offsets_m[:, members],
        columns=replace(
            columns,
            columns=columns.columns[:, members],
            std_columns=columns.std_columns[:, members],
            significance=columns.significance[members],
        ),
    )


def _group_member_fit(
    fit: BbaFit,
    group: GroupCentres,
    m: int,
    bpm: str,
    min_slope_snr: float,
    max_chi2_red: float,
) -> BbaFit:
    """A group member's fit: the centre and uncertainty of the group's fit, its checks.

    ``fit`` is :func:`~accplans.physics.fit_bba_center` of the member's offsets against its
    readings (their line, the checks on the scan's range); the centre and its uncertainty are
    the group's (:func:`~accplans.physics.fit_group_centres`), the reduced chi-square that of
    the group's regressions, and the member is rejected when its column does not stand above
    the noise or the regressions' residuals exceed it.
    """
    columns = group.columns
    z = float(columns.significance[m])
    reason = fit.rejected
    if not reason and not z >= min_slope_snr:
        reason = (
            f"too little signal: {bpm}'s column stands {z:.1f} sigma above the noise "
            f"(< {min_slope_snr:g}): its quadrupole's modulation does not move the orbit "
            "measurably, or the scan does not move the beam at it"
        )
    elif not reason and columns.chi2_red > max_chi2_red:
        reason = (
            f"poor linearity: the group's regressions have reduced chi-square "
            f"{columns.chi2_red:.2f} > {max_chi2_red:g} (residuals exceed the noise: drift, "
            "a lost reading, or a nonlinear scan)"
        )
    return replace(
        fit,
        center_m=float(group.center_m[m]),
        std_center_m=float(group.std_center_m[m]),
        chi2_red=columns.chi2_red,
        rejected=reason,
    )


def _result(
    planes: str,
    knobs: Sequence[BbaKnob],
    dks: Sequence[float],
    fits: Mapping[str, Sequence[BbaFit]],
    grouping: BbaGrouping,
    n_steps: int,
) -> dict[str, Any]:
    """The ``bba`` result's fields (scans shorter than the longest padded with NaN)."""
    n = len(knobs)
    n_positions = max(x.positions_m.size for f in fits.values() for x in f)

    def padded(rows: Sequence[np.ndarray]) -> np.ndarray:
        out = np.full((len(rows), n_positions), np.nan)
        for i, row in enumerate(rows):
            out[i, : row.size] = row
        return out

    out: dict[str, Any] = {
        "planes": planes,
        "bpm_names": [k.bpm for k in knobs],
        "quadrupole_names": [k.quadrupole for k in knobs],
        "distance": np.array([k.distance for k in knobs]),
        "dk": np.asarray(dks, float),
        "group": np.zeros(n, np.int64),
        "modulation_sign": np.asarray(grouping.signs, float),
        "inflation": np.asarray(grouping.inflation, float),
        "n_steps": int(n_steps),
    }
    for g, members in enumerate(grouping.groups):
        out["group"][list(members)] = g
    for p in "xy":
        f = fits[p]
        if p in planes:
            out[f"center_{p}"] = np.array([x.center_m for x in f])
            out[f"std_center_{p}"] = np.array([x.std_center_m for x in f])
            out[f"slope_{p}"] = np.array([x.slope for x in f])
            out[f"chi2_red_{p}"] = np.array([x.chi2_red for x in f])
            out[f"accepted_{p}"] = np.array([x.ok for x in f])
            out[f"rejected_{p}"] = [x.rejected for x in f]
            out[f"positions_{p}"] = padded([x.positions_m for x in f])
            out[f"projections_{p}"] = padded([x.projections_m for x in f])
        else:
            for key in ("center", "std_center", "slope", "chi2_red"):
                out[f"{key}_{p}"] = np.full(n, np.nan)
            out[f"accepted_{p}"] = np.zeros(n, bool)
            out[f"rejected_{p}"] = ["plane not measured"] * n
            out[f"positions_{p}"] = np.full((n, n_positions), np.nan)
            out[f"projections_{p}"] = np.full((n, n_positions), np.nan)
    knob_bpm, knob_plane, knob_corr, knob_kicks = [], [], [], []
    for k, knob in enumerate(knobs):
        for p in planes:
            for c, v in zip(knob.correctors[p], knob.kicks[p], strict=True):
                knob_bpm.append(k)
                knob_plane.append(p)
                knob_corr.append(c)
                knob_kicks.append(float(v))
    out.update(
        knob_bpm=np.array(knob_bpm, np.int64),
        knob_plane=knob_plane,
        knob_correctors=knob_corr,
        knob_kicks=np.array(knob_kicks),
    )
    return out


def bba_knobs(result: Any, bpm: str) -> dict[str, dict[str, float]]:
    """The scan knob of ``bpm`` in a ``bba`` result: ``{plane: {corrector: kick per m}}``.

    The bump that moved the beam through the BPM's quadrupole. In parallel BBA the other
    bumps of its group moved at the same time, each in its own order; they are closed and
    share no corrector with it, so they leave its quadrupole and BPM alone.
    """
    k = list(result["bpm_names"]).index(bpm)
    out: dict[str, dict[str, float]] = {}
    for i, p, c, v in zip(
        result["knob_bpm"],
        result["knob_plane"],
        result["knob_correctors"],
        result["knob_kicks"],
        strict=True,
    ):
        if int(i) == k:
            out.setdefault(str(p), {})[str(c)] = float(v)
    return out


@dataclass(frozen=True)
class _MeasuredShapes:
    """A measured ORM's shapes for parallel BBA (:func:`_measured_shapes`).

    Attributes:
        matrix: (2 nbpm, ncol) the ORM (m/rad), rows x then y.
        names: its columns' corrector names.
        columns: per BBA'd BPM the ORM columns of its quadrupole's bracketing correctors:
            horizontal upstream, downstream, vertical upstream, downstream.
        inside: (nknob, nbpm) the BPMs between a quadrupole's bracketing correctors.
    """

    matrix: np.ndarray
    names: list[str]
    columns: list[tuple[int, int, int, int]]
    inside: np.ndarray

    def basis(self, members: Sequence[int]) -> np.ndarray:
        """(2 nbpm, 4 nmember) the members' shapes."""
        return self.matrix[:, [c for k in members for c in self.columns[k]]]


def _check_bba_response(response: Result, bpm_names: Sequence[str], parallel: bool) -> None:
    """Refuse a ``response`` parallel BBA cannot use, before anything moves."""
    if not parallel:
        raise ValueError("bba: a response is used by parallel BBA only (parallel=True)")
    if response.kind != "orm":
        raise ValueError(f"bba: the response must be an 'orm' result, got {response.kind!r}")
    if [str(n) for n in response.data["bpm_names"]] != list(bpm_names):
        raise ValueError(
            f"bba: the response {response.uid}'s BPMs are not the BPM family's (every BPM, "
            "same order)"
        )


def _measured_shapes(
    description: MachineDescription, response: Result, knobs: Sequence[BbaKnob]
) -> _MeasuredShapes:
    """Each BBA'd quadrupole's bracketing correctors among the response's columns.

    The bracketing corrector of a plane upstream (downstream) is the last (first) of the
    response's correctors of that plane before (after) the quadrupole in the lattice, round
    the ring.

    Raises:
        ValueError: the response has no corrector of a plane.
    """
    names = [str(n) for n in response.data["corrector_names"]]
    bpm_el = np.array([description.device(str(b)).elements[0] for b in response.data["bpm_names"]])
    by_plane = {}
    for plane in ("h", "v"):
        cols = [j for j, n in enumerate(names) if description.device(n).plane == plane]
        if not cols:
            raise ValueError(f"bba: the response {response.uid} has no {plane} corrector")
        by_plane[plane] = (
            np.array(cols),
            np.array([description.device(names[j]).elements[0] for j in cols]),
        )
    columns, inside = [], np.zeros((len(knobs), bpm_el.size), bool)
    for k, knob in enumerate(knobs):
        quad = description.device(knob.quadrupole).elements
        lo, hi = min(quad), max(quad)
        found: list[int] = []
        for plane in ("h", "v"):
            cols, el = by_plane[plane]
            up = (
                cols[np.argmax(np.where(el < lo, el, -1))]
                if (el < lo).any()
                else cols[np.argmax(el)]
            )
            down = (
                cols[np.argmin(np.where(el > hi, el, np.inf))]
                if (el > hi).any()
                else cols[np.argmin(el)]
            )
            e_up = description.device(names[up]).elements[0]
            e_down = description.device(names[down]).elements[0]
            between = (
                (bpm_el > e_up) & (bpm_el < e_down)
                if e_up < e_down
                else (bpm_el > e_up) | (bpm_el < e_down)
            )
            inside[k] |= between
            found += [int(up), int(down)]
        columns.append((found[0], found[1], found[2], found[3]))
    matrix = np.asarray(response.data["matrix"], float)
    return _MeasuredShapes(matrix, names, columns, inside)


def _member_orders(n_members: int, n_positions: int) -> np.ndarray:
    """(n_members, 2, n_positions) scan orders: each member the serial scan's x-y pattern.

    Member 0 visits the amplitudes sorted in x and in
    :func:`~accplans.physics.decorrelated_order` in y; the others visit the same (x, y) pairs
    in a random order of their own (seeded), so that the members' scans are independent.
    """
    pattern = decorrelated_order(n_positions)
    rng = np.random.default_rng(0)
    orders = np.zeros((n_members, 2, n_positions), np.int64)
    for m in range(n_members):
        x = np.arange(n_positions) if m == 0 else rng.permutation(n_positions)
        orders[m] = x, pattern[x]
    return orders


def _fit_with_shapes(
    shapes: _MeasuredShapes,
    members: Sequence[int],
    diff: np.ndarray,
    readings: np.ndarray,
    noise: np.ndarray | None,
    rows: Sequence[int],
    planes: str,
    min_slope_snr: float,
    max_chi2_red: float,
) -> dict[str, list[BbaFit]]:
    """A group's fits from its difference orbits split over the members' measured shapes.

    Each member's own coefficients, whitened, are fitted against its readings like a serial
    scan's difference orbits (their direction in the member's shapes from the data).

    Args:
        shapes: the measured shapes.
        members: the group's knob indices.
        diff: (npos, 2, nbpm) difference orbits (m).
        readings: (npos, 2, nmember) the members' readings (m).
        noise: (2, nbpm) the mean reading's noise (m), or ``None``.
        rows: the members' BPM indices.
        planes: the planes scanned.
        min_slope_snr: as :func:`~accplans.physics.fit_bba_center`'s.
        max_chi2_red: as :func:`~accplans.physics.fit_bba_center`'s.
    """
    basis = shapes.basis(members)
    keep = ~np.any(shapes.inside[list(members)], axis=0)
    changes = np.concatenate([diff[:, 0], diff[:, 1]], axis=1)
    sigma = None if noise is None else np.sqrt(2) * noise.ravel()
    try:
        split = fit_basis_kicks(changes, basis, sigma, np.r_[keep, keep])
    except ValueError as err:
        reason = f"the group's difference orbits cannot be split over its shapes: {err}"
        return {
            p: [_rejected(readings[:, "xy".index(p), m], reason) for m in range(len(members))]
            for p in planes
        }
    out: dict[str, list[BbaFit]] = {p: [] for p in planes}
    for m in range(len(members)):
        new = {}
        for p in planes:
            r = "xy".index(p)
            new[p] = fit_bba_center(
                readings[:, r, m],
                split.whitened([4 * m + 2 * r, 4 * m + 2 * r + 1]),
                sigma_position_m=None if noise is None else noise[r, rows[m]] / np.sqrt(2),
                sigma_change_m=1.0,
                min_slope_snr=min_slope_snr,
                max_chi2_red=max_chi2_red,
                other_positions_m=readings[:, 1 - r, m] if planes == "xy" else None,
            )
        if planes == "xy":
            new["x"], new["y"] = combine_bba_planes(new["x"], new["y"])
        for p in planes:
            out[p].append(new[p])
    return out


def _rejected(positions: np.ndarray, reason: str) -> BbaFit:
    """A fit that could not be made: NaN numbers and the reason."""
    nan = float("nan")
    npos = len(positions)
    return BbaFit(
        center_m=nan,
        std_center_m=nan,
        slope=nan,
        std_slope=nan,
        chi2_red=nan,
        r_squared=nan,
        curvature=nan,
        std_curvature=nan,
        positions_m=np.asarray(positions, float),
        projections_m=np.full(npos, nan),
        std_projections_m=np.full(npos, nan),
        direction=np.zeros(0),
        n_bpms=0,
        rejected=reason,
    )
