"""``standardize_magnets``: cycle magnets between their limits to put them on a known branch.

An iron-dominated magnet's strength depends on its history (hysteresis): the same current gives
a different field on the way up than on the way down. Calibrations are measured on the
*descending* branch, after a standardization (see the how-to "Magnet calibration"): this plan
puts magnets there, so that the strengths the devices report (through the calibration) are the
strengths the beam sees.
"""

from __future__ import annotations

from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.data import run_metadata
from accplans.devices import SettableFamily

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import set_family_hardware

__all__ = ["standardize_cycle", "standardize_magnets"]

_MAGNET_KINDS = ("corrector", "quadrupole", "sextupole", "skew_quadrupole")


def standardize_cycle(
    low: np.ndarray, high: np.ndarray, setpoints: np.ndarray, cycles: int
) -> list[tuple[str, np.ndarray]]:
    """The hardware targets of a standardization, in order, each with its label.

    ``cycles`` times (to ``high``, to ``low``), then to ``high`` and down to ``setpoints``: the
    last move approaches every setpoint from above, so every magnet ends on the descending
    branch its calibration describes.

    Args:
        low: lower hardware limits (A), one per magnet.
        high: upper hardware limits (A).
        setpoints: the hardware setpoints to end at (A).
        cycles: number of full max-min cycles, >= 1.

    Returns:
        ``(label, targets)`` pairs: ``"max 1"``, ``"min 1"``, ..., ``"max"``, ``"setpoint"``.
    """
    if isinstance(cycles, bool) or not isinstance(cycles, (int, np.integer)) or cycles < 1:
        raise ValueError(f"standardize_magnets: cycles must be an integer >= 1, got {cycles!r}")
    steps: list[tuple[str, np.ndarray]] = []
    for k in range(1, int(cycles) + 1):
        steps += [(f"max {k}", np.array(high, float)), (f"min {k}", np.array(low, float))]
    steps += [("max", np.array(high, float)), ("setpoint", np.array(setpoints, float))]
    return steps


def standardize_magnets(
    *families: SettableFamily, cycles: int = 2, md: dict[str, Any] | None = None
) -> MsgGenerator[str]:
    """Standardize magnet families: cycle every member between its limits, back to its setpoint.

    Each step moves all ``families`` together (one put per family) and waits for the
    readbacks: ``cycles`` times to the upper then the lower hardware limit, then to the upper
    limit and down to the setpoints the magnets had when the plan started (hardware values,
    exactly), approached from above. A magnet whose setpoint is within its hysteresis width
    of its upper limit ends inside the backlash band, as on a real magnet.

    What it changes: the magnets' currents during the cycle, and their hysteresis state (the
    point of the plan). It ends at the starting setpoints. It is a correction-type plan: on
    failure or abort the starting setpoints are written back directly (the branch is then
    unknown: run it again); on a user stop the magnets stay where the last step left them.
    Every target is checked against the limits before anything moves. The run records one
    event per step with every family's hardware setpoints (A).

    Args:
        families: magnet families to standardize (e.g. ``machine.quadrupoles``).
        cycles: number of max-min cycles before the final approach (>= 1).
        md: metadata added to the run's start document.

    Returns:
        The uid of the run.

    Raises:
        ValueError: no family, a family that is not a magnet family, a bad ``cycles``, or a
            target outside the limits (nothing moved).
    """
    if not families:
        raise ValueError("standardize_magnets needs at least one magnet family")
    names = [f.name for f in families]
    if len(set(names)) != len(names):
        raise ValueError(f"standardize_magnets: a family is given twice: {names}")
    description = description_of(*families)
    limits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for fam in families:
        specs = [description.device(n) for n in fam.names]
        others = [s.name for s in specs if s.kind not in _MAGNET_KINDS]
        if others:
            raise ValueError(
                f"standardize_magnets: {fam.name} is not a magnet family ({others[:5]} are not "
                "magnets)"
            )
        missing = [s.name for s in specs if s.limits is None]
        if missing:
            raise ValueError(
                f"standardize_magnets: {fam.name} members {missing[:5]} have no limits to "
                "cycle between"
            )
        limits[fam.name] = (
            np.array([s.limits[0] for s in specs if s.limits is not None], float),
            np.array([s.limits[1] for s in specs if s.limits is not None], float),
        )
    standardize_cycle(limits[names[0]][0], limits[names[0]][1], limits[names[0]][0], cycles)
    _md = run_metadata(
        description,
        plan_name="standardize_magnets",
        plan_args={"families": names, "cycles": int(cycles)},
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        before = yield from take_snapshot(description, families)
        steps: dict[str, list[tuple[str, np.ndarray]]] = {}
        for fam in families:
            start = np.array([before.setpoints[fam.name][n] for n in fam.names])
            lo, hi = limits[fam.name]
            steps[fam.name] = standardize_cycle(lo, hi, start, cycles)
            for _, targets in steps[fam.name]:  # every value, before any move
                check_hardware_limits(description, fam.names, targets)
        records = {
            fam.name: Record(
                fam.name,
                {"setpoint": np.array([before.setpoints[fam.name][n] for n in fam.names])},
                {"setpoint": description.device(fam.names[0]).unit},
            )
            for fam in families
        }
        n_steps = len(steps[names[0]])

        @bpp.run_decorator(md=_md)
        def cycle() -> MsgGenerator[None]:
            for k in range(n_steps):
                yield from bps.checkpoint()
                for fam in families:
                    targets = steps[fam.name][k][1]
                    yield from set_family_hardware(fam, targets)
                    records[fam.name].update(setpoint=targets)
                yield from bps.create("primary")
                for record in records.values():
                    yield from bps.read(record)
                yield from bps.save()

        uid = yield from restore_on_exit(
            cycle(), list(families), before, policy="correction", owner="standardize_magnets"
        )
        return uid

    return (yield from plan())
