"""Claims: a plan takes the resources it will move from their other owner (the orbit feedback).

DESIGN.md, "Resources and arbitration": before it moves anything, a plan claims what it will
move; the owner (the orbit feedback service, through an :class:`~accplans.devices.Arbiter`)
acknowledges, after which it no longer writes them; the plan releases the claim however it
ends. :func:`~accplans.plans.restore_on_exit` does both for every plan that changes the
machine, so plans rarely call :func:`claim` themselves.

The arbiter is process-wide: the profile (or a test) calls ``use_arbiter(feedback)`` once;
with none set, claims are no-ops (a machine without a feedback has nobody to ask).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bluesky.utils import MsgGenerator

from accplans.devices import Arbiter, ClaimError, ClaimMode, SettableFamily, call_async

__all__ = ["Claim", "ClaimError", "claim", "current_arbiter", "release", "use_arbiter"]

_log = logging.getLogger(__name__)
_ARBITER: list[Arbiter] = []


@dataclass(frozen=True)
class Claim:
    """A claim held by a plan.

    Attributes:
        arbiter: who granted it.
        id: its id (in the feedback's ``CLAIMS`` and write log).
        mode: ``"pause"``, ``"exclude"`` or ``"fold"``.
        resources: what was claimed (device or family names).
    """

    arbiter: Arbiter
    id: str
    mode: ClaimMode
    resources: tuple[str, ...]


def use_arbiter(arbiter: Arbiter | None) -> None:
    """Make ``arbiter`` the one every plan of this process claims from (``None``: nobody)."""
    _ARBITER.clear()
    if arbiter is not None:
        if not isinstance(arbiter, Arbiter):
            raise TypeError(f"{arbiter!r} does not implement accplans.devices.Arbiter")
        _ARBITER.append(arbiter)


def current_arbiter() -> Arbiter | None:
    """The arbiter set by :func:`use_arbiter`, or ``None``."""
    return _ARBITER[0] if _ARBITER else None


def resources_of(families: Sequence[SettableFamily]) -> tuple[str, ...]:
    """Resource names of whole families.

    A family's own name where its description knows it, else its members' names.
    """
    names: list[str] = []
    for fam in families:
        desc = fam.description
        known = desc is not None and fam.name.upper() in {f.upper() for f in desc.families}
        names.extend([fam.name] if known else list(fam.names))
    return tuple(names)


def claim(
    resources: Sequence[str],
    mode: ClaimMode = "pause",
    *,
    owner: str = "plan",
    arbiter: Arbiter | None = None,
    timeout: float = 10.0,
) -> MsgGenerator[Claim | None]:
    """Claim ``resources`` from the arbiter before moving them (a plan stub; nothing moves).

    Args:
        resources: device or family names the plan will move.
        mode: ``"pause"`` (the feedback stops while the claim is held), ``"exclude"`` (it
            continues without them) or ``"fold"`` (pauses; on a kept release the orbit change
            joins its reference).
        owner: who claims (the plan's name), shown by the feedback.
        arbiter: whom to ask (default :func:`current_arbiter`; none: nothing to do).
        timeout: seconds to wait for the acknowledgement.

    Returns:
        The :class:`Claim`, or ``None`` when there is no arbiter.

    Raises:
        ClaimError: the arbiter refused or did not answer; nothing has moved.
    """
    arbiter = arbiter or current_arbiter()
    if arbiter is None:
        return None
    claim_id: str = yield from call_async(arbiter.claim, list(resources), mode, owner, timeout)
    _log.info("claimed %s (%s) from %s: %s", list(resources)[:5], mode, arbiter.name, claim_id)
    return Claim(arbiter, claim_id, mode, tuple(resources))


def release(held: Claim | None, *, keep: bool) -> MsgGenerator[None]:
    """Release a claim from :func:`claim` (``None``: nothing to do).

    Args:
        held: the claim.
        keep: whether the plan's changes stay (a ``fold`` claim then folds them into the
            feedback's reference); ``False`` when the plan restored what it changed.
    """
    if held is None:
        return
    yield from call_async(held.arbiter.release, held.id, keep)
    _log.info("released %s (keep=%s)", held.id, keep)
