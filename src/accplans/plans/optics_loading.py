"""``load_optics``: set the magnets to the strengths of a lattice file or of a stored optics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.utils import MsgGenerator

from accplans.config import CrosstalkSpec, MachineDescription
from accplans.data import Result, load_result, record_result, run_metadata, tiled_client_from_env
from accplans.devices import Machine, SettableFamily, call_async, strength_unit
from accplans.model import strengths_from_lattice

from ._record import Record
from ._safety import check_hardware_limits, description_of, restore_on_exit, take_snapshot
from ._stubs import set_family_hardware
from ._worker import compute
from .snapshots import settable_families

__all__ = ["load_optics"]

_UID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

#: The families a Machine stands for: the optics (correctors only when named).
_OPTICS_KINDS = ("quadrupole", "sextupole", "skew_quadrupole")


def _families(items: Sequence[Any]) -> list[SettableFamily]:
    out: list[SettableFamily] = []
    for item in items:
        if isinstance(item, Machine):
            out += [
                f
                for f in item.families.values()
                if isinstance(f, SettableFamily)
                and item.description.families[f.name].kind in _OPTICS_KINDS
            ]
        else:
            out += settable_families(item)
    return out


def _optics_values(
    description: MachineDescription, source: Any, use: str | None, client: Any
) -> MsgGenerator[dict[str, Any]]:
    """The fields of the ``"optics"`` result that ``source`` sets.

    Hardware values go through the description's calibrations.
    """
    if isinstance(source, str) and _UID.match(source) and not Path(source).exists():

        def load() -> Result:
            if client is not None:
                return load_result(client, source, "optics")
            own = tiled_client_from_env()
            try:
                return load_result(own, source, "optics")
            finally:
                own.context.close()

        source = yield from call_async(lambda: asyncio.to_thread(load))
    if isinstance(source, Result):
        if source.kind != "optics":
            raise ValueError(f"load_optics needs an 'optics' result, got {source.kind!r}")
        names = [str(n) for n in source["device_names"]]
        strengths = np.asarray(source["strengths"], float)
        hardware = []
        for name, value in zip(names, strengths, strict=True):
            calibration = description.device(name).calibration
            if calibration is None:
                raise ValueError(f"load_optics: {name} has no calibration (not a magnet)")
            hardware.append(float(calibration.to_hardware(value)))
        return {
            "device_names": names,
            "strengths": strengths,
            "hardware": np.array(hardware),
            "tunes": np.asarray(source["tunes"], float),
            "bpm_names": list(source["bpm_names"]),
            "beta": np.asarray(source["beta"], float),
            "source": f"run {source.uid}",
        }
    if not isinstance(source, (str, Path)):
        raise TypeError(
            f"load_optics: source must be a lattice file, a run uid or a Result, got {source!r}"
        )
    # reading a lattice file and its optics takes 0.1-1 s: the worker does it
    found = yield from compute(strengths_from_lattice, description, str(source), use)
    return {
        "device_names": list(found.names),
        "strengths": found.strengths,
        "hardware": found.hardware,
        "tunes": found.tunes,
        "bpm_names": list(found.bpm_names),
        "beta": found.beta,
        "source": str(source),
    }


def _partial_groups(
    description: MachineDescription, loaded: set[str]
) -> list[tuple[CrosstalkSpec, list[int]]]:
    """Multi-channel magnets of which some channels are loaded and others not (positions)."""
    out = []
    for ct in description.crosstalk:
        channels = [k for k, name in enumerate(ct.devices) if name in loaded]
        if 0 < len(channels) < len(ct.devices):
            out.append((ct, channels))
    return out


def _held_targets(
    description: MachineDescription,
    chosen: Sequence[SettableFamily],
    values: dict[str, Any],
) -> MsgGenerator[dict[str, float]]:
    """Hardware targets of the loaded channels of partly loaded multi-channel magnets.

    The beam gets the optics's strength on them, the channels not loaded held at their
    present setpoints (as a device's ``set`` does). The optics's strengths the beam sees are
    ``M @ nominal`` over every channel of the magnet, so ``values`` must hold every channel (a
    lattice file does; a stored optics records them).
    """
    loaded = {n for fam in chosen for n in fam.names}
    index = {n: k for k, n in enumerate(values["device_names"])}
    out: dict[str, float] = {}
    for ct, channels in _partial_groups(description, loaded):
        missing = [n for n in ct.devices if n not in index]
        if missing:
            raise ValueError(
                f"load_optics: {values['source']} holds no strength for {missing}, channels of "
                f"the multi-channel magnet {ct.devices}: the strengths its loaded channels must "
                "give the beam are unknown"
            )
        nominal = np.array([values["strengths"][index[n]] for n in ct.devices], float)
        beam = ct.apply(nominal)
        first = ct.devices[channels[0]]
        fam = next(f for f in chosen if first in f.names)
        members = getattr(fam, "members", None)
        member = members[fam.names.index(first)] if members is not None else None
        if member is None or not hasattr(member, "partner_nominal"):
            raise TypeError(
                f"load_optics: {fam.name} cannot read the other channels of {first}'s magnet "
                "(not an accplans MagnetFamily)"
            )
        held = yield from call_async(member.partner_nominal)
        wanted = ct.nominal_for(beam[channels], channels, held)
        for k, n in zip(channels, wanted, strict=True):
            calibration = description.device(ct.devices[k]).calibration
            assert calibration is not None  # a channel of a magnet
            out[ct.devices[k]] = float(calibration.to_hardware(n))
    return out


def load_optics(
    families: Sequence[SettableFamily],
    source: str | Path | Result,
    *,
    steps: int = 3,
    use: str | None = None,
    client: Any = None,
    md: dict | None = None,
) -> MsgGenerator[str]:
    """Set magnets to the strengths of a lattice file (or of a stored optics), in steps.

    Each magnet of ``families`` takes the strength its lattice element has in the file (the
    file must hold the description's lattice, element for element, e.g. a ring pyAT saved
    after a fit), converted to hardware units through its calibration (cross-talk undone).
    A multi-channel magnet (the description's ``crosstalk``) some of whose channels are not
    loaded (correctors of a sextupole while loading the sextupoles) keeps those channels'
    currents, and the loaded ones are solved so that the beam sees the file's strength on
    them, as a device's ``set`` does.
    Every target is checked against the limits before anything moves. The magnets then ramp
    in ``steps`` linear steps (checkpoint -> set every family -> wait for the readbacks -> one
    ``primary`` event per step). The run records the loaded optics as an ``"optics"`` result
    (strengths, hardware values, the file's tunes and beta functions at the BPMs); its uid is
    a stored optics that ``load_optics`` takes as ``source`` later.

    A correction plan: the new optics stays when the plan succeeds, the last completed step
    on ``RE.stop()``; on a failure or an abort every family returns to its starting setpoints.

    Args:
        families: the families to set (e.g. ``[quadrupoles, sextupoles]``; correctors too if
            the file's kicks should be loaded); the :class:`~accplans.devices.Machine` stands
            for its quadrupole, sextupole and skew families.
        source: a lattice file (any format ``at.load_lattice`` reads: ``.mat``, ``.m``,
            ``.json``, elegant ``.lte``, ...), the uid of a run holding an ``"optics"`` result,
            or such a result.
        steps: number of linear steps from the present setpoints (>= 1).
        use: variable of a ``.mat`` file holding the ring, or the line (elegant) or sequence
            (MAD-X) to read (pyAT's default otherwise). Elegant and MAD-X files carry no
            corrector kick or skew component on a sextupole: load only the quadrupole and
            sextupole families from them.
        client: the Tiled container of a stored optics; default from ``$TILED_URI`` and
            ``$TILED_API_KEY``.
        md: metadata added to the run's start document.

    Returns:
        The uid of the run.
    """
    chosen = _families(list(families))
    if not chosen:
        raise ValueError("load_optics needs at least one magnet family (or the machine)")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"load_optics: steps must be an integer >= 1, got {steps!r}")
    description = description_of(*chosen)
    _md = run_metadata(
        description,
        plan_name="load_optics",
        plan_args={
            "families": [f.name for f in chosen],
            "source": str(source) if isinstance(source, (str, Path)) else repr(source),
            "steps": steps,
            "use": use,
        },
        num_points=steps,
        optics_source=str(source) if not isinstance(source, Result) else f"run {source.uid}",
    )
    _md.update(md or {})

    def plan() -> MsgGenerator[str]:
        values = yield from _optics_values(description, source, use, client)
        index = {n: k for k, n in enumerate(values["device_names"])}
        targets: dict[str, np.ndarray] = {}
        for fam in chosen:
            missing = [n for n in fam.names if n not in index]
            if missing:
                raise ValueError(
                    f"load_optics: {values['source']} sets no strength for {fam.name} members "
                    f"{missing[:5]}"
                )
        held = yield from _held_targets(description, chosen, values)
        for fam in chosen:
            targets[fam.name] = np.array(
                [held.get(n, values["hardware"][index[n]]) for n in fam.names]
            )
            check_hardware_limits(description, fam.names, targets[fam.name])
        names = [n for fam in chosen for n in fam.names]
        # the other channels of partly loaded magnets too, so that the stored optics loads
        loaded = set(names)
        names += [
            n
            for ct, _ in _partial_groups(description, loaded)
            for n in ct.devices
            if n not in loaded and n in index
        ]
        picked = [index[n] for n in names]
        before = yield from take_snapshot(description, chosen)
        start = {f.name: np.array([before.setpoints[f.name][n] for n in f.names]) for f in chosen}
        records = {
            fam.name: Record(
                fam.name,
                {"setpoint": start[fam.name].copy()},
                {"setpoint": description.device(fam.names[0]).unit},
            )
            for fam in chosen
        }
        progress = Record("load_optics", {"step": 0})

        @bpp.run_decorator(md=_md)
        def run() -> MsgGenerator[None]:
            yield from record_result(
                "optics",
                device_names=names,
                strengths=np.asarray(values["strengths"], float)[picked],
                strength_units=[strength_unit(description.device(n).field) for n in names],
                hardware=np.asarray(values["hardware"], float)[picked],
                hardware_units=[description.device(n).unit for n in names],
                tunes=values["tunes"],
                bpm_names=values["bpm_names"],
                beta=values["beta"],
                source=values["source"],
            )
            for k in range(1, steps + 1):
                yield from bps.checkpoint()
                for fam in chosen:
                    a, b = start[fam.name], targets[fam.name]
                    value = b if k == steps else a + (b - a) * (k / steps)
                    yield from set_family_hardware(fam, value)
                    records[fam.name].update(setpoint=value)
                yield from bps.create("primary")
                for record in records.values():
                    yield from bps.read(record)
                yield from bps.read(progress.update(step=k))
                yield from bps.save()

        return (
            yield from restore_on_exit(
                run(), chosen, before, policy="correction", owner="load_optics"
            )
        )

    return (yield from plan())
