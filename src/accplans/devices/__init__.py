"""ophyd-async devices of a machine, built from its description, and ``connect()``.

PVs carry hardware units (A, Hz, mm, mA); devices convert through the description's
calibrations and give plans SI (rad, m^-2, m^-3, m, Hz). ``connect(description)`` builds a
:class:`Machine` (families in lattice order, knobs, RF, DCCT, tune monitor), checks the
``MACHINE:ID`` the control system serves, and connects every PV.

Datatypes the devices expect from the control system (the twin serves these):

============================== ======================================================
PV                             record / datatype
============================== ======================================================
``MACHINE:ID``                 string (``stringin``, or a char waveform for long ids)
BPM ``X``, ``Y``               float (mm)
BPM ``VALID``                  integer 0/1 (``longin``)
family ``X``, ``Y``            float64 waveforms (mm)
family ``VALID``               int32 waveform (0/1)
family ``COUNTER``             integer (``longin``; a float record with PREC=0 works)
family ``TIME``                float (epoch s)
magnet ``SP``/``RB``           float (A); family ``SP``/``RB``: float64 waveforms (A)
RF ``FREQ``/``VOLT``           float (Hz, V)
DCCT, tune                     float (mA, h; fractional tunes)
============================== ======================================================

A frame's arrays must be published before its ``TIME`` and ``COUNTER`` (``COUNTER`` last).
"""

from ._bpms import Bpm, BpmFamily
from ._calibrated import CalibratedMovable, EpicsProtocol, LimitError, strength_unit
from ._feedback import CLAIM_MODES, ClaimError, ClaimMode, FeedbackClient, default_feedback_prefix
from ._knobs import Knob
from ._machine import (
    Machine,
    MachineConnectionError,
    MachineIdentityError,
    configure_twin_client,
    connect,
    connect_sync,
)
from ._magnets import (
    MAGNET_CLASSES,
    Corrector,
    Magnet,
    MagnetFamily,
    Quadrupole,
    Sextupole,
    SkewQuadrupole,
)
from ._monitors import Dcct, EmittanceMonitor, EmittanceReading, Rf, RfFrequency, TuneMonitor
from ._numpy_printing import summarise_long_arrays
from ._ophyd_v1 import OphydV1MagnetFamily, OphydV1OrbitSource
from ._protocols import Arbiter, OrbitFrame, OrbitSource, SettableFamily, call_async
from ._select import Select, resolve_select
from ._tbt import Pinger, TbtBuffers, TbtData

summarise_long_arrays()  # ophyd-async formats every array value it logs: see _numpy_printing

__all__ = [
    "CLAIM_MODES",
    "MAGNET_CLASSES",
    "Arbiter",
    "ClaimError",
    "ClaimMode",
    "FeedbackClient",
    "default_feedback_prefix",
    "Bpm",
    "Pinger",
    "TbtBuffers",
    "TbtData",
    "BpmFamily",
    "CalibratedMovable",
    "Corrector",
    "Dcct",
    "EmittanceMonitor",
    "EmittanceReading",
    "EpicsProtocol",
    "Knob",
    "LimitError",
    "Machine",
    "MachineConnectionError",
    "MachineIdentityError",
    "Magnet",
    "MagnetFamily",
    "OphydV1MagnetFamily",
    "OphydV1OrbitSource",
    "OrbitFrame",
    "OrbitSource",
    "Quadrupole",
    "Rf",
    "RfFrequency",
    "Select",
    "SettableFamily",
    "Sextupole",
    "SkewQuadrupole",
    "TuneMonitor",
    "call_async",
    "configure_twin_client",
    "connect",
    "connect_sync",
    "resolve_select",
    "strength_unit",
]
