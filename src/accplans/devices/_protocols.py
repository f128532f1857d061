"""What plans need from devices: small protocols, and how a plan calls them.

Plans take an :class:`OrbitSource` (BPMs) and :class:`SettableFamily` (magnets), not concrete
classes: :class:`~accplans.devices.BpmFamily` and :class:`~accplans.devices.MagnetFamily`
implement them, and so do the adapters of :mod:`accplans.devices` over a facility's ophyd
(v1) devices (:class:`~accplans.devices.OphydV1OrbitSource`,
:class:`~accplans.devices.OphydV1MagnetFamily`).

**Calling them from a plan.** Their I/O methods are awaitables (``async def`` methods, or
methods returning an ophyd-async ``AsyncStatus``); a plan runs them in the RunEngine's event
loop with bluesky's ``wait_for`` message and takes the result from the returned task. With
bluesky 1.15 that is::

    (task,) = yield from bps.wait_for([lambda: bpms.wait_for_frame(after=t_settled)])
    frame = task.result()          # raises here if the call failed

:func:`call_async` is that idiom in one line::

    frame = yield from call_async(bpms.wait_for_frame, after=t_settled)
    yield from call_async(correctors.set_strengths, kicks, select=["HCM001", "HCM007"])

A :class:`~accplans.devices.MagnetFamily` is also a bluesky ``Movable``
(``yield from bps.mv(family, kicks, select=...)`` works), but ``call_async`` works for every
implementation of the protocols, including the ophyd v1 adapters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
from bluesky import plan_stubs as bps
from bluesky.utils import MsgGenerator

from accplans.config import MachineDescription

from ._select import Select

__all__ = ["Arbiter", "OrbitFrame", "OrbitSource", "SettableFamily", "call_async"]

T = TypeVar("T")


@dataclass(frozen=True)
class OrbitFrame:
    """One BPM frame: the orbit at every BPM of a source, in SI.

    Attributes:
        x: horizontal positions (m), one per BPM in source order.
        y: vertical positions (m).
        valid: ``True`` where the BPM reading is valid.
        counter: frame counter (increments with every frame the source publishes).
        time: epoch time (s) of the magnet readbacks the frame was computed from (on a real
            machine, the acquisition time).
    """

    x: np.ndarray
    y: np.ndarray
    valid: np.ndarray
    counter: int
    time: float


@runtime_checkable
class Arbiter(Protocol):
    """Who owns the shared resources a plan is about to move.

    DESIGN.md, "Resources and arbitration": the orbit feedback
    (:class:`~accplans.devices.FeedbackClient`), or a facility's own.

    Plans do not call it directly: :func:`accplans.plans.claim` (used by
    :func:`accplans.plans.restore_on_exit` for every plan that changes the machine) does.
    """

    @property
    def name(self) -> str:
        """Name used in messages."""
        ...

    async def claim(
        self, resources: Sequence[str], mode: Any, owner: str, timeout: float = 10.0
    ) -> str:
        """Claim ``resources`` (``mode``: ``"pause"``, ``"exclude"`` or ``"fold"``).

        Returns once the owner will no longer write them; the id to release with.
        """
        ...

    async def release(self, claim_id: str, keep: bool = False, timeout: float = 10.0) -> None:
        """Give a claim back; ``keep``: the plan's changes stay (not restored)."""
        ...


@runtime_checkable
class OrbitSource(Protocol):
    """BPMs a plan reads orbits from, and waits on for data taken after a change.

    Implemented by :class:`~accplans.devices.BpmFamily` and
    :class:`~accplans.devices.OphydV1OrbitSource`. Call the async methods from a plan with
    :func:`call_async` (module docstring).
    """

    @property
    def name(self) -> str:
        """Name used in messages and in the run's metadata."""
        ...

    @property
    def description(self) -> MachineDescription | None:
        """The machine description the BPMs belong to (identity, calibrations, limits)."""
        ...

    @property
    def names(self) -> Sequence[str]:
        """BPM names, in the order of the arrays of a frame (lattice order)."""
        ...

    async def read_orbit(self) -> OrbitFrame:
        """The latest frame (x, y in m), read consistently (one counter value)."""
        ...

    async def wait_for_frame(
        self, after: float | None = None, counter: int | None = None, timeout: float = 10.0
    ) -> OrbitFrame:
        """The first frame with ``time > after`` and ``counter > counter``.

        With neither given, the next frame after the current one. Event-driven (a monitor),
        never polling. Raises ``TimeoutError`` after ``timeout`` s.
        """
        ...


@runtime_checkable
class SettableFamily(Protocol):
    """A family of magnets a plan sets in SI and restores in hardware units.

    Implemented by :class:`~accplans.devices.MagnetFamily` and
    :class:`~accplans.devices.OphydV1MagnetFamily`. ``select=`` takes names, integer indices
    or a boolean mask; values are in the order of ``select``. ``check_strengths`` is plain
    (no I/O, call it directly before moving anything); the others are awaitables to run with
    :func:`call_async`.
    """

    @property
    def name(self) -> str:
        """Name used in messages, in snapshots and in the run's metadata."""
        ...

    @property
    def description(self) -> MachineDescription | None:
        """The machine description the members belong to (identity, calibrations, limits)."""
        ...

    @property
    def names(self) -> Sequence[str]:
        """Member names in family (lattice) order."""
        ...

    def check_strengths(self, values: npt.ArrayLike, select: Select = None) -> None:
        """Raise ``LimitError`` (a ``ValueError``) if any value is out of its member's limits."""
        ...

    def limits(self, select: Select = None) -> tuple[np.ndarray, np.ndarray]:
        """Strength limits (low, high) in SI of the selected members."""
        ...

    def set_strengths(self, values: npt.ArrayLike, select: Select = None) -> Awaitable[Any]:
        """Set strengths (SI); limits checked before anything is written; done when settled."""
        ...

    async def strengths(self, select: Select = None) -> np.ndarray:
        """Strength readbacks (SI) of the selected members."""
        ...

    async def hardware_setpoints(self, select: Select = None) -> np.ndarray:
        """Setpoints in hardware units (A): what a plan writes back to restore exactly."""
        ...

    def set_hardware(self, values: npt.ArrayLike, select: Select = None) -> Awaitable[Any]:
        """Write setpoints in hardware units (restore); limits checked first."""
        ...

    async def stamped_readbacks(self, select: Select = None) -> tuple[np.ndarray, float]:
        """Readbacks in hardware units and the time (epoch, s) they were stamped.

        An orbit frame whose time is at or after it was taken with these readbacks: a plan
        that set the family waits for such a frame.
        """
        ...


def call_async(func: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> MsgGenerator[T]:
    """Plan stub: await ``func(*args, **kwargs)`` in the RunEngine's loop and return its result.

    ``func`` may be an ``async def`` function or return an awaitable status; an exception it
    raises is raised in the plan. Opens no run.

    Example:
        ``frame = yield from call_async(bpms.wait_for_frame, after=t)``
    """

    def factory() -> Awaitable[T]:
        return func(*args, **kwargs)

    (task,) = yield from bps.wait_for([factory])
    return task.result()
