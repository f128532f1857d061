"""Plan stubs: steps that open no run.

Every interaction of a plan with devices goes through here or through
:func:`accplans.devices.call_async`, so the plans themselves read as physics procedures: set
magnets and wait for orbit data taken after they settled, read setpoints, restore.
"""

from __future__ import annotations

import time
from typing import Any

import bluesky.plan_stubs as bps
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.devices import OrbitFrame, OrbitSource, Select, SettableFamily, call_async

from ._suspenders import beam_suspender_installed

__all__ = [
    "BeamLost",
    "read_orbit_frame",
    "read_orbit_frames",
    "set_and_settle",
    "set_family_hardware",
]

#: Timestamps cross the control system as floats; frames within this of the readbacks' time
#: count as taken with them (EPICS stamps to the ns, a double near 1.7e9 s resolves 0.2 us).
_STAMP_RESOLUTION = 1e-6


class BeamLost(RuntimeError):
    """The beam was lost while a plan ran (no valid BPM reading)."""


def set_family_hardware(
    family: SettableFamily, values: np.ndarray, *, select: Select = None
) -> MsgGenerator[None]:
    """Set members of ``family`` to hardware values (A, Hz) and wait until they read back."""
    yield from call_async(family.set_hardware, np.asarray(values, float), select)


def set_and_settle(
    family: SettableFamily, values: np.ndarray, *, hardware: bool = True
) -> MsgGenerator[tuple[np.ndarray, float]]:
    """Set a whole family, wait for its readbacks, return them (hardware units) and their time.

    Args:
        family: the family to set.
        values: one value per member, hardware units (``hardware=True``) or SI.
        hardware: whether ``values`` are hardware values or strengths.

    Returns:
        ``(readbacks, time)``: orbit data taken at or after ``time`` (epoch, s) saw them.
    """
    setter = family.set_hardware if hardware else family.set_strengths
    yield from call_async(setter, np.asarray(values, float))
    return (yield from call_async(family.stamped_readbacks))


def read_orbit_frame(
    bpms: OrbitSource, *, after: float, timeout: float = 10.0
) -> MsgGenerator[OrbitFrame]:
    """Wait for the first orbit frame taken at or after ``after`` (epoch, s) and return it.

    A frame without any valid BPM reading means the beam is lost. With a
    :class:`~accplans.plans.BeamCurrentSuspender` installed, the read waits for later frames
    instead (up to ``timeout`` s): the suspender suspends the plan when the DCCT reports the
    loss, and the step is replayed after the refill. Without one, or if no suspension comes,
    the plan stops with ``BeamLost``.

    Raises:
        BeamLost: the frame has no valid reading (and no suspension came within ``timeout``).
        TimeoutError: no such frame within ``timeout`` s.
    """
    frame: OrbitFrame = yield from call_async(
        bpms.wait_for_frame, after=after - _STAMP_RESOLUTION, timeout=timeout
    )
    deadline = time.monotonic() + timeout
    while not np.any(frame.valid) and beam_suspender_installed():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:  # the next frames, until the suspension cancels this wait
            frame = yield from call_async(bpms.wait_for_frame, after=frame.time, timeout=remaining)
        except TimeoutError:
            break
    if not np.any(frame.valid):
        raise BeamLost(
            f"beam lost: no BPM of {bpms.name} has a valid reading (frame {frame.counter}, "
            f"taken {time.ctime(frame.time)})"
        )
    return frame


def read_orbit_frames(
    bpms: OrbitSource, *, after: float, n: int, timeout: float = 10.0
) -> MsgGenerator[list[OrbitFrame]]:
    """``n`` successive orbit frames, the first taken at or after ``after`` (epoch, s).

    Each later one is a newer frame than the one before (a higher counter, not only a newer
    time stamp). Each frame is read as :func:`read_orbit_frame` reads one (``BeamLost``,
    ``TimeoutError`` of ``timeout`` s per frame).
    """
    frames: list[OrbitFrame] = []
    for _ in range(n):
        frame = yield from read_orbit_frame(bpms, after=after, timeout=timeout)
        while frames and frame.counter <= frames[-1].counter:
            frame = yield from read_orbit_frame(
                bpms, after=frame.time + 2 * _STAMP_RESOLUTION, timeout=timeout
            )
        frames.append(frame)
        after = frame.time + 2 * _STAMP_RESOLUTION
    return frames


def checkpoint() -> MsgGenerator[Any]:
    """A checkpoint before a set -> settle -> read step (a pause replays the whole step)."""
    return (yield from bps.checkpoint())
