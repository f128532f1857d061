"""The digital twin: a pyAT machine with errors, served over EPICS by its own process.

:class:`Twin` is the physics (no EPICS); :class:`TwinIoc` serves it as a soft IOC
(``accplans twin serve`` / ``python -m accplans.sim serve``); :func:`run_twin` starts one in a
child process on loopback for tests and the demo. Nothing but the CLI and tests imports this
package: plans talk to the twin over EPICS, as to a real machine.
"""

from ._bba_truth import bba_truth, beam_in_quadrupoles
from ._cli import add_twin_commands, serve_main
from ._emittance import (
    EmittanceResult,
    EmittanceSettings,
    compute_emittances,
    scan_c_minus,
    true_c_minus,
)
from ._errors import ErrorModel, TwinErrors, bpm_readings, draw_errors
from ._ioc import IocSettings, TwinIoc
from ._process import (
    TwinControl,
    TwinPorts,
    TwinProcess,
    client_environment,
    loopback_environment,
    reserve_ports,
    run_twin,
)
from ._tbt import BAD_BPM_KINDS, TbtSettings
from ._truth import Truth, load_truth
from ._twin import BeamSettings, Frame, Twin

__all__ = [
    "EmittanceResult",
    "EmittanceSettings",
    "compute_emittances",
    "scan_c_minus",
    "true_c_minus",
    "bba_truth",
    "beam_in_quadrupoles",
    "BAD_BPM_KINDS",
    "BeamSettings",
    "TbtSettings",
    "ErrorModel",
    "Frame",
    "IocSettings",
    "Truth",
    "Twin",
    "TwinControl",
    "TwinErrors",
    "TwinIoc",
    "TwinPorts",
    "TwinProcess",
    "add_twin_commands",
    "bpm_readings",
    "client_environment",
    "draw_errors",
    "load_truth",
    "loopback_environment",
    "reserve_ports",
    "run_twin",
    "serve_main",
]
