"""The truth of quadrupole beam-based alignment, for tests: what a BPM reads at a quad's centre.

BBA finds, for a BPM and its quadrupole, the BPM reading at which a change of the
quadrupole's gradient does not move the orbit: the beam then passes through the quadrupole's
magnetic centre. What the BPM reads there depends on how the beam got there (the scan knob:
the beam moves differently at the BPM and at the quadrupole, 0.16-0.55 m apart on EBS), so the
truth is defined with the plan's own knob: the knob amplitudes that put the true closed orbit
through the centre of the quadrupole (pyAT ``find_orbit4`` on the true lattice at the twin's
path length), then the BPM's noise-free reading (:func:`~accplans.sim.bpm_readings`).

"Through the centre" means that the mean of the orbit at the quadrupole's entrance and exit
equals its misalignment (``quad_shift_m``, the ``T1``/``T2`` of its elements): inside a
linear quadrupole the orbit relative to the centre obeys ``u'' = -K u``, so it is odd about the
quadrupole's middle exactly when it crosses the centre there; then its mean over the
quadrupole, hence the kick a gradient change gives, vanishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import at
import numpy as np

from accplans.config import MachineDescription, parse_field

from ._errors import bpm_readings
from ._truth import Truth

__all__ = ["bba_truth", "beam_in_quadrupoles"]

_STEP = 1e-4  # knob amplitude step of the finite differences (knob units, m for a bump)


def bba_truth(
    truth: Truth,
    description: MachineDescription,
    bpm: str,
    quadrupole: str,
    knobs: Mapping[str, Mapping[str, float]],
    *,
    iterations: int = 4,
) -> np.ndarray:
    """Noise-free reading (m) of ``bpm`` when the beam passes through ``quadrupole``'s centre.

    Args:
        truth: the twin's truth, exported with the machine as the scan started from (the
            correctors at their starting setpoints).
        description: the machine description (device elements and fields).
        bpm: the BPM's device name.
        quadrupole: the quadrupole's device name.
        knobs: the scan knob of each plane to centre, ``{"x": {corrector: kick}, "y": ...}``:
            the nominal kick (rad) of each corrector per unit of knob amplitude (the plan's
            ``bba`` result gives them per metre of bump); the twin's corrector calibration
            errors are applied. Planes without a knob are not centred (NaN in the result).
        iterations: Newton steps (the problem is linear up to the sextupoles' feed-down).

    Returns:
        (2,) the BPM's noise-free reading (x, y) in m at the knob amplitudes that centre the
        beam in the quadrupole in every plane of ``knobs`` (the other entry NaN).
    """
    planes = [p for p in ("x", "y") if knobs.get(p)]
    unknown = set(knobs) - {"x", "y"}
    if unknown or not planes:
        raise ValueError(f"bba_truth: knobs needs 'x' and/or 'y' entries, got {sorted(knobs)}")
    ring = truth.ring.deepcopy()
    bpm_names = truth.bpm_names
    try:
        b = bpm_names.index(bpm)
    except ValueError:
        raise KeyError(f"bba_truth: the truth has no BPM {bpm!r}") from None
    quad = description.device(quadrupole)
    first, last = min(quad.elements), max(quad.elements)
    quad_elements = [int(e) for e in truth["quad_elements"]]
    shift = np.asarray(truth["quad_shift_m"], float)
    centre = np.mean([shift[quad_elements.index(e)] for e in quad.elements], axis=0)
    # every knob's kicks: (element array, index, base value, true kick per unit) per plane
    drives: list[list[tuple[np.ndarray, int, float, float]]] = []
    arrays: dict[tuple[int, str], np.ndarray] = {}
    for p in planes:
        row = []
        for name, kick in knobs[p].items():
            dev = description.device(name)
            attr, k = parse_field(dev.field or "")
            if attr != "KickAngle" or k is None:
                raise ValueError(f"bba_truth: {name} drives {dev.field!r}, not a KickAngle")
            scale = truth.corrector_scale(name) / len(dev.elements)
            for el in dev.elements:
                if (el, attr) not in arrays:  # one array per element: H and V share it
                    arrays[el, attr] = np.asarray(getattr(ring[el], attr), dtype=float).copy()
                    setattr(ring[el], attr, arrays[el, attr])
                arr = arrays[el, attr]
                row.append((arr, int(k), float(arr[k]), scale * float(kick)))
        drives.append(row)
    refs = np.array([truth.bpm_elements[b], first, last + 1], dtype=np.int64)
    uniq, where = np.unique(refs, return_inverse=True)
    rows = [0 if p == "x" else 2 for p in planes]
    target = centre[[0 if p == "x" else 1 for p in planes]]

    def beam(amps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(beam (x, y) at the BPM, mean orbit in the quadrupole in the knobs' planes)."""
        for row, a in zip(drives, amps, strict=True):
            for arr, k, base, per_unit in row:
                arr[k] = base + a * per_unit
        _, orbit = at.find_orbit4(ring, dct=truth.dct_m, refpts=uniq)
        orbit = orbit[where]
        return orbit[0, (0, 2)], 0.5 * (orbit[1, rows] + orbit[2, rows])

    amps = np.zeros(len(planes))
    for _ in range(max(1, iterations)):
        _, mid = beam(amps)
        jac = np.empty((len(planes), len(planes)))
        for j in range(len(planes)):
            step = amps.copy()
            step[j] += _STEP
            jac[:, j] = (beam(step)[1] - mid) / _STEP
        amps = amps + np.linalg.solve(jac, target - mid)
    at_bpm, mid = beam(amps)
    if np.max(np.abs(mid - target)) > 1e-8:
        raise RuntimeError(
            f"bba_truth: the knob did not centre the beam in {quadrupole} "
            f"(off by {np.max(np.abs(mid - target)) * 1e6:.3g} um)"
        )
    reading = bpm_readings(
        at_bpm[None, :],
        truth["bpm_offset_m"][b : b + 1],
        truth["bpm_gain"][b : b + 1],
        truth["bpm_roll_rad"][b : b + 1],
    )[0]
    return np.array(
        [reading[0] if "x" in planes else np.nan, reading[1] if "y" in planes else np.nan]
    )


def beam_in_quadrupoles(
    truth: Truth, description: MachineDescription, quadrupoles: Sequence[str]
) -> np.ndarray:
    """The true beam position relative to each quadrupole's magnetic centre (m), for tests.

    The closed orbit of the true lattice at the twin's path length (pyAT ``find_orbit4``),
    averaged over each quadrupole's entrance and exit, minus its misalignment (the mean
    ``quad_shift_m`` of its elements): zero when the beam passes through the centre (see the
    module docstring).

    Returns:
        (nq, 2) x and y (m), in the order of ``quadrupoles``.
    """
    quad_elements = [int(e) for e in truth["quad_elements"]]
    shift = np.asarray(truth["quad_shift_m"], float)
    ends, centres = [], []
    for name in quadrupoles:
        elements = description.device(name).elements
        ends.append((min(elements), max(elements) + 1))
        centres.append(np.mean([shift[quad_elements.index(e)] for e in elements], axis=0))
    refs = np.array(sorted({e for pair in ends for e in pair}), dtype=np.int64)
    _, orbit = at.find_orbit4(truth.ring, dct=truth.dct_m, refpts=refs)
    row = {int(e): k for k, e in enumerate(refs)}
    beam = np.array([0.5 * (orbit[row[a], (0, 2)] + orbit[row[z], (0, 2)]) for a, z in ends])
    return beam - np.asarray(centres)
