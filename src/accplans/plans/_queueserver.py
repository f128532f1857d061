"""The plans as bluesky-queueserver needs them: evaluated annotations, device lists, help texts.

The plans take devices through protocols (:class:`~accplans.devices.OrbitSource`,
:class:`~accplans.devices.SettableFamily`) and their annotations are strings (``from __future__
import annotations``): the queueserver can evaluate neither, refuses every submission ("Model is
not fully defined") and would not turn device names into devices. :func:`queueserver_plans`
wraps every plan of :data:`PLANS` with the same name, docstring and behaviour; its device
parameters take the names of the namespace's devices that implement the protocol, and its
parameter descriptions come from the Google-style ``Args:`` section of the docstring (the
queueserver reads numpydoc only).
"""

from __future__ import annotations

import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bluesky_queueserver import parameter_annotation_decorator

from accplans.devices import (
    EmittanceMonitor,
    OrbitSource,
    Pinger,
    SettableFamily,
    TbtBuffers,
    TuneMonitor,
)

from .bba import bba
from .bumps import orbit_bump
from .c_minus import correct_c_minus, measure_c_minus
from .chromaticity import correct_chromaticity, measure_chromaticity
from .coupling import correct_coupling, measure_coupling
from .dispersion import measure_dispersion
from .feedback import orbit_feedback
from .fofb import design_fofb
from .loco import correct_optics, loco, loco_fit
from .nonlinear import correct_nonlinear, measure_adts
from .optics_loading import load_optics
from .optics_tbt import correct_optics_tbt
from .orbit import measure_orbit
from .orbit_correction import correct_orbit
from .orm import measure_orm
from .restore import restore_setpoints
from .rf_frequency import correct_rf_frequency
from .snapshots import save_setpoints
from .standardize import standardize_magnets
from .tbt import measure_tbt
from .tunes import correct_tunes, measure_tunes

__all__ = ["PLANS", "queueserver_plans"]

#: Every public plan; a new plan joins the profile and the queueserver by being listed here.
PLANS: tuple[Callable[..., Any], ...] = (
    measure_orbit,
    measure_orm,
    correct_orbit,
    orbit_feedback,
    restore_setpoints,
    measure_dispersion,
    save_setpoints,
    load_optics,
    standardize_magnets,
    orbit_bump,
    design_fofb,
    correct_rf_frequency,
    bba,
    measure_tunes,
    correct_tunes,
    measure_chromaticity,
    correct_chromaticity,
    loco_fit,
    correct_optics,
    loco,
    measure_tbt,
    correct_optics_tbt,
    measure_adts,
    correct_nonlinear,
    measure_coupling,
    correct_coupling,
    measure_c_minus,
    correct_c_minus,
)

_LISTS = {OrbitSource: "OrbitSources", SettableFamily: "Families"}
_LISTS[TuneMonitor] = "TuneMonitors"
_LISTS[EmittanceMonitor] = "EmittanceMonitors"
_LISTS[TbtBuffers] = "TbtBuffers"
_LISTS[Pinger] = "Pingers"


def _arg_descriptions(doc: str | None) -> dict[str, str]:
    """``{argument: text}`` from the ``Args:`` section of a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    found: dict[str, str] = {}
    name = None
    for line in lines[lines.index("Args:") + 1 :] if "Args:" in lines else []:
        if line and not line.startswith(" "):
            break  # the next section
        if match := re.match(r"    (\w+)(?: \(.*\))?: (.*)", line):
            name, found[match[1]] = match[1], match[2]
        elif name and line.strip():
            found[name] += " " + line.strip()
    return found


def _annotation(hint: Any) -> tuple[str, set[type]] | None:
    """The queueserver annotation of a parameter that takes devices (``None``: no devices)."""
    if hint in _LISTS:
        return _LISTS[hint], {hint}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if str in args:
            return "str", set()  # e.g. a journaled restore given by its path
        parts = [a for a in args if a is not type(None)]
        converted = [_annotation(a) for a in parts]
        if any(c is None for c in converted):
            return None
        texts = [c[0] for c in converted if c is not None]
        used = set().union(*(c[1] for c in converted if c is not None))
        text = texts[0] if len(texts) == 1 else f"typing.Union[{', '.join(texts)}]"
        return (f"typing.Optional[{text}]" if len(parts) < len(args) else text), used
    if origin is not None and issubclass(origin, Sequence) and len(args) == 1:
        inner = _annotation(args[0])
        if inner is not None:
            return f"typing.List[{inner[0]}]", inner[1]
    return None


def _for_queueserver(
    plan: Callable[..., Any], devices: Mapping[type, list[str]]
) -> Callable[..., Any]:
    signature, hints = inspect.signature(plan), typing.get_type_hints(plan)
    texts = _arg_descriptions(plan.__doc__)
    params, annotations = [], {}
    for p in signature.parameters.values():
        hint = hints.get(p.name, p.empty)
        spec: dict[str, Any] = {}
        converted = _annotation(hint) if hint is not p.empty else None
        if converted is not None:
            text, used = converted
            spec["annotation"] = text
            if used:
                spec["devices"] = {_LISTS[t]: list(devices[t]) for t in used}
            hint = p.empty
        if p.name in texts:
            spec["description"] = texts[p.name]
        annotations[p.name] = spec
        params.append(p.replace(annotation=hint))

    @functools.wraps(plan)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return (yield from plan(*args, **kwargs))

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    description = inspect.cleandoc(plan.__doc__ or plan.__name__)
    decorate = parameter_annotation_decorator(
        {"description": description, "parameters": annotations}
    )
    return decorate(wrapper)


def queueserver_plans(namespace: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """Every plan of :data:`PLANS`, wrapped for the queueserver, by name.

    Args:
        namespace: the startup namespace; its public objects that implement a protocol are the
            devices a plan's parameter may name (e.g. ``bpms``; ``hcorr``, ``vcorr``, ``rf``).

    Example (a profile's startup file)::

        from accplans.plans import queueserver_plans
        globals().update(queueserver_plans(globals()))
    """
    public = {n: d for n, d in namespace.items() if not n.startswith("_")}
    devices = {
        proto: sorted(
            n for n, d in public.items() if not inspect.isclass(d) and isinstance(d, proto)
        )
        for proto in _LISTS
    }
    return {plan.__name__: _for_queueserver(plan, devices) for plan in PLANS}
