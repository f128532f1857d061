"""The plans ``measure_orbit``, ``measure_orm`` and ``restore_setpoints``, as the queueserver
needs them: same names, docstrings and behaviour, with annotations it can read.

The plans take devices through accplans' protocols (``OrbitSource``, ``SettableFamily``) and
their annotations are strings (``from __future__ import annotations``): the queueserver can
evaluate neither, refuses every submission ("Model is not fully defined") and would not turn
device names into devices. Each wrapper has the plan's evaluated signature, and its device
parameters take the names of the namespace's devices that implement the protocol.
"""

import inspect
import typing

from bluesky_queueserver import parameter_annotation_decorator

from accplans import plans as _plans
from accplans.devices import OrbitSource, SettableFamily

_devices_here = {n: d for n, d in globals().items() if n[0] != "_" and not inspect.isclass(d)}
_sources = [n for n, d in _devices_here.items() if isinstance(d, OrbitSource)]
_settable = [n for n, d in _devices_here.items() if isinstance(d, SettableFamily)]


def _for_queueserver(plan, **annotations):
    hints = typing.get_type_hints(plan)
    signature = inspect.signature(plan)
    params = [p.replace(annotation=hints.get(p.name, p.empty)) for p in signature.parameters.values()]

    def wrapper(*args, **kwargs):
        return (yield from plan(*args, **kwargs))

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = plan.__name__, plan.__name__, plan.__doc__
    wrapper.__module__, wrapper.__signature__ = plan.__module__, signature.replace(parameters=params)
    return parameter_annotation_decorator({"parameters": annotations})(wrapper)


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
