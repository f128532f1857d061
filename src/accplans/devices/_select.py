"""``select=``: choosing members of a family by names, integer indices or a boolean mask.

Every family method and every plan that takes ``select=`` resolves it with
:func:`resolve_select`, so the accepted forms and the error messages are the same everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from accplans.config import DeviceSpec

__all__ = ["FamilyMembers", "Select", "resolve_select"]

#: What ``select=`` accepts: ``None`` (every member), a name, an integer index, a sequence of
#: names and/or integer indices (0-based; negative counts from the end), a ``range``, or a
#: boolean mask with one entry per member (a list of ``bool`` or a numpy ``bool`` array).
Select: TypeAlias = (
    str | int | Iterable[str | int] | Sequence[bool] | npt.NDArray[np.generic] | None
)


def _owner_text(owner: str) -> str:
    return f"{owner}: " if owner else ""


def resolve_select(
    select: Select, names: Sequence[str], *, owner: str = ""
) -> npt.NDArray[np.intp]:
    """Indices of the members chosen by ``select``, in the order ``select`` gives them.

    Args:
        select: ``None`` (all members, in family order), a name, an index, a sequence of names
            and/or indices, a ``range``, or a boolean mask of ``len(names)`` entries.
        names: member names in family (lattice) order.
        owner: name of the family, used in error messages.

    Returns:
        Integer indices into ``names`` (non-negative, no repeats).

    Raises:
        KeyError: an unknown name (the message lists close matches).
        IndexError: an index outside ``[-len(names), len(names))``.
        ValueError: a mask of the wrong length, or a member chosen twice.
        TypeError: anything else (a slice, a float, a nested list, ...).
    """
    n = len(names)
    where = _owner_text(owner)
    if select is None:
        return np.arange(n, dtype=np.intp)
    if isinstance(select, (bool, np.bool_)):
        raise TypeError(
            f"{where}select={select!r} is ambiguous: give a mask with one entry per member"
        )
    if isinstance(select, slice):
        raise TypeError(
            f"{where}select= does not take a slice ({select!r}): give indices, e.g. range(...), "
            "names or a boolean mask"
        )
    if isinstance(select, (str, int, np.integer)):
        items: list[object] = [select]
    elif isinstance(select, np.ndarray):
        if select.ndim != 1:
            raise TypeError(f"{where}select= must be one-dimensional, got shape {select.shape}")
        if select.dtype == np.bool_:
            return _from_mask(select.astype(bool), n, where)
        items = select.tolist()
    elif isinstance(select, Iterable):
        items = list(select)
    else:
        raise TypeError(
            f"{where}cannot select members with {select!r} (type {type(select).__name__}): "
            "give names, integer indices or a boolean mask"
        )
    if items and all(isinstance(v, (bool, np.bool_)) for v in items):
        return _from_mask(np.asarray(items, dtype=bool), n, where)
    lookup = {name: i for i, name in enumerate(names)}
    out: list[int] = []
    for item in items:
        if isinstance(item, str):
            try:
                out.append(lookup[item])
            except KeyError:
                close = difflib.get_close_matches(item, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise KeyError(f"{where}no member named {item!r}{hint}") from None
        elif isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
            k = int(item)
            if not -n <= k < n:
                raise IndexError(f"{where}index {k} is out of range for {n} members (0..{n - 1})")
            out.append(k % n)
        else:
            raise TypeError(
                f"{where}cannot select a member with {item!r} (type {type(item).__name__}): "
                "give a name or an integer index"
            )
    idx = np.asarray(out, dtype=np.intp)
    uniq, counts = np.unique(idx, return_counts=True)
    if np.any(counts > 1):
        twice = [names[i] for i in uniq[counts > 1]]
        raise ValueError(f"{where}members selected more than once: {twice[:5]}")
    return idx


def _from_mask(mask: npt.NDArray[np.bool_], n: int, where: str) -> npt.NDArray[np.intp]:
    if mask.shape != (n,):
        raise ValueError(
            f"{where}a boolean mask needs {n} entries (one per member), got {mask.size}"
        )
    return np.flatnonzero(mask).astype(np.intp)


MemberT = TypeVar("MemberT")


class FamilyMembers(Generic[MemberT]):
    """Membership of a device family: names, lookup and ``select`` over ``members``.

    Mixed into :class:`~accplans.devices.BpmFamily` and :class:`~accplans.devices.MagnetFamily`
    (before the ophyd-async base): they set ``specs`` (the members' descriptions, in family
    order), ``_names`` and ``members`` (a ``DeviceVector`` indexed like ``specs``).
    """

    specs: tuple[DeviceSpec, ...]
    _names: tuple[str, ...]
    members: Any

    def set_name(self, name: str, *, child_name_separator: str | None = None) -> None:
        """Name the family ``name`` and each member after its device (``BPM001``, ...)."""
        super().set_name(name, child_name_separator=child_name_separator)  # type: ignore[misc]
        for i, member in self.members.items():
            member.set_name(self.specs[i].name)

    @property
    def names(self) -> tuple[str, ...]:
        """Member names in family (lattice) order."""
        return self._names

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, key: int | str) -> MemberT:
        """A member by index or name."""
        (i,) = resolve_select(key, self._names, owner=self._owner())
        return self.members[int(i)]

    def select(self, select: Select = None) -> npt.NDArray[np.intp]:
        """Indices of the members chosen by ``select`` (names, indices or a boolean mask)."""
        return resolve_select(select, self._names, owner=self._owner())

    def _owner(self) -> str:
        return str(getattr(self, "name", ""))
