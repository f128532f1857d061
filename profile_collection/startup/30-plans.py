"""The plans ``measure_orbit``, ``measure_orm`` and ``restore_setpoints``, as the queueserver
needs them: same names, docstrings and behaviour, with annotations it can read.

The plans take devices through accplans' protocols (``OrbitSource``, ``SettableFamily``) and
their annotations are strings (``from __future__ import annotations``): the queueserver can
evaluate neither, refuses every submission ("Model is not fully defined") and would not turn
device names into devices. Each wrapper has the plan's evaluated signature, and its device
parameters take the names of the namespace's devices that implement the protocol.
"""

import functools
import inspect
import re
import typing

from bluesky_queueserver import parameter_annotation_decorator

from accplans import plans as _plans
from accplans.devices import OrbitSource, SettableFamily

_devices_here = {n: d for n, d in globals().items() if n[0] != "_" and not inspect.isclass(d)}
_sources = [n for n, d in _devices_here.items() if isinstance(d, OrbitSource)]
_settable = [n for n, d in _devices_here.items() if isinstance(d, SettableFamily)]


def _arg_descriptions(doc):
    """``{argument: text}`` from the ``Args:`` section of a Google-style docstring."""
    lines, found, name = inspect.cleandoc(doc or "").splitlines(), {}, None
    for line in lines[lines.index("Args:") + 1 :] if "Args:" in lines else []:
        if line and not line.startswith(" "):
            break  # the next section
        if match := re.match(r"    (\w+)(?: \(.*\))?: (.*)", line):
            name, found[match[1]] = match[1], match[2]
        elif name and line.strip():
            found[name] += " " + line.strip()
    return found


def _for_queueserver(plan, **devices):
    """``plan`` with evaluated annotations, device lists and the docstring's texts."""
    signature, hints = inspect.signature(plan), typing.get_type_hints(plan)
    params = [
        p.replace(annotation=hints.get(p.name, p.empty)) for p in signature.parameters.values()
    ]
    texts = _arg_descriptions(plan.__doc__)
    annotations = {n: dict(devices.get(n, {})) for n in signature.parameters}
    for n in annotations.keys() & texts.keys():
        annotations[n]["description"] = texts[n]

    @functools.wraps(plan)
    def wrapper(*args, **kwargs):
        return (yield from plan(*args, **kwargs))

    wrapper.__signature__ = signature.replace(parameters=params)  # pyright: ignore[reportAttributeAccessIssue]
    description = {"description": inspect.cleandoc(plan.__doc__ or plan.__name__)}
    return parameter_annotation_decorator({**description, "parameters": annotations})(wrapper)


def _devices(type_: str, **lists):
    return {"annotation": type_, "devices": lists}


measure_orbit = _for_queueserver(
    _plans.measure_orbit, bpms=_devices("OrbitSources", OrbitSources=_sources)
)
measure_orm = _for_queueserver(
    _plans.measure_orm,
    bpms=_devices("OrbitSources", OrbitSources=_sources),
    correctors=_devices("typing.Union[Families, typing.List[Families]]", Families=_settable),
    rf=_devices("typing.Optional[Families]", Families=_settable),
)
restore_setpoints = _for_queueserver(
    _plans.restore_setpoints,
    families=_devices("typing.List[Families]", Families=_settable),
    pending={"annotation": "str"},
)
