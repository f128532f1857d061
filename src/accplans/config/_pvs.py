"""The PV naming scheme of accplans (used by ``from_lattice`` and the twin).

``<prefix><DEVICE>:<SIGNAL>`` for a device, ``<prefix><FAMILY>:<SIGNAL>`` for a family's array
PVs, ``<prefix>MACHINE:ID`` for the identity. Values are in hardware units:

=========== ===================================== ==============================
kind         device PVs                            family array PVs
=========== ===================================== ==============================
bpm          ``X``, ``Y`` (mm), ``VALID`` (0/1)    ``X``, ``Y``, ``VALID``,
                                                   ``COUNTER``, ``TIME`` (s, epoch
                                                   of the readbacks the frame used)
magnet       ``SP``, ``RB`` (A)                    ``SP``, ``RB``
rf           ``FREQ:SP``, ``FREQ:RB`` (Hz),
             ``VOLT:SP``, ``VOLT:RB`` (V)
dcct         ``CURRENT`` (mA), ``LIFETIME`` (h)
tune         ``X``, ``Y`` (fractional tunes)
=========== ===================================== ==============================

A facility's description may use any PV names; only the twin requires this scheme (it serves
the PVs a description names, so any description the twin can serve follows it).
"""

from __future__ import annotations

__all__ = ["device_pvs", "family_pvs", "machine_pvs"]

_DEVICE = {
    "bpm": {"x": "X", "y": "Y", "valid": "VALID"},
    "corrector": {"setpoint": "SP", "readback": "RB"},
    "quadrupole": {"setpoint": "SP", "readback": "RB"},
    "sextupole": {"setpoint": "SP", "readback": "RB"},
    "skew_quadrupole": {"setpoint": "SP", "readback": "RB"},
    "rf": {
        "frequency_setpoint": "FREQ:SP",
        "frequency_readback": "FREQ:RB",
        "voltage_setpoint": "VOLT:SP",
        "voltage_readback": "VOLT:RB",
    },
    "dcct": {"current": "CURRENT", "lifetime": "LIFETIME"},
    "tune": {"x": "X", "y": "Y"},
}
_FAMILY = {
    "bpm": {"x": "X", "y": "Y", "valid": "VALID", "counter": "COUNTER", "timestamp": "TIME"},
    "corrector": {"setpoint": "SP", "readback": "RB"},
    "quadrupole": {"setpoint": "SP", "readback": "RB"},
    "sextupole": {"setpoint": "SP", "readback": "RB"},
    "skew_quadrupole": {"setpoint": "SP", "readback": "RB"},
}


def device_pvs(prefix: str, kind: str, name: str) -> dict[str, str]:
    """PV names of device ``name`` of ``kind``."""
    return {sig: f"{prefix}{name}:{suffix}" for sig, suffix in _DEVICE[kind].items()}


def family_pvs(prefix: str, kind: str, family: str) -> dict[str, str]:
    """Array PV names of a family (empty for kinds without array PVs)."""
    return {
        sig: f"{prefix}{family.upper()}:{suffix}" for sig, suffix in _FAMILY.get(kind, {}).items()
    }


def machine_pvs(prefix: str) -> dict[str, str]:
    """Machine-wide PV names."""
    return {"id": f"{prefix}MACHINE:ID"}
