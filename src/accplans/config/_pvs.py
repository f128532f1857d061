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

Turn-by-turn buffers and the pinger are not in the description (yet): their PVs follow
:data:`TBT_PVS` under ``<prefix><FAMILY>:TBT:`` (per BPM family) and :data:`PINGER_PVS` under
``<prefix>PINGER:`` (:func:`tbt_pvs`, :func:`pinger_pvs`).

A facility's description may use any PV names; only the twin requires this scheme (it serves
the PVs a description names, so any description the twin can serve follows it).
"""

from __future__ import annotations

__all__ = [
    "FEEDBACK_PVS",
    "EMITTANCE_PVS",
    "PINGER_PVS",
    "TBT_PVS",
    "device_pvs",
    "emittance_pvs",
    "family_pvs",
    "feedback_pvs",
    "machine_pvs",
    "pinger_pvs",
    "tbt_pvs",
]

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


#: PVs of the orbit feedback service (``accplans feedback serve``), under
#: ``<machine prefix>SOFB:`` by default: ``{signal: (suffix, record, unit, meaning)}``. The
#: service serves them; :class:`accplans.devices.FeedbackClient` reads and writes them.
FEEDBACK_PVS: dict[str, tuple[str, str, str, str]] = {
    "enable": ("ENABLE", "bo", "", "1: correct the orbit, 0: stop (write)"),
    "state": ("STATE", "mbbi", "", "DISABLED, RUNNING, PAUSED (claimed), FAULT, NO_BEAM"),
    "message": ("MESSAGE", "longStringIn", "", "why the state is what it is"),
    "rate": ("RATE", "ao", "Hz", "iterations per second (write)"),
    "frames": ("FRAMES", "longout", "", "BPM frames averaged per iteration (write)"),
    "gain_x": ("GAIN:X", "ao", "", "integral gain ki of the horizontal plane, (0, 1] (write)"),
    "gain_y": ("GAIN:Y", "ao", "", "integral gain ki of the vertical plane (write)"),
    "pgain_x": ("PGAIN:X", "ao", "", "proportional gain kp, horizontal, [0, 1] (write)"),
    "pgain_y": ("PGAIN:Y", "ao", "", "proportional gain kp, vertical (write)"),
    "iteration": ("ITERATION", "longin", "", "iterations that wrote correctors"),
    "heartbeat": ("HEARTBEAT", "longin", "", "increments every loop pass: the service lives"),
    "error_x": ("ERROR:X", "ai", "mm", "rms orbit error of the last iteration, horizontal"),
    "error_y": ("ERROR:Y", "ai", "mm", "rms orbit error of the last iteration, vertical"),
    "ref_x": ("REF:X", "waveform", "mm", "reference orbit, horizontal, per BPM (write)"),
    "ref_y": ("REF:Y", "waveform", "mm", "reference orbit, vertical, per BPM (write)"),
    "ref_capture": ("REF:CAPTURE", "bo", "", "write 1: reference := the averaged orbit now"),
    "exclude_bpm": ("EXCLUDE:BPM", "waveform", "", "1 per BPM the operator excludes (write)"),
    "exclude_h": ("EXCLUDE:HCORR", "waveform", "", "1 per excluded horizontal corrector"),
    "exclude_v": ("EXCLUDE:VCORR", "waveform", "", "1 per excluded vertical corrector"),
    "claim_request": ("CLAIM:REQUEST", "longStringOut", "", "JSON claim request (write)"),
    "claim_release": ("CLAIM:RELEASE", "longStringOut", "", "JSON release (write)"),
    "claim_heartbeat": ("CLAIM:HEARTBEAT", "longStringOut", "", "a claim id, written >= 1 Hz"),
    "claim_ack": ("CLAIM:ACK", "longStringIn", "", "JSON outcome of the last request"),
    "claims": ("CLAIMS", "longStringIn", "", "JSON list of the active claims"),
    "claim_timeout": ("CLAIM:TIMEOUT", "ao", "s", "watchdog: a silent claim is released after"),
}


def feedback_pvs(prefix: str) -> dict[str, str]:
    """PV names of the orbit feedback service whose PV prefix is ``prefix`` (e.g. ``SR:SOFB:``)."""
    return {sig: f"{prefix}{spec[0]}" for sig, spec in FEEDBACK_PVS.items()}


#: Turn-by-turn PVs of a BPM family, under ``<prefix><FAMILY>:TBT:``:
#: ``{signal: (suffix, record, unit, meaning)}``. ``X``/``Y`` hold ``n_bpm * NTURNS`` values,
#: BPM-major (the turns of the first BPM, then of the second, ...).
TBT_PVS: dict[str, tuple[str, str, str, str]] = {
    "x": ("X", "waveform", "mm", "horizontal TbT buffers, BPM-major"),
    "y": ("Y", "waveform", "mm", "vertical TbT buffers, BPM-major"),
    "turns": ("TURNS", "longout", "", "turns to acquire at the next shot (write)"),
    "nturns": ("NTURNS", "longin", "", "turns in the present buffers"),
    "counter": ("COUNTER", "longin", "", "increments when new buffers are published"),
    "timestamp": ("TIME", "ai", "s", "epoch of the shot the buffers hold"),
}

#: PVs of the pinger (a kicker of both planes), under ``<prefix>PINGER:``.
PINGER_PVS: dict[str, tuple[str, str, str, str]] = {
    "kick_x": ("KICK_X", "ao", "urad", "horizontal kick of the next shot (write)"),
    "kick_y": ("KICK_Y", "ao", "urad", "vertical kick of the next shot (write)"),
    "kick_max": ("KICK_MAX", "ai", "urad", "largest |kick| the pinger accepts"),
    "fire": ("FIRE", "longout", "", "write 1: kick now (completes once the kick is fired)"),
    "busy": ("BUSY", "longin", "", "1 while the buffers of the last shot are being acquired"),
}


def tbt_pvs(prefix: str, family: str) -> dict[str, str]:
    """Turn-by-turn PV names of BPM family ``family``."""
    return {sig: f"{prefix}{family.upper()}:TBT:{spec[0]}" for sig, spec in TBT_PVS.items()}


def pinger_pvs(prefix: str) -> dict[str, str]:
    """PV names of the pinger of the machine whose prefix is ``prefix``."""
    return {sig: f"{prefix}PINGER:{spec[0]}" for sig, spec in PINGER_PVS.items()}


#: PVs of the emittance / beam-size monitor, under ``<prefix>EMIT:`` (not in the description,
#: as the pinger): ``{signal: (suffix, record, unit, meaning)}``.
EMITTANCE_PVS: dict[str, tuple[str, str, str, str]] = {
    "x": ("X", "ai", "pm rad", "horizontal (mode 1) equilibrium emittance"),
    "y": ("Y", "ai", "pm rad", "vertical (mode 2) equilibrium emittance"),
    "size_x": ("SIZE_X", "ai", "um", "rms horizontal beam size at the source point"),
    "size_y": ("SIZE_Y", "ai", "um", "rms vertical beam size at the source point"),
    "timestamp": ("TIME", "ai", "s", "epoch of the magnet readbacks the values belong to"),
    "busy": ("BUSY", "longin", "", "1 while new values are being computed"),
    "counter": ("COUNTER", "longin", "", "increments at every publication (written last)"),
}


def emittance_pvs(prefix: str) -> dict[str, str]:
    """PV names of the emittance monitor of the machine whose prefix is ``prefix``."""
    return {sig: f"{prefix}EMIT:{spec[0]}" for sig, spec in EMITTANCE_PVS.items()}
